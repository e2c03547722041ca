"""The buffer protocol in-process: file names and order, the refill rule, progress, manifest, BufferReader."""
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from settings import load_settings
from utils.errors import UserError
from utils.files import atomic_write_bytes, atomic_write_text, is_temp_name
from data.buffer import files, protocol, reader as buffer_reader
from tests.helpers import fake_batch, fake_manifest, wait_until, write_heartbeat, write_solid_config

# ----------------------------------------------------------------------------
# Helpers shared with tests/test_producer.py
# ----------------------------------------------------------------------------


@pytest.fixture
def buffer_setup(tmp_path):
    cfg = load_settings(write_solid_config(str(tmp_path), train={"wait_timeout": "0.5"}))
    os.makedirs(cfg.train.buffer_folder)
    atomic_write_text(os.path.join(cfg.train.buffer_folder, protocol.MANIFEST), json.dumps(fake_manifest()))
    return cfg, cfg.train.buffer_folder


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------

def test_batch_is_complete_only_with_images_file(tmp_path):
    folder = str(tmp_path)
    files.write_batch(folder, 2, 7, *fake_batch())
    assert sorted(os.listdir(folder)) == ["L_2_7.npy", "X_2_7.npy", "Y_2_7.npy"]
    assert files.scan_batches(folder) == ({(2, 7)}, set())
    assert files.batch_header_ok(folder, 2, 7, 4, 16)
    assert not files.batch_header_ok(folder, 2, 7, 8, 16)  # another batch size
    os.remove(files.batch_file(folder, "X", 2, 7))
    assert files.scan_batches(folder) == (set(), {(2, 7)})
    files.write_batch(folder, 2, 7, *fake_batch())
    with open(files.batch_file(folder, "X", 2, 7), "r+b") as f:
        f.truncate(1000)  # a torn write (cannot happen through atomic_save_npy, but a copy could)
    assert not files.batch_header_ok(folder, 2, 7, 4, 16)
    files.delete_batch(folder, 2, 7)
    assert os.listdir(folder) == []


def test_buffer_bytes_per_image_are_uint8():
    per_image = files.bytes_per_batch(64, 224) / 64
    assert 224 * 224 * 3 <= per_image < 224 * 224 * 3 + 40  # images 150,528 B, labels/lighting 16 B, headers
    assert 1000 * files.bytes_per_batch(64, 224) < 9.7e9  # the 9.6 GB for buffer_size 1000


@pytest.mark.parametrize("pos, ready, expect_stale, expect_build", [
    (0, set(), set(), list(range(0, 10))),                        # empty: fill the window
    (1, set(range(0, 10)), {0}, []),                                # lead 9 >= 8: only delete consumed
    (2, set(range(0, 10)), {0, 1}, []),                             # lead 8 >= 8 (strict <, as the original)
    (3, set(range(0, 10)), {0, 1, 2}, [10, 11, 12]),                # lead 7 < 8: refill to pos + 10
    (95, set(range(93, 100)), {93, 94}, []),                        # the window stops at the range end
    (10, set(range(50, 60)), set(range(50, 60)), list(range(10, 20))),  # trainer restarted earlier
    (0, {0, 1, 3, 4, 5, 6, 7, 8, 9}, set(), [2]),                   # a hole caps the lead
])
def test_refill_rule(pos, ready, expect_stale, expect_build):
    stale, build = files.plan_refill(pos, ready, 10, 8.0, 100)
    assert stale == expect_stale and build == expect_build
    assert len((ready - stale) | set(build)) <= 10


def test_progress_file_roundtrip_and_garbage(tmp_path):
    folder = str(tmp_path)
    assert protocol.read_progress(folder) is None
    protocol.write_progress(folder, 3, 17)
    assert protocol.read_progress(folder) == (3, 17)
    with open(os.path.join(folder, protocol.PROGRESS), "w") as f:
        f.write("")  # the original's non-atomic write could leave this
    assert protocol.read_progress(folder) is None
    assert not any(is_temp_name(n) for n in os.listdir(folder))


def test_manifest_differences_name_the_setting():
    a, b = fake_manifest(batch_size=4), fake_manifest(batch_size=8)
    assert protocol.manifest_differences(a, a) == []
    diffs = protocol.manifest_differences(a, b)
    assert any(d.startswith("batch_size 4 -> 8") for d in diffs)
    assert a["run_id"] != b["run_id"]


