"""Image operations shared by every stage: decode, resize, evaluation views, bad-image log.

Geometry conventions (one place, used by preprocess.py, preprocess_val.py,
the producer and the evaluator):
- resize_shorter(img, S): the shorter side becomes S, the longer floor(S*long/short);
  bilinear with antialiasing (PIL widens the filter support when reducing).
- A crop of side c from an h x w image at the centre starts at ((h-c)//2, (w-c)//2),
  as in the original's `(dim-224)//2`.
- Flips are horizontal (left-right) mirrors of the crop.
"""
import io
import logging
import os
import warnings

import numpy as np
from PIL import Image

from utils.files import atomic_write_text

log = logging.getLogger(__name__)

POSITIONS = ("tl", "tr", "bl", "br", "centre")


class BadImageError(Exception):
    """A file that cannot be decoded as an image (truncated, zero bytes, not an image)."""


def decode_rgb(path):
    """Decode by content (whatever the extension says) and convert any mode to RGB.

    CMYK and grayscale JPEGs and PNGs named .JPEG all occur in ImageNet. EXIF
    orientation is ignored, as in the usual ImageNet pipelines.
    """
    try:
        with warnings.catch_warnings():
            # A file PIL can only partly read is bad, not a warning to scroll past.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_file_or_record(path)) as img:
                img.load()
                if img.mode == "P" and "transparency" in img.info:
                    img = img.convert("RGBA")
                rgb = img.convert("RGB")
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise BadImageError(_reason(path, e)) from None
    if rgb.width < 1 or rgb.height < 1:
        raise BadImageError("image has no pixels")
    return rgb


def is_record(source):
    """True for a TFRecord record reference (data.sources.tfrecord.RecordRef), False for a file path."""
    return hasattr(source, "read_record")


def read_source(source):
    """(encoded image bytes, boxes or None) of an image file path or a TFRecord record (which may carry boxes).

    The one way every transform reads its input. Raises BadImageError when it cannot be read.
    """
    try:
        if is_record(source):
            record = source.read_record()
            return record.encoded, record.boxes
        with open(source, "rb", buffering=0) as f:
            return f.readall(), None  # 12 us for an 80 KB file; through the buffered reader, 31 us
    except OSError as e:
        raise BadImageError(f"cannot read: {e.strerror or e}") from None


def _file_or_record(path):
    """A path as is; a TFRecord record as the image bytes it holds."""
    return io.BytesIO(path.read_bytes()) if is_record(path) else path


def _reason(path, error):
    try:
        if os.path.getsize(path) == 0:
            return "zero bytes"
    except OSError:
        pass
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text.replace(str(path), "<file>")


def resized_size(width, height, shorter_side):
    """(width, height) after scaling the shorter side to `shorter_side` (longer side floored)."""
    if width <= height:
        return shorter_side, max(shorter_side, shorter_side * height // width)
    return max(shorter_side, shorter_side * width // height), shorter_side


def resize_shorter(img, shorter_side):
    """Resize a PIL image so its shorter side is `shorter_side` (bilinear, antialiased)."""
    size = resized_size(img.width, img.height, shorter_side)
    if size == img.size:
        return img.copy()
    return img.resize(size, Image.BILINEAR)


def crop_offsets(height, width, crop):
    """(top, left) of the five evaluation crops, in POSITIONS order."""
    _check_fits(height, width, crop)
    bottom, right = height - crop, width - crop
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]


def _check_fits(height, width, crop):
    if crop > height or crop > width:
        raise ValueError(f"crop {crop} does not fit in a {height}x{width} image")


def center_crop(arr, crop):
    """The centre crop x crop window of an HWC array."""
    h, w = arr.shape[:2]
    top, left = crop_offsets(h, w, crop)[4]
    return arr[top:top + crop, left:left + crop]


def eval_views(arr, crop, flip=True):
    """The 10 evaluation views of an HWC uint8 array (resized beforehand).

    Order: tl, tl-flipped, tr, tr-flipped, bl, bl-flipped, br, br-flipped,
    centre, centre-flipped (position-major, as the original's 50-view set).
    With flip=False: the 5 unflipped views. Returns (V, crop, crop, C).
    """
    h, w = arr.shape[:2]
    views = []
    for top, left in crop_offsets(h, w, crop):
        view = arr[top:top + crop, left:left + crop]
        views.append(view)
        if flip:
            views.append(view[:, ::-1])
    return np.stack(views)


def views_at_scales(img, scales, crop, flip=True):
    """The multi-scale view set: for each shorter side in `scales`, eval_views of the resized image.

    With the original's scales (224, 256, 384, 480, 640) this is its 50-view
    set, ordered scale, then position, then flip. `img` is a PIL image.
    """
    return np.concatenate([eval_views(np.asarray(resize_shorter(img, s)), crop, flip) for s in scales])


class SkipList:
    """Unreadable images met by a script: each logged once with its reason, and counted.

    Scripts report `summary()` at the end and save the list next to their output
    so a user can find the files.
    """

    def __init__(self, what="image"):
        self.what = what
        self.entries = {}  # path -> reason

    def add(self, path, reason):
        if path not in self.entries:
            self.entries[path] = reason
            log.warning("skipping unreadable %s %s: %s", self.what, path, reason)

    def __len__(self):
        return len(self.entries)

    def summary(self):
        if not self.entries:
            return f"no unreadable {self.what}s"
        return f"skipped {len(self.entries)} unreadable {self.what}(s) (listed in the log)"

    def lines(self):
        return "".join(f"{path}\t{reason}\n" for path, reason in sorted(self.entries.items()))

    def save(self, path):
        """Write 'path<TAB>reason' lines (atomically); write nothing when there is nothing to report."""
        if self.entries:
            atomic_write_text(path, self.lines())
        return path if self.entries else None
