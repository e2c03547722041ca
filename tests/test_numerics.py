"""Numeric chaos: non-finite values injected into one replica are skipped on every replica, counted, and leave
no trace.

A small float16 run (the concatenating ResNet with batch renorm, width 0.0625, crop 16, batch 4, EMA on) on 2
logical CPU replicas under MirroredStrategy, with +inf put at seeded random global steps into the gradients of a
randomly chosen replica (each replica at least once: Keras' LossScaleOptimizer looked only at replica 0's own
gradients, so an overflow on replica 1 alone wrote -inf into the weights) and into the network input of one
replica (the forward overflow that used to poison every batch-renorm moving statistic). Afterwards:
- every weight, optimizer slot (and the loss scale), per-replica moving statistic and EMA variable is finite;
- the skipped steps are exactly the injected ones, and log.csv counts them;
- the run equals bit for bit its twin in which those steps are skipped by construction (the same hook
  forces the decision to "skip" with nothing non-finite in the step): so a skipped step changed no weight,
  slot, statistic or EMA value, and halved the loss scale exactly as the twin's;
- restoring the run's epoch-0 checkpoint and retraining epoch 1 gives the same variables bit for bit
  (SIGKILL durability is pinned by test_precision.py and test_chaos.py; here: the numeric state resumes).
The same over MultiWorkerMirroredStrategy with 2 worker processes on loopback: both finish (no hang at a
collective) and skip the same steps, the injected ones. And float32: a step with a non-finite loss is skipped
too (no loss scale), and max_skipped_steps in a row stop the run with the sentence; an epoch with a
non-finite variable is never saved.

Cost: the run, its twin and its resume are one trainer and one compiled step (the injection tables are
variables; the twin and the resume restart from checkpoints), the network is the smallest in the project
with batch renorm (15 renorm layers against ResNet-50's 53: tracing the 2-replica step dominates), and the
mirrored process and the two workers run side by side. `make test` runs 3 injections over 8 steps;
`make chaos` (CHAOS_LONG=1) >= 20 over 36 steps. CHAOS_SEED picks the schedule (default 1). The runs happen
in subprocesses (logical devices are set before TensorFlow initialises), which write a JSON summary.
"""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import PY, ROOT, free_ports, write_train_config

LONG = os.environ.get("CHAOS_LONG") == "1"
SEED = int(os.environ.get("CHAOS_SEED", "1"))
STEPS, EPOCHS, INJECTIONS = (12, 3, 24) if LONG else (4, 2, 3)
# Batch 4 (2 rows per replica) at width 0.0625: a float16 step on the CPU costs 0.13 s of CPU time here, 0.8 s at
# batch 8 and width 0.125 (float16 convolutions have no fast CPU kernels); tracing the step costs ~10 s either way.
BATCH, CLASSES, CROP = 4, 4, 16
NETWORK = {"arch": "concat_resnet", "normalization": "batch_renorm", "width_multiplier": "0.0625",
           "zero_init_last_gamma": "false"}


