"""MultiWorkerMirroredStrategy (2 local processes) matches one device. (MirroredStrategy on 2 logical CPUs is
pinned against one device in tests/test_trainer_step.py, a data step and a weight-decay step of the real
Trainer; as a third train.py run here it cost a quarter of this module's time.)

Both runs train one epoch on the same global batches (one prefilled buffer, copied per
run; each of the 2 workers, train.py processes, reads its own slice producer's buffer, rows [8w, 8w+8) of each
global batch of 16; the one-device reference is a Trainer in this process reading the whole global batches)
from the same seeded initialisation, with batch statistics synchronised across
replicas ([batch_renorm] sync_replicas), so the only differences are float rounding
(reduction order of the all-reduce and of the split batch moments). Tolerance: the
weight change during the epoch agrees to 1% overall, and each variable's change to
5% of its size plus 1e-5 (measured: about 1e-4 overall).

What this pins: the data part of synchronous SGD across replicas and workers: each replica's
row slice, the cross-entropy averaged over the global batch (a mean of per-replica means
summed over replicas is 100% off, a mean instead of a sum of gradients 50%), synchronised
batch statistics, and that only the chief writes the run folder. It does not pin the L2
term's scaling: with l2 = 1e-4 and lr 0.005 over 8 steps that term moves each weight by
about 4e-6 of itself, inside these tolerances even if doubled; tests/test_trainer_step.py
pins it on 1 and 2 replicas with the data gradient taken out.

The test network starts with zero last gammas: with the default init this
4-channel-wide ResNet-50 is so ill-conditioned that rounding differences between two
mathematically equal computations (even on one device: local vs synced batch
moments) grow to O(1) within three steps, at any learning rate.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from tests.helpers import (ROOT, TRAIN_BATCH, checkpoint_state, csv_rows, free_ports, read_checkpoint,
                           start_train_producer, train_cmd, write_train_config)


STEPS = 8
TOTAL_TOLERANCE, VARIABLE_TOLERANCE, FLOOR = 0.01, 0.05, 1e-5
SCHEDULE = {"type": "constant", "base_lr": "0.005", "warmup_epochs": "0"}



@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_data):
    base = tmp_path_factory.mktemp("dist")
    data = tiny_data
    buffers, producers = {}, {}
    for name, extra in (("whole", ()), ("slice0", ("--worker_index=0", "--worker_count=2")),
                        ("slice1", ("--worker_index=1", "--worker_count=2"))):
        prefill = write_train_config(str(base / name), data, batch_renorm={"sync_replicas": "true"},
                                     schedule=SCHEDULE, train={"buffer_size": str(STEPS)})
        producers[name] = start_train_producer(prefill, 0, 1, "--once", *extra)  # the three at once
        buffers[name] = os.path.join(os.path.dirname(prefill), "buffer")
    for producer in producers.values():
        _, err = producer.communicate(timeout=120)
        assert producer.returncode == 0, err[-2000:]

    def config_for(name, buffer="whole", **train):
        folder = str(base / name)
        os.makedirs(folder)
        shutil.copytree(buffers[buffer], os.path.join(folder, "buffer"))
        return write_train_config(folder, data, batch_renorm={"sync_replicas": "true"}, schedule=SCHEDULE,
                            train={"path_for_saving": str(base / "runs"), **train})
    return base, data, config_for


def one_device_epoch(config):
    """The reference, in this process: a one-device Trainer reads the whole buffer opened as train.py opens it
    (train.open_buffer: the manifest checked, its class count) and trains epoch 0. (As a third train.py it cost a
    TensorFlow import, a SavedModel export and a process: ~6 s of CPU, while the two workers need both cores.)
    Returns its checkpoint's values before and after the epoch, and the epoch's summary."""
    import types
    import train
    from engine.trainer import Trainer
    from settings import load_settings
    settings = load_settings(config, decoder=False, devices=True, batch_size=TRAIN_BATCH)
    settings, reader = train.open_buffer(settings, types.SimpleNamespace(batch_size=TRAIN_BATCH, epoch_start=0,
                                                                        epoch_end=1))
    folder = os.path.dirname(config)
    os.makedirs(os.path.join(folder, "run"))
    trainer = Trainer(settings, reader, os.path.join(folder, "run"), TRAIN_BATCH)
    try:
        init = checkpoint_state(trainer, os.path.join(folder, "init", "ckpt"))
        summary = trainer.train_epoch(0)
    finally:
        trainer.batch_log.close()
        trainer.tensorboard.close()
    return init, checkpoint_state(trainer, os.path.join(folder, "final", "ckpt")), summary


def model_weights(weights):
    return {k: v for k, v in weights.items() if k.startswith("model/")}


def assert_same_training(init, single, other):
    """The change of every variable during the epoch agrees (a mean instead of a sum of gradients: 50% off)."""
    assert sorted(single) == sorted(other)
    assert int(other["model/train_step/.ATTRIBUTES/VARIABLE_VALUE"]) == STEPS
    diff2 = size2 = 0.0
    bad = {}
    for key, value in single.items():
        if key in init and value.dtype.kind == "f":
            delta, delta_other = value - init[key], other[key] - init[key]
            d, s = np.linalg.norm(delta_other - delta), np.linalg.norm(delta)
            diff2, size2 = diff2 + d * d, size2 + s * s
            if d > VARIABLE_TOLERANCE * s + FLOOR:
                bad[key] = (float(d), float(s))
    assert size2 > 0 and not bad, bad
    assert np.sqrt(diff2 / size2) <= TOTAL_TOLERANCE, np.sqrt(diff2 / size2)


@pytest.fixture(scope="module")
def trained(setup):
    """One epoch each: the 2 workers (train.py processes) and the one-device reference (in this process), all at
    once."""
    base, _, config_for = setup
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    jobs = {}
    for index in range(2):
        config = config_for(f"worker{index}", f"slice{index}", distribute="multi_worker")
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        jobs[f"worker{index}"] = (train_cmd(config, "multi", 0, 1), {"TF_CONFIG": tf_config})
    single = config_for("single", distribute="one_device")
    logs = {name: os.path.join(str(base), f"{name}.stderr") for name in jobs}
    procs = {}
    try:
        for name, (cmd, env) in jobs.items():
            with open(logs[name], "w") as err:  # files, not pipes: a full pipe would stall a worker and its peer
                procs[name] = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env},
                                               stdout=subprocess.DEVNULL, stderr=err)
        init, reference, summary = one_device_epoch(single)
        for proc in procs.values():
            proc.wait(timeout=300)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    errors = {name: open(path).read() for name, path in logs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {errors[name][-3000:]}"
    return base, errors, model_weights(init), model_weights(reference), summary


def test_multi_worker_on_two_local_processes_matches_one_device(trained):
    base, errors, init, single, summary = trained
    assert "global batch 16 on 2 replica(s)" in errors["worker0"]
    # Only the chief (worker 0) writes the run folder.
    assert sorted(os.listdir(os.path.join(str(base), "runs", "multi"))) == ["0", "batches.log", "log.csv",
                                                                              "tensorboard", "train.lock",
                                                                              "train.log"]
    assert sorted(os.listdir(os.path.join(str(base), "runs", "multi", "0"))) == ["checkpoint", "config.txt",
                                                                                   "saved_model"]
    multi = model_weights(read_checkpoint(os.path.join(str(base), "runs", "multi", "0", "checkpoint", "ckpt")))
    assert_same_training(init, single, multi)
    # Each worker reads only its 8 rows, but loss and top-1 are over the global batch, as on one device.
    row = csv_rows(os.path.join(str(base), "runs", "multi"))[0]
    for key in ("train_loss", "train_top1"):
        assert abs(float(row[key]) - summary[key]) <= 1e-3 * abs(summary[key]), key


def test_batch_not_divisible_by_replicas_is_a_clear_error():
    from engine.distribute import check_divisible
    from utils.errors import UserError
    assert check_divisible(64, 4) == 16
    with pytest.raises(UserError, match="--batch_size 30 is not divisible by the 4 replicas"):
        check_divisible(30, 4)


def test_worker_info_reads_tf_config(monkeypatch):
    from engine.distribute import worker_info
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert worker_info() == (0, 1)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2", "c:3"]},
                                                "task": {"type": "worker", "index": 2}}))
    assert worker_info() == (2, 3)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert worker_info() == (1, 2)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    from utils.errors import UserError
    with pytest.raises(UserError, match="TF_CONFIG"):
        worker_info()
