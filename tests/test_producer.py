"""runtime_preprocessing.py end to end: determinism, SIGKILL safety, refill rule, resume, stale buffers."""
import glob
import os
import shutil
import random
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from settings import load_settings
from utils.errors import UserError
from utils.files import TMP_PREFIX
from data.buffer import (builder as buffer_builder, files as buffer_files, producer as buffer_producer, protocol,
                         reader as buffer_reader)
from data.buffer.builder import Recipe
from data.sources import scale_cache
from data.sources.index import load_index
from data.transforms.jpeg_window import get_turbojpeg
from tests.helpers import COLOURS, SOLID_BATCH, complete_count, heartbeat_pid, producer_cmd, read_all, reference_builder, run_producer, solid_config_for, start_solid_producer, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batch_file_bytes(folder):
    return {os.path.basename(p): open(p, "rb").read() for p in glob.glob(os.path.join(folder, "[XYL]_*.npy"))}


def test_batches_identical_for_1_and_2_workers_and_labels_match(solid_dataset, tmp_path):
    config_a = solid_config_for(str(tmp_path / "a"), solid_dataset, train={"buffer_size": "25"})
    config_b = solid_config_for(str(tmp_path / "b"), solid_dataset, train={"buffer_size": "25"})
    assert run_producer(config_a, "--once", "--num_workers", "1").returncode == 0
    assert run_producer(config_b, "--once", "--num_workers", "2").returncode == 0
    a, b = batch_file_bytes(str(tmp_path / "a" / "buffer")), batch_file_bytes(str(tmp_path / "b" / "buffer"))
    assert len(a) == 3 * 25 and a == b  # epochs 0, 1 and half of 2, byte for byte

    cfg = load_settings(config_a)
    reader = buffer_reader.BufferReader(cfg, SOLID_BATCH)
    colours = np.asarray(COLOURS, np.float64)
    seen_labels = set()
    for lin in range(25):
        batch = reader.read(*divmod(lin, 10))
        means = batch.images.reshape(SOLID_BATCH, -1, 3).mean(axis=1)
        nearest = np.argmin(((means[:, None, :] - colours[None]) ** 2).sum(-1), axis=1)
        assert np.array_equal(nearest, batch.labels), (lin, means, batch.labels)
        assert np.isfinite(batch.lighting).all()
        seen_labels.update(batch.labels.tolist())
    assert seen_labels == set(range(len(COLOURS)))


def test_sigkill_at_random_moments_never_exposes_a_partial_batch(solid_dataset, tmp_path):
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "6", "wait_timeout": "30"})
    cfg = load_settings(config)
    folder = cfg.train.buffer_folder
    builder = reference_builder(config)
    errors, max_on_disk = [], [0]
    final_started = threading.Event()

    def trainer():
        try:
            reader = buffer_reader.BufferReader(cfg, SOLID_BATCH)
            for lin in range(60):
                if lin == 59:  # a producer started after the last report would wait for the trainer forever
                    final_started.wait(120)
                read_all(reader, lin, lin + 1, builder, pause=0.05)
                max_on_disk[0] = max(max_on_disk[0], complete_count(folder))
        except BaseException as e:  # reported by the main thread
            errors.append(e)
    os.makedirs(folder, exist_ok=True)
    t = threading.Thread(target=trainer)
    t.start()
    rng = random.Random(1)
    kills = 0
    while t.is_alive() and kills < 14:
        p = start_solid_producer(config, epoch_start="auto", epoch_end="6")
        if rng.random() < 0.8:  # mostly while it produces, sometimes during start-up
            wait_until(lambda: heartbeat_pid(folder) == p.pid, 10)
        time.sleep(rng.uniform(0.0, 0.2))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    final = start_solid_producer(config, epoch_start="auto", epoch_end="6")
    assert wait_until(lambda: heartbeat_pid(folder) == final.pid)  # it has read the progress file
    final_started.set()
    t.join(60)
    assert not errors, errors
    assert final.wait(30) == 0
    assert kills >= 10
    assert max_on_disk[0] <= 6
    assert batch_file_bytes(folder) == {}  # the finished producer deleted everything consumed
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp-") and "progress" not in n]


