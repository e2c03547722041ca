"""The Tiny ImageNet recipe's training augmentation (imgaug in the original) in numpy and PIL, plus its random crop.

The seed's pipeline, per training image (`training_crop`):
  1. load at full size (64x64; other sizes are resized to full x full, as Keras' target_size did);
  2. imgaug Sequential(random_order=True) of six augmenters, in a random order per image:
       Fliplr(hflip)                       horizontal flip with probability hflip (0.5)
       Flipud(vflip)                       vertical flip with probability vflip (0.2)
       Sometimes(p, GaussianBlur)          sigma ~ U(0, blur_sigma_max = 2)
       Sometimes(p, CropAndPad)            each side ~ U(crop_pad_min, crop_pad_max) = U(-10%, +20%) of its
                                           axis (negative crops), pad mode random among numpy's ten
                                           (constant/linear_ramp use a random 0-255 value), resized back
       Sometimes(p, Affine)                scale x, y ~ U(0.8, 1.5) each; translate x, y ~ U(-20%, +20%);
                                           rotate ~ U(-45, 45) degrees; shear ~ U(-16, 16) degrees; nearest or
                                           bilinear; fill mode random among constant (random 0-255), edge,
                                           symmetric, reflect, wrap
       Sometimes(p, CoarseDropout)         drop probability ~ U(0.03, 0.15) per cell of a coarse grid of
                                           size_percent ~ U(2%, 5%) of each axis (at least 4 cells, imgaug's
                                           min_size; so 4x4 cells of 16 px at 64 px), one mask for all
                                           channels, or per channel with probability 0.2; dropped pixels are 0
     with p = sometimes (0.5). Magnitudes are the [tiny_augment] config values (TinyAugmentConfig).
  3. a random crop x crop square, uniform position (the seed's crop_generator; none at full size).

Geometry conventions (those of imgaug/skimage): pixel centres at integer coordinates, x to the right, y
down; the affine transform acts about the image centre ((w-1)/2, (h-1)/2) and a positive angle turns
the image clockwise on screen (+x towards +y).

Random draws: every choice for the image at `position` of epoch `epoch` comes from its own stream (TINY in
data/random_streams.py, keyed by (seed, epoch, position)) in a fixed order, so batches are byte-identical
whatever the number of workers (the same contract as data/transforms/scale_crop.py).
"""
import dataclasses
import math

import numpy as np
from PIL import Image

from data.random_streams import TINY_STREAM, keyed_rng
from data.transforms import images

PAD_MODES = ("constant", "edge", "linear_ramp", "maximum", "mean", "median", "minimum", "reflect", "symmetric",
             "wrap")
AFFINE_MODES = ("constant", "edge", "symmetric", "reflect", "wrap")
STEPS = ("hflip", "vflip", "blur", "crop_pad", "affine", "dropout")


@dataclasses.dataclass(frozen=True)
class TinyAugmentConfig:
    """Magnitudes of the Tiny ImageNet augmentation (the defaults are the recipe's); field names = [tiny_augment] keys."""
    hflip: float = 0.5
    vflip: float = 0.2
    sometimes: float = 0.5
    blur_sigma_max: float = 2.0
    crop_pad_min: float = -0.1
    crop_pad_max: float = 0.2
    scale_min: float = 0.8
    scale_max: float = 1.5
    translate: float = 0.2
    rotate: float = 45.0
    shear: float = 16.0
    dropout_p_min: float = 0.03
    dropout_p_max: float = 0.15
    dropout_size_min: float = 0.02
    dropout_size_max: float = 0.05
    dropout_per_channel: float = 0.2
    dropout_min_cells: int = 4
    random_order: bool = True

    def __post_init__(self):
        for low, high in (("crop_pad_min", "crop_pad_max"), ("scale_min", "scale_max"),
                          ("dropout_p_min", "dropout_p_max"), ("dropout_size_min", "dropout_size_max")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} must not exceed {high}, received {getattr(self, low)} and "
                                 f"{getattr(self, high)}")
        if self.crop_pad_min <= -0.5:
            raise ValueError(f"crop_pad_min must be above -0.5 (two sides would crop the whole image), "
                             f"received {self.crop_pad_min}")

    @classmethod
    def from_settings_section(cls, section):
        return cls(**dataclasses.asdict(section))


# ----------------------------------------------------------------------------
# The operations: pure functions of (uint8 HWC image, explicit parameters)
# ----------------------------------------------------------------------------

