"""Seed 002's augmentations (data/transforms/tiny_augment.py): where a marker lands, fill modes, draw frequencies."""
import dataclasses
import math

import numpy as np
import pytest

from data.transforms import tiny_augment as ta


def marker(h, w, y, x, value=255):
    img = np.zeros((h, w, 3), np.uint8)
    img[y, x] = value
    return img


def bright(img):
    return [tuple(p) for p in np.argwhere(img[..., 0] > 0)]


def centroid(img):
    weights = img[..., 0].astype(np.float64)
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return (weights * yy).sum() / weights.sum(), (weights * xx).sum() / weights.sum()


def test_flips():
    img = marker(5, 7, 1, 2)
    assert bright(ta.hflip(img)) == [(1, 4)]
    assert bright(ta.vflip(img)) == [(3, 2)]


def test_rotation_is_clockwise_about_the_centre():
    img = marker(9, 9, 1, 4)                                   # top centre
    assert bright(ta.affine(img, rotate=90, order=0)) == [(4, 7)]   # -> right centre
    assert bright(ta.affine(img, rotate=-90, order=0)) == [(4, 1)]
    assert bright(ta.affine(img, rotate=180, order=0)) == [(7, 4)]


def test_translation_scale_and_shear_move_the_marker_as_the_matrix_says():
    img = marker(11, 11, 3, 6)
    assert bright(ta.affine(img, translate_px=(2, -1), order=0)) == [(2, 8)]
    # scale 2 about the centre (5, 5): offset (+1, -2) becomes (+2, -4); the marker grows to 2x2.
    assert (1, 7) in bright(ta.affine(img, scale=(2.0, 2.0), order=0))
    # shear 16 degrees: offset (dx, dy) = (1, -2) from the centre goes to (dx - sin(s) dy, cos(s) dy).
    s16 = math.radians(16.0)
    expected = (5 + math.cos(s16) * -2, 5 + 1 + 2 * math.sin(s16))           # (y, x)
    y, x = (ta.affine_matrix(11, 11, shear=16.0) @ np.array([6.0, 3.0, 1.0]))[[1, 0]]
    assert (y, x) == pytest.approx(expected)
    assert centroid(ta.affine(img, shear=16.0, order=1)) == pytest.approx(expected, abs=0.35)


def test_bilinear_identity_and_constant_fill():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for order in (0, 1):
        np.testing.assert_array_equal(ta.affine(img, order=order), img)
    shifted = ta.affine(img, translate_px=(3, 0), order=1, mode="constant", cval=77)
    assert (shifted[:, :3] == 77).all()
    np.testing.assert_array_equal(shifted[:, 3:], img[:, :-3])


@pytest.mark.parametrize("mode", ["edge", "symmetric", "reflect", "wrap"])
def test_fill_modes_match_numpy_pad(mode):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    out = ta.affine(img, translate_px=(3, 2), order=0, mode=mode)
    padded = np.pad(img, ((2, 0), (3, 0), (0, 0)), mode=mode)
    np.testing.assert_array_equal(out, padded[:6, :8])


def test_crop_and_pad_geometry():
    img = marker(32, 32, 10, 12)
    same_size = ta.crop_and_pad(img, top=0, right=-8, bottom=0, left=8)   # pad 8 left, crop 8 right
    assert bright(same_size) == [(10, 20)]
    block = np.zeros((40, 40, 3), np.uint8)
    block[14:17, 22:25] = 255                                              # centre (15, 23)
    out = ta.crop_and_pad(block, top=-4, right=8, bottom=0, left=0)       # 36 rows -> 40, 48 cols -> 40
    cy, cx = centroid(out)
    assert cy == pytest.approx((15 - 4 + 0.5) * 40 / 36 - 0.5, abs=0.3)
    assert cx == pytest.approx((23 + 0.5) * 40 / 48 - 0.5, abs=0.3)
    padded = ta.crop_and_pad(np.full((4, 4, 3), 9, np.uint8), 2, 2, 2, 2, mode="constant", cval=200)
    assert padded.shape == (4, 4, 3) and padded[0, 0, 0] > 150 and padded[2, 2, 0] < 60


