"""Convert the ImageNet folder into TFRecord shards in Inception's build_imagenet_data format.

    python tools/build_tfrecords.py --out /data/imagenet_tfrecords --label_offset 1 [--config config.txt]
        [--bounding_box_file imagenet_2012_bounding_boxes.csv] [--train_shards 1024 --validation_shards 128]
    python tools/build_tfrecords.py --describe /data/shards_made_elsewhere --label_offset 1
    python tools/build_tfrecords.py --verify /data/imagenet_tfrecords

Shards are train-00000-of-01024 ... and validation-00000-of-00128 (counts configurable),
each a TFRecord file of tf.train.Example protos with build_imagenet_data's keys
(data/sources/tfrecord.py FEATURES). The images of a split are shuffled with Python's
random.seed(12345) before sharding, as Inception does, so every shard mixes classes.
RGB JPEGs are stored byte for byte; CMYK, grayscale and PNG files (ImageNet has all
three, whatever their extension) are decoded and re-encoded as RGB JPEG at
--jpeg_quality (100, as build_imagenet_data) without chroma subsampling; unreadable
files are skipped and listed in dataset_info.json.

--label_offset is required because it decides the model's output size: 1 writes
Inception's labels 1..1000 with 0 an unused background class (1001 outputs, as TF official ResNet),
0 writes 0..999 (1000 outputs, like the image folder). It is recorded in
dataset_info.json beside the shards and read back by every script.

Parallel (one shard per task, [preprocess] num_workers processes) and resumable: a
shard is written under a temporary name and renamed when complete, so a rerun of the
same command builds only the missing shards. --describe writes dataset_info.json for
shards built by Inception's own script; --verify checks every record's CRC with TensorFlow.
"""
import argparse
import io
import json
import multiprocessing
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.cli import add_config_arg, quiet_tensorflow, run_main, setup_logging  # noqa: E402
from settings import load_settings  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import atomic_path, atomic_write_text, remove_stale_temps  # noqa: E402
from utils.processes import git_hash  # noqa: E402
from data.pool import resolve_workers, single_writer  # noqa: E402
from data.sources import index as dataset_index, shards as shard_folder, synsets, tfrecord  # noqa: E402
from data.sources.index import load_index  # noqa: E402
from data.transforms import images  # noqa: E402

SHUFFLE_SEED = 12345  # build_imagenet_data's random.seed(12345)


# ----------------------------------------------------------------------------
# One image -> one record
# ----------------------------------------------------------------------------

def rgb_jpeg(path, quality):
    """(JPEG bytes, height, width, re-encoded?) of one file; BadImageError if it does not decode.

    Every file is decoded once, so a truncated JPEG is caught here rather than in training.
    """
    rgb = images.decode_rgb(path)
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as probe:
        plain = probe.format == "JPEG" and probe.mode == "RGB"
    if plain:
        return data, rgb.height, rgb.width, False
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality, subsampling=0)  # 4:4:4 like most ImageNet JPEGs: no colour bleeding
    return buf.getvalue(), rgb.height, rgb.width, True


def read_bounding_boxes(path):
    """{file name: float32 [n, 4] (ymin, xmin, ymax, xmax)} from Inception's CSV 'name,xmin,ymin,xmax,ymax'."""
    boxes = {}
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            parts = [p.strip() for p in line.strip().split(",")]
            if not parts[0]:
                continue
            try:
                xmin, ymin, xmax, ymax = (min(max(float(v), 0.0), 1.0) for v in parts[1:5])
                if len(parts) != 5:
                    raise ValueError
            except ValueError:
                raise UserError(f"{path} line {line_no} must be 'file,xmin,ymin,xmax,ymax' with numbers in "
                                      f"[0, 1], received '{line.strip()}'.") from None
            if xmin >= xmax or ymin >= ymax:
                continue  # an empty box covers nothing; Inception's generator drops them too
            boxes.setdefault(parts[0], []).append((ymin, xmin, ymax, xmax))
    return {name: np.asarray(b, np.float32) for name, b in boxes.items()}


# ----------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------

