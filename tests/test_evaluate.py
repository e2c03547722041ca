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

from engine import evaluate
from engine.evaluate import EpochResult
from utils import UserError

C = 3  # classes of the table model


class TableModel(tf.Module):
    def __init__(self, table):
        super().__init__()
        self.table = tf.constant(table, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def serve(self, images):
        logits = tf.gather(self.table, tf.cast(images[:, 0, 0, 0], tf.int32))
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}


def _table():
    table = np.zeros((256, C), np.float32)
    table[1] = [2.0, 0.0, 0.0]    # mildly sure of class 0
    table[2] = [0.0, 30.0, 0.0]   # extremely sure of class 1
    table[3] = [0.0, 0.0, 5.0]    # sure of class 2
    return table


def export_table_model(path):
    model = TableModel(_table())
    tf.saved_model.save(model, path, signatures={"serving_default": model.serve})


@pytest.fixture(scope="module")
def table_model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("table") / "saved_model")
    export_table_model(path)
    return path


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
    assert evaluate.topk_hits(scores, labels) == {1: 1, 5: 3}
    # A tie is broken towards the lower class index, whatever the input order in memory.
    assert evaluate.topk_hits(np.array([[0.5, 0.5]]), np.array([0]), ks=(1,)) == {1: 1}
    assert evaluate.topk_hits(np.array([[0.5, 0.5]]), np.array([1]), ks=(1,)) == {1: 0}


def test_average_views_groups_each_images_views():
    probs = np.arange(2 * 3 * 2, dtype=np.float32).reshape(6, 2)  # 2 images x 3 views x 2 classes
    np.testing.assert_allclose(evaluate.average_views(probs, 3), [[2.0, 3.0], [8.0, 9.0]])


def test_probabilities_are_averaged_not_logits(table_model_dir):
    # Nine views mildly favour class 0, one view is extremely sure of class 1.
    codes = [[1] * 9 + [2]]
    table = _table()
    assert np.argmax(table[codes[0]].mean(axis=0)) == 1  # averaging logits would pick class 1
    predictor = evaluate.SavedModelPredictor(tf.saved_model.load(table_model_dir))
    store = FakeStore({10: coded_views(codes)}, labels=[0])
    result = evaluate.evaluate_epoch(predictor, store, 10, epoch=0, show_progress=False)
    assert (result.top1, result.top5, result.images) == (100.0, 100.0, 1)
    store = FakeStore({10: coded_views(codes)}, labels=[1])
    assert evaluate.evaluate_epoch(predictor, store, 10, epoch=0, show_progress=False).top1 == 0.0


def test_batches_cover_every_image_once_in_any_batch_size(table_model_dir):
    rng = np.random.default_rng(0)
    codes = rng.integers(1, 4, size=(23, 10))
    labels = rng.integers(0, C, size=23)
    predictor = evaluate.SavedModelPredictor(tf.saved_model.load(table_model_dir))
    store = FakeStore({10: coded_views(codes)}, labels)
    probs = tf.nn.softmax(_table()[codes]).numpy().mean(axis=1)
    expected = evaluate.topk_hits(probs, labels, ks=(1,))[1]
    for batch in (1, 5, 23, 100):
        result = evaluate.evaluate_epoch(predictor, store, 10, epoch=0, batch_images=batch, show_progress=False)
        assert result.images == 23
        assert result.top1 == pytest.approx(100.0 * expected / 23)


def test_views_reach_the_model_image_by_image():
    seen = []

    def recorder(images):
        seen.append(np.array(images))
        return np.full((len(images), C), 1.0 / C, np.float32)

    views = np.random.default_rng(1).integers(0, 256, size=(5, 10, 6, 6, 3), dtype=np.uint8)
    store = FakeStore({10: views}, labels=[0] * 5)
    evaluate.evaluate_epoch(recorder, store, 10, epoch=0, batch_images=2, show_progress=False)
    assert [len(s) for s in seen] == [20, 20, 10]
    np.testing.assert_array_equal(np.concatenate(seen), views.reshape(50, 6, 6, 3))


