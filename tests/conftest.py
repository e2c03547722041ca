"""Shared fixtures of the test suite: the repository on sys.path, quiet TensorFlow, small generated datasets,
and one reference train.py run (built once per session, read by every test that needs a trained run or an
uninterrupted twin; never written to)."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from tests.helpers import (REFERENCE_BATCH, REFERENCE_EPOCHS, make_data, make_solid_dataset, run_path,  # noqa: E402
                           run_train, start_train_producer, stop_process, write_train_config)


@pytest.fixture(scope="module")
def solid_dataset(tmp_path_factory):
    return make_solid_dataset(str(tmp_path_factory.mktemp("solid")), per_class=8)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """make_data's set (4 classes x 32 training images, 2 validation images each); read only."""
    return make_data(str(tmp_path_factory.mktemp("tiny_data") / "imagenet"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_data):
    """write_train_config's settings ([train] deterministic = true) on tiny_data: producer and train.py, epochs
    0..REFERENCE_EPOCHS-1 at batch REFERENCE_BATCH, uninterrupted. {"config", "run", "stderr"}; read only."""
    config = write_train_config(str(tmp_path_factory.mktemp("reference")), tiny_data)
    producer = start_train_producer(config, 0, REFERENCE_EPOCHS, batch_size=REFERENCE_BATCH)
    try:
        result = run_train(config, "reference", 0, REFERENCE_EPOCHS, batch_size=REFERENCE_BATCH, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert producer.wait(timeout=60) == 0  # it exits once the trainer consumed the last batch
    finally:
        stop_process(producer)
    return {"config": config, "run": run_path(config, "reference"), "stderr": result.stderr}
