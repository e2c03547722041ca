"""Train the ResNet on batches from the buffer that runtime_preprocessing.py fills.

    python train.py --run_folder=mytestrun --epoch_start=0 --epoch_end=30 --batch_size=64 --learning_rate=0.01

Saves <path_for_saving>/<run>/<epoch>/ after every epoch (saved_model/, checkpoint/,
config.txt; the folder appears only when complete). --epoch_start=E > 0 resumes
from epoch E-1's checkpoint (weights, moving statistics, momentum, loss scale,
global step); --epoch_start=auto continues after the last complete epoch. Start the
producer with the same --epoch_start, --epoch_end and --batch_size. Without
--learning_rate the [schedule] section sets the rate as a function of the global step.
Logs: <run>/log.csv (one row per epoch), <run>/tensorboard/, <run>/train.log, <run>/batches.log.
"""
import argparse
import logging
import os
import shlex
import signal
import sys

import utils
from data.buffer.protocol import MANIFEST
from data.buffer.reader import BufferReader
from engine import run_folder, run_identity
from engine.distribute import is_chief
from engine.waiting import Reminder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_folder", required=True, help="run name; epochs go to <path_for_saving>/<run>/<epoch>/")
    utils.add_epoch_args(p, "first epoch to train (E > 0 resumes from epoch E-1), or 'auto' = after the last "
                            "complete one", "train up to this epoch, exclusive")
    p.add_argument("--batch_size", required=True, type=int,
                   help="global batch size; must equal runtime_preprocessing.py's (split across replicas)")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="constant learning rate for this invocation (the seed's meaning); default: [schedule]")
    p.add_argument("--overwrite", action="store_true", help="replace epoch folders that already exist")
    utils.add_config_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: a save in progress removes its temp folder, no epoch folder is half-written.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    cfg = utils.load_config(args.config)
    if args.batch_size < 1:
        raise utils.UserError(f"--batch_size must be a positive integer, received {args.batch_size}.")
    run_path = run_folder.run_dir(cfg.train.path_for_saving, args.run_folder)
    epoch_start = run_folder.resolve_epoch_start(run_path, args.epoch_start)
    # Ctrl-C after an epoch was saved: rerunning an integer --epoch_start would collide with it.
    utils.set_interrupt_advice(lambda: run_folder.resume_advice(run_path, args.epoch_start))
    chief = is_chief()
    if args.epoch_start == "auto" and epoch_start >= args.epoch_end:
        print(f"{run_path} already holds epochs 0..{epoch_start - 1}; nothing to train below --epoch_end="
              f"{args.epoch_end}.", file=sys.stderr)
        return 0
    # Everything a user can get wrong is checked before TensorFlow starts, and before the run
    # folder is created, so a refused run leaves nothing behind.
    if chief:
        run_folder.check_plan(run_path, epoch_start, args.epoch_end, args.overwrite)
    utils.setup_logging()
    check_identity(cfg, args, run_path, epoch_start, chief)  # before waiting for a producer
    reader = open_buffer(cfg, args)
    changes = check_identity(cfg, args, run_path, epoch_start, chief, reader.num_classes)
    if not chief:  # only the chief writes the run folder
        return train(cfg, args, run_path, epoch_start, reader)
    with run_folder.removed_if_left_empty(run_path), run_folder.locked(run_path):
        utils.setup_logging(os.path.join(run_path, "train.log"))
        if changes:
            logging.getLogger("train").info(changes)
        return train(cfg, args, run_path, epoch_start, reader)


def check_identity(cfg, args, run_path, epoch_start, chief, num_classes=None):
    """A resume whose settings would not fit the checkpoint is refused before TensorFlow reads it
    (engine/run_identity.py); returns the line naming accepted recipe changes, or None.
    `num_classes`: the dataset's, once the producer's manifest gives it."""
    if not (chief and epoch_start):
        return None
    utils.quiet_tensorflow()  # resolving mixed_precision = auto imports TensorFlow to list the GPUs
    from model.precision import resolve_mixed_precision
    return run_identity.check_resume(run_path, epoch_start, cfg.resolved_text(),
                                     resolve_mixed_precision(cfg.train.mixed_precision),
                                     cfg.model.num_classes or num_classes, args.learning_rate)


def open_buffer(cfg, args):
    """The buffer reader, once the producer's manifest agrees with this run (waits for a producer,
    saying so at once and every 30 s while no manifest exists)."""
    reader = BufferReader(cfg, args.batch_size)
    mu, sigma = utils.mu_sigma(cfg)
    manifest = os.path.join(cfg.train.buffer_folder, MANIFEST)
    limit = cfg.train.wait_timeout
    start = (f"start runtime_preprocessing.py --epoch_start={args.epoch_start} --epoch_end={args.epoch_end} "
             f"--batch_size={args.batch_size} with this config")
    with Reminder(logging.getLogger("train").warning, lambda: not os.path.exists(manifest),
                  f"no producer has written {manifest} yet; {start} (waiting up to {limit:.0f} s, [train] "
                  f"wait_timeout).",
                  lambda waited: f"still no {manifest} after {waited:.0f} s; {start} (giving up in "
                                 f"{max(0.0, limit - waited):.0f} s)."):
        reader.check_manifest(mu, sigma)  # waits for the producer; batch size, seed, crop and mu/sigma must match
    utils.check_class_count(cfg, reader.num_classes, "per the producer's manifest")
    return reader


def train(cfg, args, run_path, epoch_start, reader):
    resume = run_folder.checkpoint_prefix(run_folder.epoch_dir(run_path, epoch_start - 1)) if epoch_start else None
    utils.quiet_tensorflow()
    from engine.trainer import Trainer  # TensorFlow loads only once arguments, config and buffer are checked
    trainer = Trainer(cfg, reader, run_path, args.batch_size, reader.num_classes,
                      learning_rate=args.learning_rate, epoch_end=args.epoch_end, overwrite=args.overwrite,
                      command=shlex.join([os.path.basename(sys.executable), *sys.argv]))
    if resume:
        trainer.restore(resume, expected_epoch=epoch_start - 1)
    trainer.train(epoch_start, args.epoch_end)
    return 0


if __name__ == "__main__":
    utils.run_main(main)
