"""Validation accuracy of saved epochs: the seed's check_accuracy, batched and overlapped.

Protocols (number of views per image, all from preprocess_val.py's store):
  10  resize the shorter side to [images] eval_resize, 4 corner crops + centre crop, each also
      flipped (the seed's README protocol, the default);
   1  the single centre crop at eval_resize (the TF official ResNet recipe's single-crop figure);
  50  5 scales ([images] eval_scales_50) x 5 crops x 2 flips (what the original code ran).
For each image the SOFTMAX PROBABILITIES of its views are averaged (not the logits), then
ranked: top-1 is the best class, top-5 any of the best five. Ties rank the lower class index
first, so a result never depends on sort internals.

Speed: many images' views go to the model in one call, and a background thread reads and
stacks the next batches while the model runs (TensorFlow releases the GIL while it computes).

Outputs per epoch: the seed's `Epoch# e  Top 1 accuracy: x%  Top 5 accuracy: y%` line, one row
in <run>/accuracy.csv keyed by (epoch, protocol, weights) (re-running replaces it), and <run>/accuracy.png.
`weights` is 'raw' (<epoch>/saved_model) or 'ema' (<epoch>/saved_model_ema, [train] ema_decay > 0);
a CSV written before that column existed reads as all 'raw'.
"""
import contextlib
import csv
import functools
import io
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from data.sources.val_store import open_val_store
from engine import run_folder
from engine.plot import plot_accuracy
from engine.prefetch import prefetch
from engine.waiting import REMIND_SECONDS  # a wait is announced at once, then every 30 s with the time left
from utils import TMP_PREFIX, UserError, atomic_write_text, check_epoch_range, exclusive_lock, is_temp_name


PROTOCOLS = (10, 1, 50)
CSV_NAME = "accuracy.csv"
PNG_NAME = "accuracy.png"
CSV_FIELDS = ("epoch", "protocol", "top1", "top5", "images", "weights")
WEIGHTS = ("raw", "ema")
MODEL_FOLDERS = {"raw": "saved_model", "ema": "saved_model_ema"}
DEFAULT_VIEWS_PER_CALL = 256  # views per forward call when --batch_images is not given
LOAD_RETRIES = 3  # a complete folder that fails to load is retried this often, then reported

# Flushed, so the lines show up in order when stdout is a pipe (the launcher, the demo).
say_flushed = functools.partial(print, flush=True)


# ----------------------------------------------------------------------------
# Run folder layout (engine.run_folder: <path_for_saving>/<run>/<epoch>/saved_model)
# ----------------------------------------------------------------------------

def saved_model_dir(run_path, epoch, weights="raw"):
    return os.path.join(run_folder.epoch_dir(run_path, epoch), MODEL_FOLDERS[weights])


# ----------------------------------------------------------------------------
# Waiting for and loading a model
# ----------------------------------------------------------------------------



def wait_for_model(run_path, epoch, timeout=None, poll=2.0, say=say_flushed, load=None, remind_every=REMIND_SECONDS,
                   weights="raw"):
    """Return the loaded SavedModel of `epoch`, waiting until its folder appears.

    train.py renames each epoch folder into place only when it is complete, so its
    existence means the model is whole; a load error is still retried a few times
    (a copy from another machine, say, may be mid-flight). timeout=None waits forever.
    What is awaited is said at once (a run folder that does not exist is named as such),
    then every `remind_every` seconds with the time left.
    """
    path = saved_model_dir(run_path, epoch, weights)
    start = time.monotonic()
    next_reminder = start
    failures = 0
    while True:
        if os.path.isdir(path):
            if load is None:  # imported here, so what is awaited is said before TensorFlow's seconds of start-up
                import tensorflow as tf
                load = tf.saved_model.load
            try:
                return load(path)
            except Exception as e:  # noqa: BLE001 - any load failure is retried, then reported
                failures += 1
                if failures >= LOAD_RETRIES:
                    raise UserError(f"Could not load the model of epoch {epoch} from {path} "
                                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                    f"delete that epoch folder and retrain it.") from None
                say(f"Model folder {path} did not load ({type(e).__name__}); retrying.")
        elif weights != "raw" and run_folder.is_complete(run_folder.epoch_dir(run_path, epoch)):
            raise UserError(f"Epoch {epoch} of {run_path} has no {MODEL_FOLDERS[weights]}/ (it was trained with "
                            f"[train] ema_decay = 0); evaluate it with --weights raw, or train with ema_decay > 0.")
        now = time.monotonic()
        waited = now - start
        if timeout is not None and waited >= timeout:
            raise UserError(f"Timed out after {timeout:g} s waiting for {path}; start or resume train.py "
                            f"for that epoch, or raise --timeout.")
        if failures == 0 and now >= next_reminder:
            say(waiting_message(run_path, epoch, waited, timeout, first=next_reminder == start))
            next_reminder = now + remind_every
        sleep = poll if timeout is None else max(0.0, min(poll, timeout - waited))
        time.sleep(sleep)


