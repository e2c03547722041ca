"""The dataset index: which files form a split, in which order, with which labels.

Accepted layouts under the dataset root (checked in this order, per split):
  lists:   <split>.txt with lines 'relpath label' (paths relative to the root, labels
           0..K-1); classes from synsets.txt (one wnid per line) when present.
  folders: train/<wnid>/*.JPEG, and val/<wnid>/*.JPEG.
  kaggle:  train/<wnid>/*.JPEG, and a flat val/ with LOC_val_solution.csv
           (ImageId,PredictionString; the first token is the wnid). The Kaggle
           download root (ILSVRC/Data/CLS-LOC/{train,val} beside the CSV) works too.
  tiny:    Tiny ImageNet (recognised by wnids.txt or val/val_annotations.txt):
           train/<wnid>/images/*.JPEG, flat val/images/ labelled by val/val_annotations.txt
           (tab-separated: file, wnid, box); wnids.txt, when present, must name the
           same classes as train/.
Classes are the sorted folder names of train/ (the lists layout: synsets.txt, or
label numbers). Files are taken by extension (.jpeg/.jpg/.png, any case) and
decoded later by content; unreadable ones are skipped by the scripts, not here,
so indexing 1.28M files costs only directory listings.

Order: folders by (class, file name); flat val by file name; lists in file order. Training visits
the index in a new order each epoch: epoch_permutation(seed, epoch, N).
"""
import csv
import dataclasses
import hashlib
import json
import os
import re

import numpy as np

from data.pool import imap_progress
from data.random_streams import epoch_order_rng
from data.sources import shards, tfrecord
from utils.errors import UserError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # any case; files are decoded later by content
SPLITS = ("train", "val")
KAGGLE_CSV = "LOC_val_solution.csv"
KAGGLE_SUBDIR = os.path.join("ILSVRC", "Data", "CLS-LOC")
EXPECTED_LAYOUTS = ("expected one of: train/<wnid>/*.JPEG with val/<wnid>/*.JPEG; train/<wnid>/ with a flat "
                    f"val/ plus {KAGGLE_CSV}; or list files train.txt/val.txt ('relpath label' per line); or "
                    "Tiny ImageNet's wnids.txt, train/<wnid>/images/ and val/val_annotations.txt")
TINY_WNIDS = "wnids.txt"
TINY_ANNOTATIONS = os.path.join("val", "val_annotations.txt")
EXPECTED_TINY = ("expected the Tiny ImageNet layout: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
                 "val/val_annotations.txt with lines 'file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1'")
COUNT_KEY = {"train": "[train] N", "val": "[preprocess_val] N"}
FINGERPRINT_SIZES = 4096


