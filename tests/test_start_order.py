"""Start order and restarts, the buffer protocol alone (no TensorFlow): the producer and the trainer start in any
order next to a previous run's files, and a producer restarted with its original command catches up with a
running trainer."""
import contextlib
import os
import subprocess
import threading
import time

from settings import load_settings
from data.buffer import files, protocol, reader as buffer_reader
from tests.helpers import (SOLID_BATCH, complete_count, heartbeat_pid, producer_cmd, read_all, reference_builder,
                           run_producer, solid_config_for, start_solid_producer, wait_until)


def test_trainer_started_first_waits_out_a_previous_runs_manifest(solid_dataset, tmp_path, caplog):  # noqa: F811
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "4", "wait_timeout": "30"})
    cfg = load_settings(config)
    folder = cfg.train.buffer_folder
    # A previous run with batch size 2 that finished: its manifest and heartbeat stay, its progress says its end.
    assert run_producer(config, "--once", batch_size=2).returncode == 0
    for key in files.scan_batches(folder)[0]:
        files.delete_batch(folder, *key)
    protocol.write_progress(folder, 3, 0)
    builder = reference_builder(config)
    errors = []

    def trainer():
        try:
            read_all(buffer_reader.BufferReader(cfg, SOLID_BATCH), 0, 20, builder)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
    thread = threading.Thread(target=trainer)
    thread.start()
    assert wait_until(lambda: "waiting up to 30 s" in caplog.text, timeout=30)  # it says it waits
    assert thread.is_alive() and not errors  # waiting on the old manifest, not refusing it
    producer = start_solid_producer(config, epoch_start="0", epoch_end="2")
    thread.join(60)
    assert not errors, errors
    assert producer.wait(30) == 0
    assert "waiting up to 30 s" in caplog.text and "holds batches of 2 images" in caplog.text


@contextlib.contextmanager
def producer_after_progress(dataset, tmp_path, progress, epoch_start):
    """A producer for epochs 0..1 from `epoch_start` on a buffer folder holding only a previous run's progress
    file, which says `progress` (epoch, batch). Yields (config, its settings, the folder, the producer, whose
    stderr is piped); the producer is killed on the way out."""
    config = solid_config_for(str(tmp_path), dataset, train={"buffer_size": "4"})
    cfg = load_settings(config)
    folder = cfg.train.buffer_folder
    os.makedirs(folder)
    protocol.write_progress(folder, *progress)
    producer = subprocess.Popen(producer_cmd(config, epoch_start=epoch_start, epoch_end="2"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield config, cfg, folder, producer
    finally:
        producer.kill()
        producer.communicate()


def test_producer_started_first_sets_aside_a_previous_runs_progress(solid_dataset, tmp_path):  # noqa: F811
    # The progress file says where a previous run was killed: inside this run's range.
    with producer_after_progress(solid_dataset, tmp_path, (1, 3), "0") as (config, cfg, folder, producer):
        assert wait_until(lambda: complete_count(folder) == 4)
        assert sorted(files.scan_batches(folder)[0]) == [(0, b) for b in range(4)]
        read_all(buffer_reader.BufferReader(cfg, SOLID_BATCH), 0, 20, reference_builder(config))
        assert producer.wait(30) == 0


def test_producer_restarted_with_its_first_command_catches_up_with_a_waiting_trainer(solid_dataset, tmp_path):  # noqa: F811
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "4"})
    cfg = load_settings(config)
    folder = cfg.train.buffer_folder
    builder = reference_builder(config)
    producer = start_solid_producer(config, epoch_start="0", epoch_end="3")
    reader = buffer_reader.BufferReader(cfg, SOLID_BATCH)
    try:
        read_all(reader, 0, 14, builder)  # the trainer stands at epoch 1 batch 4
        producer.kill()
        producer.wait()
        for key in files.scan_batches(folder)[0]:  # nothing ready: the trainer must wait for the new producer
            files.delete_batch(folder, *key)
        producer = start_solid_producer(config, epoch_start="0", epoch_end="3")  # the seed's command, unchanged
        started = time.monotonic()
        read_all(reader, 14, 15, builder)
        # The waiting reader re-reports its position to the newcomer; without that the producer builds from
        # epoch 0 and the reader waits for ever: a guard, far above the ~3 s this takes on a loaded machine.
        assert time.monotonic() - started < 60
        read_all(reader, 15, 30, builder)
        assert producer.wait(30) == 0
    finally:
        producer.kill()
        producer.wait()


def test_auto_producer_builds_nothing_on_a_progress_file_past_its_end(solid_dataset, tmp_path):  # noqa: F811
    # The progress file says a finished run of epochs 0-1, or the end of an earlier one.
    with producer_after_progress(solid_dataset, tmp_path, (2, 0), "auto") as (config, cfg, folder, producer):
        # It logs its plan for the progress file before it starts its heartbeat (and its loop).
        assert wait_until(lambda: heartbeat_pid(folder) == producer.pid)
        assert complete_count(folder) == 0
        read_all(buffer_reader.BufferReader(cfg, SOLID_BATCH), 10, 20, reference_builder(config))  # resumed at 1
        _, err = producer.communicate(timeout=30)
    assert producer.returncode == 0, err
    assert "past --epoch_end=2: left over from an earlier run" in err and "; waiting for the trainer to report" in err
    # Epoch 1's batches only: one that built from a guess before the reader's first report counted 14.
    assert f"produced 10 batches into {folder}" in err
