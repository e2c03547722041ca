"""engine/trainer.py's real training step: the L2 term and the PCA lighting coefficients reach the update.

model.regularization_loss is tested on its own in test_model.py; these tests pin that the
Trainer's compiled step uses it, scaled right on 1 and on 2 replicas (the original's main
bug was a weight decay that never reached the gradients), and that the step feeds the
network model/preprocessing.py's function of the batch's lighting coefficients.

The data gradient is made exactly zero for the weight-decay step: the last block's final
beta is set to -1000 (its gamma starts at 0), so every unit of the last ReLU is off, the
features are 0 and no gradient flows back from the loss into any kernel (only the head's
bias learns). The first SGD step then moves every kernel by exactly -lr * l2 * w (the
momentum slot starts at zero) and every other variable not at all. Measured: at most
6e-7 of the expected change, on 1 and on 2 replicas; a missing or doubled L2 term is off by 100%.

Mirroring over 2 logical CPUs must be set up before TensorFlow initialises, so the steps
run in one subprocess (this file run as a script), which writes the results to an .npz.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, write_train_config

BATCH, CLASSES, LR, L2 = 8, 4, 0.5, 0.2  # -lr * l2 = -0.1: the L2 step is a tenth of every kernel
TOLERANCE = 1e-5                         # of the largest expected change in a variable (measured 6e-7)


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("steps") / "steps.npz")
    result = subprocess.run([sys.executable, "-m", "tests.test_trainer_step", out], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(out))


def kernel_names(steps):
    return [k.split("/", 1)[1] for k in steps if k.startswith("kernel/")]


def expected_kernels(stage_blocks):
    """The stem, 3 convolutions per bottleneck block, each stage's projection shortcut, the head: 54 for
    ResNet-50's 3, 4, 6, 3 blocks, 18 for the tests' 1, 1, 1, 1."""
    return 1 + sum(3 * int(blocks) + 1 for blocks in stage_blocks) + 1


@pytest.mark.parametrize("strategy", ["one_device", "mirrored"])
def test_the_training_step_applies_weight_decay_to_every_kernel_once(steps, strategy):
    assert int(steps[f"{strategy}/replicas"]) == (1 if strategy == "one_device" else 2)
    names = [k.split("/", 2)[2] for k in steps if k.startswith(f"{strategy}/after/")]
    kernels = set(kernel_names(steps))
    assert len(steps["stage_blocks"]) == 4  # ResNet-50's stages conv2..conv5
    assert len(kernels) == expected_kernels(steps["stage_blocks"]) and kernels < set(names)
    for name in names:
        before, after = steps[f"decay_init/{name}"], steps[f"{strategy}/after/{name}"]
        if name == steps["head_bias"]:  # the only variable the loss reaches here
            continue
        expected = -LR * L2 * before if name in kernels else np.zeros_like(before)
        scale = max(float(np.abs(expected).max()), 1e-3)
        assert np.abs((after - before) - expected).max() <= TOLERANCE * scale, name


def test_the_weight_decay_step_is_the_same_on_one_and_two_replicas(steps):
    for name in kernel_names(steps):
        single = steps[f"one_device/after/{name}"] - steps[f"decay_init/{name}"]
        mirrored = steps[f"mirrored/after/{name}"] - steps[f"decay_init/{name}"]
        scale = float(np.abs(single).max())
        assert scale > 0 and np.abs(mirrored - single).max() <= TOLERANCE * scale, name


def test_a_data_step_on_two_replicas_equals_the_one_device_step(steps):
    """Mirrored on 2 logical CPUs: each replica's rows, the cross-entropy over the global batch (a mean of
    per-replica means summed is 100% off, a mean instead of a sum of gradients 50%) and synchronised batch
    moments; only float rounding differs. Tolerance: the change agrees to 1% overall and each variable's to
    5% of its size + 1e-5."""
    diff2 = size2 = 0.0
    bad = {}
    for key in (k for k in steps if k.startswith("mirrored/data/")):
        name = key.split("/", 2)[2]
        single = steps[f"lighting/on/{name}"] - steps[f"init/{name}"]
        mirrored = steps[key] - steps[f"init/{name}"]
        d, s = float(np.linalg.norm(mirrored - single)), float(np.linalg.norm(single))
        diff2, size2 = diff2 + d * d, size2 + s * s
        if d > 0.05 * s + 1e-5:
            bad[name] = (d, s)
    assert size2 > 0 and not bad, bad
    assert np.sqrt(diff2 / size2) <= 0.01, np.sqrt(diff2 / size2)


def test_the_lighting_coefficients_change_the_update(steps):
    moved = [float(np.abs(steps[f"lighting/on/{n}"] - steps[f"lighting/off/{n}"]).max()) for n in kernel_names(steps)]
    assert max(moved) > 1e-3, max(moved)  # measured 0.8 at this learning rate


def test_the_network_receives_the_device_function_of_the_batch_lighting(steps):
    seen, expected, unlit = steps["lighting/seen"], steps["lighting/expected"], steps["lighting/unlit"]
    assert np.abs(expected - unlit).max() > 0.05  # the shift is visible at this batch's pca_std (measured 0.44)
    np.testing.assert_allclose(seen, expected, rtol=0, atol=1e-5)  # measured 5e-6: float32 eigh


# ----------------------------------------------------------------------------
# The subprocess: real Trainers on a fixed batch
# ----------------------------------------------------------------------------

class OneBatchReader:
    batches_per_epoch = 1


def _trainer(folder, data, distribute):
    from settings import load_settings
    from engine.trainer import Trainer
    config = write_train_config(folder, data, train={"distribute": distribute, "deterministic": "false"},
                                l2={"l2_penalty": str(L2)}, batch_renorm={"sync_replicas": "true"})
    run = os.path.join(folder, "run")
    os.makedirs(run, exist_ok=True)
    return Trainer(load_settings(config).with_classes(CLASSES, "test"), OneBatchReader(), run, BATCH)


def _variables(trainer):
    variables = {v.name: v for v in trainer.net.trainable_variables}
    assert len(variables) == len(trainer.net.trainable_variables)
    return variables


def _step(trainer, init, batch, lighting):
    """One step from `init` with fresh momentum slots (the first step moves w by exactly -lr * g)."""
    import tensorflow as tf
    for name, v in _variables(trainer).items():
        v.assign(init[name])
    for v in trainer.optimizer.variables:
        if tf.as_dtype(v.dtype).is_floating:
            v.assign(tf.zeros_like(v))
    images, labels = batch
    trainer._train_step(tf.constant(images), tf.constant(labels), tf.constant(lighting), tf.constant(LR))
    return {name: v.numpy() for name, v in _variables(trainer).items()}


def _record_inputs(net, shape):
    """Make `net` (this one instance) copy every input it is called with into a variable."""
    import tensorflow as tf
    seen = tf.Variable(tf.zeros(shape), trainable=False)
    base = type(net)

    class Recording(base):
        def __call__(self, images, training=False):
            seen.assign(tf.cast(images, tf.float32))
            return base.__call__(self, images, training=training)

    net.__class__ = Recording
    return seen


def main(out):
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tempfile
    from model.preprocessing import to_model_input
    rng = np.random.default_rng(0)
    crop = 32
    batch = (rng.integers(0, 256, (BATCH, crop, crop, 3), dtype=np.uint8),
             np.arange(BATCH, dtype=np.int32) % CLASSES)
    no_lighting = np.zeros((BATCH, 3), np.float32)
    lighting = rng.normal(0.0, 0.1, (BATCH, 3)).astype(np.float32)  # [images] pca_std = 0.1
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")  # only named by the config: the fake reader reads nothing
        single = _trainer(os.path.join(tmp, "one_device"), data, "one_device")
        seen = _record_inputs(single.net, (BATCH, crop, crop, 3))  # before the step's first trace
        init = {name: v.numpy() for name, v in _variables(single).items()}
        results.update({f"kernel/{v.name}": np.zeros(()) for v in single.net.kernels()})
        stages = [name.split("_")[0] for name in single.net.block_order]  # conv2_block1 -> conv2
        results["stage_blocks"] = np.array([stages.count(s) for s in sorted(set(stages))])
        last = single.net.blocks[single.net.block_order[-1]].brn3
        results["head_bias"] = np.array(single.net.head.bias.name)
        decay_init = dict(init, **{last.beta.name: np.full(last.beta.shape, -1000.0, np.float32)})
        results.update({f"decay_init/{name}": value for name, value in decay_init.items()})
        mirrored = _trainer(os.path.join(tmp, "mirrored"), data, "mirrored")
        for name, trainer in (("one_device", single), ("mirrored", mirrored)):
            results[f"{name}/replicas"] = np.array(trainer.replicas)
            results.update({f"{name}/after/{n}": v for n, v in _step(trainer, decay_init, batch, no_lighting).items()})
        # The lighting: the same batch with the coefficients of pca_std = 0 and of 0.1 (the same traced step).
        results.update({f"lighting/off/{n}": v for n, v in _step(single, init, batch, no_lighting).items()})
        results.update({f"lighting/on/{n}": v for n, v in _step(single, init, batch, lighting).items()})
        # The same data step on 2 replicas: each takes 4 rows, batch moments synchronised.
        results.update({f"mirrored/data/{n}": v for n, v in _step(mirrored, init, batch, lighting).items()})
        results.update({f"init/{name}": value for name, value in init.items()})
        results["lighting/seen"] = seen.numpy()
        results["lighting/expected"] = to_model_input(batch[0], lighting, single.mu, single.sigma).numpy()
        results["lighting/unlit"] = to_model_input(batch[0], None, single.mu, single.sigma).numpy()
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
