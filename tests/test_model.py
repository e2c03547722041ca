"""model/: ResNet-50 structure, batch renormalization, weight decay, precision, XLA, distribution
(export: test_export.py; the build arguments from settings: test_settings.py)."""
import os

import numpy as np
import pytest
import tensorflow as tf

from model import BatchRenorm, RenormConfig, build_model
from model.batch_renorm import MIN_EPSILON
from tests.helpers import random_images, run_python, without_op_determinism

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width_multiplier=0.125, num_classes=10)


def count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


@pytest.fixture(scope="module")
def resnet50():
    return build_model(l2_penalty=1e-4)


# ----------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------

def test_resnet50_parameter_counts_are_the_standard_ones(resnet50):
    assert count(resnet50.trainable_variables) == 25_557_032
    # moving mean + moving std of 53 renorm layers (Keras' moving mean + variance count), plus train_step
    assert count(resnet50.statistics()) == 53_120
    assert count(resnet50.non_trainable_variables) == 53_121
    assert len(resnet50.kernels()) == 54  # 53 convs + the dense layer


def test_variable_names_are_readable_and_unique(resnet50):
    names = [v.name for v in resnet50.variables]
    assert len(names) == len(set(names))
    for expected in ("conv1_conv/kernel:0", "conv1_brn/gamma:0", "conv2_block1_0_conv/kernel:0",
                     "conv2_block1_1_brn/moving_mean:0", "conv3_block4_3_brn/moving_std:0",
                     "conv5_block3_2_conv/kernel:0", "predictions/kernel:0", "predictions/bias:0", "train_step:0"):
        assert expected in names
    assert not any(n.endswith("_conv/bias:0") for n in names)  # standard convs carry no bias


def test_resnet50_224_forward_backward(resnet50):
    images = random_images([2, 224, 224, 3])
    with tf.GradientTape() as tape:
        logits = resnet50(images, training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits([3, 7], logits))
        loss += resnet50.regularization_loss()
    grads = tape.gradient(loss, resnet50.trainable_variables)
    assert logits.shape == (2, 1000) and logits.dtype == tf.float32
    assert np.isfinite(loss.numpy()) and np.isfinite(logits.numpy()).all()
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    assert np.isfinite(resnet50(images[:1], training=False).numpy()).all()


@pytest.mark.parametrize("variant", ["standard", "original"])
@pytest.mark.parametrize("side", [32, 45, 64])
def test_small_inputs_give_logits(variant, side):
    net = build_model(num_classes=7, width_multiplier=0.25, variant=variant)
    images = random_images([3, side, side, 3])
    for training in (True, False):
        logits = net(images, training=training)
        assert logits.shape == (3, 7) and logits.dtype == tf.float32
        assert np.isfinite(logits.numpy()).all()


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_model(seed=s, **TINY) for s in (5, 5, 6))
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert not np.array_equal(a.stem_conv.kernel.numpy(), c.stem_conv.kernel.numpy())


def test_stride_placement_v1_and_v1_5():
    v15 = build_model(stride_on="3x3", **TINY)
    v1 = build_model(stride_on="1x1", **TINY)
    for name in ("conv3_block1", "conv4_block1", "conv5_block1"):
        assert (v15.blocks[name].conv1.stride, v15.blocks[name].conv2.stride) == (1, 2)
        assert (v1.blocks[name].conv1.stride, v1.blocks[name].conv2.stride) == (2, 1)
    for name in ("conv2_block1", "conv3_block2"):
        assert v1.blocks[name].conv1.stride == v1.blocks[name].conv2.stride == 1
    assert count(v1.trainable_variables) == count(v15.trainable_variables)
    assert build_model(variant="original", **TINY).blocks["conv3_block1"].conv1.stride == 2  # 'auto'


def test_original_variant_structure_and_count():
    net = build_model(variant="original")
    assert count(net.trainable_variables) == 22_803_176  # the original repo's "about 22.8M"
    names = [v.name for v in net.trainable_variables]
    assert not any("_0_conv" in n for n in names)  # parameter-free shortcuts
    assert "conv2_block1_1_conv/bias:0" in names and "conv1_conv/bias:0" in names
    assert net.activation is tf.nn.elu


