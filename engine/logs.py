"""What the trainer writes for people: the epoch CSV, the batch-id log, TensorBoard, the bar.

- <run>/log.csv: one row per epoch (CSV_FIELDS), rewritten atomically. A row for
  epoch e drops the rows of epochs >= e, which belong to an older timeline
  (a rerun with --overwrite, or epochs trained after the checkpoint we resumed from).
  `steps` is the global step count at the end of the epoch; `lr` the rate of the
  epoch's last step; `wait_seconds` the time the training loop stood still waiting
  for the next batch, `wait_fraction` that over `wall_seconds`; `skipped_steps` the steps of the
  epoch skipped for a non-finite loss or gradient (engine/numerics.py), `loss_scale` the float16
  dynamic loss scale at the epoch's end (empty in other precisions); `bottleneck` what held the
  epoch back (bottleneck(): compute-bound, or input-bound at or below the producer's core limit).
- <run>/batches.log: "epoch batch" for every optimizer step, appended and flushed
  per line, so after a kill it shows exactly which batches were trained on.
- <run>/tensorboard/: scalars every [train] log_every steps and per epoch; with [train]
  profile_steps = first, last a profiler trace of global steps first..last (inclusive) under
  plugins/profile/<time>/ (ProfilerWindow).
"""
import csv
import errno
import glob
import os

from tqdm import tqdm

from engine.run_folder import BATCH_LOG as BATCH_LOG_NAME, EPOCH_CSV as CSV_NAME, TENSORBOARD_DIR
from utils.files import atomic_write_csv, disk_full_error
CSV_FIELDS = ("epoch", "steps", "train_loss", "train_top1", "lr", "images_per_sec", "wait_seconds",
              "wait_fraction", "wall_seconds", "skipped_steps", "loss_scale", "bottleneck")
WAIT_WARN_FRACTION = 0.05


def read_csv(run_path):
    path = os.path.join(run_path, CSV_NAME)
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_epoch_row(run_path, row):
    rows = [r for r in read_csv(run_path) if int(r["epoch"]) < int(row["epoch"])]
    rows.append({k: _fmt(row[k]) for k in CSV_FIELDS})
    atomic_write_csv(os.path.join(run_path, CSV_NAME), CSV_FIELDS, rows, durable=True)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def bottleneck(wait_fraction, producer):
    """(the word for what held the epoch back, a sentence of advice or None).

    `producer`: the producer's heartbeat record (data/buffer/protocol.py), None if there is none. The trainer
    is compute-bound when it waited at most WAIT_WARN_FRACTION of the epoch; otherwise input-bound, either at
    the producer's core limit (it runs every worker it may) or below it (it is still adding workers, or the
    workers are not what is slow: a buffer folder on a disk, not a RAM disk).
    """
    if wait_fraction <= WAIT_WARN_FRACTION:
        return "compute-bound", None
    waited = (f"the trainer waited for the buffer {100 * wait_fraction:.1f}% of the epoch "
              f"(more than {100 * WAIT_WARN_FRACTION:.0f}%)")
    if not producer or "workers" not in producer:
        return "input-bound", f"{waited}: the producer is the bottleneck; raise [runtime_preprocessing] " \
                              f"num_of_threads if CPU cores are free, or use the preprocess.py scale cache."
    workers, most = producer["workers"], producer.get("max_workers", producer["workers"])
    rate = producer.get("build_rate", 0.0)
    if workers >= most:
        fix = ("raise num_of_threads if cores are free (or set it to auto)" if not
               str(producer.get("sizing", "")).startswith("num_of_threads = auto") else
               "give it more cores (a machine with more, or a higher max_workers)")
        return "input-bound at core limit", (
            f"{waited} and the producer runs all the workers it may ({workers}, {rate:,.0f} img/s; "
            f"{producer.get('sizing', '')}): {fix}, or build preprocess.py's scale cache so workers skip "
            f"decoding full-size JPEGs.")
    return "input-bound below core limit", (
        f"{waited} while the producer ran {workers} of at most {most} workers ({rate:,.0f} img/s): it is "
        f"still adding workers, or the workers wait on the buffer folder: put it on a RAM disk, not a disk.")