def waiting_message(run_path, epoch, waited, timeout, first=True):
    """What check_accuracy.py is waiting for, what creates it, and how long it will wait."""
    left = ("no time limit; --timeout sets one" if timeout is None
            else f"giving up in {max(0.0, timeout - waited):.0f} s")
    name = os.path.basename(os.path.normpath(run_path))
    if not os.path.isdir(run_path):
        parent = os.path.dirname(os.path.normpath(run_path))
        runs = sorted(n for n in (os.listdir(parent) if os.path.isdir(parent) else [])
                      if os.path.isdir(os.path.join(parent, n)) and not n.startswith("."))
        there = f"runs there: {', '.join(runs[:8])}{', ...' if len(runs) > 8 else ''}" if runs else "no runs there yet"
        return (f"The run folder {run_path} does not exist ({there}); waiting for train.py --run_folder={name} to "
                f"create it and save epoch {epoch}; if the name is mistyped, stop and pass the right --run_folder "
                f"(waited {waited:.0f} s, {left}).")
    path = saved_model_dir(run_path, epoch)
    if first:
        return (f"Waiting for {path}: epoch {epoch} is not saved yet; train.py --run_folder={name} saves it when "
                f"the epoch ends ({left}).")
    return f"Still waiting for {path} (epoch {epoch}; waited {waited:.0f} s, {left})."


class SavedModelPredictor:
    """Calls a SavedModel's 'serving_default' (uint8 images in, {'logits','probabilities'} out)."""

    def __init__(self, loaded):
        try:
            fn = loaded.signatures["serving_default"]
        except (AttributeError, KeyError):
            raise UserError("The saved model has no 'serving_default' signature; re-export it with "
                            "model.export.export_saved_model.") from None
        _, kwargs = fn.structured_input_signature
        if len(kwargs) != 1:
            raise UserError(f"Expected a 'serving_default' signature with one image input, "
                            f"received inputs {sorted(kwargs)}.")
        self._fn = fn
        self._input = next(iter(kwargs))

    def __call__(self, images):
        return self._fn(**{self._input: images})["probabilities"]

    @staticmethod
    def prepare(images):
        """Runs on the loading thread: the host-to-tensor copy stays off the inference thread."""
        import tensorflow as tf
        return tf.convert_to_tensor(images)


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------

