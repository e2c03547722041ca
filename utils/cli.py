"""Command-line helpers shared by every script: --config and --epoch_start/--epoch_end, logging set-up,
quiet TensorFlow start-up, and run_main (a UserError as one sentence, Ctrl-C as one line).
"""
import argparse
import logging
import os
import sys

from utils.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_logging(log_file=None, level=logging.INFO):
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)


UNDER_LAUNCHER_ENV = "RESNET_UNDER_LAUNCHER"  # set by tools/launch.py for its children
_interrupt_advice = None  # a callable giving the rerun advice at Ctrl-C time (set_interrupt_advice)


def set_interrupt_advice(advice):
    """`advice()` -> the sentence printed after 'interrupted;' on Ctrl-C, computed when it happens
    (train.py's depends on which epochs were saved meanwhile)."""
    global _interrupt_advice
    _interrupt_advice = advice


def interrupt_line():
    advice = _interrupt_advice() if _interrupt_advice else "Rerun the same command to resume."
    return f"interrupted; nothing half-written was kept. {advice}"


def run_main(main):
    """Run a script's main(); print a UserError as one sentence and exit 2, Ctrl-C as exit 130.

    Under tools/launch.py a child says nothing on Ctrl-C: the launcher prints the one line.
    """
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if not os.environ.get(UNDER_LAUNCHER_ENV):
            print(interrupt_line(), file=sys.stderr)
        sys.exit(130)


def epoch_start_arg(text):
    """The argparse type of every script's --epoch_start: an epoch >= 0, or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an epoch >= 0 or 'auto', received '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an epoch >= 0 or 'auto', received {value}")
    return value


def add_epoch_args(parser, start_help, end_help):
    """--epoch_start (epoch_start_arg) and --epoch_end (int), the same in every script."""
    parser.add_argument("--epoch_start", required=True, type=epoch_start_arg, help=start_help)
    parser.add_argument("--epoch_end", required=True, type=int, help=end_help)


def check_epoch_range(epoch_start, epoch_end):
    """UserError unless epoch_start < epoch_end: epochs epoch_start..epoch_end-1 are processed."""
    if epoch_end <= epoch_start:
        raise UserError(f"--epoch_end ({epoch_end}) must be greater than --epoch_start ({epoch_start}); "
                        f"epochs epoch_start..epoch_end-1 are processed.")



def add_config_arg(parser):
    parser.add_argument("--config", default=os.path.join(REPO_ROOT, "config.txt"),
                        help="INI config file (default: config.txt next to the scripts)")


def quiet_tensorflow():
    """Silence TF's C++ start-up chatter; call before importing tensorflow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