def test_restart_reproduces_the_same_bytes(solid_dataset, tmp_path):
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "12"})
    folder = load_settings(config).train.buffer_folder
    p = start_solid_producer(config, "--num_workers", "2")
    wait_until(lambda: complete_count(folder) >= 3 if os.path.isdir(folder) else False)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert run_producer(config, "--once", "--num_workers", "1").returncode == 0
    builder = reference_builder(config)
    files = batch_file_bytes(folder)
    assert len(files) == 3 * 12
    for lin in range(12):
        images, labels, lighting = builder.build(*divmod(lin, 10))
        x = np.load(buffer_files.batch_file(folder, "X", *divmod(lin, 10)), allow_pickle=False)
        assert np.array_equal(x, images)


def test_refill_rule_and_deletion_of_consumed(solid_dataset, tmp_path):
    # buffer_size 6, refill_threshold 0.8: refill when fewer than 4.8 batches are ready ahead.
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "6"})
    folder = load_settings(config).train.buffer_folder
    p = start_solid_producer(config)
    try:
        ready = lambda: sorted(buffer_files.scan_batches(folder)[0]) if os.path.isdir(folder) else []  # noqa: E731
        assert wait_until(lambda: ready() == [(0, b) for b in range(6)])
        # lead 5 >= 4.8: delete batch 0, no refill (that the rule builds nothing then is plan_refill's, pinned
        # in tests/test_buffer.py; a wrong refill here would start in the same loop pass as the deletion).
        protocol.write_progress(folder, 0, 1)
        assert wait_until(lambda: ready() == [(0, b) for b in range(1, 6)]), ready()
        protocol.write_progress(folder, 0, 2)  # lead 4 < 4.8: refill up to 2 + 6
        assert wait_until(lambda: ready() == [(0, b) for b in range(2, 8)]), ready()
        protocol.write_progress(folder, 0, 8)  # across the epoch boundary
        assert wait_until(lambda: ready() == [(0, 8), (0, 9), (1, 0), (1, 1), (1, 2), (1, 3)]), ready()
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_resume_at_epoch_start_after_mid_epoch_crash(solid_dataset, tmp_path):
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "6"})
    cfg = load_settings(config)
    builder = reference_builder(config)
    p = start_solid_producer(config, epoch_start="0", epoch_end="3")
    read_all(buffer_reader.BufferReader(cfg, SOLID_BATCH), 0, 16, builder)  # epoch 0 and batches 0-5 of epoch 1
    p.send_signal(signal.SIGKILL)  # crash: the trainer restarts from its epoch-0 checkpoint, at epoch 1
    p.wait()
    assert protocol.read_progress(cfg.train.buffer_folder) == (1, 6)
    p = start_solid_producer(config, epoch_start="1", epoch_end="3")
    read_all(buffer_reader.BufferReader(cfg, SOLID_BATCH), 10, 30, builder)  # all of epochs 1 and 2, from (1, 0)
    assert p.wait(30) == 0
    assert batch_file_bytes(cfg.train.buffer_folder) == {}


def test_stale_buffer_is_refused_then_cleared_on_request(solid_dataset, tmp_path):
    config = solid_config_for(str(tmp_path), solid_dataset)
    folder = load_settings(config).train.buffer_folder
    assert run_producer(config, "--once").returncode == 0
    before = batch_file_bytes(folder)
    r = run_producer(config, "--once", batch_size=2)
    assert r.returncode == 2
    assert "another run" in r.stderr and "batch_size 4 -> 2" in r.stderr and "--clear_buffer" in r.stderr
    reseeded = solid_config_for(str(tmp_path / "seed1"), solid_dataset, train={"seed": "1", "buffer_folder": folder})
    r = run_producer(reseeded, "--once")
    assert r.returncode == 2 and "seed 0 -> 1" in r.stderr
    assert batch_file_bytes(folder) == before  # nothing was touched
    r = run_producer(config, "--once", "--clear_buffer", batch_size=2)
    assert r.returncode == 0, r.stderr
    shapes = {np.load(p, allow_pickle=False).shape for p in glob.glob(os.path.join(folder, "X_*.npy"))}
    assert shapes == {(2, 16, 16, 3)}


def test_unwritable_folder_and_full_disk_are_clear_errors(solid_dataset, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_folder": str(blocker / "buffer")})
    producer = buffer_producer.Producer(load_settings(config), SOLID_BATCH, 0, 2, progress=False)
    with pytest.raises(UserError, match="Cannot write to the buffer folder .*a_file/buffer.*KB"):
        producer.setup()
    config = solid_config_for(str(tmp_path / "ok"), solid_dataset)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    producer = buffer_producer.Producer(load_settings(config), SOLID_BATCH, 0, 2, progress=False)
    with pytest.raises(UserError, match=r"ok/buffer has 1\.0 KB free but 6 batches need about 21\.1 KB"):
        producer.setup()


def test_progress_left_over_past_the_range_is_not_followed(solid_dataset, tmp_path):
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "4"})
    folder = load_settings(config).train.buffer_folder
    os.makedirs(folder)
    protocol.write_progress(folder, 9, 0)  # an earlier run's last report
    r = run_producer(config, "--once", epoch_start="0", epoch_end="3")
    assert r.returncode == 0 and "left over from an earlier run" in r.stderr
    assert sorted(buffer_files.scan_batches(folder)[0]) == [(0, b) for b in range(4)]


