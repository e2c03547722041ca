"""One batch from the transforms: Recipe (everything that decides a batch's bytes besides the images) and
BatchBuilder (batch (epoch, b) of a dataset as uint8 images, int32 labels, float32 lighting coefficients).

Batch b of epoch e holds positions b*B .. b*B+B-1 of the epoch's permutation (data/sources/index.py); the image
at each position is cropped by the recipe's crop family (data/transforms/families.py) with draws keyed by
(seed, e, position), so a batch's bytes do not depend on which process or worker builds it. Machine w of W
(multi-worker training) builds only rows [w*B/W, (w+1)*B/W) of each batch, the same global positions, so the
W slices concatenated are the single-machine batch byte for byte.
"""
import dataclasses
import os

import numpy as np

from data.sources import scale_cache
from data.sources.index import epoch_permutation
from data.transforms import images, tiny_augment
from data.transforms.families import CROP_FAMILIES, USES_SCALE_CACHE
from data.transforms.progressive import crop_for
from data.transforms.scale_crop import image_draws
from utils.errors import UserError


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
    augmentation: str = "scale"         # a key of data.transforms.families.CROP_FAMILIES ('tiny': crop = full size)
    tiny: object = None                 # tiny_augment.TinyAugmentConfig when augmentation == 'tiny'
    worker_index: int = 0               # this machine's slice of each global batch: rows
    worker_count: int = 1               # [worker_index * B/worker_count, (worker_index + 1) * B/worker_count)

    @classmethod
    def from_settings(cls, settings, batch_size, cache_scales=(), worker=(0, 1)):
        """The recipe of resolved settings (mu/sigma and decoder resolved: settings.load_settings' defaults)."""
        images, decoder = settings.images, settings.runtime_preprocessing.decoder
        if settings.mu is None or decoder not in ("turbojpeg", "pil"):
            raise ValueError("Recipe.from_settings needs settings with mu/sigma and the decoder resolved")
        tiny = images.augmentation == "tiny"
        return cls(seed=settings.train.seed, batch_size=int(batch_size), crop=images.crop_size,
                   scales=tuple(settings.scales), pca_std=images.pca_std, mu=settings.mu, sigma=settings.sigma,
                   decoder=decoder,
                   cache_root=settings.preprocess.path_to_save if cache_scales and not tiny else None,
                   cached_scales=frozenset(cache_scales) if not tiny else frozenset(),
                   crop_sizes=settings.crop_sizes, augmentation=images.augmentation,
                   tiny=tiny_augment.TinyAugmentConfig.from_settings_section(settings.tiny_augment) if tiny else None,
                   worker_index=worker[0], worker_count=worker[1])

    def crop_for(self, epoch):
        return crop_for(self.crop_sizes or [[0, self.crop]], epoch)

    @property
    def rows(self):
        """Rows of each batch this machine builds: B/W."""
        return self.batch_size // self.worker_count


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
        out = np.empty((r.rows, crop, crop, 3), np.uint8)
        labels = np.empty(r.rows, np.int32)
        alphas = np.empty((r.rows, 3), np.float32)
        for slot in range(r.rows):
            position = batch * r.batch_size + r.worker_index * r.rows + slot
            draws = image_draws(r.seed, epoch, position, r.scales, r.pca_std)
            index = self._readable_crop(out, slot, perm, (epoch, position), draws)
            labels[slot] = self.labels[index]
            alphas[slot] = draws.alpha
        return out, labels, alphas

    def _readable_crop(self, out, slot, perm, at, draws):
        epoch, position = at
        r = self.recipe
        crop_fn = CROP_FAMILIES[r.augmentation]
        n = len(self.paths)
        for step in range(n):
            index = int(perm[(position + step) % n])
            path = self.paths[index]
            cached = self._cached(index, draws) if r.augmentation in USES_SCALE_CACHE else None
            try:
                crop_fn(path, out[slot], r, epoch, position, draws, cached)
                return index
            except images.BadImageError as e:
                self.skipped.add(path, str(e))
        raise UserError(f"None of the {n} training images can be decoded; check the dataset folder.")

    def _cached(self, index, draws):
        r = self.recipe
        if r.cache_root is None or draws.scale not in r.cached_scales:
            return None
        path = scale_cache.cached_image_path(r.cache_root, draws.scale, index)
        return path if os.path.exists(path) else None
