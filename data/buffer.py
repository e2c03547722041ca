"""The batch buffer shared by runtime_preprocessing.py (producer) and train.py (BufferReader).

Files in buffer_folder (all written through utils' atomic helpers):
  Y_<epoch>_<batch>.npy   int32 [B] labels                      written first
  L_<epoch>_<batch>.npy   float32 [B, 3] PCA lighting alphas     written second (the shift: data/device.py)
  X_<epoch>_<batch>.npy   uint8 [B, crop, crop, 3] images        written LAST: a batch is complete iff X exists
  manifest.json           what the producer promises: run id, batch size, crop size per epoch, dtype,
                          seed, num_batches, num_classes, dataset fingerprint, epoch range
  producer.json           the producer's heartbeat: pid, host, time, state, epoch range
  training_progress.txt   'epoch\\nbatch': the next batch the trainer needs (everything before it is consumed)
Epochs are absolute; batch b of epoch e holds positions b*B .. b*B+B-1 of that epoch's permutation
(data/augment.py); num_batches = N // B (the remainder is dropped, as the original). Deletion
removes X first, so a batch is never seen half-deleted either. A consumed X file is not unlinked
but renamed to a spare (.tmp-spare-*, never read as a batch) that the next batch's X overwrites in
place before its own rename: rewriting pages a file already has is several times cheaper than
freeing them and allocating new ones. Spares replace batches one for one, so batch files and
spares together stay within buffer_size; like every temp file they are swept on start and exit.

Producer loop (the seed's rule, kept): read the trainer's position p from training_progress.txt,
delete consumed batches (before p) and any outside the window [p, p + buffer_size); if fewer than
refill_threshold * buffer_size consecutive batches are ready from p, build the missing ones of the
window (across epoch boundaries, up to epoch_end), else sleep sleep_time. At most buffer_size
batches are ever on disk. During a refill the position is re-read, consumed batches are deleted
as the trainer goes, and a trainer that restarted earlier (position moved back) re-plans the fill.

Restart: the producer removes its temp files and half-written batches, checks the manifest (same
settings: keeps the valid batches and continues; different run, batch size or crop: refuses,
or clears with --clear_buffer), and follows the progress file clamped to [epoch_start, epoch_end].
It leaves no temp file or half-written batch behind when it stops.

Start order does not matter (two terminals, a launcher, a reboot):
- the progress file outlives runs, so a producer only believes the file it finds at start-up if it
  says (epoch_start, 0), or, with --epoch_start=auto, any position before epoch_end; otherwise it
  builds from epoch_start (auto: the first ready batch, else 0) until the trainer rewrites the file.
  The trainer's reader reports its position on its first read and again whenever it sees a producer
  it has not seen before, so a restarted producer catches up with a running trainer at once, and a
  trainer restarted at epoch E after a crash mid-epoch gets batches from (E, 0).
- the manifest also outlives its producer: the reader takes it once a live producer's heartbeat
  carries its run id (or it agrees with the trainer and batches are waiting); a disagreeing one
  from a producer that is not running is waited on (wait_timeout, with a warning) and refused
  only once a live producer stands behind it or the wait runs out.
"""
import collections
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import time

import numpy as np

import utils
from data.batch_workers import WorkerSet
from utils import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: L holds the lighting coefficients, not the shifts
MANIFEST = "manifest.json"
HEARTBEAT = "producer.json"
PROGRESS = "training_progress.txt"
DTYPE = "uint8"
KINDS = ("Y", "L", "X")  # write order; X (images) last marks the batch complete
_BATCH_NAME = re.compile(r"^([XYL])_(\d+)_(\d+)\.npy$")
SPARE = "spare-"
_OWN_FILES = (MANIFEST, HEARTBEAT, SPARE)
STATUS_POLL = 0.25  # seconds between a waiting reader's looks at the producer's heartbeat


# ----------------------------------------------------------------------------
# Names and files
# ----------------------------------------------------------------------------

def batch_file(folder, kind, epoch, batch):
    return os.path.join(folder, f"{kind}_{int(epoch)}_{int(batch)}.npy")


