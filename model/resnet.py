"""ResNet-50 from tf.Variable and tf.nn ops, with batch renormalization.

Two variants share the stage structure (STAGES) and the bottleneck block:

- 'standard': He et al. 2016. ReLU; conv without bias -> BRN; a projection
  shortcut (1x1 conv + BRN) on the first block of each stage; stride 2 on the
  3x3 conv (v1.5, stride_on='3x3') or on the first 1x1 (v1, stride_on='1x1').
  25,557,032 trainable parameters with 1000 classes.
- 'original': the reproduced repository's network. ELU; every conv has a bias;
  parameter-free shortcuts (zero-pad the channels; in stages 3-5 first a 2x2/2
  average pool); stride on the first 1x1. About 22.8M trainable parameters.

Names follow Keras' ResNet: 'conv1_conv', 'conv3_block2_1_conv', 'conv3_block2_1_brn',
'conv3_block1_0_conv' (projection), 'predictions'.
"""
import collections

import tensorflow as tf

from model.batch_renorm import BatchRenorm
from model.layers import Conv2D, Dense, Initializer

Stage = collections.namedtuple("Stage", "width blocks")

EXPANSION = 4
STEM_WIDTH = 64
STAGES = {
    "resnet50": (Stage(64, 3), Stage(128, 4), Stage(256, 6), Stage(512, 3)),
}
VARIANTS = ("standard", "original")
STRIDE_PLACES = ("3x3", "1x1")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def scaled(channels, width_multiplier):
    return max(1, int(round(channels * width_multiplier)))


def _zero_pad_channels(x, out_channels):
    extra = out_channels - x.shape[-1]
    return tf.pad(x, [[0, 0], [0, 0], [0, 0], [0, extra]]) if extra else x


def _max_pool_3x3_s2(x):
    # Symmetric padding by one (as Keras and torchvision) with the lowest
    # value, so padding never wins the max; XLA rejects explicit pool padding.
    x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=x.dtype.min)
    return tf.nn.max_pool2d(x, 3, 2, "VALID")


