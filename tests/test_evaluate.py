"""check_accuracy / engine.evaluate: scoring, view averaging, waiting, CSV and plot outputs.

A "table model" stands in for a trained network: a SavedModel with the export
contract (uint8 images in, {'logits','probabilities'} out) whose logits are a
row of a fixed table picked by the value of each view's top-left red pixel, so
a test decides exactly what every view predicts.
"""
import os
import shutil
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from engine import accuracy_log, evaluate, model_wait, scoring
from engine.prefetch import prefetch
from engine.scoring import EpochResult
from tests.eval_helpers import (C, CROP, EVAL_RESIZE, coded_dataset, table_model_dir,  # noqa: F401 (fixtures)
                                table, write_eval_config)
from tests.helpers import wait_until
from utils.errors import UserError


class FakeStore:
    """The val_store interface over arrays held in memory: views [N, V, h, w, 3], labels [N]."""

    def __init__(self, views_by_protocol, labels, classes=C):
        self.views = views_by_protocol
        self.labels = np.asarray(labels, np.int64)
        self.classes = [f"n{k:08d}" for k in range(classes)]
        self.protocols = tuple(views_by_protocol)
        self.path = "<memory>"

    def __len__(self):
        return len(self.labels)

    def iter_batches(self, protocol, images_per_batch):
        for i in range(0, len(self), images_per_batch):
            yield self.views[protocol][i:i + images_per_batch], self.labels[i:i + images_per_batch]


def coded_views(codes, side=4):
    """uint8 views whose top-left red pixel is each code: [N, V] -> [N, V, side, side, 3]."""
    codes = np.asarray(codes, np.uint8)
    views = np.full(codes.shape + (side, side, 3), 7, np.uint8)
    views[..., 0, 0, 0] = codes
    return views


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------

def test_topk_hits_against_hand_computed_case():
    scores = np.array([
        [0.10, 0.50, 0.20, 0.05, 0.05, 0.04, 0.06],  # label 1: top-1 hit
        [0.30, 0.25, 0.20, 0.10, 0.08, 0.07, 0.00],  # label 4: rank 5 -> top-5 hit only
        [0.30, 0.25, 0.20, 0.10, 0.08, 0.07, 0.00],  # label 5: rank 6 -> miss
        [0.20, 0.20, 0.20, 0.20, 0.20, 0.00, 0.00],  # label 1: tie with class 0, lower index wins -> top-5 only
        [0.00, 0.20, 0.20, 0.20, 0.20, 0.20, 0.00],  # label 6: outside the five tied classes -> miss
    ])
    labels = np.array([1, 4, 5, 1, 6])
    assert scoring.topk_hits(scores, labels) == {1: 1, 5: 3}
    # A tie is broken towards the lower class index, whatever the input order in memory.
    assert scoring.topk_hits(np.array([[0.5, 0.5]]), np.array([0]), ks=(1,)) == {1: 1}
    assert scoring.topk_hits(np.array([[0.5, 0.5]]), np.array([1]), ks=(1,)) == {1: 0}


def test_average_views_groups_each_images_views():
    probs = np.arange(2 * 3 * 2, dtype=np.float32).reshape(6, 2)  # 2 images x 3 views x 2 classes
    np.testing.assert_allclose(scoring.average_views(probs, 3), [[2.0, 3.0], [8.0, 9.0]])


def test_probabilities_are_averaged_not_logits(table_model_dir):
    # Nine views mildly favour class 0, one view is extremely sure of class 1.
    codes = [[1] * 9 + [2]]
    logits = table()
    assert np.argmax(logits[codes[0]].mean(axis=0)) == 1  # averaging logits would pick class 1
    predictor = model_wait.SavedModelPredictor(tf.saved_model.load(table_model_dir))
    store = FakeStore({10: coded_views(codes)}, labels=[0])
    result = scoring.evaluate_epoch(predictor, store, 10, epoch=0, show_progress=False)
    assert (result.top1, result.images) == (100.0, 1)  # (top-5 of C = 3 classes is 100% for any model)
    store = FakeStore({10: coded_views(codes)}, labels=[1])
    assert scoring.evaluate_epoch(predictor, store, 10, epoch=0, show_progress=False).top1 == 0.0