def test_consumed_files_are_reused_and_the_buffer_bound_holds(solid_dataset, tmp_path):
    """Consumed X files are overwritten in place by later batches; never more than buffer_size files in all."""
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "5"})
    cfg = load_settings(config)
    folder = cfg.train.buffer_folder
    builder = reference_builder(config)
    links = tmp_path / "links"  # a second name for each X file: it shows whether that inode was rewritten
    links.mkdir()
    p = start_solid_producer(config, epoch_start="0", epoch_end="2")
    try:
        reader = buffer_reader.BufferReader(cfg, SOLID_BATCH)
        most = 0
        for lin in range(20):
            batch = reader.read(*divmod(lin, 10))
            assert np.array_equal(batch.images, builder.build(*divmod(lin, 10))[0])
            os.link(buffer_files.batch_file(folder, "X", *divmod(lin, 10)), links / f"{lin}.npy")  # kept until reported
            names = os.listdir(folder)
            spares = [n for n in names if n.startswith(TMP_PREFIX + buffer_files.SPARE)]
            most = max(most, len([n for n in names if n.startswith("X_")]) + len(spares))
            reader.report_progress(*divmod(lin + 1, 10))
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()
    assert most <= 5
    rewritten = [lin for lin in range(20) if not np.array_equal(np.load(links / f"{lin}.npy"),
                                                                 builder.build(*divmod(lin, 10))[0])]
    assert len(rewritten) >= 10, rewritten  # 20 batches through a 5-batch buffer: files went round
    assert not [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX) and "progress" not in n]


def test_a_dead_worker_is_a_clear_error(solid_dataset, tmp_path):
    from data.buffer.workers import WorkerSet
    config = solid_config_for(str(tmp_path), solid_dataset)
    cfg = load_settings(config)
    folder = str(tmp_path / "buffer")
    os.makedirs(folder)
    index = load_index(cfg.preprocess.ImageNet_folder, "train")
    workers = WorkerSet(1, index.paths, index.labels, Recipe.from_settings(cfg, SOLID_BATCH), folder)
    try:
        workers.submit(0, 0)
        assert workers.collect(timeout=30) == [(0, 0)]
        workers.procs[0].kill()
        workers.procs[0].join()
        with pytest.raises(UserError, match=r"producer-worker-0 \(pid \d+\) was killed by signal 9 .*"
                                                  r"--epoch_start=auto"):
            workers.check_alive()
        with pytest.raises(UserError, match="was killed by signal 9"):
            workers.submit(0, 1)
            workers.collect(timeout=30)
    finally:
        workers.stop()


def _manifest(folder):
    return protocol.load_manifest(folder)


def test_a_restart_with_another_decoder_is_refused_unless_set_back_or_cleared(solid_dataset, tmp_path):
    if get_turbojpeg() is None:
        pytest.skip("the turbojpeg wheel is not installed")
    configs = {d: solid_config_for(str(tmp_path / d), solid_dataset, train={"buffer_size": "4", "buffer_folder":
                                   str(tmp_path / "buffer")}, runtime_preprocessing={"decoder": d})
               for d in ("pil", "turbojpeg", "auto")}
    folder = str(tmp_path / "buffer")
    assert run_producer(configs["pil"], "--once").returncode == 0
    before = batch_file_bytes(folder)
    r = run_producer(configs["turbojpeg"], "--once")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: The buffer folder {folder} holds batches built with decoder pil but this producer would build the "
        f"rest with decoder turbojpeg, so they would differ from an uninterrupted run's; set [runtime_preprocessing] "
        f"decoder = pil to continue the run, or pass --clear_buffer to start the buffer over.")
    assert batch_file_bytes(folder) == before
    protocol.write_progress(folder, 0, 2)  # the trainer consumed two: the restart builds batches 4 and 5
    r = run_producer(configs["auto"], "--once", epoch_start="auto")  # auto keeps the run's pil
    assert r.returncode == 0 and "decoder pil" in r.stderr, r.stderr
    assert _manifest(folder)["decoder"] == "pil"
    builder = reference_builder(configs["pil"])  # the run's recipe
    for b in (4, 5):
        assert np.array_equal(np.load(buffer_files.batch_file(folder, "X", 0, b)), builder.build(0, b)[0])
    r = run_producer(configs["turbojpeg"], "--once", "--clear_buffer")
    assert r.returncode == 0 and _manifest(folder)["decoder"] == "turbojpeg", r.stderr
    for name in os.listdir(folder):  # every batch consumed: nothing to keep, so the switch is only warned about
        if buffer_files.parse_batch_name(name):
            os.remove(os.path.join(folder, name))
    r = run_producer(configs["pil"], "--once")
    assert r.returncode == 0 and _manifest(folder)["decoder"] == "pil", r.stderr
    assert "was built with decoder turbojpeg and this producer builds with decoder pil: if this resumes that run, " \
           "its batches from here on differ from an uninterrupted run's" in r.stderr


