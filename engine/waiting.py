"""Say what a wait is for at once, then remind every REMIND_SECONDS with the time left.

A trainer started before its producer used to wait in silence (up to [train] wait_timeout,
900 s by default); check_accuracy.py's wait (engine/evaluate.py) follows the same rule.
"""
import threading
import time

REMIND_SECONDS = 30.0


class Reminder:
    """with Reminder(say, waiting, first, later): say(first) at once, then say(later(elapsed)) every
    `every` seconds while waiting() is true, until the block ends."""

    def __init__(self, say, waiting, first, later, every=REMIND_SECONDS):
        self.say, self.waiting, self.first, self.later, self.every = say, waiting, first, later, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wait-reminder", daemon=True)

    def __enter__(self):
        self.start = time.monotonic()
        if self.waiting():
            self.say(self.first)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1)
        return False

    def _run(self):
        while not self._stop.wait(self.every):
            if not self.waiting():
                return
            self.say(self.later(time.monotonic() - self.start))
