"""Power-cut safety of the run folder: every file renamed into it reaches the disk first.

A rename can be committed by the file system before the renamed file's data blocks, so
after a power cut the new name can point at an empty file. The run folder's writers
(epoch folders, log.csv, accuracy.csv, accuracy.png) fsync the content before the rename
and the folder after it; the buffer (a regenerable RAM disk) does neither, to stay fast.
These tests record the order of fsync and rename calls.
"""
import os

import numpy as np
import pytest

from utils.errors import UserError
from utils.files import atomic_save_npy, atomic_write_text


@pytest.fixture
def events(monkeypatch):
    """[("fsync", path) | ("rename", src, dst)] in call order."""
    seen = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **k):
        seen.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
        return real_rename(src, dst, *a, **k)

    def replace(src, dst, *a, **k):
        seen.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def assert_durable_rename(events, final):
    """Everything under the temp name was fsynced before the rename to `final`, its folder after."""
    final = os.path.abspath(final)
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == final]
    assert len(renames) == 1, events
    at, tmp = renames[0], events[renames[0]][1]
    synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
    if os.path.isdir(final):
        inside = {os.path.join(tmp, os.path.relpath(os.path.join(d, n), final))
                  for d, dirs, files in os.walk(final) for n in dirs + files} | {tmp}
    else:
        inside = {tmp}
    assert inside <= synced_before, inside - synced_before
    assert ("fsync", os.path.dirname(final)) in events[at + 1:]


def test_an_epoch_folder_is_on_disk_before_its_name_and_its_name_after(tmp_path, events):
    from engine import run_folder
    from tests.helpers import fake_parts
    run = str(tmp_path / "run")
    run_folder.save_epoch(run, 0, fake_parts)
    assert_durable_rename(events, os.path.join(run, "0"))
    assert len([e for e in events if e[0] == "fsync"]) == 6  # 2 files, 2 subfolders, the temp folder, the run


def test_log_csv_accuracy_csv_and_the_plot_are_fsynced_around_their_rename(tmp_path, events):
    from engine import accuracy_log, logs
    run = str(tmp_path / "run")
    os.makedirs(run)
    logs.write_epoch_row(run, {k: 1.0 for k in logs.CSV_FIELDS} | {"epoch": 0})
    assert_durable_rename(events, os.path.join(run, logs.CSV_NAME))
    events.clear()
    accuracy_log.write_rows(os.path.join(run, accuracy_log.CSV_NAME), [])
    assert_durable_rename(events, os.path.join(run, accuracy_log.CSV_NAME))
    events.clear()
    from engine.plot import plot_accuracy
    png = os.path.join(run, accuracy_log.PNG_NAME)
    plot_accuracy([], png, "run")
    assert_durable_rename(events, png)


def test_buffer_writes_stay_unsynced(tmp_path, events):
    atomic_save_npy(str(tmp_path / "X_0_0.npy"), np.zeros((2, 4, 4, 3), np.uint8))
    atomic_write_text(str(tmp_path / "progress.txt"), "0\n1\n")
    assert [e[0] for e in events] == ["rename", "rename"]


def test_a_full_disk_at_fsync_is_the_disk_full_sentence_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="Disk full writing log.csv"):
        atomic_write_text(str(tmp_path / "log.csv"), "epoch\n", durable=True)
    assert os.listdir(tmp_path) == []
