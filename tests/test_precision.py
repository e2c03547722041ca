"""[train] mixed_precision = auto, float16 and XLA runs that are resumed, the profiler trace, and the batch
placed on the training device by the prefetch thread.

Each twin pair trains 3 epochs of 4 fixed batches in this process with a 4-channel-wide ResNet-50: one
Trainer uninterrupted, then the same Trainer resumed from its epoch-0 checkpoint (one compiled step per
precision). The resumed final checkpoint (weights, batch-renorm statistics, momentum slots, the loss scale
and its counter of good steps) must equal the uninterrupted one. (As train.py subprocesses with producers and a SIGKILL mid-save, the pair
took 150 s; the kill and train.py's resume are proven once, in float32, by tests/test_train.py.)
"""
import contextlib
import os

import numpy as np
import pytest

from settings.devices import resolve_mixed_precision
from tests.fake_trainer import FakeReader, make_trainer
from tests.helpers import checkpoint_state, read_checkpoint, without_op_determinism, write_train_config

A100 = {"device_name": "NVIDIA A100-SXM4-40GB", "compute_capability": (8, 0)}
P100 = {"device_name": "Tesla P100-PCIE-16GB", "compute_capability": (6, 0)}


# ----------------------------------------------------------------------------
# auto
# ----------------------------------------------------------------------------

def test_auto_is_float32_on_this_cpu():
    assert resolve_mixed_precision("auto") == ("none", "auto: no GPU")


def test_auto_is_mixed_float16_on_a_tensor_core_gpu_from_the_device_query(monkeypatch):
    import tensorflow as tf
    gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [gpu] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: dict(A100))
    policy, reason = resolve_mixed_precision("auto")
    assert policy == "mixed_float16"
    assert "NVIDIA A100" in reason and "compute capability 8.0" in reason


def test_auto_is_float32_on_pre_volta_gpus_and_gpus_without_cuda_capability():
    assert resolve_mixed_precision("auto", [P100])[0] == "none"
    assert resolve_mixed_precision("auto", [{"device_name": "AMD Instinct MI100"}])[0] == "none"
    assert resolve_mixed_precision("auto", [A100, P100])[0] == "none"  # every replica must have tensor cores
    assert resolve_mixed_precision("auto", [{"compute_capability": (7, 0)}])[0] == "mixed_float16"  # V100


def test_explicit_choices_are_kept_whatever_the_device():
    for choice in ("none", "mixed_float16", "mixed_bfloat16"):
        assert resolve_mixed_precision(choice, [A100]) == (choice, "set in the config")
        assert resolve_mixed_precision(choice, [])[0] == choice


def test_auto_is_the_default_and_in_every_shipped_config(tmp_path):
    from utils.schema import SCHEMA
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert SCHEMA["train"]["mixed_precision"].default == "auto"
    for name in ("config.txt", "configs/demo.txt", "configs/seed002_tiny_imagenet.txt", "configs/seed003_recipe.txt"):
        assert "\nmixed_precision = auto\n" in open(os.path.join(root, name)).read(), name


def test_profile_steps_must_be_two_increasing_steps(tmp_path):
    from settings import load_settings
    from utils.errors import ConfigError
    data = str(tmp_path / "data")
    for bad in ("5", "10, 5", "1, 2, 3"):
        with pytest.raises(ConfigError, match=r"profile_steps must be two global steps"):
            load_settings(write_train_config(str(tmp_path / "c"), data, train={"profile_steps": bad}))
    assert load_settings(write_train_config(str(tmp_path / "c"), data, train={"profile_steps": "2, 4"})
                             ).train.profile_steps == (2, 4)


# ----------------------------------------------------------------------------
# The batch on the training device
# ----------------------------------------------------------------------------

def test_the_prefetch_thread_turns_each_batch_into_tensors_itself():
    # On a CPU every tensor is on CPU:0 whatever to_device does: this pins the thread and the conversion only.
    import threading

    import tensorflow as tf

    from data.buffer.reader import Batch
    from engine.trainer import Trainer, batch_prefetcher

    class Reader:
        def read(self, epoch, b):
            return Batch(np.full([2, 4, 4, 3], b, np.uint8), np.array([b, b], np.int32),
                         np.zeros([2, 3], np.float32), epoch, b)

    threads = []

    def place(batch):
        threads.append(threading.current_thread().name)
        return Trainer.to_device(trainer, batch)

    trainer = type("T", (), {"tf": tf, "input_device": "/job:localhost/replica:0/task:0/device:CPU:0"})()
    prefetch = batch_prefetcher(Reader(), 0, 3, place=place)
    try:
        for expected in range(3):
            (b, batch), _ = prefetch.get()
            assert b == expected
            assert isinstance(batch.images, tf.Tensor) and batch.images.device.endswith("device:CPU:0")
            assert int(batch.labels[0]) == expected and batch.images.dtype == tf.uint8
    finally:
        prefetch.close()
    assert threads == ["prefetch-epoch-0"] * 3


# ----------------------------------------------------------------------------
# Resume in float16, with and without XLA
# ----------------------------------------------------------------------------

EPOCHS = 3
STEPS = 4  # FakeReader batches per epoch