def average_views(probabilities, views):
    """[n*V, C] per-view probabilities -> [n, C] mean over each image's V views (float64)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return probabilities.reshape(-1, views, probabilities.shape[-1]).mean(axis=1)


def topk_hits(scores, labels, ks=(1, 5)):
    """Number of images whose label is among the k best scores, for each k.

    A stable sort of the negated scores ranks equal scores by class index, so
    ties resolve the same way on every machine.
    """
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :max(ks)]
    hits = order == np.asarray(labels).reshape(-1, 1)
    return {k: int(hits[:, :k].any(axis=1).sum()) for k in ks}


@dataclass
class EpochResult:
    epoch: int
    protocol: int
    top1: float  # percent
    top5: float  # percent
    images: int
    seconds: float
    weights: str = "raw"

    @property
    def images_per_second(self):
        return self.images / self.seconds if self.seconds > 0 else float("inf")


# ----------------------------------------------------------------------------
# The overlapped loop
# ----------------------------------------------------------------------------

def _flattener(prepare=None):
    def flatten(batch):
        views, labels = batch
        views = np.asarray(views)
        n, v = views.shape[:2]
        flat = np.ascontiguousarray(views.reshape((n * v,) + views.shape[2:]))
        return (prepare(flat) if prepare else flat), v, np.asarray(labels)
    return flatten


def score(predict, batches, num_classes=None, progress=None):
    """Top-1/top-5 hit counts over `batches` of (views [n,V,h,w,3] uint8, labels [n]).

    predict: callable [n*V,h,w,3] uint8 -> [n*V,C] probabilities (tensor or array); its optional
    `prepare(array)` runs on the loading thread. Returns (hits1, hits5, images).
    """
    hits1 = hits5 = images = 0
    for flat, views, labels in prefetch(batches, convert=_flattener(getattr(predict, "prepare", None)), name="eval-prefetch"):
        probabilities = np.asarray(predict(flat))
        if num_classes is not None and probabilities.shape[-1] != num_classes:
            raise UserError(f"The model predicts {probabilities.shape[-1]} classes but the validation set has "
                            f"{num_classes}; evaluate with the config the model was trained with.")
        hits = topk_hits(average_views(probabilities, views), labels)
        hits1 += hits[1]
        hits5 += hits[5]
        images += len(labels)
        if progress is not None:
            progress(len(labels))
    return hits1, hits5, images


def images_per_call(protocol, batch_images=None):
    """Images per forward call: --batch_images, or about DEFAULT_VIEWS_PER_CALL views."""
    if batch_images:
        return int(batch_images)
    return max(1, DEFAULT_VIEWS_PER_CALL // protocol)


def check_protocol(store, protocol):
    if protocol not in PROTOCOLS:
        raise UserError(f"--views must be one of {', '.join(map(str, PROTOCOLS))}, received {protocol}.")
    available = getattr(store, "protocols", None)
    if available is not None and protocol not in available:
        raise UserError(f"The validation store at {getattr(store, 'path', '?')} has no {protocol}-view data "
                        f"(it holds protocols {sorted(available)}); set [preprocess_val] views_50 = true and "
                        f"rerun preprocess_val.py, or use --views 10.")


def evaluate_epoch(predict, store, protocol, epoch, batch_images=None, show_progress=True):
    """Evaluate one model on the whole store with one protocol; returns EpochResult."""
    check_protocol(store, protocol)
    n = images_per_call(protocol, batch_images)
    bar = _progress_bar(len(store), f"epoch {epoch}, {protocol} views") if show_progress else None
    start = time.perf_counter()
    try:
        hits1, hits5, images = score(predict, store.iter_batches(protocol, n), num_classes=len(store.classes),
                                     progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - start
    if images == 0:
        raise UserError(f"The validation store at {getattr(store, 'path', '?')} holds no images; "
                        f"rerun preprocess_val.py.")
    return EpochResult(epoch=epoch, protocol=protocol, top1=100.0 * hits1 / images, top5=100.0 * hits5 / images,
                       images=images, seconds=seconds)


def _progress_bar(total, desc):
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=None, mininterval=1.0)


# ----------------------------------------------------------------------------
# accuracy.csv and accuracy.png
# ----------------------------------------------------------------------------

def read_rows(csv_path):
    """Rows of accuracy.csv as dicts (epoch, protocol, images int; top1, top5 float; weights str); [] if absent."""
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) not in (CSV_FIELDS, CSV_FIELDS[:-1]):  # without weights: all raw
            raise UserError(f"{csv_path} has columns {reader.fieldnames}, expected {list(CSV_FIELDS)}; "
                            f"move it away and rerun.")
        try:
            rows = [{"epoch": int(r["epoch"]), "protocol": int(r["protocol"]), "top1": float(r["top1"]),
                     "top5": float(r["top5"]), "images": int(r["images"]), "weights": r.get("weights", "raw")}
                    for r in reader]
            if any(r["weights"] not in WEIGHTS for r in rows):
                raise ValueError
            return rows
        except (TypeError, ValueError):
            raise UserError(f"{csv_path} holds a malformed row; move it away and rerun.") from None


def upsert_row(rows, result):
    """rows with the (epoch, protocol, weights) row of `result` replaced or added, sorted by weights
    (raw first), protocol, then epoch."""
    key = (result.epoch, result.protocol, result.weights)
    kept = [r for r in rows if (r["epoch"], r["protocol"], r["weights"]) != key]
    kept.append({"epoch": result.epoch, "protocol": result.protocol, "top1": round(result.top1, 4),
                 "top5": round(result.top5, 4), "images": result.images, "weights": result.weights})
    return sorted(kept, key=lambda r: (WEIGHTS.index(r["weights"]), r["protocol"], r["epoch"]))


def write_rows(csv_path, rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, out.getvalue(), durable=True)


def record(run_path, result):
    """Put `result` into <run>/accuracy.csv (replacing its epoch/protocol row) and redraw accuracy.png."""
    os.makedirs(run_path, exist_ok=True)
    csv_path = os.path.join(run_path, CSV_NAME)
    png_path = os.path.join(run_path, PNG_NAME)
    with exclusive_lock(run_path):  # serialises concurrent evaluators' read-modify-write of the CSV
        _remove_dead_temps(run_path)
        rows = upsert_row(read_rows(csv_path), result)
        write_rows(csv_path, rows)
        _plot(rows, run_path)
    return csv_path, png_path


def refresh(run_path):
    """Tidy after a killed evaluator: remove its temp files and redraw accuracy.png from accuracy.csv
    (a kill between the two writes leaves the plot one row behind)."""
    with exclusive_lock(run_path):  # serialises concurrent evaluators' read-modify-write of the CSV
        _remove_dead_temps(run_path)
        rows = read_rows(os.path.join(run_path, CSV_NAME))
        if rows:
            _plot(rows, run_path)


def _plot(rows, run_path):
    plot_accuracy(rows, os.path.join(run_path, PNG_NAME),
                  title=f"Validation accuracy: {os.path.basename(os.path.normpath(run_path))}")


def _remove_dead_temps(run_path):
    """Temp files of accuracy.csv/png left by a killed evaluator (writers hold the lock, so none is live)."""
    for name in os.listdir(run_path):
        if is_temp_name(name) and name[len(TMP_PREFIX):].startswith((CSV_NAME, PNG_NAME)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(run_path, name))


def first_missing_epoch(run_path, protocol, epoch_end, weights="raw"):
    """For --epoch_start auto: the first epoch below epoch_end without a row for `protocol` and `weights`."""
    done = {r["epoch"] for r in read_rows(os.path.join(run_path, CSV_NAME))
            if r["protocol"] == protocol and r["weights"] == weights}
    return next((e for e in range(epoch_end) if e not in done), epoch_end)


# ----------------------------------------------------------------------------
# The whole check_accuracy.py run
# ----------------------------------------------------------------------------

def result_line(result):
    return (f"Epoch# {result.epoch}  Top 1 accuracy: {result.top1:.2f}%  Top 5 accuracy: {result.top5:.2f}%  "
            f"({'EMA weights, ' if result.weights == 'ema' else ''}"
            f"{result.protocol} view{'' if result.protocol == 1 else 's'}, {result.images} images, "
            f"{result.images_per_second:.0f} images/s)")


def check_accuracy(cfg, run, epoch_start, epoch_end, views=10, timeout=None, batch_images=None,
                   poll=2.0, say=say_flushed, weights="raw"):
    """Evaluate epochs [epoch_start, epoch_end) of a run as they appear; returns the EpochResults."""
    path = run_folder.run_dir(cfg.train.path_for_saving, run)
    if epoch_start == "auto":
        epoch_start = first_missing_epoch(path, views, epoch_end, weights)
        if epoch_start == epoch_end:
            refresh(path)
            say(f"Nothing to do: every epoch below {epoch_end} already has a {views}-view {weights} row in "
                f"{os.path.join(path, CSV_NAME)}.")
            return []
    check_epoch_range(epoch_start, epoch_end)
    store = open_val_store(cfg.preprocess_val.path_to_save)
    check_protocol(store, views)
    expected = cfg.preprocess_val.N
    say(f"Evaluating {path} epochs {epoch_start}..{epoch_end - 1} with the {views}-view protocol on "
        f"{len(store)} validation images.")
    if len(store.classes) <= 5:
        say(f"note: the validation set has {len(store.classes)} classes, so every image's class is among the best "
            f"five: top-5 accuracy is 100% by construction; read top-1.")
    results = []
    for epoch in range(epoch_start, epoch_end):
        predictor = SavedModelPredictor(wait_for_model(path, epoch, timeout=timeout, poll=poll, say=say,
                                                       weights=weights))
        result = evaluate_epoch(predictor, store, views, epoch, batch_images)
        result.weights = weights
        say(result_line(result))
        if expected and result.images != expected:
            say(f"warning: evaluated {result.images} images but [preprocess_val] N = {expected}; "
                f"the accuracy is not comparable with a full validation run.")
        csv_path, png_path = record(path, result)
        write_tensorboard(path, result)
        results.append(result)
    say(f"Results: {csv_path}  Plot: {png_path}")
    return results


VALIDATION_TB = "validation"  # <run>/tensorboard/validation: a second TensorBoard run beside the trainer's


def epoch_step(run_path, epoch):
    """The global step at the end of `epoch` (the x axis of the trainer's epoch/ scalars): from log.csv,
    else from the epoch's config.txt header; None when neither says."""
    from engine import logs
    for row in logs.read_csv(run_path):
        if row.get("epoch") == str(epoch) and row.get("steps", "").isdigit():
            return int(row["steps"])
    try:
        with open(os.path.join(run_folder.epoch_dir(run_path, epoch), "config.txt")) as f:
            first = f.readline()
    except OSError:
        return None
    words = first.rsplit("global step ", 1)
    return int(words[1]) if len(words) == 2 and words[1].strip().isdigit() else None


def write_tensorboard(run_path, result):
    """Validation top-1/top-5 (fractions, as the trainer's epoch/train_top1) at the epoch's global step
    (tags val_top1_<protocol>view, with _ema appended for the EMA weights),
    so one `tensorboard --logdir <run>/tensorboard` shows training and validation curves together."""
    from engine import logs
    step = epoch_step(run_path, result.epoch)
    suffix = "" if result.weights == "raw" else f"_{result.weights}"  # the EMA's curve beside the raw one, not on it
    board = logs.TensorBoard(run_path, subdir=VALIDATION_TB)
    try:
        board.scalars(result.epoch if step is None else step,
                      {f"val_top1_{result.protocol}view{suffix}": result.top1 / 100.0,
                       f"val_top5_{result.protocol}view{suffix}": result.top5 / 100.0}, "epoch/")
    finally:
        board.close()
