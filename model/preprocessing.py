"""The device half of preprocessing: uint8 crops -> normalised (and, in training, colour-shifted) model input.

One normalisation for training and serving: `normalise` is what the trainer applies to every batch and what
the exported SavedModel applies to its uint8 input (model/export.py), so the two cannot drift.

Steps 4 and 6 of the scale-crop recipe (data/transforms/scale_crop.py says where every step
runs): (x/255 - mu)/sigma per channel, then the per-image PCA lighting shift
(AlexNet-style, per image as the original): the 3x3 covariance of the crop's
own normalised pixels is eigendecomposed (eigenvalues lam_i, eigenvectors v_i)
and sum_i alpha_i lam_i v_i (lam a variance, not a std) is added to every pixel,
with the coefficients alpha ~ N(0, pca_std^2) drawn by the producer. Here this
is a [B,3,3] matrix product and a batched 3x3 eigh, free next to a training
step; on the producer's CPU it was a sixth of the per-image work. Evaluation
uses the same function with lighting=None (no colour shift).
"""
import numpy as np
import tensorflow as tf


def normalisation_constants(mu, sigma):
    """(scale, offset) with (x/255 - mu)/sigma == x*scale + offset, as float32 [3] arrays."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    return (1.0 / (255.0 * sigma)).astype(np.float32), (-mu / sigma).astype(np.float32)


def normalise(images, scale, offset):
    """float32 images * scale + offset == (x/255 - mu)/sigma per channel, for (scale, offset) from
    normalisation_constants(mu, sigma); images uint8 or float [..., 3]."""
    return tf.cast(images, tf.float32) * scale + offset


def pca_lighting_shift(x, alphas):
    """sum_i alpha_i lam_i v_i per image for normalised images x [B,H,W,3] float32 and alphas [B,3]: [B,3]."""
    pixels = tf.reshape(x, [tf.shape(x)[0], -1, 3])
    n = tf.cast(tf.shape(pixels)[1], tf.float32)
    centred = pixels - tf.reduce_mean(pixels, axis=1, keepdims=True)
    cov = tf.matmul(centred, centred, transpose_a=True) / tf.maximum(n - 1.0, 1.0)  # ddof=1, as np.cov
    lam, vecs = tf.linalg.eigh(cov)
    # An eigenvector's sign is arbitrary (it differs between libraries and devices); fixing it, with
    # the largest component positive, makes the shift the same wherever it is computed.
    largest = tf.gather(tf.linalg.matrix_transpose(vecs), tf.argmax(tf.abs(vecs), axis=-2), batch_dims=2)
    vecs = vecs * tf.where(largest < 0, -1.0, 1.0)[:, tf.newaxis, :]
    return tf.linalg.matvec(vecs, tf.cast(alphas, tf.float32) * lam)


def to_model_input(images_uint8, lighting, mu, sigma, dtype=tf.float32):
    """(x/255 - mu)/sigma plus the PCA lighting shift, as `dtype`.

    images [B,H,W,3] uint8; lighting: the producer's [B,3] float32 coefficients alpha, or None.
    """
    x = normalise(images_uint8, *normalisation_constants(mu, sigma))
    if lighting is not None:
        x = x + pca_lighting_shift(x, lighting)[:, tf.newaxis, tf.newaxis, :]
    return tf.cast(x, dtype)
