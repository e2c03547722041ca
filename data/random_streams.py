"""Where each seeded draw comes from: the one table of the project's random streams.

Every draw that decides a batch's bytes or a run's result is keyed by the config's [train] seed and by where
it is used, never by a process's state, so any worker or machine that builds a draw gets the same one.
Streams that share a key are kept apart by a stream id (numpy) or a personalisation string (blake2b):

  draw                                     key (stream)                     generator  owner
  epoch order of the training images       (seed, epoch)                    numpy      data/sources/index.py
  scale crop: side S, window, flip, PCA    (seed, epoch, position)          blake2b    data/transforms/scale_crop.py
    lighting coefficients                    (person SCALE_CROP_PERSON)
  tiny augment: order, magnitudes, crop    (seed, epoch, position, TINY)    numpy      data/transforms/tiny_augment.py
  inception crop: flip, box                (seed, epoch, position, INCEP.)  numpy      data/transforms/inception_crop.py
  mixup/cutmix: mix or not, lambda, box    (seed, epoch, batch, MIXING)     numpy      engine/mixing.py
  get_mu_sigma.py's image subset           (--seed)                         numpy      data/sources/stats.py
  weight initialisation, TF ops            [train] seed                     keras      engine/trainer.py, model/

Not training draws: tools/make_demo_dataset.py draws the generated images from (seed, split, k, j) and the
validation order from (seed, 99); inference.py --benchmark's sample image from 0.

`position` is the image's place in the epoch's order (batch b's rows are b*B .. b*B+B-1), so the draws of an
image do not depend on the batch size's split over workers or machines. The stream ids and the personalisation
string are part of the batch bytes (tests/test_batch_bytes.py pins them): never change one.
"""
import numpy as np

SCALE_CROP_PERSON = b"seed001-draws"  # blake2b personalisation: no other stream hashes the same key
TINY_STREAM = 2
INCEPTION_STREAM = 3
MIXING_STREAM = 0x6D6978  # 'mix'; keyed by batch, not by position


def keyed_rng(seed, epoch, index, stream):
    """The numpy generator of one image's (index = position) or one batch's (index = batch) draws."""
    return np.random.default_rng([int(seed), int(epoch), int(index), stream])


def epoch_order_rng(seed, epoch):
    return np.random.default_rng([int(seed), int(epoch)])


def subset_rng(seed):
    return np.random.default_rng(seed)
