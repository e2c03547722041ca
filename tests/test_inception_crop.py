"""Seed 003's distorted-box crop: sampler constraints, TF parity in distribution, window decoding, determinism."""
import io

import numpy as np
import pytest
from PIL import Image

from data.transforms import images
from data.transforms import inception_crop as ic
from data.transforms.jpeg_window import resample_window
from data.sources.tfrecord import ImageRecord

DRAWS = 3000


def draw(width, height, boxes=None, n=DRAWS, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return np.asarray([ic.sample_distorted_bounding_box(rng, width, height, boxes, **kw) for _ in range(n)])


def check_geometry(crops, width, height):
    x, y, w, h = crops.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= width).all() and (y + h <= height).all()
    full = (w == width) & (h == height)
    area = (w * h / (width * height))[~full]
    assert area.min() >= ic.AREA_RANGE[0] and area.max() <= ic.AREA_RANGE[1]
    # The width is round(h * aspect): the aspect is in range up to half a pixel per side.
    aspect = (w / h)[~full]
    slack = 0.5 / h[~full] + 1e-6
    assert (aspect >= ic.ASPECT_RATIO_RANGE[0] - slack).all() and (aspect <= ic.ASPECT_RATIO_RANGE[1] + slack).all()
    return area


@pytest.mark.parametrize("width,height", [(500, 375), (333, 500), (64, 48)])
def test_without_boxes_the_crop_covers_a_tenth_of_the_image(width, height):
    crops = draw(width, height)
    area = check_geometry(crops, width, height)
    assert area.min() >= ic.MIN_OBJECT_COVERED  # the whole image is the one box to cover
    assert area.max() > 0.8 and np.median(area) < 0.7  # spread over the range


def test_a_given_box_is_covered_at_least_min_object_covered():
    width, height = 400, 300
    box = np.array([[0.1, 0.6, 0.4, 0.9]], np.float32)  # ymin, xmin, ymax, xmax: top-right corner
    crops = draw(width, height, box)
    area = check_geometry(crops, width, height)
    x0, y0, x1, y1 = 0.6 * width, 0.1 * height, 0.9 * width, 0.4 * height
    x, y, w, h = crops.T.astype(float)
    overlap = np.clip(np.minimum(x + w, x1) - np.maximum(x, x0), 0, None) * \
        np.clip(np.minimum(y + h, y1) - np.maximum(y, y0), 0, None)
    assert (overlap / ((x1 - x0) * (y1 - y0)) >= ic.MIN_OBJECT_COVERED - 1e-9).all()
    assert area.min() < ic.MIN_OBJECT_COVERED  # small crops are allowed when they sit on the box
    assert np.mean(x + w / 2 > width / 2) > 0.6  # and the crops lean towards it


def test_impossible_constraints_fall_back_to_the_whole_image():
    tiny = np.array([[0.0, 0.0, 0.001, 0.001]], np.float32)  # under one pixel: no crop can cover it
    crops = draw(300, 200, tiny, n=50)
    assert (crops == [0, 0, 300, 200]).all()


def test_distribution_matches_tensorflow_sample_distorted_bounding_box():
    tf = pytest.importorskip("tensorflow")
    width, height, n = 500, 375, 1500
    ours = draw(width, height, n=n)
    boxes = tf.zeros([1, 0, 4])
    theirs = []
    for i in range(n):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [height, width, 3], boxes, seed=[i, 7], min_object_covered=0.1, aspect_ratio_range=ic.ASPECT_RATIO_RANGE,
            area_range=ic.AREA_RANGE, max_attempts=ic.MAX_ATTEMPTS, use_image_if_no_bounding_boxes=True)
        theirs.append([int(begin[1]), int(begin[0]), int(size[1]), int(size[0])])
    theirs = np.asarray(theirs)
    for stat in (lambda c: c[:, 2] * c[:, 3] / (width * height), lambda c: c[:, 2] / c[:, 3],
                 lambda c: (c[:, 0] + c[:, 2] / 2) / width):
        a, b = stat(ours), stat(theirs)
        # Same distribution: quartiles agree within sampling noise (n = 1500 each).
        assert np.allclose(np.percentile(a, [25, 50, 75]), np.percentile(b, [25, 50, 75]), atol=0.04, rtol=0.04)


