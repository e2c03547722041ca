"""The one prefetcher: runs an iterable (buffer reads, validation batches) on a background thread, a few
items ahead, with an optional `convert` (a copy to the training device) on that thread too.

An exception on the thread is re-raised in the consumer; closing (or leaving a `prefetch` loop early)
stops the thread at its next item. `get()` also says how long the consumer waited, which is how the
trainer measures its input stalls.
"""
import queue
import threading
import time

_DONE = object()


class _Failure:
    def __init__(self, error):
        self.error = error


class Prefetcher:
    def __init__(self, iterable, depth=2, convert=None, name="prefetch"):
        self._items = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._convert = convert
        self._thread = threading.Thread(target=self._work, args=(iterable,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, iterable):
        try:
            for item in iterable:
                if not self._put(self._convert(item) if self._convert else item):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed over to the consumer
            self._put(_Failure(e))

    def get(self):
        """(next item, seconds the caller waited for it); StopIteration when the iterable is exhausted."""
        start = time.perf_counter()
        item = self._items.get()
        waited = time.perf_counter() - start
        if item is _DONE:
            self._items.put(_DONE)  # every later get() ends too
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item, waited

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


def prefetch(iterable, depth=3, convert=None, name="prefetch"):
    """Iterate `iterable` through a Prefetcher `depth` items ahead (`convert` runs on its thread)."""
    fetcher = Prefetcher(iterable, depth, convert, name)
    try:
        while True:
            try:
                item, _ = fetcher.get()
            except StopIteration:
                return
            yield item
    finally:
        fetcher.close()
