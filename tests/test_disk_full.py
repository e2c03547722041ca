"""A full disk under the buffer or the run folder: a clear stop, no partial file, a correct resume.

Two ways to run out of space, both real writes by the real scripts:
- a small tmpfs mounted under tmp_path (needs root / CAP_SYS_ADMIN; skipped otherwise), filled by
  another writer while the producer runs, or too small for the next epoch folder of the trainer;
- RLIMIT_FSIZE set in the child process (works unprivileged): a write past the limit fails with
  EFBIG, the same path through the atomic writers and TensorFlow's savers as ENOSPC.
The atomic writers' ENOSPC handling is also checked in-process with an injected error.
"""
import contextlib
import errno
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from settings import load_settings
from utils.errors import UserError
from utils.files import atomic_save_npy, atomic_write_text, is_temp_name
from data.buffer import files, reader as buffer_reader
from data.buffer.builder import BatchBuilder, Recipe
from data.sources.index import load_index
from tests.helpers import read_all, start_train_producer, stop_process, surviving_batches, train_cmd, write_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
BATCH = 16  # tests/helpers.py's train.py helpers: 4 classes x 32 images -> 8 batches per epoch
STEPS = 8
EPOCHS = 2  # the trainer test: epoch 0 is lost once and refused once, epoch 1 is trained by the resume


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


@pytest.fixture
def tmpfs():
    """mount(path, size) -> True if a tmpfs of `size` is now mounted at path; unmounted afterwards."""
    mounted = []

    def mount(path, size):
        os.makedirs(path, exist_ok=True)
        try:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                    capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return False
        if result.returncode == 0:
            mounted.append(str(path))
        return result.returncode == 0
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", path], capture_output=True, timeout=10)


def file_size_limit(limit):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ, so no signal kills us)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def producer_cmd(config, epoch_start, epoch_end):
    return [PY, "runtime_preprocessing.py", "--config", config, f"--epoch_start={epoch_start}",
            f"--epoch_end={epoch_end}", f"--batch_size={BATCH}", "--no_progress"]


def builder_for(cfg):
    index = load_index(cfg.preprocess.ImageNet_folder, "train")
    return BatchBuilder(index.paths, index.labels, Recipe.from_settings(cfg, BATCH))


def read_and_check(reader, builder, start, stop_at, report=True):
    read_all(reader, start, stop_at, builder, num_batches=STEPS, report=report)


def one_error_line(stderr):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def assert_clean(folder):
    """No temp file anywhere below `folder`, and no half-written batch in it."""
    temps = [n for _, dirs, names in os.walk(folder) for n in dirs + names if is_temp_name(n)]
    assert temps == []
    assert files.scan_batches(folder)[1] == set()


class Filler(threading.Thread):
    """Another writer on the same disk: keeps taking space until less than `leave` bytes are free."""

    def __init__(self, path, leave):
        super().__init__(daemon=True)
        self.path, self.leave = path, leave
        self.halt = threading.Event()

    def run(self):
        with open(self.path, "wb", buffering=0) as f:
            while not self.halt.is_set():
                if shutil.disk_usage(os.path.dirname(self.path)).free <= self.leave:
                    time.sleep(0.001)
                    continue
                with contextlib.suppress(OSError):
                    f.write(b"\0" * 4096)

    def stop(self):
        self.halt.set()
        self.join()
        os.remove(self.path)


