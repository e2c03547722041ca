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

from settings import load_settings
from utils.cli import add_config_arg, add_epoch_args, quiet_tensorflow, run_main, set_interrupt_advice, setup_logging
from data.buffer.protocol import MANIFEST
from data.buffer.reader import BufferReader
from engine import run_folder, run_identity
from engine.distribute import is_chief
from engine.waiting import Reminder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_folder", required=True, help="run name; epochs go to <path_for_saving>/<run>/<epoch>/")
    add_epoch_args(p, "first epoch to train (E > 0 resumes from epoch E-1), or 'auto' = after the last "
                            "complete one", "train up to this epoch, exclusive")
    p.add_argument("--batch_size", required=True, type=int,
                   help="global batch size; must equal runtime_preprocessing.py's (split across replicas)")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="constant learning rate for this invocation (the seed's meaning); default: [schedule]")
    p.add_argument("--overwrite", action="store_true", help="replace epoch folders that already exist")
    add_config_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: a save in progress removes its temp folder, no epoch folder is half-written.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    # Every auto resolved and every cross-key check done here, before TensorFlow loads (settings/__init__.py).
    # decoder=False: the producer decodes (and records its decoder in the buffer manifest), not the trainer.
    settings = load_settings(args.config, decoder=False, devices=True, batch_size=args.batch_size)
    run_path = run_folder.run_dir(settings.train.path_for_saving, args.run_folder)
    epoch_start = run_folder.resolve_epoch_start(run_path, args.epoch_start)
    # Ctrl-C after an epoch was saved: rerunning an integer --epoch_start would collide with it.
    set_interrupt_advice(lambda: run_folder.resume_advice(run_path, args.epoch_start))
    chief = is_chief()
    if args.epoch_start == "auto" and epoch_start >= args.epoch_end:
        print(f"{run_path} already holds epochs 0..{epoch_start - 1}; nothing to train below --epoch_end="
              f"{args.epoch_end}.", file=sys.stderr)
        return 0
    # Everything a user can get wrong is checked before TensorFlow starts, and before the run
    # folder is created, so a refused run leaves nothing behind.
    if chief:
        run_folder.check_plan(run_path, epoch_start, args.epoch_end, args.overwrite)
    setup_logging()
    check_identity(settings, args, run_path, epoch_start, chief)  # before waiting for a producer
    settings, reader = open_buffer(settings, args)
    changes = check_identity(settings, args, run_path, epoch_start, chief)  # with the class count now
    if not chief:  # only the chief writes the run folder
        return train(settings, args, run_path, epoch_start, reader)
    with run_folder.removed_if_left_empty(run_path), run_folder.locked(run_path):
        setup_logging(os.path.join(run_path, run_folder.TRAIN_LOG))
        if changes:
            logging.getLogger("train").info(changes)
        return train(settings, args, run_path, epoch_start, reader)


def check_identity(settings, args, run_path, epoch_start, chief):
    """A resume whose settings would not fit the checkpoint is refused before TensorFlow reads it
    (engine/run_identity.py); returns the line naming accepted recipe changes, or None. The settings
    are resolved already (mixed_precision for this machine; num_classes once the manifest gave it)."""
    if not (chief and epoch_start):
        return None
    return run_identity.check_resume(run_path, epoch_start, settings.resolved_text(),
                                     (settings.train.mixed_precision, settings.precision_reason),
                                     settings.model.num_classes or None, args.learning_rate)


def open_buffer(settings, args):
    """(settings with [model] num_classes resolved, the buffer reader), once the producer's manifest agrees
    with this run (waits for a producer, saying so at once and every 30 s while no manifest exists)."""
    reader = BufferReader(settings, args.batch_size)
    manifest = os.path.join(settings.train.buffer_folder, MANIFEST)
    limit = settings.train.wait_timeout
    start = (f"start runtime_preprocessing.py --epoch_start={args.epoch_start} --epoch_end={args.epoch_end} "
             f"--batch_size={args.batch_size} with this config")
    with Reminder(logging.getLogger("train").warning, lambda: not os.path.exists(manifest),
                  f"no producer has written {manifest} yet; {start} (waiting up to {limit:.0f} s, [train] "
                  f"wait_timeout).",
                  lambda waited: f"still no {manifest} after {waited:.0f} s; {start} (giving up in "
                                 f"{max(0.0, limit - waited):.0f} s)."):
        reader.check_manifest(settings.mu, settings.sigma)  # waits for the producer; batch size, seed, crop, mu/sigma
    return settings.with_classes(reader.num_classes, "per the producer's manifest"), reader


def train(settings, args, run_path, epoch_start, reader):
    resume = run_folder.checkpoint_prefix(run_folder.epoch_dir(run_path, epoch_start - 1)) if epoch_start else None
    quiet_tensorflow()
    from engine.trainer import Trainer  # TensorFlow loads only once arguments, config and buffer are checked
    trainer = Trainer(settings, reader, run_path, args.batch_size, learning_rate=args.learning_rate,
                      epoch_end=args.epoch_end, overwrite=args.overwrite, command=shlex.join([os.path.basename(sys.executable), *sys.argv]))
    if resume:
        trainer.restore(resume, expected_epoch=epoch_start - 1)
    trainer.train(epoch_start, args.epoch_end)
    return 0


if __name__ == "__main__":
    run_main(main)
