"""The dataset index: every accepted layout, and a clear error for each rejected one."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from data.sources.index import load_index
from tools.make_demo_dataset import make_dataset
from utils.errors import UserError

TINY = dict(num_classes=3, train_per_class=3, val_per_class=2, odd_files=False, min_side=20, max_side=24)


def tiny_jpeg(path, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (value, value, value)).save(buf, "JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def folders(root, train, val):
    """train/val: {wnid: [file names]}; returns root."""
    for split, spec in (("train", train), ("val", val)):
        for wnid, names in spec.items():
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            for name in names:
                tiny_jpeg(os.path.join(root, split, wnid, name))
    return str(root)


@pytest.mark.parametrize("layout", ["folders", "kaggle", "lists"])
def test_accepted_layouts_agree(tmp_path, layout):
    root = tmp_path / layout
    make_dataset(root, layout=layout, **TINY)
    train, val = load_index(root, "train"), load_index(root, "val")
    assert train.classes == val.classes == ["n00000001", "n00000002", "n00000003"]
    assert len(train) == 9 and len(val) == 6
    assert train.labels.dtype == np.int64
    assert val.layout == layout
    for index in (train, val):
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in index.paths)
    # each training file sits in (or is named after) its class
    for path, label in zip(train.paths, train.labels):
        assert train.classes[label] in path
    assert sorted(np.bincount(val.labels).tolist()) == [2, 2, 2]


def test_val_labels_match_across_layouts(tmp_path):
    by_name = {}
    for layout in ("folders", "kaggle", "lists"):
        make_dataset(tmp_path / layout, layout=layout, **TINY)
        val = load_index(tmp_path / layout, "val")
        by_name[layout] = dict(zip((os.path.basename(p) for p in val.paths), val.labels.tolist()))
    assert by_name["folders"] == by_name["kaggle"] == by_name["lists"]


def test_index_order_is_deterministic_and_sorted(tmp_path):
    root = folders(tmp_path, {"n2": ["b.JPEG", "a.JPEG"], "n1": ["z.jpeg"]}, {"n1": ["v.JPEG"], "n2": ["w.JPEG"]})
    index = load_index(root, "train")
    assert [os.path.basename(p) for p in index.paths] == ["z.jpeg", "a.JPEG", "b.JPEG"]
    assert index.labels.tolist() == [0, 1, 1]
    assert index.fingerprint() == load_index(root, "train").fingerprint()


def test_extensions_case_insensitive_and_other_files_ignored(tmp_path):
    root = folders(tmp_path, {"n1": ["a.JPEG", "b.jpg", "c.PNG", "d.JpEg"]}, {"n1": ["v.JPEG"]})
    (tmp_path / "train" / "n1" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "n1" / ".DS_Store").write_text("")
    (tmp_path / "train" / "n1.tar").write_text("")
    assert len(load_index(root, "train")) == 4


def test_kaggle_download_root(tmp_path):
    make_dataset(tmp_path / "k", layout="kaggle", **TINY)
    nested = tmp_path / "download" / "ILSVRC" / "Data"
    nested.mkdir(parents=True)
    os.rename(tmp_path / "k", nested / "CLS-LOC")
    os.rename(nested / "CLS-LOC" / "LOC_val_solution.csv", tmp_path / "download" / "LOC_val_solution.csv")
    val = load_index(tmp_path / "download", "val")
    assert len(val) == 6 and val.layout == "kaggle"


def test_expected_count(tmp_path):
    root = folders(tmp_path, {"n1": ["a.JPEG", "b.JPEG"]}, {"n1": ["v.JPEG"]})
    assert len(load_index(root, "train", expected_count=2)) == 2
    with pytest.raises(UserError) as e:
        load_index(root, "train", expected_count=1281167)
    assert "Found 2 train images" in str(e.value) and "1281167" in str(e.value) and "[train] N" in str(e.value)
    with pytest.raises(UserError, match=r"\[preprocess_val\] N"):
        load_index(root, "val", expected_count=50000)


# ---------------------------------------------------------------- rejected layouts

def rejected(root, split, *fragments):
    with pytest.raises(UserError) as e:
        load_index(root, split)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_flat_val_without_labels(tmp_path):
    root = folders(tmp_path, {"n1": ["a.JPEG"]}, {})
    tiny_jpeg(str(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG"))
    rejected(root, "val", "flat folder", "without labels", "expected one of")
    assert len(load_index(root, "train")) == 1  # the train split alone is fine


def test_empty_class_folder(tmp_path):
    root = folders(tmp_path, {"n1": ["a.JPEG"], "n2": []}, {"n1": ["v.JPEG"]})
    rejected(root, "train", "n2", "holds no images")


def test_val_class_not_in_train(tmp_path):
    root = folders(tmp_path, {"n1": ["a.JPEG"]}, {"n1": ["v.JPEG"], "n9": ["w.JPEG"]})
    rejected(root, "val", "n9", "train/ does not have")


def test_no_images_at_all(tmp_path):
    rejected(str(tmp_path), "train", "no train/ folder", "expected one of")
    os.makedirs(tmp_path / "train")
    rejected(str(tmp_path), "train", "no class folders")
    rejected(str(tmp_path / "missing"), "train", "does not exist")


def test_flat_train_folder(tmp_path):
    tiny_jpeg(str(tmp_path / "train" / "a.JPEG"))
    rejected(str(tmp_path), "train", "one folder per class")


def test_val_mixing_folders_and_loose_images(tmp_path):
    root = folders(tmp_path, {"n1": ["a.JPEG"]}, {"n1": ["v.JPEG"]})
    tiny_jpeg(str(tmp_path / "val" / "loose.JPEG"))
    rejected(root, "val", "mixes class folders and loose images")


def test_kaggle_csv_problems(tmp_path):
    root = folders(tmp_path, {"n1": ["a.JPEG"]}, {})
    tiny_jpeg(str(tmp_path / "val" / "img1.JPEG"))
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text("ImageId,PredictionString\nimg2,n1 1 1 2 2\n")
    rejected(root, "val", "img1.JPEG", "has no row")
    csv_path.write_text("ImageId,PredictionString\nimg1,n7 1 1 2 2\n")
    rejected(root, "val", "class n7")
    csv_path.write_text("ImageId,PredictionString\nimg1,n1 1 1 2 2\nimg2,n1 1 1 2 2\n")
    rejected(root, "val", "missing from")
    csv_path.write_text("id,label\nimg1,n1\n")
    rejected(root, "val", "header")


def test_list_paths_may_not_leave_the_root(tmp_path):
    root = tmp_path / "data"
    tiny_jpeg(str(root / "imgs" / "a.JPEG"))
    tiny_jpeg(str(tmp_path / "outside.JPEG"))
    (root / "train.txt").write_text("imgs/a.JPEG 0\n../outside.JPEG 0\n")
    rejected(str(root), "train", "../outside.JPEG", "leaves the dataset folder")
    (root / "train.txt").write_text(f"imgs/a.JPEG 0\n{tmp_path / 'outside.JPEG'} 0\n")
    rejected(str(root), "train", "must be relative")


def test_list_file_problems(tmp_path):
    tiny_jpeg(str(tmp_path / "imgs" / "a.JPEG"))
    (tmp_path / "synsets.txt").write_text("n1\nn2\n")
    (tmp_path / "train.txt").write_text("imgs/a.JPEG 2\n")
    rejected(str(tmp_path), "train", "label 2", "outside 0..1")
    (tmp_path / "train.txt").write_text("imgs/a.JPEG one\n")
    rejected(str(tmp_path), "train", "line 1", "'relpath label'")
    (tmp_path / "train.txt").write_text("imgs/missing.JPEG 0\n")
    rejected(str(tmp_path), "train", "do not exist", "missing.JPEG")
    (tmp_path / "train.txt").write_text("imgs/a.JPEG 1\n")
    index = load_index(str(tmp_path), "train")
    assert index.classes == ["n1", "n2"] and index.labels.tolist() == [1]
    rejected(str(tmp_path), "val", "has train.txt but no val.txt")


def test_list_paths_with_spaces(tmp_path):
    tiny_jpeg(str(tmp_path / "my imgs" / "a b.JPEG"))
    (tmp_path / "train.txt").write_text("my imgs/a b.JPEG 0\n")
    index = load_index(str(tmp_path), "train")
    assert index.paths == [str(tmp_path / "my imgs" / "a b.JPEG")] and index.classes == ["class_0000"]


def test_fingerprint_survives_a_move_but_not_a_regeneration(tmp_path):
    make_dataset(tmp_path / "a", **TINY)
    before = load_index(tmp_path / "a", "train").fingerprint()
    os.rename(tmp_path / "a", tmp_path / "b")
    assert load_index(tmp_path / "b", "train").fingerprint() == before
    make_dataset(tmp_path / "b", **dict(TINY, seed=5))  # same file names, other pixels
    assert load_index(tmp_path / "b", "train").fingerprint() != before
