"""Training augmentation: the scale/crop/flip/colour recipe of seed 001, decoding only what the crop needs.

Where each step runs (the one place this is stated):

  step (seed 001 order)                      where                          how
  1. shorter side S from utils.scales(cfg)   producer CPU (this module)     drawn per image
  2. resize so the shorter side is S         producer CPU                   only the crop window is resampled
  3. random crop_size x crop_size crop       producer CPU                   window chosen in source coordinates
  5. horizontal flip, p = 0.5                producer CPU                   on the uint8 crop
  6. PCA lighting coefficients alpha         producer CPU                   drawn per image, float32 [3] (`lighting`)
  4. x/255, (x - mu)/sigma                   trainer device (data/device.py) affine, on the GPU
  6. the crop's PCA and the lighting shift   trainer device (data/device.py) [B,3,3] covariance, batched eigh

With [images] augmentation = tiny, data/tiny_augment.py (seed 002's pipeline) replaces steps
1-5 and 6 is off (pca_std = 0); with [images] crop_schedule the crop size changes per epoch
(data/progressive.py).

Images travel uint8 through the buffer (150,528 B per 224 crop); normalisation
and the colour shift are affine per image, so applying them on the device gives
the same numbers as the original's float16 files at a quarter of the bytes. The
shift depends on the crop's own pixels (the PCA of its colours, data/device.py),
which the device has at hand: computed there, it costs the producer nothing.

Random draws. Epoch e's order is `epoch_permutation(seed, e, N)`; the image at
position p of that order (p = batch * batch_size + slot) draws everything from a
counter-based generator keyed by (seed, e, p) (image_draws: blake2b of the key) in
a fixed order: scale index, crop position (two uniforms), flip, three lighting
coefficients. No stream is shared between images or workers, so a batch is
byte-identical whatever the number of workers and however often the producer restarts.

Geometry. resize_shorter maps an h x w image to H x W (data.images.resized_size);
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
import ctypes
import dataclasses
import glob
import hashlib
import io
import logging
import math
import os
import struct

import numpy as np
from PIL import Image

from data import images

try:
    import cv2
except ImportError:  # PIL resamples instead (slower, see resample_fast)
    cv2 = None
else:
    cv2.setNumThreads(1)  # one producer worker per core: OpenCV's own thread pool would only compete

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Random draws
# ----------------------------------------------------------------------------

def epoch_permutation(seed, epoch, n):
    """The order in which epoch `epoch` visits the n training images."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(int(n))


@dataclasses.dataclass(frozen=True)
class Draws:
    scale: int          # shorter side S
    u_top: float        # crop position, uniform in [0, 1)
    u_left: float
    flip: bool
    alpha: tuple        # 3 lighting coefficients ~ N(0, pca_std^2)


_DRAW_PERSON = b"seed001-draws"  # domain separation: no other stream hashes the same key


def image_draws(seed, epoch, position, scales, pca_std):
    """Every random choice for the image at `position` of epoch `epoch`.

    A counter-based generator: eight 53-bit uniforms from blake2b of (seed, epoch, position),
    used in a fixed order (scale, crop top, crop left, flip, then Box-Muller for the three
    lighting normals). 4 us per image where np.random.default_rng([seed, epoch, position])
    took 13-21 us (2-3% of a producer worker's time), with the same independence: no stream
    is shared between images, so no worker repeats another's draws.
    """
    key = struct.pack("<3q", int(seed), int(epoch), int(position))
    words = struct.unpack("<8Q", hashlib.blake2b(key, digest_size=64, person=_DRAW_PERSON).digest())
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


def dct_factor(box, crop):
    """Largest k in {1, 2, 4, 8} with the window at least k times the crop on both axes."""
    side = min(box[2] - box[0], box[3] - box[1])
    k = 1
    while k < 8 and side >= 2 * k * crop:
        k *= 2
    return k


def resample_window(img, box, crop):
    """Resample `box` of a PIL image to crop x crop (bilinear, antialiased as resize_shorter)."""
    return img.resize((crop, crop), Image.BILINEAR, box=box)


def resample_fast(arr, box, crop, dst=None):
    """Resample `box` of an HWC uint8 array to crop x crop with OpenCV's bilinear resize (uint8 array).

    About 5x faster than PIL's antialiased resize of the same window. The box is rounded to
    whole source pixels (the window moves by at most half a pixel) and there is no
    antialiasing, which matters little here: reductions stay below 2x because larger ones
    are done by DCT scaling first; TF's decode_and_crop_jpeg + resize pipeline does the same.
    Without OpenCV installed, PIL's exact resample_window is used. With `dst` (a contiguous
    crop x crop x 3 uint8 array) the result is written there.
    """
    if cv2 is None:
        out = np.asarray(resample_window(Image.fromarray(arr), box, crop))
        if dst is None:
            return out
        dst[...] = out
        return dst
    h, w = arr.shape[:2]
    x0, y0 = min(max(0, int(round(box[0]))), w - 1), min(max(0, int(round(box[1]))), h - 1)
    x1, y1 = min(w, max(x0 + 1, int(round(box[2])))), min(h, max(y0 + 1, int(round(box[3]))))
    return cv2.resize(arr[y0:y1, x0:x1], (crop, crop), dst=dst, interpolation=cv2.INTER_LINEAR)


