"""Run the producer (runtime_preprocessing.py) and the trainer (train.py) together, as two processes.

    python tools/launch.py --run_folder=mytestrun --epoch_start=0 --epoch_end=30 --batch_size=64 \\
        [--config config.txt] [--max_producer_restarts 5] [--producer_arg=--no_progress ...]
        [any other train.py flag, e.g. --learning_rate=0.01]

This is what a user does by hand in two terminals (which keeps working exactly as the seed
describes); the launcher adds supervision:
- both start at once (the buffer protocol makes the start order irrelevant: see data/buffer/__init__.py);
  the trainer's output is shown as is;
- a producer that dies with an error while the trainer runs is restarted (at most
  --max_producer_restarts times; each restart is logged); the trainer simply waits meanwhile;
  one that refuses its command or config (exit code 2, a one-sentence error) is not, since
  the same command would fail the same way: both stop and the launcher exits 2;
- Ctrl-C, SIGTERM or SIGHUP stop both cleanly: each child runs in its own process group, gets
  SIGINT (so it exits through its normal interrupt path), then the whole group is SIGKILLed
  after a grace period; a small keeper process leads each group and kills it if the launcher
  itself is SIGKILLed (PDEATHSIG), so no worker process is ever left behind;
- when the trainer fails, the launcher exits non-zero and repeats its error line (a script's
  one-sentence "error: ..." for a mistake the user can fix), else the last lines of its stderr;
- on Ctrl-C the children stay quiet (utils/cli.py's UNDER_LAUNCHER_ENV) and the launcher prints the one
  'interrupted' line, with --epoch_start=auto once the run has a saved epoch.
Flags the launcher does not know are passed to train.py unchanged.
"""
import argparse
import collections
import functools
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.cli import UNDER_LAUNCHER_ENV, add_config_arg, add_epoch_args, run_main, set_interrupt_advice  # noqa: E402
from settings import load_settings  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.processes import die_with_parent  # noqa: E402
from engine import run_folder  # noqa: E402

GRACE_SECONDS = 15.0  # time a child gets to exit after SIGINT before its group is SIGKILLed
TAIL_LINES = 20  # stderr lines repeated when a process fails
POLL_SECONDS = 0.2
USER_ERROR_CODE = 2  # run_main's exit code for a UserError: rerunning the same command cannot help


def say(message):
    print(f"[launch] {message}", file=sys.stderr, flush=True)


def die_with_launcher():
    """preexec_fn: the child gets SIGTERM if the launcher dies, even by SIGKILL (Linux only)."""
    return functools.partial(die_with_parent, signal.SIGTERM, os.getpid())


def keeper(argv):
    """`launch.py --keeper CMD...`: the leader of one child's process group.

    The launcher starts each script through a keeper so that even a SIGKILLed
    launcher leaves nothing behind: the keeper gets SIGTERM when the launcher
    dies (PDEATHSIG) and then SIGKILLs its whole group, the script's own worker
    processes included. SIGINT is relayed to the script for a clean stop. The
    keeper exits with the script's exit code (128 + signal if it was killed).
    """
    child, early = None, []

    def relay(signum, frame):
        if child is None:  # a stop request before the script exists: deliver it once it does
            early.append(signum)
        elif signum == signal.SIGINT:
            _signal(child.pid, signal.SIGINT, group=False)
        else:
            os.killpg(0, signal.SIGKILL)

    # The handlers first: a SIGINT that arrived between the script's start and their
    # installation was lost when SIGINT came in ignored, and the launcher's 15 s grace ran out.
    signal.signal(signal.SIGINT, relay)
    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGHUP, relay)
    # A launcher started in the background (nohup, `&` in a script) has SIGINT ignored, and an
    # ignored signal stays ignored across exec: give the script back its Ctrl-C behaviour.
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for signum in early:
        relay(signum, None)
    code = child.wait()
    return code if code >= 0 else 128 - code


