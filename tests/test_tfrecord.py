"""TFRecord shards: build from an image folder, read back without TensorFlow, label offsets, resume."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from settings import load_settings
from utils.errors import UserError
from data.transforms import images
from data.sources import index as dataset_index, shards as shard_folder, tfrecord
from data.sources.index import load_index
from tools import build_tfrecords
from tools.make_demo_dataset import make_dataset, wnid

CLASSES = 4


def build(source, out, label_offset, train_shards=3, val_shards=2, box_file=None, quality=100):
    args = build_tfrecords.parse_args(["--out", str(out), "--source", str(source), "--label_offset",
                                       str(label_offset), "--train_shards", str(train_shards), "--validation_shards",
                                       str(val_shards), "--num_workers", "1", "--no_progress",
                                       "--jpeg_quality", str(quality)]
                                      + (["--bounding_box_file", str(box_file)] if box_file else []))
    demo = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.txt")
    cfg = load_settings(demo, stats=False, decoder=False, devices=False)  # as tools/build_tfrecords.py loads it
    return build_tfrecords.build(args, cfg)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # CMYK, grayscale, PNG-named-JPEG and a truncated file, as ImageNet has.
    root = tmp_path_factory.mktemp("src") / "imagenet"
    make_dataset(str(root), num_classes=CLASSES, train_per_class=6, val_per_class=3, min_side=24, max_side=48)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{wnid(k)} shape {k}, test class\n" for k in range(CLASSES)))
    return root


@pytest.fixture(scope="module")
def box_file(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("boxes") / "boxes.csv"
    path.write_text("n00000002_3.JPEG,0.1,0.2,0.6,0.9\nn00000002_3.JPEG,0.0,0.0,1.0,0.5\n"
                    "n00000004_0.JPEG,0.25,0.25,0.75,0.75\n")
    return path


@pytest.fixture(scope="module")
def shards(source, box_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "tf"
    build(source, out, label_offset=1, box_file=box_file)
    return out


def test_crc32c_known_value_and_framing_readable():
    assert tfrecord.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tfrecord.masked_crc32c(b"") == 0xA282EAD8


def test_shard_names_follow_build_imagenet_data(shards):
    names = sorted(n for n in os.listdir(shards) if tfrecord.SHARD_NAME.match(n))
    assert names == ["train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003",
                     "validation-00000-of-00002", "validation-00001-of-00002"]
    assert tfrecord.shard_name("train", 7, 1024) == "train-00007-of-01024"
    assert tfrecord.shard_name("val", 127, 128) == "validation-00127-of-00128"


def test_round_trip_labels_and_pixels_match_the_source(source, shards):
    info = shard_folder.read_info(shards)
    assert info["label_offset"] == 1 and info["num_outputs"] == CLASSES + 1
    assert info["texts"] == [f"shape {k}, test class" for k in range(CLASSES)]
    for split in ("train", "val"):
        folder = load_index(str(source), split)
        index = dataset_index.load_tfrecord_index(str(shards), split)
        assert index.classes == ["background"] + folder.classes  # 1001-style numbering: K + 1 outputs
        by_name = {os.path.basename(p): (p, int(label)) for p, label in zip(folder.paths, folder.labels)}
        seen = []
        for ref, label in zip(index.paths, index.labels):
            record = ref.read_record()
            path, folder_label = by_name[record.filename]
            seen.append(record.filename)
            assert label == record.label == folder_label + 1
            assert record.synset == folder.classes[folder_label]
            assert record.text == f"shape {folder_label}, test class"
            decoded = Image.open(__import__("io").BytesIO(record.encoded))
            assert decoded.format == "JPEG" and decoded.mode == "RGB"  # CMYK, gray and PNG re-encoded
            got = np.asarray(decoded, np.int16)
            want = np.asarray(images.decode_rgb(path), np.int16)
            assert got.shape == want.shape == (record.height, record.width, 3)
            with open(path, "rb") as f:
                if f.read() == record.encoded:
                    assert np.array_equal(got, want)  # RGB JPEGs are stored byte for byte
                else:
                    assert np.abs(got - want).mean() < 1.0  # re-encoded at quality 100, 4:4:4
        # Same order as the folder index (class, then file name), minus the unreadable file.
        skipped = info["splits"][split]["skipped"]
        expected = [os.path.basename(p) for p in folder.paths if os.path.relpath(p, source) not in skipped]
        assert seen == expected
    assert info["splits"]["train"]["skipped"] == ["train/n00000002/n00000002_1.JPEG"]  # the truncated file


def test_tensorflow_reads_the_shards_with_the_official_feature_spec(shards):
    import tensorflow as tf
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([1], tf.int64, default_value=-1),
            "image/class/text": tf.io.FixedLenFeature([], tf.string, default_value=""),
            **{f"image/object/bbox/{k}": tf.io.VarLenFeature(tf.float32) for k in ("xmin", "ymin", "xmax", "ymax")}}
    files = sorted(str(p) for p in shards.glob("train-*"))
    count, labels, boxes = 0, set(), 0
    for raw in tf.data.TFRecordDataset(files):  # checks every CRC
        parsed = tf.io.parse_single_example(raw, spec)
        labels.add(int(parsed["image/class/label"][0]))
        boxes += int(tf.size(parsed["image/object/bbox/xmin"].values))
        assert tf.io.decode_jpeg(parsed["image/encoded"]).shape[-1] == 3
        count += 1
    assert count == len(dataset_index.load_tfrecord_index(str(shards), "train"))
    assert labels == set(range(1, CLASSES + 1)) and boxes == 3


def test_bounding_boxes_round_trip_as_ymin_xmin_ymax_xmax(shards):
    index = dataset_index.load_tfrecord_index(str(shards), "train")
    records = {r.filename: r for r in (ref.read_record() for ref in index.paths)}
    assert np.allclose(records["n00000002_3.JPEG"].boxes, [[0.2, 0.1, 0.9, 0.6], [0.0, 0.0, 0.5, 1.0]])
    assert np.allclose(records["n00000004_0.JPEG"].boxes, [[0.25, 0.25, 0.75, 0.75]])
    assert records["n00000001_2.JPEG"].boxes.shape == (0, 4)


def test_label_offset_zero_keeps_folder_labels_and_a_rerun_resumes_per_shard(source, tmp_path):
    out = tmp_path / "tf0"
    build(source, out, label_offset=0, train_shards=2, val_shards=1)
    index = dataset_index.load_tfrecord_index(str(out), "train")
    folder = load_index(str(source), "train")
    assert index.classes == folder.classes
    label_of = {os.path.basename(p): int(k) for p, k in zip(folder.paths, folder.labels)}
    assert all(label_of[ref.read_record().filename] == label for ref, label in zip(index.paths, index.labels))
    victim = out / "train-00001-of-00002"
    before = victim.read_bytes()
    other = (out / "train-00000-of-00002").stat().st_mtime_ns
    victim.unlink()
    build(source, out, label_offset=0, train_shards=2, val_shards=1)
    assert victim.read_bytes() == before  # rebuilt identically
    assert (out / "train-00000-of-00002").stat().st_mtime_ns == other  # complete shards are kept
    with pytest.raises(UserError, match="other settings"):
        build(source, out, label_offset=1, train_shards=2, val_shards=1)


def test_missing_info_or_shard_is_a_clear_error_and_describe_records_the_offset(shards, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns(shard_folder.INFO_FILE, shard_folder.INDEX_DIR))
    with pytest.raises(UserError, match="--describe"):
        dataset_index.load_tfrecord_index(str(copy), "train")
    with pytest.raises(UserError, match="start at 1, not at --label_offset 0"):
        shard_folder.describe(str(copy), 0, progress=False)
    shard_folder.describe(str(copy), 1, progress=False)
    index = dataset_index.load_tfrecord_index(str(copy), "train")
    assert index.classes[0] == "background" and len(index.classes) == CLASSES + 1
    assert index.fingerprint() == dataset_index.load_tfrecord_index(str(shards), "train").fingerprint()
    (copy / "train-00001-of-00003").unlink()
    with pytest.raises(UserError, match="train-00001-of-00003 is missing"):
        dataset_index.load_tfrecord_index(str(copy), "train")


def test_index_cache_is_rebuilt_when_a_shard_changes(shards, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns(shard_folder.INDEX_DIR))
    shard = str(copy / "validation-00000-of-00002")
    first = shard_folder.shard_index(shard)
    assert os.path.isfile(os.path.join(copy, shard_folder.INDEX_DIR, "validation-00000-of-00002.npz"))
    payloads = [p for _, p in tfrecord.iter_records(shard)]
    with open(shard, "wb") as f:  # the same records minus the first, framed by the pure-Python writer
        f.write(b"".join(tfrecord.frame(p) for p in payloads[1:]))
    second = shard_folder.shard_index(shard)
    assert len(second["offsets"]) == len(first["offsets"]) - 1
    ref = tfrecord.RecordRef(shard, int(second["offsets"][0]), int(second["lengths"][0]))
    assert ref.read_payload(verify=True) == payloads[1]


def test_truncated_shard_is_reported(shards, tmp_path):
    shard = tmp_path / "validation-00000-of-00001"
    data = (shards / "validation-00000-of-00002").read_bytes()
    shard.write_bytes(data[:len(data) - 10])
    with pytest.raises(UserError, match="truncated"):
        shard_folder.scan_shard(str(shard))


def test_info_without_label_offset_is_refused(shards, tmp_path):
    copy = tmp_path / "noinfo"
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns(shard_folder.INDEX_DIR))
    info = json.loads((copy / shard_folder.INFO_FILE).read_text())
    del info["label_offset"]
    (copy / shard_folder.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(UserError, match="label_offset"):
        dataset_index.load_tfrecord_index(str(copy), "val")


# ----------------------------------------------------------------------------
# Shards as the data source of the producer and of preprocess_val.py
# ----------------------------------------------------------------------------

TRUNCATED = os.path.join("train", "n00000002", "n00000002_1.JPEG")  # skipped by the builder


@pytest.fixture(scope="module")
def twin(source, tmp_path_factory):
    """(image folder, its shards with label offset 1): the same images, in the same index order."""
    root = tmp_path_factory.mktemp("twin")
    folder = root / "imagenet"
    shutil.copytree(source, folder)
    (folder / TRUNCATED).unlink()
    build(folder, root / "tf", label_offset=1, train_shards=3, val_shards=2)
    return folder, root / "tf"


def twin_configs(tmp_path, twin, decoder="auto", **images):
    from tests.helpers import SOLID_CONFIG, write_solid_config
    configs = {}
    for name, root, source in (("folder", twin[0], "folder"), ("tfrecord", twin[1], "tfrecord")):
        os.makedirs(tmp_path / name)
        path = write_solid_config(str(tmp_path / name), preprocess={"ImageNet_folder": str(root)},
                            preprocess_val={"ImageNet_folder": str(root)}, images=images,
                            runtime_preprocessing={**SOLID_CONFIG["runtime_preprocessing"], "decoder": decoder})
        with open(path, "a") as f:
            f.write(f"\n[data]\nsource = {source}\n")
        configs[name] = load_settings(path)
    return configs


def plain_rgb_jpeg(path):
    with Image.open(path) as img:
        return img.format == "JPEG" and img.mode == "RGB"


@pytest.mark.parametrize("augmentation,decoder", [("scale", "auto"), ("scale", "pil"), ("inception", "pil")])
def test_producer_batches_from_shards_equal_those_from_the_folder(tmp_path, twin, augmentation, decoder):
    from data.buffer.builder import BatchBuilder, Recipe
    configs = twin_configs(tmp_path, twin, decoder, augmentation=augmentation)
    builders, indexes = {}, {}
    for name, cfg in configs.items():
        indexes[name] = dataset_index.load_source_index(cfg.data.source, cfg.preprocess.ImageNet_folder, "train", progress=False)
        builders[name] = BatchBuilder(indexes[name].paths, indexes[name].labels, Recipe.from_settings(cfg, 4))
    assert indexes["tfrecord"].classes == ["background"] + indexes["folder"].classes
    assert builders["tfrecord"].recipe.augmentation == augmentation
    plain, odd = 0, 0
    for epoch in (0, 1):
        perm = builders["folder"].permutation(epoch)
        for batch in range(builders["folder"].num_batches()):
            ours, labels, lighting = builders["tfrecord"].build(epoch, batch)
            want, want_labels, want_lighting = builders["folder"].build(epoch, batch)
            assert ours.shape == want.shape and np.array_equal(labels, want_labels + 1)
            for slot in range(len(labels)):
                path = indexes["folder"].paths[perm[batch * 4 + slot]]
                if plain_rgb_jpeg(path):  # stored byte for byte: the very same crop
                    assert np.array_equal(ours[slot], want[slot]) and np.allclose(lighting[slot], want_lighting[slot])
                    plain += 1
                else:  # re-encoded CMYK/gray/PNG: same window, pixels within JPEG error
                    # (with decoder auto a CMYK original goes through PIL and its RGB re-encode through
                    # libjpeg-turbo, whose few-level differences on such tiny images are not the shards' doing)
                    if decoder == "pil":
                        assert np.abs(ours[slot].astype(int) - want[slot]).mean() < 3
                    odd += 1
    assert plain and odd


def test_runtime_preprocessing_and_preprocess_val_read_shards(tmp_path, twin):
    import subprocess
    import sys
    from data.sources import val_store
    from data.buffer.protocol import load_manifest
    configs = twin_configs(tmp_path, twin, augmentation="inception")
    cfg = configs["tfrecord"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "runtime_preprocessing.py"), "--config", cfg.path,
                          "--batch_size", "4", "--epoch_start", "0", "--epoch_end", "1", "--once", "--no_progress"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    manifest = load_manifest(cfg.train.buffer_folder)
    assert manifest["num_classes"] == CLASSES + 1 and manifest["augmentation"] == "inception"
    labels = np.load(os.path.join(cfg.train.buffer_folder, "Y_0_0.npy"), allow_pickle=False)
    assert labels.min() >= 1 and labels.max() <= CLASSES
    stores = {}
    for name, c in configs.items():
        index = dataset_index.load_source_index(c.data.source, c.preprocess_val.ImageNet_folder, "val", progress=False)
        val_store.build_store(c.preprocess_val.path_to_save, index, 16, 18, num_workers=1, progress=False,
                              say=lambda *a: None)
        stores[name] = val_store.ValStore(c.preprocess_val.path_to_save)
    ours, want = stores["tfrecord"], stores["folder"]
    assert ours.classes == ["background"] + want.classes and np.array_equal(ours.labels, want.labels + 1)
    for j in range(len(want)):
        assert np.abs(ours.views(j, 10).astype(int) - want.views(j, 10)).mean() < 3
