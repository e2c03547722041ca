"""Epoch save time with and without fsync (engine/run_folder.save_epoch's `durable`).

One save = what Trainer.save writes: the SavedModel, the tf.train.Checkpoint (weights,
batch-renorm statistics, SGD momentum slots, step) and config.txt, into a temp folder
renamed into place. `durable` adds an fsync of every file and folder before the rename
and of the run folder after it. Rounds alternate (plain, durable, plain, ...) in one
process on the same disk, so load from other processes hits both alike; the median of
each is printed with their ratio.

    .venv/bin/python bench/bench_save.py [--width 1.0] [--rounds 4] [--folder saved_models]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.cli import quiet_tensorflow  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier (default 1.0: the real ResNet-50)")
    parser.add_argument("--classes", type=int, default=1000, help="output classes (default 1000)")
    parser.add_argument("--rounds", type=int, default=4, help="saves of each kind (default 4)")
    parser.add_argument("--folder", default=os.path.join(ROOT, "saved_models"),
                        help="disk to save on: a temp run folder is made (and removed) inside it")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    from engine import run_folder
    from model import RenormConfig, build_model, export_saved_model
    net = build_model(arch="resnet50", num_classes=args.classes, width_multiplier=args.width,
                      renorm=RenormConfig(), l2_penalty=1e-4, seed=0)
    opt = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    opt.build(net.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=net, optimizer=opt)

    def write_parts(folder):
        export_saved_model(net, os.path.join(folder, "saved_model"), [0.5] * 3, [0.25] * 3)
        checkpoint.write(run_folder.checkpoint_prefix(folder))
        with open(os.path.join(folder, "config.txt"), "w") as f:
            f.write("# bench\n")

    from utils.files import fsync_tree
    fsync_seconds = []
    real_fsync_tree = fsync_tree

    def timed_fsync_tree(path):  # the part of a durable save spent waiting for the disk
        start = time.perf_counter()
        real_fsync_tree(path)
        fsync_seconds.append(time.perf_counter() - start)
    fsync_tree = timed_fsync_tree

    os.makedirs(args.folder, exist_ok=True)
    run = tempfile.mkdtemp(prefix=".tmp-bench-save-", dir=args.folder)
    times = {False: [], True: []}
    try:
        epoch = 0
        for _ in range(args.rounds):
            for durable in (False, True):
                start = time.perf_counter()
                run_folder.save_epoch(run, epoch, write_parts, durable=durable)
                times[durable].append(time.perf_counter() - start)
                size = run_folder.folder_bytes(run_folder.epoch_dir(run, epoch))
                shutil.rmtree(run_folder.epoch_dir(run, epoch))
                epoch += 1
    finally:
        shutil.rmtree(run, ignore_errors=True)
    plain, durable = statistics.median(times[False]), statistics.median(times[True])
    print(f"epoch folder {size / 1e6:.1f} MB (width {args.width}, {args.classes} classes) in {args.folder}")
    print(f"save without fsync: median {plain:.2f} s  (all: {', '.join(f'{t:.2f}' for t in times[False])})")
    print(f"save with fsync:    median {durable:.2f} s  (all: {', '.join(f'{t:.2f}' for t in times[True])})")
    print(f"ratio durable/plain: {durable / plain:.2f}; fsync of the folder itself: median "
          f"{statistics.median(fsync_seconds):.2f} s (all: {', '.join(f'{t:.2f}' for t in fsync_seconds)})")
    return 0


if __name__ == "__main__":
    main()