def test_batches_cover_every_image_once_in_any_batch_size(table_model_dir):
    rng = np.random.default_rng(0)
    codes = rng.integers(1, 4, size=(23, 10))
    labels = rng.integers(0, C, size=23)
    predictor = model_wait.SavedModelPredictor(tf.saved_model.load(table_model_dir))
    store = FakeStore({10: coded_views(codes)}, labels)
    probs = tf.nn.softmax(table()[codes]).numpy().mean(axis=1)
    expected = scoring.topk_hits(probs, labels, ks=(1,))[1]
    for batch in (1, 5, 23, 100):
        result = scoring.evaluate_epoch(predictor, store, 10, epoch=0, batch_images=batch, show_progress=False)
        assert result.images == 23
        assert result.top1 == pytest.approx(100.0 * expected / 23)


def test_views_reach_the_model_image_by_image():
    seen = []

    def recorder(images):
        seen.append(np.array(images))
        return np.full((len(images), C), 1.0 / C, np.float32)

    views = np.random.default_rng(1).integers(0, 256, size=(5, 10, 6, 6, 3), dtype=np.uint8)
    store = FakeStore({10: views}, labels=[0] * 5)
    scoring.evaluate_epoch(recorder, store, 10, epoch=0, batch_images=2, show_progress=False)
    assert [len(s) for s in seen] == [20, 20, 10]
    np.testing.assert_array_equal(np.concatenate(seen), views.reshape(50, 6, 6, 3))


def test_class_count_mismatch_is_a_user_error(table_model_dir):
    predictor = model_wait.SavedModelPredictor(tf.saved_model.load(table_model_dir))
    store = FakeStore({10: coded_views([[1] * 10])}, labels=[0], classes=5)
    with pytest.raises(UserError, match="predicts 3 classes but the validation set has 5"):
        scoring.evaluate_epoch(predictor, store, 10, epoch=0, show_progress=False)


def test_missing_protocol_data_is_a_user_error():
    store = FakeStore({10: coded_views([[1] * 10])}, labels=[0])
    with pytest.raises(UserError, match="no 50-view data.*views_50"):
        scoring.evaluate_epoch(lambda x: x, store, 50, epoch=0, show_progress=False)


def test_prefetch_reraises_errors_from_the_loader():
    def broken():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(broken()):
            got.append(item)
    assert got == [1]


# ----------------------------------------------------------------------------
# Waiting for a model folder
# ----------------------------------------------------------------------------

def test_waits_for_a_model_folder_renamed_into_place_later(tmp_path, table_model_dir):
    run = tmp_path / "run"
    staging = tmp_path / "staging"
    shutil.copytree(table_model_dir, staging / "saved_model")
    run.mkdir()

    messages = []

    def publish():  # once the evaluator says it waits, the epoch folder appears complete, as train.py renames it
        assert wait_until(lambda: messages, timeout=30)
        os.rename(staging, run / "3")

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        loaded = model_wait.wait_for_model(str(run), 3, timeout=30, poll=0.05, say=messages.append)
    finally:
        thread.join()
    assert "serving_default" in loaded.signatures
    assert len(messages) == 1 and os.path.join(str(run), "3", "saved_model") in messages[0]


def test_timeout_names_the_missing_folder(tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError, match=r"Timed out after 0.3 s waiting for .*run[/\\]7[/\\]saved_model"):
        model_wait.wait_for_model(str(tmp_path / "run"), 7, timeout=0.3, poll=0.05, say=lambda m: None)
    assert time.monotonic() - start < 5


def test_a_wait_for_ema_weights_names_the_folder_its_timeout_names(tmp_path):
    (tmp_path / "run").mkdir()
    messages = []
    with pytest.raises(UserError) as err:
        evaluate.wait_for_model(str(tmp_path / "run"), 4, timeout=0.3, poll=0.05, say=messages.append,
                                load=lambda path: None, weights="ema")
    path = os.path.join(str(tmp_path / "run"), "4", "saved_model_ema")
    assert f"waiting for {path};" in str(err.value)
    assert messages and messages[0].startswith(f"Waiting for {path}: epoch 4 is not saved yet")


def test_a_wait_says_what_it_awaits_at_once_then_reminds_with_the_time_left(tmp_path):
    (tmp_path / "run").mkdir()
    messages = []
    with pytest.raises(UserError, match="Timed out after 0.6 s"):
        model_wait.wait_for_model(str(tmp_path / "run"), 2, timeout=0.6, poll=0.05, say=messages.append,
                                load=lambda path: None, remind_every=0.2)
    path = os.path.join(str(tmp_path / "run"), "2", "saved_model")
    assert messages[0] == (f"Waiting for {path}: epoch 2 is not saved yet; train.py --run_folder=run saves it "
                           f"when the epoch ends (giving up in 1 s).")
    assert len(messages) >= 2 and all(m.startswith(f"Still waiting for {path} (epoch 2; waited ")
                                      and "giving up in" in m for m in messages[1:])
    assert model_wait.REMIND_SECONDS == 30.0


