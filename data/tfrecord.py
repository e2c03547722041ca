"""TFRecord shards in the Inception `build_imagenet_data` format, read without TensorFlow.

Seed 003 (and many ImageNet users) keep the dataset as shards `train-00000-of-01024` ...
and `validation-00000-of-00128`, each a TFRecord file of serialised tf.train.Example
protos with the keys in FEATURES. With [data] source = tfrecord, ImageNet_folder names
such a folder and runtime_preprocessing.py, preprocess_val.py and get_mu_sigma.py read it
through `load_source_index`. Records then stand where file paths stood (RecordRef), in
the producer's worker processes, which must not import TensorFlow (seconds per process
and a GiB of memory):

- Framing: a record is uint64 length, uint32 masked CRC32C of the length, the bytes,
  uint32 masked CRC32C of the bytes (little-endian). The length CRC is checked when a
  shard is indexed (it catches a misaligned or truncated file); the data CRC only on
  request (`verify=True`, pure Python, slow): a corrupt image fails its JPEG decode
  anyway, and tools/build_tfrecords.py --verify checks every CRC with TensorFlow.
- Parsing: the Example/Features/Feature messages are declared here from their field
  numbers (tensorflow/core/example/{example,feature}.proto) and parsed by the protobuf
  package TensorFlow depends on (upb backend). Measured on a 110 KB record: 13.5 us per
  parse, against ~70 us for a hand-written wire-format walker that did not even decode
  the values, so the C parser is used.
- Random access: the first read of a shard builds its record index (offset, length,
  label, synset, file name of every record), cached atomically in <folder>/record_index/
  (or ~/.cache/resnet50_tfrecords/<hash>/ when the shard folder is read-only) and reused
  while the shard's size and mtime are unchanged. A record is then one os.pread.

Label numbering is never guessed: dataset_info.json beside the shards (written by
tools/build_tfrecords.py, or by its --describe mode for shards made elsewhere) holds
`label_offset` (0: labels 0..K-1; 1: Inception's 1..K with 0 an unused background
class, K+1 outputs) and the class wnids in label order. An index's `classes` then has
K + label_offset entries ('background' first when the offset is 1), so the model's
output size follows from the shards, and every record's label and synset are checked
against that table.

Order: records are indexed in (label, file name) order, the order the folder layout
gives, so the per-epoch permutation picks the same images from shards as from the
folder, whatever the shard count or the shuffle inside the shards.
"""
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import struct
import typing

import numpy as np

import utils
from data.index import DatasetIndex
from utils import UserError

INFO_FILE = "dataset_info.json"
INFO_FORMAT = "inception_build_imagenet_data"
INFO_VERSION = 1
INDEX_DIR = "record_index"
INDEX_VERSION = 1
BACKGROUND = "background"
SPLIT_PREFIX = {"train": "train", "val": "validation"}
DEFAULT_SHARDS = {"train": 1024, "val": 128}
SHARD_NAME = re.compile(r"^(train|validation)-(\d{5})-of-(\d{5})$")
_HEADER = struct.Struct("<QI")
_FOOTER = 4
_MAX_OPEN = 128  # open shard descriptors kept per process

FEATURES = {  # key -> kind, as build_imagenet_data writes them
    "image/encoded": "bytes", "image/format": "bytes", "image/colorspace": "bytes", "image/channels": "int64",
    "image/height": "int64", "image/width": "int64", "image/filename": "bytes",
    "image/class/label": "int64", "image/class/synset": "bytes", "image/class/text": "bytes",
    "image/object/bbox/xmin": "float", "image/object/bbox/xmax": "float",
    "image/object/bbox/ymin": "float", "image/object/bbox/ymax": "float",
    "image/object/bbox/label": "int64",
}


def shard_name(split, shard, num_shards):
    """'train-00000-of-01024' / 'validation-00000-of-00128' (build_imagenet_data's '%s-%.5d-of-%.5d')."""
    return f"{SPLIT_PREFIX[split]}-{shard:05d}-of-{num_shards:05d}"


