"""Batch bytes are pinned: each augmentation family builds, from the images in tests/data/golden/, the same
bytes as before the data/ layout moved (recorded in tests/data/golden/batches.json), so existing buffers,
scale caches and validation stores stay valid across refactors.

Regenerate the record only when a change is meant to alter batch bytes (and say so in the commit):
    GOLDEN_RECORD=1 python -m pytest tests/test_batch_bytes.py
"""
import dataclasses
import hashlib
import json
import os

import pytest

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
    paths = sorted(os.path.join(GOLDEN, f) for f in os.listdir(GOLDEN) if f.endswith(".JPEG"))
    recipe = dataclasses.replace(BASE, **FAMILIES[name])
    builder = BatchBuilder(paths, list(range(len(paths))), recipe)
    return digest(builder.build(epoch, batch) for epoch in (0, 1) for batch in range(builder.num_batches()))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_augmentation_family_builds_the_recorded_bytes(name):
    if name == "scale_turbojpeg" and get_turbojpeg() is None:
        pytest.skip("the turbojpeg wheel is not installed")
    if os.environ.get("GOLDEN_RECORD"):
        record = json.load(open(RECORD)) if os.path.exists(RECORD) else {}
        record[name] = family_digest(name)
        with open(RECORD, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
    assert family_digest(name) == json.load(open(RECORD))[name]
