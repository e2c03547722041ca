"""Batch files in the buffer folder: names, atomic writes, recycling of consumed files, and the refill plan.

A batch is three .npy files written Y, L, X through utils' atomic helpers: it is complete iff its X file
exists, and deletion removes X first (the invariants table: data/buffer/__init__.py).
"""
import collections
import os
import re

import numpy as np

from utils.errors import UserError
from utils.files import TMP_PREFIX, atomic_save_npy

DTYPE = "uint8"
KINDS = ("Y", "L", "X")  # write order; X (images) last marks the batch complete
_BATCH_NAME = re.compile(r"^([XYL])_(\d+)_(\d+)\.npy$")
SPARE = "spare-"


def batch_file(folder, kind, epoch, batch):
    return os.path.join(folder, f"{kind}_{int(epoch)}_{int(batch)}.npy")


def parse_batch_name(name):
    """(kind, epoch, batch) for a batch file name, else None."""
    m = _BATCH_NAME.match(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def bytes_per_batch(batch_size, crop):
    return batch_size * (crop * crop * 3 + 4 + 12) + 3 * 128  # images, labels, lighting, npy headers


def worker_rows(batch_size, worker):
    """B/W, the rows of each global batch that worker (w, W) builds and trains on; UserError if it cannot."""
    index, count = worker
    if count < 1 or not 0 <= index < count:
        raise UserError(f"Worker {index} of {count} is not a position in the cluster; pass --worker_index "
                              f"from 0 to --worker_count - 1 (or fix TF_CONFIG).")
    if batch_size % count:
        raise UserError(f"--batch_size {batch_size} (the global batch) is not divisible by the {count} "
                              f"workers; use a multiple of {count} on every machine.")
    return batch_size // count


def write_batch(folder, epoch, batch, images, labels, lighting, reuse=None):
    """The batch's three files, X last; `reuse`: a spare (retire_batch) to overwrite with X."""
    atomic_save_npy(batch_file(folder, "Y", epoch, batch), np.asarray(labels, np.int32))
    atomic_save_npy(batch_file(folder, "L", epoch, batch), np.asarray(lighting, np.float32))
    atomic_save_npy(batch_file(folder, "X", epoch, batch), np.asarray(images, np.uint8), reuse=reuse)


def spare_file(folder, number):
    """A consumed X file kept under a temp name for the next batch to overwrite (never read as a batch)."""
    return os.path.join(folder, f"{TMP_PREFIX}{SPARE}{os.getpid()}-{number}.npy")


def retire_batch(folder, epoch, batch, spare):
    """Like delete_batch, but the X file becomes `spare`; False if there was no X file to keep."""
    try:
        os.replace(batch_file(folder, "X", epoch, batch), spare)  # first: the batch stops being complete
        kept = True
    except FileNotFoundError:
        kept = False
    delete_batch(folder, epoch, batch)
    return kept


def delete_batch(folder, epoch, batch):
    for kind in reversed(KINDS):  # X first: the batch stops being complete before anything else goes
        try:
            os.remove(batch_file(folder, kind, epoch, batch))
        except FileNotFoundError:
            pass


def scan_batches(folder):
    """(complete, partial): sets of (epoch, batch) with an X file, and with only Y/L files."""
    kinds = collections.defaultdict(set)
    for name in os.listdir(folder):
        parsed = parse_batch_name(name)
        if parsed:
            kinds[parsed[1:]].add(parsed[0])
    complete = {key for key, k in kinds.items() if "X" in k}
    return complete, set(kinds) - complete


def expected_shapes(batch_size, crop):
    return {"X": ((batch_size, crop, crop, 3), np.dtype(np.uint8)), "Y": ((batch_size,), np.dtype(np.int32)),
            "L": ((batch_size, 3), np.dtype(np.float32))}


def batch_header_ok(folder, epoch, batch, batch_size, crop):
    """True if all three files exist with the expected npy header and full length (no data read)."""
    for kind, (shape, dtype) in expected_shapes(batch_size, crop).items():
        path = batch_file(folder, kind, epoch, batch)
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                got_shape, fortran, got_dtype = read_header(f)
                data_start = f.tell()
            size = os.path.getsize(path)
        except (OSError, ValueError):
            return False
        if got_shape != shape or got_dtype != dtype or fortran or size != data_start + dtype.itemsize * np.prod(shape):
            return False
    return True


def plan_refill(pos, ready, buffer_size, refill_below, end):
    """The producer's rule: (batches to delete, batches to build), as linear positions.

    The window is [pos, min(pos + buffer_size, end)). Batches outside it go (consumed,
    or left from a trainer that restarted earlier). If fewer than `refill_below`
    consecutive batches are ready from pos, every missing batch of the window is
    built, in order; otherwise nothing is.
    """
    window_end = min(pos + buffer_size, end)
    stale = {lin for lin in ready if not pos <= lin < window_end}
    lead = 0
    while pos + lead < window_end and pos + lead in ready:
        lead += 1
    if lead >= refill_below:
        return stale, []
    return stale, [lin for lin in range(pos, window_end) if lin not in ready]


def scales_text(sides):
    """'scale 256' or 'scales 256, 263' for messages about the scales a buffer's batches were cut at."""
    return f"scale{'s' if len(sides) > 1 else ''} {', '.join(map(str, sides))}"
