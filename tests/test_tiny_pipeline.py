"""Seed 002's path end to end: Tiny ImageNet layout, progressive crop sizes, the preset, a short run."""
import os

import numpy as np
import pytest
from PIL import Image

from data.index import load_index
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "configs", "seed002_tiny_imagenet.txt")


# ----------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------

def write_jpeg(path, value, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, "JPEG")


def make_tiny_layout(root, wnids=("n03", "n01", "n02"), per_class=2, val=(("val_1.JPEG", "n02"),
                                                                          ("val_0.JPEG", "n03"),
                                                                          ("val_2.JPEG", "n01"))):
    with open(os.path.join(_mkdir(root), "wnids.txt"), "w") as f:
        f.write("".join(w + "\n" for w in wnids))
    with open(os.path.join(root, "words.txt"), "w") as f:
        f.write("".join(f"{w}\tthing {w}\n" for w in wnids))
    for w in wnids:
        for i in range(per_class):
            write_jpeg(os.path.join(root, "train", w, "images", f"{w}_{i}.JPEG"), 10 * i)
        with open(os.path.join(root, "train", w, f"{w}_boxes.txt"), "w") as f:
            f.write("".join(f"{w}_{i}.JPEG\t0\t0\t7\t7\n" for i in range(per_class)))
    lines = []
    for name, w in val:
        write_jpeg(os.path.join(root, "val", "images", name), 100)
        lines.append(f"{name}\t{w}\t0\t1\t62\t63\n")
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        f.write("".join(lines))
    return root


def _mkdir(path):
    os.makedirs(path, exist_ok=True)
    return path


def test_tiny_layout_train_and_val_annotations(tmp_path):
    root = make_tiny_layout(str(tmp_path / "tiny"))
    train = load_index(root, "train")
    assert train.layout == "tiny" and train.classes == ["n01", "n02", "n03"]
    assert [os.path.relpath(p, root) for p in train.paths][:3] == [
        "train/n01/images/n01_0.JPEG", "train/n01/images/n01_1.JPEG", "train/n02/images/n02_0.JPEG"]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    val = load_index(root, "val", expected_count=3)
    assert val.classes == train.classes
    assert [os.path.basename(p) for p in val.paths] == ["val_0.JPEG", "val_1.JPEG", "val_2.JPEG"]
    assert val.labels.tolist() == [2, 1, 0]  # n03, n02, n01 from the annotation file


@pytest.mark.parametrize("damage, message", [
    (lambda r: open(os.path.join(r, "val", "val_annotations.txt"), "a").write("val_9.JPEG\tn07\t0\t0\t1\t1\n"),
     "names class n07"),
    (lambda r: write_jpeg(os.path.join(r, "val", "images", "val_5.JPEG"), 3), "have no line in"),
    (lambda r: os.remove(os.path.join(r, "val", "images", "val_1.JPEG")), "are missing from"),
    (lambda r: open(os.path.join(r, "val", "val_annotations.txt"), "a").write("val_0.JPEG\n"),
     "must be 'file<TAB>wnid"),
    (lambda r: os.remove(os.path.join(r, "val", "val_annotations.txt")) or open(
        os.path.join(r, "wnids.txt"), "a").write(""), "val_annotations.txt does not exist"),
])
def test_tiny_val_errors_say_what_was_expected(tmp_path, damage, message):
    root = make_tiny_layout(str(tmp_path / "tiny"))
    damage(root)
    with pytest.raises(UserError, match=message):
        load_index(root, "val")


def test_tiny_train_errors(tmp_path):
    root = make_tiny_layout(str(tmp_path / "tiny"))
    with open(os.path.join(root, "wnids.txt"), "a") as f:
        f.write("n09\n")
    with pytest.raises(UserError, match="lists 4 classes but train/ has 3"):
        load_index(root, "train")
    root = make_tiny_layout(str(tmp_path / "tiny2"))
    os.makedirs(os.path.join(root, "train", "n04"))
    os.rename(os.path.join(root, "wnids.txt"), os.path.join(root, "wnids.old"))
    with pytest.raises(UserError, match="has no images/ folder; expected the Tiny ImageNet layout"):
        load_index(root, "train")