class Bottleneck(tf.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) with BRN after each conv, plus a shortcut."""

    def __init__(self, prefix, in_channels, width, stride, *, variant, stride_on, renorm, init,
                 zero_init_last_gamma):
        super().__init__(name=prefix)
        out_channels = width * EXPANSION
        use_bias = variant == "original"
        stride1, stride2 = (stride, 1) if stride_on == "1x1" else (1, stride)
        self.conv1 = Conv2D(f"{prefix}_1_conv", in_channels, width, 1, stride1, init, use_bias)
        self.brn1 = BatchRenorm(f"{prefix}_1_brn", width, renorm)
        self.conv2 = Conv2D(f"{prefix}_2_conv", width, width, 3, stride2, init, use_bias)
        self.brn2 = BatchRenorm(f"{prefix}_2_brn", width, renorm)
        self.conv3 = Conv2D(f"{prefix}_3_conv", width, out_channels, 1, 1, init, use_bias)
        self.brn3 = BatchRenorm(f"{prefix}_3_brn", out_channels, renorm,
                                gamma_init=0.0 if zero_init_last_gamma else 1.0)
        self.stride = stride
        self.out_channels = out_channels
        self.activation = tf.nn.elu if variant == "original" else tf.nn.relu
        needs_shortcut = stride != 1 or in_channels != out_channels
        self.projection = needs_shortcut and variant == "standard"
        self.parameter_free = needs_shortcut and variant == "original"
        if self.projection:
            self.conv0 = Conv2D(f"{prefix}_0_conv", in_channels, out_channels, 1, stride, init, False)
            self.brn0 = BatchRenorm(f"{prefix}_0_brn", out_channels, renorm)

    def __call__(self, x, training, rmax, dmax):
        shortcut = self._shortcut(x, training, rmax, dmax)
        y = self.activation(self.brn1(self.conv1(x), training, rmax, dmax))
        y = self.activation(self.brn2(self.conv2(y), training, rmax, dmax))
        y = self.brn3(self.conv3(y), training, rmax, dmax)
        return self.activation(y + shortcut)

    def _shortcut(self, x, training, rmax, dmax):
        if self.projection:
            return self.brn0(self.conv0(x), training, rmax, dmax)
        if self.parameter_free:
            if self.stride != 1:
                # 'SAME' keeps ceil(H/2) rows like the strided main path, and
                # leaves padding out of the average at odd sizes.
                x = tf.nn.avg_pool2d(x, 2, self.stride, "SAME")
            return _zero_pad_channels(x, self.out_channels)
        return x


class ResNet(tf.Module):
    """Call as net(images, training=bool) on NHWC float images; returns float32 logits.

    `train_step` (int64) is the number of optimizer steps taken; the trainer
    increments it and it drives the batch renorm r_max/d_max ramp.
    """

    def __init__(self, *, arch, num_classes, width_multiplier, variant, stride_on, zero_init_last_gamma,
                 renorm, l2_penalty, compute_dtype, seed, stage_blocks=()):
        super().__init__(name=arch)
        init = Initializer(seed)
        self.renorm = renorm
        self.l2_penalty = float(l2_penalty)
        self.compute_dtype = tf.as_dtype(compute_dtype)
        self.activation = tf.nn.elu if variant == "original" else tf.nn.relu
        self.train_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="train_step",
                                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        stem_width = scaled(STEM_WIDTH, width_multiplier)
        self.stem_conv = Conv2D("conv1_conv", 3, stem_width, 7, 2, init, use_bias=variant == "original")
        self.stem_brn = BatchRenorm("conv1_brn", stem_width, renorm)
        self.blocks = {}
        self.block_order = []
        channels = stem_width
        blocks = stage_blocks or tuple(stage.blocks for stage in STAGES[arch])
        for stage_index, (stage, stage_depth) in enumerate(zip(STAGES[arch], blocks)):
            width = scaled(stage.width, width_multiplier)
            for block_index in range(stage_depth):
                prefix = f"conv{stage_index + 2}_block{block_index + 1}"
                stride = 2 if block_index == 0 and stage_index > 0 else 1
                self.blocks[prefix] = Bottleneck(prefix, channels, width, stride, variant=variant,
                                                 stride_on=stride_on, renorm=renorm, init=init,
                                                 zero_init_last_gamma=zero_init_last_gamma)
                self.block_order.append(prefix)
                channels = width * EXPANSION
        self.block_order = tuple(self.block_order)
        self.head = Dense("predictions", channels, num_classes, init)

    def __call__(self, images, training=False):
        if not isinstance(training, bool):
            raise TypeError(f"training must be a Python bool, received {type(training).__name__}")
        rmax, dmax = self.renorm.clip_limits(self.train_step) if training else (1.0, 0.0)
        x = tf.cast(images, self.compute_dtype)
        x = self.activation(self.stem_brn(self.stem_conv(x), training, rmax, dmax))
        x = _max_pool_3x3_s2(x)
        for name in self.block_order:
            x = self.blocks[name](x, training, rmax, dmax)
        features = tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2])
        return self.head(features)

    def kernels(self):
        """Conv and dense kernels: the weights that weight decay applies to (not biases, gamma, beta)."""
        return [m.kernel for m in self.submodules if isinstance(m, (Conv2D, Dense))]

    def regularization_loss(self):
        """l2_penalty / 2 * sum of squared kernel weights (float32 scalar)."""
        if self.l2_penalty == 0.0:
            return tf.constant(0.0)
        return self.l2_penalty * tf.add_n([tf.nn.l2_loss(k) for k in self.kernels()])

    def statistics(self):
        """The batch renorm moving means and stds (non-trainable, excluding train_step)."""
        return [v for m in self.submodules if isinstance(m, BatchRenorm) for v in (m.moving_mean, m.moving_std)]
