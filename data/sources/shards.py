"""Shard folders: finding the shards, the cached per-shard record index, and dataset_info.json.

- Random access: the first read of a shard builds its record index (offset, length,
  label, synset, file name of every record), cached atomically in <folder>/record_index/
  (or ~/.cache/resnet50_tfrecords/<hash>/ when the shard folder is read-only) and reused
  while the shard's size and mtime are unchanged. A record is then one os.pread
  (data/sources/tfrecord.py).

Label numbering is never guessed: dataset_info.json beside the shards (written by
tools/build_tfrecords.py, or by its --describe mode for shards made elsewhere) holds
`label_offset` (0: labels 0..K-1; 1: Inception's 1..K with 0 an unused background
class, K+1 outputs) and the class wnids in label order. An index's `classes` then has
K + label_offset entries ('background' first when the offset is 1), so the model's
output size follows from the shards, and every record's label and synset are checked
against that table (DatasetIndex over shards: data/sources/index.py).

Order: records are indexed in (label, file name) order, the order the folder layout
gives, so the per-epoch permutation picks the same images from shards as from the
folder, whatever the shard count or the shuffle inside the shards.
"""
import glob
import hashlib
import json
import os

import numpy as np

from utils.files import atomic_path, atomic_write_text
from utils.processes import git_hash
from data.pool import imap_progress
from data.sources.tfrecord import BACKGROUND, SHARD_NAME, SPLIT_PREFIX, iter_records, parse_example, shard_name
from utils.errors import UserError

INFO_FILE = "dataset_info.json"
INFO_FORMAT = "inception_build_imagenet_data"
INFO_VERSION = 1
INDEX_DIR = "record_index"
INDEX_VERSION = 1


# ----------------------------------------------------------------------------
# Per-shard record index (cached)
# ----------------------------------------------------------------------------

INDEX_FIELDS = ("offsets", "lengths", "labels", "synsets", "filenames", "num_boxes")


def shard_stamp(path):
    st = os.stat(path)
    return np.asarray([INDEX_VERSION, st.st_size, st.st_mtime_ns], np.int64)


def scan_shard(path):
    """The record index of one shard: dict of INDEX_FIELDS arrays (reads the whole shard once)."""
    rows = {k: [] for k in INDEX_FIELDS}
    for offset, payload in iter_records(path):
        try:
            record = parse_example(payload, with_image=False)
        except ValueError as e:
            raise UserError(f"The record at byte {offset} of {path} is not an ImageNet Example ({e}); "
                            f"expected shards in the build_imagenet_data format.") from None
        for key, value in zip(INDEX_FIELDS, (offset, len(payload), record.label, record.synset, record.filename,
                                             len(record.boxes))):
            rows[key].append(value)
    return {"offsets": np.asarray(rows["offsets"], np.int64), "lengths": np.asarray(rows["lengths"], np.int64),
            "labels": np.asarray(rows["labels"], np.int64), "synsets": np.asarray(rows["synsets"], dtype=str),
            "filenames": np.asarray(rows["filenames"], dtype=str),
            "num_boxes": np.asarray(rows["num_boxes"], np.int32)}


def cache_folder(folder):
    """Where the record indexes and a --describe'd dataset_info.json of `folder` live."""
    folder = os.path.abspath(folder)
    if os.access(folder, os.W_OK):
        return os.path.join(folder, INDEX_DIR)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(folder.encode()).hexdigest()[:16]
    return os.path.join(base, "resnet50_tfrecords", digest, INDEX_DIR)


def _index_path(shard):
    return os.path.join(cache_folder(os.path.dirname(shard)), os.path.basename(shard) + ".npz")


def shard_index(shard):
    """The (cached) record index of one shard; rebuilt when the shard's size or mtime changed."""
    cache = _index_path(shard)
    stamp = shard_stamp(shard)
    try:
        with np.load(cache, allow_pickle=False) as z:
            if np.array_equal(z["stamp"], stamp):
                return {k: z[k] for k in INDEX_FIELDS}
    except (OSError, ValueError, KeyError):
        pass
    index = scan_shard(shard)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, stamp=stamp, **index)
    return index


def shard_index_job(shard):
    return shard_index(shard)


# ----------------------------------------------------------------------------
# Shard discovery and dataset_info.json
# ----------------------------------------------------------------------------

def find_shards(folder, split):
    """The complete, ordered shard list of a split; UserError naming what is missing."""
    prefix = SPLIT_PREFIX[split]
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), f"{prefix}-*-of-*")):
        m = SHARD_NAME.match(os.path.basename(path))
        if m and m.group(1) == prefix:
            found.setdefault(int(m.group(3)), {})[int(m.group(2))] = path
    if not found:
        raise UserError(f"{folder} has no {prefix}-NNNNN-of-NNNNN shards; build them with tools/build_tfrecords.py "
                        f"or set [data] source = folder.")
    if len(found) > 1:
        raise UserError(f"{folder} mixes {prefix} shard sets of different sizes "
                        f"({', '.join(f'-of-{n:05d}' for n in sorted(found))}); keep one set.")
    (count, shards), = found.items()
    missing = [shard_name(split, k, count) for k in range(count) if k not in shards]
    if missing:
        raise UserError(f"{folder} holds {len(shards)} of the {count} {prefix} shards ({missing[0]} is missing); "
                        f"finish tools/build_tfrecords.py (it resumes) or copy the missing shards.")
    return [shards[k] for k in range(count)]