def test_load_errors_are_retried_then_reported(tmp_path):
    (tmp_path / "0" / "saved_model").mkdir(parents=True)
    calls = []

    def flaky(path):
        calls.append(path)
        if len(calls) < 2:
            raise OSError("still copying")
        return "model"

    assert model_wait.wait_for_model(str(tmp_path), 0, poll=0.01, say=lambda m: None, load=flaky) == "model"

    def broken(path):
        raise OSError("corrupt")

    with pytest.raises(UserError, match="Could not load the model of epoch 0"):
        model_wait.wait_for_model(str(tmp_path), 0, poll=0.01, say=lambda m: None, load=broken)


# ----------------------------------------------------------------------------
# accuracy.csv and accuracy.png
# ----------------------------------------------------------------------------

def _result(epoch, protocol, top1, top5=90.0, images=400):
    return EpochResult(epoch=epoch, protocol=protocol, top1=top1, top5=top5, images=images, seconds=1.0)


def test_rerunning_an_epoch_replaces_its_csv_row(tmp_path):
    run = str(tmp_path / "run")
    accuracy_log.record(run, _result(1, 10, 50.0))
    accuracy_log.record(run, _result(0, 10, 40.0))
    accuracy_log.record(run, _result(1, 1, 45.0))
    accuracy_log.record(run, _result(1, 10, 55.5))  # re-run of epoch 1, 10 views
    rows = accuracy_log.read_rows(os.path.join(run, "accuracy.csv"))
    assert [(r["protocol"], r["epoch"], r["top1"]) for r in rows] == [(1, 1, 45.0), (10, 0, 40.0), (10, 1, 55.5)]
    with open(os.path.join(run, "accuracy.csv")) as f:
        assert f.readline().strip() == "epoch,protocol,top1,top5,images,weights,crop"
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    assert accuracy_log.first_missing_epoch(run, 10, 5) == 2
    assert accuracy_log.first_missing_epoch(run, 1, 5) == 0


def test_plot_is_a_valid_png(tmp_path):
    run = str(tmp_path / "run")
    for epoch, top1 in enumerate((20.0, 45.0, 61.0)):
        _, png = accuracy_log.record(run, _result(epoch, 10, top1, top5=top1 + 25))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200


def test_malformed_csv_is_a_user_error(tmp_path):
    path = tmp_path / "accuracy.csv"
    path.write_text("epoch,top1\n0,5\n")
    with pytest.raises(UserError, match="columns"):
        accuracy_log.read_rows(str(path))


def test_result_line_keeps_the_seeds_format():
    line = evaluate.result_line(_result(4, 10, 51.234, top5=75.5))
    assert line.startswith("Epoch# 4  Top 1 accuracy: 51.23%  Top 5 accuracy: 75.50%")
    assert "10 views" in line and "images/s" in line


# ----------------------------------------------------------------------------
# With the real validation store (preprocess_val's format) and a real exported model
# ----------------------------------------------------------------------------

