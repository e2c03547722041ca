"""Store the validation set for check_accuracy.py: uint8 images in a few packed, memory-mapped files.

    python preprocess_val.py [--config config.txt]

Stores each image resized to shorter side [images] eval_resize (the 10-view
protocol: 4 corners + centre, each also flipped; and the 1-view centre crop),
and with [preprocess_val] views_50 = true also what the original's 50-view set
(shorter sides [images] eval_scales_50) needs. Rerunning resumes an interrupted
build. See data/sources/val_store.py for the file layout.
"""
import argparse
import logging
import time

from utils.cli import add_config_arg, run_main, setup_logging
from settings import load_settings
from data.sources import val_store
from data.sources.index import load_source_index


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    p.add_argument("--num_workers", type=int, default=None, help="override [preprocess] num_workers (0 = all cores)")
    args = p.parse_args()
    setup_logging()
    settings = load_settings(args.config, stats=False, decoder=False, devices=False)
    pv, im = settings.preprocess_val, settings.images
    t0 = time.time()
    workers = settings.preprocess.num_workers if args.num_workers is None else args.num_workers
    index = load_source_index(settings.data.source, pv.ImageNet_folder, "val", pv.N, workers)
    logging.info("%d validation images, %d classes (%s layout) -> %s", len(index), len(index.classes),
                 index.layout, pv.path_to_save)
    meta = val_store.build_store(pv.path_to_save, index, im.crop_size, im.eval_resize, pv.views_50,
                                 im.eval_scales_50, pv.chunk_images, workers)
    print(f"{meta['images']} validation images stored ({len(meta['skipped'])} unreadable skipped), protocols "
          f"{', '.join(map(str, meta['protocols']))}, {meta['bytes_per_image'] / 1e3:.1f} KB per image "
          f"(the original: 15 MB), in {time.time() - t0:.1f} s -> {pv.path_to_save}")
    return 0


if __name__ == "__main__":
    run_main(main)
