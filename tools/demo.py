"""`make demo`: the whole pipeline, end to end, on a generated dataset, on CPU, in a few minutes.

    python tools/demo.py [--epochs N] [--batch_size B] [--keep_runs K]
                         [--classes C --train_per_class T --val_per_class V]   (a smaller set: tests)

The steps are the full-scale recipe's, run as a user would run them, with configs/demo.txt:
  1. tools/make_demo_dataset.py   a small ImageNet-layout set of shape and texture classes
  2. get_mu_sigma.py              channel statistics (skipped when mu_sigma.json matches the dataset)
  3. preprocess_val.py            the validation store (reused when complete)
  4. tools/launch.py              runtime_preprocessing.py in the background + train.py, a fresh run
  5. check_accuracy.py            10-view top-1/top-5 of every epoch -> accuracy.csv, accuracy.png
then prints the accuracy table, the plot's path and the total time. Everything it creates lives
in demo_data/ and demo_runs/ (see configs/demo.txt); a second run reuses the data and trains a
new run demo-<timestamp>, keeping the newest --keep_runs demo runs.
"""
import argparse
import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from settings import MU_SIGMA_FILE, load_settings  # noqa: E402
from utils.cli import quiet_tensorflow, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import is_temp_name  # noqa: E402
from data.buffer.protocol import producer_status  # noqa: E402
from data.sources import val_store  # noqa: E402
from data.sources.index import load_index  # noqa: E402
from engine import accuracy_log, run_folder  # noqa: E402
from tools.launch import die_with_launcher  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "demo.txt")
# The demo set: 10 classes; sizes chosen with configs/demo.txt so that `make demo` fits in
# 8 minutes on 2 CPU cores and ends above 80% top-1 (chance: 10%).
NUM_CLASSES = 10
TRAIN_PER_CLASS, VAL_PER_CLASS = 500, 40
EPOCHS = 10
BATCH_SIZE = 64
TIME_TARGET_S = 8 * 60
TOP1_TARGET = 80.0


def say(text=""):
    print(text, flush=True)