def schedule(total_steps, count, seed, replicas=2):
    """{"gradients": {step: replica}, "forward": {step: replica}} at `count` distinct seeded steps: at least one
    forward injection, gradient injections on every replica (so never on replica 0 alone)."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(total_steps), count))
    kinds = ["forward"] + [f"gradient{r}" for r in range(replicas)]
    kinds += [rng.choice(["forward", "gradient"]) for _ in range(count - len(kinds))]
    rng.shuffle(kinds)
    plan = {"gradients": {}, "forward": {}}
    for step, kind in zip(steps, kinds):
        if kind.startswith("gradient"):
            replica = int(kind[-1]) if kind[-1].isdigit() else rng.randrange(replicas)
            plan["gradients"][step] = replica
        else:
            plan["forward"][step] = rng.randrange(replicas)
    return plan


def run_script(*args, env=None, timeout=900):
    return subprocess.Popen([PY, "-m", "tests.test_numerics", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=900):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("a numerics run did not finish: a hang at a collective?") from None
    assert proc.returncode == 0, err[-3000:]


def start_workers(base):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    outs = [str(base / f"worker{i}.json") for i in range(2)]
    procs = [run_script(outs[i], "worker", env={"TF_CONFIG": json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}})}) for i in range(2)]
    return procs, outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The mirrored process and the two workers, started together (each spends most of its time in one
    thread: importing TensorFlow and tracing the step) and read once for every test below."""
    base = tmp_path_factory.mktemp("numerics")
    out = str(base / "mirrored.json")
    procs = [run_script(out, "mirrored")]
    workers, outs = start_workers(base)
    procs += workers
    try:
        for proc in procs:
            finish(proc, timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return json.load(open(out)), [json.load(open(o)) for o in outs]


@pytest.fixture(scope="module")
def mirrored(runs):
    return runs[0]


@pytest.fixture(scope="module")
def workers(runs):
    return runs[1]


def injected_steps(plan):
    return sorted(int(s) for kind in ("gradients", "forward") for s in plan[kind])


def test_the_schedule_injects_into_every_replica_and_the_forward_pass():
    plan = schedule(STEPS * EPOCHS, INJECTIONS, SEED)
    assert len(injected_steps(plan)) == INJECTIONS and plan["forward"]
    assert set(plan["gradients"].values()) == {0, 1}


def test_after_injections_on_any_replica_every_variable_is_finite(mirrored):
    assert mirrored["non_finite"] == [], mirrored["non_finite"][:5]
    assert mirrored["checked_variables"] > 100  # weights, slots, loss scale, per-replica statistics, EMA
    assert mirrored["statistics"] >= 4 * 15  # moving mean and std of 15 renorm layers, 2 replicas, net and EMA


def test_the_skipped_steps_are_exactly_the_injected_steps_on_every_replica(mirrored):
    plan = schedule(STEPS * EPOCHS, INJECTIONS, SEED)
    assert mirrored["skipped"] == injected_steps(plan)
    assert mirrored["csv_skipped"] == [sum(1 for s in injected_steps(plan) if s // STEPS == e)
                                       for e in range(EPOCHS)]
    assert mirrored["loss_scale"] == 2.0 ** 15 / 2 ** INJECTIONS  # halved once per skipped step, never grown


def test_a_run_with_injections_equals_its_twin_that_skips_the_same_steps_by_construction(mirrored):
    assert mirrored["compared"] > 100
    assert mirrored["twin_skipped"] == mirrored["skipped"]  # the twin's steps are finite: it skips by decision
    assert mirrored["traces"] == 1  # run, twin and resume share one compiled step: the tables are variables
    assert mirrored["differs_from_twin"] == []


def test_restoring_a_mid_run_checkpoint_of_an_injected_run_changes_nothing(mirrored):
    assert mirrored["differs_after_resume"] == []  # weights, slots, loss scale, EMA weights: bit for bit
    # Moving statistics have one copy per replica and a checkpoint holds their mean (tf.distribute's rule for
    # SyncOnRead variables), so a resumed run restarts both replicas from it: the mean then follows the same
    # path up to rounding (the update is linear). Measured: 2e-5 relative at most (near-zero means).
    gap, count = mirrored["statistics_after_resume"]
    assert count >= 2 * 15 and gap <= 1e-4, gap


def test_float32_skips_a_non_finite_step_without_a_loss_scale(mirrored):
    assert mirrored["float32_skipped"] == [1]  # after epoch 0; epoch 1 skips its first three steps and stops
    assert mirrored["float32_non_finite"] == []


def test_max_skipped_steps_in_a_row_stop_the_run_with_what_to_try(mirrored):
    message = mirrored["stop_sentence"]
    assert message.startswith(f"3 steps in a row were skipped since global step {STEPS} because their loss or "
                              "gradients were not finite ([train] max_skipped_steps = 3); the last finite loss "
                              "was "), message
    assert message.endswith(": lower the learning rate, set [train] mixed_precision = none, or start again."), \
        message  # no epoch folder saved yet: nothing to resume from


def test_an_epoch_with_a_non_finite_variable_is_not_saved(mirrored):
    assert mirrored["save_refused"].startswith("epoch 1 was not saved: 1 of ")
    assert "not finite (first " in mirrored["save_refused"] and "lower the learning rate" in mirrored["save_refused"]
    assert "; the last finite loss was " in mirrored["save_refused"]  # epoch 0 had finite steps
    assert mirrored["saved_folders"] == []


def test_two_workers_on_loopback_skip_the_same_injected_steps_without_hanging(workers):
    plan = schedule(STEPS * EPOCHS, INJECTIONS, SEED)
    assert workers[0]["skipped"] == workers[1]["skipped"] == injected_steps(plan)
    assert workers[0]["non_finite"] == workers[1]["non_finite"] == []
    assert workers[0]["weights"] == workers[1]["weights"]  # a checksum of every trainable variable


def test_ema_decay_1_without_warmup_is_refused_with_a_sentence(tmp_path):
    from utils.config import load_config
    from utils.errors import ConfigError
    path = write_train_config(str(tmp_path / "c"), str(tmp_path / "data"), train={"ema_decay": "1"})
    with pytest.raises(ConfigError, match=r"ema_decay = 1 without ema_warmup keeps the initial weights forever"):
        load_config(path)


# ----------------------------------------------------------------------------
# The subprocesses
# ----------------------------------------------------------------------------

class Reader:
    """Fixed seeded batches (this worker's rows of each global batch) in place of the buffer."""

    def __init__(self, steps, rows=slice(None)):
        from data.buffer.reader import Batch
        rng = np.random.default_rng(5)
        self.batches = []
        for b in range(steps):
            images = rng.integers(0, 256, (BATCH, CROP, CROP, 3), dtype=np.uint8)
            labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
            lighting = rng.normal(0, 0.1, (BATCH, 3)).astype(np.float32)
            self.batches.append(Batch(images[rows], labels[rows], lighting[rows], 0, b))

    @property
    def batches_per_epoch(self):
        return len(self.batches)

    def read(self, epoch, b):
        return self.batches[(epoch * 3 + b) % len(self.batches)]

    def report_progress(self, epoch, done):
        pass


def make_trainer(folder, inject=None, batch=BATCH, rows=slice(None), steps=STEPS, **train):
    from engine.trainer import Trainer
    from settings import load_settings
    values = {"mixed_precision": "mixed_float16", "distribute": "mirrored", "ema_decay": "0.5",
              "ema_warmup": "true", **{k: str(v) for k, v in train.items()}}
    config = write_train_config(folder, os.path.join(folder, "unused"), train=values, model=NETWORK,
                                images={"crop_size": str(CROP)})
    run = os.path.join(folder, "run")
    os.makedirs(run, exist_ok=True)
    return Trainer(load_settings(config).with_classes(CLASSES, "test"), Reader(steps, rows), run, batch,
                   inject=inject)


def state(trainer):
    """{name: array} of every variable the step can change, each replica's copy of the per-replica ones."""
    out = {}
    groups = {"net": trainer.net.variables, "opt": trainer.optimizer.variables,
              "ema": trainer.ema.net.variables if trainer.ema else []}
    for group, variables in groups.items():
        for i, v in enumerate(variables):
            copies = trainer.strategy.experimental_local_results(v)
            for r, c in enumerate(copies):
                out[f"{group}/{i}/{v.name}/{r}"] = np.asarray(c.numpy())
    return out


def non_finite(values):
    return sorted(k for k, a in values.items() if a.dtype.kind == "f" and not np.all(np.isfinite(a)))


def differing(a, b):
    assert sorted(a) == sorted(b)
    return sorted(k for k in a if not np.array_equal(a[k], b[k]))


def statistics(trainer):
    """The moving statistics (net and EMA), each read as its replicas' mean: what a checkpoint holds of a
    per-replica variable, and what a resumed run restarts every replica from."""
    nets = [trainer.net] + ([trainer.ema.net] if trainer.ema else [])
    return [v.numpy() for net in nets for v in net.statistics()]


def statistics_gap(a, b):
    """The largest relative difference between two lists of moving statistics, and how many there are."""
    return max(float(np.max(np.abs(x - y) / (np.abs(x) + 1e-6))) for x, y in zip(a, b)), len(a)


def mirrored_main(out, tmp):
    import csv
    from engine import run_folder
    from engine.numerics import Injection, SkipTracker
    from utils.errors import UserError
    plan = schedule(STEPS * EPOCHS, INJECTIONS, SEED)
    result = {}
    inject = Injection(steps=STEPS * EPOCHS)  # variables: the twin and the resume reuse the compiled step
    trainer = make_trainer(os.path.join(tmp, "injected"), inject)
    start, epoch0 = (run_folder.checkpoint_prefix(os.path.join(tmp, name)) for name in ("start", "epoch0"))
    trainer.checkpoint.write(start)
    limit = trainer.skips.limit

    def rerun(prefix, first_epoch, **tables):
        """Restore `prefix`, set the tables, train first_epoch .. EPOCHS - 1 without a log row."""
        trainer.checkpoint.read(prefix).assert_consumed()
        inject.plan(**tables)
        trainer.skips = SkipTracker(limit)
        for epoch in range(first_epoch, EPOCHS):
            trainer.train_epoch(epoch)
        return state(trainer)

    inject.plan(plan["gradients"], plan["forward"])
    for epoch in range(EPOCHS):
        summary = trainer.train_epoch(epoch)
        trainer.finish_epoch(epoch, summary)
        if epoch == 0:
            trainer.epoch_var.assign(0)
            trainer.checkpoint.write(epoch0)
    final, final_statistics = state(trainer), statistics(trainer)
    result.update(non_finite=non_finite(final), checked_variables=len(final),
                  statistics=sum("/moving_" in k for k in final), skipped=trainer.skips.skipped_steps,
                  loss_scale=float(trainer.optimizer.dynamic_scale.numpy()))
    with open(os.path.join(trainer.run_path, "log.csv")) as f:
        result["csv_skipped"] = [int(r["skipped_steps"]) for r in csv.DictReader(f)]

    twin = rerun(start, 0, skips=injected_steps(plan))
    result.update(compared=len(final), differs_from_twin=differing(final, twin),
                  twin_skipped=trainer.skips.skipped_steps)

    after_resume = rerun(epoch0, 1, gradients=plan["gradients"], forward=plan["forward"])
    moving = {k for k in final if "/moving_" in k}
    result["differs_after_resume"] = differing({k: final[k] for k in final if k not in moving},
                                               {k: after_resume[k] for k in final if k not in moving})
    result["statistics_after_resume"] = statistics_gap(final_statistics, statistics(trainer))
    result["traces"] = trainer.traces["train_step"]

    # float32 on one device: a non-finite step is skipped (epoch 0); three in a row stop the run (epoch 1).
    single = make_trainer(os.path.join(tmp, "float32"),
                          Injection(gradients={1: 0}, forward={s: 0 for s in range(STEPS, STEPS + 3)}),
                          mixed_precision="none", distribute="one_device", max_skipped_steps=3)
    single.train_epoch(0)
    result.update(float32_skipped=list(single.skips.skipped_steps), float32_non_finite=non_finite(state(single)))
    try:
        single.train_epoch(1)
        result["stop_sentence"] = ""
    except UserError as e:
        result["stop_sentence"] = str(e)
    single.net.trainable_variables[0].assign(single.net.trainable_variables[0] * np.nan)
    try:
        single.save(1)
        result["save_refused"] = ""
    except UserError as e:
        result["save_refused"] = str(e)
    result["saved_folders"] = run_folder.complete_epochs(single.run_path)
    with open(out, "w") as f:
        json.dump(result, f)


def worker_main(out, tmp):
    from engine.numerics import Injection
    from utils.processes import worker_info
    index, count = worker_info()
    plan = schedule(STEPS * EPOCHS, INJECTIONS, SEED)  # global replica r is worker r here
    per_worker = BATCH // count
    trainer = make_trainer(os.path.join(tmp, f"worker{index}"), Injection(plan["gradients"], plan["forward"]),
                           distribute="multi_worker", rows=slice(index * per_worker, (index + 1) * per_worker))
    for epoch in range(EPOCHS):
        trainer.train_epoch(epoch)
    final = state(trainer)
    weights = [float(np.sum(v.numpy(), dtype=np.float64)) for v in trainer.net.trainable_variables]
    with open(out, "w") as f:
        json.dump({"skipped": trainer.skips.skipped_steps, "non_finite": non_finite(final), "weights": weights}, f)


def main(out, mode):
    import logging
    import tempfile
    logging.basicConfig(level=logging.INFO)
    if mode == "mirrored":
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    with tempfile.TemporaryDirectory() as tmp:
        (mirrored_main if mode == "mirrored" else worker_main)(out, tmp)


if __name__ == "__main__":
    main(*sys.argv[1:3])
