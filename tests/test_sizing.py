"""num_of_threads = auto: the sizing rule on a fake clock, and a real producer that adds and retires workers.

The rule (data/buffer/sizing.py) is driven by a simulated buffer: a consumer taking a fixed img/s, workers
building at a fixed per-image cost, the producer's refill rule (refill below refill_threshold up to
buffer_size). The real producer is run with more cores than this machine has (its core count patched in
the subprocess), forced to add and retire by a consumer that stops and starts, and its batches compared
byte for byte with a fixed-count producer's.
"""
import subprocess

import numpy as np
import pytest

from settings import load_settings
from data.buffer import files, reader as buffer_reader
from data.buffer.sizing import WorkerSizer, choose_workers, settled_count, worker_cap
from tests.helpers import (SOLID_BATCH, producer_cmd, read_in_sizing_cycles, run_producer, solid_config_for,
                           stop_process, with_cores)

ROWS, BUFFER, THRESHOLD, WINDOW = 64, 40, 0.8, 10.0


class FakePipeline:
    """A buffer between a consumer at `consumer_rate` img/s and workers at `worker_rate` img/s each,
    stepped by a fake clock; the producer side refills as data/buffer/producer.py does."""

    def __init__(self, consumer_rate, worker_rate, cap=16, dt=0.05):
        self.consumer_rate, self.worker_rate, self.dt = consumer_rate, worker_rate, dt
        self.now, self.consumed, self.ready, self.building = 0.0, 0.0, 0, 0.0
        self.refilling = True
        self.sizer = WorkerSizer(cap, ROWS, BUFFER, THRESHOLD, window=WINDOW, now=0.0)
        self.counts = []  # (time, workers) after each change
        self.waited_seconds = 0.0

    def run(self, seconds):
        for _ in range(int(seconds / self.dt)):
            self.step()
        return self.sizer.workers

    def step(self):
        dt, sizer = self.dt, self.sizer
        self.now += dt
        if self.consumer_rate > 0 and self.ready < 1:
            self.waited_seconds += dt  # the next batch is not there: the consumer stands still
        elif self.ready >= 1:
            before = int(self.consumed)
            self.consumed += self.consumer_rate * dt / ROWS
            self.ready -= int(self.consumed) - before
        if self.ready < THRESHOLD * BUFFER:
            self.refilling = True
        if self.refilling:
            self.building += sizer.workers * self.worker_rate * dt / ROWS
            while self.building >= 1 and self.ready < BUFFER:
                self.building -= 1
                self.ready += 1
                sizer.built(self.now, ROWS / self.worker_rate)
            if self.ready >= BUFFER:
                self.refilling, self.building = False, 0.0
        sizer.progress(self.now, int(self.consumed))
        sizer.ready(self.now, self.ready, consumer_waiting=True)
        decision = sizer.decide(self.now)
        if decision and decision.change:
            self.counts.append((round(self.now), decision.workers))


def test_auto_settles_within_one_of_consumer_rate_over_worker_rate_and_falls_back_when_the_consumer_slows():
    pipe = FakePipeline(consumer_rate=2950, worker_rate=700)
    fast = pipe.run(300)
    assert abs(fast - 2950 / 700) <= 1 and fast == settled_count(2950, 700) == 5
    steady = pipe.waited_seconds
    pipe.run(120)
    assert pipe.sizer.workers == fast and pipe.waited_seconds == steady  # settled: no change, no waiting
    pipe.consumer_rate = 1000
    slow = pipe.run(300)
    assert abs(slow - 1000 / 700) <= 1 and slow == settled_count(1000, 700) == 2
    print(f"settled counts: {fast} workers at 2950 img/s, {slow} after slowing to 1000 img/s "
          f"(700 img/s per worker); changes {pipe.counts}")


@pytest.mark.parametrize("consumer,worker", [(400, 570), (1300, 300), (2400, 334), (3000, 220), (900, 900)])
def test_auto_settles_at_the_count_bench_producer_prints(consumer, worker):
    pipe = FakePipeline(consumer_rate=consumer, worker_rate=worker, cap=32)
    settled = pipe.run(600)
    assert settled == settled_count(consumer, worker)
    assert 0 < settled - consumer / worker <= 1


