"""Seed 002's concatenating ResNet: golden parameter count, any input size, plain batch norm, head."""
import numpy as np
import pytest
import tensorflow as tf

from model.batch_renorm import RenormConfig
from model.concat_resnet import BatchNorm, ConcatResNet, count_parameters, mean_probability_logits

SMALL = dict(num_classes=5, width_multiplier=1 / 16)  # 8/16/32 channels: a forward pass in milliseconds


def test_golden_parameter_count_matches_seed_002_summary():
    # model.summary() in seed 002: Total params 12,908,928; Trainable params 12,899,200.
    net = ConcatResNet(num_classes=200)
    assert count_parameters(net) == (12_899_200, 12_908_928)
    assert len(net.kernels()) == 16 and len(net.norms()) == 15
    shapes = {v.name.split(":")[0]: tuple(v.shape) for v in net.trainable_variables}
    assert shapes["stem_conv1/kernel"] == (3, 3, 3, 128)
    assert shapes["stage2_conv1/kernel"] == (3, 3, 256, 256)   # reads the pooled 128 + 128 concatenation
    assert shapes["stage3_norm1/gamma"] == (512,)
    assert shapes["head_norm/gamma"] == (1024,)
    assert shapes["head_conv/kernel"] == (1, 1, 1024, 200)
    assert not any("bias" in name for name in shapes)


def test_batch_renorm_variant_has_the_same_count():
    net = ConcatResNet(num_classes=200, normalization="batch_renorm", renorm=RenormConfig())
    assert count_parameters(net) == (12_899_200, 12_908_928)


@pytest.mark.parametrize("normalization", ["batch_norm", "batch_renorm"])
@pytest.mark.parametrize("size", [(4, 4), (5, 9), (32, 32), (48, 48), (64, 64), (33, 70)])
def test_any_input_size(normalization, size):
    net = ConcatResNet(**SMALL, normalization=normalization, renorm=RenormConfig())
    x = tf.random.stateless_normal((2, *size, 3), [1, 2])
    for training in (True, False):
        logits = net(x, training=training)
        assert logits.shape == (2, 5) and logits.dtype == tf.float32
        assert np.isfinite(logits.numpy()).all()
        np.testing.assert_allclose(tf.reduce_sum(tf.nn.softmax(logits), -1).numpy(), 1.0, rtol=1e-5)


def test_too_small_input_fails_loudly():
    net = ConcatResNet(**SMALL)
    with pytest.raises(ValueError, match="at least 4x4"):
        net(tf.zeros((1, 3, 9, 3)), training=False)


def test_head_averages_probabilities_over_positions():
    z = tf.random.stateless_normal((3, 4, 5, 7), [3, 4]) * 20.0  # large values: no overflow in the log
    logits = mean_probability_logits(z)
    expected = tf.reduce_mean(tf.nn.softmax(z, axis=-1), axis=[1, 2])
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)


def test_batch_norm_is_plain_batch_norm():
    bn = BatchNorm("bn", 3, momentum=0.9, epsilon=1e-3)
    bn.gamma.assign([1.0, 2.0, 0.5])
    bn.beta.assign([0.0, 1.0, -1.0])
    x = tf.random.stateless_normal((4, 5, 6, 3), [5, 6]) * 3.0 + 2.0
    y = bn(x, training=True).numpy()
    xs = x.numpy().reshape(-1, 3)
    mean, var = xs.mean(0), xs.var(0)
    expected = (x.numpy() - mean) / np.sqrt(var + 1e-3) * bn.gamma.numpy() + bn.beta.numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    n = xs.shape[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    y_inf = bn(x, training=False).numpy()
    expected_inf = ((x.numpy() - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + 1e-3)
                    * bn.gamma.numpy() + bn.beta.numpy())
    np.testing.assert_allclose(y_inf, expected_inf, rtol=1e-5, atol=1e-5)


def test_first_stage_conv_has_no_pre_activation_and_concat_widths():
    net = ConcatResNet(**SMALL)
    pres = [pre for pre, _ in net.stages[0]]
    assert pres[0] is None and all(p is not None for p in pres[1:])
    assert all(pre is not None for layers in net.stages[1:] for pre, _ in layers)
    assert net.pools == (True, True, False)
    assert net.head_conv.kernel.shape[2] == 8 + 8 + 16 + 32  # stem + the three stages' widths


def test_regularization_and_training_step():
    net = ConcatResNet(**SMALL, l2_penalty=1e-3, seed=3)
    expected = 1e-3 / 2 * sum(float(tf.reduce_sum(k ** 2)) for k in net.kernels())
    assert float(net.regularization_loss()) == pytest.approx(expected, rel=1e-5)
    x = tf.random.stateless_uniform((8, 16, 16, 3), [7, 8])
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
    opt = tf.keras.optimizers.RMSprop(3e-3, epsilon=1e-8)

    def loss():
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, net(x, training=True))
        return tf.reduce_mean(ce) + net.regularization_loss()

    first = float(loss())
    for _ in range(6):
        with tf.GradientTape() as tape:
            value = loss()
        opt.apply_gradients(zip(tape.gradient(value, net.trainable_variables), net.trainable_variables))
    assert float(loss()) < first


def test_same_seed_same_weights_and_bfloat16_gives_float32_logits():
    a, b = ConcatResNet(**SMALL, seed=4), ConcatResNet(**SMALL, seed=4)
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    low = ConcatResNet(**SMALL, compute_dtype="bfloat16")
    assert low(tf.zeros((1, 8, 8, 3)), training=True).dtype == tf.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="normalization"):
        ConcatResNet(num_classes=3, normalization="group_norm")
    with pytest.raises(ValueError, match="RenormConfig"):
        ConcatResNet(num_classes=3, normalization="batch_renorm")