class Child:
    """One supervised script: own process group, stderr teed to ours with a tail kept for errors."""

    def __init__(self, name, argv):
        self.name = name
        self.argv = argv
        self._tail = collections.deque(maxlen=200)
        self._error = None  # the last "error: ..." line (utils/cli.py run_main's UserError sentence)
        self._killed = False
        keeper_argv = [sys.executable, os.path.abspath(__file__), "--keeper"] + argv
        env = dict(os.environ, **{UNDER_LAUNCHER_ENV: "1"})  # the launcher alone prints the Ctrl-C line
        self.proc = subprocess.Popen(keeper_argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, preexec_fn=die_with_launcher())
        self._pump = threading.Thread(target=self._copy_stderr, name=f"{name}-stderr", daemon=True)
        self._pump.start()

    def _copy_stderr(self):
        # Raw chunks, not lines, so progress bars that redraw with '\r' still render live.
        partial = b""
        out = sys.stderr.buffer
        while True:
            chunk = self.proc.stderr.read1(65536)
            if not chunk:
                break
            try:
                out.write(chunk)
                out.flush()
            except (OSError, ValueError):
                pass
            *complete, partial = (partial + chunk).replace(b"\r", b"\n").split(b"\n")
            self._tail.extend(line for line in complete if line.strip())
            self._error = next((line for line in reversed(complete) if line.startswith(b"error: ")), self._error)
        if partial.strip():
            self._tail.append(partial)
            self._error = partial if partial.startswith(b"error: ") else self._error

    def poll(self):
        return self.proc.poll()

    def last_lines(self, n=TAIL_LINES):
        """Its "error: ..." line when it printed one (TensorFlow's warnings may follow it at exit and
        would fill the tail), else its last `n` stderr lines."""
        lines = [self.error_line()] if self.error_line() else list(self._tail)[-n:]
        return [line if isinstance(line, str) else line.decode("utf-8", "replace") for line in lines]

    def error_line(self):
        self._pump.join(timeout=2)
        return self._error.decode("utf-8", "replace") if self._error else None

    def interrupt(self):
        if self.proc.poll() is None:
            _signal(self.proc.pid, signal.SIGINT, group=False)

    def kill_group(self):
        """SIGKILL whatever is left of the child's group (its stray workers too); once only."""
        if not self._killed:
            self._killed = True
            _signal(self.proc.pid, signal.SIGKILL, group=True)
            self.proc.wait()
            self._pump.join(timeout=2)
        return self.proc.returncode


def stop_all(children, grace=GRACE_SECONDS):
    """SIGINT every child (each exits through its own interrupt path), wait up to `grace` s,
    then SIGKILL each group. A second Ctrl-C or SIGTERM meanwhile skips the wait."""
    children = [c for c in children if c is not None]
    for child in children:
        child.interrupt()
    deadline = time.monotonic() + grace
    try:
        for child in children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{child.name} did not stop within {grace:g} s; killing it.")
    except (KeyboardInterrupt, Stop):
        say("interrupted again; killing both processes now.")
    finally:
        for child in children:
            child.kill_group()


def _signal(pid, sig, group):
    try:
        if group:
            os.killpg(pid, sig)  # the child is its group's leader: pgid == pid
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Stop(Exception):
    """Raised from the SIGTERM/SIGHUP handler so the same cleanup runs as for Ctrl-C."""


def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_folder", required=True, help="run name under [train] path_for_saving")
    add_epoch_args(p, "first epoch: an integer, or 'auto' = after the run's last complete epoch",
                         "train up to this epoch, exclusive")
    p.add_argument("--batch_size", required=True, type=int, help="the same for producer and trainer")
    p.add_argument("--max_producer_restarts", type=int, default=5,
                   help="restarts allowed for a producer that dies with an error (default 5)")
    p.add_argument("--producer_arg", action="append", default=[], metavar="FLAG",
                   help="extra flag for runtime_preprocessing.py, repeatable (e.g. --producer_arg=--no_progress)")
    p.add_argument("--producer_epoch_start", default="auto",
                   help="epoch_start of a restarted producer (default 'auto': follow the trainer's progress file)")
    # Stand-ins for the two scripts, for the launcher's own tests.
    p.add_argument("--producer_script", default=os.path.join(ROOT, "runtime_preprocessing.py"), help=argparse.SUPPRESS)
    p.add_argument("--trainer_script", default=os.path.join(ROOT, "train.py"), help=argparse.SUPPRESS)
    add_config_arg(p)
    args, passthrough = p.parse_known_args(argv)
    if passthrough and passthrough[0] == "--":
        passthrough = passthrough[1:]
    return args, passthrough