def test_the_manifest_records_decoder_and_cached_scales_without_changing_the_run_id():
    from data.buffer.builder import Recipe
    recipe = Recipe(seed=0, batch_size=4, crop=16, scales=(18, 22), pca_std=0.1, mu=(0.5, 0.45, 0.4),
                    sigma=(0.25, 0.26, 0.27))
    plain = protocol.make_manifest(recipe, "f" * 32, 20, 5, 0, 3)
    cached = protocol.make_manifest(dataclasses.replace(recipe, decoder="pil", cached_scales=frozenset({22, 18})),
                                    "f" * 32, 20, 5, 0, 3)
    assert (plain["decoder"], plain["cached_scales"]) == ("turbojpeg", [])
    assert (cached["decoder"], cached["cached_scales"]) == ("pil", [18, 22])
    # The id buffers written before cached_scales was recorded carry: a restarted producer and a running
    # trainer still see the same run (the producer checks decoder and cached scales itself).
    assert plain["run_id"] == cached["run_id"] == "0519ce29291b6d36"


# ----------------------------------------------------------------------------
# BufferReader
# ----------------------------------------------------------------------------

def test_reader_waits_reads_in_order_and_reports(buffer_setup):
    cfg, folder = buffer_setup
    write_heartbeat(folder)
    reader = buffer_reader.BufferReader(cfg, 4)
    assert reader.batches_per_epoch == 5 and reader.crop_size(0) == 16 and reader.num_classes == 5

    def late_writer():  # the batch appears once the reader has announced its position and waits for it
        wait_until(lambda: protocol.read_progress(folder) == (0, 0), timeout=30)
        files.write_batch(folder, 0, 0, *fake_batch(value=7))
    t = threading.Thread(target=late_writer)
    t.start()
    batch = reader.read(0, 0)
    t.join()
    assert batch.images.dtype == np.uint8 and batch.images.shape == (4, 16, 16, 3) and int(batch.images[0, 0, 0, 0]) == 7
    assert batch.labels.dtype == np.int32 and batch.lighting.dtype == np.float32
    assert reader.wait_seconds > 0
    assert protocol.read_progress(folder) == (0, 0)  # the first read announces where the trainer starts
    reader.report_progress(0, 1)
    assert protocol.read_progress(folder) == (0, 1)
    with pytest.raises(ValueError, match="in order"):
        reader.read(0, 0)  # never twice
    with pytest.raises(ValueError, match="in order"):
        reader.read(0, 2)  # never skipped
    reader.report_progress(0, 5)
    assert protocol.read_progress(folder) == (1, 0)  # the end of an epoch is the start of the next


def test_a_new_reader_removes_the_progress_temp_of_a_killed_trainer(buffer_setup):
    cfg, folder = buffer_setup
    left = os.path.join(folder, f".tmp-{protocol.PROGRESS}-4242-a1b2c3")  # utils.files.temp_name's form
    with open(left, "w") as f:
        f.write("0\n3\n")
    buffer_reader.BufferReader(cfg, 4)
    assert os.listdir(folder) == [protocol.MANIFEST]  # the temp only: the producer sweeps it a minute later


def test_reader_refuses_foreign_batch_files(buffer_setup):
    cfg, folder = buffer_setup
    images, labels, lighting = fake_batch(crop=20)
    files.write_batch(folder, 0, 0, images, labels, lighting)
    with pytest.raises(UserError, match="does not belong to this buffer"):
        buffer_reader.BufferReader(cfg, 4).read(0, 0)
    atomic_write_bytes(files.batch_file(folder, "X", 0, 0), b"not an npy file")
    with pytest.raises(UserError, match="not a readable batch file"):
        buffer_reader.BufferReader(cfg, 4).read(0, 0)


def test_reader_refuses_batch_size_mismatch_in_one_sentence(buffer_setup):
    cfg, _ = buffer_setup
    with pytest.raises(UserError) as err:
        buffer_reader.BufferReader(cfg, 8).check_manifest()
    text = str(err.value)
    assert "4 images" in text and "--batch_size=8" in text and text.count(". ") == 0 and "\n" not in text


def test_reader_refuses_other_normalisation(buffer_setup):
    cfg, _ = buffer_setup
    reader = buffer_reader.BufferReader(cfg, 4)
    reader.check_manifest((0.5, 0.45, 0.4), (0.25, 0.26, 0.27))
    with pytest.raises(UserError, match="normalises with"):
        reader.check_manifest((0.4, 0.45, 0.4), (0.25, 0.26, 0.27))


