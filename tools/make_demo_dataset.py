"""Generate a small ImageNet-layout dataset of procedurally drawn shape and texture classes.

    python tools/make_demo_dataset.py --out demo_data/imagenet

Each class is a shape or texture (disc, ring, square, triangle, cross, star,
frame, stripes, checker, dots) drawn with a random colour, size, position and
rotation on a noisy gradient background, in JPEGs of varied sizes and aspect
ratios. Colour carries no class information, so a network has to learn shape.

--layout tiny writes Tiny ImageNet's layout instead (wnids.txt, words.txt,
train/<wnid>/images/, val/images/ + val/val_annotations.txt) with square images,
64x64 unless --min_side/--max_side say otherwise.

Odd files mirror what ImageNet really contains: CMYK and grayscale JPEGs, a PNG
named .JPEG, and (train split) one truncated file that every script skips.

Every image is a pure function of (seed, split, class, number), so the set is
the same whatever the number of workers. The folder appears under its final
name only when complete, with a marker JSON holding the arguments; rerunning
with the same arguments does nothing.
"""
import argparse
import io
import json
import math
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import atomic_dir, atomic_write_text  # noqa: E402
from data.pool import imap_progress  # noqa: E402

GENERATOR_VERSION = 3
MARKER = "demo_dataset.json"
CLASS_NAMES = ("disc", "ring", "square", "triangle", "cross", "star", "frame", "stripes", "checker", "dots")
LAYOUTS = ("folders", "kaggle", "lists", "tiny")
DEFAULT_SIDES = {"tiny": (64, 64)}  # other layouts: (80, 160)
SPLIT_ID = {"train": 0, "val": 1}
SUPERSAMPLE = 2  # shape masks are drawn at 2x and reduced, for anti-aliased edges


def wnid(k):
    return f"n{k + 1:08d}"


# ----------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------

def _luma(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _contrasting_colour(rng, against, min_gap=70.0):
    """A random colour whose luminance differs from `against` by at least min_gap."""
    for _ in range(20):
        c = rng.integers(0, 256, 3).astype(np.float32)
        if abs(_luma(c) - _luma(against)) >= min_gap:
            return c
    return (255.0 - np.asarray(against, np.float32)).clip(0, 255)


def _background(rng, h, w):
    c1, c2 = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.arange(w, dtype=np.float32)[None, :] * math.cos(angle)
         + np.arange(h, dtype=np.float32)[:, None] * math.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    return c1 + (c2 - c1) * t[..., None], (c1 + c2) / 2.0


def _rotate(points, angle, cx, cy):
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def _regular(n, r, phase=0.0):
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _square(r):
    return [(-r, -r), (r, -r), (r, r), (-r, r)]


def _draw_mask(kind, rng, h, w, cx, cy, r):
    """Float mask in [0,1] of the shape (or of the region a texture fills)."""
    s = SUPERSAMPLE
    mask = Image.new("L", (w * s, h * s), 0)
    d = ImageDraw.Draw(mask)
    cx, cy, r = cx * s, cy * s, r * s
    angle = rng.uniform(0, 2 * math.pi)
    ellipse = lambda rx, ry, fill: d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)  # noqa: E731
    if kind == "disc":
        ellipse(r, r * rng.uniform(0.85, 1.0), 255)
    elif kind == "ring":
        ellipse(r, r, 255)
        ellipse(r * rng.uniform(0.5, 0.7), r * rng.uniform(0.5, 0.7), 0)
    elif kind == "square":
        d.polygon(_rotate(_square(r * 0.8), angle, cx, cy), fill=255)
    elif kind == "triangle":
        d.polygon(_rotate(_regular(3, r * 1.05), angle, cx, cy), fill=255)
    elif kind == "cross":
        arm = r * rng.uniform(0.28, 0.4)
        for pts in ([(-r, -arm), (r, -arm), (r, arm), (-r, arm)], [(-arm, -r), (arm, -r), (arm, r), (-arm, r)]):
            d.polygon(_rotate(pts, angle, cx, cy), fill=255)
    elif kind == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = [(p if k % 2 == 0 else (p[0] * inner, p[1] * inner)) for k, p in enumerate(_regular(10, r * 1.05))]
        d.polygon(_rotate(pts, angle, cx, cy), fill=255)
    elif kind == "frame":
        d.polygon(_rotate(_square(r * 0.85), angle, cx, cy), fill=255)
        d.polygon(_rotate(_square(r * 0.85 * rng.uniform(0.55, 0.7)), angle, cx, cy), fill=0)
    else:  # textures fill a disc or a rotated square; the texture, not the outline, is the class
        if rng.random() < 0.5:
            ellipse(r, r, 255)
        else:
            d.polygon(_rotate(_square(r * 0.85), angle, cx, cy), fill=255)
    mask = mask.resize((w, h), Image.BILINEAR, reducing_gap=None)
    return np.asarray(mask, np.float32) / 255.0


