"""Label smoothing, mixup and cutmix on the trainer's device, with timm's semantics (batch mode).

What timm's `Mixup(mode='batch', correct_lam=True)` (timm/data/mixup.py) does, and this module with it:
- Per batch, with probability mix_prob: if both alphas are > 0, cutmix with probability switch_prob,
  else mixup; lambda ~ Beta(alpha, alpha) of the one chosen. Otherwise lambda = 1 (the batch is not mixed).
- mixup: x = lam * x + (1 - lam) * x reversed along the batch (image i meets image B-1-i).
- cutmix: a box of int(H sqrt(1-lam)) x int(W sqrt(1-lam)) pixels centred on a uniform pixel, clipped
  to the image, takes the reversed batch's pixels; lambda becomes 1 - box area / image area.
- targets: lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(y reversed)), where smooth puts
  1 - e + e/K on the label and e/K elsewhere (e = label_smoothing, K classes); with mixing off that is
  plain label smoothing, (1 - e) * onehot + e / K.

The draws (lambda, mixup or cutmix, the box) are made on the host from a numpy Generator seeded with
(seed, epoch, batch), so a resumed run mixes every batch exactly as the uninterrupted one; only the
pixel work runs on the device, after normalisation and the PCA lighting shift. Under tf.distribute each
replica mixes its own slice with the same draws (the reversed pairing is within the slice).
"""
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from data.random_streams import MIXING_STREAM, keyed_rng

NONE, MIXUP, CUTMIX = 0, 1, 2


@dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, train_section):
        return cls(*(float(getattr(train_section, k)) for k in (
            "mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob", "label_smoothing")))

    @property
    def mixing(self):
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def active(self):
        """Anything to do at all; when False the trainer runs its plain step, unchanged."""
        return self.mixing or self.label_smoothing > 0


def cutmix_box(rng, lam, height, width):
    """timm's rand_bbox + lambda correction: ((yl, yh, xl, xh), corrected lambda)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    yl, yh = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    xl, xh = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(height * width)


def draw(config, seed, epoch, batch, height, width):
    """The batch's draws: (lam float32, mode NONE/MIXUP/CUTMIX, box int32 [yl, yh, xl, xh])."""
    lam, mode, box = 1.0, NONE, (0, 0, 0, 0)
    rng = keyed_rng(seed, epoch, batch, MIXING_STREAM)  # the batch's own stream (data/random_streams.py)
    if config.mixing and rng.random() < config.mix_prob:
        if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
            use_cutmix = rng.random() < config.switch_prob
        else:
            use_cutmix = config.cutmix_alpha > 0
        alpha = config.cutmix_alpha if use_cutmix else config.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if lam != 1.0:  # timm: a lambda of exactly 1 leaves the batch as it is
            if use_cutmix:
                box, lam = cutmix_box(rng, lam, height, width)
                mode = CUTMIX
            else:
                mode = MIXUP
    return np.float32(lam), np.int32(mode), np.asarray(box, np.int32)


def mix_images(x, lam, mode, box):
    """x [B,H,W,C] float mixed with itself reversed along the batch, by `mode` (a scalar int tensor)."""
    flipped = tf.reverse(x, axis=[0])
    lam = tf.cast(lam, x.dtype)

    def mixup():
        return x * lam + flipped * (1.0 - lam)

    def cutmix():
        rows, cols = tf.range(tf.shape(x)[1]), tf.range(tf.shape(x)[2])
        inside = ((rows >= box[0]) & (rows < box[1]))[:, tf.newaxis] & ((cols >= box[2]) & (cols < box[3]))
        return tf.where(inside[tf.newaxis, :, :, tf.newaxis], flipped, x)

    return tf.switch_case(tf.cast(mode, tf.int32), [lambda: x, mixup, cutmix])


def soft_targets(labels, num_classes, smoothing=0.0, lam=None):
    """timm's mixup_target: smoothed one-hot targets, mixed with the reversed batch's by lam (float32)."""
    off = smoothing / num_classes
    targets = tf.one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off, dtype=tf.float32)
    if lam is None:
        return targets
    lam = tf.cast(lam, tf.float32)
    return targets * lam + tf.reverse(targets, axis=[0]) * (1.0 - lam)


class DeviceRecipe:
    """What the train step calls when label smoothing or mixing is on.

    `step_args(epoch, batch, shape)` are the extra train-step inputs (none when mixing is off);
    `model_input` and `per_example_loss` take them as *mix.
    """

    def __init__(self, config, num_classes, seed):
        self.config, self.num_classes, self.seed = config, int(num_classes), int(seed)

    @property
    def active(self):
        return self.config.active

    def step_args(self, epoch, batch, images_shape):
        if not self.config.mixing:
            return ()
        lam, mode, box = draw(self.config, self.seed, epoch, batch, images_shape[1], images_shape[2])
        return tf.constant(lam), tf.constant(mode), tf.constant(box)

    @staticmethod
    def model_input(to_model_input, images, lighting, mu, sigma, dtype, *mix):
        """to_model_input's result (normalised, lighting shifted), mixed in float32 when there are draws."""
        if not mix:
            return to_model_input(images, lighting, mu, sigma, dtype=dtype)
        return tf.cast(mix_images(to_model_input(images, lighting, mu, sigma, dtype=tf.float32), *mix), dtype)

    def per_example_loss(self, labels, logits, *mix):
        targets = soft_targets(labels, self.num_classes, self.config.label_smoothing, mix[0] if mix else None)
        return tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)
