"""The Tiny ImageNet recipe's fully convolutional "concatenating ResNet" for Tiny ImageNet, from tf.Variable and tf.nn ops.

Structure (exactly the seed's `model.summary()`; every conv 3x3 'same', no bias, He-normal):

    stem      3 x [conv 128 -> norm -> ReLU]                                   64x64x128
    stage 1   conv 128, then 3 x [norm -> ReLU -> conv 128]; concat with the
              stage input (the stem output) -> 256 channels; 2x2 max-pool      32x32x256
    stage 2   4 x [norm -> ReLU -> conv 256]; concat with the input -> 512;
              2x2 max-pool                                                     16x16x512
    stage 3   4 x [norm -> ReLU -> conv 512]; concat with the input -> 1024     16x16x1024
    head      norm -> ReLU -> conv 1x1 to the classes -> softmax at every
              position -> global average                                       num_classes

The first conv of stage 1 reads the stem's ReLU output directly (no extra
pre-activation), as in the seed. With 200 classes: 12,899,200 trainable
parameters, 12,908,928 with the normalisation statistics (how Keras counted).

There is no dense layer, so any input of at least 4x4 pixels works; the seed
trained on 32, 48 and 64 pixel crops and evaluated on the full 64x64 images.

The seed put the softmax inside the 1x1 conv, so it averages PROBABILITIES over
positions. To keep this project's contract (the network returns logits) the
network returns log(mean over positions of softmax(z)): its softmax is exactly
the seed's averaged probabilities, and cross-entropy from it is the seed's loss.

Normalisation: 'batch_norm' (the seed: Keras BatchNormalization, momentum 0.99,
epsilon 1e-3) or 'batch_renorm' (model.batch_renorm, ramped by train_step).
"""
import collections
import math

import tensorflow as tf

from model.batch_renorm import BatchRenorm, assign_statistic
from model.layers import Conv2D, Initializer

Stage = collections.namedtuple("Stage", "width convs pool")

STEM_WIDTHS = (128, 128, 128)
STAGES = (Stage(128, 4, True), Stage(256, 4, True), Stage(512, 4, False))
NORMALIZATIONS = ("batch_norm", "batch_renorm")
MIN_INPUT_SIDE = 4  # two 2x2 pools must leave at least one position

_CHANNEL_AXES = [0, 1, 2]


class BatchNorm(tf.Module):
    """Plain batch normalization (Keras semantics) of NHWC activations.

    Training: y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta with the biased
    batch variance; the moving mean and variance take one EMA step towards mean_B
    and the unbiased var_B (what TF's fused kernel returns, and what Keras 2's fused
    BatchNormalization, the seed's, stored). Inference uses the moving statistics.
    """

    def __init__(self, name, channels, momentum=0.99, epsilon=1e-3):
        super().__init__(name=name)
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        self.gamma = tf.Variable(tf.ones([channels]), name=f"{name}/gamma")
        self.beta = tf.Variable(tf.zeros([channels]), name=f"{name}/beta")
        statistic = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                         aggregation=tf.VariableAggregation.MEAN)
        self.moving_mean = tf.Variable(tf.zeros([channels]), name=f"{name}/moving_mean", **statistic)
        self.moving_variance = tf.Variable(tf.ones([channels]), name=f"{name}/moving_variance", **statistic)

    def __call__(self, x, training):
        if not training:
            scale = self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon)
            offset = self.beta - self.moving_mean * scale
            return x * tf.cast(scale, x.dtype) + tf.cast(offset, x.dtype)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, self.gamma, self.beta, epsilon=self.epsilon,
                                                             is_training=True)
        m = self.momentum
        assign_statistic(self.moving_mean, self.moving_mean * m + tf.stop_gradient(mean) * (1.0 - m))
        assign_statistic(self.moving_variance, self.moving_variance * m + tf.stop_gradient(variance) * (1.0 - m))
        return y

    def statistics(self):
        return [self.moving_mean, self.moving_variance]


def _max_pool_2x2(x):
    # Keras MaxPooling2D defaults: 2x2, stride 2, 'valid' (an odd last row or column is dropped).
    return tf.nn.max_pool2d(x, 2, 2, "VALID")


def mean_probability_logits(z):
    """log(mean over positions of softmax(z)) for z [B, H, W, K], in float32, without overflow.

    log mean_s softmax(z_s)_k = logsumexp_s(z_sk - logsumexp_k'(z_sk')) - log(S).
    """
    z = tf.cast(z, tf.float32)
    log_p = tf.nn.log_softmax(z, axis=-1)
    positions = tf.cast(tf.shape(z)[1] * tf.shape(z)[2], tf.float32)
    return tf.reduce_logsumexp(log_p, axis=[1, 2]) - tf.math.log(positions)


