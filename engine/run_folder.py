"""The run folder: <path_for_saving>/<run>/.

    <run>/<epoch>/saved_model/   SavedModel (check_accuracy.py, inference; model.export)
    <run>/<epoch>/saved_model_ema/  the same for the weight EMA ([train] ema_decay > 0; engine/ema.py)
    <run>/<epoch>/checkpoint/    tf.train.Checkpoint: weights, moving statistics, optimizer
                                 slots, loss scale, step counter, epoch
    <run>/<epoch>/config.txt     resolved config, command line and git hash
    <run>/log.csv                one row per epoch (engine.logs)
    <run>/batches.log            "epoch batch" per optimizer step, appended
    <run>/tensorboard/           TensorBoard events
    <run>/train.log              the trainer's log

Every name above is spelled here only (the constants below): writers and finders both use them.
An epoch folder is built under a '.tmp-' name and renamed when all three parts
are written, so a reader (check_accuracy.py, a resume) never sees a partial one;
a killed save leaves only a temp folder, removed by the next train.py on the run.
A lock file keeps two trainers off one run folder.
"""
import contextlib
import os
import shutil
import tempfile

from utils.cli import check_epoch_range
from utils.errors import UserError
from utils.files import atomic_dir, exclusive_lock, is_temp_name, remove_stale_temps, temp_name

CHECKPOINT_DIR, CHECKPOINT_PREFIX = "checkpoint", "ckpt"  # <epoch>/checkpoint/ckpt.index, ckpt.data-*
MODEL_FOLDERS = {"raw": "saved_model", "ema": "saved_model_ema"}  # by weights: the trained ones, their EMA
WEIGHTS = tuple(MODEL_FOLDERS)
CONFIG_NAME = "config.txt"    # <epoch>/config.txt: the resolved settings, command line and git hash
LOCK_NAME = "train.lock"
TRAIN_LOG = "train.log"       # <run>/train.log
EPOCH_CSV = "log.csv"         # <run>/log.csv (engine/logs.py)
BATCH_LOG = "batches.log"     # <run>/batches.log (engine/logs.py)
TENSORBOARD_DIR = "tensorboard"
ACCURACY_CSV, ACCURACY_PNG = "accuracy.csv", "accuracy.png"  # engine/accuracy_log.py


def run_dir(path_for_saving, run):
    """<path_for_saving>/<run>; an absolute --run_folder is used as is (as check_accuracy.py does)."""
    if not run or not run.strip() or os.path.basename(os.path.normpath(run)) in ("", ".", ".."):
        raise UserError(f"--run_folder must name a folder, received '{run}'; runs are created under "
                        f"[train] path_for_saving.")
    return os.path.normpath(os.path.join(path_for_saving, run))


def epoch_dir(run_path, epoch):
    return os.path.join(run_path, str(epoch))


def checkpoint_prefix(epoch_path):
    return os.path.join(epoch_path, CHECKPOINT_DIR, CHECKPOINT_PREFIX)


def saved_model_dir(epoch_path, weights="raw"):
    return os.path.join(epoch_path, MODEL_FOLDERS[weights])


def config_path(epoch_path):
    return os.path.join(epoch_path, CONFIG_NAME)


def is_complete(epoch_path):
    return (os.path.isdir(saved_model_dir(epoch_path))
            and os.path.isfile(checkpoint_prefix(epoch_path) + ".index")
            and os.path.isfile(config_path(epoch_path)))


def folder_bytes(path):
    """Total size of the files under `path`."""
    return sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(path) for name in names)


def complete_epochs(run_path):
    """Sorted epoch numbers whose folder holds all three parts."""
    if not os.path.isdir(run_path):
        return []
    epochs = [int(n) for n in os.listdir(run_path) if n.isdigit() and not is_temp_name(n)]
    return sorted(e for e in epochs if is_complete(epoch_dir(run_path, e)))