def test_zero_init_last_gamma():
    net = build_model(zero_init_last_gamma=True, **TINY)
    assert not net.blocks["conv4_block2"].brn3.gamma.numpy().any()
    assert net.blocks["conv4_block2"].brn2.gamma.numpy().all()


def test_bad_arguments_are_rejected():
    for kwargs in (dict(variant="v2"), dict(stride_on="2x2"), dict(compute_dtype="float64"),
                   dict(num_classes=0), dict(width_multiplier=0), dict(renorm=dict(epsilon=1e-7))):
        with pytest.raises(ValueError):
            build_model(**kwargs)
    with pytest.raises(TypeError):
        build_model(**TINY)(random_images([1, 32, 32, 3]), training=tf.constant(True))


# ----------------------------------------------------------------------------
# Batch renormalization
# ----------------------------------------------------------------------------

EPS = 1e-3


def renorm_layer(channels=6, momentum=0.9, **kwargs):
    return BatchRenorm("brn", channels, RenormConfig(momentum=momentum, epsilon=EPS, **kwargs))


def set_affine(layer, seed=1):
    rng = np.random.RandomState(seed)
    layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape).astype(np.float32))
    layer.beta.assign(rng.normal(0.0, 1.0, layer.beta.shape).astype(np.float32))


def batch_stats(x):
    x = np.asarray(x, np.float64)
    return x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))


def test_renorm_with_no_relaxation_is_batch_norm():
    x = random_images([4, 5, 5, 6], mean=3.0, std=2.0)
    layer = renorm_layer()
    set_affine(layer)
    layer.moving_mean.assign(np.full(6, 0.7, np.float32))  # r=1, d=0 whatever the moving statistics
    layer.moving_std.assign(np.full(6, 0.3, np.float32))
    y = layer(x, training=True, rmax=1.0, dmax=0.0).numpy()
    mean, var = tf.nn.moments(x, [0, 1, 2])
    expected = tf.nn.batch_normalization(x, mean, var, layer.beta, layer.gamma, EPS).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

    import keras
    bn = keras.layers.BatchNormalization(epsilon=EPS)
    bn.build(x.shape)
    bn.gamma.assign(layer.gamma)
    bn.beta.assign(layer.beta)
    np.testing.assert_allclose(y, bn(x, training=True).numpy(), rtol=1e-5, atol=1e-5)


