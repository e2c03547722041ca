"""The validation store: uint8 images packed in a few large files, memory-mapped for evaluation.

Written by preprocess_val.py, read by check_accuracy.py. Instead of the
original's 50 float16 views per image (15 MB each), it stores each image once:
  eval:  resized to shorter side [images] eval_resize; the 1-view (centre crop)
         and 10-view (4 corners + centre, each also flipped) protocols are cut
         from it at read time, which is only slicing.
  src:   (only with [preprocess_val] views_50) the decoded image, reduced to
         shorter side max(eval_scales_50) if it is larger; the 50-view protocol
         resizes it to each scale at read time. For images no larger than that
         side (almost all of ImageNet) this equals resizing the original.
A 500x375 photo takes 262 KB (eval) + 563 KB (src) instead of 15 MB.

Files in <path_to_save>/, each written atomically:
  settings.json                     what the store is being built from (checked on resume)
  chunk_<k>_<kind>.bin              raw uint8 HWC pixels, images back to back
  chunk_<k>_<kind>.npy              int64 rows (index position, byte offset, height, width)
  chunk_<k>.json                    written last per chunk: chunk done, unreadable files
  labels.npy, positions.npy, meta.json   written at the end; meta.json marks the store complete
Chunks make the build resumable: a rerun redoes only unfinished chunks.
"""
import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.files import atomic_path, atomic_save_npy, atomic_write_text, read_json, remove_stale_temps
from data.transforms import images
from data.pool import imap_progress, single_writer

FORMAT_VERSION = 1
SETTINGS_FILE = "settings.json"
META_FILE = "meta.json"
LABELS_FILE = "labels.npy"
POSITIONS_FILE = "positions.npy"
VIEW_ORDER = ("protocol 1: centre crop of the eval_resize image; protocol 10: tl, tl-flipped, tr, tr-flipped, bl, "
              "bl-flipped, br, br-flipped, centre, centre-flipped of the eval_resize image; protocol 50: for each "
              "of scales_50, the same 10 views of the image resized to that shorter side")


def _chunk_file(path, k, suffix):
    return os.path.join(path, f"chunk_{k:05d}{suffix}")


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------

def settings_for(index, crop, eval_resize, views_50, scales_50, chunk_images):
    kinds = ["eval", "src"] if views_50 else ["eval"]
    return {"version": FORMAT_VERSION, "fingerprint": index.fingerprint(), "count": len(index),
            "classes": list(index.classes), "source": index.root, "layout": index.layout,
            "crop": int(crop), "eval_resize": int(eval_resize), "views_50": bool(views_50),
            "scales_50": [int(s) for s in scales_50] if views_50 else [], "chunk_images": int(chunk_images),
            "kinds": kinds}


def _prepare_image(job):
    """Worker: decode one image and return {kind: uint8 HWC array}, or the reason it is unreadable."""
    path, eval_resize, src_side = job
    try:
        img = images.decode_rgb(path)
    except images.BadImageError as e:
        return str(e)
    out = {"eval": np.asarray(images.resize_shorter(img, eval_resize))}
    if src_side:
        if min(img.size) > src_side:
            img = images.resize_shorter(img, src_side)
        out["src"] = np.asarray(img)
    return out


def _chunk_done(path, k, kinds):
    return os.path.isfile(_chunk_file(path, k, ".json")) and all(
        os.path.isfile(_chunk_file(path, k, f"_{kind}.npy")) for kind in kinds)


def _write_chunk(path, k, index, positions, settings, num_workers, progress):
    kinds = settings["kinds"]
    src_side = max(settings["scales_50"]) if settings["views_50"] else 0
    jobs = [(index.paths[i], settings["eval_resize"], src_side) for i in positions]
    rows = {kind: [] for kind in kinds}
    skipped = []
    offsets = {kind: 0 for kind in kinds}
    with _blob_writers(path, k, kinds) as blobs:
        results = imap_progress(_prepare_image, jobs, num_workers, desc=f"val chunk {k}", disable=not progress)
        for i, result in zip(positions, results):
            if isinstance(result, str):
                skipped.append([int(i), os.path.relpath(index.paths[i], index.root), result])
                continue
            for kind in kinds:
                arr = np.ascontiguousarray(result[kind], np.uint8)
                blobs[kind].write(arr.tobytes())
                rows[kind].append((int(i), offsets[kind], arr.shape[0], arr.shape[1]))
                offsets[kind] += arr.nbytes
    for kind in kinds:
        table = np.asarray(rows[kind], np.int64).reshape(-1, 4)
        atomic_save_npy(_chunk_file(path, k, f"_{kind}.npy"), table)
    atomic_write_text(_chunk_file(path, k, ".json"), json.dumps({"skipped": skipped}) + "\n")
    return skipped


