"""Worker processes with a tqdm bar, shared by the offline scripts.

Processes, not threads: decoding and resizing hold the GIL long enough that
threads do not scale. With one worker everything runs in-process, which keeps
tests fast and tracebacks readable.
"""
import multiprocessing
import os

from tqdm import tqdm

from utils.files import exclusive_lock


def resolve_workers(num_workers):
    """0 means one worker per CPU core."""
    return num_workers if num_workers > 0 else (os.cpu_count() or 1)


def imap_progress(func, items, num_workers=0, desc="", unit="img", disable=False, chunksize=None):
    """Yield func(item) for each item, in order, with a progress bar showing items/s."""
    items = list(items)
    workers = min(resolve_workers(num_workers), max(len(items), 1))
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.05)
    try:
        if workers == 1:
            for item in items:
                result = func(item)
                bar.update(1)  # before the yield: a caller that stops after the last item still sees 100%
                yield result
            return
        chunksize = chunksize or max(1, min(64, len(items) // (workers * 8)))
        with multiprocessing.Pool(workers) as pool:
            for result in pool.imap(func, items, chunksize=chunksize):
                bar.update(1)
                yield result
    finally:
        bar.close()


def single_writer(folder, what):
    """Hold an exclusive lock on `folder` while writing it; a second writer gets a UserError.

    Resuming clears temp files left by killed writers, which is only safe when no other writer is active.
    """
    return exclusive_lock(folder, f"Another process is already writing {what} in {folder}; wait for it "
                                        f"to finish (or stop it) before rerunning.")
