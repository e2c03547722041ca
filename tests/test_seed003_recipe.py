"""configs/seed003_recipe.txt: seed 003's hyperparameters and its step schedule's boundary semantics."""
import os

import numpy as np
import pytest

from settings import load_settings
from data.transforms.inception_crop import mean_only_mu_sigma
from engine import schedules

PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "seed003_recipe.txt")
BOUNDARIES = (150136, 300273, 400364, 450410)  # int(5004.56 batches per epoch x 30, 60, 80, 90)
RATES = (0.1, 0.01, 0.001, 1e-4, 1e-5)
STEPS_PER_EPOCH = 1281167 // 256


@pytest.fixture(scope="module")
def cfg():
    return load_settings(PRESET)


def test_the_rate_drops_after_each_boundary_step(cfg):
    schedule = schedules.from_config(cfg.schedule, STEPS_PER_EPOCH, epoch_end=100)
    assert schedule(0) == pytest.approx(0.1)
    for boundary, before, after in zip(BOUNDARIES, RATES, RATES[1:]):
        assert schedule(boundary - 1) == pytest.approx(before)
        assert schedule(boundary) == pytest.approx(before)  # piecewise_constant: value i while step <= boundary i
        assert schedule(boundary + 1) == pytest.approx(after)
    assert schedule(100 * STEPS_PER_EPOCH) == pytest.approx(1e-5)


def test_same_values_as_tensorflow_piecewise_constant(cfg):
    tf = pytest.importorskip("tensorflow")
    schedule = schedules.from_config(cfg.schedule, STEPS_PER_EPOCH, epoch_end=100)
    steps = sorted({0, *BOUNDARIES, *(b + 1 for b in BOUNDARIES), *(b - 1 for b in BOUNDARIES), 500400})
    for step in steps:
        theirs = tf.compat.v1.train.piecewise_constant(tf.constant(step, tf.int64), list(BOUNDARIES), list(RATES))
        assert schedule(step) == pytest.approx(float(theirs() if callable(theirs) else theirs), rel=1e-6)
    keras = schedule.keras()
    assert [float(keras(b + 1)) for b in BOUNDARIES] == pytest.approx(RATES[1:], rel=1e-6)


def test_preset_holds_seed_003_hyperparameters(cfg):
    assert cfg.data.source == "tfrecord" and cfg.images.augmentation == "inception"
    assert cfg.train.optimizer == "sgd" and cfg.train.sgd_momentum == 0.9 and cfg.l2.l2_penalty == 1e-4
    assert cfg.images.crop_size == 224 and cfg.images.eval_resize == 256 and cfg.images.pca_std == 0.0
    assert cfg.schedule.type == "step" and cfg.schedule.boundaries_unit == "steps" and cfg.schedule.base_lr == 0.1
    mu, sigma = cfg.mu, cfg.sigma
    assert np.allclose(mu, mean_only_mu_sigma()[0], atol=1e-12) and np.allclose(sigma, mean_only_mu_sigma()[1])
    assert cfg.batch_renorm.rmax_max == 1.0 and cfg.batch_renorm.dmax_max == 0.0  # plain batch norm
    assert cfg.batch_renorm.moving_avgs_momentum == 0.997


def test_model_outputs_follow_the_shards_label_offset(cfg):
    from model import model_kwargs
    assert cfg.model.num_classes == 0
    assert model_kwargs(cfg.with_classes(1001, "test"))["num_classes"] == 1001  # labels 1..1000 plus background 0
    assert model_kwargs(cfg.with_classes(1000, "test"))["num_classes"] == 1000