class Stopped(Exception):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so the running step is stopped first."""


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def run_child(argv):
    """Run one step's command in the foreground; on Ctrl-C/SIGTERM stop it before leaving."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, preexec_fn=die_with_launcher())
    try:
        return proc.wait()
    except BaseException as e:
        # Ctrl-C in a terminal reached the child too; a signal sent to this process only did not.
        proc.send_signal(signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


class Steps:
    def __init__(self, total):
        self.total, self.done, self.times = total, 0, []

    def run(self, title, argv=None, func=None):
        """Print a header, run a command (or a function), print its duration; a failure stops the demo."""
        self.done += 1
        say(f"\n==> [{self.done}/{self.total}] {title}")
        if argv:
            shown = [os.path.relpath(a, ROOT) if os.path.isabs(a) and a.startswith(ROOT) else a for a in argv[1:]]
            say("    $ python " + shlex.join(shown))
        start = time.monotonic()
        if argv:
            code = run_child(argv)
            if code != 0:
                raise UserError(f"step {self.done} ({title}) failed with exit code {code}; "
                                      f"see its messages above.")
            result = None
        else:
            result = func()
        seconds = time.monotonic() - start
        self.times.append((title, seconds))
        say(f"    ({title}: {seconds:.1f} s)")
        return result


def python(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *args]


def stats_are_current(settings):
    """True when mu_sigma.json exists and was computed on exactly this training set."""
    path = os.path.join(settings.get_mu_sigma.path_to_save, MU_SIGMA_FILE)
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return False
    index = load_index(settings.preprocess.ImageNet_folder, "train", settings.train.N)
    return stored.get("dataset_fingerprint") == index.fingerprint() and \
        stored.get("max_images") == settings.get_mu_sigma.max_images


def drop_stale_val_store(settings):
    """Remove the demo's validation store if it was built from another dataset or other settings.

    preprocess_val.py rightly refuses to mix stores; in the demo's own folder the fix is to rebuild.
    """
    pv, im = settings.preprocess_val, settings.images
    path = pv.path_to_save
    try:
        with open(os.path.join(path, val_store.SETTINGS_FILE)) as f:
            existing = json.load(f)
    except (OSError, ValueError):
        return
    index = load_index(pv.ImageNet_folder, "val", pv.N)
    wanted = val_store.settings_for(index, im.crop_size, im.eval_resize, pv.views_50, im.eval_scales_50,
                                    pv.chunk_images)
    if existing != wanted:
        say(f"    the store in {path} was built from other data or settings; rebuilding it")
        shutil.rmtree(path)


def prune_old_runs(runs_dir, keep):
    """Delete all but the newest `keep` demo-* runs (each is ~100 MB of epoch folders)."""
    if not os.path.isdir(runs_dir):
        return
    runs = sorted(n for n in os.listdir(runs_dir) if n.startswith("demo-") and not is_temp_name(n))
    for name in runs[:max(0, len(runs) - keep)]:
        shutil.rmtree(os.path.join(runs_dir, name), ignore_errors=True)
        say(f"    removed the old demo run {name}")


def producer_choice(settings):
    """One line: how many workers the producer ran and why, from its last heartbeat (data/buffer/protocol.py)."""
    record = producer_status(settings.train.buffer_folder)[1] or {}
    if "workers" not in record:
        return "    producer: no heartbeat with a worker count was left in the buffer folder"
    workers = record["workers"]
    return (f"    producer: {workers} worker{'s' if workers != 1 else ''} while the trainer ran, building "
            f"{record.get('build_rate', 0):,.0f} img/s ({record.get('sizing', '')})")


def summary(settings, run, steps, total_seconds, epochs):
    run_path = run_folder.run_dir(settings.train.path_for_saving, run)
    rows = [r for r in accuracy_log.read_rows(os.path.join(run_path, accuracy_log.CSV_NAME)) if r["protocol"] == 10]
    train_rows = _train_log(os.path.join(run_path, run_folder.EPOCH_CSV))
    say("\n==> Results (10 views: 4 corners + centre, each flipped; probabilities averaged)")
    say(f"    {'epoch':>5}  {'train loss':>10}  {'top-1 %':>8}  {'top-5 %':>8}")
    for r in rows:
        loss = train_rows.get(r["epoch"], {}).get("train_loss")
        loss_text = f"{float(loss):10.3f}" if loss else f"{'':>10}"
        say(f"    {r['epoch']:>5}  {loss_text}  {r['top1']:8.2f}  {r['top5']:8.2f}")
    say(f"    accuracy table: {os.path.join(run_path, accuracy_log.CSV_NAME)}")
    say(f"    plot:           {os.path.join(run_path, accuracy_log.PNG_NAME)}")
    say("\n==> Time per step")
    for title, seconds in steps.times:
        say(f"    {seconds:7.1f} s  {title}")
    say(f"    {total_seconds:7.1f} s  total")
    final = next((r for r in rows if r["epoch"] == epochs - 1), None)
    top1 = final["top1"] if final else float("nan")
    say(f"\nfinal epoch {epochs - 1}: top-1 {top1:.2f}% (target >= {TOP1_TARGET:.0f}%: "
        f"{'met' if top1 >= TOP1_TARGET else 'MISSED'}); total {total_seconds / 60:.1f} min "
        f"(target <= {TIME_TARGET_S // 60} min: {'met' if total_seconds <= TIME_TARGET_S else 'MISSED'})")


def _train_log(path):
    try:
        with open(path, newline="") as f:
            return {int(r["epoch"]): r for r in csv.DictReader(f)}
    except (OSError, ValueError, KeyError):
        return {}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"epochs to train (default {EPOCHS})")
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE,
                   help=f"images per batch, for the producer and the trainer alike (default {BATCH_SIZE})")
    p.add_argument("--keep_runs", type=int, default=3, help="demo runs kept in demo_runs/ (older ones are deleted)")
    p.add_argument("--classes", type=int, default=NUM_CLASSES, help="classes of the generated set")
    p.add_argument("--train_per_class", type=int, default=TRAIN_PER_CLASS, help="training images per class")
    p.add_argument("--val_per_class", type=int, default=VAL_PER_CLASS, help="validation images per class")
    p.add_argument("--config", default=CONFIG, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = (args.epochs, args.batch_size, args.keep_runs, args.classes, args.train_per_class, args.val_per_class)
    if min(sizes) < 1:
        raise UserError(f"--epochs, --batch_size, --keep_runs, --classes, --train_per_class and "
                              f"--val_per_class must be >= 1, received {', '.join(map(str, sizes))}.")
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGHUP, _raise_stopped)
    quiet_tensorflow()  # inherited by every step: no C++ start-up chatter in the demo's output
    start = time.monotonic()
    settings = load_settings(args.config, stats=False, decoder=False, devices=False)
    config = f"--config={args.config}"
    run = time.strftime("demo-%Y%m%d-%H%M%S")
    steps = Steps(5)
    say(f"make demo: ResNet-50 (width {settings.model.width_multiplier:g}) on a generated {args.classes}-class "
        f"set, {args.epochs} epochs, batch {args.batch_size}, run {run}")
    steps.run("Demo dataset", python("tools/make_demo_dataset.py", f"--out={settings.preprocess.ImageNet_folder}",
                                     f"--classes={args.classes}", f"--train_per_class={args.train_per_class}",
                                     f"--val_per_class={args.val_per_class}"))
    if stats_are_current(settings):
        steps.run("Channel statistics (reused)", func=lambda: say(
            f"    {os.path.join(settings.get_mu_sigma.path_to_save, MU_SIGMA_FILE)} matches the dataset"))
    else:
        steps.run("Channel statistics", python("get_mu_sigma.py", config))
    drop_stale_val_store(settings)
    steps.run("Validation views", python("preprocess_val.py", config))
    prune_old_runs(settings.train.path_for_saving, args.keep_runs - 1)
    steps.run("Training: producer + trainer", python(
        "tools/launch.py", config, f"--run_folder={run}", "--epoch_start=0", f"--epoch_end={args.epochs}",
        f"--batch_size={args.batch_size}", "--producer_arg=--no_progress", "--producer_arg=--clear_buffer"))
    say(producer_choice(settings))
    steps.run("Validation accuracy", python("check_accuracy.py", config, f"--run_folder={run}", "--epoch_start=0",
                                            f"--epoch_end={args.epochs}"))
    summary(settings, run, steps, time.monotonic() - start, args.epochs)
    return 0


def _main():
    try:
        run_main(main)
    except Stopped:
        print("stopped; the running step was stopped cleanly. Rerun `make demo` to start again.", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    _main()
