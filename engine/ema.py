"""An exponential moving average (EMA) of the network's weights, kept on the device.

[train] ema_decay = d > 0 keeps a second copy of the network whose trainable weights and batch-renorm
moving statistics follow, after every optimizer step,

    ema = decay * ema + (1 - decay) * weight,   decay = d, or min(d, (1 + t) / (10 + t)) with ema_warmup

(t = the global step before the update, so the first updates average quickly; the rule of
tf.train.ExponentialMovingAverage(num_updates=t)). It starts as a copy of the initial weights,
as timm's ModelEmaV2 and torchvision's ExponentialMovingAverage do. The copy is a whole network
(`WeightEMA.net`), so it goes into the checkpoint (key 'ema': a resumed run continues the same
average) and exports with the same SavedModel signatures (saved_model_ema/). Its own train_step
stays 0: inference does not read it.

Under tf.distribute the trainer updates the two halves where they live: the weights (mirrored,
identical on every replica) in cross-replica context after the optimizer step, the moving
statistics (one copy per replica) in each replica's context from that replica's own committed
statistics, so a step costs no cross-replica read per statistic. Both only on a finite step.
"""
import tensorflow as tf

from utils.errors import UserError


class WeightEMA:
    def __init__(self, net, shadow, decay, warmup=False):
        self.decay, self.warmup = float(decay), bool(warmup)
        self.net = shadow
        source = list(net.trainable_variables) + list(net.statistics())
        target = list(shadow.trainable_variables) + list(shadow.statistics())
        if [tuple(v.shape) for v in source] != [tuple(v.shape) for v in target]:
            raise UserError("the EMA copy of the network does not match the network; this is a bug, please report it.")
        self.pairs = list(zip(source, target))
        for v, s in self.pairs:
            s.assign(v)
        trainable = len(net.trainable_variables)
        self.weight_pairs, self.statistic_pairs = self.pairs[:trainable], self.pairs[trainable:]

    def decay_at(self, step):
        """The decay of the update made after global step `step` (float32 scalar tensor)."""
        decay = tf.constant(self.decay, tf.float32)
        if not self.warmup:
            return decay
        t = tf.cast(step, tf.float32)
        return tf.minimum(decay, (1.0 + t) / (10.0 + t))

    def update(self, step):
        """One EMA step of weights and statistics (one device); call after the optimizer update, with the
        global step before it is incremented."""
        self.update_weights(step)
        self.update_statistics(step, [tf.convert_to_tensor(v) for v, _ in self.statistic_pairs])

    def update_weights(self, step):
        """The EMA step of the trainable weights (cross-replica context under a strategy)."""
        decay = self.decay_at(step)
        for v, s in self.weight_pairs:
            s.assign(s * decay + tf.convert_to_tensor(v) * (1.0 - decay))

    def update_statistics(self, step, values, finite=True):
        """The EMA step of the moving statistics towards `values` (this replica's, in replica context);
        with `finite` False (a boolean tensor: the trainer's decision) nothing changes."""
        decay = self.decay_at(step)
        for (_, s), value in zip(self.statistic_pairs, values):
            s.assign(tf.where(finite, s * decay + value * (1.0 - decay), s))


def from_config(train_section, net, build):
    """A WeightEMA when [train] ema_decay > 0 (`build()` makes a network like `net`), else None."""
    if train_section.ema_decay <= 0:
        return None
    return WeightEMA(net, build(), train_section.ema_decay, train_section.ema_warmup)
