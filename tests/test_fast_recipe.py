"""configs/fast_recipe.txt: FFCV's 16-epoch ResNet-50 recipe (ffcv-imagenet rn50_16_epochs.yaml) for one GPU."""
import os

import numpy as np
import pytest

from settings import load_settings
from engine import schedules


PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "fast_recipe.txt")
STEPS_PER_EPOCH = 1281167 // 256


@pytest.fixture(scope="module")
def cfg():
    return load_settings(PRESET)


def ffcv_resolution(epoch, min_res=160, max_res=192, start_ramp=11, end_ramp=13):
    """ffcv-imagenet's get_resolution."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


def test_the_training_crop_follows_ffcvs_resolution_ramp(cfg):
    schedule = cfg.crop_sizes
    for epoch in range(16):
        crop = [c for first, c in schedule if first <= epoch][-1]
        assert crop == ffcv_resolution(epoch), epoch
    assert (cfg.images.crop_size, cfg.images.eval_resize) == (224, 256)


def test_the_rate_is_ffcvs_linear_ramp_up_to_epoch_2_and_down_to_0_at_16(cfg):
    schedule = schedules.from_config(cfg.schedule, STEPS_PER_EPOCH, epoch_end=16)
    steps = np.arange(0, 16 * STEPS_PER_EPOCH + 1, 997)
    expected = np.interp(steps, [0, 2 * STEPS_PER_EPOCH, 16 * STEPS_PER_EPOCH], [1e-5, 0.1, 0.0])
    np.testing.assert_allclose([schedule(s) for s in steps], expected, rtol=1e-6, atol=1e-12)


def test_label_smoothing_on_and_ema_and_mixing_off_as_ffcv(cfg):
    t = cfg.train
    assert (t.label_smoothing, t.ema_decay, t.mixup_alpha, t.cutmix_alpha) == (0.1, 0.0, 0.0, 0.0)
    assert cfg.l2.l2_penalty == 1e-4 and t.sgd_momentum == 0.9
