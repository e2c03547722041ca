"""In-process trainers over a fake buffer (shared by tests/test_recipe.py and tests/test_accumulation.py; beside
tests/helpers.py, which holds the other shared helpers, to keep each module small)."""
import os

import numpy as np

from data.buffer.reader import Batch
from settings import load_settings
from tests.helpers import write_train_config


class FakeReader:
    """A fixed set of random batches in place of the buffer."""

    def __init__(self, steps=2, batch=8, crop=32, classes=4):
        rng = np.random.default_rng(11)
        self.batches = [Batch(images=rng.integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8),
                              labels=rng.integers(0, classes, batch).astype(np.int32),
                              lighting=rng.normal(0, 0.1, (batch, 3)).astype(np.float32), epoch=0, batch=b)
                        for b in range(steps)]

    @property
    def batches_per_epoch(self):
        return len(self.batches)

    def read(self, epoch, b):
        return self.batches[(epoch + b) % len(self.batches)]

    def report_progress(self, epoch, done):
        pass


def make_trainer(tmp_path, run, reader=None, inject=None, **train):
    """An in-process Trainer on one device over a FakeReader (2 batches of 8 unless given), [train] overrides."""
    from engine.trainer import Trainer  # loads TensorFlow: only in the tests that train
    folder = tmp_path / run
    folder.mkdir()
    config = write_train_config(str(folder), str(tmp_path / "unused"), train={k: str(v) for k, v in train.items()})
    run_path = str(folder / "run")
    os.makedirs(run_path)
    reader = reader or FakeReader()
    return Trainer(load_settings(config).with_classes(4, "test"), reader, run_path,
                   batch_size=reader.batches[0].images.shape[0], inject=inject)