def _texture(kind, rng, h, w, short):
    """Float pattern in [0,1]: 1 where the first texture colour goes.

    Periods scale with the image so a texture survives the resize to the
    training scales (at least about 6 px at shorter side 72).
    """
    xx, yy = np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]
    a = rng.uniform(0, math.pi)
    u = xx * math.cos(a) + yy * math.sin(a)
    v = -xx * math.sin(a) + yy * math.cos(a)
    if kind == "stripes":
        period = short * rng.uniform(0.08, 0.12)
        return (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    if kind == "checker":
        period = short * rng.uniform(0.09, 0.14)
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    period = short * rng.uniform(0.09, 0.13)  # dots on a rotated grid
    du, dv = (u % period) - period / 2, (v % period) - period / 2
    return (du * du + dv * dv < (period * rng.uniform(0.25, 0.33)) ** 2).astype(np.float32)


def draw_image(class_id, rng, min_side=80, max_side=160):
    """One RGB uint8 image of class `class_id` (index into CLASS_NAMES)."""
    kind = CLASS_NAMES[class_id % len(CLASS_NAMES)]
    short = int(rng.integers(min_side, max_side + 1))
    long = int(short * math.exp(rng.uniform(0.0, math.log(1.6))))
    h, w = (short, long) if rng.random() < 0.6 else (long, short)
    bg, bg_mean = _background(rng, h, w)
    for _ in range(int(rng.integers(0, 3))):  # thin distractor lines
        line = Image.new("L", (w, h), 0)
        ImageDraw.Draw(line).line([tuple(rng.uniform(0, [w, h])), tuple(rng.uniform(0, [w, h]))],
                                  fill=255, width=int(rng.integers(1, 3)))
        m = np.asarray(line, np.float32)[..., None] / 255.0
        bg = bg * (1 - m) + rng.integers(0, 256, 3).astype(np.float32) * m
    r = short * rng.uniform(0.22, 0.36)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    cy = h / 2 + rng.uniform(-0.12, 0.12) * h
    mask = _draw_mask(kind, rng, h, w, cx, cy, r)[..., None]
    fg = _contrasting_colour(rng, bg_mean)
    if kind in ("stripes", "checker", "dots"):
        second = _contrasting_colour(rng, fg, min_gap=60.0)
        t = _texture(kind, rng, h, w, short)[..., None]
        fill = second + (fg - second) * t
    else:
        fill = fg * (0.85 + 0.3 * rng.random((h, w, 1), dtype=np.float32))
    img = bg * (1 - mask) + fill * mask
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 12))
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------

