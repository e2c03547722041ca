"""The scale crop: random shorter side S, random crop, flip and lighting draws, decoding only what the crop needs.

Where each step runs (the one place this is stated):

  step (the recipe's order)                      where                          how
  1. shorter side S from settings.scales     producer CPU (this module)     drawn per image
  2. resize so the shorter side is S         producer CPU                   only the crop window is resampled
  3. random crop_size x crop_size crop       producer CPU                   window chosen in source coordinates
  5. horizontal flip, p = 0.5                producer CPU                   on the uint8 crop
  6. PCA lighting coefficients alpha         producer CPU                   drawn per image, float32 [3] (`lighting`)
  4. x/255, (x - mu)/sigma                   trainer device (model/preprocessing.py) affine, on the GPU
  6. the crop's PCA and the lighting shift   trainer device (model/preprocessing.py) [B,3,3] covariance, batched eigh

With [images] augmentation = tiny, data/transforms/tiny_augment.py (the Tiny ImageNet pipeline) replaces steps
1-5 and 6 is off (pca_std = 0); with [images] crop_schedule the crop size changes per epoch
(data/transforms/progressive.py).

Images travel uint8 through the buffer (150,528 B per 224 crop); normalisation
and the colour shift are affine per image, so applying them on the device gives
the same numbers as the original's float16 files at a quarter of the bytes. The
shift depends on the crop's own pixels (the PCA of its colours, model/preprocessing.py),
which the device has at hand: computed there, it costs the producer nothing.

Random draws. Epoch e's order is `epoch_permutation(seed, e, N)`; the image at
position p of that order (p = batch * batch_size + slot) draws everything from a
counter-based generator keyed by (seed, e, p) (image_draws: blake2b of the key) in
a fixed order: scale index, crop position (two uniforms), flip, three lighting
coefficients. No stream is shared between images or workers, so a batch is
byte-identical whatever the number of workers and however often the producer restarts.

Geometry. resize_shorter maps an h x w image to H x W (data.transforms.images.resized_size);
the crop's top-left corner in that resized image is (floor(u_top*(H-c+1)),
floor(u_left*(W-c+1))). The fast path maps this window back to the source
(size c*w/W by c*h/H pixels), decodes just that region with libjpeg-turbo (crop
decode), using DCT scaling by k in {2, 4, 8} when the window is at least k times
the crop, and resamples only the window to c x c with OpenCV's bilinear resize
(resample_fast). decoder = pil does the same with PIL: draft() for DCT scaling and
resize(box=...), the antialiased bilinear filter of resize_shorter, which equals
full resize then crop up to rounding. Non-JPEG and CMYK files take the PIL path.
When preprocess.py cached the image at S, the window is cut from the cached image
without resampling. `augment_reference` is the slow reference (full resize, then crop).
"""
import dataclasses
import hashlib
import math
import struct

import numpy as np

from data.random_streams import SCALE_CROP_PERSON
from data.transforms import images
from data.transforms.jpeg_window import (DECODE_ERRORS, filter_margin, cv2, dct_factor, draft_resample, flip_lr,
                                         get_turbojpeg, open_plain_jpeg, resample_fast, resample_window)


@dataclasses.dataclass(frozen=True)
class Draws:
    scale: int          # shorter side S
    u_top: float        # crop position, uniform in [0, 1)
    u_left: float
    flip: bool
    alpha: tuple        # 3 lighting coefficients ~ N(0, pca_std^2)




def image_draws(seed, epoch, position, scales, pca_std):
    """Every random choice for the image at `position` of epoch `epoch`.

    A counter-based generator: eight 53-bit uniforms from blake2b of (seed, epoch, position),
    used in a fixed order (scale, crop top, crop left, flip, then Box-Muller for the three
    lighting normals). 4 us per image where np.random.default_rng([seed, epoch, position])
    took 13-21 us (2-3% of a producer worker's time), with the same independence: no stream
    is shared between images, so no worker repeats another's draws.
    """
    key = struct.pack("<3q", int(seed), int(epoch), int(position))
    words = struct.unpack("<8Q", hashlib.blake2b(key, digest_size=64, person=SCALE_CROP_PERSON).digest())
    u = [(w >> 11) * 2.0 ** -53 for w in words]  # uniform in [0, 1)
    normals = []
    for k in (4, 6):
        radius = math.sqrt(-2.0 * math.log(1.0 - u[k]))
        normals += [radius * math.cos(2.0 * math.pi * u[k + 1]), radius * math.sin(2.0 * math.pi * u[k + 1])]
    return Draws(int(scales[int(u[0] * len(scales))]), u[1], u[2], u[3] < 0.5,
                 tuple(float(n * pca_std) for n in normals[:3]))



# ----------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------

def crop_origin(resized_w, resized_h, crop, draws):
    """(top, left) of the crop in the image resized to shorter side draws.scale."""
    top = min(int(draws.u_top * (resized_h - crop + 1)), resized_h - crop)
    left = min(int(draws.u_left * (resized_w - crop + 1)), resized_w - crop)
    return top, left