class BatchLog:
    """Appends "epoch batch" per trained step; line-flushed."""

    def __init__(self, run_path, enabled=True):
        self.path = os.path.join(run_path, BATCH_LOG_NAME)
        self.file = open(self.path, "a", buffering=1) if enabled else None
        if self.file and self.file.tell() and not _ends_with_newline(self.path):
            self.write_line("")  # a killed writer's half line stays on a line of its own

    def write(self, epoch, batch):
        if self.file:
            self.write_line(f"{epoch} {batch}")

    def write_line(self, text):
        try:
            self.file.write(text + "\n")
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise disk_full_error(self.path, len(text) + 1, too_large=e.errno == errno.EFBIG) from None
            raise

    def close(self):
        if self.file:
            self.file.close()


class TensorBoard:
    """Scalar events under <run>/tensorboard; a no-op when disabled (non-chief workers).

    Written with the core tf.summary.write and the 'scalars' plugin tag that
    tensorboard's own scalar summary uses, so TensorBoard shows them as scalars
    without the tensorboard package being installed here (tensorflow-cpu 2.21
    does not pull it in).
    """

    def __init__(self, run_path, enabled=True, subdir=""):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2
        self.tf = tf
        self.metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars", content=b""))
        folder = os.path.join(run_path, TENSORBOARD_DIR, subdir)
        self.writer = tf.summary.create_file_writer(folder) if enabled else None

    def scalars(self, step, values, prefix=""):
        if not self.writer:
            return
        with self.writer.as_default():
            for name, value in values.items():
                if value is not None:
                    self.tf.summary.write(prefix + name, self.tf.constant(float(value), self.tf.float32),
                                          step=int(step), metadata=self.metadata)

    def flush(self):
        if self.writer:
            self.writer.flush()

    def close(self):
        if self.writer:
            self.writer.close()


class ProfilerWindow:
    """A tf.profiler.experimental trace of the global steps first..last (inclusive) into <run>/tensorboard/.

    TensorBoard's Profile tab (pip install tensorboard-plugin-profile) then shows per step
    whether it waited on input (the trace view's gaps between steps, the input-pipeline
    analysis) or on compute. Steps are counted from 0 over the whole run, resumes included.
    The trace starts before step `first` is launched and stops before step last + 1 is, or
    when the run ends; on a GPU the last traced step's kernels may still be running then.
    A run that ends before `first` (or before `last`) says so once, at close().
    """

    def __init__(self, run_path, steps, enabled=True):
        self.window = tuple(steps) if steps and enabled else None
        self.logdir = os.path.join(run_path, TENSORBOARD_DIR)
        self.active = False
        self.traced_from = None  # the first traced step, once the trace has started
        self.launched = None     # the last step at_step was called for
        self.reported = False

    def at_step(self, step):
        """Call before launching global step `step` (the number of steps done so far)."""
        if self.window is None:
            return
        self.launched = step
        first, last = self.window
        if not self.active and self.traced_from is None and first <= step <= last:
            import tensorflow as tf
            tf.profiler.experimental.start(self.logdir)
            self.active, self.traced_from = True, step
        elif self.active and step > last:
            self.close()

    def close(self):
        import logging
        log = logging.getLogger("train")
        if self.active:
            import tensorflow as tf
            tf.profiler.experimental.stop()
            self.active = False
            first, last = self.window
            traced_to = min(last, self.launched)
            ended = (f"; the run ended after step {traced_to}, before profile_steps' last step {last}"
                     if traced_to < last else "")
            log.info("profiler trace of steps %d..%d written under %s%s", self.traced_from, traced_to,
                     os.path.join(self.logdir, "plugins", "profile"), ended)
        elif (self.window and self.traced_from is None and self.launched is not None
              and self.launched < self.window[0] and not self.reported):
            self.reported = True
            log.warning("no profiler trace written: [train] profile_steps = %d, %d but the run's last global step "
                        "was %d (steps count from 0 over the whole run); choose steps the run reaches.",
                        self.window[0], self.window[1], self.launched)


def _ends_with_newline(path):
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_scalars(run_path):
    """{tag: [(step, value), ...]} from <run>/tensorboard (for tests and plots)."""
    import tensorflow as tf  # the evaluator's and tests' processes load it only to read events
    out = {}
    for path in sorted(glob.glob(os.path.join(run_path, TENSORBOARD_DIR, "events.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return out


def progress_bar(epoch, total, enabled=True):
    # One bar per epoch on stderr; refreshed at most twice a second, so the bar
    # never prints more than it has to.
    return tqdm(total=total, desc=f"epoch {epoch}", unit="batch", dynamic_ncols=True, mininterval=0.5,
                disable=not enabled, leave=True)
