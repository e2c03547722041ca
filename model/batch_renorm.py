"""Batch renormalization (Ioffe 2017, arXiv:1702.03275) as a tf.Module.

Training, per channel, with batch statistics mu_B and sigma_B = sqrt(var_B + eps):

    r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

then the moving mean mu and moving std sigma take one EMA step towards mu_B
and sigma_B. Inside `deferred_statistics()` (the trainer's step) that step is only
proposed, not assigned: the trainer commits it after deciding whether the whole step
is finite (engine/trainer.py), so an overflowing batch never reaches the statistics. Inference: y = gamma * (x - mu) / sigma + beta. Epsilon is added
once, inside sigma_B, so the moving std already contains it (the original code
added it a second time).

r_max ramps linearly from 1 to rmax_max and d_max from 0 to dmax_max between
the configured steps; with r_max = 1 and d_max = 0 this is batch normalization.
The step comes from a variable owned by the network, so the ramp position is
saved and restored with it.

Statistics are always computed in float32, whatever the compute dtype.
"""
import contextlib
import dataclasses
import threading

import tensorflow as tf

_CHANNEL_AXES = [0, 1, 2]  # NHWC: reduce over batch and space
# tf's fused batch norm silently raises smaller epsilons to this (cuDNN's floor).
MIN_EPSILON = 1.001e-5


@dataclasses.dataclass(frozen=True)
class RenormConfig:
    """Hyper-parameters of every batch renorm layer in a network.

    Defaults follow the paper's ImageNet run (relax after 5k steps, r_max 3 at
    40k, d_max 5 at 25k); config.txt overrides all of them.
    """
    momentum: float = 0.99
    epsilon: float = 1e-3
    rmax_max: float = 3.0
    dmax_max: float = 5.0
    start_relaxing_rmax: int = 5000
    reach_rmax_max: int = 40000
    start_relaxing_dmax: int = 5000
    reach_dmax_max: int = 25000
    sync_replicas: bool = False

    def __post_init__(self):
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], received {self.momentum}")
        if self.epsilon < MIN_EPSILON:
            raise ValueError(f"epsilon must be >= {MIN_EPSILON} (the fused kernel's minimum), received {self.epsilon}")
        if self.rmax_max < 1.0 or self.dmax_max < 0.0:
            raise ValueError(f"expected rmax_max >= 1 and dmax_max >= 0, received {self.rmax_max}, {self.dmax_max}")

    @classmethod
    def from_settings_section(cls, section):
        """From the [batch_renorm] settings section (moving_avgs_momentum -> momentum)."""
        values = dataclasses.asdict(section)
        values["momentum"] = values.pop("moving_avgs_momentum")
        return cls(**values)

    def clip_limits(self, step):
        """(r_max, d_max) as float32 scalars at training step `step` (an integer tensor)."""
        step = tf.cast(step, tf.float32)
        rmax = _ramp(step, self.start_relaxing_rmax, self.reach_rmax_max, 1.0, self.rmax_max)
        dmax = _ramp(step, self.start_relaxing_dmax, self.reach_dmax_max, 0.0, self.dmax_max)
        return rmax, dmax


def _ramp(step, start, reach, low, high):
    if reach <= start:
        fraction = tf.cast(step >= start, tf.float32)
    else:
        fraction = tf.clip_by_value((step - start) / float(reach - start), 0.0, 1.0)
    return low + (high - low) * fraction


_DEFERRED = threading.local()  # MirroredStrategy traces each replica's step on its own thread


@contextlib.contextmanager
def deferred_statistics():
    """Within this block (on this thread) training calls propose their moving-statistic updates instead of
    assigning them; yields {variable.ref(): proposed value}, to commit with `commit_statistics`."""
    previous = getattr(_DEFERRED, "updates", None)
    _DEFERRED.updates = {}
    try:
        yield _DEFERRED.updates
    finally:
        _DEFERRED.updates = previous


def assign_statistic(variable, value):
    """variable.assign(value), or inside `deferred_statistics()` only propose it."""
    updates = getattr(_DEFERRED, "updates", None)
    if updates is None:
        variable.assign(value)
    else:
        updates[variable.ref()] = value


def proposed_statistics(updates, statistics):
    """The proposed value of each variable in `statistics` (its current value if no layer proposed one)."""
    return [updates[v.ref()] if v.ref() in updates else tf.convert_to_tensor(v) for v in statistics]


