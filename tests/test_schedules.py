"""The learning-rate schedules: each [schedule] type, warmup, boundaries in epochs or steps, and their refusals."""
import types

import numpy as np
import pytest

from engine import schedules
from engine.schedules import Schedule
from utils.errors import UserError
from utils.schema import SCHEMA


def section(**overrides):
    values = {name: key.default for name, key in SCHEMA["schedule"].items()}
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_constant():
    s = Schedule("constant", 0.01)
    assert [s(k) for k in (0, 1, 10**6)] == pytest.approx([0.01] * 3)


def test_seed_003_step_decay_drops_after_each_boundary():
    # TF official ResNet: piecewise_constant, value i while global_step <= boundary i.
    s = schedules.from_config(section(type="step", base_lr=0.1, boundaries=(150000, 300000, 400000, 450000),
                                      boundaries_unit="steps", factors=(0.1,)), steps_per_epoch=5004, epoch_end=100)
    expected = {0: 0.1, 150000: 0.1, 150001: 0.01, 300000: 0.01, 300001: 1e-3,
                400000: 1e-3, 400001: 1e-4, 450000: 1e-4, 450001: 1e-5, 500000: 1e-5}
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr, rel=1e-9), step


def test_step_decay_in_epochs_starts_with_the_epochs_first_step():
    s = schedules.from_config(section(type="step", base_lr=1.0, boundaries=(3, 5), factors=(0.5, 0.1)),
                              steps_per_epoch=10, epoch_end=8)
    assert [s(k) for k in (0, 29, 30, 49, 50, 79)] == pytest.approx([1, 1, 0.5, 0.5, 0.05, 0.05])


def test_linear_warmup_composes():
    s = schedules.from_config(section(type="step", base_lr=0.4, boundaries=(1,), factors=(0.1,),
                                      warmup_epochs=2, warmup_start_factor=0.25), steps_per_epoch=10, epoch_end=4)
    # step 10 is already past the epoch-1 boundary: warmup multiplies the decayed rate.
    assert [s(k) for k in (0, 5, 9, 10, 20, 30)] == pytest.approx(
        [0.1, 0.4 * (0.25 + 0.75 * 0.25), 0.4 * (0.25 + 0.75 * 0.45), 0.04 * (0.25 + 0.75 * 0.5), 0.04, 0.04])


def test_cosine():
    s = schedules.from_config(section(type="cosine", base_lr=1.0, final_factor=0.1, total_epochs=10),
                              steps_per_epoch=100, epoch_end=3)  # total_epochs wins over --epoch_end
    assert s.total_steps == 1000
    assert [s(k) for k in (0, 500, 1000, 2000)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert s(250) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)))


def reference_one_cycle(iteration, max_lr, num_iterations, end_percentage, scale):
    """titu1994/keras-one-cycle OneCycleLR.compute_lr, transcribed (seed 002's callback)."""
    mid_cycle_id = int(num_iterations * (1. - end_percentage) / 2.)
    if iteration > 2 * mid_cycle_id:
        p = (iteration - 2 * mid_cycle_id) / float(num_iterations - 2 * mid_cycle_id)
        return max_lr * (1. + (p * (1. - 100.) / 100.)) * scale
    if iteration > mid_cycle_id:
        p = 1. - (iteration - mid_cycle_id) / mid_cycle_id
        return max_lr * (1. + p * (scale * 100 - 1.)) * scale
    p = iteration / mid_cycle_id
    return max_lr * (1. + p * (scale * 100 - 1.)) * scale


@pytest.mark.parametrize("end", [0.2, 0.3, 0.7])
def test_one_cycle_matches_seed_002_reference(end):
    steps_per_epoch, epochs = 781, 20  # 100000 // 128 images, run 11 of the seed's log
    s = schedules.from_config(section(type="onecycle", base_lr=5e-4, onecycle_end_percentage=end),
                              steps_per_epoch=steps_per_epoch, epoch_end=epochs)
    n = steps_per_epoch * epochs
    steps = np.arange(n + 1)
    ours = s.value(steps)
    ref = np.array([reference_one_cycle(k, 5e-4, n, end, 0.1) for k in steps])
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-15)
    mid = int(n * (1 - end) / 2)
    assert ours[0] == pytest.approx(5e-5) and ours[mid] == pytest.approx(5e-4)
    assert ours[2 * mid] == pytest.approx(5e-5) and ours[n] == pytest.approx(5e-7)


