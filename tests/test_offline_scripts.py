"""preprocess.py, get_mu_sigma.py, preprocess_val.py and make_demo_dataset.py on a tiny generated dataset."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from settings import MU_SIGMA_FILE
from settings import load_settings
from utils.errors import UserError
from utils.files import is_temp_name
from data.transforms import images
from data.sources import scale_cache
from data.sources import stats
from data.sources import val_store
from data.sources.index import load_index
from data.pool import single_writer
from tests.helpers import write_config_file
from tools.make_demo_dataset import MARKER, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("preprocess.py", "get_mu_sigma.py", "preprocess_val.py", os.path.join("tools", "make_demo_dataset.py"))


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=120, cwd="/")


def write_config(folder, dataset, **overrides):
    """configs/demo.txt with this test's folders; overrides: {'section.key': value}."""
    values = {"preprocess.ImageNet_folder": dataset, "preprocess.path_to_save": "scales", "preprocess.num_workers": 1,
              "preprocess_val.ImageNet_folder": dataset, "preprocess_val.path_to_save": "val",
              "get_mu_sigma.path_to_save": "stats", **overrides}
    sections = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return write_config_file(folder, os.path.join(ROOT, "configs", "demo.txt"), sections)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 classes x 6 train (one CMYK, gray, PNG-named-JPEG, truncated among them) and 3 val per class."""
    root = tmp_path_factory.mktemp("data") / "imagenet"
    make_dataset(root, num_classes=3, train_per_class=6, val_per_class=3, min_side=40, max_side=56, seed=3)
    return str(root)


@pytest.fixture
def config(tmp_path, dataset):
    return write_config(str(tmp_path), dataset)


def mad(a, b):
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


# ---------------------------------------------------------------- every script

@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    result = run(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS[:3])
def test_bad_config_is_one_line_error(tmp_path, dataset, script):
    path = write_config(str(tmp_path), dataset, **{"train.sgd_momentum": "fast"})
    result = run(script, "--config", path, "--shorter_side", "40") if script == "preprocess.py" else \
        run(script, "--config", path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "[train] sgd_momentum" in lines[0]


def test_bad_dataset_is_one_line_error(tmp_path):
    path = write_config(str(tmp_path), str(tmp_path / "missing"))
    result = run("get_mu_sigma.py", "--config", path)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: Dataset folder")
    assert not os.path.exists(tmp_path / "stats" / MU_SIGMA_FILE)


# ---------------------------------------------------------------- preprocess.py

def test_preprocess_on_shards_says_the_cache_is_for_image_folders(tmp_path):
    path = write_config(str(tmp_path), str(tmp_path / "shards"), **{"data.source": "tfrecord"})
    result = run("preprocess.py", "--config", path, "--shorter_side", "40")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "built from image folders only" in lines[0]


def test_preprocess_aligned_across_scales(config, dataset):
    result = run("preprocess.py", "--config", config, "--shorter_side", "40,48", "--num_workers", "2", "--any_side")
    assert result.returncode == 0, result.stderr
    assert "skipping unreadable image" in result.stderr and "truncated" in result.stderr
    cfg = load_settings(config, stats=False)  # no mu_sigma.json yet: the cache does not need it
    index = load_index(dataset, "train")
    root = cfg.preprocess.path_to_save
    assert scale_cache.cache_is_valid_for(root, index) and scale_cache.complete_scales(root, index) == [40, 48]
    bad = scale_cache.unreadable_indices(root, 40)
    assert list(bad.values()) == [bad[next(iter(bad))]] and "truncated" in next(iter(bad.values()))
    assert np.array_equal(np.load(os.path.join(root, "labels.npy")), index.labels)
    thumb = lambda img: np.asarray(img.convert("RGB").resize((24, 24), Image.BILINEAR))  # noqa: E731
    sources = {i: images.decode_rgb(p) for i, p in enumerate(index.paths) if i not in bad}
    source_thumbs = {i: thumb(img) for i, img in sources.items()}
    for i in range(len(index)):
        if i in bad:
            assert not os.path.exists(scale_cache.cached_image_path(root, 40, i))
            continue
        for side in (40, 48):
            cached = Image.open(scale_cache.cached_image_path(root, side, i))
            direct = images.resize_shorter(sources[i], side)
            assert cached.size == direct.size and min(cached.size) == side
            assert mad(cached.convert("RGB"), direct) < 6  # JPEG q95 of a noisy image
            # image i at every scale is source image i, not any other
            distances = {j: mad(thumb(cached), t) for j, t in source_thumbs.items()}
            assert min(distances, key=distances.get) == i


def test_preprocess_resumes_identically(tmp_path, dataset):
    index = load_index(dataset, "train")
    root = str(tmp_path / "scales")
    scale_cache.build_scale(root, index, 44, num_workers=1, progress=False)
    folder = os.path.join(root, "44")
    before = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    for i in (0, 5, 11):
        os.remove(scale_cache.cached_image_path(root, 44, i))
    with open(os.path.join(folder, ".tmp-img_3.jpg-123-abcdef"), "wb") as f:  # a killed writer's leftover
        f.write(b"half")
    result = scale_cache.build_scale(root, index, 44, num_workers=1, progress=False)
    assert result["written"] == 3 and result["existing"] == len(index) - 4 and result["unreadable"] == 1
    after = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    assert after == before
    assert not any(is_temp_name(n) for n in os.listdir(folder) + os.listdir(root))


def test_one_writer_per_scale_folder(tmp_path, dataset):
    index = load_index(dataset, "train")
    root = str(tmp_path / "scales")
    os.makedirs(os.path.join(root, "40"))
    stale = os.path.join(root, "40", ".tmp-img_0.jpg-1-abcdef")
    open(stale, "wb").close()
    with single_writer(os.path.join(root, "40"), "test"):  # as if another preprocess.py were running
        with pytest.raises(UserError, match="Another process is already writing"):
            scale_cache.build_scale(root, index, 40, num_workers=1, progress=False)
    assert os.path.exists(stale)  # the other writer's temp file was left alone


def test_preprocess_refuses_another_datasets_cache(tmp_path, dataset):
    other = tmp_path / "other"
    make_dataset(other, num_classes=2, train_per_class=2, val_per_class=1, odd_files=False, min_side=20, max_side=24)
    root = str(tmp_path / "scales")
    scale_cache.prepare(root, load_index(str(other), "train"))
    index = load_index(dataset, "train")
    assert not scale_cache.cache_is_valid_for(root, index) and scale_cache.complete_scales(root, index) == []
    with pytest.raises(UserError, match="different dataset"):
        scale_cache.build_scale(root, index, 40, num_workers=1, progress=False)


# ---------------------------------------------------------------- get_mu_sigma.py

def test_mu_sigma_matches_numpy(config, dataset):
    result = run("get_mu_sigma.py", "--config", config)
    assert result.returncode == 0, result.stderr
    cfg = load_settings(config)
    with open(os.path.join(cfg.get_mu_sigma.path_to_save, MU_SIGMA_FILE)) as f:
        written = json.load(f)
    pixels = []
    for path in load_index(dataset, "train").paths:
        try:
            pixels.append(np.asarray(images.decode_rgb(path), np.float64).reshape(-1, 3) / 255.0)
        except images.BadImageError:
            pass
    pixels = np.concatenate(pixels)
    assert written["images"] == 17 and written["unreadable"] == 1 and written["pixels"] == len(pixels)
    np.testing.assert_allclose(written["mu"], pixels.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(written["sigma"], pixels.std(axis=0), atol=1e-6)
    mu, sigma = cfg.mu, cfg.sigma  # the demo config says 'auto'
    np.testing.assert_allclose(mu, written["mu"])
    np.testing.assert_allclose(sigma, written["sigma"])


def test_mu_sigma_is_exact():
    rng = np.random.default_rng(0)
    # a near-constant channel is where naive float sums of squares lose everything
    pixels = np.stack([rng.integers(0, 256, 10**6), np.full(10**6, 200), 200 + rng.integers(0, 2, 10**6)], axis=1)
    sums = [int(v) for v in pixels.sum(axis=0)]
    squares = [int(v) for v in (pixels.astype(np.int64) ** 2).sum(axis=0)]
    mean, std = stats.moments(len(pixels), sums, squares)
    x = pixels.astype(np.float64)  # integer-valued, so numpy's own sums are exact here
    np.testing.assert_allclose(mean, x.mean(axis=0) / 255.0, rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=0) / 255.0, rtol=1e-9)
    assert std[1] == 0.0


def test_mu_sigma_subset_is_seeded():
    a, b = stats.choose_subset(100, 10, seed=1), stats.choose_subset(100, 10, seed=1)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, stats.choose_subset(100, 10, seed=2))
    assert len(stats.choose_subset(100, 0, 1)) == 100 and len(stats.choose_subset(5, 10, 1)) == 5


# ---------------------------------------------------------------- preprocess_val.py

def test_val_store_round_trip_and_resume(tmp_path, dataset):
    config = write_config(str(tmp_path), dataset, **{"preprocess_val.views_50": "true",
                                                      "preprocess_val.chunk_images": 4})
    result = run("preprocess_val.py", "--config", config)
    assert result.returncode == 0, result.stderr
    cfg = load_settings(config, stats=False)  # the validation views are stored before any normalisation
    im, path = cfg.images, cfg.preprocess_val.path_to_save
    index = load_index(dataset, "val")
    store = val_store.open_val_store(path)
    assert len(store) == len(index) == 9 and store.protocols == (1, 10, 50) and store.crop == im.crop_size
    assert np.array_equal(store.labels, index.labels) and store.classes == index.classes
    for j in range(len(store)):
        img = images.decode_rgb(index.paths[j])
        resized = np.asarray(images.resize_shorter(img, im.eval_resize))
        assert np.array_equal(store.views(j, 10), images.eval_views(resized, im.crop_size))
        assert np.array_equal(store.views(j, 1)[0], images.center_crop(resized, im.crop_size))
        assert np.array_equal(store.views(j, 50), images.views_at_scales(img, im.eval_scales_50, im.crop_size))
    batches = list(store.iter_batches(10, 4))
    assert [b[0].shape for b in batches] == [(4, 10, 64, 64, 3), (4, 10, 64, 64, 3), (1, 10, 64, 64, 3)]
    assert np.array_equal(np.concatenate([b[1] for b in batches]), store.labels)
    assert next(store.iter_batches(50, 2))[0].shape == (2, 50, 64, 64, 3)

    # resume: forget one chunk and the completion marker; the rebuilt store is byte-identical
    before = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path) if n != "meta.json"}
    os.remove(os.path.join(path, "chunk_00001.json"))
    os.remove(os.path.join(path, "chunk_00001_src.npy"))
    os.remove(os.path.join(path, "meta.json"))
    result = run("preprocess_val.py", "--config", config)
    assert result.returncode == 0, result.stderr
    after = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path) if n != "meta.json"}
    assert after == before and os.path.isfile(os.path.join(path, "meta.json"))


def test_val_store_skips_unreadable_and_refuses_other_settings(tmp_path):
    root = tmp_path / "imagenet"
    make_dataset(root, num_classes=2, train_per_class=1, val_per_class=3, odd_files=False, min_side=40, max_side=48)
    victim = sorted(os.listdir(root / "val" / "n00000002"))[0]
    (root / "val" / "n00000002" / victim).write_bytes(b"")
    index = load_index(str(root), "val")
    path = str(tmp_path / "store")
    meta = val_store.build_store(path, index, crop=32, eval_resize=36, chunk_images=2, num_workers=1,
                                 progress=False, say=lambda *a: None)
    store = val_store.open_val_store(path)
    assert len(store) == 5 and meta["skipped"][0][1].endswith(victim) and meta["skipped"][0][2] == "zero bytes"
    assert store.protocols == (1, 10)
    assert np.array_equal(store.labels, np.delete(index.labels, meta["skipped"][0][0]))
    with pytest.raises(UserError, match="has no 50-view data"):
        store.views(0, 50)
    with pytest.raises(UserError, match="eval_resize: 36, now 40"):
        val_store.build_store(path, index, crop=32, eval_resize=40, progress=False)
    with pytest.raises(UserError, match="No complete validation store"):
        val_store.open_val_store(str(tmp_path))
    with open(os.path.join(path, "chunk_00001_eval.bin"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="damaged.*chunk_00001_eval.bin has 100 bytes"):
        val_store.open_val_store(path)


def test_val_storage_per_image_for_a_500x375_photo(tmp_path):
    """Full-size settings: 10-crop at 256 plus the 50-view set must stay under 1/10 of the original's 15 MB."""
    os.makedirs(tmp_path / "d" / "train" / "n1")
    os.makedirs(tmp_path / "d" / "val" / "n1")
    Image.fromarray(np.zeros((375, 500, 3), np.uint8)).save(tmp_path / "d" / "val" / "n1" / "a.JPEG")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / "n1" / "t.JPEG")
    index = load_index(str(tmp_path / "d"), "val")
    meta = val_store.build_store(str(tmp_path / "store"), index, crop=224, eval_resize=256, views_50=True,
                                 scales_50=(224, 256, 384, 480, 640), num_workers=1, progress=False,
                                 say=lambda *a: None)
    assert meta["bytes_per_image"] == 341 * 256 * 3 + 500 * 375 * 3 + 2 * 4 * 8  # 824,452 B
    assert meta["bytes_per_image"] <= 15e6 / 10


