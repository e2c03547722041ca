"""Decode only a window of an image and resample it to a crop: libjpeg-turbo crop + DCT-scaled decode, PIL draft.

Used by the crop families (scale_crop, inception_crop). A window at least k times the crop (k in 2, 4, 8)
is decoded at 1/k size by the JPEG decoder's DCT scaling; then only the window is resampled to the crop,
with OpenCV's bilinear resize (resample_fast) or PIL's antialiased bilinear box resize (resample_window).
TurboJPEG reaches the libjpeg-turbo 3 bundled with the `turbojpeg` wheel through ctypes.
"""
import ctypes
import glob
import io
import logging
import math
import os

import numpy as np
from PIL import Image

try:
    import cv2
except ImportError:  # PIL resamples instead (slower, see resample_fast)
    cv2 = None
else:
    cv2.setNumThreads(1)  # one producer worker per core: OpenCV's own thread pool would only compete

from utils.errors import UserError

log = logging.getLogger(__name__)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)  # what PIL raises for truncated or corrupt data


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
        raise UserError("[runtime_preprocessing] decoder = turbojpeg but the turbojpeg wheel is not installed; "
                        "run `pip install -r requirements.txt` or set decoder = auto.")
    return "pil"


def filter_margin(scale):
    """Source pixels the bilinear filter reaches beyond the box, plus 2 for libjpeg's edge upsampling."""
    return int(math.ceil(max(scale, 1.0))) + 2



def flip_lr(arr, out):
    """Write the left-right mirror of an HWC uint8 array into `out` (OpenCV's flip is ~5x faster than numpy's)."""
    if cv2 is not None:
        cv2.flip(np.ascontiguousarray(arr), 1, dst=out)
    else:
        out[...] = arr[:, ::-1]



def open_plain_jpeg(data):
    """A lazily decoded PIL image of `data` if it is a plain (RGB or grayscale) JPEG, so draft() applies; else None."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not an image PIL can even identify: the caller's full decode reports it
        return None
    return img if img.format == "JPEG" and img.mode in ("RGB", "L") else None


def draft_resample(img, box, crop):
    """Resample `box` (source pixels) of a lazy plain JPEG to crop x crop, decoding at 1/k size when the window
    is at least k times the crop (PIL draft). Raises one of DECODE_ERRORS for truncated or corrupt data."""
    width, height = img.size
    k = dct_factor(box, crop)
    if k > 1:
        img.draft(img.mode, (width // k, height // k))
    img = img.convert("RGB")
    k = max(1, round(width / img.width))  # DCT scaling maps x to x/k exactly; the decoded size is rounded up
    return resample_window(img, tuple(v / k for v in box), crop)