def test_gaussian_blur_keeps_the_centre_and_spreads_by_sigma():
    img = marker(41, 41, 20, 20)
    for sigma in (0.7, 1.5, 2.0):
        k = ta.gaussian_kernel(sigma)
        assert k.sum() == pytest.approx(1.0)
        assert (k * (np.arange(len(k)) - len(k) // 2) ** 2).sum() == pytest.approx(sigma ** 2, rel=0.02)
        out = ta.gaussian_blur(img, sigma)
        assert centroid(out) == pytest.approx((20, 20), abs=0.05)
    np.testing.assert_array_equal(ta.gaussian_blur(img, 0.005), img)


def test_coarse_dropout_zeroes_whole_cells():
    img = np.full((64, 64, 3), 200, np.uint8)
    keep = np.ones((4, 4, 1), bool)
    keep[1, 2] = False
    out = ta.coarse_dropout(img, keep)
    assert (out[16:32, 32:48] == 0).all() and (out == 0).sum() == 16 * 16 * 3
    per_channel = np.ones((4, 4, 3), bool)
    per_channel[0, 0, 1] = False
    out = ta.coarse_dropout(img, per_channel)
    assert (out[:16, :16, 1] == 0).all() and (out[:16, :16, [0, 2]] == 200).all()


def test_draws_are_per_image_deterministic():
    img = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a = ta.augment(img, ta.image_rng(0, 3, 17))
    np.testing.assert_array_equal(a, ta.augment(img, ta.image_rng(0, 3, 17)))
    assert a.shape == img.shape and a.dtype == np.uint8
    assert any(not np.array_equal(a, ta.augment(img, ta.image_rng(0, 3, p))) for p in range(18, 22))


def test_flip_frequencies():
    only_flips = ta.TinyAugmentConfig(sometimes=0.0)
    img = marker(8, 8, 1, 2)
    seen = [bright(ta.augment(img, ta.image_rng(5, 0, p), only_flips))[0] for p in range(600)]
    h = np.mean([x == 5 for _, x in seen])
    v = np.mean([y == 6 for y, _ in seen])
    assert h == pytest.approx(0.5, abs=0.07) and v == pytest.approx(0.2, abs=0.05)


def test_only_dropout_left_drops_the_expected_fraction():
    # Every other augmenter set to the identity: what remains is Sometimes(0.5, CoarseDropout(3-15%)).
    identity = ta.TinyAugmentConfig(hflip=0.0, vflip=0.0, blur_sigma_max=0.0, crop_pad_min=0.0, crop_pad_max=0.0,
                                    scale_min=1.0, scale_max=1.0, translate=0.0, rotate=0.0, shear=0.0)
    img = np.full((64, 64, 3), 255, np.uint8)
    dropped = [1.0 - ta.augment(img, ta.image_rng(1, 0, p), identity).mean() / 255 for p in range(400)]
    assert np.mean(dropped) == pytest.approx(0.5 * 0.09, abs=0.012)
    assert max(dropped) < 0.5


def test_random_crop_and_config():
    img = np.arange(64 * 64 * 3, dtype=np.int64).reshape(64, 64, 3).astype(np.uint8)
    np.testing.assert_array_equal(ta.random_crop(img, 64, np.random.default_rng(0)), img)
    corners = {ta.random_crop(img, 32, np.random.default_rng(s))[0, 0, 0] for s in range(50)}
    assert len(corners) > 10
    with pytest.raises(ValueError, match="exceeds"):
        ta.random_crop(img, 65, np.random.default_rng(0))
    section = dataclasses.replace(ta.TinyAugmentConfig(), rotate=10.0)  # any dataclass with its fields
    assert ta.TinyAugmentConfig.from_settings_section(section).rotate == 10.0
    with pytest.raises(ValueError, match="scale_min"):
        ta.TinyAugmentConfig(scale_min=2.0, scale_max=1.0)
