"""Fault injection over the whole pipeline, the way storage and database projects test themselves.

The chaos test runs the demo-scale pipeline (tools/launch.py with runtime_preprocessing.py and train.py, and
check_accuracy.py alongside) on a tiny generated solid_dataset and SIGKILLs the producer, the trainer and the
evaluator at seeded random moments. Each comes back as a user would bring it back, with --epoch_start=auto: the
launcher restarts a dead producer itself; a killed trainer ends the launcher, which is started again; a killed
evaluator is started again. Afterwards, against an uninterrupted twin run ([train] deterministic = true):
- every epoch folder is complete and its SavedModel loads and runs;
- batches.log, read as the trainer's timeline (surviving_batches), trained each batch of every
  epoch exactly once and in order;
- every epoch's checkpoint (weights, batch-renorm statistics, momentum slots, step counter) and
  log.csv's losses equal the twin's bit for bit;
- no temp file and no half-written batch is left in the buffer or the run folder;
- accuracy.csv holds exactly one row per epoch.

A producer with num_of_threads = auto is also SIGKILLed while it adds and while it retires a worker
(2 kills in `make test`, 8 in `make chaos`), with the same checks on the batches the trainer reads.

`make test` runs the short version (4 kills, one of each kind at least); `make chaos` (CHAOS_LONG=1) the
long one (>= 20 kills). CHAOS_SEED picks the schedule (default 1); every kill is printed and logged to
<tmp>/chaos.log with what the victim was doing. The start-order tests are in test_start_order.py.
"""
import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from settings import load_settings
from utils.errors import UserError
from utils.files import TMP_PREFIX, is_temp_name
from data.buffer import files, protocol, reader as buffer_reader
from tests.helpers import (REFERENCE_BATCH, REFERENCE_EPOCHS, SOLID_BATCH, complete_count, script_pid,
                           producer_cmd, read_checkpoint, read_in_sizing_cycles, reference_builder, solid_config_for,
                           stop_process, surviving_batches, with_cores,
                           write_train_config)

pytestmark = pytest.mark.chaos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
LONG = os.environ.get("CHAOS_LONG") == "1"
SEED = int(os.environ.get("CHAOS_SEED", "1"))
EPOCHS = 12 if LONG else 3
KILLS = 40 if LONG else 4  # planned; the run ends when training and evaluation are done
MIN_KILLS = 20 if LONG else 4
GAP = (0.3, 2.0) if LONG else (0.5, 1.5)  # seconds from a kill to aiming at the next, uniform (see SHORT_PLAN)
WEIGHTS = {"trainer": 0.5, "producer": 0.3, "evaluator": 0.2}  # a trainer kill also makes the run last longer
BATCH = 8
STEPS = 16  # 4 classes x 32 images / BATCH
DEADLINE = 1800 if LONG else 900  # a guard only: each process exits by itself (measured ~60 s for 3 epochs idle)


# ----------------------------------------------------------------------------
# A producer sizing itself (num_of_threads = auto), killed while it adds or retires a worker
# ----------------------------------------------------------------------------