class ConcatResNet(tf.Module):
    """Call as net(images, training=bool) on NHWC float images of any size >= 4x4; returns float32 logits.

    `train_step` (int64) counts optimizer steps (the trainer increments it); with
    batch renorm it drives the r_max/d_max ramp, with batch norm it is only a counter.
    """

    def __init__(self, *, num_classes, width_multiplier=1.0, normalization="batch_norm", renorm=None,
                 bn_momentum=0.99, bn_epsilon=1e-3, l2_penalty=0.0, compute_dtype="float32", seed=0):
        super().__init__(name="concat_resnet")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, received {normalization!r}")
        if normalization == "batch_renorm" and renorm is None:
            raise ValueError("normalization 'batch_renorm' needs a RenormConfig, received renorm=None")
        init = Initializer(seed)
        self.normalization = normalization
        # The trainer reads renorm.clip_limits for its TensorBoard r_max/d_max; batch norm has none.
        self.renorm = renorm if normalization == "batch_renorm" else None
        self.l2_penalty = float(l2_penalty)
        self.compute_dtype = tf.as_dtype(compute_dtype)
        self.train_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="train_step",
                                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

        def norm(name, channels):
            if self.renorm is not None:
                return BatchRenorm(name, channels, self.renorm)
            return BatchNorm(name, channels, bn_momentum, bn_epsilon)

        width = lambda c: max(1, int(round(c * width_multiplier)))  # noqa: E731
        self.stem = []
        channels = 3
        for i, stem_width in enumerate(STEM_WIDTHS, start=1):
            w = width(stem_width)
            self.stem.append((Conv2D(f"stem_conv{i}", channels, w, 3, 1, init), norm(f"stem_norm{i}", w)))
            channels = w
        # Each stage: a list of (norm or None, conv); stage 1's first conv has no norm before it.
        self.stages, self.pools = [], tuple(stage.pool for stage in STAGES)
        for s, stage in enumerate(STAGES, start=1):
            w = width(stage.width)
            layers, c = [], channels
            for j in range(1, stage.convs + 1):
                pre = None if (s == 1 and j == 1) else norm(f"stage{s}_norm{j}", c)
                layers.append((pre, Conv2D(f"stage{s}_conv{j}", c, w, 3, 1, init)))
                c = w
            self.stages.append(layers)
            channels = w + channels  # concatenation with the stage input
        self.head_norm = norm("head_norm", channels)
        self.head_conv = Conv2D("head_conv", channels, num_classes, 1, 1, init)
        self.num_classes = num_classes

    def __call__(self, images, training=False):
        if not isinstance(training, bool):
            raise TypeError(f"training must be a Python bool, received {type(training).__name__}")
        side = min(d for d in (images.shape[1], images.shape[2], MIN_INPUT_SIDE) if d is not None)
        if side < MIN_INPUT_SIDE:
            raise ValueError(f"expected images of at least {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE} pixels (two 2x2 pools), "
                             f"received shape {tuple(images.shape)}")
        limits = ()
        if self.renorm is not None:
            limits = self.renorm.clip_limits(self.train_step) if training else (1.0, 0.0)
        x = tf.cast(images, self.compute_dtype)
        for conv, bn in self.stem:
            x = tf.nn.relu(bn(conv(x), training, *limits))
        for layers, pool in zip(self.stages, self.pools):
            stage_input = x
            for pre, conv in layers:
                if pre is not None:
                    x = tf.nn.relu(pre(x, training, *limits))
                x = conv(x)
            x = tf.concat([x, stage_input], axis=-1)
            if pool:
                x = _max_pool_2x2(x)
        x = tf.nn.relu(self.head_norm(x, training, *limits))
        return mean_probability_logits(self.head_conv(x))

    def norms(self):
        return [m for m in self.submodules if isinstance(m, (BatchNorm, BatchRenorm))]

    def kernels(self):
        """Conv kernels: the weights that weight decay applies to (the seed's l2 kernel_regularizer)."""
        return [m.kernel for m in self.submodules if isinstance(m, Conv2D)]

    def regularization_loss(self):
        """l2_penalty / 2 * sum of squared kernel weights (float32 scalar); Keras l2(c) is l2_penalty = 2c."""
        if self.l2_penalty == 0.0:
            return tf.constant(0.0)
        return self.l2_penalty * tf.add_n([tf.nn.l2_loss(k) for k in self.kernels()])

    def statistics(self):
        """The normalisation layers' moving statistics (non-trainable, excluding train_step)."""
        out = []
        for m in self.norms():
            out.extend(m.statistics() if isinstance(m, BatchNorm) else (m.moving_mean, m.moving_std))
        return out


def count_parameters(net):
    """(trainable, trainable + moving statistics): the two figures Keras' model.summary() printed."""
    trainable = sum(math.prod(v.shape) for v in net.trainable_variables)
    return trainable, trainable + sum(math.prod(v.shape) for v in net.statistics())