def common_flags(args, epoch_start):
    return [f"--epoch_start={epoch_start}", f"--epoch_end={args.epoch_end}", f"--batch_size={args.batch_size}",
            f"--config={os.path.abspath(args.config)}"]


def producer_argv(args, epoch_start):
    return [sys.executable, args.producer_script] + common_flags(args, epoch_start) + args.producer_arg


def trainer_argv(args, passthrough):
    return ([sys.executable, args.trainer_script, f"--run_folder={args.run_folder}"]
            + common_flags(args, args.epoch_start) + passthrough)


def supervise(args, passthrough):
    """Run both processes to the end; returns the exit code for the launcher."""
    producer = Child("producer", producer_argv(args, args.epoch_start))
    trainer = None
    say(f"producer pid {producer.proc.pid} started (run {args.run_folder}, epochs {args.epoch_start}.."
        f"{args.epoch_end - 1}, batch size {args.batch_size}).")
    try:
        trainer = Child("trainer", trainer_argv(args, passthrough))
        say(f"trainer pid {trainer.proc.pid} started.")
        restarts = 0
        while True:
            code = producer.poll()
            if trainer.poll() is not None:
                return _trainer_finished(trainer, producer, trainer.poll())
            if code == USER_ERROR_CODE:
                stop_all([producer])
                say(f"producer stopped with the error above (exit code {code}), which a restart would not fix; "
                    f"stopping the trainer. Fix it, then rerun with --epoch_start=auto.")
                return USER_ERROR_CODE
            if code not in (None, 0):
                stop_all([producer])
                if restarts >= args.max_producer_restarts:
                    say(f"producer failed (exit code {code}) after {restarts} restarts; stopping the trainer. "
                        f"Fix the error below, then rerun with --epoch_start=auto. Its last lines:")
                    _print_tail(producer)
                    return 1
                restarts += 1
                start = args.producer_epoch_start
                say(f"producer exited with code {code}; restart {restarts}/{args.max_producer_restarts} "
                    f"with --epoch_start={start}. Its last lines:")
                _print_tail(producer, n=5)
                producer = Child("producer", producer_argv(args, start))
            time.sleep(POLL_SECONDS)
    finally:
        stop_all([trainer, producer])


def _trainer_finished(trainer, producer, code):
    stop_all([producer])
    if code == 0:
        say("trainer finished; producer stopped.")
        return 0
    # Its stray workers would hold its stderr pipe open, and each read of its error line below waited 2 s for an
    # end of output that never came (tests/test_demo.py's failure test, idle machine: 5.2 s, 1.0 s without).
    trainer.kill_group()
    shown = "error" if trainer.error_line() else "last lines of stderr"
    say(f"trainer failed (exit code {code}); producer stopped. The trainer's {shown}:")
    _print_tail(trainer)
    return code if 0 < code < 256 else 1


def _print_tail(child, n=TAIL_LINES):
    for line in child.last_lines(n):
        print(f"    {child.name}: {line}", file=sys.stderr, flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--keeper"]:
        return keeper(argv[1:])
    # Started in the background (`make test &` in a script, nohup) the launcher inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: a SIGINT sent to stop it
    # did nothing and it ran on (tests/test_demo.py timed out so). SIGINT always stops it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args, passthrough = parse_args(argv)
    if args.epoch_end < 1 or args.batch_size < 1 or args.max_producer_restarts < 0:
        raise UserError(f"Expected --epoch_end >= 1, --batch_size >= 1 and --max_producer_restarts >= 0, "
                              f"received {args.epoch_end}, {args.batch_size} and {args.max_producer_restarts}.")
    settings = load_settings(args.config, stats=False, decoder=False, devices=False)  # fail in the first second on a bad config, not in two child processes
    run_path = run_folder.run_dir(settings.train.path_for_saving, args.run_folder)
    set_interrupt_advice(lambda: run_folder.resume_advice(run_path, args.epoch_start))
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    try:
        return supervise(args, passthrough)
    except Stop as e:
        say(f"received {e}; both processes stopped. {run_folder.resume_advice(run_path, args.epoch_start)}")
        return 143


if __name__ == "__main__":
    run_main(main)
