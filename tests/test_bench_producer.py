"""bench/bench_producer.py's corpora and its sizing on the user's own dataset (the timings themselves are benched, not tested)."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from bench import corpus
from data.sources.index import load_index
from tools.make_demo_dataset import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZING = re.compile(r"one producer worker builds ([\d,]+) img/s of these images at 224; (.*)")


def test_bench_sizes_producer_workers_from_a_sample_of_an_imagenet_train_folder(tmp_path):
    data = str(tmp_path / "imagenet")
    # 3 classes x 10 training images, 4 of them unusable by tf.data: 2 CMYK, a PNG named .JPEG, a truncated file.
    make_dataset(data, num_classes=3, train_per_class=10, val_per_class=1, seed=0)
    plain = [p for p in load_index(data, "train").paths if corpus._plain_jpeg(p)]
    assert len(plain) == 26
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_producer.py"), "--images_dir", data,
                          "--images", "26", "--rounds", "1", "--batch_size", "8", "--pipelines", "producer1",
                          "--feed", "1800", "--buffer_dir", str(tmp_path), "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["skipped_files"] == 4  # all 26 usable files sampled, the 4 others passed over
    assert result["mean_kb"] == pytest.approx(np.mean([os.path.getsize(p) for p in plain]) / 1000)
    assert f"mean {result['mean_kb']:.0f} KB, {result['mean_megapixels']:.2f} megapixels" in run.stdout
    line = next(m for m in map(SIZING.match, run.stdout.splitlines()) if m)
    per_worker = float(line.group(1).replace(",", ""))
    assert per_worker == pytest.approx(result["best_img_per_s"]["producer1"], abs=0.5)
    feeds = re.findall(r"to feed ([\d,]+) img/s(?: \([^)]*\))? use (\d+) workers?", line.group(2))
    assert [int(r.replace(",", "")) for r, _ in feeds] == [400, 1300, 2400, 3000, 1800]
    assert [int(w) for _, w in feeds] == [math.ceil(int(r.replace(",", "")) / result["best_img_per_s"]["producer1"])
                                          for r, _ in feeds]


@pytest.mark.parametrize("layout", ["folders", "kaggle", "lists", "tiny"])
def test_bench_samples_training_images_of_every_layout_the_index_accepts(tmp_path, layout):
    data = tmp_path / layout
    make_dataset(data, layout=layout, num_classes=3, train_per_class=3, val_per_class=1, odd_files=False,
                 min_side=20, max_side=24)
    index = load_index(data, "train")
    sample = corpus.sample_dataset(str(data), 5, str(tmp_path / "sample"))
    assert len(sample.paths) == 5 and sample.skipped == 0
    relinked = load_index(sample.folder, "train")
    assert sorted(relinked.paths) == sorted(sample.paths)
    class_of = dict(zip(index.paths, (index.classes[k] for k in index.labels)))
    for path in sample.paths:  # each link names a training image, in its class's folder
        assert os.path.basename(os.path.dirname(path)) == class_of[os.readlink(path)]


def test_generated_corpus_has_imagenets_large_photos_and_unsubsampled_files(tmp_path):
    paths = corpus.make_imagenet_like(str(tmp_path), 10)
    megapixels, sampling = [], []
    for path in paths:
        with Image.open(path) as img:
            megapixels.append(img.width * img.height / 1e6)
            sampling.append(JpegImagePlugin.get_sampling(img))
    assert sum(1 <= mp <= 6 for mp in megapixels) == 1  # one in ten
    assert all(mp < 0.3 for mp in megapixels if mp < 1)
    assert 0 in sampling and 2 in sampling  # 4:4:4 and 4:2:0 both present


@pytest.fixture(scope="module")
def small_imagenet(tmp_path_factory):
    """3 classes x 10 training images, 26 of them plain JPEGs."""
    data = str(tmp_path_factory.mktemp("bench_args") / "imagenet")
    make_dataset(data, num_classes=3, train_per_class=10, val_per_class=1, seed=0)
    return data


@pytest.mark.parametrize("args, flag, fix", [
    (["--images", "20", "--batch_size", "24"], "--images 20 is fewer than --batch_size 24", "--images 24"),
    (["--images", "2000"], "--images 2000 is more than the 26 plain JPEG training images", "--images 26"),
    (["--images_dir", "{missing}", "--images", "20"], "--images_dir {missing} does not exist", "train/"),
    (["--images", "10"], "--images 10 is not more than the 16 warm-up images", "--images 17"),
    (["--rounds", "0"], "--rounds must be at least 1", "received 0"),
])
def test_bench_argument_mistakes_are_one_sentence_naming_the_flag(tmp_path, small_imagenet, args, flag, fix):
    missing = str(tmp_path / "no_such_dataset")
    argv = [a.replace("{missing}", missing) for a in args]
    if "--images_dir" not in argv:
        argv += ["--images_dir", small_imagenet]
    if "--rounds" not in argv:
        argv += ["--rounds", "1"]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_producer.py"), *argv, "--pipelines",
                          "producer1", "--buffer_dir", str(tmp_path), "--out", str(tmp_path / "o.json")],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert lines[0].startswith("error: " + flag.replace("{missing}", missing)) and fix in lines[0]
    assert "ImageNet_folder" not in lines[0] and not (tmp_path / "o.json").exists()
