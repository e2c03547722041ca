"""The training loop: batches from the buffer -> one tf.function step each -> an epoch folder per epoch.

One step is one forward pass (the original ran three): logits = net(x, training=True),
loss = mean softmax cross-entropy from the logits + net.regularization_loss()
(L2 on conv and dense kernels, which here does reach the gradients), one
optimizer update, net.train_step += 1. The update is applied on every replica or on none: the step sums
the replicas' gradients itself and skips when the sums, the loss or a replica's proposed batch-renorm
statistics are not finite (engine/numerics.py); a skipped step changes no weight, slot, statistic or EMA
value and halves the float16 loss scale, but still advances the global step, which counts batches
consumed: the learning rate, the renorm ramp and epoch boundaries stay tied to the data. The global step lives in the model
(net.train_step) and drives the batch-renorm ramp and the learning-rate
schedule; the checkpoint restores it with the weights, moving statistics,
optimizer slots and loss scale, so a resumed run continues exactly.

Where the time goes is measured, not guessed: `wait_seconds` is the time the
loop stood still waiting for the next batch (the reading thread prefetches one
batch ahead, so a healthy producer costs no waiting at all).

Determinism ([train] deterministic = true): seeds Python, numpy and TF
(keras.utils.set_random_seed) and enables TF op determinism, so a run and its
resumed twin give bit-identical weights. Cost: some GPU kernels (cuDNN
convolution autotuning, scatter/segment reductions) fall back to slower
deterministic versions, typically 5-30% on GPU; on CPU the difference is small.
Batches are deterministic regardless (the producer's draws derive from the seed).
"""
import dataclasses
import logging
import time

import numpy as np

from engine import logs, recipe_line, run_folder, run_identity, schedules, train_step
from engine.distribute import check_divisible, is_chief, make_strategy
from engine.prefetch import Prefetcher
from utils.errors import UserError
from utils.files import disk_full_error, human_bytes
from utils.processes import git_hash

log = logging.getLogger("train")

PREFETCH_DEPTH = 2
GRAPH_BYTES = 1_000_000  # a ResNet-50 SavedModel's graph and metadata (~0.8 MB), beside its variables
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")


def batch_prefetcher(reader, epoch, num_batches, place=None):
    """A Prefetcher of (batch index, batch) over one epoch of the buffer, `PREFETCH_DEPTH` batches ahead;
    `place(batch)` (the copy to the training device) runs on its thread too."""
    items = ((b, reader.read(epoch, b)) for b in range(num_batches))
    convert = (lambda item: (item[0], place(item[1]))) if place else None
    return Prefetcher(items, PREFETCH_DEPTH, convert, name=f"prefetch-epoch-{epoch}")