def test_producer_stops_on_a_full_buffer_disk_and_resumes_once_space_is_freed(data, tmp_path, tmpfs):
    disk = tmp_path / "disk"
    if not tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE tests below take the same paths")
    folder = str(disk / "buffer")
    config = write_train_config(str(tmp_path / "cfg"), data, train={"buffer_folder": folder, "buffer_size": "6"})
    cfg = load_settings(config)
    builder = builder_for(cfg)
    producer = subprocess.Popen(producer_cmd(config, 0, 3), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    reader = buffer_reader.BufferReader(cfg, BATCH)
    filler = Filler(str(disk / "filler"), leave=16384)  # room for progress and heartbeat, not for a batch
    try:
        read_and_check(reader, builder, 0, 2)
        filler.start()
        position, unreported, trainer_errors = 2, None, []
        deadline = time.monotonic() + 120  # a producer that neither stops nor produces fails the test, not CI
        # The trainer goes on; each batch it consumes frees space the other writer takes first.
        while producer.poll() is None and position < 3 * STEPS and time.monotonic() < deadline:
            epoch, b = divmod(position, STEPS)
            if unreported:
                try:
                    reader.report_progress(*unreported)
                    unreported = None
                except UserError as e:  # its progress write met the full disk too: the trainer's stop
                    trainer_errors.append(str(e))
            elif os.path.exists(files.batch_file(folder, "X", epoch, b)):
                read_and_check(reader, builder, position, position + 1, report=False)
                position, unreported = position + 1, (epoch, b + 1)
            time.sleep(0.01)
        assert producer.wait(timeout=30) == 2
        line = one_error_line(producer.stderr.read())
        assert re.match(rf"error: Disk full writing \S+ in {re.escape(folder)} \(write needs about [\d.]+ [KM]?B, "
                        rf"[\d.]+ [KM]?B free\); free space there", line), line
        for text in trainer_errors:
            assert text.startswith(f"Disk full writing training_progress.txt in {folder} (write needs about 4 B"), text
        assert_clean(folder)
        print(f"producer on a full disk after {position} batches consumed: {line}; trainer: {trainer_errors}")
    finally:
        if filler.is_alive():
            filler.stop()
        stop_process(producer)
    # Space is back: the same command with --epoch_start=auto continues where the trainer stands.
    if unreported:
        reader.report_progress(*unreported)
    producer = start_train_producer(config, "auto", 3)
    try:
        read_and_check(reader, builder, position, 3 * STEPS)
        assert producer.wait(timeout=30) == 0
    finally:
        stop_process(producer)
    assert_clean(folder)
    assert files.scan_batches(folder)[0] == set()


def test_producer_past_a_file_size_limit_stops_cleanly_and_resumes(data, tmp_path):
    config = write_train_config(str(tmp_path), data, train={"buffer_size": "6"})
    cfg = load_settings(config)
    folder = cfg.train.buffer_folder
    result = subprocess.run(producer_cmd(config, 0, 2), cwd=ROOT, capture_output=True, text=True, timeout=60,
                            preexec_fn=file_size_limit(16384))  # an image file is 49 KB
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert re.match(rf"error: File size limit hit writing X_0_\d+\.npy in {re.escape(folder)} \(write needs about "
                    rf"49\.\d KB, .* free\); raise the limit", line), line
    assert_clean(folder)
    assert files.scan_batches(folder)[0] == set()
    producer = start_train_producer(config, "auto", 2)
    try:
        read_and_check(buffer_reader.BufferReader(cfg, BATCH), builder_for(cfg), 0, 2 * STEPS)
        assert producer.wait(timeout=30) == 0
    finally:
        stop_process(producer)
    assert_clean(folder)


def test_trainer_stops_cleanly_on_a_full_run_folder_and_resumes(data, tmp_path, tmpfs):
    """Attempt 1 cannot write epoch 0's folder (a file-size limit: the epoch is lost, nothing partial
    stays). Attempt 2 saves epoch 0, then sees the tmpfs too full for epoch 1 and stops before
    training it (nothing lost). Attempt 3, with space freed, finishes; each step with --epoch_start=auto."""
    runs = tmp_path / "runs"
    # Width 0.125: an epoch folder is 1.9 MB and the estimate before the first save (weights twice, momentum,
    # a ResNet-50 graph) 2.6 MB, so 3 MB takes epoch 0 and leaves too little for epoch 1. At the suite's width
    # 0.0625 (0.8 MB and 1.45 MB) the sizes that do both lie within 0.1 MB of each other.
    small = tmpfs(runs, "3m")
    config = write_train_config(str(tmp_path / "cfg"), data, model={"width_multiplier": "0.125"},
                                train={"path_for_saving": str(runs), "buffer_size": "6"})
    run = str(runs / "R")
    from engine import run_folder
    producer = start_train_producer(config, 0, EPOCHS)
    try:
        first = subprocess.run(train_cmd(config, "R", 0, EPOCHS), cwd=ROOT, capture_output=True, text=True,
                               timeout=240, preexec_fn=file_size_limit(600_000))  # the checkpoint data is ~1.1 MB
        assert first.returncode == 2, first.stderr[-3000:]
        line = one_error_line(first.stderr)
        assert re.match(rf"error: File size limit hit writing 0 in {re.escape(run)} \(write needs about [\d.]+ MB",
                        line), line
        assert run_folder.complete_epochs(run) == []
        assert_clean(run)
        print(f"trainer past a file-size limit: {line}")
        if small:
            second = subprocess.run(train_cmd(config, "R", "auto", EPOCHS), cwd=ROOT, capture_output=True, text=True,
                                    timeout=240)
            assert second.returncode == 2, second.stderr[-3000:]
            line = one_error_line(second.stderr)
            assert re.match(rf"error: The run folder {re.escape(run)} has [\d.]+ [KM]B free but saving epoch 1 needs "
                            rf"about 1\.9 MB; free space there", line), line
            assert run_folder.complete_epochs(run) == [0]
            assert_clean(run)
            print(f"trainer on a full tmpfs: {line}")
            subprocess.run(["mount", "-o", "remount,size=32m", str(runs)], check=True, timeout=10)
        third = subprocess.run(train_cmd(config, "R", "auto", EPOCHS), cwd=ROOT, capture_output=True, text=True,
                               timeout=240)
        assert third.returncode == 0, third.stderr[-3000:]
        assert producer.wait(timeout=30) == 0
    finally:
        stop_process(producer)
    assert run_folder.complete_epochs(run) == list(range(EPOCHS))
    assert_clean(run)
    lines = open(os.path.join(run, "batches.log")).read().split("\n")[:-1]
    timeline, resumes = surviving_batches(lines)
    assert timeline == [(e, b) for e in range(EPOCHS) for b in range(STEPS)]
    assert resumes == [(0, 0)]  # only the epoch whose save failed was trained twice
    from engine import logs
    assert [r["epoch"] for r in logs.read_csv(run)] == [str(e) for e in range(EPOCHS)]


def test_atomic_writers_turn_an_injected_enospc_into_one_sentence_and_leave_nothing(tmp_path, monkeypatch):
    import builtins
    real_open = builtins.open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])  # half of it lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullFile(f) if "w" in mode and is_temp_name(path) else f
    monkeypatch.setattr(builtins, "open", full_open)
    target = tmp_path / "X_0_0.npy"
    with pytest.raises(UserError) as err:
        atomic_save_npy(str(target), np.zeros((4, 8, 8, 3), np.uint8))
    text = str(err.value)
    assert text.startswith(f"Disk full writing X_0_0.npy in {tmp_path} (write needs about 896 B,")
    assert "\n" not in text and text.endswith("then rerun to resume.")
    with pytest.raises(UserError, match="Disk full writing log.csv"):
        atomic_write_text(str(tmp_path / "log.csv"), "epoch\n0\n")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
