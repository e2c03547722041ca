"""Helpers shared by the test modules (test modules never import each other).

Sections: config files; child processes; the solid-colour dataset and buffer (producer and reader tests);
the small generated dataset and train.py runs (trainer, chaos, distribution, disk-full tests); an in-process
Trainer's checkpoint state (precision tests)."""
import collections
import configparser
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
from PIL import Image

from settings import load_settings
from utils.files import atomic_write_text
from data.buffer import files as buffer_files, protocol
from data.buffer.builder import BatchBuilder, Recipe
from data.sources.index import load_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def write_config_file(folder, base, values, name="config.txt"):
    """Write config `base` with `values` ({section: {key: value}}) applied, as <folder>/<name>."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive: ImageNet_folder, N
    parser.read(base)
    for section, keys in values.items():
        if not parser.has_section(section):
            parser.add_section(section)
        for key, value in keys.items():
            parser[section][key] = str(value)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        parser.write(f)
    return path


def merge_sections(defaults, overrides):
    """defaults updated section by section with overrides (both {section: {key: value}})."""
    merged = {name: dict(keys) for name, keys in defaults.items()}
    for name, keys in overrides.items():
        merged.setdefault(name, {}).update(keys)
    return merged


def stop_process(proc, sig=signal.SIGINT, timeout=20):
    """Ask a child to stop with `sig`; SIGKILL it if it has not exited after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_ports(n):
    """n TCP ports free on the loopback interface now (for TF_CONFIG clusters of local workers)."""
    import socket
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def without_op_determinism():
    """TF op determinism off inside, then as it was: it is process-wide and has no public switch off, and an
    in-process Trainer built earlier with deterministic = true leaves it on, which makes XLA refuse the
    max-pool gradient."""
    from tensorflow.python.framework import config as tf_config
    was = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    try:
        yield
    finally:
        if was:
            tf_config.enable_op_determinism()