TWINS = {
    # deterministic ops: the resumed run must equal the whole one bit for bit; the whole run also writes
    # a profiler trace of steps 2..3
    "float16": {"mixed_precision": "mixed_float16", "deterministic": "true", "profile_steps": "2, 3"},
    # XLA has no deterministic mode (the trainer refuses the pair); on the CPU its kernels are
    # deterministic anyway
    "float16_xla": {"mixed_precision": "mixed_float16", "jit_compile": "true", "deterministic": "false"},
}


@pytest.fixture(scope="module", params=sorted(TWINS))
def twins(request, tmp_path_factory):
    """In-process, the way tests/test_numerics.py resumes: one Trainer trains epochs 0..2 uninterrupted (its
    final state is the reference), then restores its own epoch-0 checkpoint with Trainer.restore (which asserts
    every checkpointed value found its variable) and trains epochs 1..2 again. One Trainer is one compiled step:
    a second Trainer cost 3 s of CPU in float16 and 16 s with XLA (its compile; the 12 steps cost 0.4 s). The
    rerun starts from the end of epoch 2, where every weight, statistic, slot and the loss scale's good-step
    counter differ from their epoch-0 values, so any of them the restore missed shows.
    That a SIGKILL mid-save leaves epoch 0's checkpoint whole and a fresh train.py resumes from it is proven in
    float32 by tests/test_train.py; what these pin is that the float16 state (the loss scale and its counter of
    good steps) round-trips."""
    from engine import run_folder
    train = TWINS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    # Op determinism is process-wide and has no public switch off: a deterministic Trainer built earlier in
    # this pytest process would make XLA refuse the max-pool gradient. Off for the XLA pair, then as it was.
    with contextlib.ExitStack() as stack:
        if train["deterministic"] == "false":
            stack.enter_context(without_op_determinism())
        trainer = make_trainer(tmp, "run", reader=FakeReader(STEPS), **train)
        prefix = run_folder.checkpoint_prefix(str(tmp / "epoch0"))
        for epoch in range(EPOCHS):
            trainer.train_epoch(epoch)
            if epoch == 0:
                trainer.epoch_var.assign(0)
                trainer.checkpoint.write(prefix)
        trainer.profiler.close()
        trainer.epoch_var.assign(EPOCHS - 1)
        whole = checkpoint_state(trainer, str(tmp / "final_whole" / "ckpt"))
        epoch0 = read_checkpoint(prefix)
        trainer.restore(prefix, expected_epoch=0)
        for epoch in range(1, EPOCHS):
            trainer.train_epoch(epoch)
        trainer.epoch_var.assign(EPOCHS - 1)
        resumed = checkpoint_state(trainer, str(tmp / "final_resumed" / "ckpt"))
    yield {"name": request.param, "trainer": trainer, "epoch0": epoch0, "a": whole, "b": resumed}


def test_float16_run_resumed_equals_its_uninterrupted_twin_with_the_loss_scale(twins):
    reference, resumed = twins["a"], twins["b"]
    assert sorted(reference) == sorted(resumed)
    loss_scale = [k for k in reference if "dynamic_scale" in k or "step_counter" in k]
    assert len(loss_scale) == 2, sorted(reference)  # Keras 3 LossScaleOptimizer: scale and good-step counter
    assert any(reference[k].ndim == 4 and reference[k].any() for k in reference if "_variables/" in k)  # momentum
    for key in reference:
        # assert_array_equal treats NaN as equal to NaN: two runs that both went NaN must not pass.
        assert np.all(np.isfinite(reference[key])) if reference[key].dtype.kind == "f" else True, key
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
    assert int(reference["model/train_step/.ATTRIBUTES/VARIABLE_VALUE"]) == EPOCHS * STEPS
    assert twins["trainer"].traces["train_step"] == 1  # the restore changed values, not the compiled step
    # The rerun started from the end of epoch 2: a value the restore missed would differ. Only optimizer scalars
    # may have stayed (constant learning rate, the loss scale without an overflow); the good-step counter moved.
    unchanged = [k for k in reference if np.array_equal(reference[k], twins["epoch0"][k])]
    assert all(k.startswith("optimizer/") and reference[k].ndim == 0 for k in unchanged), unchanged
    assert not any(k in unchanged for k in loss_scale if "step_counter" in k)


def test_the_resolved_precision_is_in_the_start_up_line_and_each_epochs_config(twins):
    import dataclasses
    from engine import recipe_line
    trainer = twins["trainer"]
    assert "mixed_precision mixed_float16 (set in the config)" in recipe_line.features(
        dataclasses.asdict(trainer.settings.train), trainer.precision_reason)
    for epoch in range(EPOCHS):
        assert "mixed_precision = mixed_float16\n" in trainer.config_text(epoch)


def test_profile_steps_write_a_trace_into_the_runs_tensorboard_folder(twins):
    run = twins["trainer"].run_path
    traces = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(run, "tensorboard")) for f in files
              if f.endswith(".xplane.pb")]
    if twins["name"] == "float16":  # steps 2..3: one trace, not another when the resumed epochs pass them again
        assert len(traces) == 1
        assert traces[0].startswith(os.path.join(run, "tensorboard", "plugins", "profile"))
        assert os.path.getsize(traces[0]) > 0
    else:
        assert traces == []