def test_sigkill_while_a_worker_is_added_or_retired_loses_and_repeats_nothing(solid_dataset, tmp_path):  # noqa: F811
    """num_of_threads = auto on 4 (patched) cores: the producer is SIGKILLed the moment it logs a change of
    worker count (while it forks the new worker, or while the retired one finishes its tasks), alternately
    an add and a retire, and restarted with --epoch_start=auto. The trainer reads every batch once, in
    order, byte-identical to the reference; nothing half-written is left."""
    kills = 8 if LONG else 2
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "6", "wait_timeout": "60"},
                              runtime_preprocessing={"num_of_threads": "auto", "sizing_window": "0.1"})
    cfg = load_settings(config)
    folder = cfg.train.buffer_folder
    # The reader cycles (reads greedily until an add, pauses until a retire) until the kills are done, then
    # reads to the end. The kills took up to 82 positions for 2 and 115 for 8 here (restarts, sizing
    # windows), so 50 positions per kill plus 100 leave a margin.
    epochs = 10 + 5 * kills
    argv = with_cores(4, producer_cmd(config, epoch_start="auto", epoch_end=str(epochs)))
    builder = reference_builder(config)
    done, errors, starts, lines = [], [], [0], []
    stopping = threading.Event()
    proc = [None]

    def keep_producer():  # kills at the change lines, restarts after each kill
        try:
            while not stopping.is_set():
                starts[0] += 1
                proc[0] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for line in proc[0].stderr:
                    lines.append(line)
                    want = "add" if len(done) % 2 == 0 else "retire"
                    if len(done) < kills and " workers: " in line:
                        before, after = (int(n) for n in line.split(" workers: ")[1].split(":")[0].split(" -> "))
                        if (after > before) == (want == "add"):
                            proc[0].kill()
                            done.append((want, line.split(" INFO ")[-1].strip()))
                            break
                if proc[0].wait() == 0:
                    return
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
    keeper = threading.Thread(target=keep_producer)
    keeper.start()

    read, cycled = [], [0]  # the batches as read; positions read until the last kill

    def keep(epoch, b, batch):  # checked after the run: a reader as fast as can be starves the producer, so it adds
        read.append((epoch, b, batch))
        cycled[0] += len(done) < kills
    try:
        try:
            read_in_sizing_cycles(buffer_reader.BufferReader(cfg, SOLID_BATCH), 10 * epochs, keep, folder,
                                  until=lambda: len(done) == kills)
        except (AssertionError, UserError) as e:
            raise AssertionError(f"{e}; kills {done}; the producers' last lines:\n{''.join(lines[-20:])}") from e
        keeper.join(60)
    finally:
        stopping.set()
        if proc[0] is not None:
            stop_process(proc[0])
        keeper.join(30)
    assert not errors, errors
    assert len(done) == kills, f"{len(done)} of {kills} kills in {10 * epochs} positions: {done}"
    assert [kind for kind, _ in done] == ["add", "retire"] * (kills // 2), done
    assert starts[0] == kills + 1
    assert [n for n in os.listdir(folder) if is_temp_name(n)] == []
    assert files.scan_batches(folder) == (set(), set())  # all consumed and deleted, none half-written
    assert [(epoch, b) for epoch, b, _ in read] == [divmod(lin, 10) for lin in range(10 * epochs)]
    for epoch, b, batch in read:
        images, labels, lighting = builder.build(epoch, b)
        assert np.array_equal(batch.images, images) and np.array_equal(batch.labels, labels), (epoch, b)
        assert np.array_equal(batch.lighting, lighting), (epoch, b)
    print(f"{kills} kills within the first {cycled[0]} of {10 * epochs} positions, killed at: " +
          "; ".join(line for _, line in done))


# ----------------------------------------------------------------------------
# The chaos run
# ----------------------------------------------------------------------------

class Pipeline:
    """One run: the launcher (producer + trainer) and check_accuracy.py, each restarted with 'auto' after a kill."""

    def __init__(self, config, run, folder, evaluate=True):
        self.config, self.run, self.evaluate = config, run, evaluate
        cfg = load_settings(config)
        self.run_path = os.path.join(cfg.train.path_for_saving, run)
        self.buffer, self.buffer_size = cfg.train.buffer_folder, cfg.train.buffer_size
        self.out = open(os.path.join(folder, f"{run}.out"), "ab")
        self.launcher = self.evaluator = None
        self.trained, self.evaluated = False, not evaluate
        self.expected_exits = {"launcher": 0, "evaluator": 0}
        self.starts = collections.Counter()

    def _popen(self, argv):
        self.out.write(f"\n$ {' '.join(argv[1:])}\n".encode())
        self.out.flush()
        return subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)

    def start(self, name):
        setattr(self, name, self._popen(self._launch_argv("0") if name == "launcher" else self._evaluate_argv()))
        self.starts[name] += 1

    def _launch_argv(self, epoch_start):
        return [PY, os.path.join(ROOT, "tools", "launch.py"), f"--config={self.config}", f"--run_folder={self.run}",
                f"--epoch_start={epoch_start}", f"--epoch_end={EPOCHS}", f"--batch_size={BATCH}",
                "--producer_arg=--no_progress", "--max_producer_restarts=1000"]

    def _evaluate_argv(self):
        return [PY, os.path.join(ROOT, "check_accuracy.py"), f"--config={self.config}", f"--run_folder={self.run}",
                "--epoch_start=auto", f"--epoch_end={EPOCHS}"]

    def step(self):
        """Restart whatever died of a kill; fail on any other exit. True once training and evaluation are done."""
        if not self.trained and self.launcher.poll() is not None:
            self.trained = self._finished("launcher", self.launcher.returncode)
            if not self.trained:
                self.launcher = self._popen(self._launch_argv("auto"))
                self.starts["launcher"] += 1
        if not self.evaluated and self.evaluator.poll() is not None:
            self.evaluated = self._finished("evaluator", self.evaluator.returncode)
            if not self.evaluated:
                self.evaluator = self._popen(self._evaluate_argv())
                self.starts["evaluator"] += 1
        return self.trained and self.evaluated

    def _finished(self, name, code):
        if code == 0:
            return True
        assert self.expected_exits[name] > 0, f"{name} exited with {code} without being killed:\n{self.tail()}"
        self.expected_exits[name] -= 1
        return False

    def pid(self, target):
        if target == "evaluator":
            return self.evaluator.pid if self.evaluate and self.evaluator.poll() is None else None
        if self.trained or self.launcher.poll() is not None:
            return None
        return script_pid(self.launcher.pid, {"trainer": "train.py", "producer": "runtime_preprocessing.py"}[target])

    def stop(self):
        for proc in (self.launcher, self.evaluator):
            if proc is not None:
                stop_process(proc, signal.SIGTERM, timeout=30)
        self.out.close()

    def tail(self, n=4000):
        self.out.flush()
        with open(self.out.name, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    # -- what a process is doing, for the kill log and for aimed kills ------------

    def batch_lines(self):
        try:
            with open(os.path.join(self.run_path, "batches.log")) as f:
                return f.read().split("\n")[:-1]
        except OSError:
            return []

    def saving(self):
        return _listdir_any(self.run_path, lambda n: n.startswith(TMP_PREFIX) and n[5:].split("-")[0].isdigit())

    def refilling(self):
        return complete_count(self.buffer) < self.buffer_size if os.path.isdir(self.buffer) else False

    def writing_batch(self):
        return _listdir_any(self.buffer, lambda n: n.startswith(TMP_PREFIX) and n[5:6] in "XYL" and n[6:7] == "_")

    def accuracy_rows(self):
        from engine.accuracy_log import read_rows
        try:
            return read_rows(os.path.join(self.run_path, "accuracy.csv"))
        except UserError:  # read while being replaced: cannot happen (atomic), but never fail the driver
            return []

    def unevaluated(self):
        from engine import run_folder
        return len(run_folder.complete_epochs(self.run_path)) > len(self.accuracy_rows())

    def describe(self, target):
        if target == "trainer":
            lines = self.batch_lines()
            last = lines[-1] if lines else "none"
            return f"{'saving an epoch, ' if self.saving() else ''}last trained batch {last}"
        if target == "producer":
            return (f"{complete_count(self.buffer)} batches ready, trainer at {protocol.read_progress(self.buffer)}"
                    f"{', a batch being written' if self.writing_batch() else ''}")
        from engine import run_folder
        return (f"{len(self.accuracy_rows())} epochs evaluated, "
                f"{len(run_folder.complete_epochs(self.run_path))} saved")


def _listdir_any(folder, predicate):
    try:
        return any(predicate(n) for n in os.listdir(folder))
    except OSError:
        return False


# Each kill: a victim and a moment. 'now' kills at once; the others wait (up to AIM_SECONDS) for a state:
# training = after this attempt trained a batch, saving = while an epoch folder is being written,
# refilling = while fewer than buffer_size batches are ready (workers are building and writing batches),
# evaluating = while a saved epoch waits for its accuracy row.
# The long version draws victims and moments; the short one takes the four in an order every 3-epoch run
# offers, aimed within GAP (< one epoch and a save): the evaluator dies at the restarted trainer's first save
# (its own restart then overlaps training), the trainer at its next; each kind happens in every `make test`.
MOMENTS = {"trainer": ("now", "training", "saving"), "producer": ("now", "refilling"),
           "evaluator": ("now", "evaluating")}
SHORT_PLAN = [("trainer", "training"), ("producer", "refilling"), ("evaluator", "evaluating"), ("trainer", "saving")]
AIM_SECONDS = 20.0 if LONG else 90.0  # the short plan's moments all come, if late on a loaded machine


class Chaos:
    """Seeded kills: a schedule of (victim, moment, gap) drawn up front, delivered as the run allows."""

    def __init__(self, pipeline, log_path, seed=SEED, kills=KILLS):
        rng = random.Random(seed)
        victims = list(MOMENTS)
        if LONG:
            plan = rng.sample(victims, len(victims)) + rng.choices(victims, [WEIGHTS[v] for v in victims],
                                                                   k=kills - len(victims))
            plan = [(v, rng.choice(MOMENTS[v])) for v in plan]
        else:
            plan = SHORT_PLAN[:kills]
        self.plan = collections.deque((v, m, rng.uniform(*GAP)) for v, m in plan)
        self.pipeline, self.log_path = pipeline, log_path
        self.done = []
        self.t0 = time.monotonic()
        self.next_at = self.t0 + self.plan[0][2] if self.plan else None
        self.aim = None  # (started, batch lines then) while waiting for the moment

    def log(self, text):
        line = f"[chaos {time.monotonic() - self.t0:7.2f}s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def step(self):
        if not self.plan or time.monotonic() < self.next_at:
            return
        victim, moment, _ = self.plan[0]
        p = self.pipeline
        pid = p.pid(victim)
        if pid is None:
            if (p.evaluated if victim == "evaluator" else p.trained):
                self.log(f"skip {victim}: it has finished")
                self._advance()
            return
        if self.aim is None:
            self.aim = (time.monotonic(), len(p.batch_lines()))
        started, baseline = self.aim
        reached = {"now": True, "training": len(p.batch_lines()) > baseline, "saving": p.saving(),
                   "refilling": p.refilling(), "evaluating": p.unevaluated()}[moment]
        aimed_out = time.monotonic() - started > AIM_SECONDS
        if not (reached or aimed_out):
            return
        state = p.describe(victim)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # it ended by itself in between; try again next step
        if victim != "producer":  # the launcher restarts a producer itself
            p.expected_exits["launcher" if victim == "trainer" else "evaluator"] += 1
        self.done.append((victim, moment))
        self.log(f"kill #{len(self.done)} {victim} pid {pid} (aimed at '{moment}'"
                 f"{', not reached' if not reached else ''}): {state}")
        self._advance()

    def _advance(self):
        self.plan.popleft()
        self.aim = None
        if self.plan:
            self.next_at = time.monotonic() + self.plan[0][2]


@pytest.fixture(scope="module")
def chaos_runs(tmp_path_factory, tiny_data, request):
    """The chaos run, and its uninterrupted twin: the session's reference run (tests/conftest.py) in `make test`,
    whose settings these equal but for the buffer size, the waits and the heartbeat (none changes a weight);
    `make chaos` trains its own twin of EPOCHS epochs alongside."""
    base, data = tmp_path_factory.mktemp("chaos"), tiny_data
    configs = {}
    for name in ("twin", "chaos"):
        configs[name] = write_train_config(
            str(base / name), data,
            train={"buffer_size": "6", "wait_timeout": "300", "log_every": "4"},
            runtime_preprocessing={"heartbeat_interval": "0.5"},
            preprocess_val={"ImageNet_folder": data, "path_to_save": str(base / "val")},
            get_mu_sigma={"path_to_save": str(base / name / "stats")})
    pipeline = Pipeline(configs["chaos"], "chaos", str(base))
    chaos = Chaos(pipeline, str(base / "chaos.log"))
    chaos.log(f"seed {SEED}, {EPOCHS} epochs of {STEPS} batches, plan: "
              + ", ".join(f"{v}@{m}" for v, m, _ in chaos.plan))
    own_twin = Pipeline(configs["twin"], "twin", str(base), evaluate=False) if LONG else None
    started, finished, failed, stopping = time.monotonic(), [], [], threading.Event()

    def drive():  # restarts and kills; in a thread, so that the reference run trains meanwhile
        try:
            while not stopping.is_set():
                chaos.step()
                twin_done = own_twin is None or own_twin.step()
                if pipeline.step() and twin_done:
                    return finished.append(time.monotonic() - started)
                assert time.monotonic() - started < DEADLINE, f"the chaos run did not finish:\n{pipeline.tail()}"
                time.sleep(0.01 if chaos.aim else 0.05)  # fast while aiming: a save takes about 1 s
        except BaseException as e:  # noqa: BLE001 - raised by the fixture
            failed.append(e)
    driver, twin = threading.Thread(target=drive), own_twin
    try:
        for p in filter(None, (own_twin, pipeline)):
            p.start("launcher")  # the trainer imports TensorFlow while the validation set is written
        result = subprocess.run([PY, "preprocess_val.py", f"--config={configs['chaos']}"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        pipeline.start("evaluator")
        driver.start()
        if not LONG:  # the session's reference run (its first user trains it): alongside, on the other core
            reference = request.getfixturevalue("reference_run")
            assert (EPOCHS, BATCH) == (REFERENCE_EPOCHS, REFERENCE_BATCH)
            twin = Pipeline(reference["config"], "reference", str(base), evaluate=False)
            twin.trained = True  # finished: nothing to start or stop
        driver.join()
    finally:
        stopping.set()
        if driver.is_alive():
            driver.join()
        for p in filter(None, (twin, pipeline)):
            p.stop()
    if failed:
        raise failed[0]
    chaos.log(f"done in {finished[0]:.0f} s: {len(chaos.done)} kills "
              f"({dict(collections.Counter(v for v, _ in chaos.done))}), starts {dict(pipeline.starts)}")
    yield {"twin": twin, "chaos": pipeline, "kills": chaos.done, "log": chaos}


def test_chaos_every_epoch_completes_and_loads(chaos_runs):
    from engine import run_folder
    run = chaos_runs["chaos"].run_path
    assert len(chaos_runs["kills"]) >= MIN_KILLS
    assert {v for v, _ in chaos_runs["kills"]} == set(MOMENTS)
    assert run_folder.complete_epochs(run) == list(range(EPOCHS))
    import tensorflow as tf
    for epoch in range(EPOCHS):
        loaded = tf.saved_model.load(os.path.join(run, str(epoch), "saved_model"))
        out = loaded.signatures["serving_default"](images=tf.zeros([1, 32, 32, 3], tf.uint8))
        assert out["probabilities"].shape == (1, 4)


def test_chaos_each_batch_trained_exactly_once_in_order(chaos_runs):
    pipeline = chaos_runs["chaos"]
    lines = pipeline.batch_lines()
    timeline, resumes = surviving_batches(lines)
    assert timeline == [(e, b) for e in range(EPOCHS) for b in range(STEPS)]
    assert all(b == 0 for _, b in resumes), resumes  # attempts resume at epoch starts only
    chaos_runs["log"].log(f"batches.log: {len(lines)} lines, {len(lines) - len(timeline)} re-trained after kills, "
                          f"resumed at {resumes}")
    twin_lines = chaos_runs["twin"].batch_lines()
    assert twin_lines == [f"{e} {b}" for e in range(EPOCHS) for b in range(STEPS)]


def test_chaos_weights_equal_the_uninterrupted_twin(chaos_runs):
    from engine import logs, run_folder
    chaos, twin = chaos_runs["chaos"].run_path, chaos_runs["twin"].run_path
    for epoch in range(EPOCHS):
        reference = read_checkpoint(run_folder.checkpoint_prefix(os.path.join(twin, str(epoch))))
        got = read_checkpoint(run_folder.checkpoint_prefix(os.path.join(chaos, str(epoch))))
        assert sorted(got) == sorted(reference)
        for key in reference:
            assert reference[key].dtype.kind != "f" or np.all(np.isfinite(reference[key])), key  # NaN equals NaN below
            np.testing.assert_array_equal(got[key], reference[key], err_msg=f"epoch {epoch} {key}")
    rows, twin_rows = logs.read_csv(chaos), logs.read_csv(twin)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(EPOCHS)]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in twin_rows]


def test_chaos_leaves_no_temp_or_partial_file(chaos_runs):
    pipeline = chaos_runs["chaos"]
    for folder in (pipeline.run_path, pipeline.buffer):
        temps = [os.path.join(d, n) for d, dirs, names in os.walk(folder) for n in dirs + names
                 if is_temp_name(n)]
        assert temps == []
    assert files.scan_batches(pipeline.buffer)[1] == set()


def test_chaos_accuracy_has_one_row_per_epoch(chaos_runs):
    from engine.accuracy_log import read_rows
    rows = read_rows(os.path.join(chaos_runs["chaos"].run_path, "accuracy.csv"))
    assert sorted((r["epoch"], r["protocol"]) for r in rows) == [(e, 10) for e in range(EPOCHS)]
    assert os.path.isfile(os.path.join(chaos_runs["chaos"].run_path, "accuracy.png"))
