"""The golden batch bytes: each augmentation family's recipe over the images in tests/data/golden/, and
the command that records their digests in tests/data/golden/batches.json.

tests/test_batch_bytes.py only compares against that record; it never writes it. Record again only when a
change is meant to alter batch bytes (and say so in the commit):
    python -m tests.record_golden            # every family
    python -m tests.record_golden tiny       # one family
"""
import dataclasses
import hashlib
import json
import os
import sys

from data.buffer.builder import BatchBuilder, Recipe
from data.transforms.jpeg_window import get_turbojpeg
from data.transforms.tiny_augment import TinyAugmentConfig

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")
RECORD = os.path.join(GOLDEN, "batches.json")
MU, SIGMA = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
BASE = Recipe(seed=7, batch_size=3, crop=24, scales=(32, 40, 48), pca_std=0.1, mu=MU, sigma=SIGMA)
FAMILIES = {
    "scale_turbojpeg": dict(decoder="turbojpeg"),
    "scale_pil": dict(decoder="pil"),
    "scale_progressive_pil": dict(decoder="pil", crop_sizes=[[0, 16], [1, 24]]),
    "inception": dict(augmentation="inception", pca_std=0.0),
    "tiny": dict(augmentation="tiny", crop=64, crop_sizes=[[0, 56]], pca_std=0.0, tiny=TinyAugmentConfig()),
}


def digest(epoch_batches):
    h = hashlib.sha256()
    for images, labels, lighting in epoch_batches:
        for a in (images, labels, lighting):
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def family_digest(name):
    """sha256 of epochs 0 and 1 of `name`'s batches, built from the golden images."""
    paths = sorted(os.path.join(GOLDEN, f) for f in os.listdir(GOLDEN) if f.endswith(".JPEG"))
    recipe = dataclasses.replace(BASE, **FAMILIES[name])
    builder = BatchBuilder(paths, list(range(len(paths))), recipe)
    return digest(builder.build(epoch, batch) for epoch in (0, 1) for batch in range(builder.num_batches()))


def recorded():
    with open(RECORD) as f:
        return json.load(f)


def main(names):
    record = recorded() if os.path.exists(RECORD) else {}
    for name in names or sorted(FAMILIES):
        if name not in FAMILIES:
            raise SystemExit(f"error: no augmentation family {name!r}; expected one of {', '.join(sorted(FAMILIES))}.")
        if name == "scale_turbojpeg" and get_turbojpeg() is None:
            raise SystemExit("error: recording scale_turbojpeg needs the turbojpeg wheel; install requirements.txt.")
        record[name] = family_digest(name)
        print(f"{name} {record[name]}")
    with open(RECORD + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(RECORD + ".tmp", RECORD)


if __name__ == "__main__":
    main(sys.argv[1:])
