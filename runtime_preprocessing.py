"""Keep a buffer of ready training batches ahead of train.py (the original write-up's runtime preprocessing).

    python runtime_preprocessing.py --epoch_start=0 --epoch_end=30 --batch_size=64 [--config config.txt]

Fills [train] buffer_folder with up to buffer_size batches (uint8 crops, labels and
PCA lighting shifts), follows the trainer through training_progress.txt, deletes
what it consumed and refills when less than refill_threshold of the buffer is left.
Safe to kill and rerun with the same command: it continues where the buffer stands.
The protocol is described in data/buffer/__init__.py, the augmentation in data/transforms/scale_crop.py.
"""
import os

# One worker process per core: BLAS threads inside each would only fight over the cores.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from utils.cli import add_config_arg, add_epoch_args, run_main, setup_logging  # noqa: E402
from settings import load_settings  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.processes import worker_info  # noqa: E402
from data.buffer.producer import Producer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arg(p)
    add_epoch_args(p, "first epoch to produce, or 'auto' to follow training_progress.txt from wherever it "
                            "is (a file already past --epoch_end is taken as left over until the trainer writes it)",
                         "produce epochs up to epoch_end - 1")
    p.add_argument("--batch_size", type=int, required=True,
                   help="images per global batch (all machines together); must match train.py's")
    p.add_argument("--clear_buffer", action="store_true",
                   help="delete batches of another run (different batch size, crop, seed, dataset, decoder or "
                        "cached scales) instead of refusing")
    p.add_argument("--once", action="store_true", help="fill the buffer once and exit (pre-filling, benchmarks)")
    p.add_argument("--num_workers", type=int, default=0, help="override [runtime_preprocessing] num_of_threads")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--worker_index", type=int, default=None,
                   help="this machine's position in a multi-worker run (default: from TF_CONFIG, as train.py "
                        "reads it; refused when it contradicts TF_CONFIG); it builds only rows [i*B/W, (i+1)*B/W) "
                        "of each global batch")
    p.add_argument("--worker_count", type=int, default=None,
                   help="machines in a multi-worker run, W (default: from TF_CONFIG; 1 without it)")
    return p.parse_args(argv)


def worker_slice(args):
    """(w, W): --worker_index/--worker_count when given (both), else the position TF_CONFIG gives train.py."""
    if (args.worker_index is None) != (args.worker_count is None):
        raise UserError("--worker_index and --worker_count go together; pass both, or neither to take "
                              "them from TF_CONFIG.")
    if args.worker_index is None:
        return worker_info()
    if os.environ.get("TF_CONFIG", "").strip():
        position = worker_info()
        if position != (args.worker_index, args.worker_count):
            raise UserError(
                f"--worker_index={args.worker_index} --worker_count={args.worker_count} contradicts TF_CONFIG, "
                f"which makes this machine worker {position[0]} of {position[1]} (the rows its train.py trains "
                f"on); drop the two flags, or fix TF_CONFIG.")
    return args.worker_index, args.worker_count


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    # Every auto resolved and every cross-key check done here (settings/__init__.py); the same checks as
    # train.py's, so a batch size the trainer would refuse is refused before any batch is built.
    settings = load_settings(args.config, devices=True, batch_size=args.batch_size, worker=worker_slice(args))
    # SIGTERM unwinds like Ctrl-C, so the workers stop and the heartbeat says 'stopped'.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    producer = Producer(settings, args.batch_size, args.epoch_start, args.epoch_end, clear_buffer=args.clear_buffer,
                        num_workers=args.num_workers or None, progress=not args.no_progress, once=args.once,
                        worker=settings.worker)
    produced = producer.run()
    print(f"produced {produced} batches into {settings.train.buffer_folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
