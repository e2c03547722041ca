"""The producer's worker processes: each builds whole batches and writes them to the buffer.

One pipe per worker instead of multiprocessing.Pool: a task is a few bytes each way, the
main process sleeps in one wait() on the pipes instead of running Pool's three handler
threads, a worker that dies is noticed at once (its pipe closes; Pool would wait for its
result forever) and stopping is a kill plus a join (Pool.terminate() could hang).
Every write is atomic, so killing a worker mid-batch loses only that batch.
With num_of_threads = auto the set grows and shrinks while it runs (data/buffer/sizing.py decides): add()
forks one more worker; retire() stops handing tasks to the newest, which finishes the ones it holds and
then ends (its pipe closes), so a retired worker's batches are neither lost nor built again.
"""
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback

from utils.errors import UserError
from utils.processes import die_with_parent
from data.buffer.builder import BatchBuilder
from data.buffer.files import write_batch

# Tasks queued per worker: the next batch is already in its pipe when it finishes one.
DEPTH = 2


def _worker_main(conn, paths, labels, recipe, folder, parent_pid):
    die_with_parent(signal.SIGKILL, parent_pid)  # no orphan keeps writing after the producer dies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's SIGTERM handler would wait for Python code
    builder = BatchBuilder(paths, labels, recipe)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:  # retired (not EOF: workers forked later hold copies of this pipe's other end)
            return
        epoch, batch, reuse = task
        try:
            started = time.perf_counter()
            write_batch(folder, epoch, batch, *builder.build(epoch, batch), reuse=reuse)
            conn.send(("done", epoch, batch, time.perf_counter() - started))  # the sizer's per-worker rate
        except UserError as e:  # its text travels: the message is what the user needs
            conn.send(("error", epoch, batch, str(e)))
        except BaseException:
            conn.send(("crash", epoch, batch, traceback.format_exc()))
            return


class WorkerSet:
    """`num_workers` batch-building processes; submit (epoch, batch) tasks, collect finished ones."""

    def __init__(self, num_workers, paths, labels, recipe, folder):
        self._ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self._args = (paths, labels, recipe, folder, os.getpid())
        self.procs, self.conns, self.queued, self.retiring = [], [], [], []
        self.timings = []  # seconds each finished batch took in its worker, for the caller to take
        self._started = 0
        try:
            for _ in range(num_workers):
                self.add()
        except BaseException:
            self.stop()
            raise

    def add(self):
        """Start one more worker (forked: call it where no other thread holds a lock the child could need)."""
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, *self._args),
                                 name=f"producer-worker-{self._started}", daemon=True)
        self._started += 1
        proc.start()
        child.close()
        self.procs.append(proc)
        self.conns.append(parent)
        self.queued.append([])
        self.retiring.append(False)

    def retire(self):
        """Hand no more tasks to the newest working worker; it ends once the tasks it holds are done."""
        i = max(j for j in range(len(self.procs)) if not self.retiring[j])
        self.retiring[i] = True
        self._end_retired()

    @property
    def count(self):
        """Workers taking tasks (retiring ones finishing their last tasks not counted)."""
        return self.retiring.count(False)

    @property
    def in_flight(self):
        return sum(len(q) for q in self.queued)

    def tasks(self):
        """The (epoch, batch) tasks handed out and not finished yet."""
        return [task for q in self.queued for task in q]

    def has_room(self):
        return any(len(q) < DEPTH for q, r in zip(self.queued, self.retiring) if not r)

    def submit(self, epoch, batch, reuse=None):
        """Queue batch (epoch, batch) on the least busy worker; `reuse`: a spare file for its X (see buffer.py)."""
        i = min((j for j in range(len(self.queued)) if not self.retiring[j]), key=lambda j: len(self.queued[j]))
        self.queued[i].append((epoch, batch))
        try:
            self.conns[i].send((epoch, batch, reuse))
        except OSError:  # its end of the pipe is closed: it died
            raise UserError(self._death_message(i)) from None

    def check_alive(self):
        """Raise the error for a worker that died while idle (a busy one is noticed by collect)."""
        for i, proc in enumerate(self.procs):
            if not proc.is_alive():
                raise UserError(self._death_message(i))

    def collect(self, timeout):
        """The (epoch, batch) tasks finished within `timeout` seconds; a worker's error is raised here."""
        finished = []
        for conn in multiprocessing.connection.wait([c for c, q in zip(self.conns, self.queued) if q], timeout):
            i = self.conns.index(conn)
            try:
                message = conn.recv()
            except (EOFError, OSError):
                raise UserError(self._death_message(i)) from None
            status, epoch, batch = message[:3]
            self.queued[i].remove((epoch, batch))
            if status == "error":
                raise UserError(message[3])
            if status == "crash":
                raise RuntimeError(f"A producer worker failed building epoch {epoch} batch {batch}:\n{message[3]}")
            finished.append((epoch, batch))
            self.timings.append(message[3])
        self._end_retired()
        return finished

    def _end_retired(self):
        """Tell retired workers with no task left to return; reap them."""
        for i in reversed(range(len(self.procs))):
            if self.retiring[i] and not self.queued[i]:
                try:
                    self.conns[i].send(None)
                except OSError:  # it died: nothing was queued on it, so nothing is lost
                    pass
                self.conns[i].close()
                self.procs[i].join(10.0)
                if self.procs[i].is_alive():  # stuck in a write: kill it, its temp file is swept
                    self.procs[i].kill()
                    self.procs[i].join()
                for items in (self.procs, self.conns, self.queued, self.retiring):
                    del items[i]

    def _death_message(self, i):
        proc = self.procs[i]
        proc.join(1.0)
        code = proc.exitcode
        how = (f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}")
        hint = " (SIGKILL: often the kernel's out-of-memory killer)" if code == -signal.SIGKILL else ""
        task = f" while building epoch {self.queued[i][0][0]} batch {self.queued[i][0][1]}" if self.queued[i] else ""
        return (f"Producer worker {proc.name} (pid {proc.pid}) {how}{hint}{task}; restart "
                f"runtime_preprocessing.py with --epoch_start=auto to continue where the buffer stands.")

    def stop(self, timeout=10.0):
        """Kill the workers and reap them. Safe at any moment: every write is atomic."""
        for proc in self.procs:
            try:
                proc.kill()
            except (OSError, ValueError, AttributeError):
                pass
        for proc in self.procs:
            try:
                proc.join(timeout)  # dead before the caller sweeps temp files
            except (OSError, ValueError, AssertionError):
                pass
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self.queued, self.retiring = [], [], [], []