@dataclasses.dataclass
class DatasetIndex:
    paths: list          # absolute paths, index order
    labels: np.ndarray   # int64, one per path
    classes: list        # class names (wnids), label k is classes[k]
    layout: str          # 'folders', 'kaggle', 'lists' or 'tiny'
    root: str = ""
    split: str = ""

    def __len__(self):
        return len(self.paths)

    def relpaths(self):
        prefix = len(self.root) + 1
        return [p[prefix:] if p.startswith(self.root + os.sep) else os.path.relpath(p, self.root)
                for p in self.paths]

    def fingerprint(self):
        """Hash of classes, relative paths, labels and sampled file sizes: names this dataset split.

        The sizes of up to FINGERPRINT_SIZES evenly spaced files make a regenerated
        set with the same file names (the demo set) count as a different dataset,
        at a fixed cost whatever the dataset size. Moving the dataset keeps it.
        """
        h = hashlib.sha256()
        h.update(("\n".join(self.classes) + "\x00").encode())
        h.update("\n".join(f"{rel}\t{label}" for rel, label in zip(self.relpaths(), self.labels.tolist())).encode())
        step = max(1, len(self.paths) // FINGERPRINT_SIZES)
        h.update((" ".join(str(_size(p)) for p in self.paths[::step])).encode())
        return h.hexdigest()[:32]


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def load_index(root, split, expected_count=0):
    """Index one split of the dataset at `root`; raise UserError for any unrecognised layout."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', received {split!r}")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise UserError(f"Dataset folder {root} does not exist; set ImageNet_folder in the config.")
    if os.path.isfile(os.path.join(root, f"{split}.txt")):
        index = _from_list(root, split)
    elif os.path.isfile(os.path.join(root, "train.txt")):
        raise UserError(f"{root} has train.txt but no {split}.txt; the list layout needs both list files "
                        f"('relpath label' per line, paths relative to {root}).")
    elif _is_tiny(root):
        index = _from_tiny(root, split)
    else:
        data_root = _data_root(root)
        classes = _train_classes(root, data_root)
        if split == "train":
            index = _from_class_folders(root, os.path.join(data_root, "train"), classes, classes, "folders")
        else:
            index = _val_from_folders(root, data_root, classes)
    index.root, index.split = root, split
    if len(index) == 0:
        raise UserError(f"No images found for the {split} split in {root}; {EXPECTED_LAYOUTS}.")
    check_count(len(index), expected_count, split, root)
    return index


def check_count(found, expected_count, split, where, what="images", fix="the dataset"):
    """The config's N (0 = any) against what a source holds: a mismatch names both and the key to set."""
    if expected_count and found != expected_count:
        raise UserError(f"Found {found} {split} {what} in {where} but the config expects {expected_count}; "
                        f"fix {fix} or set {COUNT_KEY[split]} = {found} (0 accepts any count).")


# ----------------------------------------------------------------------------
# Folder layouts
# ----------------------------------------------------------------------------

def _data_root(root):
    """The folder holding train/ and val/: the root itself, or the Kaggle download's ILSVRC/Data/CLS-LOC."""
    if not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, KAGGLE_SUBDIR, "train")):
        return os.path.join(root, KAGGLE_SUBDIR)
    return root


