"""How many workers the producer runs with num_of_threads = auto: the rule, on plain values and a given clock.

The producer reports what it sees (the trainer's position from training_progress.txt, each built batch's
seconds in its worker, the batches ready ahead of the trainer) with the time; once per `window` seconds
WorkerSizer.decide answers add one, retire one, or keep. The rule, with C the trainer's img/s over the
window and r one worker's img/s (the batch's rows over the seconds its worker spent building and writing it):
- add while C >= workers * r (the workers build no more than the trainer takes, so a drained buffer never
  refills), or while the trainer waited (nothing was ready ahead of it) and the buffer did not grow over the
  window; never past `cap`;
- retire while (workers - 1) * r >= C * RETIRE_HEADROOM, the trainer never waited and the buffer stayed full
  (never below half its refill level): one worker fewer would still out-build the trainer by a margin.
So it settles at settled_count(C, r) = floor(C / r) + 1, the fewest workers that build more than the trainer
takes: within one of C / r, and retiring from there would leave too few. Nothing here touches a
file or a process, so tests drive it with a fake clock.
"""
import collections
import dataclasses
import math

# Retire only when one worker fewer still builds 15% more than the trainer takes: measured rates move by a
# few percent from window to window, and a count that flaps costs a fork and a drained queue each time.
RETIRE_HEADROOM = 1.15


def worker_cap(cores, max_workers=0, once=False):
    """(the most workers the producer may run, the reason in words): one core is left for the trainer
    unless the producer fills ahead of training (--once); max_workers (0 = no cap) lowers it."""
    cap = cores if once else max(1, cores - 1)
    why = (f"{cores} core{'s' if cores != 1 else ''} it may use" +
           ("" if once else ", one left for the trainer"))
    if max_workers and max_workers < cap:
        cap, why = max_workers, why + f", max_workers = {max_workers}"
    return cap, why


def choose_workers(threads, cores, max_workers=0, once=False):
    """(workers to start with, the most it may run, how they were chosen in words) for num_of_threads =
    `threads` ('auto' or a count): auto starts with one while training, with every core it may use with --once."""
    if threads != "auto":
        return int(threads), int(threads), f"num_of_threads = {threads}"
    cap, why = worker_cap(cores, max_workers, once)
    return (cap if once else 1), cap, f"num_of_threads = auto{' with --once' if once else ''}: {why}: at most {cap}"


def ready_ahead(ready, pos, limit):
    """How many consecutive positions from `pos` are in the set `ready` (at most `limit`)."""
    ahead = 0
    while ahead < limit and pos + ahead in ready:
        ahead += 1
    return ahead


def settled_count(consumer_rate, worker_rate, cap=math.inf):
    """The worker count the rule settles at for a trainer taking `consumer_rate` img/s from workers
    that build `worker_rate` img/s each (at least 1, at most cap)."""
    if worker_rate <= 0:
        return 1
    return int(max(1, min(cap, math.floor(consumer_rate / worker_rate) + 1)))


@dataclasses.dataclass
class Decision:
    change: int            # +1 add a worker, -1 retire one, 0 keep
    workers: int           # the count after the change
    consumer_rate: float   # img/s the trainer took over the window
    worker_rate: float     # img/s one worker builds
    ready_fraction: float  # batches ready ahead of the trainer / buffer_size, now
    waited: bool           # the trainer found nothing ready during the window

    def describe(self):
        """'trainer takes 2,950 img/s, 5 workers build 3,100 img/s, buffer 82% ready'"""
        waited = ", the trainer waited" if self.waited else ""
        n = self.workers - self.change  # the rates were measured with the count before the change
        return (f"trainer takes {self.consumer_rate:,.0f} img/s, {n} worker{'s build' if n != 1 else ' builds'} "
                f"{n * self.worker_rate:,.0f} img/s, buffer {100 * self.ready_fraction:.0f}% ready{waited}")


class WorkerSizer:
    """The auto rule's state: observations of the last `window` seconds and the current count."""

    def __init__(self, cap, rows, buffer_size, refill_threshold, window=10.0, workers=1, now=0.0):
        self.cap, self.rows, self.buffer_size = int(cap), int(rows), int(buffer_size)
        # "Stayed full": never below half the refill level (a refill starts just under the level itself).
        self.full_fraction = 0.5 * float(refill_threshold)
        self.window = float(window)
        self.workers = max(1, min(int(workers), self.cap))
        self.positions = collections.deque()   # (time, linear position of the trainer)
        self.builds = collections.deque()      # (time, seconds one worker spent on one batch)
        self.worker_rate = None                # img/s per worker, from the latest window with builds
        self.ready_fraction = self.low_fraction = self.start_fraction = 0.0
        self.waited = False
        self.since = now                       # start of the current window

    # -- observations -----------------------------------------------------------

    def progress(self, now, lin):
        if not self.positions or self.positions[-1][1] != lin:
            self.positions.append((now, lin))
        self._forget(self.positions, now)

    def built(self, now, seconds):
        self.builds.append((now, max(float(seconds), 1e-6)))
        self._forget(self.builds, now)

    def ready(self, now, ready_ahead, consumer_waiting=False):
        """`ready_ahead` complete batches from the trainer's position; `consumer_waiting`: the trainer
        has not finished (a producer past the last batch is not waited for)."""
        self.ready_fraction = min(1.0, ready_ahead / self.buffer_size)
        self.low_fraction = min(self.low_fraction, self.ready_fraction)
        self.waited |= consumer_waiting and ready_ahead == 0

    def _forget(self, samples, now):
        # the newest sample from before the window stays: it is where the trainer stood when the window began
        while len(samples) > 1 and samples[1][0] <= now - self.window:
            samples.popleft()

    # -- the rule -----------------------------------------------------------------

    def consumer_rate(self, now):
        """img/s the trainer took over the last window (0 while it stands still)."""
        if not self.positions:
            return 0.0
        t0, lin0 = self.positions[0]
        moved = self.positions[-1][1] - lin0
        span = max(now - max(t0, now - self.window), 1e-9)
        return max(0, moved) * self.rows / span

    def decide(self, now):
        """A Decision once a window has passed since the last one (else None); applies the change."""
        if now - self.since < self.window:
            return None
        recent = [s for t, s in self.builds if t >= self.since]
        if recent:
            self.worker_rate = self.rows * len(recent) / sum(recent)
        if self.worker_rate is None:  # nothing built yet: no measure of what a worker does
            return None
        consumer = self.consumer_rate(now)
        capacity = self.workers * self.worker_rate
        change = 0
        starved = self.waited and self.ready_fraction <= self.start_fraction  # waited, and no catching up
        if self.workers < self.cap and (starved or consumer >= capacity):
            change = 1
        elif (self.workers > 1 and not self.waited and self.low_fraction >= self.full_fraction
              and (self.workers - 1) * self.worker_rate >= consumer * RETIRE_HEADROOM):
            change = -1
        self.workers += change
        decision = Decision(change, self.workers, consumer, self.worker_rate, self.ready_fraction, self.waited)
        self.since, self.waited = now, False
        self.low_fraction = self.start_fraction = self.ready_fraction
        return decision
