"""The trainer-device half of preprocessing: uint8 crops -> normalised model input.

Steps 4 and 6 of seed 001's recipe (see data/augment.py for where every step
runs): (x/255 - mu)/sigma per channel, plus the per-image PCA lighting shift
that the producer computed on the CPU. Both are affine, so they run here on
the GPU as one multiply-add per pixel instead of travelling as float16 files.
Evaluation uses the same function with lighting=None (no colour shift).
"""
import numpy as np
import tensorflow as tf


def normalisation_constants(mu, sigma):
    """(scale, offset) with (x/255 - mu)/sigma == x*scale + offset, as float32 [3] arrays."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    return (1.0 / (255.0 * sigma)).astype(np.float32), (-mu / sigma).astype(np.float32)


def to_model_input(images_uint8, lighting, mu, sigma, dtype=tf.float32):
    """((x/255 - mu)/sigma + lighting) as `dtype`; images [B,H,W,3] uint8, lighting [B,3] float32 or None."""
    scale, offset = normalisation_constants(mu, sigma)
    x = tf.cast(images_uint8, tf.float32) * scale + offset
    if lighting is not None:
        x = x + tf.cast(lighting, tf.float32)[:, tf.newaxis, tf.newaxis, :]
    return tf.cast(x, dtype)
