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

import utils
from data.sources import scale_cache
from data.sources.index import load_index


def parse_sides(text, cfg, any_side=False):
    if text == "all":
        return utils.scales(cfg)
    try:
        sides = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sides = []
    if not sides or min(sides) < 1:
        raise utils.UserError(f"--shorter_side must be a positive integer, a comma-separated list or 'all', "
                              f"received '{text}'.")
    # The producer reads a cache only for the sides it draws: any other side is disk and hours for nothing.
    unused = [s for s in sides if s not in utils.scales(cfg)]
    if unused and not any_side:
        im = cfg.images
        raise utils.UserError(f"--shorter_side {', '.join(map(str, unused))} is not one of the scales training "
                              f"draws ([images] scale_min {im.scale_min} to scale_max {im.scale_max} step "
                              f"{im.scale_step}: {', '.join(map(str, utils.scales(cfg)))}), so no run would read "
                              f"that cache; pass one of those, 'all', or --any_side to build it anyway.")
    return sides


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_config_arg(p)
    p.add_argument("--shorter_side", required=True, help="shorter side S in pixels, 'S1,S2,...', or 'all'")
    p.add_argument("--num_workers", type=int, default=None, help="override [preprocess] num_workers (0 = all cores)")
    p.add_argument("--any_side", action="store_true",
                   help="build a --shorter_side that is not one of [images]'s scales")
    args = p.parse_args()
    utils.setup_logging()
    cfg = utils.load_config(args.config)
    if cfg.data.source != "folder":  # the cache is indexed like the folder layout's train list
        raise utils.UserError(f"preprocess.py's scale cache is built from image folders only, and [data] source = "
                              f"{cfg.data.source}; the producer resizes shard images on the fly, so skip this "
                              f"script (and set [runtime_preprocessing] use_scale_cache = false).")
    sides = parse_sides(args.shorter_side, cfg, args.any_side)
    index = load_index(cfg.preprocess.ImageNet_folder, "train", cfg.train.N)
    utils.check_class_count(cfg, len(index.classes), "counted by preprocess.py")
    workers = cfg.preprocess.num_workers if args.num_workers is None else args.num_workers
    root = cfg.preprocess.path_to_save
    logging.info("%d training images, %d classes (%s layout) -> %s", len(index), len(index.classes), index.layout, root)
    for side in sides:
        r = scale_cache.build_scale(root, index, side, workers, cfg.preprocess.jpeg_quality)
        print(f"S={side}: wrote {r['written']}, kept {r['existing']} finished, skipped {r['unreadable']} unreadable "
              f"in {r['seconds']:.1f} s -> {root}/{side}/")
    return 0


if __name__ == "__main__":
    utils.run_main(main)
