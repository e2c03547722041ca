"""runtime_preprocessing.py's engine: the Producer keeps up to buffer_size batches ready ahead of the trainer.

The loop (the seed's rule, kept): read the trainer's position p from training_progress.txt, delete consumed
batches (before p) and any outside the window [p, p + buffer_size); if fewer than refill_threshold *
buffer_size consecutive batches are ready from p, build the missing ones of the window (across epoch
boundaries, up to epoch_end) in the worker processes (data/buffer/workers.py), else sleep sleep_time.
During a refill the position is re-read, consumed batches are deleted as the trainer goes, and a trainer
that restarted earlier (position moved back) re-plans the fill. Restarts and start order: data/buffer/__init__.py.
With num_of_threads = auto the worker count follows data/buffer/sizing.py's rule (_size_workers).
"""
import collections
import dataclasses
import json
import logging
import math
import os
import shutil
import time

from tqdm import tqdm

from utils.cli import check_epoch_range
from utils.files import TMP_PREFIX, atomic_write_text, human_bytes, is_temp_name
from data.buffer.builder import Recipe
from data.buffer.files import (batch_header_ok, bytes_per_batch, delete_batch, parse_batch_name, plan_refill,
                               retire_batch, scales_text, scan_batches, spare_file, worker_rows, SPARE)
from data.buffer.protocol import (HEARTBEAT, MANIFEST, PROGRESS, Heartbeat, file_identity, load_manifest,
                                  make_manifest, manifest_differences, producer_status, read_progress)
from data.buffer.sizing import WorkerSizer, choose_workers, ready_ahead
from data.buffer.workers import WorkerSet
from data.sources import scale_cache
from data.sources.index import load_source_index
from data.transforms.families import USES_SCALE_CACHE
from utils.errors import UserError

log = logging.getLogger(__name__)
_OWN_FILES = (MANIFEST, HEARTBEAT, SPARE)


