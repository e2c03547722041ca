"""Learning-rate schedules as pure functions of the global step.

`step` is the number of optimizer steps already taken (0 for the first update),
the same counter the model's `train_step` variable holds and the checkpoint
restores, so a resumed run continues the schedule exactly where it stopped.

Every function takes an array module `xp` (numpy by default). The trainer and
the tests evaluate them with numpy; `KerasSchedule` evaluates the very same code
with `tf.experimental.numpy`, so it works inside a tf.function or as a Keras
`LearningRateSchedule` without a second implementation.

Schedules ([schedule] type):
- constant: base_lr.
- step: base_lr, multiplied by factors[i] after each boundary. Boundaries follow
  `tf.compat.v1.train.piecewise_constant`: value i holds while step <= boundary i,
  so a drop at boundary b takes effect at step b + 1 (TF official
  ResNet). Boundaries given in epochs are converted to the last step of the epoch
  before, so the new rate starts with the epoch's first step.
- cosine: half a cosine from base_lr to base_lr * final_factor over total steps.
- linear: base_lr until the warmup ends, then a straight line to base_lr * final_factor
  at total steps; with warmup_start_factor 1e-4 this is FFCV's 'cyclic' ramp
  (np.interp over [0, peak, end] of [1e-4 lr, lr, 0], ffcv-imagenet train_imagenet.py).
- onecycle: the Tiny ImageNet recipe's three linear phases (titu1994 keras-one-cycle):
  max_lr * scale -> max_lr over `mid` steps, back to max_lr * scale over the next
  `mid`, then to max_lr * scale / 100 over the rest, mid = int(total * (1 - end) / 2).
  The reference writes phase 1 as max_lr*(1 + p*(100*scale - 1))*scale, which
  reaches max_lr only for scale = 0.1 (the only value the Tiny ImageNet recipe used); this
  version interpolates to max_lr for any scale and equals it at 0.1.
- warmup (composes with any of the above): the rate is multiplied by
  start + (1 - start) * step / warmup_steps until warmup_steps.

Rates that follow the batch ([schedule] reference_batch R > 0): base_lr is the rate at a global batch of R
and every rate of the schedule, warm-up included, is multiplied by effective batch / R (Goyal et al. 2017's
linear rule), the effective batch being --batch_size x [train] accumulation_steps. `derivation` says how.
With accumulation the step counts buffer batches; the trainer reads the rate at each update's first batch.
"""
import math

import numpy as np

from utils.errors import UserError

TYPES = ("constant", "step", "cosine", "onecycle", "linear")


def _as_float(step, xp):
    return xp.asarray(step, dtype=xp.float64)


def constant(step, lr, xp=np):
    return _as_float(step, xp) * 0.0 + lr


def piecewise_constant(step, boundaries, values, xp=np):
    """values[i] while step <= boundaries[i] (and values[-1] after the last boundary)."""
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"expected {len(boundaries) + 1} values for {len(boundaries)} boundaries, "
                         f"received {len(values)}")
    s = _as_float(step, xp)
    lr = s * 0.0 + values[-1]
    for b, v in zip(reversed(boundaries), reversed(values[:-1])):
        lr = xp.where(s <= b, v, lr)
    return lr


def step_decay(step, base_lr, boundaries, factors, xp=np):
    """base_lr, multiplied by factors[i] once step passes boundaries[i]."""
    values = [base_lr]
    for f in factors:
        values.append(values[-1] * f)
    return piecewise_constant(step, boundaries, values, xp)


def cosine(step, base_lr, total_steps, final_lr=0.0, xp=np):
    p = xp.clip(_as_float(step, xp) / max(total_steps, 1), 0.0, 1.0)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + xp.cos(math.pi * p))


def linear_decay(step, base_lr, total_steps, start_step=0, final_lr=0.0, xp=np):
    """base_lr until start_step, then linearly to final_lr at total_steps (and final_lr after)."""
    p = xp.clip((_as_float(step, xp) - start_step) / max(total_steps - start_step, 1), 0.0, 1.0)
    return base_lr + (final_lr - base_lr) * p


def one_cycle(step, max_lr, total_steps, end_percentage=0.2, scale_percentage=0.1, xp=np):
    s = _as_float(step, xp)
    mid = int(total_steps * (1.0 - end_percentage) / 2.0)
    low, floor = max_lr * scale_percentage, max_lr * scale_percentage / 100.0
    if mid <= 0:  # the whole run is the final phase
        rise = fall = s * 0.0 + low
    else:
        rise = low + (max_lr - low) * xp.clip(s / mid, 0.0, 1.0)
        fall = max_lr - (max_lr - low) * xp.clip((s - mid) / mid, 0.0, 1.0)
    tail = max(total_steps - 2 * mid, 1)
    end = low + (floor - low) * xp.clip((s - 2 * mid) / tail, 0.0, 1.0)
    # The reference compares with '>': step == mid is still phase 1.
    return xp.where(s <= mid, rise, xp.where(s <= 2 * mid, fall, end))


def linear_warmup(step, lr, warmup_steps, start_factor=0.0, xp=np):
    if warmup_steps <= 0:
        return lr
    p = xp.clip(_as_float(step, xp) / warmup_steps, 0.0, 1.0)
    return lr * (start_factor + (1.0 - start_factor) * p)