def info_path(folder, for_writing=False):
    """dataset_info.json beside the shards, or in the cache folder when the shard folder is read-only."""
    beside = os.path.join(os.path.abspath(folder), INFO_FILE)
    cached = os.path.join(os.path.dirname(cache_folder(folder)), INFO_FILE)
    if for_writing:
        return beside if os.access(os.path.abspath(folder), os.W_OK) else cached
    return beside if os.path.isfile(beside) or not os.path.isfile(cached) else cached


def read_info(folder):
    """dataset_info.json as a dict; UserError when it is missing or does not say how labels are numbered."""
    path = info_path(folder)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{folder} has no {INFO_FILE}, so the label numbering of its shards is unknown; run "
                        f"`python tools/build_tfrecords.py --describe {folder} --label_offset 1` (shards from "
                        f"Inception's build_imagenet_data: labels 1..1000, 0 = background) or --label_offset 0.") \
            from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); delete it and rerun tools/build_tfrecords.py "
                        f"(or its --describe mode).") from None
    if (info.get("format") != INFO_FORMAT or info.get("label_offset") not in (0, 1)
            or not isinstance(info.get("classes"), list) or not info["classes"]):
        raise UserError(f"{path} does not record label_offset (0 or 1) and the class list; rerun "
                        f"tools/build_tfrecords.py --describe {folder} --label_offset 0|1.")
    return info


def class_names(info):
    """The index's class list: the wnids in label order, after 'background' when label_offset is 1."""
    return [BACKGROUND] * int(info["label_offset"]) + list(info["classes"])


def check_labels(folder, split, columns, classes, offset):
    labels, synsets = columns["labels"], columns["synsets"]
    bad = np.flatnonzero((labels < offset) | (labels >= len(classes)))
    if len(bad):
        raise UserError(f"A {split} record in {folder} has label {labels[bad[0]]}, outside {offset}..{len(classes) - 1}"
                        f" that {INFO_FILE} (label_offset {offset}, {len(classes) - offset} classes) allows; the "
                        f"shards and {INFO_FILE} disagree: rerun --describe with the right --label_offset.")
    named = synsets != ""
    expected = np.asarray(classes)[labels[named]]
    wrong = np.flatnonzero(expected != synsets[named])
    if len(wrong):
        k = wrong[0]
        raise UserError(f"A {split} record in {folder} has label {labels[named][k]} and synset {synsets[named][k]}, "
                        f"but {INFO_FILE} gives that label to {expected[k]}; the label numbering differs: rerun "
                        f"tools/build_tfrecords.py --describe {folder} with the right --label_offset.")


def describe(folder, label_offset, num_workers=1, progress=True):
    """Write dataset_info.json for shards built elsewhere, from their synsets and the stated label offset.

    The synset of every training record gives the class table; a label that maps to
    two synsets, or a table that does not start at the stated offset, is an error.
    """
    folder = os.path.abspath(folder)
    shards = find_shards(folder, "train")
    by_label = {}
    for table in imap_progress(shard_index_job, shards, num_workers, desc="indexing train shards", unit="shard",
                               disable=not progress):
        for label, synset in zip(table["labels"].tolist(), table["synsets"].tolist()):
            if not synset:
                raise UserError(f"A record in {folder} has no image/class/synset, so the class table cannot be "
                                f"read from the shards; build them with tools/build_tfrecords.py instead.")
            if by_label.setdefault(label, synset) != synset:
                raise UserError(f"Label {label} in {folder} names two synsets ({by_label[label]} and {synset}); "
                                f"the shards are inconsistent.")
    labels = sorted(by_label)
    if labels != list(range(labels[0], labels[0] + len(labels))):
        raise UserError(f"The training labels in {folder} run {labels[0]}..{labels[-1]} with gaps; expected "
                        f"consecutive labels from {label_offset}.")
    if labels[0] != label_offset:
        raise UserError(f"The training labels in {folder} start at {labels[0]}, not at --label_offset "
                        f"{label_offset}; check how the shards were built and pass the matching --label_offset.")
    info = {"format": INFO_FORMAT, "format_version": INFO_VERSION, "label_offset": int(label_offset),
            "num_outputs": len(labels) + int(label_offset), "classes": [by_label[k] for k in labels],
            "created_by": "tools/build_tfrecords.py --describe", "git": git_hash()}
    path = info_path(folder, for_writing=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(info, indent=1) + "\n")
    return path, info
