"""The JPEGs bench/bench_producer.py times: an ImageNet-like generated corpus, or a sample of the user's dataset.

ImageNet's training JPEGs average about 110 KB; most are 500x375, 500x333, 375x500 or
500x500 at quality 90-96, many without chroma subsampling, with a tail of photos of
several megapixels (docs/references.md section 2). Decode cost
follows the entropy-coded bytes, so the generated images are photo-like (1/f spectrum,
object edges, sensor grain) rather than smooth: on smooth 500x375 images of 65 KB one
producer core built 1,400 img/s, on real photographs of ImageNet's sizes about 900 (issue 15).
"""
import dataclasses
import io
import os

import numpy as np
from PIL import Image, ImageDraw

# (width, height) of the ordinary images, as common in ImageNet as each other here.
SMALL_SIZES = ((500, 375), (500, 333), (375, 500), (500, 500), (400, 300))
# The tail: about one image in LARGE_EVERY is a photo of 1-6 megapixels.
LARGE_SIZES = ((1280, 960), (960, 1280), (1600, 1200), (1200, 1600), (2048, 1536), (2592, 1944))
LARGE_EVERY = 10
QUALITIES = (90, 92, 94, 96)
FULL_CHROMA_EVERY = 3  # one ordinary file in three is 4:4:4 (no chroma subsampling); the others 4:2:0, as a camera's


@dataclasses.dataclass
class Sample:
    folder: str         # a dataset root (train/<class>/...) holding the images to time
    paths: list         # the images, index order
    mean_kb: float      # mean file size, KB (1000 bytes)
    mean_mp: float      # mean megapixels
    skipped: int = 0    # sampled files set aside (not a plain RGB/grayscale JPEG)

    def describe(self):
        return f"{self.mean_kb:.0f} KB, {self.mean_mp:.2f} MP"