def test_a_restart_reads_the_scale_cache_at_the_run_s_scales_and_refuses_without_them(solid_dataset, tmp_path):
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "4"})
    cfg = load_settings(config)
    folder, cache = cfg.train.buffer_folder, cfg.preprocess.path_to_save
    index = load_index(cfg.preprocess.ImageNet_folder, "train")
    scale_cache.build_scale(cache, index, 18, num_workers=1, progress=False)
    assert run_producer(config, "--once").returncode == 0
    assert _manifest(folder)["cached_scales"] == [18]
    scale_cache.build_scale(cache, index, 22, num_workers=1, progress=False)  # the cache gains a scale
    protocol.write_progress(folder, 0, 2)
    r = run_producer(config, "--once", epoch_start="auto")
    assert r.returncode == 0 and "reading the scale cache at the run's scales [18] only ([18, 22]" in r.stderr
    assert _manifest(folder)["cached_scales"] == [18]
    builder = buffer_builder.BatchBuilder(index.paths, index.labels, Recipe.from_settings(cfg, SOLID_BATCH, [18]))
    for b in (4, 5):
        assert np.array_equal(np.load(buffer_files.batch_file(folder, "X", 0, b)), builder.build(0, b)[0])
    off = solid_config_for(str(tmp_path / "off"), solid_dataset, train={"buffer_folder": folder},
                           preprocess={"path_to_save": cache}, runtime_preprocessing={"use_scale_cache": "false"})
    r = run_producer(off, "--once", epoch_start="auto")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: The buffer folder {folder} holds batches built with scale 18 from the scale cache but this "
        f"producer would build the rest with scale 18 decoded afresh, so they would differ from an uninterrupted "
        f"run's; set [runtime_preprocessing] use_scale_cache = true to continue the run, or pass --clear_buffer "
        f"to start the buffer over.")


@pytest.mark.parametrize("when", ["filling", "full"])  # a worker's batch write or the heartbeat finds it gone
def test_deleting_the_buffer_folder_under_a_running_producer_is_one_sentence_and_exit_2(solid_dataset, tmp_path,
                                                                                       when):
    config = solid_config_for(str(tmp_path), solid_dataset, train={"buffer_size": "6"})
    folder = load_settings(config).train.buffer_folder
    p = subprocess.Popen(producer_cmd(config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: os.path.isdir(folder) and complete_count(folder) >= (1 if when == "filling" else 6))
        os.rename(folder, folder + "-gone")  # rm -rf, but at once: the producer may be writing a file meanwhile
        shutil.rmtree(folder + "-gone")
        stderr = p.communicate(timeout=30)[1]
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: The buffer folder {folder} was deleted under the running producer; rerun runtime_preprocessing.py "
        f"with --epoch_start=auto to recreate it and continue.")


def test_a_buffer_folder_deleted_while_the_index_loads_is_the_same_sentence(solid_dataset, tmp_path, monkeypatch):
    config = solid_config_for(str(tmp_path), solid_dataset)
    cfg = load_settings(config)
    real = buffer_producer.load_source_index

    def load_then_delete(*args):
        index = real(*args)
        shutil.rmtree(cfg.train.buffer_folder)
        return index
    monkeypatch.setattr(buffer_producer, "load_source_index", load_then_delete)
    with pytest.raises(UserError, match=r"^The buffer folder .*buffer was deleted under the running producer; "
                                              r"rerun runtime_preprocessing.py with --epoch_start=auto"):
        buffer_producer.Producer(cfg, SOLID_BATCH, 0, 2, progress=False).run()