def test_keras_schedule_equals_numpy_inside_tf_function():
    tf = pytest.importorskip("tensorflow")
    s = schedules.from_config(section(type="onecycle", base_lr=0.1, warmup_epochs=1),
                              steps_per_epoch=7, epoch_end=5)
    ks = s.keras()
    steps = np.array([0, 3, 7, 13, 14, 20, 28, 34, 35, 50])
    graph_values = tf.function(lambda k: tf.stack([ks(k[i]) for i in range(len(steps))]))(tf.constant(steps))
    np.testing.assert_allclose(graph_values.numpy(), s.value(steps), rtol=1e-6)
    step_decay = schedules.from_config(section(type="step", base_lr=0.1, boundaries=(1,)), 10, 3).keras()
    assert float(step_decay(tf.constant(9, tf.int64))) == pytest.approx(0.1)
    assert float(step_decay(tf.constant(10, tf.int64))) == pytest.approx(0.01)


def test_learning_rate_flag_means_constant_for_this_invocation():
    s = schedules.from_config(section(type="step", base_lr=0.1, boundaries=(1,)), 10, 3, learning_rate=0.003)
    assert s.kind == "constant" and s(0) == s(10**5) == pytest.approx(0.003)
    with pytest.raises(UserError, match="--learning_rate"):
        schedules.from_config(section(), 10, 3, learning_rate=0.0)


def test_config_errors_are_one_sentence():
    with pytest.raises(UserError, match="factors"):
        schedules.from_config(section(type="step", boundaries=(1, 2, 3), factors=(0.1, 0.2)), 10, 5)
    with pytest.raises(UserError, match="boundaries must increase"):
        schedules.from_config(section(type="step", boundaries=(3, 2)), 10, 5)
    with pytest.raises(UserError, match="total_epochs"):
        schedules.from_config(section(type="cosine"), 10, 0)


def test_linear_holds_base_lr_through_the_warmup_then_falls_in_a_straight_line():
    s = schedules.from_config(section(type="linear", base_lr=0.4, warmup_epochs=2, warmup_start_factor=0.25,
                                      total_epochs=10, final_factor=0.1), steps_per_epoch=10, epoch_end=10)
    steps = np.arange(0, 121)
    expected = np.interp(steps, [0, 20, 100], [0.1, 0.4, 0.04])
    np.testing.assert_allclose([s(k) for k in steps], expected, rtol=1e-12)


def preset_schedule(preset, batch_size, accumulation_steps=1, learning_rate=None):
    """The preset's schedule as train.py builds it, at this batch and accumulation (no TensorFlow)."""
    import dataclasses
    import os
    from settings import load_settings
    from tests.helpers import ROOT
    settings = load_settings(os.path.join(ROOT, preset), stats=False, decoder=False, devices=False,
                             batch_size=batch_size)
    settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train,
                                                                       accumulation_steps=accumulation_steps))
    return schedules.from_settings(settings, steps_per_epoch=100, epoch_end=16, learning_rate=learning_rate)


@pytest.mark.parametrize("preset", ["config.txt", "configs/fast_recipe.txt", "configs/seed003_recipe.txt",
                                    "configs/demo.txt"])
def test_every_preset_rate_follows_the_effective_batch_128_512_and_128_x4(preset):
    at_128, at_512, at_128x4 = (preset_schedule(preset, 128), preset_schedule(preset, 512),
                                preset_schedule(preset, 128, accumulation_steps=4))
    assert at_512.base_lr == pytest.approx(4 * at_128.base_lr, rel=1e-12)
    assert at_128x4.base_lr == at_512.base_lr
    steps = np.arange(0, 1600, 37)  # warm-up included: every rate of the schedule scales
    np.testing.assert_allclose(at_512.value(steps), 4 * at_128.value(steps), rtol=1e-12)
    assert "effective batch 512 / reference_batch" in at_128x4.describe()


def test_fast_recipe_states_its_reference_batch_and_gives_0_1_at_256():
    s = preset_schedule("configs/fast_recipe.txt", 256)
    assert s.base_lr == pytest.approx(0.1) and "reference_batch 256" in s.describe()


def test_learning_rate_flag_is_a_constant_as_written_whatever_the_batch():
    assert preset_schedule("configs/fast_recipe.txt", 512, learning_rate=0.003)(0) == pytest.approx(0.003)


def test_reference_batch_0_uses_base_lr_as_written():
    s = schedules.from_config(section(base_lr=0.3), 10, 3, effective_batch=1024)
    assert s(0) == pytest.approx(0.3) and "reference_batch" not in s.describe()
