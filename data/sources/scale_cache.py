"""The per-scale resize cache written by preprocess.py and read by the producer.

Layout under <path_to_save>:
  dataset.json          fingerprint, class list and image count of the training index
  labels.npy            int64 label of every index position (stored once for all scales)
  <S>/img_<i>.jpg       training image i (index order) resized to shorter side S, JPEG
  <S>/complete.json     written last: the scale is complete; lists unreadable images

Image i is the same photo in every <S>/ folder (the original shuffled each folder
differently). Every file is written atomically, so a killed run leaves no
half-written image and a rerun resumes where it stopped.
"""
import io
import json
import os
import time

import numpy as np

from utils.errors import UserError
from utils.files import atomic_save_npy, atomic_write_bytes, atomic_write_text, read_json, remove_stale_temps
from data.transforms import images
from data.pool import imap_progress, single_writer

DATASET_FILE = "dataset.json"
LABELS_FILE = "labels.npy"
COMPLETE_FILE = "complete.json"
SKIPPED_FILE = "skipped_images.txt"
FORMAT_VERSION = 1


def cached_image_path(cache_root, shorter_side, i):
    return os.path.join(cache_root, str(int(shorter_side)), f"img_{int(i)}.jpg")


def cache_is_valid_for(cache_root, index):
    """True if the cache at `cache_root` was made from exactly this training index."""
    meta = read_json(os.path.join(cache_root, DATASET_FILE))
    return bool(meta) and meta.get("version") == FORMAT_VERSION and meta.get("fingerprint") == index.fingerprint()


def complete_scales(cache_root, index):
    """Shorter sides whose folder is complete for this index (empty if the cache is for another dataset)."""
    if not os.path.isdir(cache_root) or not cache_is_valid_for(cache_root, index):
        return []
    found = []
    for name in os.listdir(cache_root):
        if name.isdigit() and os.path.isfile(os.path.join(cache_root, name, COMPLETE_FILE)):
            found.append(int(name))
    return sorted(found)


def unreadable_indices(cache_root, shorter_side):
    """{index position: reason} of the images a complete scale could not include."""
    meta = read_json(os.path.join(cache_root, str(int(shorter_side)), COMPLETE_FILE)) or {}
    return {int(i): reason for i, (_, reason) in meta.get("unreadable", {}).items()}


def prepare(cache_root, index):
    """Create the cache root for `index`, or check that an existing one was made from it."""
    meta_path = os.path.join(cache_root, DATASET_FILE)
    fingerprint = index.fingerprint()
    meta = read_json(meta_path)
    if meta is not None:
        if meta.get("version") != FORMAT_VERSION or meta.get("fingerprint") != fingerprint:
            raise UserError(
                f"{cache_root} holds a resize cache made from a different dataset ({meta.get('count')} images "
                f"from {meta.get('source')}, now {len(index)} from {index.root}); delete that folder or set "
                f"[preprocess] path_to_save to a new one.")
        return
    if os.path.isfile(os.path.join(cache_root, LABELS_FILE)):
        raise UserError(f"{cache_root} has {LABELS_FILE} but no {DATASET_FILE}, so it cannot be checked "
                              f"against the dataset; delete that folder or choose another path_to_save.")
    os.makedirs(cache_root, exist_ok=True)
    atomic_save_npy(os.path.join(cache_root, LABELS_FILE), np.asarray(index.labels, np.int64))
    meta = {"version": FORMAT_VERSION, "fingerprint": fingerprint, "count": len(index), "classes": index.classes,
            "layout": index.layout, "source": index.root}
    atomic_write_text(meta_path, json.dumps(meta) + "\n")  # last: marks the labels as complete


def _resize_one(job):
    """Worker: decode, resize and write one image. Returns None or the reason it was skipped."""
    src, dst, shorter_side, quality = job
    try:
        img = images.resize_shorter(images.decode_rgb(src), shorter_side)
    except images.BadImageError as e:
        return str(e)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    atomic_write_bytes(dst, buf.getvalue())
    return None


def build_scale(cache_root, index, shorter_side, num_workers=0, quality=95, progress=True):
    """Write every missing <S>/img_<i>.jpg; return counts {'written', 'existing', 'unreadable', 'seconds'}."""
    t0 = time.time()
    prepare(cache_root, index)
    folder = os.path.join(cache_root, str(int(shorter_side)))
    os.makedirs(folder, exist_ok=True)
    with single_writer(folder, f"the S={shorter_side} cache"):
        remove_stale_temps(folder)  # left by a killed run
        done = {entry.name for entry in os.scandir(folder)}
        todo = [(i, p) for i, p in enumerate(index.paths) if f"img_{i}.jpg" not in done]
        known_bad = unreadable_indices(cache_root, shorter_side)
        if any(i not in known_bad for i, _ in todo):  # files went missing since the scale was marked complete
            _remove_if_present(os.path.join(folder, COMPLETE_FILE))
        unreadable = _resize_all(cache_root, index, shorter_side, todo, num_workers, quality, progress)
        complete = {"shorter_side": int(shorter_side), "count": len(index), "fingerprint": index.fingerprint(),
                    "jpeg_quality": quality, "unreadable": unreadable}
        atomic_write_text(os.path.join(folder, COMPLETE_FILE), json.dumps(complete, indent=1) + "\n")
    return {"written": len(todo) - len(unreadable), "existing": len(index) - len(todo),
            "unreadable": len(unreadable), "seconds": time.time() - t0}


def _resize_all(cache_root, index, shorter_side, todo, num_workers, quality, progress):
    """Resize the (position, path) pairs in `todo`; returns {position: [relpath, reason]} of unreadable ones."""
    jobs = [(p, cached_image_path(cache_root, shorter_side, i), shorter_side, quality) for i, p in todo]
    results = imap_progress(_resize_one, jobs, num_workers, desc=f"S={shorter_side}", disable=not progress)
    skipped = images.SkipList()
    unreadable = {}
    for (i, path), reason in zip(todo, results):
        if reason is not None:
            skipped.add(path, reason)
            unreadable[str(i)] = [os.path.relpath(path, index.root), reason]
    skipped_file = os.path.join(cache_root, str(int(shorter_side)), SKIPPED_FILE)
    if not skipped.save(skipped_file):
        _remove_if_present(skipped_file)
    return unreadable


def _remove_if_present(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
