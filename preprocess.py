"""Optional: cache the training set resized to one shorter side, <path_to_save>/<S>/img_<i>.jpg.

    python preprocess.py --shorter_side=256 [--config config.txt]
    python preprocess.py --shorter_side=all      # every scale of [images] scale_min..scale_max

The producer (runtime_preprocessing.py) reads a scale's cache when it is
complete and resizes on the fly otherwise, so this only saves CPU during
training. Image i is the same photo in every scale folder; labels are stored
once in <path_to_save>/labels.npy. Rerunning resumes: finished files are kept.
"""
import argparse
import logging

from settings import load_settings
from utils.cli import add_config_arg, run_main, setup_logging
from utils.errors import UserError
from data.sources import scale_cache
from data.sources.index import load_index


def parse_sides(text, settings, any_side=False):
    if text == "all":
        return list(settings.scales)
    try:
        sides = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sides = []
    if not sides or min(sides) < 1:
        raise UserError(f"--shorter_side must be a positive integer, a comma-separated list or 'all', "
                              f"received '{text}'.")
    # The producer reads a cache only for the sides it draws: any other side is disk and hours for nothing.
    unused = [s for s in sides if s not in settings.scales]
    if unused and not any_side:
        im = settings.images
        raise UserError(f"--shorter_side {', '.join(map(str, unused))} is not one of the scales training "
                              f"draws ([images] scale_min {im.scale_min} to scale_max {im.scale_max} step "
                              f"{im.scale_step}: {', '.join(map(str, settings.scales))}), so no run would read "
                              f"that cache; pass one of those, 'all', or --any_side to build it anyway.")
    return sides


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    p.add_argument("--shorter_side", required=True, help="shorter side S in pixels, 'S1,S2,...', or 'all'")
    p.add_argument("--num_workers", type=int, default=None, help="override [preprocess] num_workers (0 = all cores)")
    p.add_argument("--any_side", action="store_true",
                   help="build a --shorter_side that is not one of [images]'s scales")
    args = p.parse_args()
    setup_logging()
    settings = load_settings(args.config, stats=False, decoder=False, devices=False)
    if settings.data.source != "folder":  # the cache is indexed like the folder layout's train list
        raise UserError(f"preprocess.py's scale cache is built from image folders only, and [data] source = "
                              f"{settings.data.source}; the producer resizes shard images on the fly, so skip this "
                              f"script (and set [runtime_preprocessing] use_scale_cache = false).")
    sides = parse_sides(args.shorter_side, settings, args.any_side)
    index = load_index(settings.preprocess.ImageNet_folder, "train", settings.train.N)
    settings = settings.with_classes(len(index.classes), "counted by preprocess.py")
    workers = settings.preprocess.num_workers if args.num_workers is None else args.num_workers
    root = settings.preprocess.path_to_save
    logging.info("%d training images, %d classes (%s layout) -> %s", len(index), len(index.classes), index.layout, root)
    for side in sides:
        r = scale_cache.build_scale(root, index, side, workers, settings.preprocess.jpeg_quality)
        print(f"S={side}: wrote {r['written']}, kept {r['existing']} finished, skipped {r['unreadable']} unreadable "
              f"in {r['seconds']:.1f} s -> {root}/{side}/")
    return 0


if __name__ == "__main__":
    run_main(main)