def hflip(img):
    return np.ascontiguousarray(img[:, ::-1])


def vflip(img):
    return np.ascontiguousarray(img[::-1])


def gaussian_kernel(sigma, truncate=4.0):
    """Normalised 1-D Gaussian taps out to truncate*sigma (scipy.ndimage.gaussian_filter's, as imgaug used)."""
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(img, sigma):
    """Separable Gaussian blur with mirrored edges (scipy's 'reflect'); sigma < 0.01 leaves the image as is."""
    if sigma < 0.01:  # imgaug skips such blurs too
        return img
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    x = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = np.pad(x, pad, mode="symmetric")
        n = x.shape[axis]
        x = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def crop_and_pad(img, top, right, bottom, left, mode="constant", cval=0):
    """Per side: pad by a positive number of pixels, crop by a negative one; then resize back to the input size.

    The resize is bicubic (imgaug's keep_size default). A point at x maps to
    (x + left + 0.5) * w / w_new - 0.5 (and likewise for y).
    """
    h, w = img.shape[:2]
    crop_t, crop_r, crop_b, crop_l = (max(0, -v) for v in (top, right, bottom, left))
    out = img[crop_t:h - crop_b, crop_l:w - crop_r]
    pads = ((max(0, top), max(0, bottom)), (max(0, left), max(0, right)), (0, 0))
    if any(sum(p) for p in pads):
        if mode == "constant":
            out = np.pad(out, pads, mode="constant", constant_values=cval)
        elif mode == "linear_ramp":
            out = np.pad(out, pads, mode="linear_ramp", end_values=cval)
        else:
            out = np.pad(out, pads, mode=mode)
    if out.shape[:2] == (h, w):
        return np.ascontiguousarray(out)
    return np.asarray(Image.fromarray(out).resize((w, h), Image.BICUBIC))


def affine_matrix(h, w, scale=(1.0, 1.0), translate_px=(0.0, 0.0), rotate=0.0, shear=0.0):
    """3x3 forward matrix (input pixel -> output pixel) of imgaug's Affine: about the centre, then shifted.

    Matches skimage's AffineTransform(scale, rotation, shear, translation) between
    a move of the centre to the origin and back, as imgaug composed it.
    """
    sx, sy = scale
    r, s = math.radians(rotate), math.radians(shear)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    transform = np.array([[sx * math.cos(r), -sy * math.sin(r + s), translate_px[0]],
                          [sx * math.sin(r), sy * math.cos(r + s), translate_px[1]],
                          [0, 0, 1]], np.float64)
    back = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]], np.float64)
    return back @ transform @ to_origin


def _map_index(i, n, mode):
    """Integer source indices folded into 0..n-1 by the fill mode; None for 'constant' (caller masks)."""
    if mode == "edge":
        return np.clip(i, 0, n - 1)
    if mode == "wrap":
        return np.mod(i, n)
    if mode == "symmetric":  # ... 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...
        m = np.mod(i, 2 * n)
        return np.where(m >= n, 2 * n - 1 - m, m)
    if mode == "reflect":  # ... 2 1 | 0 1 2 ... n-1 | n-2 ...
        if n == 1:
            return np.zeros_like(i)
        m = np.mod(i, 2 * n - 2)
        return np.where(m >= n, 2 * n - 2 - m, m)
    raise ValueError(f"mode must be one of {', '.join(AFFINE_MODES)}, received {mode!r}")


def _gather(img, yi, xi, mode, cval):
    h, w = img.shape[:2]
    if mode == "constant":
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        values = img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)].astype(np.float64)
        return np.where(inside[..., None], values, float(cval))
    return img[_map_index(yi, h, mode), _map_index(xi, w, mode)].astype(np.float64)