def source_box(width, height, crop, draws):
    """The crop window in source pixel coordinates: (x0, y0, x1, y1), floats."""
    rw, rh = images.resized_size(width, height, draws.scale)
    top, left = crop_origin(rw, rh, crop, draws)
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)



def augment_reference(img, draws, crop):
    """Slow reference: resize the whole PIL image to S, cut the crop, flip. Returns uint8 HWC."""
    resized = np.asarray(images.resize_shorter(img, draws.scale))
    top, left = crop_origin(resized.shape[1], resized.shape[0], crop, draws)
    out = resized[top:top + crop, left:left + crop]
    return np.ascontiguousarray(out[:, ::-1] if draws.flip else out)




def _window_turbo(tj, data, crop, draws, dst=None):
    """The resampled window (uint8 array) via libjpeg-turbo's crop (and DCT-scaled) decode, or None if unsupported."""
    head = tj.header(data)
    if head is None:
        return None
    width, height, subsamp = head
    box = source_box(width, height, crop, draws)
    k = dct_factor(box, crop)
    sw, sh = -(-width // k), -(-height // k)
    box = tuple(v / k for v in box)
    margin = 2 if cv2 is not None else filter_margin((box[2] - box[0]) / crop)  # see filter_margin
    align = tj.mcu_width(subsamp, k)
    x0 = max(0, int(box[0]) - margin) // align * align
    y0 = max(0, int(box[1]) - margin)
    x1 = min(sw, int(math.ceil(box[2])) + margin)
    y1 = min(sh, int(math.ceil(box[3])) + margin)
    region = tj.decode_region(data, head, k, (x0, y0, x1 - x0, y1 - y0))
    if region is None:
        return None
    return resample_fast(region, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0), crop, dst)


def _window_pil(path, data, crop, draws):
    """The resampled window via PIL: DCT-scaled decode (draft) for large plain JPEGs, else decode_rgb."""
    img = open_plain_jpeg(data)
    if img is not None:
        box = source_box(img.width, img.height, crop, draws)
        try:
            return draft_resample(img, box, crop)
        except DECODE_ERRORS:
            img = images.decode_rgb(path)  # truncated or corrupt: raises BadImageError (or decodes in full)
            return resample_window(img, box, crop)
    img = images.decode_rgb(path)
    return resample_window(img, source_box(img.width, img.height, crop, draws), crop)


def scale_crop(path, crop, draws, decoder="turbojpeg", cached_path=None, out=None):
    """The uint8 [crop, crop, 3] training crop of one image (flipped if drawn), by the fast path.

    `cached_path` is preprocess.py's copy of this image at draws.scale, when valid. With `out`
    (a contiguous [crop, crop, 3] uint8 array, e.g. a slot of the batch) the crop is written
    there and no image-sized array is allocated or copied on the fast path.
    Raises data.transforms.images.BadImageError for unreadable files.
    """
    img = None
    if cached_path is not None:
        img = _cut_cached(cached_path, crop, draws, decoder)
    if img is None:
        data, _ = images.read_source(path)
        tj = get_turbojpeg() if decoder == "turbojpeg" else None
        # An unflipped window is resampled straight into `out`; a flipped one is flipped into it.
        img = _window_turbo(tj, data, crop, draws, None if draws.flip else out) if tj is not None else None
        if img is None:
            img = _window_pil(path, data, crop, draws)
    img = np.asarray(img)
    if out is None:
        out = np.empty(img.shape, np.uint8)
    if draws.flip:
        flip_lr(img, out)
    elif not np.may_share_memory(img, out):  # else it was resampled into `out` already
        out[...] = img
    return out


def _cut_cached(cached_path, crop, draws, decoder):
    """The crop cut without resampling from an image already resized to S, or None if it is unusable."""
    try:
        data, _ = images.read_source(cached_path)
    except images.BadImageError:
        return None
    tj = get_turbojpeg() if decoder == "turbojpeg" else None
    head = tj.header(data) if tj is not None else None
    if head is not None:
        width, height, subsamp = head
        if min(width, height) != draws.scale:
            return None
        top, left = crop_origin(width, height, crop, draws)
        margin = filter_margin(1.0)  # keeps libjpeg's region-edge upsampling out of the crop
        x0 = max(0, left - margin) // tj.mcu_width(subsamp, 1) * tj.mcu_width(subsamp, 1)
        y0 = max(0, top - margin)
        x1, y1 = min(width, left + crop + margin), min(height, top + crop + margin)
        region = tj.decode_region(data, head, 1, (x0, y0, x1 - x0, y1 - y0))
        if region is not None:
            return region[top - y0:top - y0 + crop, left - x0:left - x0 + crop]
    try:
        arr = np.asarray(images.decode_rgb(cached_path))
    except images.BadImageError:
        return None
    if min(arr.shape[:2]) != draws.scale:
        return None
    top, left = crop_origin(arr.shape[1], arr.shape[0], crop, draws)
    return arr[top:top + crop, left:left + crop]
