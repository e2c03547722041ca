"""The accuracy log of a run: <run>/accuracy.csv keyed by (epoch, protocol, weights, crop) (re-running replaces a row),
<run>/accuracy.png redrawn from it, and the validation scalars in <run>/tensorboard/validation.

`weights` is 'raw' (<epoch>/saved_model) or 'ema' (<epoch>/saved_model_ema, [train] ema_decay > 0);
a CSV written before that column existed reads as all 'raw'. `crop` is the views' side (check_accuracy.py
--crop); a CSV without it reads as the config's [images] crop_size. Writers hold the run's accuracy lock.
"""
import csv
import os


from engine import run_folder
from engine.plot import plot_accuracy
from utils.errors import UserError
from utils.files import atomic_write_csv, exclusive_lock, remove_stale_temps


CSV_NAME, PNG_NAME = run_folder.ACCURACY_CSV, run_folder.ACCURACY_PNG
CSV_FIELDS = ("epoch", "protocol", "top1", "top5", "images", "weights", "crop")


def read_rows(csv_path, default_crop=None):
    """Rows of accuracy.csv as dicts (epoch, protocol, images, crop int; top1, top5 float; weights str); [] if
    absent. Rows written before the crop column get `default_crop` (the config's crop_size)."""
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) not in (CSV_FIELDS, CSV_FIELDS[:-1], CSV_FIELDS[:-2]):  # older files
            raise UserError(f"{csv_path} has columns {reader.fieldnames}, expected {list(CSV_FIELDS)}; "
                            f"move it away and rerun.")
        try:
            rows = [{"epoch": int(r["epoch"]), "protocol": int(r["protocol"]), "top1": float(r["top1"]),
                     "top5": float(r["top5"]), "images": int(r["images"]), "weights": r.get("weights", "raw"),
                     "crop": int(r["crop"]) if r.get("crop") else default_crop}
                    for r in reader]
            if any(r["weights"] not in run_folder.WEIGHTS for r in rows):
                raise ValueError
            return rows
        except (TypeError, ValueError):
            raise UserError(f"{csv_path} holds a malformed row; move it away and rerun.") from None


def upsert_row(rows, result):
    """rows with the (epoch, protocol, weights, crop) row of `result` replaced or added, sorted by weights
    (raw first), protocol, crop, then epoch."""
    key = (result.epoch, result.protocol, result.weights, result.crop)
    kept = [r for r in rows if (r["epoch"], r["protocol"], r["weights"], r["crop"]) != key]
    kept.append({"epoch": result.epoch, "protocol": result.protocol, "top1": round(result.top1, 4),
                 "top5": round(result.top5, 4), "images": result.images, "weights": result.weights,
                 "crop": result.crop})
    return sorted(kept, key=lambda r: (run_folder.WEIGHTS.index(r["weights"]), r["protocol"], r["crop"] or 0,
                                       r["epoch"]))


def write_rows(csv_path, rows):
    atomic_write_csv(csv_path, CSV_FIELDS, rows, durable=True)


def record(run_path, result, default_crop=None):
    """Put `result` into <run>/accuracy.csv (replacing its epoch/protocol/weights/crop row) and redraw
    accuracy.png; rows of a CSV without the crop column are the config's crop (`default_crop`)."""
    os.makedirs(run_path, exist_ok=True)
    csv_path = os.path.join(run_path, CSV_NAME)
    png_path = os.path.join(run_path, PNG_NAME)
    with exclusive_lock(run_path):  # serialises concurrent evaluators' read-modify-write of the CSV
        remove_stale_temps(run_path, (CSV_NAME, PNG_NAME))  # a killed evaluator's; writers hold this lock
        rows = upsert_row(read_rows(csv_path, default_crop), result)
        write_rows(csv_path, rows)
        _plot(rows, run_path)
    return csv_path, png_path


def refresh(run_path):
    """Tidy after a killed evaluator: remove its temp files and redraw accuracy.png from accuracy.csv
    (a kill between the two writes leaves the plot one row behind)."""
    with exclusive_lock(run_path):  # serialises concurrent evaluators' read-modify-write of the CSV
        remove_stale_temps(run_path, (CSV_NAME, PNG_NAME))  # a killed evaluator's; writers hold this lock
        rows = read_rows(os.path.join(run_path, CSV_NAME))
        if rows:
            _plot(rows, run_path)


def _plot(rows, run_path):
    plot_accuracy(rows, os.path.join(run_path, PNG_NAME),
                  title=f"Validation accuracy: {os.path.basename(os.path.normpath(run_path))}")


def first_missing_epoch(run_path, protocol, epoch_end, weights="raw", crop=None):
    """For --epoch_start auto: the first epoch below epoch_end without a row for `protocol`, `weights` and
    `crop` (None: any crop)."""
    done = {r["epoch"] for r in read_rows(os.path.join(run_path, CSV_NAME), crop)
            if r["protocol"] == protocol and r["weights"] == weights and (crop is None or r["crop"] == crop)}
    return next((e for e in range(epoch_end) if e not in done), epoch_end)


VALIDATION_TB = "validation"  # <run>/tensorboard/validation: a second TensorBoard run beside the trainer's


def epoch_step(run_path, epoch):
    """The global step at the end of `epoch` (the x axis of the trainer's epoch/ scalars): from log.csv,
    else from the epoch's config.txt header; None when neither says."""
    from engine import logs
    for row in logs.read_csv(run_path):
        if row.get("epoch") == str(epoch) and row.get("steps", "").isdigit():
            return int(row["steps"])
    try:
        with open(run_folder.config_path(run_folder.epoch_dir(run_path, epoch))) as f:
            first = f.readline()
    except OSError:
        return None
    words = first.rsplit("global step ", 1)
    return int(words[1]) if len(words) == 2 and words[1].strip().isdigit() else None


def write_tensorboard(run_path, result, default_crop=None):
    """Validation top-1/top-5 (fractions, as the trainer's epoch/train_top1) at the epoch's global step
    (tags val_top1_<protocol>view, with _ema appended for the EMA weights and _<crop>px for a crop other
    than the config's `default_crop`),
    so one `tensorboard --logdir <run>/tensorboard` shows training and validation curves together."""
    from engine import logs
    step = epoch_step(run_path, result.epoch)
    suffix = "" if result.weights == "raw" else f"_{result.weights}"  # the EMA's curve beside the raw one, not on it
    if result.crop is not None and result.crop != default_crop:
        suffix += f"_{result.crop}px"  # another crop's curve beside the training crop's
    board = logs.TensorBoard(run_path, subdir=VALIDATION_TB)
    try:
        board.scalars(result.epoch if step is None else step,
                      {f"val_top1_{result.protocol}view{suffix}": result.top1 / 100.0,
                       f"val_top5_{result.protocol}view{suffix}": result.top5 / 100.0}, "epoch/")
    finally:
        board.close()

