"""The producer/trainer handshake files: training_progress.txt, manifest.json and the producer.json heartbeat.

What each file holds, who writes it and what its reader may assume: the table in data/buffer/__init__.py.
"""
import dataclasses
import hashlib
import json
import os
import socket
import threading
import time

from utils.files import atomic_write_text
from data.buffer.files import DTYPE
from data.transforms.progressive import crop_for
from utils.errors import UserError

FORMAT_VERSION = 2  # 2: L holds the lighting coefficients, not the shifts
MANIFEST = "manifest.json"
HEARTBEAT = "producer.json"
PROGRESS = "training_progress.txt"


def file_identity(path):
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
            atomic_write_text(path, f"{int(epoch)}\n{int(batch)}\n")
            return
        except FileNotFoundError:  # our temp file was swept by a starting producer; write again
            if attempt == 2:
                raise


# ----------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------

# Keys that determine batch contents: any difference means "another run".
IDENTITY_KEYS = ("format_version", "seed", "batch_size", "crop_sizes", "augmentation", "dtype", "num_batches",
                 "num_classes", "dataset_fingerprint", "scales", "pca_std", "mu", "sigma", "worker_slice")


def make_manifest(recipe, fingerprint, num_images, num_classes, epoch_start, epoch_end):
    ident = {"format_version": FORMAT_VERSION, "seed": recipe.seed, "batch_size": recipe.batch_size,
             "crop_sizes": recipe.crop_sizes or [[0, recipe.crop]], "augmentation": _augmentation_identity(recipe),
             "dtype": DTYPE, "num_batches": num_images // recipe.batch_size,
             "num_classes": num_classes, "dataset_fingerprint": fingerprint, "scales": list(recipe.scales),
             "pca_std": recipe.pca_std, "mu": list(recipe.mu), "sigma": list(recipe.sigma)}
    if recipe.worker_count > 1:  # only then: single-machine buffers keep their run id
        ident["worker_slice"] = [recipe.worker_index, recipe.worker_count]
    run_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    # decoder and cached_scales decide the bytes too: a restarted producer keeps them or refuses
    # (producer.py: _keep_run_choices); outside run_id, so buffers written before they were recorded keep it.
    return {"run_id": run_id, **ident, "num_images": num_images, "epoch_start": epoch_start,
            "epoch_end": epoch_end, "decoder": recipe.decoder, "cached_scales": sorted(recipe.cached_scales)}


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
    return crop_for(manifest["crop_sizes"], epoch)


# ----------------------------------------------------------------------------
# Heartbeat
# ----------------------------------------------------------------------------

class Heartbeat(threading.Thread):
    """Rewrites producer.json every `interval` seconds so the trainer can tell a live producer from a dead one.

    Besides liveness it carries what the trainer's epoch line reports: `workers` (running now),
    `max_workers` (the most it may run), `build_rate` (img/s the workers build together) and `sizing`
    (how the count was chosen), set through update().
    """

    def __init__(self, folder, interval, info):
        super().__init__(daemon=True, name="heartbeat")
        self.path = os.path.join(folder, HEARTBEAT)
        self.interval, self.info = interval, dict(info)
        self._stop_event = threading.Event()
        self.lock = threading.Lock()  # held while beating; the producer forks an added worker under it
        self.error = None
        self.beat("running")

    def update(self, **info):
        """New values for the record, written with the next beat."""
        with self.lock:
            self.info.update(info)

    def beat(self, state):
        with self.lock:
            record = {**self.info, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                      "interval": self.interval, "state": state}
            atomic_write_text(self.path, json.dumps(record) + "\n")

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
