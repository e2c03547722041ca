"""The Inception crop: Inception's distorted bounding-box crop, in numpy and PIL.

TF official ResNet (models v1.10 imagenet_preprocessing.py) does, per training image:
  1. tf.image.sample_distorted_bounding_box(image size, boxes, min_object_covered=0.1,
     aspect_ratio_range=(0.75, 1.33), area_range=(0.05, 1.0), max_attempts=100,
     use_image_if_no_bounding_boxes=True)
  2. decode_and_crop_jpeg (only the window), random left-right flip,
  3. resize to 224 x 224 (aspect ratio not kept),
  4. subtract the channel means (123.68, 116.78, 103.94) on the 0..255 scale, no std division.
Steps 1-3 run here, in the producer's worker processes, without TensorFlow.
`sample_distorted_bounding_box` follows TF's kernel (sample_distorted_bounding_box_op.cc)
step by step: the same rounding (lrintf = round half to even), the same rescue of
rounding errors, offsets drawn from [0, side - crop_side), boxes converted to pixels by
truncation, the whole image as the one box when a record has none, and the whole image
when 100 attempts fail. Only the random generator differs (numpy's PCG64, not Philox),
so the distribution is the same and the draws are not.

The window is decoded at a DCT-reduced size when it is at least twice the output
(PIL draft, data.transforms.jpeg_window.draft_resample) and resampled straight to crop x crop with PIL's
bilinear, antialiased box resize (jpeg_window.resample_window), the project's one
resampling filter. TF's bilinear resize has no antialiasing, so a large window comes
out slightly smoother here.

Step 4 is not code: the trainer normalises (x/255 - mu)/sigma on the device, and with
mu = mean/255 and sigma = 1/255 that is exactly x - mean (`mean_only_mu_sigma`,
written out in configs/seed003_recipe.txt).

Random draws: image `position` of epoch `epoch` draws from its own stream (INCEPTION in
data/random_streams.py, keyed by (seed, epoch, position)) in a fixed order: the flip, then the box
sampler's draws; apart from data/transforms/scale_crop.py's blake2b draws for the same position
(whose PCA lighting coefficients the producer still uses when [images] pca_std > 0; the Inception
recipe has none). A batch is therefore the same whatever the number of workers.
"""
import io
import math

import numpy as np

from data.random_streams import INCEPTION_STREAM, keyed_rng
from data.transforms import images
from data.transforms.jpeg_window import DECODE_ERRORS, draft_resample, open_plain_jpeg, resample_window

MIN_OBJECT_COVERED = 0.1
ASPECT_RATIO_RANGE = (0.75, 1.33)
AREA_RANGE = (0.05, 1.0)
MAX_ATTEMPTS = 100
MEAN_RGB = (123.68, 116.78, 103.94)


def mean_only_mu_sigma(mean_rgb=MEAN_RGB):
    """[utils] mu/sigma values that make the device normalisation x - mean_rgb (0..255 scale, no std)."""
    return tuple(m / 255.0 for m in mean_rgb), (1.0 / 255.0,) * 3


# ----------------------------------------------------------------------------
# sample_distorted_bounding_box
# ----------------------------------------------------------------------------

def _lrint(x):
    return int(round(x))  # Python rounds half to even, as lrintf in the default rounding mode


