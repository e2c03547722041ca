"""Multi-worker without waste (issue 15): worker w of W builds only rows [w*B/W, (w+1)*B/W) of each global batch.

Draws stay keyed by the global position, so the W slices concatenated are the single-machine global batch
byte for byte; each producer crops only B/W images per batch; the manifest records the slice, and a trainer
whose TF_CONFIG position disagrees with its buffer's slice stops with one sentence.
"""
import dataclasses
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from settings import load_settings
from utils.errors import UserError
from data.buffer import files, protocol
from data.buffer import reader as buffer_reader
from data.buffer.builder import BatchBuilder, Recipe
from data.sources.index import load_index
from data.transforms.families import CROP_FAMILIES
from tests.helpers import ROOT, SOLID_BATCH, producer_cmd, solid_config_for

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")
BASE = Recipe(seed=7, batch_size=6, crop=24, scales=(32, 40, 48), pca_std=0.1, mu=(0.48, 0.45, 0.40),
              sigma=(0.27, 0.26, 0.28), decoder="pil")


def tf_config(index, count):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{1000 + i}" for i in range(count)]},
                       "task": {"type": "worker", "index": index}})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The six golden photographs plus a truncated one, whose slot takes the next readable image."""
    folder = tmp_path_factory.mktemp("golden")
    paths = []
    for name in sorted(f for f in os.listdir(GOLDEN) if f.endswith(".JPEG")):
        paths.append(shutil.copy(os.path.join(GOLDEN, name), str(folder / name)))
    broken = str(folder / "broken.JPEG")
    data = open(paths[0], "rb").read()
    with open(broken, "wb") as f:
        f.write(data[:len(data) // 3])
    paths.insert(2, broken)
    return paths + paths[:5]  # 12 images: two batches of 6 per epoch


@pytest.mark.parametrize("augmentation", ["scale", "inception"])
@pytest.mark.parametrize("count", [2, 3])
def test_the_worker_slices_concatenated_are_the_global_batch_byte_for_byte(images, augmentation, count):
    recipe = dataclasses.replace(BASE, augmentation=augmentation)
    labels = list(range(len(images)))
    whole = BatchBuilder(images, labels, recipe)
    slices = [BatchBuilder(images, labels, dataclasses.replace(recipe, worker_index=w, worker_count=count))
              for w in range(count)]
    for epoch in (0, 1):
        for b in range(whole.num_batches()):
            parts = [s.build(epoch, b) for s in slices]
            for got, want in zip(zip(*parts), whole.build(epoch, b)):
                assert np.concatenate(got).tobytes() == want.tobytes()
    assert len(whole.skipped) == 1 and all(s.num_batches() == whole.num_batches() == 2 for s in slices)


def test_each_producer_crops_only_its_rows_of_every_batch(images, monkeypatch):
    calls = []
    crop = CROP_FAMILIES["scale"]
    monkeypatch.setitem(CROP_FAMILIES, "scale", lambda path, *rest: calls.append(path) or crop(path, *rest))
    readable = [p for p in images if not p.endswith("broken.JPEG")]  # one crop call per row
    builder = BatchBuilder(readable, list(range(len(readable))), dataclasses.replace(BASE, worker_index=1,
                                                                                    worker_count=3))
    for b in range(builder.num_batches()):
        calls.clear()
        images_out, labels, lighting = builder.build(0, b)
        assert len(calls) == len(images_out) == len(labels) == len(lighting) == BASE.batch_size // 3


def test_a_single_machine_manifest_keeps_its_run_id_and_a_slice_is_another_run():
    single = protocol.make_manifest(BASE, "f" * 32, 60, 5, 0, 3)
    sliced = protocol.make_manifest(dataclasses.replace(BASE, worker_index=1, worker_count=2), "f" * 32, 60, 5, 0, 3)
    assert "worker_slice" not in single and sliced["worker_slice"] == [1, 2]
    assert single["run_id"] != sliced["run_id"]
    assert protocol.manifest_differences(single, sliced) == ["worker_slice null -> [1, 2]"]


def test_a_worker_position_outside_the_cluster_or_an_uneven_batch_is_one_sentence():
    assert files.worker_rows(64, (3, 4)) == 16
    with pytest.raises(UserError, match=r"^Worker 2 of 2 is not a position in the cluster; [^.]*\.$"):
        files.worker_rows(64, (2, 2))
    with pytest.raises(UserError, match=r"^--batch_size 30 \(the global batch\) is not divisible by the 4 "):
        files.worker_rows(30, (0, 4))


@pytest.fixture(scope="module")
def sliced_buffers(solid_dataset, tmp_path_factory):
    """Worker 0's producer placed by --worker_index/--worker_count, worker 1's by TF_CONFIG, both --once."""
    base = tmp_path_factory.mktemp("sliced")
    configs = {}
    for w, extra, env in ((0, ["--worker_index", "0", "--worker_count", "2"], {}),
                          (1, [], {"TF_CONFIG": tf_config(1, 2)})):
        configs[w] = solid_config_for(str(base / f"worker{w}"), solid_dataset, train={"wait_timeout": "0.2"})
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"} | env
        done = subprocess.run(producer_cmd(configs[w], "--once", *extra), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
    return configs


def test_two_slice_producers_together_write_the_global_batches(sliced_buffers):
    cfg = load_settings(sliced_buffers[0])
    index = load_index(cfg.preprocess.ImageNet_folder, "train")
    whole = BatchBuilder(index.paths, index.labels, Recipe.from_settings(cfg, SOLID_BATCH))
    manifests = [protocol.load_manifest(load_settings(sliced_buffers[w]).train.buffer_folder) for w in (0, 1)]
    assert [m["worker_slice"] for m in manifests] == [[0, 2], [1, 2]]
    assert all(m["batch_size"] == SOLID_BATCH for m in manifests)
    readers = [buffer_reader.BufferReader(load_settings(sliced_buffers[w]), SOLID_BATCH, worker=(w, 2))
               for w in (0, 1)]
    for b in range(cfg.train.buffer_size):
        parts = [r.read(0, b) for r in readers]
        for kind, want in zip(("images", "labels", "lighting"), whole.build(0, b)):
            assert np.concatenate([getattr(p, kind) for p in parts]).tobytes() == want.tobytes()


def test_a_trainer_whose_tf_config_position_disagrees_with_its_buffer_stops_with_one_sentence(sliced_buffers,
                                                                                                monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config(0, 2))
    cfg = load_settings(sliced_buffers[1])  # the settings take this machine's position from TF_CONFIG
    with pytest.raises(UserError) as err:
        buffer_reader.BufferReader(cfg, SOLID_BATCH).check_manifest()
    text = str(err.value)
    assert "holds the rows of worker 1 of 2 but this trainer needs the rows of worker 0 of 2" in text
    assert "--worker_index=0 --worker_count=2" in text and "\n" not in text and text.count(". ") == 0
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(UserError, match="needs whole global batches \\(one machine\\)"):
        buffer_reader.BufferReader(load_settings(sliced_buffers[1]), SOLID_BATCH).check_manifest()


def test_the_producer_takes_its_slice_from_its_flags_or_else_from_tf_config(monkeypatch):
    import runtime_preprocessing
    args = ["--epoch_start", "0", "--epoch_end", "1", "--batch_size", "8"]
    monkeypatch.setenv("TF_CONFIG", tf_config(2, 4))
    assert runtime_preprocessing.worker_slice(runtime_preprocessing.parse_args(args)) == (2, 4)
    agreeing = runtime_preprocessing.parse_args(args + ["--worker_index", "2", "--worker_count", "4"])
    assert runtime_preprocessing.worker_slice(agreeing) == (2, 4)
    monkeypatch.delenv("TF_CONFIG")
    given = runtime_preprocessing.parse_args(args + ["--worker_index", "1", "--worker_count", "2"])
    assert runtime_preprocessing.worker_slice(given) == (1, 2)
    assert runtime_preprocessing.worker_slice(runtime_preprocessing.parse_args(args)) == (0, 1)
    with pytest.raises(UserError, match=r"^--worker_index and --worker_count go together; [^.]*\.$"):
        runtime_preprocessing.worker_slice(runtime_preprocessing.parse_args(args + ["--worker_index", "1"]))


def test_a_worker_index_that_contradicts_tf_config_is_refused_in_one_sentence(monkeypatch):
    import runtime_preprocessing
    monkeypatch.setenv("TF_CONFIG", tf_config(0, 2))
    args = runtime_preprocessing.parse_args(["--epoch_start", "0", "--epoch_end", "1", "--batch_size", "8",
                                             "--worker_index", "1", "--worker_count", "2"])
    with pytest.raises(UserError) as err:
        runtime_preprocessing.worker_slice(args)
    text = str(err.value)
    assert text.startswith("--worker_index=1 --worker_count=2 contradicts TF_CONFIG, which makes this machine "
                           "worker 0 of 2")
    assert "\n" not in text and text.count(". ") == 0 and text.endswith(".")