def test_auto_never_passes_the_core_cap_and_says_why():
    pipe = FakePipeline(consumer_rate=5000, worker_rate=300, cap=3)
    assert pipe.run(200) == 3
    assert worker_cap(2) == (1, "2 cores it may use, one left for the trainer")
    assert worker_cap(2, once=True) == (2, "2 cores it may use")
    assert worker_cap(16, max_workers=4) == (4, "16 cores it may use, one left for the trainer, max_workers = 4")
    assert worker_cap(1) == (1, "1 core it may use, one left for the trainer")
    assert choose_workers("auto", 2) == (1, 1, "num_of_threads = auto: 2 cores it may use, one left for the "
                                               "trainer: at most 1")
    assert choose_workers("auto", 8, once=True)[:2] == (8, 8)  # filling ahead of training: every core
    assert choose_workers(3, 8) == (3, 3, "num_of_threads = 3")


def test_a_trainer_that_stands_still_lets_workers_retire_down_to_one():
    pipe = FakePipeline(consumer_rate=3000, worker_rate=500)
    assert pipe.run(300) >= 6
    pipe.consumer_rate = 0
    assert pipe.run(200) == 1


def test_the_change_line_gives_the_measured_rates():
    sizer = WorkerSizer(8, ROWS, BUFFER, THRESHOLD, window=1.0, now=0.0)
    sizer.progress(0.0, 0)
    for i in range(10):
        sizer.built(0.1 * i, ROWS / 700)
    sizer.progress(1.0, 46)
    sizer.ready(1.0, 10, consumer_waiting=True)
    decision = sizer.decide(1.0)
    assert decision.change == 1  # 2,944 >= 1 x 700
    assert decision.describe() == "trainer takes 2,944 img/s, 1 worker builds 700 img/s, buffer 25% ready"


# ----------------------------------------------------------------------------
# The real producer: add and retire never change a batch, never build one twice
# ----------------------------------------------------------------------------

def auto_config(folder, dataset, buffer_size="6"):
    return solid_config_for(folder, dataset, train={"buffer_size": buffer_size},
                            runtime_preprocessing={"num_of_threads": "auto", "sizing_window": "0.1"})


EPOCHS = 30
BATCHES = 10 * EPOCHS  # the solid dataset gives 10 batches per epoch


def test_adding_and_retiring_workers_changes_no_batch_and_builds_none_twice(solid_dataset, tmp_path):  # noqa: F811
    # The fixed-count reference: one worker, every batch of epochs 0-29 in one fill. 30 epochs, because an
    # add/retire pair took 20 to 170 positions under load (measured for the chaos twin of this test), and
    # with 10 epochs the second add came just before the last batch in 2 of 8 loaded runs.
    fixed = solid_config_for(str(tmp_path / "fixed"), solid_dataset, train={"buffer_size": str(BATCHES)})
    assert run_producer(fixed, "--once", "--num_workers", "1", epoch_end=str(EPOCHS)).returncode == 0
    fixed_folder = load_settings(fixed).train.buffer_folder
    reference = files.scan_batches(fixed_folder)[0]
    assert len(reference) == BATCHES

    config = auto_config(str(tmp_path / "auto"), solid_dataset)
    cfg = load_settings(config)
    folder = cfg.train.buffer_folder
    proc = subprocess.Popen(with_cores(4, producer_cmd(config, epoch_end=str(EPOCHS))), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    seen = {}

    def keep(epoch, b, batch):  # compared after reading: a check inside the loop slows the reader down to
        seen[(epoch, b)] = batch  # a worker's pace, and then it never starves the producer into an add
    try:
        adds = read_in_sizing_cycles(buffer_reader.BufferReader(cfg, SOLID_BATCH), BATCHES, keep, folder,
                                     cycles=2)
        assert proc.wait(30) == 0
        log = proc.stderr.read()
    finally:
        stop_process(proc)
    assert adds == 2, log
    assert sorted(seen) == sorted(reference)
    for key, batch in seen.items():  # the arrays as the reader found them, against the fixed-count producer's
        expected = [np.load(files.batch_file(fixed_folder, kind, *key)) for kind in ("X", "Y", "L")]
        for got, want in zip((batch.images, batch.labels, batch.lighting), expected):
            assert got.dtype == want.dtype and np.array_equal(got, want), key
    assert "workers: 1 -> 2: trainer takes" in log and "workers: 2 -> 1: trainer takes" in log, log
    assert f"produced {BATCHES} batches" in log, log  # none built twice