def _odd_kinds(num_classes, odd_files):
    """{(split, class, number): kind} for the deliberately odd files."""
    if not odd_files:
        return {}
    train = ["cmyk", "cmyk", "gray", "gray", "png", "truncated"]
    val = ["cmyk", "gray", "png"]
    odd = {("train", k % num_classes, k // num_classes): kind for k, kind in enumerate(train)}
    odd.update({("val", (k + 6) % num_classes, k // num_classes + 1): kind for k, kind in enumerate(val)})
    return odd


def encode(arr, kind, quality=90):
    """File bytes for one image: a normal RGB JPEG or one of the odd kinds."""
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if kind == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif kind == "gray":
        img.convert("L").save(buf, "JPEG", quality=quality)
    elif kind == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=quality)
    data = buf.getvalue()
    if kind == "truncated":
        data = data[: len(data) * 6 // 10]
    return data


def _plan(num_classes, train_per_class, val_per_class, seed, layout):
    """[(split, class, number, relpath)] for every image, in a fixed order."""
    jobs = []
    for k in range(num_classes):
        for j in range(train_per_class):
            name = f"{wnid(k)}_{j}.JPEG"
            rel = {"lists": f"2012_train/{wnid(k)}/{name}",
                   "tiny": f"train/{wnid(k)}/images/{name}"}.get(layout, f"train/{wnid(k)}/{name}")
            jobs.append(("train", k, j, rel))
    val = [(k, j) for k in range(num_classes) for j in range(val_per_class)]
    order = np.random.default_rng([seed, 99]).permutation(len(val))  # ImageNet val numbers mix classes
    for number, pos in enumerate(order, start=1):
        k, j = val[pos]
        name = f"val_{number - 1}.JPEG" if layout == "tiny" else f"ILSVRC2012_val_{number:08d}.JPEG"
        rel = {"folders": f"val/{wnid(k)}/{name}", "kaggle": f"val/{name}", "lists": f"2012_val/{name}",
               "tiny": f"val/images/{name}"}[layout]
        jobs.append(("val", k, j, rel))
    return jobs


def _make_one(job):
    root, seed, split, k, j, rel, kind, min_side, max_side, square = job
    rng = np.random.default_rng([seed, SPLIT_ID[split], k, j])
    arr = draw_image(k, rng, min_side, max_side)
    if square:  # the centre square: the shape sits within 12% of the centre
        h, w = arr.shape[:2]
        side = min(h, w)
        arr = arr[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    data = encode(arr, kind)
    path = os.path.join(root, rel)
    with open(path, "wb") as f:  # inside a temp folder that is renamed only when complete
        f.write(data)
    return len(data)


def _write_label_files(root, jobs, num_classes, layout):
    if layout == "kaggle":
        lines = ["ImageId,PredictionString"]
        for split, k, j, rel in jobs:
            if split == "val":
                stem = os.path.splitext(os.path.basename(rel))[0]
                lines.append(f"{stem},{wnid(k)} 1 1 40 40")
        atomic_write_text(os.path.join(root, "LOC_val_solution.csv"), "\n".join(lines) + "\n")
    elif layout == "lists":
        for split in ("train", "val"):
            text = "".join(f"{rel} {k}\n" for s, k, j, rel in jobs if s == split)
            atomic_write_text(os.path.join(root, f"{split}.txt"), text)
        atomic_write_text(os.path.join(root, "synsets.txt"), "".join(wnid(k) + "\n" for k in range(num_classes)))
    elif layout == "tiny":
        atomic_write_text(os.path.join(root, "wnids.txt"), "".join(wnid(k) + "\n" for k in range(num_classes)))
        atomic_write_text(os.path.join(root, "words.txt"),
                                "".join(f"{wnid(k)}\t{CLASS_NAMES[k % len(CLASS_NAMES)]}\n" for k in range(num_classes)))
        lines = "".join(f"{os.path.basename(rel)}\t{wnid(k)}\t0\t0\t63\t63\n" for s, k, j, rel in jobs if s == "val")
        atomic_write_text(os.path.join(root, "val", "val_annotations.txt"), lines)


def _read_marker(root):
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def make_dataset(root, num_classes=10, train_per_class=260, val_per_class=40, seed=0, odd_files=True,
                 layout="folders", min_side=80, max_side=160, num_workers=1, progress=False, derived=()):
    """Create the dataset at `root` (idempotent). Returns the marker dict.

    If `root` already holds a complete set made with the same arguments, nothing
    is done. A set made with other arguments is replaced; a folder this tool did
    not make is refused. `derived`: folders made from this dataset (resize cache,
    validation store, statistics) that are deleted whenever the set is (re)made,
    since the offline scripts rightly refuse outputs of a different dataset.
    """
    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {', '.join(LAYOUTS)}, received '{layout}'.")
    if not 1 <= num_classes <= 9999 or train_per_class < 1 or val_per_class < 1:
        raise UserError(f"need at least 1 class and 1 image per class and split, received {num_classes} classes, "
                              f"{train_per_class} train and {val_per_class} val per class.")
    if not 16 <= min_side <= max_side:
        raise UserError(f"image sides must satisfy 16 <= min_side <= max_side, received {min_side}, {max_side}.")
    args = dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed,
                odd_files=bool(odd_files), layout=layout, min_side=min_side, max_side=max_side)
    marker = {"generator_version": GENERATOR_VERSION, "args": args}
    root = os.path.abspath(root)
    existing = _read_marker(root)
    if existing is not None and existing.get("args") == args and existing.get("generator_version") == GENERATOR_VERSION:
        return existing
    if os.path.exists(root):
        if existing is None and os.listdir(root):
            raise UserError(f"{root} exists and was not made by make_demo_dataset.py; "
                                  f"choose another --out or delete that folder.")
        shutil.rmtree(root)  # our own set made with other arguments, or an empty folder
    for folder in derived:
        shutil.rmtree(folder, ignore_errors=True)
    jobs = _plan(num_classes, train_per_class, val_per_class, seed, layout)
    odd = _odd_kinds(num_classes, odd_files)
    with atomic_dir(root) as tmp:
        for rel in sorted({os.path.dirname(rel) for *_, rel in jobs}):
            os.makedirs(os.path.join(tmp, rel), exist_ok=True)
        work = [(tmp, seed, s, k, j, rel, odd.get((s, k, j), "rgb"), min_side, max_side, layout == "tiny")
                for s, k, j, rel in jobs]
        total = sum(_map(_make_one, work, num_workers, progress))
        _write_label_files(tmp, jobs, num_classes, layout)
        marker["counts"] = {s: sum(1 for job in jobs if job[0] == s) for s in ("train", "val")}
        marker["odd_files"] = {f"{s}:{wnid(k)}:{j}": kind for (s, k, j), kind in sorted(odd.items())}
        marker["bytes"] = total
        atomic_write_text(os.path.join(tmp, MARKER), json.dumps(marker, indent=1) + "\n")
    return marker


def _map(func, items, num_workers, progress):
    return imap_progress(func, items, num_workers=num_workers, desc="drawing", unit="img", disable=not progress)


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Defaults are written into each help text (ArgumentDefaultsHelpFormatter printed --min_side's twice).
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(repo, "demo_data", "imagenet"),
                   help="dataset root to create (default demo_data/imagenet)")
    p.add_argument("--classes", type=int, default=10,
                   help=f"number of classes (default 10; cycles through {len(CLASS_NAMES)} kinds)")
    p.add_argument("--train_per_class", type=int, default=260, help="training images per class (default 260)")
    p.add_argument("--val_per_class", type=int, default=40, help="validation images per class (default 40)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the drawings; the same seed makes the same files (default 0)")
    p.add_argument("--no_odd_files", action="store_true", help="leave out the CMYK/gray/PNG/truncated files")
    p.add_argument("--layout", choices=LAYOUTS, default="folders",
                   help="folders: train/<wnid>/, val/<wnid>/; kaggle: flat val/ + LOC_val_solution.csv; "
                        "lists: train.txt/val.txt + synsets.txt; tiny: Tiny ImageNet's, square images "
                        "(default folders)")
    p.add_argument("--min_side", type=int, default=None, help="smallest shorter side of a generated image "
                                                                "(default 80; 64 for --layout tiny)")
    p.add_argument("--max_side", type=int, default=None, help="largest shorter side of a generated image "
                                                                "(default 160; 64 for --layout tiny)")
    p.add_argument("--num_workers", type=int, default=0, help="worker processes; 0 = one per CPU core (default 0)")
    p.add_argument("--derived", action="append", default=[], metavar="FOLDER",
                   help="a folder made from this dataset (cache, store) to delete when the set is (re)made; repeatable")
    a = p.parse_args()
    sides = DEFAULT_SIDES.get(a.layout, (80, 160))
    a.min_side = sides[0] if a.min_side is None else a.min_side
    a.max_side = max(sides[1], a.min_side) if a.max_side is None else a.max_side
    t0 = time.time()
    marker = make_dataset(a.out, a.classes, a.train_per_class, a.val_per_class, a.seed, not a.no_odd_files,
                          a.layout, a.min_side, a.max_side, num_workers=a.num_workers, progress=True,
                          derived=a.derived)
    c = marker["counts"]
    print(f"{a.out}: {c['train']} train + {c['val']} val images, {a.classes} classes "
          f"(ready in {time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
