"""Small helpers shared by the test modules."""
import configparser
import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np


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


def wait_until(predicate, timeout=20.0, poll=0.02):
    """True as soon as predicate() is, False if it is not within `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
BATCH = 16  # train.py runs' batch size: 4 classes x 32 images = 8 steps per epoch


# ----------------------------------------------------------------------------
# train.py end to end on a tiny generated dataset (test_train, test_distribute, test_chaos, ...)
# ----------------------------------------------------------------------------

def make_data(root, classes=4, per_class=32):
    sys.path.insert(0, ROOT)
    from tools.make_demo_dataset import make_dataset
    make_dataset(root, num_classes=classes, train_per_class=per_class, val_per_class=2, odd_files=False,
                 min_side=40, max_side=56)
    return root


def write_config(folder, data_root, **sections):
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
        "model": {"width_multiplier": "0.0625", "zero_init_last_gamma": "true"},
        "utils": {**{f"mu_{c}": "0.5" for c in range(3)}, **{f"sigma_{c}": "0.25" for c in range(3)}},
        "schedule": {"type": "constant", "base_lr": "0.005", "warmup_epochs": "0"},
    }
    return write_config_file(folder, os.path.join(ROOT, "configs", "demo.txt"), merge_sections(values, sections))


def start_producer(config, epoch_start, epoch_end, *extra):
    return subprocess.Popen([PY, "runtime_preprocessing.py", "--config", config, f"--epoch_start={epoch_start}",
                             f"--epoch_end={epoch_end}", f"--batch_size={BATCH}", "--no_progress", *extra],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def train_cmd(config, run, epoch_start, epoch_end, *extra, batch_size=BATCH):
    return [PY, "train.py", "--config", config, f"--run_folder={run}", f"--epoch_start={epoch_start}",
            f"--epoch_end={epoch_end}", f"--batch_size={batch_size}", *extra]


def run_train(config, run, epoch_start, epoch_end, *extra, batch_size=BATCH, timeout=240):
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


@contextlib.contextmanager
def killed_twin_runs(config_a, config_b, epochs, kill_epoch=1, timeout=240):
    """Run A (config_a, run "A") trains epochs 0..epochs-1 uninterrupted. Run B (config_b, run "B"),
    alongside, is SIGKILLed while it saves `kill_epoch`; its producer keeps running until the block
    ends, for the resume. Each run has its own buffer and producer. Yields
    {"b_killed": whether the kill happened mid-save, "b_producer": B's producer}."""
    producers = [start_producer(config_a, 0, epochs), start_producer(config_b, 0, epochs)]
    try:
        trainer_a = subprocess.Popen(train_cmd(config_a, "A", 0, epochs), cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        trainer_b = subprocess.Popen(train_cmd(config_b, "B", 0, epochs), cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        killed = kill_while_saving(trainer_b, run_path(config_b, "B"), kill_epoch, timeout=timeout)
        _, err = trainer_a.communicate(timeout=timeout)
        assert trainer_a.returncode == 0, err[-3000:]
        producers[0].wait(timeout=30)  # it exits once the trainer consumed the last batch
        yield {"b_killed": killed, "b_producer": producers[1]}
    finally:
        for p in producers:
            stop_process(p)
