"""Non-finite steps: the one finiteness decision, the loss scale, the skipped-step count and the stop sentence.

The compiled step (engine/train_step.py) sums every replica's gradients itself, then decides `finite` from the
summed gradients, the summed loss and a summed flag for each replica's proposed batch-renorm statistics.
All-reduced values are the same on every replica and every worker, so all take the same branch: the
step is applied everywhere or nowhere, and no collective sits inside either branch (no worker can
wait on a collective another skipped). A skipped step changes no weight, optimizer slot, moving
statistic or EMA variable; with float16 it halves the loss scale.

`Injection` is a test hook (tests/test_numerics.py): non-finite values put into one replica's gradients
or forward input at chosen global steps, or steps skipped by construction. The trainer builds none of
its ops unless a test passes one.
"""
import numpy as np
import tensorflow as tf

from utils.errors import UserError


def all_finite(tensors):
    """One boolean scalar: every element of every tensor is finite."""
    return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(t)) for t in tensors]))


def grow_or_halve(optimizer, finite):
    """Keras' dynamic loss-scale rule on `optimizer` (a LossScaleOptimizer), given the step's decision:
    finite: count a good step, doubling the scale after dynamic_growth_steps (2000) of them; else halve it."""
    counter, scale = optimizer.step_counter, optimizer.dynamic_scale
    grow = tf.logical_and(finite, tf.equal(counter, optimizer.dynamic_growth_steps - 1))
    scale.assign(tf.where(grow, scale * 2.0, tf.where(finite, scale, scale * 0.5)))
    counter.assign(tf.where(tf.logical_and(finite, tf.logical_not(grow)), counter + 1, tf.zeros_like(counter)))


def non_finite_variables(variables):
    """Names of the variables holding a NaN or an infinity (read on the host)."""
    return [v.name for v in variables if not np.all(np.isfinite(np.asarray(v.numpy(), dtype=np.float64)))]


class SkipTracker:
    """Host-side bookkeeping of skipped steps: per epoch, in a row, and the last finite loss."""

    def __init__(self, limit):
        self.limit = limit
        self.in_a_row, self.since, self.last_finite_loss, self.epoch_skipped = 0, None, None, 0
        self.skipped_steps = []  # global step of every skipped step, in order (tests compare workers with it)
        self.tripped = None

    def start_epoch(self):
        self.epoch_skipped = 0

    def record(self, first_step, losses, skipped):
        """Steps first_step, first_step + 1, ... with their losses and skipped flags."""
        for i, (loss, skip) in enumerate(zip(losses, skipped)):
            if skip:
                self.since = first_step + i if self.in_a_row == 0 else self.since
                self.in_a_row += 1
                self.epoch_skipped += 1
                self.skipped_steps.append(first_step + i)
                if self.in_a_row >= self.limit and self.tripped is None:
                    self.tripped = (self.in_a_row, self.since, self.last_finite_loss)
            else:
                self.in_a_row, self.last_finite_loss = 0, float(loss)

    def check(self, resume_epoch):
        """Raise the stop sentence once `limit` steps in a row were skipped."""
        if self.tripped:
            count, since, last = self.tripped
            raise UserError(self.sentence(f"{count} steps in a row were skipped since global step {since} "
                                          f"because their loss or gradients were not finite "
                                          f"([train] max_skipped_steps = {self.limit})", resume_epoch, last))

    def sentence(self, what, resume_epoch, last_finite_loss=None):
        loss = self.last_finite_loss if last_finite_loss is None else last_finite_loss
        last = "no finite loss yet" if loss is None else f"the last finite loss was {loss:.4g}"
        resume = (f"resume from epoch folder {resume_epoch} (--epoch_start={resume_epoch + 1})"
                  if resume_epoch is not None else "start again")
        return (f"{what}; {last}: lower the learning rate, set [train] mixed_precision = none, or {resume}.")


class Injection:
    """Test hook: non-finite values at chosen global steps (tests/test_numerics.py).

    gradients: {global step: replica} adds +inf to that replica's first gradient;
    forward: {global step: replica} adds +inf to that replica's network input (every activation after it,
    the batch statistics and the loss go non-finite); skips: global steps whose update is dropped with
    nothing non-finite in them (the twin a run with injections must equal).
    steps: None bakes the tables into the trace as constants; a number of global steps keeps them in
    variables instead (create the Injection before the trainer), so `plan()` changes them between runs
    of one compiled step: the test's run, its twin and its resume then share one trace (each trace of the
    2-replica step costs seconds).
    """

    def __init__(self, gradients=None, forward=None, skips=(), steps=None):
        self.steps = steps
        self.variables = None
        if steps is not None:
            empty = np.full(steps, -1, np.int64)
            self.variables = {name: tf.Variable(empty, trainable=False, name=f"inject_{name}")
                              for name in ("gradients", "forward", "skips")}
        self.plan(gradients, forward, skips)

    def plan(self, gradients=None, forward=None, skips=()):
        """Set the tables (once, or between runs when built with `steps`)."""
        self.gradient_at, self.forward_at = dict(gradients or {}), dict(forward or {})
        self.skips = sorted(skips)
        if self.variables is not None:
            for name, table in (("gradients", self.gradient_at), ("forward", self.forward_at),
                                ("skips", {s: 0 for s in self.skips})):
                dense = np.full(self.steps, -1, np.int64)
                for step, replica in table.items():
                    dense[step] = replica
                self.variables[name].assign(dense)

    def _lookup(self, name, table, step):
        """(replica hit at `step` or -1) as an int64 scalar tensor; None when a constant table is empty."""
        if self.variables is not None:
            inside = tf.logical_and(step >= 0, step < self.steps)
            value = tf.gather(tf.convert_to_tensor(self.variables[name]), tf.clip_by_value(step, 0, self.steps - 1))
            return tf.where(inside, value, tf.constant(-1, tf.int64))
        if not table:
            return None
        steps = tf.constant(sorted(table), tf.int64)
        replicas = tf.constant([table[s] for s in sorted(table)], tf.int64)
        return tf.reduce_max(tf.where(tf.equal(steps, step), replicas, tf.constant(-1, tf.int64)))

    def _hit(self, name, table, step):
        value = self._lookup(name, table, step)
        if value is None:
            return tf.constant(False)
        replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64)
        return tf.equal(value, replica)

    def forward(self, x, step):
        return x + tf.cast(tf.where(self._hit("forward", self.forward_at, step), np.inf, 0.0), x.dtype)

    def gradients(self, grads, step):
        poison = tf.cast(tf.where(self._hit("gradients", self.gradient_at, step), np.inf, 0.0), grads[0].dtype)
        return [grads[0] + poison] + list(grads[1:])

    def decide(self, finite, step):
        value = self._lookup("skips", {s: 0 for s in self.skips}, step)
        if value is None:
            return finite
        return tf.logical_and(finite, tf.less(value, 0))