class BatchRenorm(tf.Module):
    """Per-channel batch renormalization of NHWC activations.

    Variables: gamma, beta (trainable); moving_mean, moving_std (statistics,
    float32, one copy per replica under tf.distribute, read back as their mean).
    """

    def __init__(self, name, channels, config, gamma_init=1.0):
        super().__init__(name=name)
        self.config = config
        self.gamma = tf.Variable(tf.fill([channels], float(gamma_init)), name=f"{name}/gamma")
        self.beta = tf.Variable(tf.zeros([channels]), name=f"{name}/beta")
        statistic = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                         aggregation=tf.VariableAggregation.MEAN)
        self.moving_mean = tf.Variable(tf.zeros([channels]), name=f"{name}/moving_mean", **statistic)
        self.moving_std = tf.Variable(tf.ones([channels]), name=f"{name}/moving_std", **statistic)

    def __call__(self, x, training, rmax=1.0, dmax=0.0):
        """Normalise x; in training also update the moving statistics (call once per step)."""
        if not training:
            return self._inference(x)
        if self.config.sync_replicas:
            return self._train_synced(x, rmax, dmax)
        return self._train_local(x, rmax, dmax)

    def corrections(self, mean, std, rmax, dmax):
        """The clipped, gradient-stopped (r, d) for batch statistics (mean, std)."""
        rmax = tf.cast(rmax, tf.float32)
        dmax = tf.cast(dmax, tf.float32)
        r = tf.clip_by_value(std / self.moving_std, 1.0 / rmax, rmax)
        d = tf.clip_by_value((mean - self.moving_mean) / self.moving_std, -dmax, dmax)
        return tf.stop_gradient(r), tf.stop_gradient(d)

    def _inference(self, x):
        # The fused kernel divides by sqrt(variance + eps): passing sigma^2 - eps makes
        # that exactly sigma, and lets grappler fold the normalisation into the conv before.
        eps = self.config.epsilon
        variance = tf.maximum(tf.square(self.moving_std) - eps, 0.0)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, self.gamma, self.beta, mean=self.moving_mean,
                                                   variance=variance, epsilon=eps, is_training=False)
        return y

    def _train_local(self, x, rmax, dmax):
        # With r and d constant for the gradient, y = (gamma*r) * x_hat + (gamma*d + beta)
        # is a batch norm with a different scale and offset, so the fused kernel
        # (one op each way, ~40% faster on CPU than composing moments and an
        # affine) computes it exactly, gradient through mu_B and sigma_B included.
        mean, var = tf.nn.moments(tf.stop_gradient(tf.cast(x, tf.float32)), _CHANNEL_AXES)
        std = tf.sqrt(var + self.config.epsilon)
        r, d = self.corrections(mean, std, rmax, dmax)
        self._update_moving_statistics(mean, std)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, self.gamma * r, self.gamma * d + self.beta,
                                                   epsilon=self.config.epsilon, is_training=True)
        return y

    def _train_synced(self, x, rmax, dmax):
        mean, var = _replica_synced_moments(tf.cast(x, tf.float32))
        std = tf.sqrt(var + self.config.epsilon)
        r, d = self.corrections(mean, std, rmax, dmax)
        self._update_moving_statistics(mean, std)
        scale = self.gamma * r / std
        return _affine(x, scale, self.beta + self.gamma * d - mean * scale)

    def _update_moving_statistics(self, mean, std):
        m = self.config.momentum
        new_mean = self.moving_mean * m + tf.stop_gradient(mean) * (1.0 - m)
        new_std = self.moving_std * m + tf.stop_gradient(std) * (1.0 - m)
        assign_statistic(self.moving_mean, new_mean)
        assign_statistic(self.moving_std, new_std)


def _affine(x, scale, offset):
    return x * tf.cast(scale, x.dtype) + tf.cast(offset, x.dtype)


def _replica_synced_moments(x):
    """Mean and (biased) variance over the global batch: all-reduce of sum, sum of squares and count.

    Differentiable: the all-reduce's gradient is itself an all-reduce, so each
    replica's input gradient sees the global statistics, as with one device.
    """
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
    total = tf.reduce_sum(x, _CHANNEL_AXES)
    total_sq = tf.reduce_sum(tf.square(x), _CHANNEL_AXES)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        total, total_sq, count = context.all_reduce(tf.distribute.ReduceOp.SUM, [total, total_sq, count])
    mean = total / count
    var = tf.maximum(total_sq / count - tf.square(mean), 0.0)
    return mean, var