def test_class_count_mismatch_is_a_user_error(table_model_dir):
    predictor = evaluate.SavedModelPredictor(tf.saved_model.load(table_model_dir))
    store = FakeStore({10: coded_views([[1] * 10])}, labels=[0], classes=5)
    with pytest.raises(UserError, match="predicts 3 classes but the validation set has 5"):
        evaluate.evaluate_epoch(predictor, store, 10, epoch=0, show_progress=False)


def test_missing_protocol_data_is_a_user_error():
    store = FakeStore({10: coded_views([[1] * 10])}, labels=[0])
    with pytest.raises(UserError, match="no 50-view data.*views_50"):
        evaluate.evaluate_epoch(lambda x: x, store, 50, epoch=0, show_progress=False)


def test_prefetch_reraises_errors_from_the_loader():
    def broken():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in evaluate.prefetch(broken()):
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

    def publish():
        time.sleep(0.4)
        os.rename(staging, run / "3")  # as train.py does: the epoch folder appears complete

    messages = []
    thread = threading.Thread(target=publish)
    thread.start()
    try:
        loaded = evaluate.wait_for_model(str(run), 3, timeout=30, poll=0.05, say=messages.append)
    finally:
        thread.join()
    assert "serving_default" in loaded.signatures
    assert len(messages) == 1 and os.path.join(str(run), "3", "saved_model") in messages[0]


def test_timeout_names_the_missing_folder(tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError, match=r"Timed out after 0.3 s waiting for .*run[/\\]7[/\\]saved_model"):
        evaluate.wait_for_model(str(tmp_path / "run"), 7, timeout=0.3, poll=0.05, say=lambda m: None)
    assert time.monotonic() - start < 5


def test_load_errors_are_retried_then_reported(tmp_path):
    (tmp_path / "0" / "saved_model").mkdir(parents=True)
    calls = []

    def flaky(path):
        calls.append(path)
        if len(calls) < 2:
            raise OSError("still copying")
        return "model"

    assert evaluate.wait_for_model(str(tmp_path), 0, poll=0.01, say=lambda m: None, load=flaky) == "model"

    def broken(path):
        raise OSError("corrupt")

    with pytest.raises(UserError, match="Could not load the model of epoch 0"):
        evaluate.wait_for_model(str(tmp_path), 0, poll=0.01, say=lambda m: None, load=broken)


# ----------------------------------------------------------------------------
# accuracy.csv and accuracy.png
# ----------------------------------------------------------------------------

def _result(epoch, protocol, top1, top5=90.0, images=400):
    return EpochResult(epoch=epoch, protocol=protocol, top1=top1, top5=top5, images=images, seconds=1.0)


def test_rerunning_an_epoch_replaces_its_csv_row(tmp_path):
    run = str(tmp_path / "run")
    evaluate.record(run, _result(1, 10, 50.0))
    evaluate.record(run, _result(0, 10, 40.0))
    evaluate.record(run, _result(1, 1, 45.0))
    evaluate.record(run, _result(1, 10, 55.5))  # re-run of epoch 1, 10 views
    rows = evaluate.read_rows(os.path.join(run, "accuracy.csv"))
    assert [(r["protocol"], r["epoch"], r["top1"]) for r in rows] == [(1, 1, 45.0), (10, 0, 40.0), (10, 1, 55.5)]
    with open(os.path.join(run, "accuracy.csv")) as f:
        assert f.readline().strip() == "epoch,protocol,top1,top5,images"
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    assert evaluate.first_missing_epoch(run, 10, 5) == 2
    assert evaluate.first_missing_epoch(run, 1, 5) == 0


def test_plot_is_a_valid_png(tmp_path):
    run = str(tmp_path / "run")
    for epoch, top1 in enumerate((20.0, 45.0, 61.0)):
        _, png = evaluate.record(run, _result(epoch, 10, top1, top5=top1 + 25))
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
        evaluate.read_rows(str(path))


def test_result_line_keeps_the_seeds_format():
    line = evaluate.result_line(_result(4, 10, 51.234, top5=75.5))
    assert line.startswith("Epoch# 4  Top 1 accuracy: 51.23%  Top 5 accuracy: 75.50%")
    assert "10 views" in line and "images/s" in line