def _field(rng, h, w, beta):
    """A zero-mean, unit-std random field with amplitude spectrum 1/f**beta (natural images: beta ~ 1)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** beta
    spectrum[0, 0] = 0.0
    out = np.fft.irfft2(spectrum, s=(h, w)).astype(np.float32)
    return out / (out.std() + 1e-6)


def photo_like(rng, w, h, grain=1.5, texture=4.0, beta=1.4, detail=640):
    """An RGB uint8 image with a photograph's statistics: 1/f luminance, smoother chroma, objects, grain.

    An image larger than `detail` px is a scene drawn at `detail` px and enlarged (detail
    per pixel falls as a camera's resolution rises), plus full-resolution grain. beta 1.4,
    texture 4 and grain 1.5 give 500x375 files of 64-132 KB (q90 4:2:0 .. q96 4:4:4); the
    large ones, drawn at 300 px, 0.7-1.2 bits per pixel at q90 4:2:0 (drawn at 640 px,
    1.5-1.7, and 400 images would average an estimated 130 KB instead of 114).
    """
    reduce = max(1.0, max(w, h) / detail)
    sw, sh = int(round(w / reduce)), int(round(h / reduce))
    luma = 118 + 48 * _field(rng, sh, sw, beta)
    chroma = [np.asarray(Image.fromarray(14 * _field(rng, max(8, sh // 4), max(8, sw // 4), 1.3))
                         .resize((sw, sh), Image.BILINEAR)) for _ in range(2)]
    cb, cr = chroma[0] + rng.uniform(-25, 25), chroma[1] + rng.uniform(-25, 25)
    rgb = np.stack([luma + 1.402 * cr, luma - 0.344 * cb - 0.714 * cr, luma + 1.772 * cb], -1)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    # Objects: hard edges, as foreground things in a photo.
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x, y = int(rng.integers(0, sw)), int(rng.integers(0, sh))
        r = int(rng.integers(min(sw, sh) // 12, min(sw, sh) // 3))
        colour = tuple(int(c) for c in rng.integers(20, 236, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            draw.rectangle([x - r, y - r // 2, x + r, y + r // 2], fill=colour)
    arr = np.asarray(img, np.float32) + texture * _field(rng, sh, sw, 0.6)[..., None]  # texture, objects too
    if reduce > 1:
        arr = np.asarray(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                         np.float32)
    arr += grain * rng.standard_normal(arr.shape, dtype=np.float32)  # sensor grain
    return np.clip(arr, 0, 255).astype(np.uint8)


def make_imagenet_like(root, count, seed=0):
    """`count` photo-like JPEGs in root/train/<wnid>/ (4 classes); returns their paths in index order."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        large = i % LARGE_EVERY == LARGE_EVERY - 1
        sizes = LARGE_SIZES if large else SMALL_SIZES
        w, h = sizes[int(rng.integers(len(sizes)))]
        arr = photo_like(rng, w, h, grain=1.0, detail=300) if large else photo_like(rng, w, h)
        folder = os.path.join(root, "train", f"n{i % 4 + 1:08d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"img_{i:05d}.JPEG")
        Image.fromarray(arr).save(path, "JPEG", quality=int(QUALITIES[int(rng.integers(len(QUALITIES)))]),
                                  subsampling=0 if not large and i % FULL_CHROMA_EVERY == 0 else 2)
        paths.append(path)
    return paths


def measure(paths):
    """(mean file size in KB, mean megapixels) of image files."""
    sizes, pixels = [], []
    for path in paths:
        sizes.append(os.path.getsize(path))
        with Image.open(path) as img:
            pixels.append(img.width * img.height)
    return float(np.mean(sizes)) / 1000, float(np.mean(pixels)) / 1e6


def generated(root, count, seed=0):
    """The default corpus: make_imagenet_like in `root`, described."""
    paths = make_imagenet_like(root, count, seed)
    return Sample(root, paths, *measure(paths))


def _plain_jpeg(path):
    """True for a whole JPEG that PIL decodes as RGB or grayscale: what tf.data's decode_and_crop_jpeg takes too."""
    try:
        with Image.open(path) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            img.load()  # a truncated file raises here
            return True
    except Exception:  # unreadable: the producer would skip it; the other pipelines would stop
        return False


def sample_dataset(images_dir, count, root, seed=0):
    """`count` random training images of the dataset at `images_dir`, linked into root/train/<class>/.

    The dataset is listed by data/sources/index.py (any layout it accepts: folders, Kaggle, lists,
    Tiny ImageNet), so the producer and the other pipelines read the sample as a dataset
    of its own. Files that are not whole RGB/grayscale JPEGs (ImageNet has 22 CMYK files
    and a PNG) are passed over for the next ones: tf.data's decode_and_crop_jpeg and the
    bare decode would stop on them.
    """
    from data.sources.index import load_index
    from utils.errors import UserError
    index = load_index(images_dir, "train")
    order = np.random.default_rng(seed).permutation(len(index))
    paths, skipped = [], 0
    for k in order:
        if len(paths) == count:
            break
        source = index.paths[k]
        if not _plain_jpeg(source):
            skipped += 1
            continue
        folder = os.path.join(root, "train", index.classes[index.labels[k]])
        os.makedirs(folder, exist_ok=True)
        link = os.path.join(folder, f"{len(paths):06d}_{os.path.basename(source)}")
        os.symlink(os.path.abspath(source), link)
        paths.append(link)
    if len(paths) < count:
        passed = f" ({skipped} other files passed over)" if skipped else ""
        raise UserError(f"--images {count} is more than the {len(paths)} plain JPEG training images in "
                        f"{os.path.abspath(images_dir)}{passed}; pass --images {len(paths)} or fewer.")
    return Sample(root, paths, *measure(paths), skipped=skipped)


def encoded_size(arr, quality, subsampling):
    """Bytes of `arr` as a JPEG (for tuning the generator)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.tell()
