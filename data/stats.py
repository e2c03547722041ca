"""Per-channel pixel mean and standard deviation of a set of images (get_mu_sigma.py).

Every pixel of every image counts once, at the image's decoded size (the
original took one random 224 crop per pre-resized image instead; at ImageNet
scale the two agree to about 1e-3). Pixels are in [0, 1]. Each image gives
(count, mean, sum of squared deviations) in float64 and the per-image results
are merged in index order with Chan et al.'s pairwise update, which is
numerically stable and gives the same bits whatever the number of workers.
"""
import numpy as np

from data import images
from data.pool import imap_progress


def image_moments(path):
    """(pixel count, channel means [3], channel sums of squared deviations [3]) of one image, or a skip reason."""
    try:
        img = images.decode_rgb(path)
    except images.BadImageError as e:
        return str(e)
    x = np.asarray(img, np.float64).reshape(-1, 3) / 255.0
    mean = x.mean(axis=0)
    return x.shape[0], mean, ((x - mean) ** 2).sum(axis=0)


def merge(a, b):
    """Combine two (count, mean, M2) triples (Chan, Golub, LeVeque)."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta ** 2 * (n_a * n_b / n)


def choose_subset(count, max_images, seed):
    """Sorted positions of a seeded random subset of max_images (all positions if 0 or >= count)."""
    if max_images <= 0 or max_images >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=max_images, replace=False))


def mu_sigma_of(paths, num_workers=0, progress=True, skip_list=None):
    """(mu [3], sigma [3], images used, pixels) over `paths`; unreadable files go to skip_list."""
    total = None
    used = 0
    for path, result in zip(paths, imap_progress(image_moments, paths, num_workers, desc="mu/sigma",
                                                 disable=not progress)):
        if isinstance(result, str):
            if skip_list is not None:
                skip_list.add(path, result)
            continue
        total = result if total is None else merge(total, result)
        used += 1
    if total is None:
        raise ValueError("no readable images")
    n, mean, m2 = total
    return mean, np.sqrt(m2 / n), used, int(n)
