"""The trainer's side of the buffer: BufferReader waits for batches in order, checks them, reports progress.

The files it reads and what it may assume of them: the table in data/buffer/__init__.py.
"""
import dataclasses
import logging
import os
import time

import numpy as np

from data.buffer.files import batch_file, expected_shapes, scan_batches, worker_rows
from data.buffer.protocol import (FORMAT_VERSION, MANIFEST, PROGRESS, crop_size_for, load_manifest,
                                  producer_status, write_progress)
from utils.errors import UserError
from utils.files import remove_stale_temps

log = logging.getLogger(__name__)
STATUS_POLL = 0.25  # seconds between a waiting reader's looks at the producer's heartbeat


@dataclasses.dataclass
class Batch:
    images: np.ndarray    # uint8 [B, crop, crop, 3]
    labels: np.ndarray    # int32 [B]
    lighting: np.ndarray  # float32 [B, 3], additive shift in normalised units
    epoch: int
    batch: int


class BufferReader:
    """The trainer's view of the buffer: waits for batches in order, validates them, reports progress.

        reader = BufferReader(settings, batch_size)
        reader.check_manifest(mu, sigma)            # optional; read() checks on first use
        for b in range(start, reader.batches_per_epoch):
            batch = reader.read(epoch, b)           # waits while the producer catches up
            ... train ...
            reader.report_progress(epoch, b + 1)    # lets the producer delete and refill
    """

    def __init__(self, settings, batch_size, worker=None):
        self.folder = settings.train.buffer_folder
        self.batch_size = int(batch_size)  # global; this machine reads rows [w*B/W, (w+1)*B/W) of each batch
        self.worker = tuple(worker or settings.worker)  # (w, W), as TF_CONFIG places this trainer
        self.rows = worker_rows(self.batch_size, self.worker)
        self.sleep_time = max(float(settings.train.sleep_time), 0.01)
        self.wait_timeout = float(settings.train.wait_timeout)
        self.seed, self.crop = settings.train.seed, settings.images.crop_size
        self.crop_sizes = settings.crop_sizes
        self.wait_seconds = 0.0
        self.manifest = None
        self._mu_sigma = (None, None)
        self._manifest_stat = None
        self._last = None
        self._reported = None       # the last (epoch, batch) written to the progress file
        self._producer_seen = None  # (host, pid) of the last live producer seen while waiting
        # A trainer killed while writing its progress leaves the temp file behind. The producer sweeps one
        # only when it is a minute old (it cannot tell a live trainer's); this reader is the buffer's one
        # progress writer from now on, so any there now is a dead trainer's.
        remove_stale_temps(self.folder, (PROGRESS,))

    # -- manifest ------------------------------------------------------------

    def check_manifest(self, mu=None, sigma=None):
        """Wait for a manifest this run can use and check it; return it.

        manifest.json outlives its producer, so the one found may be a previous run's, about to
        be rewritten by a producer that is still starting (the two scripts start in any order).
        A manifest is taken at once when a live producer stands behind it (its heartbeat carries
        the manifest's run id), or when it agrees with this run and batches are already waiting
        (a prefilled buffer, a restarted trainer). A disagreeing one is refused at once only with
        a live producer behind it; otherwise the trainer warns and waits up to wait_timeout for
        a producer with this run's settings, then refuses it.
        """
        if mu is not None:
            self._mu_sigma = (mu, sigma)
        start, delay, warned = time.monotonic(), 0.01, False
        while True:
            manifest = load_manifest(self.folder)
            state, record = producer_status(self.folder)
            behind = (manifest is not None and state == "running"
                      and (record or {}).get("run_id") == manifest.get("run_id"))
            error = None
            if manifest is not None:
                try:
                    self._validate(manifest)
                except UserError as e:
                    error = e
                if error is None and (behind or scan_batches(self.folder)[0]):
                    break
                if error is not None and behind:
                    raise error
            timed_out = time.monotonic() - start >= self.wait_timeout
            if timed_out and manifest is not None:
                if error is not None:
                    raise error
                break  # an agreeing manifest and no producer yet: reading batches will wait for one
            if timed_out:
                raise UserError(self._no_producer_message("the buffer manifest", state, None))
            if error is not None and not warned:
                log.warning("%s; it was written by a producer that is not running now, so waiting up to %.0f s "
                            "for runtime_preprocessing.py with this run's settings to replace it",
                            str(error).rstrip("."), self.wait_timeout)
                warned = True
            time.sleep(min(delay, self.sleep_time))
            delay *= 2
        self.wait_seconds += time.monotonic() - start
        self.manifest = manifest
        self._manifest_stat = self._stat_manifest()
        return manifest

    def _validate(self, m):
        where = f"The buffer in {self.folder}"
        fix = "restart runtime_preprocessing.py with matching settings and --clear_buffer"
        if not m or m.get("format_version") != FORMAT_VERSION or "batch_size" not in m:
            raise UserError(f"{where} has a manifest this version cannot read; {fix}.")
        if m["batch_size"] != self.batch_size:
            raise UserError(f"{where} holds batches of {m['batch_size']} images but this run asks for "
                            f"--batch_size={self.batch_size}; pass the same --batch_size to both scripts.")
        if list(m.get("worker_slice", [0, 1])) != list(self.worker):
            raise UserError(f"{where} holds {_slice_text(m.get('worker_slice', [0, 1]))} but this trainer "
                            f"needs {_slice_text(self.worker)} (its TF_CONFIG position); run "
                            f"runtime_preprocessing.py on this machine with the trainer's TF_CONFIG (or "
                            f"--worker_index={self.worker[0]} --worker_count={self.worker[1]}) and --clear_buffer.")
        if m["seed"] != self.seed:
            raise UserError(f"{where} was made with [train] seed = {m['seed']} but this config has seed = "
                            f"{self.seed}; use one config for both scripts or {fix}.")
        if m["crop_sizes"] != self.crop_sizes:
            raise UserError(f"{where} holds crops {m['crop_sizes']} ([first epoch, size]) but this config has "
                            f"{self.crop_sizes} ([images] crop_size, crop_schedule); use one config for both "
                            f"scripts or {fix}.")
        mu, sigma = self._mu_sigma
        if mu is not None and not (np.allclose(m["mu"], mu, atol=1e-6) and np.allclose(m["sigma"], sigma, atol=1e-6)):
            raise UserError(f"{where} was made with mu={m['mu']} sigma={m['sigma']} but the trainer normalises with "
                            f"mu={list(mu)} sigma={list(sigma)}; use one config for both scripts or {fix}.")

    def _stat_manifest(self):
        try:
            st = os.stat(os.path.join(self.folder, MANIFEST))
            return (st.st_mtime_ns, st.st_ino)
        except OSError:
            return None

    def _ensure_manifest(self):
        if self.manifest is None:
            self.check_manifest()
        elif self._stat_manifest() != self._manifest_stat:
            old = self.manifest
            old_run = old["run_id"]
            self.check_manifest()
            # Before the first batch nothing of the old run was used: a replacement that keeps the
            # class count and epoch length (what the model and schedule were built from) is fine.
            unused = self._last is None and all(self.manifest.get(k) == old.get(k)
                                                for k in ("num_classes", "num_batches"))
            if self.manifest.get("run_id") != old_run and not unused:
                raise UserError(f"The buffer in {self.folder} was switched to another run while training "
                                f"(run {old_run} -> {self.manifest.get('run_id')}); stop the other producer and "
                                f"restart runtime_preprocessing.py with this run's settings.")

    @property
    def num_classes(self):
        self._ensure_manifest()
        return self.manifest["num_classes"]

    @property
    def batches_per_epoch(self):
        self._ensure_manifest()
        return self.manifest["num_batches"]

    def crop_size(self, epoch):
        self._ensure_manifest()
        return crop_size_for(self.manifest, epoch)

    # -- batches -------------------------------------------------------------

    def read(self, epoch, batch):
        """Batch (epoch, batch), waiting for the producer; strictly in order within one reader."""
        self._ensure_manifest()
        epoch, batch = int(epoch), int(batch)
        nb = self.manifest["num_batches"]
        if not 0 <= batch < nb:
            raise ValueError(f"batch {batch} is outside 0..{nb - 1}")
        if self._last is None:
            self.report_progress(epoch, batch)  # tells a producer following a stale file where we start
        elif (epoch, batch) != self._successor(self._last):
            raise ValueError(f"batches must be read in order: after {self._last} comes "
                             f"{self._successor(self._last)}, received {(epoch, batch)}")
        result = self._wait_for(lambda: self._load(epoch, batch), f"epoch {epoch} batch {batch}", (epoch, batch))
        self._last = (epoch, batch)
        return result

    def _successor(self, pos):
        epoch, batch = pos
        return (epoch, batch + 1) if batch + 1 < self.manifest["num_batches"] else (epoch + 1, 0)

    def _load(self, epoch, batch):
        if not os.path.exists(batch_file(self.folder, "X", epoch, batch)):
            return None
        crop = crop_size_for(self.manifest, epoch)
        arrays = {}
        for kind, (shape, dtype) in expected_shapes(self.rows, crop).items():
            path = batch_file(self.folder, kind, epoch, batch)
            try:
                arr = np.load(path, allow_pickle=False)
            except FileNotFoundError:
                return None
            except (OSError, ValueError, EOFError) as e:
                raise UserError(f"{path} is not a readable batch file ({e}); delete it or restart "
                                f"runtime_preprocessing.py with --clear_buffer.") from None
            if arr.shape != shape or arr.dtype != dtype:
                raise UserError(f"{path} does not belong to this buffer: expected {dtype} {shape}, found "
                                f"{arr.dtype} {arr.shape}; restart runtime_preprocessing.py with --clear_buffer.")
            arrays[kind] = arr
        labels = arrays["Y"]
        if labels.size and (labels.min() < 0 or labels.max() >= self.manifest["num_classes"]):
            raise UserError(f"{batch_file(self.folder, 'Y', epoch, batch)} has labels outside "
                            f"0..{self.manifest['num_classes'] - 1}; restart runtime_preprocessing.py with --clear_buffer.")
        return Batch(arrays["X"], labels, arrays["L"], epoch, batch)

    def _wait_for(self, attempt, what, position):
        """attempt() until it returns non-None; UserError once no live producer was seen for wait_timeout s."""
        result = attempt()
        if result is not None:
            return result
        start = time.monotonic()
        dead_since = None
        delay = 0.01
        status_due = start
        while True:
            now = time.monotonic()
            if now >= status_due:  # the heartbeat changes every few seconds; the batch files are polled faster
                status_due = now + STATUS_POLL
                state, record = producer_status(self.folder)
                if state == "running":
                    dead_since = None
                    self._check_range(record, position)
                    self._greet(record)
                elif dead_since is None:
                    dead_since = now
                if dead_since is not None and now - dead_since >= self.wait_timeout:
                    self.wait_seconds += now - start
                    raise UserError(self._no_producer_message(what, state, position))
            time.sleep(min(delay, self.sleep_time))
            delay *= 2  # quick for short gaps, then every sleep_time seconds
            result = attempt()
            if result is not None:
                waited = time.monotonic() - start
                self.wait_seconds += waited
                log.info("waited %.1f s for %s (%.1f s in total)", waited, what, self.wait_seconds)
                return result

    def _greet(self, record):
        """Repeat the last progress report to a producer not seen before (restarted, or started after
        the report): a producer sets aside a progress file it found at start-up until it is rewritten."""
        seen = (record.get("host"), record.get("pid"))
        if seen != self._producer_seen:
            self._producer_seen = seen
            if self._reported is not None:
                write_progress(self.folder, *self._reported)

    def _check_range(self, record, position):
        if position is None or "epoch_end" not in record:
            return
        epoch = position[0]
        if not record["epoch_start_floor"] <= epoch < record["epoch_end"]:
            raise UserError(f"The producer on {self.folder} makes epochs {record['epoch_start_floor']} to "
                            f"{record['epoch_end'] - 1} but the trainer needs epoch {epoch}; restart "
                            f"runtime_preprocessing.py with --epoch_start=auto --epoch_end={epoch + 1} or more.")

    def _no_producer_message(self, what, state, position):
        detail = {"absent": "no producer has ever written a heartbeat there",
                  "finished": "the producer finished its epoch range",
                  "stopped": "the producer was stopped", "dead": "the producer's heartbeat stopped"}[state]
        if state == "absent" and not os.path.isdir(self.folder):  # the reader never creates it: the producer does
            detail = "the folder does not exist (no producer has started there; runtime_preprocessing.py creates it)"
        start = f" --epoch_start={position[0]}" if position else ""
        return (f"Waited {self.wait_timeout:.0f} s for {what} in {self.folder} but {detail}; start "
                f"runtime_preprocessing.py --batch_size={self.batch_size}{start} with this config.")

    def producer_record(self):
        """The producer's heartbeat record (its worker count and build rate), None without one."""
        state, record = producer_status(self.folder)
        return record if state in ("running", "finished", "stopped") else None

    def report_progress(self, epoch, next_batch):
        """Tell the producer every batch before (epoch, next_batch) is consumed (atomic write)."""
        if self.manifest is not None and next_batch >= self.manifest["num_batches"]:
            epoch, next_batch = epoch + 1, 0
        write_progress(self.folder, epoch, next_batch)
        self._reported = (epoch, next_batch)


def _slice_text(worker):
    index, count = worker
    return "whole global batches (one machine)" if count == 1 else f"the rows of worker {index} of {count}"