def test_reader_times_out_without_producer(buffer_setup):
    cfg, folder = buffer_setup
    reader = buffer_reader.BufferReader(cfg, 4)
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        reader.read(0, 0)
    assert time.monotonic() - t0 < 3
    assert folder in str(err.value) and "runtime_preprocessing.py" in str(err.value)


def test_a_reader_waits_for_a_buffer_folder_that_does_not_exist_yet_without_creating_it(tmp_path, monkeypatch):
    cfg = load_settings(write_solid_config(str(tmp_path), train={"wait_timeout": "0.3"}))
    folder = cfg.train.buffer_folder
    with pytest.raises(UserError, match=r"Waited 0 s for the buffer manifest in .*buffer but the folder does "
                                              r"not exist \(no producer has started there"):
        buffer_reader.BufferReader(cfg, 4).check_manifest()
    assert not os.path.exists(folder)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, wait_timeout=30))
    reader, found = buffer_reader.BufferReader(cfg, 4), []
    waiting = threading.Thread(target=lambda: found.append(reader.check_manifest()))
    polls = []

    class CountingTime:  # the reader module's `time`, counting its sleeps between looks
        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds):
            polls.append(seconds)
            time.sleep(seconds)
    monkeypatch.setattr(buffer_reader, "time", CountingTime())
    waiting.start()
    assert wait_until(lambda: len(polls) >= 3, timeout=30)  # it has looked for the manifest three times
    assert waiting.is_alive() and not os.path.exists(folder)  # waits, and leaves the folder to the producer
    os.makedirs(folder)  # the producer starts: folder, manifest, a first batch
    files.write_batch(folder, 0, 0, *fake_batch())
    atomic_write_text(os.path.join(folder, protocol.MANIFEST), json.dumps(fake_manifest()))
    waiting.join(10)
    assert found == [fake_manifest()]


def test_reader_detects_killed_producer_by_pid(buffer_setup):
    cfg, folder = buffer_setup
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_heartbeat(folder, pid=dead.pid)  # fresh timestamp, but the process is gone
    assert protocol.producer_status(folder)[0] == "dead"
    write_heartbeat(folder, stamp=time.time() - 60)  # our pid, but no beat for a minute
    assert protocol.producer_status(folder)[0] == "dead"
    with pytest.raises(UserError, match="heartbeat stopped"):
        buffer_reader.BufferReader(cfg, 4).read(0, 0)


def test_reader_names_epoch_range_mismatch(buffer_setup):
    cfg, folder = buffer_setup
    write_heartbeat(folder, epoch_end=1)
    reader = buffer_reader.BufferReader(cfg, 4)
    reader.check_manifest()
    reader._last = (0, 4)  # as if epoch 0 was read
    with pytest.raises(UserError, match="--epoch_end=2"):
        reader.read(1, 0)


def test_reader_refuses_manifest_of_another_run_mid_training(buffer_setup):
    cfg, folder = buffer_setup
    write_heartbeat(folder)
    files.write_batch(folder, 0, 0, *fake_batch())
    reader = buffer_reader.BufferReader(cfg, 4)
    reader.read(0, 0)
    other = fake_manifest(num_classes=7)
    time.sleep(0.01)
    atomic_write_text(os.path.join(folder, protocol.MANIFEST), json.dumps(other))
    files.write_batch(folder, 0, 1, *fake_batch())
    with pytest.raises(UserError, match="switched to another run"):
        reader.read(0, 1)


def test_a_batch_is_not_visible_under_its_name_until_its_images_are_all_written(tmp_path, monkeypatch):
    """Every write into a batch file happens while the batch's X name does not exist yet (a temp name, then
    a rename), for a new file and for a recycled spare; a killed writer can therefore leave nothing partial."""
    import builtins
    folder = str(tmp_path)
    target, seen = [None], []
    real_open = builtins.open

    class Spy:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            seen.append(os.path.exists(target[0]))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Spy(real_open(*a, **k)))
    target[0] = files.batch_file(folder, "X", 0, 0)
    files.write_batch(folder, 0, 0, *fake_batch(value=1))
    spare = files.spare_file(folder, 1)
    assert files.retire_batch(folder, 0, 0, spare)
    target[0] = files.batch_file(folder, "X", 0, 1)
    files.write_batch(folder, 0, 1, *fake_batch(value=2), reuse=spare)
    monkeypatch.undo()
    assert len(seen) >= 6 and not any(seen), seen
    assert files.scan_batches(folder)[0] == {(0, 1)}
    assert int(np.load(files.batch_file(folder, "X", 0, 1))[0, 0, 0, 0]) == 2