def _is_image(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan(folder):
    """(sorted subfolder names, sorted image file names) of one folder."""
    dirs, images = [], []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif _is_image(entry.name):
                images.append(entry.name)
    return sorted(dirs), sorted(images)


def _train_classes(root, data_root):
    train = os.path.join(data_root, "train")
    if not os.path.isdir(train):
        raise UserError(f"{root} has no train/ folder and no train.txt; {EXPECTED_LAYOUTS}.")
    dirs, images = _scan(train)
    if images:
        raise UserError(f"{train} holds images directly ({images[0]}, ...); training images must sit in one "
                        f"folder per class, train/<wnid>/; {EXPECTED_LAYOUTS}.")
    if not dirs:
        raise UserError(f"{train} has no class folders; {EXPECTED_LAYOUTS}.")
    return dirs


def _from_class_folders(root, folder, folder_names, classes, layout):
    label_of = {c: k for k, c in enumerate(classes)}
    paths, labels = [], []
    for name in folder_names:
        if name not in label_of:
            raise UserError(f"{os.path.join(folder, name)} is a class that train/ does not have; "
                            f"val class folders must match the train class folders.")
        sub = os.path.join(folder, name)
        dirs, images = _scan(sub)
        if not images:
            raise UserError(f"Class folder {sub} holds no images (.JPEG/.jpg/.png); remove it or restore its files.")
        paths.extend(os.path.join(sub, f) for f in images)
        labels.extend([label_of[name]] * len(images))
    return DatasetIndex(paths, np.asarray(labels, np.int64), list(classes), layout)


def _val_from_folders(root, data_root, classes):
    val = os.path.join(data_root, "val")
    if not os.path.isdir(val):
        raise UserError(f"{root} has no val/ folder and no val.txt; {EXPECTED_LAYOUTS}.")
    dirs, images = _scan(val)
    if dirs and images:
        raise UserError(f"{val} mixes class folders and loose images ({images[0]}, ...); use one or the other; "
                        f"{EXPECTED_LAYOUTS}.")
    if dirs:
        return _from_class_folders(root, val, dirs, classes, "folders")
    csv_path = next((p for p in (os.path.join(root, KAGGLE_CSV), os.path.join(data_root, KAGGLE_CSV))
                     if os.path.isfile(p)), None)
    if csv_path is None:
        raise UserError(f"{val} is a flat folder of images without labels (no {KAGGLE_CSV} and no val.txt); "
                        f"{EXPECTED_LAYOUTS}.")
    return _val_from_kaggle_csv(val, images, csv_path, classes)


def _val_from_kaggle_csv(val, images, csv_path, classes):
    label_of = {c: k for k, c in enumerate(classes)}
    wnid_of = {}
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise UserError(f"{csv_path} must start with the header 'ImageId,PredictionString', received {header}.")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            tokens = row[1].split() if len(row) > 1 else []
            if not tokens:
                raise UserError(f"{csv_path} line {line_no} has no class in PredictionString; "
                                f"expected 'ImageId,<wnid> x y x y ...'.")
            if tokens[0] not in label_of:
                raise UserError(f"{csv_path} line {line_no} names class {tokens[0]}, which train/ does not have.")
            wnid_of[row[0].strip()] = tokens[0]
    paths, labels = [], []
    for name in images:
        stem = os.path.splitext(name)[0]
        if stem not in wnid_of:
            raise UserError(f"{os.path.join(val, name)} has no row in {csv_path}; every val image needs a label.")
        paths.append(os.path.join(val, name))
        labels.append(label_of[wnid_of.pop(stem)])
    if wnid_of:
        missing = sorted(wnid_of)
        raise UserError(f"{len(missing)} images listed in {csv_path} are missing from {val} ({missing[0]}, ...); "
                        f"restore them or remove their rows.")
    return DatasetIndex(paths, np.asarray(labels, np.int64), list(classes), "kaggle")


# ----------------------------------------------------------------------------
# Tiny ImageNet
# ----------------------------------------------------------------------------

def _is_tiny(root):
    return os.path.isfile(os.path.join(root, TINY_WNIDS)) or os.path.isfile(os.path.join(root, TINY_ANNOTATIONS))


def _from_tiny(root, split):
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        raise UserError(f"{root} has {TINY_WNIDS} or {TINY_ANNOTATIONS} but no train/ folder; {EXPECTED_TINY}.")
    classes, _ = _scan(train)
    if not classes:
        raise UserError(f"{train} has no class folders; {EXPECTED_TINY}.")
    _check_wnids_file(root, classes)
    if split == "val":
        return _tiny_val(root, classes)
    paths, labels = [], []
    for label, wnid in enumerate(classes):
        folder = os.path.join(train, wnid, "images")
        if not os.path.isdir(folder):
            raise UserError(f"{os.path.join(train, wnid)} has no images/ folder; {EXPECTED_TINY}.")
        _, names = _scan(folder)
        if not names:
            raise UserError(f"Class folder {folder} holds no images (.JPEG/.jpg/.png); remove the class or restore "
                            f"its files.")
        paths.extend(os.path.join(folder, name) for name in names)
        labels.extend([label] * len(names))
    return DatasetIndex(paths, np.asarray(labels, np.int64), classes, "tiny")


def _check_wnids_file(root, classes):
    path = os.path.join(root, TINY_WNIDS)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        listed = sorted({line.split()[0] for line in f if line.strip()})
    if listed != classes:
        extra = sorted(set(listed) - set(classes)) or sorted(set(classes) - set(listed))
        raise UserError(f"{path} lists {len(listed)} classes but train/ has {len(classes)} class folders (they "
                        f"differ in {extra[0]}); restore the missing folders or fix {TINY_WNIDS}.")


def _tiny_val(root, classes):
    label_of = {c: k for k, c in enumerate(classes)}
    annotations = os.path.join(root, TINY_ANNOTATIONS)
    folder = os.path.join(root, "val", "images")
    if not os.path.isfile(annotations) or not os.path.isdir(folder):
        missing = annotations if not os.path.isfile(annotations) else folder
        raise UserError(f"{missing} does not exist; {EXPECTED_TINY}.")
    wnid_of = {}
    with open(annotations) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = [field.strip() for field in line.split("\t")]
            if len(fields) < 2 or not fields[0] or not fields[1]:
                raise UserError(f"{annotations} line {line_no} must be 'file<TAB>wnid<TAB>box...', "
                                f"received '{line.strip()}'.")
            name, wnid = fields[0], fields[1]
            if wnid not in label_of:
                raise UserError(f"{annotations} line {line_no} names class {wnid}, which train/ does not have.")
            if wnid_of.setdefault(name, wnid) != wnid:
                raise UserError(f"{annotations} line {line_no} labels {name} {wnid} but an earlier line says "
                                f"{wnid_of[name]}; keep one line per image.")
    _, names = _scan(folder)
    unlabelled = [name for name in names if name not in wnid_of]
    if unlabelled:
        raise UserError(f"{len(unlabelled)} images in {folder} have no line in {annotations} ({unlabelled[0]}, ...); "
                        f"every val image needs a label.")
    missing = sorted(set(wnid_of) - set(names))
    if missing:
        raise UserError(f"{len(missing)} images listed in {annotations} are missing from {folder} ({missing[0]}, ...); "
                        f"restore them or remove their lines.")
    paths = [os.path.join(folder, name) for name in names]
    labels = np.asarray([label_of[wnid_of[name]] for name in names], np.int64)
    return DatasetIndex(paths, labels, list(classes), "tiny")


# ----------------------------------------------------------------------------
# List files
# ----------------------------------------------------------------------------

def _read_list(root, split):
    """[(abs path, label)] from <root>/<split>.txt."""
    list_path = os.path.join(root, f"{split}.txt")
    entries = []
    try:
        with open(list_path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{list_path} is not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    for line_no, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        rel, _, label = line.rpartition(" ")
        rel = rel.strip()
        if not rel or not re.fullmatch(r"-?[0-9]+", label):
            raise UserError(f"{list_path} line {line_no} must be 'relpath label', received '{line}'.")
        entries.append((_safe_join(root, rel, list_path, line_no), int(label)))
    return list_path, entries


def _safe_join(root, rel, list_path, line_no):
    if os.path.isabs(rel) or rel.startswith("~"):
        raise UserError(f"{list_path} line {line_no}: path '{rel}' must be relative to {root}.")
    path = os.path.normpath(os.path.join(root, rel))
    if not path.startswith(root + os.sep):
        raise UserError(f"{list_path} line {line_no}: path '{rel}' leaves the dataset folder {root}; "
                        f"list files may only name files inside it.")
    return path


def _list_classes(root, split_entries=None):
    """Class names: synsets.txt, else label numbers up to the largest label in train.txt."""
    synsets = os.path.join(root, "synsets.txt")
    if os.path.isfile(synsets):
        with open(synsets) as f:
            names = [line.split()[0] for line in f if line.strip()]
        if len(set(names)) != len(names):
            raise UserError(f"{synsets} lists a class twice; it must hold one distinct wnid per line.")
        return names
    if split_entries is None:
        if not os.path.isfile(os.path.join(root, "train.txt")):
            raise UserError(f"{root} has val.txt but no train.txt to define the classes; {EXPECTED_LAYOUTS}.")
        _, split_entries = _read_list(root, "train")
    count = max((label for _, label in split_entries), default=-1) + 1
    return [f"class_{k:04d}" for k in range(count)]


def _from_list(root, split):
    list_path, entries = _read_list(root, split)
    classes = _list_classes(root, entries if split == "train" else None)
    for line_no, (path, label) in enumerate(entries, start=1):
        if not 0 <= label < len(classes):
            raise UserError(f"{list_path}: label {label} of {path} is outside 0..{len(classes) - 1} "
                            f"(the classes in synsets.txt/train.txt).")
        if not _is_image(os.path.basename(path)):
            raise UserError(f"{list_path}: {path} is not a .JPEG/.jpg/.png file.")
    missing = [p for p, _ in entries if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} files listed in {list_path} do not exist ({missing[0]}, ...); "
                        f"paths must be relative to {root}.")
    paths = [p for p, _ in entries]
    labels = np.asarray([label for _, label in entries], np.int64)
    return DatasetIndex(paths, labels, classes, "lists")


def epoch_permutation(seed, epoch, n):
    """The order in which epoch `epoch` visits the n training images."""
    return epoch_order_rng(seed, epoch).permutation(int(n))  # data/random_streams.py


# ----------------------------------------------------------------------------
# The dataset index over shards
# ----------------------------------------------------------------------------

class TFRecordIndex(DatasetIndex):
    """A DatasetIndex whose `paths` are RecordRefs into the shards."""

    shard_names: tuple = ()
    shard_stamps: tuple = ()

    def relpaths(self):
        return [f"{os.path.basename(r.shard)}@{r.offset}" for r in self.paths]

    def fingerprint(self):
        h = hashlib.sha256()
        h.update(("\n".join(self.classes) + "\x00").encode())
        h.update(json.dumps([self.shard_names, self.shard_stamps]).encode())
        h.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        return h.hexdigest()[:32]


def load_tfrecord_index(folder, split, expected_count=0, num_workers=1, progress=False):
    """Index one split of a shard folder; the same contract as load_index.

    Labels are the records' own labels (checked against dataset_info.json's class table).
    """
    if split not in tfrecord.SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'val', received {split!r}")
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise UserError(f"TFRecord folder {folder} does not exist; set ImageNet_folder in the config.")
    info = shards.read_info(folder)
    shard_paths = shards.find_shards(folder, split)
    tables = list(imap_progress(shards.shard_index_job, shard_paths, num_workers, unit="shard",
                                desc=f"indexing {tfrecord.SPLIT_PREFIX[split]} shards", disable=not progress))
    classes = shards.class_names(info)
    columns = {k: np.concatenate([t[k] for t in tables]) for k in shards.INDEX_FIELDS}
    shard_of = np.concatenate([np.full(len(t["offsets"]), k, np.int64) for k, t in enumerate(tables)])
    shards.check_labels(folder, split, columns, classes, int(info["label_offset"]))
    order = np.lexsort((columns["offsets"], shard_of, columns["filenames"], columns["labels"]))
    paths = [tfrecord.RecordRef(shard_paths[s], int(o), int(n))
             for s, o, n in zip(shard_of[order].tolist(), columns["offsets"][order].tolist(),
                                columns["lengths"][order].tolist())]
    index = TFRecordIndex(paths, columns["labels"][order].astype(np.int64), classes, "tfrecord", folder, split)
    index.shard_names = tuple(os.path.basename(s) for s in shard_paths)
    index.shard_stamps = tuple(shards.shard_stamp(s).tolist() for s in shard_paths)
    if len(index) == 0:
        raise UserError(f"The {tfrecord.SPLIT_PREFIX[split]} shards in {folder} hold no records.")
    check_count(len(index), expected_count, split, folder, what="records", fix="the shards")
    return index


def load_source_index(source, root, split, expected_count=0, num_workers=1, progress=True):
    """One split of `root` read as [data] source says (`source`): 'folder' (load_index) or 'tfrecord' (shards)."""
    if source == "tfrecord":
        return load_tfrecord_index(root, split, expected_count, num_workers, progress)
    return load_index(root, split, expected_count)
