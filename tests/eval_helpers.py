"""Fixtures for the evaluation tests (tests/test_evaluate.py, tests/test_eval_crop.py): a "table model" (a
SavedModel with the export contract whose logits are a row of a fixed table picked by each view's top-left red
pixel), a coded 3-class dataset whose pixels say where they came from, and a config pointing at a store."""
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

C = 3  # classes of the table model


class TableModel(tf.Module):
    def __init__(self, table):
        super().__init__()
        self.table = tf.constant(table, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def serve(self, images):
        logits = tf.gather(self.table, tf.cast(images[:, 0, 0, 0], tf.int32))
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}


def table():
    table = np.zeros((256, C), np.float32)
    table[1] = [2.0, 0.0, 0.0]    # mildly sure of class 0
    table[2] = [0.0, 30.0, 0.0]   # extremely sure of class 1
    table[3] = [0.0, 0.0, 5.0]    # sure of class 2
    return table


def export_table_model(path):
    model = TableModel(table())
    tf.saved_model.save(model, path, signatures={"serving_default": model.serve})


@pytest.fixture(scope="module")
def table_model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("table") / "saved_model")
    export_table_model(path)
    return path


CROP, EVAL_RESIZE = 16, 20


def _coordinate_image(h, w):
    """Red = 8*row, green = 8*column: every pixel says where it came from."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy * 8, xx * 8, np.full_like(yy, 50)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def coded_dataset(tmp_path_factory):
    """A 3-class folders dataset whose 2 val images already have shorter side EVAL_RESIZE (no resampling)."""
    from data.sources.index import load_index
    root = tmp_path_factory.mktemp("coded")
    images = {"n00000001": _coordinate_image(EVAL_RESIZE, 28), "n00000002": _coordinate_image(30, EVAL_RESIZE)}
    for k in range(3):
        wnid = f"n{k:08d}"
        (root / "train" / wnid).mkdir(parents=True)
        Image.fromarray(_coordinate_image(24, 24)).save(root / "train" / wnid / "a.png")
        if wnid in images:
            (root / "val" / wnid).mkdir(parents=True)
            Image.fromarray(images[wnid]).save(root / "val" / wnid / "v.png")  # PNG: lossless
    return load_index(str(root), "val"), images


def write_eval_config(tmp_path, store):
    text = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.txt")).read()
    text = text.replace("path_to_save = ../demo_data/val_views", f"path_to_save = {store}")
    text = text.replace("path_for_saving = ../demo_runs", f"path_for_saving = {tmp_path / 'runs'}")
    text = text.replace("N = 0\n", "N = 5\n", 1)  # [preprocess_val] N: the store holds 2 -> a warning
    path = tmp_path / "eval.txt"
    path.write_text(text)
    return str(path)