def test_renorm_clips_r_and_d_exactly():
    x = random_images([4, 3, 3, 6], seed=2, mean=1.0, std=2.0)
    mean, var = batch_stats(x)
    std = np.sqrt(var + EPS)
    layer = renorm_layer()
    set_affine(layer)
    # channel by channel: r below, inside and above [1/rmax, rmax]; d likewise for [-dmax, dmax]
    moving_std = (std * np.array([4.0, 1.2, 0.3, 1.0, 1.0, 1.0])).astype(np.float32)
    moving_mean = (mean - moving_std * np.array([0.0, 0.0, 0.0, 3.0, -0.5, -2.5])).astype(np.float32)
    layer.moving_std.assign(moving_std)
    layer.moving_mean.assign(moving_mean)
    rmax, dmax = 2.0, 1.0
    y = layer(x, training=True, rmax=rmax, dmax=dmax).numpy()
    r = np.clip(std / moving_std, 1 / rmax, rmax)
    d = np.clip((mean - moving_mean) / moving_std, -dmax, dmax)
    np.testing.assert_allclose(r, [0.5, 1 / 1.2, 2.0, 1.0, 1.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(d, [0.0, 0.0, 0.0, 1.0, -0.5, -1.0], atol=1e-5)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    expected = gamma * ((np.asarray(x) - mean) / std * r + d) + beta
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sync_replicas", [False, True])
def test_renorm_gradient_treats_r_and_d_as_constants(sync_replicas):
    x = random_images([4, 3, 3, 6], seed=3, mean=-1.0, std=3.0)
    upstream = random_images([4, 3, 3, 6], seed=4).numpy()
    layer = renorm_layer(sync_replicas=sync_replicas)
    set_affine(layer)
    layer.moving_std.assign(np.linspace(0.5, 8.0, 6).astype(np.float32))
    layer.moving_mean.assign(np.linspace(-3.0, 2.0, 6).astype(np.float32))
    r, d = layer.corrections(*[tf.constant(v, tf.float32) for v in _mean_std(x)], 1.5, 0.5)
    clipped = np.isclose(r.numpy(), 1.5) | np.isclose(r.numpy(), 1 / 1.5)
    assert 0 < clipped.sum() < 6  # some channels clipped, some not
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True, rmax=1.5, dmax=0.5) * upstream)
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])

    mean, std = _mean_std(x)
    x_hat = (np.asarray(x, np.float64) - mean) / std
    gamma, r, d = layer.gamma.numpy(), r.numpy(), d.numpy()
    g_hat = upstream * gamma * r  # dL/dx_hat with r, d constants
    expected_dx = (g_hat - g_hat.mean(axis=(0, 1, 2)) - x_hat * (g_hat * x_hat).mean(axis=(0, 1, 2))) / std
    np.testing.assert_allclose(dx.numpy(), expected_dx, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dgamma.numpy(), (upstream * (x_hat * r + d)).sum(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta.numpy(), upstream.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)


def _mean_std(x):
    mean, var = batch_stats(x)
    return mean, np.sqrt(var + EPS)


def test_sync_path_equals_fused_path_on_one_device():
    x = random_images([4, 5, 5, 6], seed=5, mean=2.0, std=3.0)
    outputs = []
    for sync in (False, True):
        layer = renorm_layer(sync_replicas=sync)
        set_affine(layer)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, rmax=1.7, dmax=0.8)
            loss = tf.reduce_sum(tf.sin(y))
        outputs.append([y.numpy(), tape.gradient(loss, x).numpy(), layer.moving_std.numpy()])
    for a, b in zip(*outputs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_renorm_matches_keras_renorm_oracle():
    import keras
    if tuple(int(p) for p in keras.__version__.split(".")[:2]) < (3, 14):
        pytest.skip(f"keras {keras.__version__} has no BatchNormalization(renorm=True)")
    x = random_images([4, 5, 5, 6], seed=6, mean=1.5, std=2.5)  # far from the initial (0, 1): clipping active
    upstream = random_images([4, 5, 5, 6], seed=7)
    rmax, dmax, momentum = 1.5, 0.5, 0.9
    ours = renorm_layer(momentum=momentum)
    oracle = keras.layers.BatchNormalization(epsilon=EPS, momentum=momentum, renorm=True,
                                             renorm_clipping={"rmax": rmax, "rmin": 1 / rmax, "dmax": dmax})
    oracle.build(x.shape)
    set_affine(ours)
    oracle.gamma.assign(ours.gamma)
    oracle.beta.assign(ours.beta)
    results = []
    for layer, call in ((ours, lambda x: ours(x, training=True, rmax=rmax, dmax=dmax)),
                        (oracle, lambda x: oracle(x, training=True))):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = call(x)
            loss = tf.reduce_sum(y * upstream)
        results.append([y.numpy(), tape.gradient(loss, x).numpy()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.moving_mean.numpy(), oracle.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.moving_std.numpy(), oracle.moving_stddev.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours(x, training=False).numpy(), oracle(x, training=False).numpy(),
                               rtol=1e-4, atol=1e-4)


def test_moving_statistics_update_once_per_training_call_and_drive_inference():
    x = random_images([4, 3, 3, 6], seed=8, mean=2.0, std=3.0)
    mean, std = _mean_std(x)
    layer = renorm_layer(momentum=0.75)
    layer(x, training=False)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(6))
    layer(x, training=True, rmax=3.0, dmax=5.0)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.25 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_std.numpy(), 0.75 + 0.25 * std, rtol=1e-5)
    y = layer(x, training=False).numpy()
    expected = (np.asarray(x) - layer.moving_mean.numpy()) / layer.moving_std.numpy()  # gamma=1, beta=0
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_statistics_are_float32_under_float16():
    x = random_images([4, 3, 3, 6], seed=9, mean=300.0, std=40.0)  # sum of squares overflows float16
    layer = renorm_layer(momentum=0.0)
    y = layer(tf.cast(x, tf.float16), training=True)
    assert y.dtype == tf.float16 and layer.moving_std.dtype == tf.float32
    mean, std = _mean_std(tf.cast(tf.cast(x, tf.float16), tf.float32))
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_std.numpy(), std, rtol=1e-4)
    assert np.isfinite(y.numpy()).all()