def wait_until(predicate, timeout=20.0, poll=0.02):
    """True as soon as predicate() is, False if it is not within `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False


# ----------------------------------------------------------------------------
# The solid-colour dataset: class k is COLOURS[k]; buffer and producer tests
# ----------------------------------------------------------------------------

SOLID_BATCH = 4  # 40 images -> 10 batches per epoch


COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 200)]


def make_solid_dataset(root, per_class=8, seed=0, odd=True):
    """train/<wnid>/*.JPEG where class k is a solid COLOURS[k] (varied sizes); plus a CMYK JPEG,
    a PNG named .JPEG and a truncated file, whose colours (where readable) still match their class."""
    rng = np.random.default_rng(seed)
    for k, colour in enumerate(COLOURS):
        folder = os.path.join(root, "train", f"n{k + 1:08d}")
        os.makedirs(folder, exist_ok=True)
        for j in range(per_class):
            w, h = (int(v) for v in rng.integers(40, 90, 2))
            img = Image.new("RGB", (w, h), colour)
            path = os.path.join(folder, f"n{k + 1:08d}_{j}.JPEG")
            kind = (k, j) if odd else None
            if kind == (0, 1):
                img.convert("CMYK").save(path, "JPEG", quality=95)
            elif kind == (1, 1):
                img.save(path, "PNG")
            elif kind == (2, 1):
                img.save(path, "JPEG", quality=95)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
            else:
                img.save(path, "JPEG", quality=95)
    return root


SOLID_CONFIG = {
    "preprocess": {"ImageNet_folder": "data", "path_to_save": "cache"},
    "preprocess_val": {"ImageNet_folder": "data", "path_to_save": "val", "N": "0"},
    "get_mu_sigma": {"path_to_save": "stats"},
    "train": {"buffer_folder": "buffer", "path_for_saving": "runs", "N": "0", "sgd_momentum": "0.9",
              "buffer_size": "6", "sleep_time": "0.02", "wait_timeout": "30"},
    "batch_renorm": {"moving_avgs_momentum": "0.99", "rmax_max": "3", "dmax_max": "5", "start_relaxing_rmax": "1",
                     "reach_rmax_max": "2", "start_relaxing_dmax": "1", "reach_dmax_max": "2"},
    "runtime_preprocessing": {"sleep_time": "0.02", "num_of_threads": "1", "heartbeat_interval": "0.1"},
    "utils": {"mu_0": "0.5", "mu_1": "0.45", "mu_2": "0.4", "sigma_0": "0.25", "sigma_1": "0.26", "sigma_2": "0.27"},
    "l2": {"l2_penalty": "0.0001"},
    "images": {"crop_size": "16", "scale_min": "18", "scale_max": "30", "scale_step": "4", "eval_resize": "18"},
}


def write_solid_config(folder, **overrides):
    """A config in `folder` (paths relative to it); overrides as section={key: value}."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    for section in {**SOLID_CONFIG, **overrides}:
        parser[section] = {**SOLID_CONFIG.get(section, {}), **overrides.get(section, {})}
    path = os.path.join(folder, "config.txt")
    with open(path, "w") as f:
        parser.write(f)
    return path


def solid_config_for(folder, dataset, **overrides):
    os.makedirs(folder, exist_ok=True)
    overrides["preprocess"] = {"ImageNet_folder": dataset, **overrides.get("preprocess", {})}
    return write_solid_config(folder, **overrides)


def fake_manifest(batch_size=4, crop=16, num_batches=5, num_classes=5, seed=0):
    recipe = Recipe(seed=seed, batch_size=batch_size, crop=crop, scales=(18, 22), pca_std=0.1,
                    mu=(0.5, 0.45, 0.4), sigma=(0.25, 0.26, 0.27))
    return protocol.make_manifest(recipe, "f" * 32, num_batches * batch_size, num_classes, 0, 3)


def fake_batch(batch_size=4, crop=16, value=0):
    images = np.full((batch_size, crop, crop, 3), value, np.uint8)
    return images, np.arange(batch_size, dtype=np.int32) % 5, np.zeros((batch_size, 3), np.float32)


def write_heartbeat(folder, pid=None, state="running", epoch_end=3, stamp=None):
    record = {"run_id": "x", "epoch_start_floor": 0, "epoch_end": epoch_end, "pid": pid or os.getpid(),
              "host": __import__("socket").gethostname(), "time": stamp or time.time(), "interval": 0.1,
              "state": state}
    atomic_write_text(os.path.join(folder, protocol.HEARTBEAT), json.dumps(record))


def producer_cmd(config, *args, batch_size=SOLID_BATCH, epoch_start="0", epoch_end="3"):
    return [sys.executable, os.path.join(ROOT, "runtime_preprocessing.py"), "--config", config, "--batch_size", str(batch_size), "--epoch_start",
            str(epoch_start), "--epoch_end", str(epoch_end), "--no_progress", *args]


def run_producer(config, *args, **kw):
    return subprocess.run(producer_cmd(config, *args, **kw), capture_output=True, text=True, timeout=60)


def start_solid_producer(config, *args, **kw):
    return subprocess.Popen(producer_cmd(config, *args, **kw), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def reference_builder(config):
    cfg = load_settings(config)
    index = load_index(cfg.preprocess.ImageNet_folder, "train")
    return BatchBuilder(index.paths, index.labels, Recipe.from_settings(cfg, SOLID_BATCH))


def heartbeat_pid(folder):
    return (protocol.producer_status(folder)[1] or {}).get("pid")


def complete_count(folder):
    return len(buffer_files.scan_batches(folder)[0])


def read_all(reader, start, stop, builder, num_batches=10, pause=0.0, report=True):
    """Read linear positions [start, stop) in order, checking each batch against the reference."""
    for lin in range(start, stop):
        epoch, b = divmod(lin, num_batches)
        batch = reader.read(epoch, b)
        images, labels, lighting = builder.build(epoch, b)
        assert np.array_equal(batch.images, images) and np.array_equal(batch.labels, labels)
        assert np.array_equal(batch.lighting, lighting)
        if report:
            reader.report_progress(epoch, b + 1)
        if pause:
            time.sleep(pause)


def with_cores(cores, argv):
    """A producer command (producer_cmd) run with os.sched_getaffinity patched to `cores` CPUs, so that
    num_of_threads = auto may run more workers than this machine has cores."""
    code = (f"import os, sys; os.sched_getaffinity = lambda pid: set(range({cores})); "
            f"sys.argv = {argv[1:]!r}; sys.path.insert(0, {ROOT!r}); "
            "import runtime_preprocessing; from utils.cli import run_main; run_main(runtime_preprocessing.main)")
    return [sys.executable, "-c", code]


def producer_workers(folder):
    """The worker count in the producer's heartbeat (0 before its first)."""
    return (protocol.producer_status(folder)[1] or {}).get("workers", 0)


def read_in_sizing_cycles(reader, stop, check, folder, cycles=None, num_batches=10, until=None):
    """Read positions [0, stop) in order (check(epoch, batch, Batch) each, then report): greedily until
    the producer runs more than one worker (an add), then not at all until it is back at one (a retire),
    `cycles` times (or, given `until`, until until() is true), then to the end. Returns the number of adds
    seen while cycling."""
    adds = 0
    for lin in range(stop):
        epoch, b = divmod(lin, num_batches)
        check(epoch, b, reader.read(epoch, b))
        reader.report_progress(epoch, b + 1)
        cycling = not until() if until is not None else adds < cycles
        if cycling and producer_workers(folder) > 1:
            adds += 1
            assert wait_until(lambda: producer_workers(folder) == 1, timeout=60), "no worker was retired"
    return adds


# ----------------------------------------------------------------------------
# The generated demo-style dataset and train.py runs
# ----------------------------------------------------------------------------

TRAIN_BATCH = 16


def make_data(root, classes=4, per_class=32):
    sys.path.insert(0, ROOT)
    from tools.make_demo_dataset import make_dataset
    make_dataset(root, num_classes=classes, train_per_class=per_class, val_per_class=2, odd_files=False,
                 min_side=40, max_side=56)
    return root


def write_train_config(folder, data_root, **sections):
    """configs/demo.txt scaled down (crop 32, width 0.0625), paths in `folder`, plus overrides
    given as section={key: value}."""
    values = {
        "preprocess": {"ImageNet_folder": data_root, "path_to_save": os.path.join(folder, "scales")},
        "train": {"buffer_folder": os.path.join(folder, "buffer"), "path_for_saving": os.path.join(folder, "runs"),
                  "buffer_size": "40", "deterministic": "true", "log_every": "4", "wait_timeout": "60"},
        "images": {"crop_size": "32", "scale_min": "36", "scale_max": "44", "scale_step": "4",
                   "eval_resize": "36", "eval_scales_50": "36, 40"},
        # Zero-initialised last gammas keep this 4-channel-wide network well conditioned; without
        # them float rounding differences grow to O(1) within a few steps (see test_distribute.py).
        # One block per stage keeps every kind of layer (stem, each stage's strided first block and its projection
        # shortcut) and halves the cost every trainer pays before it learns anything: a trainer's first epoch
        # (tracing the step, 2 steps, one save) took 9.0 s with 3, 4, 6, 3 blocks and 4.0 s with 1, 1, 1, 1.
        "model": {"width_multiplier": "0.0625", "zero_init_last_gamma": "true", "stage_blocks": "1, 1, 1, 1"},
        "utils": {**{f"mu_{c}": "0.5" for c in range(3)}, **{f"sigma_{c}": "0.25" for c in range(3)}},
        "schedule": {"type": "constant", "base_lr": "0.005", "warmup_epochs": "0", "reference_batch": "0"},
    }
    if sections.get("model", {}).get("arch") == "concat_resnet":  # resnet50's keys keep their defaults there
        values["model"] = {"width_multiplier": "0.0625"}
    return write_config_file(folder, os.path.join(ROOT, "configs", "demo.txt"), merge_sections(values, sections))


def start_train_producer(config, epoch_start, epoch_end, *extra, batch_size=TRAIN_BATCH):
    return subprocess.Popen([PY, "runtime_preprocessing.py", "--config", config, f"--epoch_start={epoch_start}",
                             f"--epoch_end={epoch_end}", f"--batch_size={batch_size}", "--no_progress", *extra],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def train_cmd(config, run, epoch_start, epoch_end, *extra, batch_size=TRAIN_BATCH):
    return [PY, "train.py", "--config", config, f"--run_folder={run}", f"--epoch_start={epoch_start}",
            f"--epoch_end={epoch_end}", f"--batch_size={batch_size}", *extra]


def run_train(config, run, epoch_start, epoch_end, *extra, batch_size=TRAIN_BATCH, timeout=240):
    return subprocess.run(train_cmd(config, run, epoch_start, epoch_end, *extra, batch_size=batch_size),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_checkpoint(prefix):
    """{key: array} of a tf.train.Checkpoint, read with TensorFlow alone."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    return {k: np.asarray(reader.get_tensor(k)) for k in reader.get_variable_to_shape_map()
            if not k.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


def run_path(config, run):
    return os.path.join(os.path.dirname(config), "runs", run)


def csv_rows(run):
    import csv
    with open(os.path.join(run, "log.csv")) as f:
        return list(csv.DictReader(f))


def surviving_batches(lines):
    """The trainer's final timeline from batches.log, and where attempts resumed.

    Each train.py attempt appends "epoch batch" per step from where it resumed. A line at or
    before the previous one starts a resumed attempt re-training from its checkpoint: the lines
    it supersedes (the killed attempt's unsaved epoch) are dropped from the timeline. The
    timeline must be every batch of every epoch once, in order; resumes must be at batch 0.
    """
    timeline, resumes = [], []
    for line in lines:
        epoch, batch = (int(v) for v in line.split())
        if timeline and (epoch, batch) <= timeline[-1]:
            resumes.append((epoch, batch))
            while timeline and timeline[-1] >= (epoch, batch):
                timeline.pop()
        timeline.append((epoch, batch))
    return timeline, resumes


def fake_parts(folder):
    os.makedirs(os.path.join(folder, "saved_model"))
    os.makedirs(os.path.join(folder, "checkpoint"))
    for name in ("checkpoint/ckpt.index", "config.txt"):
        with open(os.path.join(folder, name), "w") as f:
            f.write(folder)


def kill_while_saving(trainer, run, epoch, timeout=240):
    """SIGKILL `trainer` while it writes `epoch` (its temp folder exists, the final one does not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and trainer.poll() is None:
        if os.path.isdir(run) and any(n.startswith(f".tmp-{epoch}-") for n in os.listdir(run)):
            trainer.kill()
            trainer.wait()
            return True
        time.sleep(0.005)
    return False


# The session's reference run (tests/conftest.py reference_run): one uninterrupted train.py run of
# make_data's set that killed and resumed runs of the same settings must equal bit for bit.
REFERENCE_EPOCHS = 3
REFERENCE_BATCH = 8
REFERENCE_STEPS = 16  # 4 classes x 32 images / REFERENCE_BATCH


def random_images(shape, seed=0, mean=0.0, std=1.0):
    import tensorflow as tf  # only the tests that need it load it
    return tf.constant(np.random.RandomState(seed).normal(mean, std, size=shape).astype(np.float32))


def run_python(code, cwd, with_repo):
    """Run `code` in a fresh interpreter; with_repo=False proves it needs nothing from this repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if with_repo:
        env["PYTHONPATH"] = ROOT
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# Process trees under tools/launch.py (the chaos test's victims)

def _children():
    """{parent pid: [child pids]} of the live (not zombie) processes, from /proc."""
    kids = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                kids[int(fields[1])].append(int(name))
    return kids


def _cmdline(pid):
    """The argv of process `pid` from /proc ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return []


def script_pid(launcher_pid, script):
    """pid of `script` as the launcher runs it (launcher -> keeper -> script; not its pool workers)."""
    kids = _children()
    for keeper in kids.get(launcher_pid, []):
        for pid in kids.get(keeper, []):
            if any(os.path.basename(a) == script for a in _cmdline(pid)[1:3]):
                return pid
    return None


# ----------------------------------------------------------------------------
# In-process Trainers (tests/fake_trainer.py builds them): their checkpoint's state
# ----------------------------------------------------------------------------

def checkpoint_state(trainer, path):
    """Every variable of the trainer's checkpoint (weights, statistics, optimizer slots, loss scale, epoch),
    as written to `path` and read back with TensorFlow alone."""
    return read_checkpoint(trainer.checkpoint.write(path))
