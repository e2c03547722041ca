"""Per-channel mean and standard deviation of the training pixels, for input normalisation.

    python get_mu_sigma.py [--config config.txt] [--max_images 50000]

Writes <[get_mu_sigma] path_to_save>/mu_sigma.json ({"mu": [3], "sigma": [3],
"images": n, ...}); a config whose [utils] mu_*/sigma_* say 'auto' reads it, so
no hand-editing is needed. Pixels are in [0, 1] and every pixel of every image
counts once at the image's decoded size (see data/sources/stats.py).
"""
import argparse
import json
import os
import time

from settings import MU_SIGMA_FILE, load_settings
from utils.cli import add_config_arg, run_main, setup_logging
from utils.errors import UserError
from utils.files import atomic_write_text
from data.sources import stats
from data.transforms.images import SkipList
from data.sources.index import load_source_index


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    p.add_argument("--max_images", type=int, default=None,
                   help="use a seeded random subset of this many images (default: [get_mu_sigma] max_images; 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    p.add_argument("--num_workers", type=int, default=None, help="override [preprocess] num_workers (0 = all cores)")
    args = p.parse_args()
    setup_logging()
    settings = load_settings(args.config, stats=False, decoder=False, devices=False)
    max_images = settings.get_mu_sigma.max_images if args.max_images is None else args.max_images
    if max_images < 0:
        raise UserError(f"--max_images must be >= 0, received {max_images}.")
    workers = settings.preprocess.num_workers if args.num_workers is None else args.num_workers
    t0 = time.time()
    index = load_source_index(settings.data.source, settings.preprocess.ImageNet_folder, "train", settings.train.N,
                              workers)
    chosen = stats.choose_subset(len(index), max_images, args.seed)
    paths = [index.paths[i] for i in chosen]
    skipped = SkipList()
    try:
        mu, sigma, used, pixels = stats.mu_sigma_of(paths, workers, skip_list=skipped)
    except ValueError:
        raise UserError(f"None of the {len(paths)} chosen training images could be read; "
                              f"check {settings.preprocess.ImageNet_folder}.") from None
    out_dir = settings.get_mu_sigma.path_to_save
    os.makedirs(out_dir, exist_ok=True)
    result = {"mu": [round(float(v), 6) for v in mu], "sigma": [round(float(v), 6) for v in sigma],
              "images": used, "pixels": pixels, "unreadable": len(skipped), "max_images": max_images,
              "seed": args.seed, "dataset_fingerprint": index.fingerprint(),
              "method": "every pixel of every image at its decoded size, pixels/255, population std"}
    out = os.path.join(out_dir, MU_SIGMA_FILE)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    skipped.save(os.path.join(out_dir, "skipped_images.txt"))
    print(f"mu    = {result['mu'][0]:.5f} {result['mu'][1]:.5f} {result['mu'][2]:.5f}")
    print(f"sigma = {result['sigma'][0]:.5f} {result['sigma'][1]:.5f} {result['sigma'][2]:.5f}")
    print(f"over {used} images ({skipped.summary()}) in {time.time() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