class Producer:
    """runtime_preprocessing.py's engine: keeps up to buffer_size batches ready ahead of the trainer."""

    def __init__(self, settings, batch_size, epoch_start, epoch_end, clear_buffer=False, num_workers=None,
                 progress=True, once=False, worker=(0, 1)):
        self.settings = settings
        self.folder = settings.train.buffer_folder
        self.batch_size = int(batch_size)
        self.auto_start = epoch_start == "auto"
        self.epoch_start = 0 if self.auto_start else int(epoch_start)
        self.epoch_end = int(epoch_end)
        self.clear_buffer, self.once, self.progress = clear_buffer, once, progress
        rp = settings.runtime_preprocessing
        self.auto = (threads := num_workers or rp.num_of_threads) == "auto"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.num_workers, self.max_workers, self.sizing = choose_workers(threads, cores, rp.max_workers, once)
        self.sizer, self.timings = None, collections.deque(maxlen=64)  # timings: the heartbeat's build rate
        self.buffer_size = settings.train.buffer_size
        self.refill_below = rp.refill_threshold * self.buffer_size
        self.sleep_time = rp.sleep_time
        self.ready = set()   # linear positions of complete batches on disk
        self.spares = []     # consumed X files under temp names, to be overwritten by the next batches
        self._spare_count = 0
        self.produced = 0
        self.busy_seconds = 0.0  # time spent refilling: produced * rows / busy_seconds is the fill rate
        self._ignored_progress = None  # identity of a progress file set aside at start-up
        self.first_lin = None
        self._fill_started = None
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, received {self.batch_size}.")
        self.rows = worker_rows(self.batch_size, worker)
        self.worker = tuple(worker)  # (w, W): this machine builds rows [w*B/W, (w+1)*B/W) of each global batch
        check_epoch_range(self.epoch_start, self.epoch_end)

    # -- positions -------------------------------------------------------------

    def lin(self, epoch, batch):
        return epoch * self.num_batches + batch

    def epoch_batch(self, lin):
        return divmod(lin, self.num_batches)

    def trainer_position(self):
        """Linear position of the next batch the trainer needs, clamped to [epoch_start, epoch_end];
        None while the producer waits for the trainer's first report (see _adopt_progress).

        A progress file set aside at start-up (_adopt_progress) counts only once the trainer
        has rewritten it; until then the producer builds from its own first guess.
        """
        if self._ignored_progress is not None:
            if file_identity(os.path.join(self.folder, PROGRESS)) == self._ignored_progress:
                return self.first_lin
            self._ignored_progress = None
        p = read_progress(self.folder)
        lin = self.lin(*p) if p is not None and p[1] <= self.num_batches else self.first_lin
        return None if lin is None else min(max(lin, self.start_lin), self.end_lin)

    def _adopt_progress(self):
        """Decide whether training_progress.txt as found at start-up says where the trainer is.

        The file outlives runs, so at start-up it may be a previous run's last word. With an
        explicit --epoch_start, only a file that says (epoch_start, 0) is followed at once; with
        'auto', one inside [0, epoch_end). Any other is set aside until the trainer writes it
        again: a trainer reports on its first read and whenever it sees a new producer, so a
        producer restarted under a running trainer catches up within one poll. Meanwhile the
        producer builds from epoch_start, except with 'auto' past epoch_end (the run may be over,
        or a new one may start anywhere): then it builds nothing until the trainer reports.
        """
        self.first_lin = self.start_lin
        if self.auto_start and self.ready:
            self.first_lin = min(self.ready)  # the batches left ready are the best guess of where it stands
        p = read_progress(self.folder)
        if p is None or p[1] > self.num_batches:
            return
        lin = self.lin(*p)
        follow = lin < self.end_lin if self.auto_start else lin == self.start_lin
        if follow:
            return
        self._ignored_progress = file_identity(os.path.join(self.folder, PROGRESS))
        if self.auto_start:
            self.first_lin = None
        where = (f"past --epoch_end={self.epoch_end}" if lin >= self.end_lin
                 else f"not --epoch_start={self.epoch_start}")
        plan = ("waiting for the trainer to report" if self.first_lin is None else
                "building from epoch %d batch %d until the trainer writes it" % self.epoch_batch(self.first_lin))
        log.warning("%s says epoch %d batch %d, %s: left over from an earlier run (or from a trainer that will "
                    "report again); %s", PROGRESS, p[0], p[1], where, plan)

    # -- setup -------------------------------------------------------------------

    def setup(self):
        s = self.settings
        self._make_folder()
        state, record = producer_status(self.folder)
        if state == "running" and record.get("pid") != os.getpid():
            raise UserError(f"Another producer (pid {record.get('pid')} on {record.get('host')}) is filling "
                            f"{self.folder}; stop it first, or point [train] buffer_folder elsewhere.")
        index = load_source_index(s.data.source, s.preprocess.ImageNet_folder, "train", s.train.N, self.max_workers)
        if len(index) < self.batch_size:
            raise UserError(f"The training set has {len(index)} images, fewer than --batch_size={self.batch_size}.")
        self.num_batches = len(index) // self.batch_size
        self.start_lin, self.end_lin = self.lin(self.epoch_start, 0), self.lin(self.epoch_end, 0)
        cache = []
        if s.runtime_preprocessing.use_scale_cache and s.images.augmentation in USES_SCALE_CACHE:
            cache = sorted(set(scale_cache.complete_scales(s.preprocess.path_to_save, index)) & set(s.scales))
        self.recipe = Recipe.from_settings(s, self.batch_size, cache, self.worker)
        self.index = index
        self.manifest = make_manifest(self.recipe, index.fingerprint(), len(index), len(index.classes),
                                      self.epoch_start, self.epoch_end)
        self._check_existing()
        self._adopt_progress()
        atomic_write_text(os.path.join(self.folder, MANIFEST), json.dumps(self.manifest, indent=1) + "\n")
        self._check_free_space()
        cached = self.recipe.cached_scales  # the run's, when a restart keeps them (_keep_run_choices)
        log.info("producer: %d images, %d batches of %d per epoch, epochs %s..%d, %d worker(s) (%s), decoder %s, "
                 "scale cache %s, %d valid batches kept", len(index), self.num_batches, self.batch_size,
                 "auto" if self.auto_start else self.epoch_start, self.epoch_end - 1, self.num_workers, self.sizing,
                 self.recipe.decoder, f"{len(cached)} scales" if cached else "off", len(self.ready))
        if self.worker[1] > 1:
            w, count = self.worker
            log.info("producer: cluster worker %d of %d, building rows %d..%d of each global batch", w, count,
                     w * self.rows, (w + 1) * self.rows - 1)

    def _make_folder(self):
        try:
            os.makedirs(self.folder, exist_ok=True)
            probe = os.path.join(self.folder, f"{TMP_PREFIX}probe-{os.getpid()}")
            with open(probe, "wb") as f:
                f.write(b"0" * 4096)
            os.remove(probe)
        except OSError as e:
            raise UserError(f"Cannot write to the buffer folder {self.folder} ({e.strerror or e}); it needs about "
                            f"{human_bytes(self.buffer_size * bytes_per_batch(self.rows, self.settings.images.crop_size))}"
                            f" for {self.buffer_size} batches; fix its permissions or set [train] buffer_folder.") from None

    def _check_existing(self):
        """Sweep temp and half-written files; keep valid batches of this run, refuse or clear others."""
        self._sweep_temps()
        old = load_manifest(self.folder)
        complete, partial = scan_batches(self.folder)
        differences = manifest_differences(old, self.manifest) if old is not None else []
        lost = self._keep_run_choices(old) if old and not differences else []
        # An empty folder with an old manifest is simply taken over; batch files are never silently reused.
        foreign = bool(complete or partial) and (old is None or bool(differences)) or bool(complete and lost)
        if foreign:
            what = ("; ".join(differences or [f"{was} -> {now}" for was, now, _ in lost])
                    or f"{len(complete) + len(partial)} batch files without a manifest")
            if lost and not self.clear_buffer:
                raise UserError(self._choices_refusal(lost))
            if not self.clear_buffer:
                raise UserError(f"The buffer folder {self.folder} holds batches of another run ({what}); pass "
                                f"--clear_buffer to delete them, or set [train] buffer_folder to an empty folder.")
            log.warning("clearing %d batches of another run from %s (%s)", len(complete | partial), self.folder, what)
            for key in complete | partial:
                delete_batch(self.folder, *key)
            complete, partial = set(), set()
        if lost and not foreign and not self.clear_buffer:
            log.warning("the buffer's last run (%s) was built with %s and this producer builds with %s: if this "
                        "resumes that run, its batches from here on differ from an uninterrupted run's (%s to keep "
                        "them identical)", old.get("run_id"), *(" and ".join(part) for part in zip(*lost)))
        for key in partial:
            delete_batch(self.folder, *key)
        for key in complete:
            crop = self.recipe.crop_for(key[0])
            if key[1] < self.num_batches and batch_header_ok(self.folder, *key, self.rows, crop):
                self.ready.add(self.lin(*key))
            else:
                delete_batch(self.folder, *key)

    def _keep_run_choices(self, old):
        """Build with the decoder and cached scales of the buffer's run where this producer can; the
        [(run's choice, this producer's, how to keep the run's)] it cannot keep (all, with --clear_buffer).

        Both decide a batch's bytes (a cached and a fresh crop differ by several grey levels), so a
        resume is byte-identical only if they stay: decoder = auto keeps the run's decoder when it is
        installed, and a cache that gained scales is read at the run's scales only.
        """
        r, rp, lost = self.recipe, self.settings.runtime_preprocessing, []
        decoder_auto = "runtime_preprocessing.decoder" in self.settings.autos  # the config said auto
        decoder = old.get("decoder", r.decoder)
        if decoder != r.decoder:
            if decoder_auto and decoder == "pil" and not self.clear_buffer:
                r = dataclasses.replace(r, decoder="pil")
            else:
                fix = (f"set [runtime_preprocessing] decoder = {decoder}" if not decoder_auto else
                       "install the turbojpeg wheel (pip install -r requirements.txt)")
                lost.append((f"decoder {decoder}", f"decoder {r.decoder}", fix))
        cached = old.get("cached_scales")  # absent in manifests written before it was recorded
        if cached is not None and set(cached) != r.cached_scales:
            if set(cached) <= r.cached_scales and not self.clear_buffer:
                r = dataclasses.replace(r, cached_scales=frozenset(cached), cache_root=r.cache_root if cached else None)
                log.info("%s (%s complete now; --clear_buffer starts a buffer that reads them all)",
                         f"reading the scale cache at the run's scales {cached} only" if cached else
                         "not reading the scale cache, as the run did not", sorted(self.recipe.cached_scales))
            else:
                missing = sorted(set(cached) - r.cached_scales)
                fix = ("set [runtime_preprocessing] use_scale_cache = true" if not rp.use_scale_cache else
                       f"complete the cache with preprocess.py --shorter_side={','.join(map(str, missing))}"
                       if missing else "pass --clear_buffer")
                lost.append((f"{scales_text(cached)} from the scale cache",
                             f"{scales_text(missing)} decoded afresh" if missing else
                             f"{scales_text(sorted(r.cached_scales))} from the scale cache", fix))
        self.recipe = r
        self.manifest.update(decoder=r.decoder, cached_scales=sorted(r.cached_scales))
        return lost

    def _choices_refusal(self, lost):
        was, now, fix = (" and ".join(part) for part in zip(*lost))
        return (f"The buffer folder {self.folder} holds batches built with {was} but this producer would build "
                f"the rest with {now}, so they would differ from an uninterrupted run's; {fix} to continue the "
                f"run, or pass --clear_buffer to start the buffer over.")

    def _sweep_temps(self):
        """Remove temp files of killed writers: ours, and progress temps too old to be a live trainer's."""
        now = time.time()
        for name in os.listdir(self.folder):
            stem = name[len(TMP_PREFIX):] if is_temp_name(name) else None
            if not stem:
                continue
            path = os.path.join(self.folder, name)
            ours = parse_batch_name(stem.split("-")[0]) or stem.startswith(_OWN_FILES) or stem.startswith("probe-")
            try:
                # A trainer's progress temp lives for microseconds; one a minute old belongs to a killed trainer.
                if ours or (stem.startswith(PROGRESS) and now - os.path.getmtime(path) > 60):
                    os.remove(path)
            except OSError:
                pass

    def _tidy(self):
        """On exit, once no worker runs: no temp file and no half-written batch is left behind."""
        try:
            self._sweep_temps()
            for key in scan_batches(self.folder)[1]:
                delete_batch(self.folder, *key)
        except OSError:  # the folder itself is gone or unreadable: nothing to tidy, and the real error comes first
            pass

    def _check_free_space(self):
        need = (self.buffer_size - len(self.ready)) * bytes_per_batch(self.rows, self.recipe.crop)
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise UserError(f"The buffer folder {self.folder} has {human_bytes(free)} free but {self.buffer_size} "
                            f"batches need about {human_bytes(need)} more; free space there, lower [train] "
                            f"buffer_size, or point buffer_folder at a larger disk.")

    # -- main loop ---------------------------------------------------------------

    def run(self):
        """Produce until the trainer has consumed epoch_end's last batch (or, with once, until the window is full)."""
        if not hasattr(self, "manifest"):
            try:
                self.setup()
            except OSError:  # deleted while the index loaded (minutes for ImageNet)
                self._raise_if_folder_gone()
                raise
        info = {"run_id": self.manifest["run_id"], "epoch_start_floor": self.epoch_start, "epoch_end": self.epoch_end,
                "workers": self.num_workers, "max_workers": self.max_workers, "build_rate": 0.0,
                "sizing": self.sizing}
        # Workers first: forking while the heartbeat's or the bar's thread holds a lock could hang a child.
        workers = WorkerSet(self.num_workers, self.index.paths, self.index.labels, self.recipe, self.folder)
        final = "stopped"
        try:
            self.heartbeat = Heartbeat(self.folder, self.settings.runtime_preprocessing.heartbeat_interval, info)
            self.heartbeat.start()
            self.bar = self._make_bar()
            self.t0 = time.monotonic()
            if self.auto and not self.once:
                rp = self.settings.runtime_preprocessing
                self.sizer = WorkerSizer(self.max_workers, self.rows, self.buffer_size, rp.refill_threshold,
                                         window=rp.sizing_window, workers=self.num_workers, now=self.t0)
            self._loop(workers)
            final = "finished"
        except (OSError, RuntimeError):  # the heartbeat's write, the loop's or a worker's batch write (its crash)
            self._raise_if_folder_gone()
            raise
        finally:
            workers.stop()
            self._tidy()
            if hasattr(self, "heartbeat"):
                self.heartbeat.stop(final)
            if hasattr(self, "bar"):
                self.bar.close()
        return self.produced

    def _raise_if_folder_gone(self):
        if not os.path.isdir(self.folder):
            raise UserError(f"The buffer folder {self.folder} was deleted under the running producer; rerun "
                            f"runtime_preprocessing.py with --epoch_start=auto to recreate it and continue.") from None

    def _loop(self, workers):
        while True:
            self._check_heartbeat()
            workers.check_alive()
            pos = self.trainer_position()
            if pos is None:  # nothing known to build yet
                if self.once:
                    return
                self._show()
                time.sleep(self.sleep_time)
                continue
            self._size_workers(workers, pos)
            if pos >= self.end_lin:
                self._delete(self.ready, keep=False)
                log.info("the trainer consumed the last batch of epoch %d; producer done", self.epoch_end - 1)
                return
            stale, missing = plan_refill(pos, self.ready, self.buffer_size,
                                         math.inf if self.once else self.refill_below, self.end_lin)
            self._delete(stale)
            if missing:
                self._refill(workers, pos, missing)
                continue
            if self.once:
                return
            self._show()
            time.sleep(self.sleep_time)

    def _delete(self, lins, keep=True):
        """Remove batches from the buffer; with `keep`, their X files become spares for the next ones.

        Spares only ever replace batches one for one and every task takes one when there is
        one, so batch files and spares together stay within buffer_size.
        """
        for lin in sorted(lins):
            if keep and len(self.spares) < self.buffer_size:
                self._spare_count += 1
                spare = spare_file(self.folder, self._spare_count)
                if retire_batch(self.folder, *self.epoch_batch(lin), spare):
                    self.spares.append(spare)
            else:
                delete_batch(self.folder, *self.epoch_batch(lin))
            self.ready.discard(lin)

    def _refill(self, workers, pos, missing):
        """Build `missing` in order, a few tasks in flight; re-plan if the trainer jumps back.

        Once everything planned is handed out, the window is topped up to buffer_size from where
        the trainer stands now, so the workers never idle between one refill and the next while
        the trainer keeps consuming (the refill ends when the window is full, or at epoch_end).
        """
        started = self._fill_started = time.monotonic()
        pending = collections.deque(missing)
        last_check = time.monotonic()
        while pending or workers.in_flight:
            while pending and workers.has_room():
                workers.submit(*self.epoch_batch(pending.popleft()), self.spares.pop() if self.spares else None)
            for epoch, batch in workers.collect(timeout=0.5):
                self.ready.add(self.lin(epoch, batch))
                self.produced += 1
                self.bar.update(1)
            self._size_workers(workers, self.trainer_position())
            periodic = time.monotonic() - last_check >= 0.5
            if periodic or not pending:
                if periodic:
                    last_check = time.monotonic()
                    self._check_heartbeat()
                    self._show()
                now = self.trainer_position()
                if now < pos:
                    pending.clear()  # the trainer restarted earlier: finish what is in flight, then re-plan
                    continue
                while pending and pending[0] < now:
                    pending.popleft()  # consumed while we were busy
                self._delete([lin for lin in self.ready if lin < now])
                if not pending:
                    building = {self.lin(*task) for task in workers.tasks()}
                    pending.extend(plan_refill(now, self.ready | building, self.buffer_size, math.inf,
                                               self.end_lin)[1])
        self.busy_seconds += time.monotonic() - started
        self._fill_started = None
        self._show()

    def _size_workers(self, workers, pos):
        """Feed the sizer (num_of_threads = auto) what was built and where the trainer stands; apply its
        decision, one log line per change; keep the heartbeat's worker count and build rate current."""
        now = time.monotonic()
        self.timings.extend(workers.timings)
        for seconds in workers.timings if self.sizer is not None else ():
            self.sizer.built(now, seconds)
        workers.timings.clear()
        if self.sizer is not None and pos is not None:
            self.sizer.progress(now, pos)
            self.sizer.ready(now, ready_ahead(self.ready, pos, self.buffer_size), consumer_waiting=pos < self.end_lin)
            decision = self.sizer.decide(now)
            if decision is not None and decision.change:
                log.info("workers: %d -> %d: %s", decision.workers - decision.change, decision.workers,
                         decision.describe())
                with self.heartbeat.lock:  # an add forks: then no thread of ours holds a lock the child could need
                    (workers.add if decision.change > 0 else workers.retire)()
        rate = self.rows * len(self.timings) / sum(self.timings) if self.timings else 0.0
        self.heartbeat.update(workers=workers.count, build_rate=round(rate * workers.count, 1))

    def _check_heartbeat(self):
        if self.heartbeat.error is not None:
            raise self.heartbeat.error

    # -- display -----------------------------------------------------------------

    def _make_bar(self):
        return tqdm(total=self.end_lin - self.start_lin, desc="batches ready", unit="batch", dynamic_ncols=True,
                    disable=not self.progress, smoothing=0.1)

    def _show(self):
        """Bar: batches produced of the range; postfix: batches on disk / buffer_size, fill rate while filling."""
        busy = self.busy_seconds + (time.monotonic() - self._fill_started if self._fill_started else 0.0)
        rate = self.produced * self.rows / busy if busy > 0 else 0.0
        self.bar.set_postfix_str(f"buffer {len(self.ready)}/{self.buffer_size}, {rate:.0f} img/s", refresh=False)
        self.bar.refresh()