def parse_batch_name(name):
    """(kind, epoch, batch) for a batch file name, else None."""
    m = _BATCH_NAME.match(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def bytes_per_batch(batch_size, crop):
    return batch_size * (crop * crop * 3 + 4 + 12) + 3 * 128  # images, labels, lighting, npy headers


def write_batch(folder, epoch, batch, images, labels, lighting, reuse=None):
    """The batch's three files, X last; `reuse`: a spare (retire_batch) to overwrite with X."""
    utils.atomic_save_npy(batch_file(folder, "Y", epoch, batch), np.asarray(labels, np.int32))
    utils.atomic_save_npy(batch_file(folder, "L", epoch, batch), np.asarray(lighting, np.float32))
    utils.atomic_save_npy(batch_file(folder, "X", epoch, batch), np.asarray(images, np.uint8), reuse=reuse)


def spare_file(folder, number):
    """A consumed X file kept under a temp name for the next batch to overwrite (never read as a batch)."""
    return os.path.join(folder, f"{utils.TMP_PREFIX}{SPARE}{os.getpid()}-{number}.npy")


def retire_batch(folder, epoch, batch, spare):
    """Like delete_batch, but the X file becomes `spare`; False if there was no X file to keep."""
    try:
        os.replace(batch_file(folder, "X", epoch, batch), spare)  # first: the batch stops being complete
        kept = True
    except FileNotFoundError:
        kept = False
    delete_batch(folder, epoch, batch)
    return kept


def delete_batch(folder, epoch, batch):
    for kind in reversed(KINDS):  # X first: the batch stops being complete before anything else goes
        try:
            os.remove(batch_file(folder, kind, epoch, batch))
        except FileNotFoundError:
            pass


def scan_batches(folder):
    """(complete, partial): sets of (epoch, batch) with an X file, and with only Y/L files."""
    kinds = collections.defaultdict(set)
    for name in os.listdir(folder):
        parsed = parse_batch_name(name)
        if parsed:
            kinds[parsed[1:]].add(parsed[0])
    complete = {key for key, k in kinds.items() if "X" in k}
    return complete, set(kinds) - complete


def expected_shapes(batch_size, crop):
    return {"X": ((batch_size, crop, crop, 3), np.dtype(np.uint8)), "Y": ((batch_size,), np.dtype(np.int32)),
            "L": ((batch_size, 3), np.dtype(np.float32))}


def batch_header_ok(folder, epoch, batch, batch_size, crop):
    """True if all three files exist with the expected npy header and full length (no data read)."""
    for kind, (shape, dtype) in expected_shapes(batch_size, crop).items():
        path = batch_file(folder, kind, epoch, batch)
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                got_shape, fortran, got_dtype = read_header(f)
                data_start = f.tell()
            size = os.path.getsize(path)
        except (OSError, ValueError):
            return False
        if got_shape != shape or got_dtype != dtype or fortran or size != data_start + dtype.itemsize * np.prod(shape):
            return False
    return True


def plan_refill(pos, ready, buffer_size, refill_below, end):
    """The producer's rule: (batches to delete, batches to build), as linear positions.

    The window is [pos, min(pos + buffer_size, end)). Batches outside it go (consumed,
    or left from a trainer that restarted earlier). If fewer than `refill_below`
    consecutive batches are ready from pos, every missing batch of the window is
    built, in order; otherwise nothing is.
    """
    window_end = min(pos + buffer_size, end)
    stale = {lin for lin in ready if not pos <= lin < window_end}
    lead = 0
    while pos + lead < window_end and pos + lead in ready:
        lead += 1
    if lead >= refill_below:
        return stale, []
    return stale, [lin for lin in range(pos, window_end) if lin not in ready]


# ----------------------------------------------------------------------------
# Progress file (written by the trainer, read by the producer)
# ----------------------------------------------------------------------------

def _file_identity(path):
    """(inode, mtime, size) of a file, None if absent: an atomic rewrite always changes it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_progress(folder):
    """(epoch, next_batch) from training_progress.txt, or None if absent or unreadable."""
    try:
        with open(os.path.join(folder, PROGRESS)) as f:
            parts = f.read().split()
        epoch, batch = int(parts[0]), int(parts[1])
    except (OSError, ValueError, IndexError):
        return None
    return (epoch, batch) if epoch >= 0 and batch >= 0 else None


def write_progress(folder, epoch, batch):
    path = os.path.join(folder, PROGRESS)
    for attempt in range(3):
        try:
            utils.atomic_write_text(path, f"{int(epoch)}\n{int(batch)}\n")
            return
        except FileNotFoundError:  # our temp file was swept by a starting producer; write again
            if attempt == 2:
                raise


# ----------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------

# Keys that determine batch contents: any difference means "another run".
IDENTITY_KEYS = ("format_version", "seed", "batch_size", "crop_sizes", "augmentation", "dtype", "num_batches",
                 "num_classes", "dataset_fingerprint", "scales", "pca_std", "mu", "sigma")


def make_manifest(recipe, fingerprint, num_images, num_classes, epoch_start, epoch_end):
    ident = {"format_version": FORMAT_VERSION, "seed": recipe.seed, "batch_size": recipe.batch_size,
             "crop_sizes": recipe.crop_sizes or [[0, recipe.crop]], "augmentation": _augmentation_identity(recipe),
             "dtype": DTYPE, "num_batches": num_images // recipe.batch_size,
             "num_classes": num_classes, "dataset_fingerprint": fingerprint, "scales": list(recipe.scales),
             "pca_std": recipe.pca_std, "mu": list(recipe.mu), "sigma": list(recipe.sigma)}
    import hashlib
    run_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return {"run_id": run_id, **ident, "num_images": num_images, "epoch_start": epoch_start,
            "epoch_end": epoch_end, "decoder": recipe.decoder}


def load_manifest(folder):
    """The manifest dict, None if absent; a manifest that is not JSON counts as foreign ({})."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def manifest_differences(old, new):
    """Human-readable 'key old -> new' for identity keys that differ."""
    return [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in IDENTITY_KEYS if old.get(k) != new.get(k)]


def _short(value):
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _augmentation_identity(recipe):
    if recipe.augmentation == "tiny":
        return {"tiny": dataclasses.asdict(recipe.tiny), "full_size": recipe.crop}
    return recipe.augmentation


def crop_size_for(manifest, epoch):
    from data.progressive import crop_for
    return crop_for(manifest["crop_sizes"], epoch)


# ----------------------------------------------------------------------------
# Heartbeat
# ----------------------------------------------------------------------------

class Heartbeat(threading.Thread):
    """Rewrites producer.json every `interval` seconds so the trainer can tell a live producer from a dead one."""

    def __init__(self, folder, interval, info):
        super().__init__(daemon=True, name="heartbeat")
        self.path = os.path.join(folder, HEARTBEAT)
        self.interval, self.info = interval, dict(info)
        self._stop_event = threading.Event()
        self.error = None
        self.beat("running")

    def beat(self, state):
        record = {**self.info, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                  "interval": self.interval, "state": state}
        utils.atomic_write_text(self.path, json.dumps(record) + "\n")

    def run(self):
        while not self._stop_event.wait(self.interval):
            try:
                self.beat("running")
            except (OSError, UserError) as e:  # reported by the main loop, which cannot see this thread's stack
                self.error = e

    def stop(self, state):
        self._stop_event.set()
        if self.is_alive():
            self.join()
        try:
            self.beat(state)
        except (OSError, UserError):
            pass


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a killed child not yet reaped
    except (OSError, IndexError):
        return True


def producer_status(folder):
    """(state, record): state is 'running', 'finished', 'stopped', 'dead' or 'absent'."""
    try:
        with open(os.path.join(folder, HEARTBEAT)) as f:
            record = json.load(f)
        stamp, interval, state = float(record["time"]), float(record["interval"]), str(record["state"])
    except FileNotFoundError:
        return "absent", None
    except (OSError, ValueError, KeyError, TypeError):
        return "dead", None
    if state != "running":
        return state, record
    if record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", -1))):
        return "dead", record
    if time.time() - stamp > 3 * interval + 5.0:
        return "dead", record
    return "running", record


# ----------------------------------------------------------------------------
# Trainer side
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    images: np.ndarray    # uint8 [B, crop, crop, 3]
    labels: np.ndarray    # int32 [B]
    lighting: np.ndarray  # float32 [B, 3], additive shift in normalised units
    epoch: int
    batch: int


class BufferReader:
    """The trainer's view of the buffer: waits for batches in order, validates them, reports progress.

        reader = BufferReader(cfg, batch_size)
        reader.check_manifest(mu, sigma)            # optional; read() checks on first use
        for b in range(start, reader.num_batches(epoch)):
            batch = reader.read(epoch, b)           # waits while the producer catches up
            ... train ...
            reader.report_progress(epoch, b + 1)    # lets the producer delete and refill
    """

    def __init__(self, cfg, batch_size):
        self.folder = cfg.train.buffer_folder
        self.batch_size = int(batch_size)
        self.sleep_time = max(float(cfg.train.sleep_time), 0.01)
        self.wait_timeout = float(cfg.train.wait_timeout)
        self.seed, self.crop = cfg.train.seed, cfg.images.crop_size
        from data.progressive import crop_schedule
        self.crop_sizes = crop_schedule(cfg)  # a bad [images] crop_schedule stops the trainer here
        self.wait_seconds = 0.0
        self.manifest = None
        self._mu_sigma = (None, None)
        self._manifest_stat = None
        self._last = None
        self._reported = None       # the last (epoch, batch) written to the progress file
        self._producer_seen = None  # (host, pid) of the last live producer seen while waiting

    # -- manifest ------------------------------------------------------------

    def check_manifest(self, mu=None, sigma=None):
        """Wait for a manifest this run can use and check it; return it.

        manifest.json outlives its producer, so the one found may be a previous run's, about to
        be rewritten by a producer that is still starting (the two scripts start in any order).
        A manifest is taken at once when a live producer stands behind it (its heartbeat carries
        the manifest's run id), or when it agrees with this run and batches are already waiting
        (a prefilled buffer, a restarted trainer). A disagreeing one is refused at once only with
        a live producer behind it; otherwise the trainer warns and waits up to wait_timeout for
        a producer with this run's settings, then refuses it.
        """
        if mu is not None:
            self._mu_sigma = (mu, sigma)
        start, delay, warned = time.monotonic(), 0.01, False
        while True:
            manifest = load_manifest(self.folder)
            state, record = producer_status(self.folder)
            behind = (manifest is not None and state == "running"
                      and (record or {}).get("run_id") == manifest.get("run_id"))
            error = None
            if manifest is not None:
                try:
                    self._validate(manifest)
                except UserError as e:
                    error = e
                if error is None and (behind or scan_batches(self.folder)[0]):
                    break
                if error is not None and behind:
                    raise error
            timed_out = time.monotonic() - start >= self.wait_timeout
            if timed_out and manifest is not None:
                if error is not None:
                    raise error
                break  # an agreeing manifest and no producer yet: reading batches will wait for one
            if timed_out:
                raise UserError(self._no_producer_message("the buffer manifest", state, None))
            if error is not None and not warned:
                log.warning("%s; it was written by a producer that is not running now, so waiting up to %.0f s "
                            "for runtime_preprocessing.py with this run's settings to replace it",
                            str(error).rstrip("."), self.wait_timeout)
                warned = True
            time.sleep(min(delay, self.sleep_time))
            delay *= 2
        self.wait_seconds += time.monotonic() - start
        self.manifest = manifest
        self._manifest_stat = self._stat_manifest()
        return manifest

    def _validate(self, m):
        where = f"The buffer in {self.folder}"
        fix = "restart runtime_preprocessing.py with matching settings and --clear_buffer"
        if not m or m.get("format_version") != FORMAT_VERSION or "batch_size" not in m:
            raise UserError(f"{where} has a manifest this version cannot read; {fix}.")
        if m["batch_size"] != self.batch_size:
            raise UserError(f"{where} holds batches of {m['batch_size']} images but this run asks for "
                            f"--batch_size={self.batch_size}; pass the same --batch_size to both scripts.")
        if m["seed"] != self.seed:
            raise UserError(f"{where} was made with [train] seed = {m['seed']} but this config has seed = "
                            f"{self.seed}; use one config for both scripts or {fix}.")
        if m["crop_sizes"] != self.crop_sizes:
            raise UserError(f"{where} holds crops {m['crop_sizes']} ([first epoch, size]) but this config has "
                            f"{self.crop_sizes} ([images] crop_size, crop_schedule); use one config for both "
                            f"scripts or {fix}.")
        mu, sigma = self._mu_sigma
        if mu is not None and not (np.allclose(m["mu"], mu, atol=1e-6) and np.allclose(m["sigma"], sigma, atol=1e-6)):
            raise UserError(f"{where} was made with mu={m['mu']} sigma={m['sigma']} but the trainer normalises with "
                            f"mu={list(mu)} sigma={list(sigma)}; use one config for both scripts or {fix}.")

    def _stat_manifest(self):
        try:
            st = os.stat(os.path.join(self.folder, MANIFEST))
            return (st.st_mtime_ns, st.st_ino)
        except OSError:
            return None

    def _ensure_manifest(self):
        if self.manifest is None:
            self.check_manifest()
        elif self._stat_manifest() != self._manifest_stat:
            old = self.manifest
            old_run = old["run_id"]
            self.check_manifest()
            # Before the first batch nothing of the old run was used: a replacement that keeps the
            # class count and epoch length (what the model and schedule were built from) is fine.
            unused = self._last is None and all(self.manifest.get(k) == old.get(k)
                                                for k in ("num_classes", "num_batches"))
            if self.manifest.get("run_id") != old_run and not unused:
                raise UserError(f"The buffer in {self.folder} was switched to another run while training "
                                f"(run {old_run} -> {self.manifest.get('run_id')}); stop the other producer and "
                                f"restart runtime_preprocessing.py with this run's settings.")

    @property
    def num_classes(self):
        self._ensure_manifest()
        return self.manifest["num_classes"]

    def num_batches(self, epoch=None):
        self._ensure_manifest()
        return self.manifest["num_batches"]

    def crop_size(self, epoch):
        self._ensure_manifest()
        return crop_size_for(self.manifest, epoch)

    # -- batches -------------------------------------------------------------

    def read(self, epoch, batch):
        """Batch (epoch, batch), waiting for the producer; strictly in order within one reader."""
        self._ensure_manifest()
        epoch, batch = int(epoch), int(batch)
        nb = self.manifest["num_batches"]
        if not 0 <= batch < nb:
            raise ValueError(f"batch {batch} is outside 0..{nb - 1}")
        if self._last is None:
            self.report_progress(epoch, batch)  # tells a producer following a stale file where we start
        elif (epoch, batch) != self._successor(self._last):
            raise ValueError(f"batches must be read in order: after {self._last} comes "
                             f"{self._successor(self._last)}, received {(epoch, batch)}")
        result = self._wait_for(lambda: self._load(epoch, batch), f"epoch {epoch} batch {batch}", (epoch, batch))
        self._last = (epoch, batch)
        return result

    def _successor(self, pos):
        epoch, batch = pos
        return (epoch, batch + 1) if batch + 1 < self.manifest["num_batches"] else (epoch + 1, 0)

    def _load(self, epoch, batch):
        if not os.path.exists(batch_file(self.folder, "X", epoch, batch)):
            return None
        crop = crop_size_for(self.manifest, epoch)
        arrays = {}
        for kind, (shape, dtype) in expected_shapes(self.batch_size, crop).items():
            path = batch_file(self.folder, kind, epoch, batch)
            try:
                arr = np.load(path, allow_pickle=False)
            except FileNotFoundError:
                return None
            except (OSError, ValueError, EOFError) as e:
                raise UserError(f"{path} is not a readable batch file ({e}); delete it or restart "
                                f"runtime_preprocessing.py with --clear_buffer.") from None
            if arr.shape != shape or arr.dtype != dtype:
                raise UserError(f"{path} does not belong to this buffer: expected {dtype} {shape}, found "
                                f"{arr.dtype} {arr.shape}; restart runtime_preprocessing.py with --clear_buffer.")
            arrays[kind] = arr
        labels = arrays["Y"]
        if labels.size and (labels.min() < 0 or labels.max() >= self.manifest["num_classes"]):
            raise UserError(f"{batch_file(self.folder, 'Y', epoch, batch)} has labels outside "
                            f"0..{self.manifest['num_classes'] - 1}; restart runtime_preprocessing.py with --clear_buffer.")
        return Batch(arrays["X"], labels, arrays["L"], epoch, batch)

    def _wait_for(self, attempt, what, position):
        """attempt() until it returns non-None; UserError once no live producer was seen for wait_timeout s."""
        result = attempt()
        if result is not None:
            return result
        start = time.monotonic()
        dead_since = None
        delay = 0.01
        status_due = start
        while True:
            now = time.monotonic()
            if now >= status_due:  # the heartbeat changes every few seconds; the batch files are polled faster
                status_due = now + STATUS_POLL
                state, record = producer_status(self.folder)
                if state == "running":
                    dead_since = None
                    self._check_range(record, position)
                    self._greet(record)
                elif dead_since is None:
                    dead_since = now
                if dead_since is not None and now - dead_since >= self.wait_timeout:
                    self.wait_seconds += now - start
                    raise UserError(self._no_producer_message(what, state, position))
            time.sleep(min(delay, self.sleep_time))
            delay *= 2  # quick for short gaps, then every sleep_time seconds
            result = attempt()
            if result is not None:
                waited = time.monotonic() - start
                self.wait_seconds += waited
                log.info("waited %.1f s for %s (%.1f s in total)", waited, what, self.wait_seconds)
                return result

    def _greet(self, record):
        """Repeat the last progress report to a producer not seen before (restarted, or started after
        the report): a producer sets aside a progress file it found at start-up until it is rewritten."""
        seen = (record.get("host"), record.get("pid"))
        if seen != self._producer_seen:
            self._producer_seen = seen
            if self._reported is not None:
                write_progress(self.folder, *self._reported)

    def _check_range(self, record, position):
        if position is None or "epoch_end" not in record:
            return
        epoch = position[0]
        if not record["epoch_start_floor"] <= epoch < record["epoch_end"]:
            raise UserError(f"The producer on {self.folder} makes epochs {record['epoch_start_floor']} to "
                            f"{record['epoch_end'] - 1} but the trainer needs epoch {epoch}; restart "
                            f"runtime_preprocessing.py with --epoch_start=auto --epoch_end={epoch + 1} or more.")

    def _no_producer_message(self, what, state, position):
        detail = {"absent": "no producer has ever written a heartbeat there",
                  "finished": "the producer finished its epoch range",
                  "stopped": "the producer was stopped", "dead": "the producer's heartbeat stopped"}[state]
        start = f" --epoch_start={position[0]}" if position else ""
        return (f"Waited {self.wait_timeout:.0f} s for {what} in {self.folder} but {detail}; start "
                f"runtime_preprocessing.py --batch_size={self.batch_size}{start} with this config.")

    def report_progress(self, epoch, next_batch):
        """Tell the producer every batch before (epoch, next_batch) is consumed (atomic write)."""
        if self.manifest is not None and next_batch >= self.manifest["num_batches"]:
            epoch, next_batch = epoch + 1, 0
        write_progress(self.folder, epoch, next_batch)
        self._reported = (epoch, next_batch)


# ----------------------------------------------------------------------------
# Producer side
# ----------------------------------------------------------------------------

class Producer:
    """runtime_preprocessing.py's engine: keeps up to buffer_size batches ready ahead of the trainer."""

    def __init__(self, cfg, batch_size, epoch_start, epoch_end, clear_buffer=False, num_workers=None,
                 progress=True, once=False):
        self.cfg = cfg
        self.folder = cfg.train.buffer_folder
        self.batch_size = int(batch_size)
        self.auto_start = epoch_start == "auto"
        self.epoch_start = 0 if self.auto_start else int(epoch_start)
        self.epoch_end = int(epoch_end)
        self.clear_buffer, self.once, self.progress = clear_buffer, once, progress
        rp = cfg.runtime_preprocessing
        self.num_workers = int(num_workers or rp.num_of_threads)
        self.buffer_size = cfg.train.buffer_size
        self.refill_below = rp.refill_threshold * self.buffer_size
        self.sleep_time = rp.sleep_time
        self.ready = set()   # linear positions of complete batches on disk
        self.spares = []     # consumed X files under temp names, to be overwritten by the next batches
        self._spare_count = 0
        self.produced = 0
        self.busy_seconds = 0.0  # time spent refilling: produced * batch_size / busy_seconds is the fill rate
        self._ignored_progress = None  # identity of a progress file set aside at start-up
        self.first_lin = None
        self._fill_started = None
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, received {self.batch_size}.")
        if self.epoch_end <= self.epoch_start:
            raise UserError(f"--epoch_end must be greater than --epoch_start, received {self.epoch_start} "
                            f"and {self.epoch_end}.")

    # -- positions -------------------------------------------------------------

    def lin(self, epoch, batch):
        return epoch * self.num_batches + batch

    def pos(self, lin):
        return divmod(lin, self.num_batches)

    def trainer_position(self):
        """Linear position of the next batch the trainer needs, clamped to [epoch_start, epoch_end];
        None while the producer waits for the trainer's first report (see _adopt_progress).

        A progress file set aside at start-up (_adopt_progress) counts only once the trainer
        has rewritten it; until then the producer builds from its own first guess.
        """
        if self._ignored_progress is not None:
            if _file_identity(os.path.join(self.folder, PROGRESS)) == self._ignored_progress:
                return self.first_lin
            self._ignored_progress = None
        p = read_progress(self.folder)
        lin = self.lin(*p) if p is not None and p[1] <= self.num_batches else self.first_lin
        return None if lin is None else min(max(lin, self.start_lin), self.end_lin)

    def _adopt_progress(self):
        """Decide whether training_progress.txt as found at start-up says where the trainer is.

        The file outlives runs, so at start-up it may be a previous run's last word. With an
        explicit --epoch_start, only a file that says (epoch_start, 0) is followed at once; with
        'auto', one inside [0, epoch_end). Any other is set aside until the trainer writes it
        again: a trainer reports on its first read and whenever it sees a new producer, so a
        producer restarted under a running trainer catches up within one poll. Meanwhile the
        producer builds from epoch_start, except with 'auto' past epoch_end (the run may be over,
        or a new one may start anywhere): then it builds nothing until the trainer reports.
        """
        self.first_lin = self.start_lin
        if self.auto_start and self.ready:
            self.first_lin = min(self.ready)  # the batches left ready are the best guess of where it stands
        p = read_progress(self.folder)
        if p is None or p[1] > self.num_batches:
            return
        lin = self.lin(*p)
        follow = lin < self.end_lin if self.auto_start else lin == self.start_lin
        if follow:
            return
        self._ignored_progress = _file_identity(os.path.join(self.folder, PROGRESS))
        if self.auto_start:
            self.first_lin = None
        where = (f"past --epoch_end={self.epoch_end}" if lin >= self.end_lin
                 else f"not --epoch_start={self.epoch_start}")
        plan = ("waiting for the trainer to report" if self.first_lin is None else
                "building from epoch %d batch %d until the trainer writes it" % self.pos(self.first_lin))
        log.warning("%s says epoch %d batch %d, %s: left over from an earlier run (or from a trainer that will "
                    "report again); %s", PROGRESS, p[0], p[1], where, plan)

    # -- setup -------------------------------------------------------------------

    def setup(self):
        from data import augment, scale_cache
        from data.tfrecord import load_source_index
        cfg = self.cfg
        self._make_folder()
        state, record = producer_status(self.folder)
        if state == "running" and record.get("pid") != os.getpid():
            raise UserError(f"Another producer (pid {record.get('pid')} on {record.get('host')}) is filling "
                            f"{self.folder}; stop it first, or point [train] buffer_folder elsewhere.")
        index = load_source_index(cfg, cfg.preprocess.ImageNet_folder, "train", cfg.train.N, self.num_workers)
        if len(index) < self.batch_size:
            raise UserError(f"The training set has {len(index)} images, fewer than --batch_size={self.batch_size}.")
        self.num_batches = len(index) // self.batch_size
        self.start_lin, self.end_lin = self.lin(self.epoch_start, 0), self.lin(self.epoch_end, 0)
        cache = []
        if cfg.runtime_preprocessing.use_scale_cache:
            cache = sorted(set(scale_cache.complete_scales(cfg.preprocess.path_to_save, index)) & set(utils.scales(cfg)))
        self.recipe = augment.Recipe.from_config(cfg, self.batch_size, cache)
        self.index = index
        self.manifest = make_manifest(self.recipe, index.fingerprint(), len(index), len(index.classes),
                                      self.epoch_start, self.epoch_end)
        self._check_existing()
        self._adopt_progress()
        utils.atomic_write_text(os.path.join(self.folder, MANIFEST), json.dumps(self.manifest, indent=1) + "\n")
        self._check_free_space()
        log.info("producer: %d images, %d batches of %d per epoch, epochs %s..%d, %d worker(s), decoder %s, "
                 "scale cache %s, %d valid batches kept", len(index), self.num_batches, self.batch_size,
                 "auto" if self.auto_start else self.epoch_start, self.epoch_end - 1, self.num_workers,
                 self.recipe.decoder, f"{len(cache)} scales" if cache else "off", len(self.ready))

    def _make_folder(self):
        try:
            os.makedirs(self.folder, exist_ok=True)
            probe = os.path.join(self.folder, f"{utils.TMP_PREFIX}probe-{os.getpid()}")
            with open(probe, "wb") as f:
                f.write(b"0" * 4096)
            os.remove(probe)
        except OSError as e:
            raise UserError(f"Cannot write to the buffer folder {self.folder} ({e.strerror or e}); it needs about "
                            f"{utils._human(self.buffer_size * bytes_per_batch(self.batch_size, self.cfg.images.crop_size))}"
                            f" for {self.buffer_size} batches; fix its permissions or set [train] buffer_folder.") from None

    def _check_existing(self):
        """Sweep temp and half-written files; keep valid batches of this run, refuse or clear others."""
        self._sweep_temps()
        old = load_manifest(self.folder)
        complete, partial = scan_batches(self.folder)
        differences = manifest_differences(old, self.manifest) if old is not None else []
        # An empty folder with an old manifest is simply taken over; batch files are never silently reused.
        foreign = bool(complete or partial) and (old is None or bool(differences))
        if foreign:
            what = ("; ".join(differences) if differences else
                    f"{len(complete) + len(partial)} batch files without a manifest")
            if not self.clear_buffer:
                raise UserError(f"The buffer folder {self.folder} holds batches of another run ({what}); pass "
                                f"--clear_buffer to delete them, or set [train] buffer_folder to an empty folder.")
            log.warning("clearing %d batches of another run from %s (%s)", len(complete | partial), self.folder, what)
            for key in complete | partial:
                delete_batch(self.folder, *key)
            complete, partial = set(), set()
        for key in partial:
            delete_batch(self.folder, *key)
        for key in complete:
            crop = self.recipe.crop_for(key[0])
            if key[1] < self.num_batches and batch_header_ok(self.folder, *key, self.batch_size, crop):
                self.ready.add(self.lin(*key))
            else:
                delete_batch(self.folder, *key)

    def _sweep_temps(self):
        """Remove temp files of killed writers: ours, and progress temps too old to be a live trainer's."""
        now = time.time()
        for name in os.listdir(self.folder):
            stem = name[len(utils.TMP_PREFIX):] if utils.is_temp_name(name) else None
            if not stem:
                continue
            path = os.path.join(self.folder, name)
            ours = parse_batch_name(stem.split("-")[0]) or stem.startswith(_OWN_FILES) or stem.startswith("probe-")
            try:
                # A trainer's progress temp lives for microseconds; one a minute old belongs to a killed trainer.
                if ours or (stem.startswith(PROGRESS) and now - os.path.getmtime(path) > 60):
                    os.remove(path)
            except OSError:
                pass

    def _tidy(self):
        """On exit, once no worker runs: no temp file and no half-written batch is left behind."""
        try:
            self._sweep_temps()
            for key in scan_batches(self.folder)[1]:
                delete_batch(self.folder, *key)
        except OSError:  # the folder itself is gone or unreadable: nothing to tidy, and the real error comes first
            pass

    def _check_free_space(self):
        need = (self.buffer_size - len(self.ready)) * bytes_per_batch(self.batch_size, self.recipe.crop)
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise UserError(f"The buffer folder {self.folder} has {utils._human(free)} free but {self.buffer_size} "
                            f"batches need about {utils._human(need)} more; free space there, lower [train] "
                            f"buffer_size, or point buffer_folder at a larger disk.")

    # -- main loop ---------------------------------------------------------------

    def run(self):
        """Produce until the trainer has consumed epoch_end's last batch (or, with once, until the window is full)."""
        if not hasattr(self, "manifest"):
            self.setup()
        info = {"run_id": self.manifest["run_id"], "epoch_start_floor": self.epoch_start, "epoch_end": self.epoch_end}
        # Workers first: forking while the heartbeat's or the bar's thread holds a lock could hang a child.
        workers = WorkerSet(self.num_workers, self.index.paths, self.index.labels, self.recipe, self.folder)
        final = "stopped"
        try:
            self.heartbeat = Heartbeat(self.folder, self.cfg.runtime_preprocessing.heartbeat_interval, info)
            self.heartbeat.start()
            self.bar = self._make_bar()
            self.t0 = time.monotonic()
            self._loop(workers)
            final = "finished"
        finally:
            workers.stop()
            self._tidy()
            if hasattr(self, "heartbeat"):
                self.heartbeat.stop(final)
            if hasattr(self, "bar"):
                self.bar.close()
        return self.produced

    def _loop(self, workers):
        while True:
            self._check_heartbeat()
            workers.check_alive()
            pos = self.trainer_position()
            if pos is None:  # nothing known to build yet
                if self.once:
                    return
                self._show()
                time.sleep(self.sleep_time)
                continue
            if pos >= self.end_lin:
                self._delete(self.ready, keep=False)
                log.info("the trainer consumed the last batch of epoch %d; producer done", self.epoch_end - 1)
                return
            stale, missing = plan_refill(pos, self.ready, self.buffer_size,
                                         math.inf if self.once else self.refill_below, self.end_lin)
            self._delete(stale)
            if missing:
                self._refill(workers, pos, missing)
                continue
            if self.once:
                return
            self._show()
            time.sleep(self.sleep_time)

    def _delete(self, lins, keep=True):
        """Remove batches from the buffer; with `keep`, their X files become spares for the next ones.

        Spares only ever replace batches one for one and every task takes one when there is
        one, so batch files and spares together stay within buffer_size.
        """
        for lin in sorted(lins):
            if keep and len(self.spares) < self.buffer_size:
                self._spare_count += 1
                spare = spare_file(self.folder, self._spare_count)
                if retire_batch(self.folder, *self.pos(lin), spare):
                    self.spares.append(spare)
            else:
                delete_batch(self.folder, *self.pos(lin))
            self.ready.discard(lin)

    def _refill(self, workers, pos, missing):
        """Build `missing` in order, a few tasks in flight; re-plan if the trainer jumps back.

        Once everything planned is handed out, the window is topped up to buffer_size from where
        the trainer stands now, so the workers never idle between one refill and the next while
        the trainer keeps consuming (the refill ends when the window is full, or at epoch_end).
        """
        started = self._fill_started = time.monotonic()
        pending = collections.deque(missing)
        last_check = time.monotonic()
        while pending or workers.in_flight:
            while pending and workers.has_room():
                workers.submit(*self.pos(pending.popleft()), self.spares.pop() if self.spares else None)
            for epoch, batch in workers.collect(timeout=0.5):
                self.ready.add(self.lin(epoch, batch))
                self.produced += 1
                self.bar.update(1)
            periodic = time.monotonic() - last_check >= 0.5
            if periodic or not pending:
                if periodic:
                    last_check = time.monotonic()
                    self._check_heartbeat()
                    self._show()
                now = self.trainer_position()
                if now < pos:
                    pending.clear()  # the trainer restarted earlier: finish what is in flight, then re-plan
                    continue
                while pending and pending[0] < now:
                    pending.popleft()  # consumed while we were busy
                self._delete([lin for lin in self.ready if lin < now])
                if not pending:
                    building = {self.lin(*task) for task in workers.tasks()}
                    pending.extend(plan_refill(now, self.ready | building, self.buffer_size, math.inf,
                                               self.end_lin)[1])
        self.busy_seconds += time.monotonic() - started
        self._fill_started = None
        self._show()

    def _check_heartbeat(self):
        if self.heartbeat.error is not None:
            raise self.heartbeat.error

    # -- display -----------------------------------------------------------------

    def _make_bar(self):
        from tqdm import tqdm
        return tqdm(total=self.end_lin - self.start_lin, desc="batches ready", unit="batch", dynamic_ncols=True,
                    disable=not self.progress, smoothing=0.1)

    def _show(self):
        """Bar: batches produced of the range; postfix: batches on disk / buffer_size, fill rate while filling."""
        busy = self.busy_seconds + (time.monotonic() - self._fill_started if self._fill_started else 0.0)
        rate = self.produced * self.batch_size / busy if busy > 0 else 0.0
        self.bar.set_postfix_str(f"buffer {len(self.ready)}/{self.buffer_size}, {rate:.0f} img/s", refresh=False)
        self.bar.refresh()
