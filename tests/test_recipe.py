"""Label smoothing, the weight EMA and mixup/cutmix (engine/mixing.py, engine/ema.py, their trainer hooks)."""
import os
import types

import numpy as np
import pytest
import tensorflow as tf

from engine import ema, mixing

K = 5


# ----------------------------------------------------------------------------
# Label smoothing
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("e", [0.0, 0.1, 0.35])
def test_label_smoothing_equals_keras_categorical_crossentropy(e):
    import keras
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (16, K)).astype(np.float32)
    labels = rng.integers(0, K, 16)
    recipe = mixing.DeviceRecipe(mixing.MixConfig(label_smoothing=e), K, seed=0)
    ours = recipe.per_example_loss(tf.constant(labels, tf.int32), tf.constant(logits)).numpy()
    keras_loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=e, reduction=None)
    theirs = np.asarray(keras_loss(np.eye(K, dtype=np.float32)[labels], logits))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Mixup / cutmix
# ----------------------------------------------------------------------------

def numpy_targets(labels, lam, e):
    """timm's mixup_target in numpy."""
    off = e / K
    y = np.full((len(labels), K), off, np.float64)
    y[np.arange(len(labels)), labels] = 1 - e + off
    return y * lam + y[::-1] * (1 - lam)


def test_mixup_images_and_targets_equal_a_numpy_reference_for_given_draws():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 8, 10, 3)).astype(np.float32)
    labels = rng.integers(0, K, 6)
    lam = np.float32(0.3)
    mixed = mixing.mix_images(tf.constant(x), lam, mixing.MIXUP, tf.zeros([4], tf.int32)).numpy()
    np.testing.assert_allclose(mixed, x * lam + x[::-1] * (np.float32(1) - lam), rtol=1e-6, atol=1e-6)
    targets = mixing.soft_targets(tf.constant(labels), K, 0.1, lam).numpy()
    np.testing.assert_allclose(targets, numpy_targets(labels, 0.3, 0.1), atol=1e-6)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)


def test_cutmix_images_and_targets_equal_a_numpy_reference_for_given_draws():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 12, 9, 3)).astype(np.float32)
    labels = rng.integers(0, K, 4)
    yl, yh, xl, xh = 2, 7, 3, 9
    lam = 1 - (yh - yl) * (xh - xl) / (12 * 9)
    mixed = mixing.mix_images(tf.constant(x), np.float32(lam), mixing.CUTMIX, tf.constant([yl, yh, xl, xh])).numpy()
    expected = x.copy()
    expected[:, yl:yh, xl:xh] = x[::-1, yl:yh, xl:xh]
    np.testing.assert_array_equal(mixed, expected)
    np.testing.assert_allclose(mixing.soft_targets(tf.constant(labels), K, 0.0, np.float32(lam)).numpy(),
                               numpy_targets(labels, lam, 0.0), atol=1e-6)


def test_cutmix_box_area_matches_the_lambda_it_reports():
    config = mixing.MixConfig(cutmix_alpha=1.0)
    modes = set()
    for batch in range(200):
        lam, mode, (yl, yh, xl, xh) = mixing.draw(config, 3, 0, batch, 24, 40)
        modes.add(int(mode))
        if mode == mixing.CUTMIX:
            assert 0 <= yl <= yh <= 24 and 0 <= xl <= xh <= 40
            assert lam == pytest.approx(1 - (yh - yl) * (xh - xl) / (24 * 40), abs=1e-6)
            # The mask the device builds covers exactly that area.
            x = np.zeros((2, 24, 40, 1), np.float32)
            x[1] = 1.0
            mixed = mixing.mix_images(tf.constant(x), lam, mode, tf.constant([yl, yh, xl, xh])).numpy()
            assert mixed[0].mean() == pytest.approx(1 - lam, abs=1e-6)
    assert modes == {mixing.CUTMIX}


def test_draws_derive_from_seed_epoch_and_batch_and_follow_the_probabilities():
    both = mixing.MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.5, switch_prob=0.5)
    draws = [mixing.draw(both, 7, 2, b, 32, 32) for b in range(400)]
    again = [mixing.draw(both, 7, 2, b, 32, 32) for b in range(400)]
    for a, b in zip(draws, again):
        assert a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert mixing.draw(both, 7, 3, 0, 32, 32)[0] != mixing.draw(both, 7, 2, 0, 32, 32)[0] or \
        mixing.draw(both, 8, 2, 1, 32, 32)[0] != mixing.draw(both, 7, 2, 1, 32, 32)[0]
    modes = np.array([int(d[1]) for d in draws])
    assert 0.4 < np.mean(modes == mixing.NONE) < 0.6  # mix_prob 0.5
    assert 0.3 < np.mean(modes[modes != mixing.NONE] == mixing.CUTMIX) < 0.7  # switch_prob 0.5
    never = mixing.MixConfig(mixup_alpha=0.2, mix_prob=0.0)
    assert all(mixing.draw(never, 0, 0, b, 8, 8)[0] == 1.0 for b in range(50))


def test_no_mix_leaves_the_images_untouched():
    x = np.random.default_rng(4).normal(size=(3, 5, 5, 3)).astype(np.float32)
    out = mixing.mix_images(tf.constant(x), np.float32(1.0), mixing.NONE, tf.zeros([4], tf.int32)).numpy()
    np.testing.assert_array_equal(out, x)


# ----------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------

def tiny_net():
    from model import build_model
    return build_model(num_classes=3, width_multiplier=0.0625, seed=0)


@pytest.mark.parametrize("warmup", [False, True])
def test_device_ema_equals_a_numpy_ema_over_the_same_steps(warmup):
    net = tiny_net()
    net(tf.zeros([2, 16, 16, 3]), training=False)
    weights = ema.WeightEMA(net, tiny_net(), decay=0.9, warmup=warmup)
    variables = list(net.trainable_variables) + list(net.statistics())
    assert any(not v.trainable for v in variables)  # the moving statistics take part
    reference = [v.numpy().astype(np.float64) for v in variables]
    update = tf.function(weights.update)
    rng = np.random.default_rng(5)
    for t in range(6):
        for v in variables:
            v.assign(v.numpy() + rng.normal(0, 0.1, v.shape).astype(np.float32))
        d = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
        reference = [d * r + (1 - d) * v.numpy() for r, v in zip(reference, variables)]
        update(tf.constant(t, tf.int64))
    for (_, shadow), expected in zip(weights.pairs, reference):
        np.testing.assert_allclose(shadow.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=shadow.name)
