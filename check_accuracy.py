"""Validation accuracy of a run's saved epochs (top-1 and top-5), waiting for epochs still training.

    python check_accuracy.py --run_folder=mytestrun --epoch_start=0 --epoch_end=30 [--views 10|1|50] [--weights ema]
        [--crop C]

Each image's views (from preprocess_val.py) go through the epoch's SavedModel; the softmax
probabilities are averaged over the views and ranked. Results print as the seed's
`Epoch# e  Top 1 accuracy: x%  Top 5 accuracy: y%`, and go to <run>/accuracy.csv and
<run>/accuracy.png. The library code is engine/evaluate.py.
"""
import argparse

from utils.cli import add_config_arg, add_epoch_args, quiet_tensorflow, run_main
from settings import load_settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_folder", required=True, help="run name under [train] path_for_saving (or a path)")
    add_epoch_args(p, "first epoch to evaluate, or 'auto' = the first without a row in accuracy.csv",
                         "evaluate epochs up to this one, exclusive")
    p.add_argument("--views", type=int, default=10, choices=(10, 1, 50),
                   help="10 = 4 corners + centre, each flipped (default); 1 = centre crop; "
                        "50 = 5 scales x 10 (needs [preprocess_val] views_50 = true)")
    p.add_argument("--weights", default="raw", choices=("raw", "ema"),
                   help="raw = <epoch>/saved_model (default); ema = <epoch>/saved_model_ema, the moving average "
                        "of the weights ([train] ema_decay > 0); accuracy.csv keeps the two apart")
    p.add_argument("--crop", type=int, default=None,
                   help="side of the views in pixels (default [images] crop_size, as the validation store was built), up to the validation store's "
                        "eval_resize: evaluating above the training crop is how FFCV and torchvision report "
                        "their figures (FixRes); accuracy.csv keeps each crop's rows apart")
    p.add_argument("--timeout", type=float, default=None,
                   help="give up after waiting this many seconds for a missing epoch (default: wait forever)")
    p.add_argument("--batch_images", type=int, default=None,
                   help="images per forward call (default: about 256 views' worth)")
    add_config_arg(p)
    args = p.parse_args(argv)
    if args.batch_images is not None and args.batch_images < 1:
        p.error(f"--batch_images must be >= 1, received {args.batch_images}")
    if args.crop is not None and args.crop < 1:
        p.error(f"--crop must be >= 1, received {args.crop}")
    if args.timeout is not None and args.timeout < 0:
        p.error(f"--timeout must be >= 0, received {args.timeout}")
    return args


def main(argv=None):
    args = parse_args(argv)
    quiet_tensorflow()
    # Only paths and sizes are read: the SavedModel normalises itself and the evaluator takes any device.
    settings = load_settings(args.config, stats=False, decoder=False, devices=False)
    from engine.evaluate import check_accuracy  # TensorFlow loads only once arguments and config are checked
    check_accuracy(settings, args.run_folder, args.epoch_start, args.epoch_end, views=args.views,
                   timeout=args.timeout, batch_images=args.batch_images, weights=args.weights, crop=args.crop)
    return 0


if __name__ == "__main__":
    run_main(main)