def test_ramp_of_rmax_and_dmax():
    config = RenormConfig(rmax_max=3.0, dmax_max=5.0, start_relaxing_rmax=100, reach_rmax_max=300,
                          start_relaxing_dmax=50, reach_dmax_max=50)
    for step, rmax, dmax in ((0, 1.0, 0.0), (49, 1.0, 0.0), (50, 1.0, 5.0), (100, 1.0, 5.0), (200, 2.0, 5.0),
                             (250, 2.5, 5.0), (300, 3.0, 5.0), (10**7, 3.0, 5.0)):
        got = config.clip_limits(tf.constant(step, tf.int64))
        np.testing.assert_allclose([g.numpy() for g in got], [rmax, dmax], rtol=1e-6)


def test_ramp_position_restores_from_checkpoint(tmp_path):
    renorm = dict(start_relaxing_rmax=10, reach_rmax_max=20, start_relaxing_dmax=10, reach_dmax_max=30)
    net = build_model(renorm=renorm, **TINY)
    net(random_images([2, 32, 32, 3]), training=True)
    net.train_step.assign(15)
    saved = tf.train.Checkpoint(model=net).write(str(tmp_path / "ckpt"))
    restored = build_model(renorm=renorm, seed=1, **TINY)
    tf.train.Checkpoint(model=restored).read(saved).assert_consumed()
    assert int(restored.train_step.numpy()) == 15
    np.testing.assert_allclose([v.numpy() for v in restored.renorm.clip_limits(restored.train_step)], [2.0, 1.25])
    moving = net.blocks["conv3_block2"].brn2.moving_std
    np.testing.assert_array_equal(restored.blocks["conv3_block2"].brn2.moving_std.numpy(), moving.numpy())


def test_epsilon_below_fused_kernel_floor_is_rejected():
    with pytest.raises(ValueError):
        RenormConfig(epsilon=MIN_EPSILON / 2)


# ----------------------------------------------------------------------------
# Loss pieces, precision, compilation
# ----------------------------------------------------------------------------

def test_weight_decay_adds_exactly_l2_penalty_times_w():
    l2 = 0.01
    net = build_model(l2_penalty=l2, variant="original", **TINY)  # original: conv biases must not decay
    with tf.GradientTape(persistent=True) as tape:
        data_loss = tf.reduce_mean(net(random_images([4, 32, 32, 3]), training=True) ** 2)
        total_loss = data_loss + net.regularization_loss()
    variables = net.trainable_variables
    plain, decayed = tape.gradient(data_loss, variables), tape.gradient(total_loss, variables)
    kernels = {id(k) for k in net.kernels()}
    assert len(kernels) == 50 and all(v.name.endswith("/kernel:0") for v in net.kernels())
    for v, p, d in zip(variables, plain, decayed):
        expected = l2 * v.numpy() if id(v) in kernels else np.zeros(v.shape)
        # float32 rounding of the sum is relative to the data gradient's size
        atol = 1e-6 * float(np.abs(p.numpy()).max()) + 1e-9
        np.testing.assert_allclose(d.numpy() - p.numpy(), expected, rtol=1e-4, atol=atol)
    expected_loss = l2 / 2 * sum(np.sum(k.numpy().astype(np.float64) ** 2) for k in net.kernels())
    np.testing.assert_allclose(float(net.regularization_loss()), expected_loss, rtol=1e-5)
    assert float(build_model(**TINY).regularization_loss()) == 0.0


@pytest.mark.parametrize("compute_dtype", ["float16", "bfloat16"])
def test_mixed_precision_keeps_float32_variables_and_logits(compute_dtype):
    net = build_model(compute_dtype=compute_dtype, **TINY)
    images = random_images([8, 64, 64, 3])  # batch renorm over a tiny batch would amplify rounding
    with tf.GradientTape() as tape:
        logits = net(images, training=True)
        loss = tf.reduce_sum(logits)
    grads = tape.gradient(loss, net.trainable_variables)
    assert logits.dtype == tf.float32 and net(images, training=False).dtype == tf.float32
    assert all(v.dtype == tf.float32 for v in net.variables if v is not net.train_step)
    assert all(g is not None and g.dtype == tf.float32 and np.isfinite(g.numpy()).all() for g in grads)
    reference = build_model(**TINY)(images, training=True)
    assert np.corrcoef(logits.numpy().ravel(), reference.numpy().ravel())[0, 1] > 0.9


