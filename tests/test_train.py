"""train.py end to end with the real producer as a separate process, on the session's tiny generated dataset.

The session's reference run (tests/conftest.py) is the uninterrupted one. Run B, with the same settings and
epochs 0..1, is SIGKILLed while it saves epoch 1 and then resumed with --epoch_start=auto against its still running
producer: its epoch 1 weights and optimizer state must equal the reference's bit for bit ([train] deterministic =
true). The resumed process trains epoch 1 from epoch 0's checkpoint; a further epoch would add a save, not a check.
"""
import os
import subprocess

import numpy as np
import pytest

from tests.helpers import (REFERENCE_BATCH as BATCH, REFERENCE_EPOCHS as EPOCHS, REFERENCE_STEPS as STEPS, ROOT,
                           csv_rows, fake_parts, kill_while_saving, read_checkpoint, run_path, run_train,
                           start_train_producer, stop_process, train_cmd, write_train_config)

B_EPOCHS = 2  # run B: epoch 0 kept, epoch 1 killed while saving and trained again by the resume


# ----------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_data):
    """Run B: the reference run's settings, epochs 0..1, SIGKILLed while it saves epoch 1; its producer (epochs
    0..EPOCHS-1, so it does not finish with run B's last batch) keeps running for the resume until the module ends."""
    config = write_train_config(str(tmp_path_factory.mktemp("b")), tiny_data)
    producer = start_train_producer(config, 0, EPOCHS, batch_size=BATCH)
    try:
        trainer = subprocess.Popen(train_cmd(config, "B", 0, B_EPOCHS, batch_size=BATCH), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed = kill_while_saving(trainer, run_path(config, "B"), 1, timeout=600)
        yield {"config": config, "killed": killed, "producer": producer}
    finally:
        stop_process(producer)


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------

def test_real_run_saves_complete_epochs_and_logs(reference_run):
    run = reference_run["run"]
    for epoch in range(EPOCHS):
        folder = os.path.join(run, str(epoch))
        assert sorted(os.listdir(folder)) == ["checkpoint", "config.txt", "saved_model"]
        text = open(os.path.join(folder, "config.txt")).read()
        assert "# git " in text and "[schedule]" in text and f"global step {(epoch + 1) * STEPS}" in text
        # [train] mixed_precision = auto (configs/demo.txt) as resolved on this CPU.
        assert "mixed_precision = none\n" in text and "# mixed_precision none (auto: no GPU)" in text
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]

    rows = csv_rows(run)
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    assert [int(r["steps"]) for r in rows] == [STEPS * (e + 1) for e in range(EPOCHS)]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    for r in rows:
        assert float(r["lr"]) == pytest.approx(0.005)
        wall, wait = float(r["wall_seconds"]), float(r["wait_seconds"])
        assert 0 <= wait < wall and float(r["wait_fraction"]) == pytest.approx(wait / wall, rel=1e-3, abs=1e-4)
        assert float(r["images_per_sec"]) == pytest.approx(STEPS * BATCH / wall, rel=1e-3)

    lines = open(os.path.join(run, "batches.log")).read().split("\n")[:-1]
    assert lines == [f"{e} {b}" for e in range(EPOCHS) for b in range(STEPS)]

    from engine.logs import read_scalars
    scalars = read_scalars(run)
    for tag in ("train/loss", "train/l2_loss", "train/learning_rate", "train/rmax", "train/dmax",
                "train/images_per_sec", "train/buffer_wait_fraction", "epoch/train_loss", "epoch/wait_fraction"):
        assert tag in scalars, sorted(scalars)
    assert [s for s, _ in scalars["epoch/train_loss"]] == [STEPS * (e + 1) for e in range(EPOCHS)]

    # The SavedModel runs without this project's code: uint8 images in, probabilities out.
    import tensorflow as tf
    loaded = tf.saved_model.load(os.path.join(run, str(EPOCHS - 1), "saved_model"))
    out = loaded.signatures["serving_default"](images=tf.zeros([2, 32, 32, 3], tf.uint8))
    assert out["probabilities"].shape == (2, 4)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_sigkill_mid_save_keeps_the_previous_epoch_and_resume_equals_uninterrupted(killed, reference_run):
    config = killed["config"]
    run = run_path(config, "B")
    assert killed["killed"], "the trainer ended before it saved epoch 1"
    assert not os.path.exists(os.path.join(run, "1"))
    from engine import run_folder
    assert run_folder.complete_epochs(run) == [0]
    weights = read_checkpoint(run_folder.checkpoint_prefix(os.path.join(run, "0")))
    assert int(weights["model/train_step/.ATTRIBUTES/VARIABLE_VALUE"]) == STEPS
    import tensorflow as tf
    tf.saved_model.load(os.path.join(run, "0", "saved_model"))

    # The producer is still running: the resumed trainer re-reads epoch 1 from batch 0.
    assert killed["producer"].poll() is None
    result = run_train(config, "B", "auto", B_EPOCHS, batch_size=BATCH, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "epoch 0 done" in result.stderr
    assert run_folder.complete_epochs(run) == list(range(B_EPOCHS))
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]

    reference = read_checkpoint(run_folder.checkpoint_prefix(os.path.join(reference_run["run"], "1")))
    resumed = read_checkpoint(run_folder.checkpoint_prefix(os.path.join(run, "1")))
    assert sorted(reference) == sorted(resumed)
    # Momentum slots (conv-kernel shaped) are part of the comparison, not only the weights.
    assert any(k.startswith("optimizer/_variables/") and reference[k].ndim == 4 and reference[k].any()
               for k in reference)
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
    assert [r["train_loss"] for r in csv_rows(run)] == [r["train_loss"] for r in csv_rows(reference_run["run"])][:2]
    # The batch log shows epoch 1 twice: trained, killed while saving, trained again.
    lines = open(os.path.join(run, "batches.log")).read().split("\n")[:-1]
    assert lines == [f"{e} {b}" for e in (0, 1, 1) for b in range(STEPS)]