@contextlib.contextmanager
def _blob_writers(path, k, kinds):
    """One open temp file per kind for chunk k; each is renamed to chunk_<k>_<kind>.bin only on success."""
    with contextlib.ExitStack() as stack:
        files = {}
        for kind in kinds:
            tmp = stack.enter_context(atomic_path(_chunk_file(path, k, f"_{kind}.bin")))
            files[kind] = stack.enter_context(open(tmp, "wb"))
        yield files


def build_store(path, index, crop, eval_resize, views_50=False, scales_50=(), chunk_images=5000, num_workers=0,
                progress=True, say=print):
    """Build (or finish building) the store for `index`; returns the meta dict."""
    if views_50 and min(scales_50) < crop:
        raise UserError(f"[images] eval_scales_50 must all be >= crop_size ({crop}) for the 50-view set, "
                              f"received {', '.join(map(str, scales_50))}.")
    settings = settings_for(index, crop, eval_resize, views_50, scales_50, chunk_images)
    os.makedirs(path, exist_ok=True)
    _check_settings(path, settings)
    meta = read_json(os.path.join(path, META_FILE))
    if meta is not None:
        say(f"{path} is already complete ({meta['images']} images); nothing to do.")
        return meta
    with single_writer(path, "the validation store"):
        remove_stale_temps(path)  # left by a killed run
        num_chunks = -(-len(index) // chunk_images)
        skipped = images.SkipList("validation image")
        for k in range(num_chunks):
            if _chunk_done(path, k, settings["kinds"]):
                continue
            positions = range(k * chunk_images, min((k + 1) * chunk_images, len(index)))
            for i, _, reason in _write_chunk(path, k, index, positions, settings, num_workers, progress):
                skipped.add(index.paths[i], reason)
        return _finish(path, index, settings, num_chunks)


def _check_settings(path, settings):
    settings_path = os.path.join(path, SETTINGS_FILE)
    existing = read_json(settings_path)
    if existing is None:
        if any(name.startswith("chunk_") or name == META_FILE for name in os.listdir(path)):
            raise UserError(f"{path} holds validation-store files but no {SETTINGS_FILE}; "
                                  f"delete that folder or set [preprocess_val] path_to_save to a new one.")
        atomic_write_text(settings_path, json.dumps(settings, indent=1) + "\n")
        return
    changed = [key for key in settings if existing.get(key) != settings[key]]
    if changed:
        key = changed[0]
        shown = lambda v: "a different dataset" if key == "fingerprint" else repr(v)  # noqa: E731
        raise UserError(f"{path} holds a validation store made with other settings ({key}: "
                              f"{shown(existing.get(key))}, now {shown(settings[key])}); delete that folder or "
                              f"set [preprocess_val] path_to_save to a new one.")


def _finish(path, index, settings, num_chunks):
    skipped = []
    positions = []
    stored_bytes = 0
    for k in range(num_chunks):
        skipped.extend(read_json(_chunk_file(path, k, ".json"))["skipped"])
        tables = {kind: np.load(_chunk_file(path, k, f"_{kind}.npy"), allow_pickle=False) for kind in settings["kinds"]}
        positions.extend(tables["eval"][:, 0].tolist())
        for kind, table in tables.items():
            stored_bytes += int((table[:, 2] * table[:, 3] * 3).sum()) + table.nbytes
    positions = np.asarray(positions, np.int64)
    atomic_save_npy(os.path.join(path, POSITIONS_FILE), positions)
    atomic_save_npy(os.path.join(path, LABELS_FILE), np.asarray(index.labels, np.int64)[positions])
    protocols = [1, 10] + ([50] if settings["views_50"] else [])
    meta = dict(settings, images=len(positions), skipped=skipped, protocols=protocols, num_chunks=num_chunks,
                bytes_per_image=stored_bytes / max(len(positions), 1), view_order=VIEW_ORDER)
    atomic_write_text(os.path.join(path, META_FILE), json.dumps(meta, indent=1) + "\n")
    return meta


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------

class ValStore:
    """A complete validation store, memory-mapped. Image j (0..len-1) has label labels[j]."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        meta = read_json(os.path.join(self.path, META_FILE))
        if meta is None or meta.get("version") != FORMAT_VERSION:
            raise UserError(f"No complete validation store at {self.path}; run preprocess_val.py "
                                  f"(it resumes if it was interrupted).")
        self.meta = meta
        self.classes = list(meta["classes"])
        self.crop = int(meta["crop"])
        self.eval_resize = int(meta["eval_resize"])
        self.scales_50 = tuple(meta["scales_50"])
        self.protocols = tuple(meta["protocols"])
        self.skipped = meta["skipped"]
        self.labels = np.load(os.path.join(self.path, LABELS_FILE), allow_pickle=False).astype(np.int64)
        self.positions = np.load(os.path.join(self.path, POSITIONS_FILE), allow_pickle=False)
        try:
            self._tables = {kind: self._load_tables(kind, meta["num_chunks"]) for kind in meta["kinds"]}
        except (OSError, ValueError) as e:
            raise UserError(f"The validation store at {self.path} is damaged ({e}); delete it and rerun "
                                  f"preprocess_val.py.") from None
        self._blobs = {}

    def _load_tables(self, kind, num_chunks):
        parts = []
        for k in range(num_chunks):
            table = np.load(_chunk_file(self.path, k, f"_{kind}.npy"), allow_pickle=False)
            end = int((table[:, 1] + table[:, 2] * table[:, 3] * 3).max()) if len(table) else 0
            size = os.path.getsize(_chunk_file(self.path, k, f"_{kind}.bin"))
            if size != end:
                raise ValueError(f"chunk_{k:05d}_{kind}.bin has {size} bytes, its index needs {end}")
            parts.append(np.concatenate([np.full((len(table), 1), k, np.int64), table[:, 1:]], axis=1))
        table = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
        if len(table) != len(self.labels):
            raise UserError(f"The validation store at {self.path} is inconsistent ({kind} has {len(table)} "
                                  f"images, labels {len(self.labels)}); delete it and rerun preprocess_val.py.")
        return table  # rows: (chunk, offset, height, width)

    def __len__(self):
        return len(self.labels)

    def _blob(self, kind, k):
        key = (kind, k)
        if key not in self._blobs:
            file = _chunk_file(self.path, k, f"_{kind}.bin")
            self._blobs[key] = (np.memmap(file, np.uint8, mode="r") if os.path.getsize(file)
                                else np.zeros(0, np.uint8))
        return self._blobs[key]

    def image(self, j, kind="eval"):
        """Stored uint8 HWC image j: 'eval' (shorter side eval_resize) or 'src' (for the 50-view set)."""
        k, offset, h, w = self._tables[kind][j].tolist()
        return self._blob(kind, k)[offset:offset + h * w * 3].reshape(h, w, 3)

    def check_crop(self, protocol, crop):
        """Refuse a crop the stored images cannot give: above eval_resize (1 and 10 views) or the smallest of
        the 50-view scales."""
        largest = min(self.scales_50) if protocol == 50 else self.eval_resize
        if not 1 <= crop <= largest:
            what = "the smallest [images] eval_scales_50" if protocol == 50 else "the stored eval_resize"
            raise UserError(f"--crop must be between 1 and {largest} ({what} of {self.path}) for {protocol} "
                            f"view(s), received {crop}; use a smaller --crop or rebuild the store with "
                            f"preprocess_val.py at a larger eval_resize.")

    def views(self, j, protocol, crop=None):
        """uint8 [V, crop, crop, 3] views of image j for protocol 1, 10 or 50 (crop: the store's unless given)."""
        crop = crop or self.crop
        if protocol not in self.protocols:
            raise UserError(f"The validation store at {self.path} has no {protocol}-view data (it holds "
                                  f"{', '.join(map(str, self.protocols))}); set [preprocess_val] views_50 = true "
                                  f"and rerun preprocess_val.py.")
        if protocol == 1:
            return images.center_crop(self.image(j), crop)[None]
        if protocol == 10:
            return images.eval_views(self.image(j), crop)
        return images.views_at_scales(Image.fromarray(np.asarray(self.image(j, "src"))), self.scales_50, crop)

    def iter_batches(self, protocol, images_per_batch, threads=None, crop=None):
        """Yield (views uint8 [n, V, crop, crop, 3], labels int64 [n]) over the whole store, in order."""
        if crop is not None:
            self.check_crop(protocol, crop)
        self.views(0, protocol) if len(self) else None  # fail early on a missing protocol
        threads = threads or (min(4, os.cpu_count() or 1) if protocol == 50 else 1)
        pool = ThreadPoolExecutor(threads) if threads > 1 else None  # PIL resizes release the GIL
        try:
            for start in range(0, len(self), images_per_batch):
                js = range(start, min(start + images_per_batch, len(self)))
                views = list(pool.map(self.views, js, [protocol] * len(js), [crop] * len(js))) if pool else \
                    [self.views(j, protocol, crop) for j in js]
                yield np.stack(views), self.labels[start:start + len(js)]
        finally:
            if pool:
                pool.shutdown()


def open_val_store(path):
    return ValStore(path)