def test_works_under_xla():
    # One block per stage keeps every kind of layer XLA compiles (stem, strided blocks, projection shortcuts,
    # renorm, head) at about half the XLA compile, which dominates this test (measured side by side: 22.8 -> 12.1 s).
    eager_net, xla_net = (build_model(stage_blocks=(1, 1, 1, 1), **TINY) for _ in range(2))
    images = random_images([4, 32, 32, 3])
    for net in (eager_net, xla_net):
        net.train_step.assign(10**6)  # relaxed r and d

    def step(net):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(net(images, training=True) ** 2) + net.regularization_loss()
        return loss, tape.gradient(loss, [net.head.kernel, net.stem_conv.kernel])
    loss, grads = step(eager_net)
    with without_op_determinism():  # another test's in-process deterministic Trainer may have turned it on
        xla_loss, xla_grads = tf.function(lambda: step(xla_net), jit_compile=True)()
    np.testing.assert_allclose(xla_loss.numpy(), loss.numpy(), rtol=1e-3)
    for xla_grad, grad in zip(xla_grads, grads):  # XLA reorders float sums: compare at the gradient's scale
        np.testing.assert_allclose(xla_grad.numpy(), grad.numpy(), atol=1e-2 * float(np.abs(grad.numpy()).max()))
    last = xla_net.block_order[-1]  # the statistics at the end of the network
    np.testing.assert_allclose(xla_net.blocks[last].brn3.moving_mean.numpy(),
                               eager_net.blocks[last].brn3.moving_mean.numpy(), rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------
# Distribution (2 logical CPUs: must be configured before TF starts, hence a subprocess)
# ----------------------------------------------------------------------------

MIRRORED = r"""
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from model import BatchRenorm, RenormConfig

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.RandomState(0)
x = rng.normal(1.0, 2.0, size=(4, 3, 3, 5)).astype(np.float32)
x[2:] = x[2:] * 3.0 + 4.0  # the two replicas' halves have different statistics
upstream = rng.normal(size=x.shape).astype(np.float32)
halves = [slice(0, 2), slice(2, 4)]

def layer_step(layer, x, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, rmax=1.5, dmax=0.5)
        loss = tf.reduce_sum(tf.sin(y) * upstream)
    return y, tape.gradient(loss, x)

def split(values):
    return strategy.experimental_distribute_values_from_function(lambda ctx: values[halves[ctx.replica_id_in_sync_group]])

def single_device(sync, parts):
    ys, gs, stds = [], [], []
    for part in parts:
        layer = BatchRenorm("brn", 5, RenormConfig(momentum=0.5, sync_replicas=sync))
        y, g = layer_step(layer, tf.constant(x[part]), upstream[part])
        ys.append(y.numpy()); gs.append(g.numpy()); stds.append(layer.moving_std.numpy())
    return np.concatenate(ys), np.concatenate(gs), np.mean(stds, axis=0)

for sync, parts in ((True, [slice(0, 4)]), (False, halves)):
    with strategy.scope():
        layer = BatchRenorm("brn", 5, RenormConfig(momentum=0.5, sync_replicas=sync))
    y, g = strategy.run(tf.function(lambda a, b: layer_step(layer, a, b)), args=(split(x), split(upstream)))
    got = [np.concatenate([t.numpy() for t in strategy.experimental_local_results(v)]) for v in (y, g)]
    got.append(layer.moving_std.numpy())  # cross-replica read = mean of the replicas' copies
    for a, b in zip(got, single_device(sync, parts)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print("layer", "sync" if sync else "per-replica", "ok")

"""


def test_batch_statistics_per_replica_or_synchronised_under_mirrored_strategy(tmp_path):
    out = run_python(MIRRORED, cwd=str(tmp_path), with_repo=True)
    # (a whole training step under MirroredStrategy is tests/test_distribute.py's)
    assert "layer sync ok" in out and "layer per-replica ok" in out
