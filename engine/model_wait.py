"""Waiting for an epoch's SavedModel and loading it: the evaluator follows a training run as epochs appear.

A wait is announced at once and then every 30 s with the time left; a complete folder that fails to load is
retried LOAD_RETRIES times, then reported. SavedModelPredictor wraps a loaded model as the scorer's predict.
"""
import functools
import os
import time


from engine import run_folder
from engine.waiting import REMIND_SECONDS  # a wait is announced at once, then every 30 s with the time left
from utils.errors import UserError


LOAD_RETRIES = 3  # a complete folder that fails to load is retried this often, then reported

# Flushed, so the lines show up in order when stdout is a pipe (the launcher, the demo).
say_flushed = functools.partial(print, flush=True)



def wait_for_model(run_path, epoch, timeout=None, poll=2.0, say=say_flushed, load=None, remind_every=REMIND_SECONDS,
                   weights="raw"):
    """Return the loaded SavedModel of `epoch`, waiting until its folder appears.

    train.py renames each epoch folder into place only when it is complete, so its
    existence means the model is whole; a load error is still retried a few times
    (a copy from another machine, say, may be mid-flight). timeout=None waits forever.
    What is awaited is said at once (a run folder that does not exist is named as such),
    then every `remind_every` seconds with the time left.
    """
    path = run_folder.saved_model_dir(run_folder.epoch_dir(run_path, epoch), weights)
    start = time.monotonic()
    next_reminder = start
    failures = 0
    while True:
        if os.path.isdir(path):
            if load is None:  # imported here, so what is awaited is said before TensorFlow's seconds of start-up
                import tensorflow as tf
                load = tf.saved_model.load
            try:
                return load(path)
            except Exception as e:  # noqa: BLE001 - any load failure is retried, then reported
                failures += 1
                if failures >= LOAD_RETRIES:
                    raise UserError(f"Could not load the model of epoch {epoch} from {path} "
                                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                    f"delete that epoch folder and retrain it.") from None
                say(f"Model folder {path} did not load ({type(e).__name__}); retrying.")
        elif weights != "raw" and run_folder.is_complete(run_folder.epoch_dir(run_path, epoch)):
            raise UserError(f"Epoch {epoch} of {run_path} has no {run_folder.MODEL_FOLDERS[weights]}/ (it was "
                            f"trained with "
                            f"[train] ema_decay = 0); evaluate it with --weights raw, or train with ema_decay > 0.")
        now = time.monotonic()
        waited = now - start
        if timeout is not None and waited >= timeout:
            raise UserError(f"Timed out after {timeout:g} s waiting for {path}; start or resume train.py "
                            f"for that epoch, or raise --timeout.")
        if failures == 0 and now >= next_reminder:
            say(waiting_message(run_path, epoch, waited, timeout, first=next_reminder == start, weights=weights))
            next_reminder = now + remind_every
        sleep = poll if timeout is None else max(0.0, min(poll, timeout - waited))
        time.sleep(sleep)


def waiting_message(run_path, epoch, waited, timeout, first=True, weights="raw"):
    """What check_accuracy.py is waiting for, what creates it, and how long it will wait."""
    left = ("no time limit; --timeout sets one" if timeout is None
            else f"giving up in {max(0.0, timeout - waited):.0f} s")
    name = os.path.basename(os.path.normpath(run_path))
    if not os.path.isdir(run_path):
        parent = os.path.dirname(os.path.normpath(run_path))
        runs = sorted(n for n in (os.listdir(parent) if os.path.isdir(parent) else [])
                      if os.path.isdir(os.path.join(parent, n)) and not n.startswith("."))
        there = f"runs there: {', '.join(runs[:8])}{', ...' if len(runs) > 8 else ''}" if runs else "no runs there yet"
        return (f"The run folder {run_path} does not exist ({there}); waiting for train.py --run_folder={name} to "
                f"create it and save epoch {epoch}; if the name is mistyped, stop and pass the right --run_folder "
                f"(waited {waited:.0f} s, {left}).")
    path = run_folder.saved_model_dir(run_folder.epoch_dir(run_path, epoch), weights)  # the folder the timeout names too
    if first:
        return (f"Waiting for {path}: epoch {epoch} is not saved yet; train.py --run_folder={name} saves it when "
                f"the epoch ends ({left}).")
    return f"Still waiting for {path} (epoch {epoch}; waited {waited:.0f} s, {left})."


class SavedModelPredictor:
    """Calls a SavedModel's 'serving_default' (uint8 images in, {'logits','probabilities'} out)."""

    def __init__(self, loaded):
        try:
            fn = loaded.signatures["serving_default"]
        except (AttributeError, KeyError):
            raise UserError("The saved model has no 'serving_default' signature; re-export it with "
                            "model.export.export_saved_model.") from None
        _, kwargs = fn.structured_input_signature
        if len(kwargs) != 1:
            raise UserError(f"Expected a 'serving_default' signature with one image input, "
                            f"received inputs {sorted(kwargs)}.")
        self._fn = fn
        self._input = next(iter(kwargs))

    def __call__(self, images):
        return self._fn(**{self._input: images})["probabilities"]

    @staticmethod
    def prepare(images):
        """Runs on the loading thread: the host-to-tensor copy stays off the inference thread."""
        import tensorflow as tf
        return tf.convert_to_tensor(images)

