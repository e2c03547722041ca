"""The three crop families behind one signature, looked up by [images] augmentation.

    crop_fn(source, out, recipe, epoch, position, draws, cached_path)

writes the uint8 crop of `source` (a file path or a TFRecord record) for image `position` of epoch
`epoch` into `out` (uint8 [crop, crop, 3], crop = this epoch's size), and raises
data.transforms.images.BadImageError for an unreadable image. `recipe` carries the run's settings
(data/buffer/builder.py: Recipe), `draws` the scale crop's per-image draws (which also give every
family its lighting coefficients), `cached_path` preprocess.py's copy of the image at draws.scale or None.
Each family draws from its own stream keyed by (seed, epoch, position): the same bytes in any process.
"""
from data.transforms import inception_crop, tiny_augment
from data.transforms.scale_crop import scale_crop


def _scale(source, out, recipe, epoch, position, draws, cached_path):
    scale_crop(source, out.shape[0], draws, recipe.decoder, cached_path, out=out)


def _inception(source, out, recipe, epoch, position, draws, cached_path):
    out[...] = inception_crop.augment(source, out.shape[0], recipe.seed, epoch, position)


def _tiny(source, out, recipe, epoch, position, draws, cached_path):
    rng = tiny_augment.image_rng(recipe.seed, epoch, position)
    out[...] = tiny_augment.training_crop(source, recipe.crop, out.shape[0], rng, recipe.tiny)


CROP_FAMILIES = {"scale": _scale, "inception": _inception, "tiny": _tiny}
USES_SCALE_CACHE = ("scale",)  # the families that can cut their crop from preprocess.py's cache