# ----------------------------------------------------------------------------
# CRC32C (Castagnoli), masked as TFRecord does
# ----------------------------------------------------------------------------

def _crc_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(payload):
    """One TFRecord record around `payload` (pure Python CRC: for tests and small files)."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


# ----------------------------------------------------------------------------
# tf.train.Example without TensorFlow
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def example_class():
    """The tf.train.Example message class, declared from the .proto field numbers."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="resnet50_tf_example.proto", package="tensorflow",
                                               syntax="proto3")

    def message(name, fields):
        m = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = type_name
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", [("value", 1, F.TYPE_BYTES, rep, None)])
    message("FloatList", [("value", 1, F.TYPE_FLOAT, rep, None)]).field[0].options.packed = True
    message("Int64List", [("value", 1, F.TYPE_INT64, rep, None)]).field[0].options.packed = True
    feature = message("Feature", [("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
                                  ("float_list", 2, F.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
                                  ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tensorflow.Int64List")])
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = message("Features", [("feature", 1, F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry")])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
    message("Example", [("features", 1, F.TYPE_MESSAGE, opt, ".tensorflow.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


@dataclasses.dataclass
class ImageRecord:
    """One image of a shard. boxes: float32 [n, 4] as (ymin, xmin, ymax, xmax) in [0, 1], as TF stacks them."""
    encoded: bytes
    label: int
    synset: str = ""
    text: str = ""
    filename: str = ""
    height: int = 0
    width: int = 0
    boxes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4), np.float32))


def encode_example(record):
    """Serialised tf.train.Example with build_imagenet_data's keys and values."""
    example = example_class()()
    feature = example.features.feature
    feature["image/encoded"].bytes_list.value.append(record.encoded)
    feature["image/format"].bytes_list.value.append(b"JPEG")
    feature["image/colorspace"].bytes_list.value.append(b"RGB")
    feature["image/channels"].int64_list.value.append(3)
    feature["image/height"].int64_list.value.append(int(record.height))
    feature["image/width"].int64_list.value.append(int(record.width))
    feature["image/filename"].bytes_list.value.append(record.filename.encode())
    feature["image/class/label"].int64_list.value.append(int(record.label))
    feature["image/class/synset"].bytes_list.value.append(record.synset.encode())
    feature["image/class/text"].bytes_list.value.append(record.text.encode())
    boxes = np.asarray(record.boxes, np.float32).reshape(-1, 4)
    for column, key in enumerate(("ymin", "xmin", "ymax", "xmax")):
        feature[f"image/object/bbox/{key}"].float_list.value.extend(boxes[:, column].tolist())
    feature["image/object/bbox/label"].int64_list.value.extend([int(record.label)] * len(boxes))
    return example.SerializeToString()


def parse_example(payload, with_image=True):
    """ImageRecord from a serialised Example (ValueError if it is not one, or has no image/label)."""
    from google.protobuf.message import DecodeError
    try:
        feature = example_class().FromString(payload).features.feature
    except DecodeError as e:
        raise ValueError(f"not a tf.train.Example ({e})") from None
    if "image/class/label" not in feature or (with_image and "image/encoded" not in feature):
        raise ValueError("the Example has no image/encoded or image/class/label feature")

    def first(key, kind, default):
        if key not in feature:
            return default
        values = getattr(feature[key], f"{kind}_list").value
        return values[0] if len(values) else default

    text = lambda key: first(key, "bytes", b"").decode("utf-8", "replace")  # noqa: E731
    boxes = np.zeros((0, 4), np.float32)
    if all(f"image/object/bbox/{k}" in feature for k in ("ymin", "xmin", "ymax", "xmax")):
        columns = [list(feature[f"image/object/bbox/{k}"].float_list.value) for k in ("ymin", "xmin", "ymax", "xmax")]
        if len({len(c) for c in columns}) == 1:
            boxes = np.asarray(columns, np.float32).T.reshape(-1, 4)
    return ImageRecord(encoded=first("image/encoded", "bytes", b"") if with_image else b"",
                       label=int(first("image/class/label", "int64", -1)), synset=text("image/class/synset"),
                       text=text("image/class/text"), filename=text("image/filename"),
                       height=int(first("image/height", "int64", 0)), width=int(first("image/width", "int64", 0)),
                       boxes=boxes)


# ----------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------

class RecordRef(typing.NamedTuple):
    """Where one record's payload lies: shard path, byte offset of the payload, its length.

    Stands in for a file path in a DatasetIndex: `read_bytes()` gives the image file
    bytes (the JPEG), `read_record()` the whole ImageRecord (with its boxes).
    """
    shard: str
    offset: int
    length: int

    def __str__(self):
        return f"{self.shard}@{self.offset}"

    def __fspath__(self):
        # Path helpers (os.path.relpath in skip lists, log lines) then name the record '<shard>@<offset>';
        # opening that as a file fails loudly, which is why every reader goes through read_bytes().
        return str(self)

    def read_payload(self, verify=False):
        return read_payload(self, verify)

    def read_record(self):
        try:
            return parse_example(self.read_payload())
        except ValueError as e:
            raise OSError(f"record at byte {self.offset} of {self.shard}: {e}") from None

    def read_bytes(self):
        return self.read_record().encoded


_fds = {}  # pid -> {shard path: fd}, insertion ordered; descriptors are not shared across fork


def _fd(path):
    pid = os.getpid()
    table = _fds.get(pid)
    if table is None:
        _fds.clear()  # entries of the parent process: not ours to close
        table = _fds[pid] = {}
    fd = table.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        while len(table) >= _MAX_OPEN:
            os.close(table.pop(next(iter(table))))
    table[path] = fd  # most recently used last
    return fd


def read_payload(ref, verify=False):
    """The payload bytes of one record (OSError if the shard is shorter than the index says)."""
    size = ref.length + _FOOTER if verify else ref.length
    data = os.pread(_fd(ref.shard), size, ref.offset)
    if len(data) != size:
        raise OSError(f"{ref.shard} ends inside the record at byte {ref.offset}; the shard is truncated")
    if verify:
        payload = data[:ref.length]
        if struct.unpack("<I", data[ref.length:])[0] != masked_crc32c(payload):
            raise OSError(f"the record at byte {ref.offset} of {ref.shard} fails its CRC check")
        return payload
    return data


def iter_records(path, verify=False):
    """Yield (payload offset, payload bytes) of every record of a shard, checking the framing."""
    with open(path, "rb") as f:
        while True:
            start = f.tell()
            header = f.read(_HEADER.size)
            if not header:
                return
            if len(header) < _HEADER.size:
                raise UserError(f"{path} ends inside a record header at byte {start}; the shard is truncated, "
                                f"rebuild it (tools/build_tfrecords.py resumes) or copy it again.")
            length, length_crc = _HEADER.unpack(header)
            if length_crc != masked_crc32c(header[:8]):
                raise UserError(f"{path} has a corrupt record header at byte {start} (not a TFRecord file, or "
                                f"damaged); rebuild or copy that shard again.")
            payload = f.read(length)
            footer = f.read(_FOOTER)
            if len(payload) != length or len(footer) != _FOOTER:
                raise UserError(f"{path} ends inside the record at byte {start}; the shard is truncated, rebuild "
                                f"it (tools/build_tfrecords.py resumes) or copy it again.")
            if verify and struct.unpack("<I", footer)[0] != masked_crc32c(payload):
                raise UserError(f"The record at byte {start} of {path} fails its CRC check; rebuild that shard.")
            yield start + _HEADER.size, payload


# ----------------------------------------------------------------------------
# Per-shard record index (cached)
# ----------------------------------------------------------------------------

INDEX_FIELDS = ("offsets", "lengths", "labels", "synsets", "filenames", "num_boxes")


def _stamp(path):
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
    stamp = _stamp(shard)
    try:
        with np.load(cache, allow_pickle=False) as z:
            if np.array_equal(z["stamp"], stamp):
                return {k: z[k] for k in INDEX_FIELDS}
    except (OSError, ValueError, KeyError):
        pass
    index = scan_shard(shard)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with utils.atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, stamp=stamp, **index)
    return index


def _shard_index_job(shard):
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
    """Index one split of a shard folder; the same contract as data.index.load_index.

    Labels are the records' own labels (checked against dataset_info.json's class table).
    """
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'val', received {split!r}")
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise UserError(f"TFRecord folder {folder} does not exist; set ImageNet_folder in the config.")
    info = read_info(folder)
    shards = find_shards(folder, split)
    from data.pool import imap_progress
    tables = list(imap_progress(_shard_index_job, shards, num_workers, desc=f"indexing {SPLIT_PREFIX[split]} shards",
                                unit="shard", disable=not progress))
    classes = class_names(info)
    columns = {k: np.concatenate([t[k] for t in tables]) for k in INDEX_FIELDS}
    shard_of = np.concatenate([np.full(len(t["offsets"]), k, np.int64) for k, t in enumerate(tables)])
    _check_labels(folder, split, columns, classes, int(info["label_offset"]))
    order = np.lexsort((columns["offsets"], shard_of, columns["filenames"], columns["labels"]))
    paths = [RecordRef(shards[s], int(o), int(n))
             for s, o, n in zip(shard_of[order].tolist(), columns["offsets"][order].tolist(),
                                columns["lengths"][order].tolist())]
    index = TFRecordIndex(paths, columns["labels"][order].astype(np.int64), classes, "tfrecord", folder, split)
    index.shard_names = tuple(os.path.basename(s) for s in shards)
    index.shard_stamps = tuple(_stamp(s).tolist() for s in shards)
    if len(index) == 0:
        raise UserError(f"The {SPLIT_PREFIX[split]} shards in {folder} hold no records.")
    from data.index import check_count
    check_count(len(index), expected_count, split, folder, what="records", fix="the shards")
    return index


def load_source_index(cfg, root, split, expected_count=0, num_workers=1, progress=True):
    """One split of `root` read as [data] source says: 'folder' (data.index.load_index) or 'tfrecord' (shards)."""
    if cfg.data.source == "tfrecord":
        return load_tfrecord_index(root, split, expected_count, num_workers, progress)
    from data.index import load_index
    return load_index(root, split, expected_count)


def _check_labels(folder, split, columns, classes, offset):
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
    from data.pool import imap_progress
    shards = find_shards(folder, "train")
    by_label = {}
    for table in imap_progress(_shard_index_job, shards, num_workers, desc="indexing train shards", unit="shard",
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
            "created_by": "tools/build_tfrecords.py --describe", "git": utils.git_hash()}
    path = info_path(folder, for_writing=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    utils.atomic_write_text(path, json.dumps(info, indent=1) + "\n")
    return path, info


SYNSET_WORD_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "imagenet_metadata.txt")


def find_synset_words(root, explicit=None):
    """{wnid: name} from `explicit`, else from a known synset-words file in `root`; {} if there is none."""
    if explicit:
        if not os.path.isfile(explicit):
            raise UserError(f"The synset-words file {explicit} does not exist; expected lines 'n01440764 tench, ...'.")
        return read_synset_words(explicit)
    for name in SYNSET_WORD_FILES:
        path = os.path.join(root or "", name)
        if root and os.path.isfile(path):
            return read_synset_words(path)
    return {}


def read_synset_words(path):
    """{wnid: human-readable name} from 'n01440764 tench, Tinca tinca' lines (space or tab separated)."""
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.strip().split(None, 1)
            if parts and re.match(r"^n\d{8}$", parts[0]):
                names[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return names
