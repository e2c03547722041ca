"""Convolution and dense layers written from tf.Variable and tf.nn ops.

Variables are float32 and carry readable names ('conv2_block1_1_conv/kernel');
each call casts them to the dtype of its input, which is how mixed precision
works here: the network casts the images to its compute dtype once and every
layer follows.
"""
import math

import tensorflow as tf

# A normal truncated at two standard deviations has a smaller spread than the
# untruncated one; dividing by this restores the intended std (as Keras does).
_TRUNCATED_NORMAL_STD = 0.87962566103423978


class Initializer:
    """Seeded initial values: the i-th variable built from one Initializer gets stateless seed (seed, i),
    so the same seed and architecture always give the same weights."""

    def __init__(self, seed=0):
        self.seed = int(seed)
        self.count = 0

    def _next_seed(self):
        self.count += 1
        return tf.constant([self.seed, self.count], tf.int64)

    def he_normal(self, shape):
        fan_in = math.prod(shape[:-1])
        std = math.sqrt(2.0 / fan_in) / _TRUNCATED_NORMAL_STD
        return tf.random.stateless_truncated_normal(shape, self._next_seed(), stddev=std)

    def glorot_uniform(self, shape):
        fan_in, fan_out = shape
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return tf.random.stateless_uniform(shape, self._next_seed(), -limit, limit)


class Conv2D(tf.Module):
    """k x k convolution, NHWC, He-normal kernel, optional bias.

    Padding is symmetric (k // 2 on each side, as in Keras' and torchvision's
    ResNets). For stride 1 that is exactly 'SAME'. Strided convs pad first and
    convolve 'VALID': the conv op's own explicit padding takes a slower CPU
    path (~30% for the 3x3/2 convs), and 'SAME' would pad asymmetrically.
    """

    def __init__(self, name, in_channels, out_channels, kernel_size, stride, init, use_bias=False):
        super().__init__(name=name)
        self.stride = stride
        pad = kernel_size // 2
        self.padding = "SAME" if stride == 1 and pad else "VALID"
        self.pad = [[0, 0], [pad, pad], [pad, pad], [0, 0]] if stride > 1 and pad else None
        self.kernel = tf.Variable(init.he_normal([kernel_size, kernel_size, in_channels, out_channels]),
                                  name=f"{name}/kernel")
        self.bias = tf.Variable(tf.zeros([out_channels]), name=f"{name}/bias") if use_bias else None

    def __call__(self, x):
        if self.pad:
            x = tf.pad(x, self.pad)
        y = tf.nn.conv2d(x, tf.cast(self.kernel, x.dtype), self.stride, self.padding)
        if self.bias is not None:
            y = tf.nn.bias_add(y, tf.cast(self.bias, x.dtype))
        return y


class Dense(tf.Module):
    """Fully connected layer with a Glorot-uniform kernel and a zero bias."""

    def __init__(self, name, in_features, out_features, init):
        super().__init__(name=name)
        self.kernel = tf.Variable(init.glorot_uniform([in_features, out_features]), name=f"{name}/kernel")
        self.bias = tf.Variable(tf.zeros([out_features]), name=f"{name}/bias")

    def __call__(self, x):
        return tf.nn.bias_add(tf.matmul(x, tf.cast(self.kernel, x.dtype)), tf.cast(self.bias, x.dtype))