def augment_reference(img, draws, crop):
    """Slow reference: resize the whole PIL image to S, cut the crop, flip. Returns uint8 HWC."""
    resized = np.asarray(images.resize_shorter(img, draws.scale))
    top, left = crop_origin(resized.shape[1], resized.shape[0], crop, draws)
    out = resized[top:top + crop, left:left + crop]
    return np.ascontiguousarray(out[:, ::-1] if draws.flip else out)


# ----------------------------------------------------------------------------
# Window decoders
# ----------------------------------------------------------------------------

class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _Scaling(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


class TurboJPEG:
    """libjpeg-turbo 3's TurboJPEG API through ctypes: header, crop region, DCT scaling, decode.

    The shared library comes from the `turbojpeg` wheel (pinned in requirements.txt),
    which bundles it, so no system package is needed. One handle per process.
    """
    _INIT_DECOMPRESS = 1
    _PARAM = {"subsamp": 4, "width": 5, "height": 6, "colorspace": 8}
    _CS_CMYK, _CS_YCCK = 3, 4
    _PF_RGB = 0
    _MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)  # tjMCUWidth by subsampling (444, 422, 420, gray, 440, 411, 441)

    def __init__(self, lib_path):
        # DEEPBIND: the library's own libjpeg calls must not bind to another libjpeg already in the
        # process (TensorFlow's or Pillow's have other struct layouts).
        lib = ctypes.CDLL(lib_path, mode=os.RTLD_LOCAL | getattr(os, "RTLD_DEEPBIND", 0))
        vp, cp, sz, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int
        self._sig(lib.tj3Init, vp, [i])
        self._sig(lib.tj3DecompressHeader, i, [vp, cp, sz])
        self._sig(lib.tj3Get, i, [vp, i])
        self._sig(lib.tj3SetCroppingRegion, i, [vp, _Region])
        self._sig(lib.tj3SetScalingFactor, i, [vp, _Scaling])
        self._sig(lib.tj3Decompress8, i, [vp, cp, sz, vp, i, i])
        self._sig(lib.tj3GetErrorStr, cp, [vp])
        self._sig(lib.tj3Destroy, None, [vp])
        self._lib = lib
        self._handle = None
        self._reset()

    def _reset(self):
        """A fresh handle: after a failed call, libjpeg-turbo 3.0's handle can report the previous
        image's header as this one's (seen with a truncated file), so it is never reused."""
        if self._handle:
            self._lib.tj3Destroy(self._handle)
        self._handle = self._lib.tj3Init(self._INIT_DECOMPRESS)
        if not self._handle:
            raise OSError("tj3Init failed")

    @staticmethod
    def _sig(fn, restype, argtypes):
        fn.restype, fn.argtypes = restype, argtypes

    def header(self, data):
        """(width, height, subsampling) of a JPEG this decoder can crop, else None (not JPEG, CMYK, odd)."""
        lib, h = self._lib, self._handle
        if lib.tj3DecompressHeader(h, data, len(data)) != 0:
            self._reset()
            return None
        get = lambda name: lib.tj3Get(h, self._PARAM[name])  # noqa: E731
        subsamp = get("subsamp")
        if get("colorspace") in (self._CS_CMYK, self._CS_YCCK) or not 0 <= subsamp < len(self._MCU_WIDTH):
            return None
        return get("width"), get("height"), subsamp

    def decode_region(self, data, head, k, region):
        """Decode region (x, y, w, h, in 1/k-scaled pixels; x already aligned) to RGB uint8, or None on error.

        `head` is header(data). The region is checked here: libjpeg-turbo 3.0 does not check it,
        and a region past the image's edge crashes or hangs the process.
        """
        lib, h = self._lib, self._handle
        width, height, subsamp = head
        x, y, w, hh = region
        if not (0 <= x and 0 <= y and 0 < w and 0 < hh and x + w <= -(-width // k) and y + hh <= -(-height // k)
                and x % self.mcu_width(subsamp, k) == 0):
            raise ValueError(f"crop region {region} outside the {width}x{height} image at 1/{k} scale")
        if lib.tj3SetScalingFactor(h, _Scaling(1, k)) != 0 or lib.tj3SetCroppingRegion(h, _Region(x, y, w, hh)) != 0:
            self._reset()
            return None
        out = np.empty((hh, w, 3), np.uint8)
        if lib.tj3Decompress8(h, data, len(data), out.ctypes.data, 0, self._PF_RGB) != 0:
            self._reset()
            return None  # corrupt or truncated: the PIL path decides whether the file is usable
        return out

    def mcu_width(self, subsamp, k):
        return -(-self._MCU_WIDTH[subsamp] // k)


_turbo = {}  # pid -> TurboJPEG or None: ctypes handles are not shared across fork


def turbojpeg_library():
    """Path of the libturbojpeg bundled with the `turbojpeg` wheel, or None when it is not installed."""
    try:
        import turbojpeg
    except ImportError:
        return None
    found = sorted(glob.glob(os.path.join(os.path.dirname(turbojpeg.__file__), "turbojpeg.libs", "libturbojpeg*")))
    return found[0] if found else None


def get_turbojpeg():
    pid = os.getpid()
    if pid not in _turbo:
        path = turbojpeg_library()
        try:
            _turbo[pid] = TurboJPEG(path) if path else None
        except (OSError, AttributeError) as e:
            log.warning("libturbojpeg at %s unusable (%s); decoding with PIL", path, e)
            _turbo[pid] = None
    return _turbo[pid]


def resolve_decoder(choice):
    """'turbojpeg' or 'pil' for a config value auto/turbojpeg/pil."""
    if choice == "pil":
        return "pil"
    if get_turbojpeg() is not None:
        return "turbojpeg"
    if choice == "turbojpeg":
        from utils import UserError
        raise UserError("[runtime_preprocessing] decoder = turbojpeg but the turbojpeg wheel is not installed; "
                        "run `pip install -r requirements.txt` or set decoder = auto.")
    return "pil"


def _filter_margin(scale):
    """Source pixels the bilinear filter reaches beyond the box, plus 2 for libjpeg's edge upsampling."""
    return int(math.ceil(max(scale, 1.0))) + 2


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
    margin = 2 if cv2 is not None else _filter_margin((box[2] - box[0]) / crop)  # see _filter_margin
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
    try:
        img = Image.open(io.BytesIO(data))
        plain_jpeg = img.format == "JPEG" and img.mode in ("RGB", "L")
    except Exception:  # not an image PIL can even identify: decode_rgb raises the proper BadImageError
        plain_jpeg = False
    if plain_jpeg:
        width, height = img.size
        box = source_box(width, height, crop, draws)
        k = dct_factor(box, crop)
        if k > 1:
            img.draft(img.mode, (width // k, height // k))
        try:
            img = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError):
            img = images.decode_rgb(path)  # truncated or corrupt: raises BadImageError
        k = max(1, round(width / img.width))  # DCT scaling maps x to x/k exactly; the size is rounded up
        return resample_window(img, tuple(v / k for v in box), crop)
    img = images.decode_rgb(path)
    return resample_window(img, source_box(img.width, img.height, crop, draws), crop)


def _read_bytes(path):
    try:
        if hasattr(path, "read_record"):  # a TFRecord record (data.tfrecord.RecordRef): the image bytes inside
            return path.read_bytes()
        with open(path, "rb", buffering=0) as f:
            return f.readall()  # 12 us for an 80 KB file; through the buffered reader, 31 us
    except OSError as e:
        raise images.BadImageError(f"cannot read: {e.strerror or e}") from None


def augment_crop(path, crop, draws, decoder="turbojpeg", cached_path=None, out=None):
    """The uint8 [crop, crop, 3] training crop of one image (flipped if drawn), by the fast path.

    `cached_path` is preprocess.py's copy of this image at draws.scale, when valid. With `out`
    (a contiguous [crop, crop, 3] uint8 array, e.g. a slot of the batch) the crop is written
    there and no image-sized array is allocated or copied on the fast path.
    Raises data.images.BadImageError for unreadable files.
    """
    img = None
    if cached_path is not None:
        img = _cut_cached(cached_path, crop, draws, decoder)
    if img is None:
        data = _read_bytes(path)
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


def flip_lr(arr, out):
    """Write the left-right mirror of an HWC uint8 array into `out` (OpenCV's flip is ~5x faster than numpy's)."""
    if cv2 is not None:
        cv2.flip(np.ascontiguousarray(arr), 1, dst=out)
    else:
        out[...] = arr[:, ::-1]


def _cut_cached(cached_path, crop, draws, decoder):
    """The crop cut without resampling from an image already resized to S, or None if it is unusable."""
    try:
        data = _read_bytes(cached_path)
    except images.BadImageError:
        return None
    tj = get_turbojpeg() if decoder == "turbojpeg" else None
    head = tj.header(data) if tj is not None else None
    if head is not None:
        width, height, subsamp = head
        if min(width, height) != draws.scale:
            return None
        top, left = crop_origin(width, height, crop, draws)
        margin = _filter_margin(1.0)  # keeps libjpeg's region-edge upsampling out of the crop
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


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Recipe:
    """Everything that determines a batch's bytes besides the images themselves."""
    seed: int
    batch_size: int
    crop: int
    scales: tuple
    pca_std: float
    mu: tuple
    sigma: tuple
    decoder: str = "turbojpeg"          # resolved: 'turbojpeg' or 'pil'
    cache_root: str = None              # preprocess.py's cache when valid for this index
    cached_scales: frozenset = frozenset()
    crop_sizes: list = None             # progressive resizing [[first_epoch, crop], ...]; None = crop throughout
    augmentation: str = "scale"         # 'scale' (this module) or 'tiny' (data/tiny_augment.py, crop = full size)
    tiny: object = None                 # tiny_augment.TinyAugmentConfig when augmentation == 'tiny'

    @classmethod
    def from_config(cls, cfg, batch_size, cache_scales=()):
        import utils
        from data import progressive, tiny_augment
        mu, sigma = utils.mu_sigma(cfg)
        rp = cfg.runtime_preprocessing
        tiny = cfg.images.augmentation == "tiny"
        return cls(seed=cfg.train.seed, batch_size=int(batch_size), crop=cfg.images.crop_size,
                   scales=tuple(utils.scales(cfg)), pca_std=cfg.images.pca_std, mu=mu, sigma=sigma,
                   decoder=resolve_decoder(rp.decoder),
                   cache_root=cfg.preprocess.path_to_save if cache_scales and not tiny else None,
                   cached_scales=frozenset(cache_scales) if not tiny else frozenset(),
                   crop_sizes=progressive.crop_schedule(cfg), augmentation=cfg.images.augmentation,
                   tiny=tiny_augment.TinyAugmentConfig.from_config_section(cfg.tiny_augment) if tiny else None)

    def crop_for(self, epoch):
        from data.progressive import crop_for
        return crop_for(self.crop_sizes or [[0, self.crop]], epoch)


class BatchBuilder:
    """Builds batch (epoch, b) of a dataset: uint8 images, int32 labels, float32 lighting coefficients.

    Unreadable images are replaced by the next readable one in the epoch's order
    (deterministically), and logged once per process.
    """

    def __init__(self, paths, labels, recipe):
        self.paths, self.labels, self.recipe = list(paths), np.asarray(labels), recipe
        self._perm_epoch, self._perm = None, None
        self.skipped = images.SkipList("training image")

    def permutation(self, epoch):
        if self._perm_epoch != epoch:
            self._perm = epoch_permutation(self.recipe.seed, epoch, len(self.paths))
            self._perm_epoch = epoch
        return self._perm

    def num_batches(self):
        return len(self.paths) // self.recipe.batch_size

    def build(self, epoch, batch):
        r = self.recipe
        perm = self.permutation(epoch)
        crop = r.crop_for(epoch)
        out = np.empty((r.batch_size, crop, crop, 3), np.uint8)
        labels = np.empty(r.batch_size, np.int32)
        alphas = np.empty((r.batch_size, 3), np.float32)
        for slot in range(r.batch_size):
            position = batch * r.batch_size + slot
            draws = image_draws(r.seed, epoch, position, r.scales, r.pca_std)
            index = self._readable_crop(out, slot, perm, (epoch, position), draws)
            labels[slot] = self.labels[index]
            alphas[slot] = draws.alpha
        return out, labels, alphas

    def _readable_crop(self, out, slot, perm, at, draws):
        epoch, position = at
        r, crop = self.recipe, out.shape[1]
        n = len(self.paths)
        for step in range(n):
            index = int(perm[(position + step) % n])
            path = self.paths[index]
            try:
                if r.augmentation == "tiny":
                    from data import tiny_augment
                    rng = tiny_augment.image_rng(r.seed, epoch, position)
                    out[slot] = tiny_augment.training_crop(path, r.crop, crop, rng, r.tiny)
                elif r.augmentation == "inception":
                    from data import inception_crop
                    out[slot] = inception_crop.augment(path, crop, r.seed, epoch, position)
                else:
                    augment_crop(path, crop, draws, r.decoder, self._cached(index, draws), out=out[slot])
                return index
            except images.BadImageError as e:
                self.skipped.add(path, str(e))
        from utils import UserError
        raise UserError(f"None of the {n} training images can be decoded; check the dataset folder.")

    def _cached(self, index, draws):
        r = self.recipe
        if r.cache_root is None or draws.scale not in r.cached_scales:
            return None
        from data import scale_cache
        path = scale_cache.cached_image_path(r.cache_root, draws.scale, index)
        return path if os.path.exists(path) else None