def warp(img, forward, order=1, mode="constant", cval=0):
    """Output pixel (x, y) takes the input at inverse(forward) @ (x, y, 1); order 0 nearest, 1 bilinear."""
    h, w = img.shape[:2]
    inverse = np.linalg.inv(forward)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u = inverse[0, 0] * xx + inverse[0, 1] * yy + inverse[0, 2]
    v = inverse[1, 0] * xx + inverse[1, 1] * yy + inverse[1, 2]
    if order == 0:
        out = _gather(img, np.floor(v + 0.5).astype(np.int64), np.floor(u + 0.5).astype(np.int64), mode, cval)
    elif order == 1:
        x0, y0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
        fx, fy = (u - x0)[..., None], (v - y0)[..., None]
        out = ((1 - fy) * ((1 - fx) * _gather(img, y0, x0, mode, cval) + fx * _gather(img, y0, x0 + 1, mode, cval))
               + fy * ((1 - fx) * _gather(img, y0 + 1, x0, mode, cval) + fx * _gather(img, y0 + 1, x0 + 1, mode, cval)))
    else:
        raise ValueError(f"order must be 0 or 1, received {order!r}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def affine(img, scale=(1.0, 1.0), translate_px=(0.0, 0.0), rotate=0.0, shear=0.0, order=1, mode="constant", cval=0):
    h, w = img.shape[:2]
    return warp(img, affine_matrix(h, w, scale, translate_px, rotate, shear), order, mode, cval)


def coarse_dropout(img, keep_cells):
    """Zero the pixels whose cell is False in keep_cells (bool [gh, gw, 1 or C]), upscaled by nearest neighbour."""
    h, w = img.shape[:2]
    gh, gw = keep_cells.shape[:2]
    rows = np.arange(h) * gh // h
    cols = np.arange(w) * gw // w
    keep = keep_cells[rows[:, None], cols[None, :]]
    return np.where(keep, img, 0).astype(np.uint8)


# ----------------------------------------------------------------------------
# Random draws and the whole pipeline
# ----------------------------------------------------------------------------

def image_rng(seed, epoch, position):
    return keyed_rng(seed, epoch, position, TINY_STREAM)


def _apply(step, img, rng, c):
    h, w = img.shape[:2]
    if step == "hflip":
        return hflip(img) if rng.random() < c.hflip else img
    if step == "vflip":
        return vflip(img) if rng.random() < c.vflip else img
    if rng.random() >= c.sometimes:
        return img
    if step == "blur":
        return gaussian_blur(img, rng.uniform(0.0, c.blur_sigma_max))
    if step == "crop_pad":
        top, right, bottom, left = rng.uniform(c.crop_pad_min, c.crop_pad_max, 4)
        sides = [int(round(f * n)) for f, n in ((top, h), (right, w), (bottom, h), (left, w))]
        return crop_and_pad(img, *sides, mode=PAD_MODES[rng.integers(len(PAD_MODES))], cval=int(rng.integers(256)))
    if step == "affine":
        sx, sy = rng.uniform(c.scale_min, c.scale_max, 2)
        tx, ty = rng.uniform(-c.translate, c.translate, 2)
        rotate, shear = rng.uniform(-c.rotate, c.rotate), rng.uniform(-c.shear, c.shear)
        order, mode = int(rng.integers(2)), AFFINE_MODES[rng.integers(len(AFFINE_MODES))]
        return affine(img, (sx, sy), (tx * w, ty * h), rotate, shear, order, mode, int(rng.integers(256)))
    p = rng.uniform(c.dropout_p_min, c.dropout_p_max)
    size_h, size_w = rng.uniform(c.dropout_size_min, c.dropout_size_max, 2)
    cells = (max(int(h * size_h), c.dropout_min_cells), max(int(w * size_w), c.dropout_min_cells))
    channels = img.shape[2] if rng.random() < c.dropout_per_channel else 1
    return coarse_dropout(img, rng.random((*cells, channels)) >= p)


def augment(img, rng, config=TinyAugmentConfig()):
    """The Tiny ImageNet augmenters on a uint8 HWC image, in a random order (config.random_order); same shape out."""
    order = rng.permutation(len(STEPS)) if config.random_order else range(len(STEPS))
    for k in order:
        img = _apply(STEPS[k], img, rng, config)
    return img


def random_crop(img, crop, rng):
    """A crop x crop square at a uniform position (the image itself when it already has that size)."""
    h, w = img.shape[:2]
    if crop > min(h, w):
        raise ValueError(f"crop {crop} exceeds the image size {w}x{h}")
    top, left = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    return np.ascontiguousarray(img[top:top + crop, left:left + crop])


def load_full(path, full_size):
    """The image as uint8 [full, full, 3] (resized bilinearly if needed). Raises images.BadImageError."""
    img = images.decode_rgb(path)
    if img.size != (full_size, full_size):
        img = img.resize((full_size, full_size), Image.BILINEAR)
    return np.asarray(img)


def training_crop(path, full_size, crop, rng, config=TinyAugmentConfig()):
    """One training image through the Tiny ImageNet pipeline: load at full size, augment, random crop."""
    return random_crop(augment(load_full(path, full_size), rng, config), crop, rng)