class Schedule:
    """A resolved schedule: call it with a global step (int or array) for the rate."""

    def __init__(self, kind, base_lr, boundaries=(), factors=(), total_steps=0, final_factor=0.0,
                 end_percentage=0.2, scale_percentage=0.1, warmup_steps=0, warmup_start_factor=0.0,
                 derivation=""):
        if kind not in TYPES:
            raise UserError(f"[schedule] type must be one of {', '.join(TYPES)}, received '{kind}'.")
        self.kind, self.base_lr = kind, float(base_lr)
        self.boundaries, self.factors = tuple(int(b) for b in boundaries), tuple(float(f) for f in factors)
        self.total_steps, self.final_factor = int(total_steps), float(final_factor)
        self.end_percentage, self.scale_percentage = float(end_percentage), float(scale_percentage)
        self.warmup_steps, self.warmup_start_factor = int(warmup_steps), float(warmup_start_factor)
        self.derivation = derivation  # how base_lr was obtained, when not as written

    def value(self, step, xp=np):
        if self.kind == "constant":
            lr = constant(step, self.base_lr, xp)
        elif self.kind == "step":
            lr = step_decay(step, self.base_lr, self.boundaries, self.factors, xp)
        elif self.kind == "cosine":
            lr = cosine(step, self.base_lr, self.total_steps, self.base_lr * self.final_factor, xp)
        elif self.kind == "linear":
            lr = linear_decay(step, self.base_lr, self.total_steps, self.warmup_steps,
                              self.base_lr * self.final_factor, xp)
        else:
            lr = one_cycle(step, self.base_lr, self.total_steps, self.end_percentage, self.scale_percentage, xp)
        return linear_warmup(step, lr, self.warmup_steps, self.warmup_start_factor, xp)

    def __call__(self, step):
        return float(self.value(step))

    def describe(self):
        text = f"{self.kind} base_lr={self.base_lr:g}"
        if self.kind == "step":
            text += f" boundaries(steps)={list(self.boundaries)} factors={list(self.factors)}"
        if self.kind in ("cosine", "onecycle", "linear"):
            text += f" total_steps={self.total_steps}"
        if self.warmup_steps:
            text += f" warmup_steps={self.warmup_steps}"
        if self.derivation:
            text += f" ({self.derivation})"
        return text

    def keras(self):
        """The same schedule as a keras.optimizers.schedules.LearningRateSchedule."""
        return _keras_schedule_class()(self)


def _keras_schedule_class():
    import keras
    import tensorflow as tf
    import tensorflow.experimental.numpy as tnp

    class KerasSchedule(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, schedule):
            self.schedule = schedule

        def __call__(self, step):
            return tf.cast(self.schedule.value(tf.cast(step, tf.float64), xp=tnp), tf.float32)

        def get_config(self):
            return dict(vars(self.schedule))

    return KerasSchedule


def effective_rate(base_lr, reference_batch, effective_batch):
    """(rate, derivation): base_lr scaled linearly from reference_batch to effective_batch; as written
    (derivation "") when reference_batch is 0 or the effective batch is not known."""
    if not reference_batch or not effective_batch:
        return float(base_lr), ""
    rate = base_lr * effective_batch / reference_batch
    return rate, (f"effective base_lr {rate:g} = base_lr {base_lr:g} x effective batch {effective_batch} / "
                  f"reference_batch {reference_batch}")


def effective_batch(batch_size, accumulation_steps):
    """The batch one optimizer update averages over: the global batch times the accumulated micro-batches."""
    return batch_size * accumulation_steps


def from_config(section, steps_per_epoch, epoch_end, learning_rate=None, effective_batch=None):
    """Build the Schedule from the [schedule] config section.

    `learning_rate` (train.py --learning_rate) keeps the seed's meaning: a constant
    rate for this invocation, ignoring [schedule] (and reference_batch). `epoch_end` is the schedule's
    length when [schedule] total_epochs is 0; keep it fixed across resumes then. `effective_batch`
    (global batch x accumulation steps) scales base_lr when [schedule] reference_batch is set.
    """
    if learning_rate is not None:
        if not learning_rate > 0:
            raise UserError(f"--learning_rate must be positive, received {learning_rate}.")
        return Schedule("constant", learning_rate)
    s = section
    to_steps = (lambda b: b) if s.boundaries_unit == "steps" else (lambda e: e * steps_per_epoch - 1)
    boundaries = [int(round(to_steps(b))) for b in s.boundaries]
    if any(b2 <= b1 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise UserError(f"[schedule] boundaries must increase, received {', '.join(str(b) for b in s.boundaries)}.")
    factors = tuple(s.factors)
    if len(factors) == 1:
        factors = factors * len(boundaries)
    if s.type == "step" and len(factors) != len(boundaries):
        raise UserError(f"[schedule] factors must hold one value or one per boundary ({len(boundaries)}), "
                        f"received {len(factors)}.")
    total_epochs = s.total_epochs or epoch_end
    total_steps = int(round(total_epochs * steps_per_epoch))
    if s.type in ("cosine", "onecycle", "linear") and total_steps <= 0:
        raise UserError(f"[schedule] type {s.type} needs a length: set total_epochs > 0 or --epoch_end > 0.")
    base_lr, derivation = effective_rate(s.base_lr, s.reference_batch, effective_batch)
    return Schedule(s.type, base_lr, boundaries, factors, total_steps, s.final_factor,
                    s.onecycle_end_percentage, s.onecycle_scale_percentage,
                    int(round(s.warmup_epochs * steps_per_epoch)), s.warmup_start_factor, derivation)


def from_settings(settings, steps_per_epoch, epoch_end, learning_rate=None):
    """The run's Schedule: from_config with the effective batch of the resolved settings (--batch_size x
    [train] accumulation_steps)."""
    batch = effective_batch(settings.batch_size, settings.train.accumulation_steps) if settings.batch_size else None
    return from_config(settings.schedule, steps_per_epoch, epoch_end, learning_rate, batch)