def test_existing_epoch_folders_are_refused_unless_overwrite(reference_run):
    config = reference_run["config"]
    result = run_train(config, "reference", 0, 2, batch_size=BATCH, timeout=120)
    assert result.returncode == 2
    assert "already holds epoch folder(s) 0, 1" in result.stderr and "--overwrite" in result.stderr
    result = run_train(config, "reference", 5, 6, batch_size=BATCH, timeout=120)
    assert result.returncode == 2 and "cannot resume at epoch 5" in result.stderr
    assert "the last complete epoch is 2" in result.stderr


# ----------------------------------------------------------------------------
# Run folder and log helpers (no TensorFlow)
# ----------------------------------------------------------------------------

def test_epoch_folders_appear_whole_and_auto_start_follows_complete_ones(tmp_path):
    from engine import run_folder
    from utils.errors import UserError
    run = str(tmp_path / "run")
    assert run_folder.resolve_epoch_start(run, "auto") == 0
    run_folder.save_epoch(run, 0, fake_parts)
    os.makedirs(os.path.join(run, "1", "saved_model"))  # incomplete: no checkpoint, no config
    os.makedirs(os.path.join(run, ".tmp-2-123-abc"))     # a killed save
    assert run_folder.complete_epochs(run) == [0]
    assert run_folder.resolve_epoch_start(run, "auto") == 1

    def failing(folder):
        fake_parts(folder)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_folder.save_epoch(run, 3, failing)
    assert sorted(os.listdir(run)) == [".tmp-2-123-abc", "0", "1"]

    with pytest.raises(UserError, match="already holds epoch folder"):
        run_folder.check_plan(run, 0, 2, overwrite=False)
    with pytest.raises(UserError, match="cannot resume at epoch 3.*last complete epoch is 0"):
        run_folder.check_plan(run, 3, 4, overwrite=False)
    with run_folder.locked(run):  # stale temps go; a second trainer is refused
        assert ".tmp-2-123-abc" not in os.listdir(run)
        with pytest.raises(UserError, match="another train.py"):
            with run_folder.locked(run):
                pass
    run_folder.save_epoch(run, 0, lambda f: (fake_parts(f), open(os.path.join(f, "new"), "w").close()),
                          overwrite=True)
    assert "new" in os.listdir(os.path.join(run, "0"))
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]


def test_epoch_csv_row_replaces_its_epoch_and_drops_later_ones(tmp_path):
    from engine import logs
    run = str(tmp_path)
    row = {k: 0 for k in logs.CSV_FIELDS}
    for epoch in range(4):
        logs.write_epoch_row(run, {**row, "epoch": epoch, "train_loss": 1.0})
    logs.write_epoch_row(run, {**row, "epoch": 2, "train_loss": 0.5})  # a resume from epoch 1's checkpoint
    rows = logs.read_csv(run)
    assert [(r["epoch"], r["train_loss"]) for r in rows] == [("0", "1"), ("1", "1"), ("2", "0.5")]


def test_the_epoch_names_its_bottleneck_from_the_wait_and_the_producers_heartbeat():
    from engine.logs import bottleneck
    auto = {"workers": 1, "max_workers": 1, "build_rate": 250.0,
            "sizing": "num_of_threads = auto: 2 cores it may use, one left for the trainer: at most 1"}
    assert bottleneck(0.05, auto) == ("compute-bound", None)
    word, advice = bottleneck(0.2, auto)
    assert word == "input-bound at core limit"
    assert "runs all the workers it may (1, 250 img/s" in advice and "give it more cores" in advice
    word, advice = bottleneck(0.2, {**auto, "max_workers": 7})
    assert word == "input-bound below core limit" and "ran 1 of at most 7 workers" in advice
    assert "RAM disk" in advice
    word, advice = bottleneck(0.2, {"workers": 3, "max_workers": 3, "sizing": "num_of_threads = 3"})
    assert word == "input-bound at core limit" and "raise num_of_threads" in advice
    word, advice = bottleneck(0.2, None)
    assert word == "input-bound" and "raise [runtime_preprocessing] num_of_threads" in advice