def _hand_views(arr):
    h, w = arr.shape[:2]
    b, r = h - CROP, w - CROP
    crops = [arr[0:CROP, 0:CROP], arr[0:CROP, r:], arr[b:, 0:CROP], arr[b:, r:],
             arr[b // 2:b // 2 + CROP, r // 2:r // 2 + CROP]]
    return np.stack([v for c in crops for v in (c, c[:, ::-1])])


def test_the_10_views_reaching_the_model_are_the_corner_and_centre_crops_and_flips(coded_dataset, tmp_path):
    from data.sources.val_store import build_store, open_val_store
    index, images = coded_dataset
    build_store(str(tmp_path / "store"), index, CROP, EVAL_RESIZE, views_50=True, scales_50=(16, 20, 24, 28, 32),
                num_workers=1, progress=False, say=lambda m: None)
    store = open_val_store(str(tmp_path / "store"))
    seen = []

    def recorder(batch):
        seen.append(np.array(batch))
        return np.full((len(batch), 3), 1.0 / 3, np.float32)

    expected = [_hand_views(images[store.classes[label]]) for label in store.labels]
    scoring.evaluate_epoch(recorder, store, 10, epoch=0, batch_images=2, show_progress=False)
    np.testing.assert_array_equal(seen[0], np.concatenate(expected))
    seen.clear()
    scoring.evaluate_epoch(recorder, store, 1, epoch=0, show_progress=False)
    np.testing.assert_array_equal(seen[0], np.stack([e[8] for e in expected]))  # the unflipped centre crop
    seen.clear()
    scoring.evaluate_epoch(recorder, store, 50, epoch=0, batch_images=1, show_progress=False)
    assert [s.shape for s in seen] == [(50, CROP, CROP, 3)] * 2
    np.testing.assert_array_equal(seen[0][10:20], expected[0])  # scale 20 = the stored eval_resize image


def test_check_accuracy_names_a_run_folder_that_does_not_exist_at_once(coded_dataset, tmp_path):
    import subprocess
    import sys
    from data.sources.val_store import build_store
    index, _ = coded_dataset
    build_store(str(tmp_path / "store"), index, CROP, EVAL_RESIZE, num_workers=1, progress=False, say=lambda m: None)
    config = write_eval_config(tmp_path, tmp_path / "store")
    (tmp_path / "runs" / "myrun").mkdir(parents=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "check_accuracy.py"), "--run_folder=nosuchrun",
                             "--epoch_start=0", "--epoch_end=1", f"--config={config}", "--timeout=1"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 2, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == ("note: the validation set has 3 classes, so every image's class is among the best five: "
                        "top-5 accuracy is 100% by construction; read top-1.")
    assert lines[2] == (f"The run folder {tmp_path / 'runs' / 'nosuchrun'} does not exist (runs there: myrun); "
                        f"waiting for train.py --run_folder=nosuchrun to create it and save epoch 0; if the name "
                        f"is mistyped, stop and pass the right --run_folder (waited 0 s, giving up in 1 s).")
    assert "Timed out after 1 s" in result.stderr


def test_check_accuracy_cli_on_a_tiny_exported_model(coded_dataset, tmp_path, table_model_dir, capsys):
    import check_accuracy
    from data.sources.val_store import build_store
    from model import build_model, export_saved_model
    index, _ = coded_dataset
    build_store(str(tmp_path / "store"), index, CROP, EVAL_RESIZE, num_workers=1, progress=False, say=lambda m: None)
    config = write_eval_config(tmp_path, tmp_path / "store")
    run = tmp_path / "runs" / "tiny"
    net = build_model(width_multiplier=0.0625, num_classes=3, stage_blocks=(1, 1, 1, 1))  # a real export, small
    export_saved_model(net, str(run / "0" / "saved_model"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    shutil.copytree(table_model_dir, run / "1" / "saved_model")
    from engine import logs
    for epoch, steps in ((0, 8), (1, 16)):  # the trainer's rows: the global step at each epoch's end
        logs.write_epoch_row(str(run), {k: 0.5 for k in logs.CSV_FIELDS} | {"epoch": epoch, "steps": steps})
    argv = ["--run_folder=tiny", "--epoch_start=0", "--epoch_end=2", f"--config={config}", "--timeout=5"]
    assert check_accuracy.main(argv) == 0
    out = capsys.readouterr().out
    assert "Epoch# 0  Top 1 accuracy:" in out and "Epoch# 1  Top 1 accuracy:" in out
    assert "warning: evaluated 2 images but [preprocess_val] N = 5" in out
    rows = accuracy_log.read_rows(str(run / "accuracy.csv"))
    assert [(r["epoch"], r["protocol"], r["images"]) for r in rows] == [(0, 10, 2), (1, 10, 2)]
    # The table model reads red = 8 * (the crop's top row) in each view's corner, i.e. 0 or >= 16, never its
    # table rows 1-3: all logits are 0, every class ties, class 0 wins; labels are 1 and 2 -> 0% top-1.
    # Top-5 of 3 classes is 100% for any model, so it is not checked here: test_topk_hits_against_hand_computed_case
    # pins top-5 with 7 classes.
    assert rows[1]["top1"] == 0.0
    with open(run / "accuracy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # TensorBoard's own reader finds both accuracies per epoch at the trainer's global steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    board = EventAccumulator(str(run / "tensorboard" / "validation"), size_guidance={"tensors": 0})
    board.Reload()
    for k in (1, 5):
        events = board.Tensors(f"epoch/val_top{k}_10view")
        assert [(e.step, round(100 * float(make_ndarray(e.tensor_proto)), 4)) for e in events] == \
            [(8, rows[0][f"top{k}"]), (16, rows[1][f"top{k}"])]
    # 'auto' resumes after the rows already written: nothing left to do.
    assert check_accuracy.main(argv[:1] + ["--epoch_start=auto"] + argv[2:]) == 0
    assert "Nothing to do" in capsys.readouterr().out
    with pytest.raises(UserError, match="no 50-view data"):
        check_accuracy.main(argv + ["--views=50"])
