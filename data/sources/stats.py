"""Per-channel pixel mean and standard deviation of a set of images (get_mu_sigma.py).

Every pixel of every image counts once, at the image's decoded size (the
original took one random 224 crop per pre-resized image instead; at ImageNet
scale the two agree to about 1e-3). Pixels are in [0, 1].

Exact arithmetic: per image, the channel sums of the uint8 values and of their
squares are integers (exact in float64 up to 2^53, i.e. any image), and the
totals are accumulated as Python integers. The variance n*S2 - S1^2 is then
formed exactly, so there is no cancellation however many images are summed,
and the result is the same bits whatever the number of workers.
"""
import numpy as np

from data.transforms import images
from data.pool import imap_progress
from data.random_streams import subset_rng


def image_sums(path):
    """(pixel count, channel sums [3], channel sums of squares [3]) as ints, or the reason it is unreadable."""
    try:
        img = images.decode_rgb(path)
    except images.BadImageError as e:
        return str(e)
    x = np.asarray(img, np.float64).reshape(-1, 3)
    return x.shape[0], [int(v) for v in x.sum(axis=0)], [int(v) for v in np.einsum("ij,ij->j", x, x)]


def moments(count, sums, squares):
    """(mean [3], std [3]) of pixels/255 from exact integer totals (population std)."""
    mean = np.array([s / count for s in sums]) / 255.0
    var = np.array([(count * q - s * s) / (count * count) for s, q in zip(sums, squares)]) / 255.0 ** 2
    return mean, np.sqrt(var)


def choose_subset(count, max_images, seed):
    """Sorted positions of a seeded random subset of max_images (all positions if 0 or >= count)."""
    if max_images <= 0 or max_images >= count:
        return np.arange(count)
    return np.sort(subset_rng(seed).choice(count, size=max_images, replace=False))  # data/random_streams.py


def mu_sigma_of(paths, num_workers=0, progress=True, skip_list=None):
    """(mu [3], sigma [3], images used, pixels) over `paths`; unreadable files go to skip_list."""
    count, sums, squares, used = 0, [0, 0, 0], [0, 0, 0], 0
    for path, result in zip(paths, imap_progress(image_sums, paths, num_workers, desc="mu/sigma",
                                                 disable=not progress)):
        if isinstance(result, str):
            if skip_list is not None:
                skip_list.add(path, result)
            continue
        count += result[0]
        sums = [a + b for a, b in zip(sums, result[1])]
        squares = [a + b for a, b in zip(squares, result[2])]
        used += 1
    if used == 0:
        raise ValueError("no readable images")
    mean, std = moments(count, sums, squares)
    return mean, std, used, count