def jpeg(tmp_path, width, height, name="img.JPEG"):
    rng = np.random.default_rng(width * height)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx % 256, yy % 256, (xx * yy) % 256], -1) + rng.integers(0, 30, (height, width, 3))
    path = tmp_path / name
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=95)
    return str(path)


def test_window_resize_equals_full_decode_then_crop(tmp_path):
    path = jpeg(tmp_path, 120, 90)  # windows smaller than 2 x crop: no DCT scaling, so exact
    for position in range(5):
        rng = ic.image_rng(3, 1, position)
        out = ic.inception_crop(path, 64, rng)
        rng = ic.image_rng(3, 1, position)
        x, y, w, h = ic.sample_distorted_bounding_box(rng, 120, 90)
        want = np.asarray(resample_window(images.decode_rgb(path), (x, y, x + w, y + h), 64))
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and np.array_equal(out, want)


def test_large_windows_decode_reduced_and_stay_close(tmp_path):
    path = jpeg(tmp_path, 640, 480)
    rng = ic.image_rng(0, 0, 0)
    out = ic.inception_crop(path, 32, rng)  # window >= 64 px: DCT-reduced decode
    rng = ic.image_rng(0, 0, 0)
    x, y, w, h = ic.sample_distorted_bounding_box(rng, 640, 480)
    want = np.asarray(resample_window(images.decode_rgb(path), (x, y, x + w, y + h), 32))
    assert np.abs(out.astype(int) - want).mean() < 6


def test_augment_is_deterministic_per_position_and_flips(tmp_path):
    path = jpeg(tmp_path, 100, 80)
    a = ic.augment(path, 48, seed=1, epoch=2, position=3)
    assert np.array_equal(a, ic.augment(path, 48, seed=1, epoch=2, position=3))
    assert not np.array_equal(a, ic.augment(path, 48, seed=1, epoch=3, position=3))
    flips = []
    for position in range(12):
        rng = ic.image_rng(1, 2, position)
        flip = rng.random() < 0.5
        plain = ic.inception_crop(path, 48, rng)
        out = ic.augment(path, 48, seed=1, epoch=2, position=position)
        assert np.array_equal(out, plain[:, ::-1] if flip else plain)
        flips.append(flip)
    assert 0 < sum(flips) < 12


def test_record_boxes_reach_the_sampler(tmp_path, monkeypatch):
    path = jpeg(tmp_path, 90, 60)
    with open(path, "rb") as f:
        data = f.read()
    boxes = np.array([[0.1, 0.2, 0.5, 0.6]], np.float32)

    class Ref:
        def read_record(self):
            return ImageRecord(encoded=data, label=1, boxes=boxes)

    seen = []
    real = ic.sample_distorted_bounding_box
    monkeypatch.setattr(ic, "sample_distorted_bounding_box", lambda rng, w, h, b: seen.append((w, h, b)) or real(rng, w, h, b))
    out = ic.inception_crop(Ref(), 16, ic.image_rng(0, 0, 0))
    assert out.shape == (16, 16, 3) and seen[0][:2] == (90, 60) and np.array_equal(seen[0][2], boxes)


def test_odd_files_and_unreadable_files(tmp_path):
    img = Image.fromarray(np.full((40, 50, 3), 90, np.uint8))
    png = tmp_path / "png.JPEG"
    img.save(png, "PNG")
    out = ic.inception_crop(str(png), 16, ic.image_rng(0, 0, 0))
    assert (out == 90).all()
    bad = tmp_path / "bad.JPEG"
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    bad.write_bytes(buf.getvalue()[:200])
    with pytest.raises(images.BadImageError):
        ic.inception_crop(str(bad), 16, ic.image_rng(0, 0, 0))
    with pytest.raises(images.BadImageError):
        ic.inception_crop(str(tmp_path / "missing.JPEG"), 16, ic.image_rng(0, 0, 0))


def test_mean_only_normalisation_is_x_minus_mean():
    mu, sigma = ic.mean_only_mu_sigma()
    x = np.arange(256, dtype=np.float64)[:, None] * np.ones(3)
    assert np.allclose((x / 255 - np.asarray(mu)) / np.asarray(sigma), x - np.asarray(ic.MEAN_RGB), atol=1e-9)