def plan_shards(n, num_shards, seed=SHUFFLE_SEED):
    """Index positions per shard: the split shuffled with random.seed(seed), cut into equal runs."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[s * n // num_shards:(s + 1) * n // num_shards] for s in range(num_shards)]


def _write_shard(job):
    """Worker: write one shard (temp name, then rename) and index it; returns (records, skipped)."""
    final, items, quality = job
    import tensorflow as tf  # workers only: the parent stays light, so forking it is safe
    skipped = []
    written = 0
    with atomic_path(final) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            for path, record in items:
                try:
                    record.encoded, record.height, record.width, _ = rgb_jpeg(path, quality)
                except images.BadImageError as e:
                    skipped.append((path, str(e)))
                    continue
                writer.write(tfrecord.encode_example(record))
                written += 1
    shard_folder.shard_index(final)  # cache the record index while the shard is in the page cache
    return written, skipped


def _worker_init():
    quiet_tensorflow()


def build_split(out, split, index, num_shards, label_offset, texts, boxes, quality, num_workers, progress=True):
    """Write the missing shards of one split; returns (records written now, SkipList)."""
    if num_shards < 1 or num_shards > 99999:
        raise UserError(f"the {split} shard count must be in 1..99999, received {num_shards}.")
    plan = plan_shards(len(index), num_shards)
    jobs = []
    for s, positions in enumerate(plan):
        final = os.path.join(out, tfrecord.shard_name(split, s, num_shards))
        if os.path.exists(final):
            continue
        items = []
        for i in positions:
            path, label = index.paths[i], int(index.labels[i])
            name = os.path.basename(path)
            synset = index.classes[label]
            items.append((path, tfrecord.ImageRecord(
                encoded=b"", label=label + label_offset, synset=synset, text=texts.get(synset, ""), filename=name,
                boxes=boxes.get(name, np.zeros((0, 4), np.float32)))))
        jobs.append((final, items, quality))
    skipped = images.SkipList(f"{split} image")
    if not jobs:
        return 0, skipped
    total = sum(len(items) for _, items, _ in jobs)
    bar = tqdm(total=total, desc=f"{tfrecord.SPLIT_PREFIX[split]} shards ({len(jobs)} to write)", unit="img",
               disable=not progress, dynamic_ncols=True, smoothing=0.05)
    workers = min(max(num_workers, 1), len(jobs))
    written = 0
    try:
        if workers == 1:
            _worker_init()
            results = map(_write_shard, jobs)
            pool = None
        else:
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)
            results = pool.imap_unordered(_write_shard, jobs)
        for (count, bad), (_, items, _) in zip(results, jobs):
            written += count
            for path, reason in bad:
                skipped.add(path, reason)
            bar.update(count + len(bad))
        if pool:
            pool.close()
            pool.join()
    finally:
        bar.close()
    return written, skipped


# ----------------------------------------------------------------------------
# dataset_info.json: settings first (checked on resume), counts at the end
# ----------------------------------------------------------------------------

def settings_for(indexes, label_offset, shards, quality, box_file, splits, texts):
    """What the shards are built from and how; a resume must match it (except the source's location)."""
    first = next(iter(indexes.values()))
    classes = first.classes
    return {"format": shard_folder.INFO_FORMAT, "format_version": shard_folder.INFO_VERSION, "label_offset": label_offset,
            "num_outputs": len(classes) + label_offset, "classes": list(classes),
            "texts": [texts.get(c, "") for c in classes], "source": first.root,
            "source_fingerprints": {split: index.fingerprint() for split, index in indexes.items()},
            "shards": {split: shards[split] for split in splits}, "jpeg_quality": quality,
            "bounding_box_file": os.path.abspath(box_file) if box_file else None, "shuffle_seed": SHUFFLE_SEED}


def start_info(out, settings):
    path = os.path.join(out, shard_folder.INFO_FILE)
    try:
        with open(path) as f:
            existing = json.load(f)
    except FileNotFoundError:
        existing = None
    except (OSError, ValueError):
        raise UserError(f"{path} is not readable JSON; delete it (and the shards) or choose another --out.") \
            from None
    if existing is None:
        if any(tfrecord.SHARD_NAME.match(n) for n in os.listdir(out)):
            raise UserError(f"{out} holds shards but no {shard_folder.INFO_FILE}; choose an empty --out, or use "
                                  f"--describe to record the label numbering of those shards.")
        atomic_write_text(path, json.dumps({**settings, "splits": {}}, indent=1) + "\n")
        return {**settings, "splits": {}}
    for key, value in settings.items():
        if key in ("shards", "source_fingerprints"):
            if all(existing.get(key, {}).get(s, v) == v for s, v in value.items()):
                continue
        elif key == "source":
            continue
        elif existing.get(key) == value:
            continue
        raise UserError(f"{out} holds shards built with other settings ({key}: {existing.get(key)!r}, now "
                              f"{value!r}); rerun with the same arguments to resume, or choose another --out.")
    for key in ("shards", "source_fingerprints"):
        existing[key] = {**existing.get(key, {}), **settings[key]}
    atomic_write_text(path, json.dumps(existing, indent=1) + "\n")
    return existing


def finish_info(out, info, split, num_records, skipped):
    info.setdefault("splits", {})[split] = {
        "prefix": tfrecord.SPLIT_PREFIX[split], "num_shards": info["shards"][split], "num_records": num_records,
        "skipped": skipped}
    info["git"] = git_hash()
    atomic_write_text(os.path.join(out, shard_folder.INFO_FILE), json.dumps(info, indent=1) + "\n")


def build(args, settings):
    source = os.path.abspath(args.source or settings.preprocess.ImageNet_folder)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or any(s not in tfrecord.SPLIT_PREFIX for s in splits):
        raise UserError(f"--splits must list train and/or val, received '{args.splits}'.")
    indexes = {split: load_index(source, split) for split in splits}
    classes = next(iter(indexes.values())).classes
    texts = synsets.find_synset_words(source, args.synset_words)
    boxes = read_bounding_boxes(args.bounding_box_file) if args.bounding_box_file else {}
    shards = {"train": args.train_shards, "val": args.validation_shards}
    workers = args.num_workers if args.num_workers is not None else settings.preprocess.num_workers
    with single_writer(out, "TFRecord shards"):
        remove_stale_temps(out)
        remove_stale_temps(shard_folder.cache_folder(out))
        info = start_info(out, settings_for(indexes, args.label_offset, shards, args.jpeg_quality,
                                            args.bounding_box_file, splits, texts))
        for split in splits:
            t0 = time.time()
            index = indexes[split]
            written, _ = build_split(out, split, index, shards[split], args.label_offset, texts, boxes,
                                           args.jpeg_quality, resolve_workers(workers), progress=not args.no_progress)
            shard_index = dataset_index.load_tfrecord_index(out, split)
            stored = set(shard_index_names(shard_index))
            missing = sorted(os.path.relpath(p, source) for p in index.paths if os.path.basename(p) not in stored)
            finish_info(out, info, split, len(shard_index), missing)
            print(f"{tfrecord.SPLIT_PREFIX[split]}: {len(shard_index)} records in {shards[split]} shards "
                  f"({written} written now in {time.time() - t0:.0f} s; {len(missing)} unreadable files skipped"
                  f"{', listed in ' + shard_folder.INFO_FILE if missing else ''}); labels "
                  f"{args.label_offset}..{len(classes) - 1 + args.label_offset}, "
                  f"{len(classes) + args.label_offset} model outputs -> {out}")
    return 0


def shard_index_names(index):
    """File names stored in the shards of an index (from the cached record indexes)."""
    names = []
    for shard in sorted({r.shard for r in index.paths}):
        names.extend(shard_folder.shard_index(shard)["filenames"].tolist())
    return names


def verify(folder, num_workers):
    """Read every record of every shard with TensorFlow (CRC-checked) and compare with the index."""
    quiet_tensorflow()
    import tensorflow as tf
    total = 0
    for split in tfrecord.SPLIT_PREFIX:
        try:
            shards = shard_folder.find_shards(folder, split)
        except UserError:
            continue
        for shard in tqdm(shards, desc=f"verifying {tfrecord.SPLIT_PREFIX[split]}", unit="shard"):
            try:
                count = sum(1 for _ in tf.data.TFRecordDataset(shard))
            except tf.errors.DataLossError as e:
                raise UserError(f"{shard} is corrupt ({str(e).splitlines()[0]}); delete it and rerun "
                                      f"tools/build_tfrecords.py to rebuild it.") from None
            indexed = len(shard_folder.shard_index(shard)["offsets"])
            if count != indexed:
                raise UserError(f"{shard} holds {count} records but its cached index {indexed}; delete "
                                      f"{shard_folder.cache_folder(folder)} and rerun --verify.")
            total += count
    if not total:
        raise UserError(f"{folder} has no shards to verify.")
    print(f"{folder}: all {total} records pass their CRC checks")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="folder to write the shards and dataset_info.json into")
    mode.add_argument("--describe", metavar="FOLDER", help="write dataset_info.json for shards built elsewhere")
    mode.add_argument("--verify", metavar="FOLDER", help="check every record's CRC with TensorFlow")
    p.add_argument("--label_offset", type=int, choices=(0, 1),
                   help="1 = Inception's labels 1..1000 with background 0 (1001 outputs); 0 = labels 0..999")
    p.add_argument("--source", help="dataset root (default: [preprocess] ImageNet_folder)")
    p.add_argument("--splits", default="train,val", help="which splits to convert")
    p.add_argument("--train_shards", type=int, default=tfrecord.DEFAULT_SHARDS["train"])
    p.add_argument("--validation_shards", type=int, default=tfrecord.DEFAULT_SHARDS["val"])
    p.add_argument("--bounding_box_file", help="Inception's CSV of normalised boxes: file,xmin,ymin,xmax,ymax")
    p.add_argument("--synset_words", help="'wnid name' lines for image/class/text (default: LOC_synset_mapping.txt, "
                                          "synset_words.txt or imagenet_metadata.txt in the dataset root)")
    p.add_argument("--jpeg_quality", type=int, default=100, help="quality of re-encoded CMYK/gray/PNG images")
    p.add_argument("--num_workers", type=int, default=None, help="processes (default [preprocess] num_workers)")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if (args.out or args.describe) and args.label_offset is None:
        p.error("--label_offset is required: 1 = Inception's 1..1000 with background 0 (1001 outputs), 0 = 0..999")
    if not 1 <= args.jpeg_quality <= 100:
        p.error(f"--jpeg_quality must be in 1..100, received {args.jpeg_quality}")
    return args


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    if args.describe:
        path, info = shard_folder.describe(args.describe, args.label_offset, num_workers=args.num_workers or 0)
        print(f"{path}: label_offset {info['label_offset']}, {len(info['classes'])} classes, "
              f"{info['num_outputs']} model outputs")
        return 0
    if args.verify:
        return verify(os.path.abspath(args.verify), args.num_workers)
    return build(args, load_settings(args.config, stats=False, decoder=False, devices=False))


if __name__ == "__main__":
    run_main(main)