def resolve_epoch_start(run_path, epoch_start):
    """'auto' -> one past the last complete epoch (0 for a new run); else the integer."""
    if epoch_start == "auto":
        done = complete_epochs(run_path)
        return done[-1] + 1 if done else 0
    return int(epoch_start)  # checked by utils/cli.py epoch_start_arg


def resume_advice(run_path, epoch_start):
    """What to rerun after an interrupt: the same command, unless it would now collide with an epoch
    saved since it started (an integer --epoch_start at or below a saved epoch): then --epoch_start=auto."""
    done = complete_epochs(run_path)
    if done and epoch_start != "auto" and done[-1] >= int(epoch_start):
        return (f"Epoch {done[-1]} is saved in {run_path}: rerun with --epoch_start=auto to continue "
                f"from epoch {done[-1] + 1}.")
    return "Rerun the same command to resume."


def check_plan(run_path, epoch_start, epoch_end, overwrite):
    """Fail before any training if the epochs cannot be written or the resume source is missing."""
    check_epoch_range(epoch_start, epoch_end)
    existing = [e for e in range(epoch_start, epoch_end) if os.path.exists(epoch_dir(run_path, e))]
    if existing and not overwrite:
        raise UserError(f"{run_path} already holds epoch folder(s) {', '.join(map(str, existing))}; "
                        f"pass --epoch_start=auto to continue after the last complete epoch (or --overwrite to "
                        f"retrain and replace them, or another --run_folder).")
    if epoch_start > 0:
        source = epoch_dir(run_path, epoch_start - 1)
        if not is_complete(source):
            done = complete_epochs(run_path)
            hint = f"the last complete epoch is {done[-1]}" if done else "the run has no complete epoch"
            raise UserError(f"cannot resume at epoch {epoch_start}: {source} with saved_model/, checkpoint/ and "
                            f"config.txt does not exist ({hint}); use --epoch_start=auto.")
        return checkpoint_prefix(source)
    return None


@contextlib.contextmanager
def locked(run_path):
    """Hold an exclusive lock on the run folder; stale temp folders of killed saves are removed."""
    os.makedirs(run_path, exist_ok=True)
    with exclusive_lock(os.path.join(run_path, LOCK_NAME),
                        f"another train.py is using {run_path}; wait for it to finish or stop it."):
        remove_stale_temps(run_path)
        yield


@contextlib.contextmanager
def removed_if_left_empty(run_path):
    """A run folder this train.py created is removed again if it fails before writing more than
    its lock and log (Trainer checks that fail after the lock, say): no empty run is left behind."""
    created = not os.path.exists(run_path)
    try:
        yield
    except UserError:
        if created and os.path.isdir(run_path) and set(os.listdir(run_path)) <= {LOCK_NAME, TRAIN_LOG}:
            shutil.rmtree(run_path, ignore_errors=True)
        raise


def save_epoch(run_path, epoch, write_parts, overwrite=False, chief=True, durable=True):
    """Build <run>/<epoch>/ with write_parts(tmp_folder), then rename it into place.

    With overwrite, the old folder is moved aside only after the new one is complete
    (a kill between the two renames leaves both under temp names: rerun that epoch).
    Non-chief workers of a multi-worker run write to a private scratch folder that
    is deleted, because every worker must take part in saving mirrored variables.
    durable: fsync the whole folder before the rename and the run folder after it, so a power
    cut leaves the epoch whole or absent (bench/bench_save.py measures the cost).
    """
    if not chief:
        scratch = tempfile.mkdtemp(prefix="worker-save-")
        try:
            write_parts(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return None
    final = epoch_dir(run_path, epoch)
    aside = None
    with atomic_dir(final, durable=durable) as tmp:
        write_parts(tmp)
        if os.path.exists(final):
            if not overwrite:
                raise UserError(f"{final} appeared while this epoch was being saved; another writer is using the "
                                f"run folder.")
            aside = temp_name(final)
            os.rename(final, aside)
    if aside:
        shutil.rmtree(aside, ignore_errors=True)
    return final