def random_crop(rng, width, height, min_area_frac, max_area_frac, aspect):
    """TF's GenerateRandomCrop: (x, y, w, h) of a crop with this aspect ratio and area, or None."""
    if max_area_frac <= 0 or aspect <= 0 or width <= 0 or height <= 0 or min_area_frac > max_area_frac:
        return None
    min_area = min_area_frac * width * height
    max_area = max_area_frac * width * height
    h = _lrint(math.sqrt(min_area / aspect))
    max_h = _lrint(math.sqrt(max_area / aspect))
    if _lrint(max_h * aspect) > width:
        max_h = int((width + 0.5 - 1e-7) / aspect)  # the largest height whose rounded width fits
        if _lrint(max_h * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
        h += int(rng.integers(max_h - h + 1))
    w = _lrint(h * aspect)
    area = w * h
    if area < min_area:  # rescue a rounding error with a slightly bigger rectangle first
        h += 1
        w = _lrint(h * aspect)
        area = w * h
    if area > max_area:
        h -= 1
        w = _lrint(h * aspect)
        area = w * h
    if area < min_area or area > max_area or w > width or h > height or w <= 0 or h <= 0:
        return None
    y = int(rng.integers(height - h)) if h < height else 0
    x = int(rng.integers(width - w)) if w < width else 0
    return x, y, w, h


def pixel_boxes(boxes, width, height):
    """Normalised (ymin, xmin, ymax, xmax) boxes -> integer (x0, y0, x1, y1), truncated as TF does."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(boxes) and (boxes.min() < 0 or boxes.max() > 1 or (boxes[:, 0] > boxes[:, 2]).any()
                       or (boxes[:, 1] > boxes[:, 3]).any()):
        raise ValueError(f"boxes must be (ymin, xmin, ymax, xmax) within [0, 1], received {boxes.tolist()}")
    return [(int(b[1] * width), int(b[0] * height), int(b[3] * width), int(b[2] * height)) for b in boxes]


def covers(crop, rects, min_object_covered):
    """TF's SatisfiesOverlapConstraints: the crop holds >= min_object_covered of at least one box."""
    x, y, w, h = crop
    if w * h < 1:
        return False
    for x0, y0, x1, y1 in rects:
        area = (x1 - x0) * (y1 - y0)
        if area < 1:
            continue
        overlap = max(0, min(x + w, x1) - max(x, x0)) * max(0, min(y + h, y1) - max(y, y0))
        if overlap / area >= min_object_covered:
            return True
    return False


def sample_distorted_bounding_box(rng, width, height, boxes=None, min_object_covered=MIN_OBJECT_COVERED,
                                  aspect_ratio_range=ASPECT_RATIO_RANGE, area_range=AREA_RANGE,
                                  max_attempts=MAX_ATTEMPTS):
    """(x, y, w, h) of a random crop of a width x height image; the whole image if no attempt succeeds.

    boxes: normalised (ymin, xmin, ymax, xmax) rows, or None/empty for the whole image.
    """
    rects = pixel_boxes(boxes, width, height) if boxes is not None else []
    if not rects:
        rects = [(0, 0, width, height)]
    lo, hi = aspect_ratio_range
    for _ in range(max_attempts):
        aspect = float(np.float32(rng.random()) * np.float32(hi - lo) + np.float32(lo))
        crop = random_crop(rng, width, height, area_range[0], area_range[1], aspect)
        if crop is not None and covers(crop, rects, min_object_covered):
            return crop
    return 0, 0, width, height


# ----------------------------------------------------------------------------
# The augmentation of one image
# ----------------------------------------------------------------------------

def image_rng(seed, epoch, position):
    return keyed_rng(seed, epoch, position, INCEPTION_STREAM)


def _open(data, source):
    """A PIL image (lazy for plain JPEGs, so draft() still applies) and whether it is a plain JPEG."""
    img = open_plain_jpeg(data)
    if img is not None:
        return img, True
    try:
        return images.decode_rgb(io.BytesIO(data) if images.is_record(source) else source), False
    except (TypeError, AttributeError):
        raise images.BadImageError("record does not hold a decodable image") from None


def inception_crop(source, crop, rng):
    """uint8 [crop, crop, 3]: the sampled window of an image, resized to crop x crop, not yet flipped.

    source: an image path, or a RecordRef whose record may carry boxes. Raises BadImageError.
    """
    data, boxes = images.read_source(source)
    img, plain = _open(data, source)
    width, height = img.size
    x, y, w, h = sample_distorted_bounding_box(rng, width, height, boxes)
    box = (x, y, x + w, y + h)
    if plain:
        try:
            return np.asarray(draft_resample(img, box, crop))
        except DECODE_ERRORS as e:
            raise images.BadImageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return np.asarray(resample_window(img, box, crop))


def augment(source, crop, seed, epoch, position):
    """The uint8 [crop, crop, 3] training crop of one image position: sampled window, resized, maybe flipped."""
    rng = image_rng(seed, epoch, position)
    flip = bool(rng.random() < 0.5)
    out = inception_crop(source, crop, rng)
    return np.ascontiguousarray(out[:, ::-1] if flip else out)