# ---------------------------------------------------------------- make_demo_dataset.py

def test_demo_dataset_is_idempotent_and_seeded(tmp_path):
    small = dict(num_classes=2, train_per_class=2, val_per_class=1, min_side=20, max_side=24)
    out = str(tmp_path / "demo")
    result = run(os.path.join("tools", "make_demo_dataset.py"), "--out", out, "--classes", "2", "--train_per_class",
                 "2", "--val_per_class", "1", "--min_side", "20", "--max_side", "24", "--num_workers", "1")
    assert result.returncode == 0, result.stderr
    marker_time = os.stat(os.path.join(out, MARKER)).st_mtime_ns
    make_dataset(out, **small)  # same arguments: nothing to do
    assert os.stat(os.path.join(out, MARKER)).st_mtime_ns == marker_time
    same = str(tmp_path / "again")
    make_dataset(same, **small)
    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert files == sorted(os.path.relpath(os.path.join(d, f), same) for d, _, fs in os.walk(same) for f in fs)
    for rel in files:
        if rel != MARKER:
            assert open(os.path.join(out, rel), "rb").read() == open(os.path.join(same, rel), "rb").read()
    cache = tmp_path / "cache"
    cache.mkdir()
    make_dataset(out, **small, derived=[str(cache)])  # unchanged: derived folders are kept
    assert cache.exists()
    make_dataset(out, **dict(small, seed=1), derived=[str(cache)])  # other arguments: replaced, with its derivatives
    assert json.load(open(os.path.join(out, MARKER)))["args"]["seed"] == 1 and not cache.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="not made by make_demo_dataset"):
        make_dataset(str(foreign), **small)
    assert not any(is_temp_name(n) for n in os.listdir(tmp_path))


def test_demo_dataset_odd_files(dataset):
    kinds = json.load(open(os.path.join(dataset, MARKER)))["odd_files"]
    assert sorted(kinds.values()) == ["cmyk", "cmyk", "cmyk", "gray", "gray", "gray", "png", "png", "truncated"]
    modes = {}
    for key, kind in kinds.items():
        split, wnid, j = key.split(":")
        folder = os.path.join(dataset, split, wnid)
        name = f"{wnid}_{j}.JPEG" if split == "train" else None
        if name:
            path = os.path.join(folder, name)
            if kind == "truncated":
                with pytest.raises(images.BadImageError):
                    images.decode_rgb(path)
            else:
                with Image.open(path) as img:
                    modes[kind] = (img.format, img.mode)
                assert images.decode_rgb(path).mode == "RGB"
    assert modes == {"cmyk": ("JPEG", "CMYK"), "gray": ("JPEG", "L"), "png": ("PNG", "RGB")}