class Trainer:
    """Builds the strategy, model, optimizer and checkpoint; trains epochs; saves epoch folders."""

    def __init__(self, settings, reader, run_path, batch_size, learning_rate=None, epoch_end=None,
                 overwrite=False, command="", inject=None):
        """`settings`: resolved with devices=True and with_classes() (settings/__init__.py), so every auto and
        every cross-key check was settled before TensorFlow loaded. `inject`: an engine.numerics.Injection
        (tests only); None builds none of its ops into the step."""
        if "auto" in (settings.train.mixed_precision, settings.train.distribute) or not settings.model.num_classes:
            raise ValueError("Trainer needs settings resolved with devices=True and with_classes()")
        import tensorflow as tf
        from engine.numerics import SkipTracker
        self.tf = tf
        self.settings, self.reader, self.run_path = settings, reader, run_path
        train = settings.train
        self.batch_size, self.overwrite, self.command = batch_size, overwrite, command
        self.learning_rate = learning_rate  # train.py --learning_rate: overrides [schedule]
        self.chief = is_chief()
        # The strategy first: MultiWorkerMirroredStrategy must exist before other TF state.
        self.strategy = make_strategy(train.distribute)
        self.replicas = self.strategy.num_replicas_in_sync
        # The settings checked the batch against the replicas they counted; this guards against a count that differs.
        self.per_replica = check_divisible(batch_size, self.replicas)
        self._seed(train)
        self.precision_reason = settings.precision_reason  # why [train] mixed_precision is what it is
        # SavedModel export chatter, and the reader's line per wait: waits are summed into the bar,
        # the epoch line, log.csv and TensorBoard instead, so the log never outpaces the bar.
        for name in ("tensorflow", "absl", "data.buffer"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.mu, self.sigma = settings.mu, settings.sigma
        self.steps_per_epoch = reader.batches_per_epoch
        self.accumulation = train.accumulation_steps
        self.effective_batch = schedules.effective_batch(batch_size, self.accumulation)
        self.schedule = schedules.from_config(settings.schedule, self.steps_per_epoch, epoch_end or 0, learning_rate,
                                              self.effective_batch)
        from model import build_model, model_kwargs
        from engine import ema, mixing
        kwargs = model_kwargs(settings)
        self.num_classes = kwargs["num_classes"]
        with self.strategy.scope():
            self.net = build_model(**kwargs)
            self.optimizer = self._make_optimizer(train)
            self.optimizer.build(self.net.trainable_variables)
            self.epoch_var = tf.Variable(-1, dtype=tf.int64, trainable=False, name="epoch")
            self.ema = ema.from_config(train, self.net, lambda: build_model(**kwargs))  # None when off
            self.checkpoint = tf.train.Checkpoint(model=self.net, optimizer=self.optimizer, epoch=self.epoch_var,
                                                  **({"ema": self.ema.net} if self.ema else {}))
        self.recipe = mixing.DeviceRecipe(mixing.MixConfig.from_config(train), kwargs["num_classes"],
                                          train.seed)
        self.inject = inject
        self.traces = {"train_step": 0, "forward_backward": 0}  # Python counters, incremented while tracing
        self.skips = SkipTracker(train.max_skipped_steps)
        self._train_step = train_step.build(self)
        # One replica: the batch goes straight to its device. Several: the global batch stays on the host and
        # each replica's rows are copied to it inside the step (engine/distribute.py split_batch).
        self.input_device = self.strategy.extended.worker_devices[0] if self.replicas == 1 else "/cpu:0"
        self.tensorboard = logs.TensorBoard(run_path, enabled=self.chief)
        self.batch_log = logs.BatchLog(run_path, enabled=self.chief)
        self.profiler = logs.ProfilerWindow(run_path, train.profile_steps, enabled=self.chief)

    # ------------------------------------------------------------------ setup

    def _seed(self, train):
        import keras
        keras.utils.set_random_seed(train.seed)
        if train.deterministic:
            self.tf.config.experimental.enable_op_determinism()

    def _make_optimizer(self, train):
        import keras
        lr = self.schedule(0)
        if train.optimizer == "sgd":
            opt = keras.optimizers.SGD(learning_rate=lr, momentum=train.sgd_momentum)
        else:
            opt = keras.optimizers.RMSprop(learning_rate=lr, rho=0.9, epsilon=1e-8)
        self.loss_scaling = train.mixed_precision == "mixed_float16"
        if self.loss_scaling:
            # Dynamic loss scaling; Keras 3 unscales the gradients inside apply_gradients.
            opt = keras.optimizers.LossScaleOptimizer(opt)
        return opt

    # ----------------------------------------------------------------- resume

    def restore(self, prefix, expected_epoch):
        try:
            status = self.checkpoint.read(prefix)
            status.assert_consumed()
        except (AssertionError, ValueError, self.tf.errors.OpError):
            # train.py compared the settings with the run's config.txt before this read (engine/run_identity.py);
            # this is left for what a config cannot show (a checkpoint replaced by another run's). TensorFlow's own
            # text, and its ~170 "Value in checkpoint could not be found" warnings at exit, would bury this line.
            logging.getLogger("tensorflow").setLevel(logging.ERROR)
            raise UserError(f"the checkpoint {prefix} does not fit the network and optimizer this config builds, "
                            f"although the settings its config.txt records do; it was replaced by another run's: "
                            f"restore that epoch folder, or start a new --run_folder.") from None
        restored = int(self.epoch_var.numpy())
        if restored != expected_epoch:
            raise UserError(f"the checkpoint {prefix} holds epoch {restored}, expected {expected_epoch}; "
                            f"the epoch folder was renamed or copied: restore it or use --epoch_start=auto.")
        log.info("resumed from %s: epoch %d done, global step %d", prefix, restored, self.global_step())

    def global_step(self):
        return int(self.net.train_step.numpy())

    # ------------------------------------------------------------------- loop

    def train(self, epoch_start, epoch_end):
        train = dataclasses.asdict(self.settings.train)
        log.info("training epochs %d..%d: %d steps per epoch, global batch %d on %d replica(s), effective batch %d "
                 "(%d accumulated), schedule %s, %s",
                 epoch_start, epoch_end - 1, self.steps_per_epoch, self.batch_size, self.replicas,
                 self.effective_batch, self.accumulation,
                 self.schedule.describe(), recipe_line.features(train, self.precision_reason))
        for line in recipe_line.warnings(train, dataclasses.asdict(self.settings.schedule), self.learning_rate,
                                         gpu=bool(self.tf.config.list_physical_devices("GPU"))):
            log.warning(line)
        try:
            for epoch in range(epoch_start, epoch_end):
                self.check_space(epoch)
                summary = self.train_epoch(epoch)
                # The row first: a kill between the two leaves a row that the retrained epoch
                # replaces, never a saved epoch without its row.
                self.finish_epoch(epoch, summary)
                self.save(epoch)
        finally:
            self.profiler.close()
            self.batch_log.close()
            self.tensorboard.close()

    def train_epoch(self, epoch):
        tf, reader = self.tf, self.reader
        num_batches = reader.batches_per_epoch
        log_every = self.settings.train.log_every
        step = self.global_step()
        window = _Window()
        totals = {"loss": 0.0, "hits": 0.0, "images": 0, "wait": 0.0, "loss_scale": None, "all_images": 0}
        self.skips.start_epoch()
        traces = self.traces["train_step"]
        bar = logs.progress_bar(epoch, num_batches, enabled=self.chief)
        prefetch = batch_prefetcher(reader, epoch, num_batches, place=self.to_device)
        started = time.perf_counter()
        lr = self.schedule(step)
        k = self.accumulation
        self._train_step.reset()  # a group interrupted by a kill or an error is redone from its first batch
        try:
            for _ in range(num_batches):
                (b, batch), waited = prefetch.get()
                # Groups of k batches start at each epoch's first batch; the last may be shorter.
                last = b % k == k - 1 or b == num_batches - 1
                if b % k == 0:
                    lr = self.schedule(step)  # one rate per update: the one at its first batch
                self.profiler.at_step(step)
                outputs = self._train_step(batch.images, batch.labels, batch.lighting, tf.constant(lr, tf.float32),
                                           *self.recipe.step_args(epoch, b, batch.images.shape),
                                           last=last, count=b % k + 1)
                step += 1
                if self.traces["train_step"] != traces:  # a new crop size (or the first step): one more compile
                    traces = self.traces["train_step"]
                    log.info("compiled the training step for crop %d (%d compile(s) so far%s)",
                             batch.images.shape[1], traces,
                             f", XLA: {self.traces['forward_backward']}" if self.settings.train.jit_compile else "")
                self.batch_log.write(epoch, b)
                reader.report_progress(epoch, b + 1)
                window.add(outputs, self.batch_size, waited, last)  # global: reduced over all workers
                bar.update(1)
                if last and (window.steps >= log_every or b == num_batches - 1):
                    self._flush_window(window, totals, bar, step, lr)
        finally:
            prefetch.close()
            bar.close()
        wall = time.perf_counter() - started
        applied = totals["images"] or float("nan")  # every step skipped: no loss to show, not a loss of 0
        return {"epoch": epoch, "steps": step, "train_loss": totals["loss"] / applied,
                "train_top1": totals["hits"] / applied, "lr": lr,
                "images_per_sec": totals["all_images"] / wall, "wait_seconds": totals["wait"],
                "wait_fraction": totals["wait"] / wall, "wall_seconds": wall,
                "skipped_steps": self.skips.epoch_skipped,
                "loss_scale": totals["loss_scale"] if self.loss_scaling else ""}

    def to_device(self, batch):
        """The batch's arrays as tensors on the training device; runs on the prefetch thread.

        What overlaps with what: while step n runs on the training thread (on a GPU: while its kernels
        run on the compute stream), the prefetch thread reads batch n+1 from the buffer and copies it
        host -> device here (9.6 MB at batch 64, 38.5 MB at 256, 224 px), so the training thread only
        launches steps and never waits for a synchronous copy. On a CPU the copy is a host memcpy and
        changes nothing measurable (bench/bench_feed.py compares the loop with the model alone).
        """
        tf = self.tf
        with tf.device(self.input_device):
            return dataclasses.replace(batch, images=tf.identity(batch.images), labels=tf.identity(batch.labels),
                                       lighting=tf.identity(batch.lighting))

    def _flush_window(self, window, totals, bar, step, lr):
        # The only host-device sync in the loop: once per log_every steps.
        values = window.drain()
        self.skips.record(step - values["steps"], values["step_losses"], values["skipped"])
        self.skips.check(self.last_saved_epoch())
        totals["loss_scale"] = values["loss_scale"]
        totals["loss"] += values["loss_sum"]
        totals["hits"] += values["hits"]
        totals["images"] += values["images"]
        totals["all_images"] += values["all_images"]
        totals["wait"] += values["wait"]
        # Skipped steps' loss and hits are left out: one overflow must not turn the epoch's loss into inf.
        loss, top1 = values["loss_sum"] / max(values["images"], 1), values["hits"] / max(values["images"], 1)
        img_s = values["all_images"] / values["seconds"]
        wait = values["wait"] / values["seconds"]
        bar.set_postfix(loss=f"{loss:.3f}", top1=f"{top1:.3f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}",
                        wait=f"{100 * wait:.0f}%", refresh=False)
        rmax, dmax = self._renorm_limits()
        self.tensorboard.scalars(step, {"loss": loss, "l2_loss": values["l2"], "top1": top1, "learning_rate": lr,
                                        "rmax": rmax, "dmax": dmax, "images_per_sec": img_s,
                                        "buffer_wait_fraction": wait, "skipped_steps": int(sum(values["skipped"])),
                                        "loss_scale": values["loss_scale"] if self.loss_scaling else None},
                                "train/")

    def _renorm_limits(self):
        renorm = getattr(self.net, "renorm", None)
        if renorm is None or not hasattr(renorm, "clip_limits"):
            return None, None
        rmax, dmax = renorm.clip_limits(self.net.train_step)
        return float(rmax), float(dmax)

    def finish_epoch(self, epoch, summary):
        if not self.chief:
            return
        producer = self.reader.producer_record() if hasattr(self.reader, "producer_record") else None
        summary["bottleneck"], advice = logs.bottleneck(summary["wait_fraction"], producer)
        logs.write_epoch_row(self.run_path, summary)
        self.tensorboard.scalars(summary["steps"], {k: summary[k] for k in (
            "train_loss", "train_top1", "lr", "images_per_sec", "wait_seconds", "wait_fraction", "skipped_steps")},
            "epoch/")
        if self.loss_scaling:
            self.tensorboard.scalars(summary["steps"], {"loss_scale": summary["loss_scale"]}, "epoch/")
        if producer and "workers" in producer:
            self.tensorboard.scalars(summary["steps"], {"producer_workers": producer["workers"],
                                                        "producer_build_rate": producer.get("build_rate")}, "epoch/")
        self.tensorboard.flush()
        scale = f", loss scale {summary['loss_scale']:g}" if self.loss_scaling else ""
        log.info("epoch %d: loss %.4f, top-1 %.4f, lr %.3g, %.1f img/s, waited %.1f s (%.1f%%), %.1f s, "
                 "skipped %d step(s)%s, %s", epoch, summary["train_loss"], summary["train_top1"], summary["lr"],
                 summary["images_per_sec"], summary["wait_seconds"], 100 * summary["wait_fraction"],
                 summary["wall_seconds"], summary["skipped_steps"], scale, summary["bottleneck"])
        if advice:
            log.warning(advice)

    # ------------------------------------------------------------------- save

    def last_saved_epoch(self):
        done = run_folder.complete_epochs(self.run_path)
        return done[-1] if done else None

    def check_finite(self, epoch):
        """Refuse to save an epoch with a NaN or infinite variable (the skip rule should make this unreachable)."""
        from engine.numerics import non_finite_variables
        everything = list(self.net.variables) + list(self.optimizer.variables) + \
            (list(self.ema.net.variables) if self.ema else [])
        bad = non_finite_variables(everything)
        if bad:
            raise UserError(self.skips.sentence(
                f"epoch {epoch} was not saved: {len(bad)} of {len(everything)} variables are not finite "
                f"(first {bad[0]})", self.last_saved_epoch()))

    def save(self, epoch):
        from model import export_saved_model
        from utils.files import atomic_write_text
        self.check_finite(epoch)
        self.epoch_var.assign(epoch)

        def write_parts(folder):
            export_saved_model(self.net, run_folder.saved_model_dir(folder, "raw"), self.mu, self.sigma)
            if self.ema:
                export_saved_model(self.ema.net, run_folder.saved_model_dir(folder, "ema"), self.mu, self.sigma)
            self.checkpoint.write(run_folder.checkpoint_prefix(folder))
            atomic_write_text(run_folder.config_path(folder), self.config_text(epoch))

        try:
            path = run_folder.save_epoch(self.run_path, epoch, write_parts, overwrite=self.overwrite,
                                         chief=self.chief)
        except self.tf.errors.OpError as e:  # TF's writers report a full disk as their own error type
            if not any(text in str(e) for text in DISK_FULL_TEXTS):
                raise
            raise disk_full_error(run_folder.epoch_dir(self.run_path, epoch), self.epoch_bytes(),
                                  too_large="File too large" in str(e)) from None
        if path:
            log.info("saved %s", path)

    def epoch_bytes(self):
        """About the size of one epoch folder: the last saved one's, else weights twice, optimizer slots, graph."""
        done = run_folder.complete_epochs(self.run_path)
        if done:
            return run_folder.folder_bytes(run_folder.epoch_dir(self.run_path, done[-1]))
        def size(variables):  # Keras variables name their dtype as a string, tf.Variables as a DType
            return sum(int(np.prod(v.shape)) * self.tf.as_dtype(v.dtype).size for v in variables)
        ema_bytes = 2 * size(self.ema.net.variables) + GRAPH_BYTES if self.ema else 0
        return 2 * size(self.net.variables) + size(self.optimizer.variables) + GRAPH_BYTES + ema_bytes

    def check_space(self, epoch):
        """Stop before training an epoch that could not be saved: a full disk then costs nothing."""
        if not self.chief:
            return
        import shutil
        need, free = self.epoch_bytes(), shutil.disk_usage(self.run_path).free
        if free < need:
            raise UserError(f"The run folder {self.run_path} has {human_bytes(free)} free but saving epoch {epoch} needs "
                            f"about {human_bytes(need)}; free space there or set [train] path_for_saving to a larger "
                            f"disk, then rerun with --epoch_start=auto.")

    def config_text(self, epoch):
        header = [f"# epoch {epoch} of run {self.run_path}, global step {self.global_step()}",
                  f"# git {git_hash()}", f"# command: {self.command}",
                  f"# schedule: {self.schedule.describe()}",
                  f"# {self.replicas} replica(s), global batch {self.batch_size}, accumulation_steps "
                  f"{self.accumulation}, effective batch {self.effective_batch}",
                  f"# mixed_precision {self.settings.train.mixed_precision} ({self.precision_reason})",
                  run_identity.CLASSES_COMMENT.format(self.num_classes)]
        return "\n".join(header) + "\n" + self.settings.resolved_text()


class _Window:
    """Step outputs since the last flush, kept as tensors so the loop does not sync every step."""

    def __init__(self):
        self.outputs, self.sizes, self.wait = [], [], 0.0
        self.group_ends = []  # index of each accumulation group's last batch (every batch without accumulation)
        self.started = time.perf_counter()

    @property
    def steps(self):
        return len(self.outputs)

    def add(self, outputs, images, waited, group_end=True):
        self.outputs.append(outputs)
        self.sizes.append(images)
        self.wait += waited
        if group_end:
            self.group_ends.append(len(self.outputs) - 1)

    def drain(self):
        # Per step: mean cross-entropy over the global batch, L2 term, correct top-1 count, skipped (1/0), scale.
        values = np.array([[float(t) for t in o] for o in self.outputs], dtype=np.float64)
        sizes = np.array(self.sizes, dtype=np.float64)
        start = 0
        for end in self.group_ends:  # a skipped group skips every batch in it: their losses are left out too
            values[start:end + 1, 3] = values[end, 3]
            start = end + 1
        applied = values[:, 3] == 0
        result = {"loss_sum": float((values[applied, 0] * sizes[applied]).sum()), "l2": float(values[-1, 1]),
                  "hits": float(values[applied, 2].sum()), "images": int(sizes[applied].sum()), "wait": self.wait,
                  "seconds": max(time.perf_counter() - self.started, 1e-9), "steps": len(values),
                  "step_losses": values[:, 0] + values[:, 1], "skipped": values[:, 3].astype(bool),
                  "loss_scale": float(values[-1, 4]), "all_images": int(sizes.sum())}
        self.__init__()
        return result
