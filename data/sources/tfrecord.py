"""TFRecord shards in the Inception `build_imagenet_data` format, read without TensorFlow.

The TF official ResNet recipe (and many ImageNet users) keep the dataset as shards `train-00000-of-01024` ...
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
- Random access: the first read of a shard builds its record index (data/sources/shards.py).
  A record is then one os.pread.

Shard folders, the record index and dataset_info.json: data/sources/shards.py.
"""
import dataclasses
import functools
import os
import re
import struct
import typing

import numpy as np

from utils.errors import UserError

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
