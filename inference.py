"""Classify image files or folders with a trained epoch's SavedModel, or measure its latency.

    python inference.py --model saved_models/myrun/29 photo.jpg more_photos/ [--top 5] [--synset_words FILE]
    python inference.py --model saved_models/myrun/29 --benchmark [photo.jpg] [--batch_sizes 1,8,32]

--model is an epoch folder (<path_for_saving>/<run>/<epoch>/) or the saved_model/ folder
inside it. Each image gets evaluation's single centre crop (check_accuracy.py --views 1):
decode to RGB by content, resize the shorter side to [images] eval_resize, cut the
central [images] crop_size square, with the same data.transforms.images functions the validation
store uses. The sizes come from the epoch folder's config.txt (the run's own settings)
unless --config is given. The top classes print with their synset ids, and with
human-readable names when a synset-words file ('n01440764 tench, Tinca tinca' per line:
LOC_synset_mapping.txt, synset_words.txt or imagenet_metadata.txt in the dataset root,
or --synset_words) is found. The class order is the one the run trained with: the
validation store's class list, or the TFRecord shards' dataset_info.json.

--benchmark times, after warm-up calls, (1) the latency of one image at batch 1 including
preprocessing (read, decode, resize, crop, model, probabilities back on the host; the TF official ResNet recipe
reports 11 ms on a V100), split into its preprocessing and model parts, and (2) model
throughput at each of --batch_sizes; every figure is the median and p90 over repeated runs.
Without an image argument it uses a generated 500x375 JPEG (a typical ImageNet size).

Serving the SavedModel (model/export.py; needs only TensorFlow, not this repository):
    m = tf.saved_model.load("saved_models/myrun/29/saved_model")
    out = m.signatures["serving_default"](images=tf.constant(batch_uint8))
  serving_default: images uint8 [B, H, W, 3] RGB, any B/H/W (train and evaluation use the
                   224 centre crop); normalised inside with the baked-in mu/sigma.
  normalized:      images float32 [B, H, W, 3], already (x/255 - mu)/sigma.
  Both return {'logits': float32 [B, C], 'probabilities': float32 [B, C] (softmax)}.
  `m.mu`, `m.sigma` hold the normalisation. With TF Serving, point a model server at a
  copy of saved_model/ under a numeric version folder (<name>/1/) and call the
  serving_default signature (REST: {"instances": [<uint8 HxWx3 nested list>]}).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from utils.cli import quiet_tensorflow, run_main
from settings import load_settings
from utils.errors import UserError
from utils.files import atomic_write_text
from data.sources import shards, synsets
from data.sources.index import IMAGE_EXTENSIONS
from data.transforms import images
from data.transforms.images import BadImageError
from engine import run_folder

LATENCY_NOTE = "batch 1, including preprocessing"


# ----------------------------------------------------------------------------
# Model folder, settings, class names
# ----------------------------------------------------------------------------

def resolve_model(path):
    """(saved_model folder, the epoch folder's config.txt or None) for an epoch or SavedModel folder."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        epoch_config = run_folder.config_path(os.path.dirname(path))
        return path, epoch_config if os.path.isfile(epoch_config) else None
    inner = run_folder.saved_model_dir(path)
    if os.path.isfile(os.path.join(inner, "saved_model.pb")):
        epoch_config = run_folder.config_path(path)
        return inner, epoch_config if os.path.isfile(epoch_config) else None
    raise UserError(f"{path} holds no SavedModel (saved_model.pb or saved_model/saved_model.pb); pass an "
                    f"epoch folder such as <path_for_saving>/<run>/<epoch>.")


def centre_view(path, eval_resize, crop):
    """Evaluation's 1-view protocol for one file: uint8 [crop, crop, 3] (BadImageError if unreadable)."""
    resized = np.asarray(images.resize_shorter(images.decode_rgb(path), eval_resize))
    return np.ascontiguousarray(images.center_crop(resized, crop))


def list_images(inputs):
    """The image files named by `inputs` (files as given; folders walked, sorted)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(item) for n in names
                           if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
            if not found:
                raise UserError(f"Folder {item} holds no .JPEG/.jpg/.png files.")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UserError(f"{item} is neither an image file nor a folder.")
    return files


def class_table(settings, num_outputs, synset_words=None):
    """[(synset id, name)] per model output, or None when no class list of that length is known."""
    classes = _store_classes(settings.preprocess_val.path_to_save)
    if classes is None:
        try:
            classes = shards.class_names(shards.read_info(settings.preprocess.ImageNet_folder))
        except UserError:
            classes = None
    if classes is None or len(classes) != num_outputs:
        return None
    names = synsets.find_synset_words(settings.preprocess.ImageNet_folder, synset_words)
    if not names and synset_words is None:
        names = synsets.find_synset_words(settings.preprocess_val.ImageNet_folder) or _shard_texts(settings)
    return [(c, names.get(c, "")) for c in classes]


def _shard_texts(settings):
    """{wnid: name} recorded by tools/build_tfrecords.py in the shards' dataset_info.json, or {}."""
    try:
        info = shards.read_info(settings.preprocess.ImageNet_folder)
    except UserError:
        return {}
    return dict(zip(info["classes"], info.get("texts") or []))


def _store_classes(store_path):
    try:
        with open(os.path.join(store_path, "meta.json")) as f:
            return list(json.load(f)["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_predictor(saved_model, crop):
    """(predict: uint8 [B, crop, crop, 3] -> float [B, C] probabilities, C) through check_accuracy's predictor."""
    quiet_tensorflow()
    import tensorflow as tf
    from engine.model_wait import SavedModelPredictor
    try:
        loaded = tf.saved_model.load(saved_model)
    except Exception as e:  # noqa: BLE001 - any load failure is one sentence for the user
        raise UserError(f"Could not load the SavedModel at {saved_model} ({type(e).__name__}); check that "
                              f"the epoch folder is complete.") from None
    predictor = SavedModelPredictor(loaded)
    predict = lambda batch: np.asarray(predictor(batch))  # noqa: E731
    return predict, predict(np.zeros((1, crop, crop, 3), np.uint8)).shape[-1]


# ----------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------

def classify(predict, files, eval_resize, crop, top=5, batch_images=32):
    """Yield (file, [(class index, probability)] best first, or an error text) for every file, in order."""
    for start in range(0, len(files), batch_images):
        chunk = files[start:start + batch_images]
        views, ok, results = [], [], {}
        for path in chunk:
            try:
                views.append(centre_view(path, eval_resize, crop))
                ok.append(path)
            except BadImageError as e:  # its text says <file> for the path, which the line already starts with
                results[path] = f"unreadable ({str(e).replace('<file>', os.path.basename(str(path)))})"
        if views:
            probabilities = predict(np.stack(views))
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]  # ties: lower index first, as evaluation
            for path, p, best in zip(ok, probabilities, order):
                results[path] = [(int(k), float(p[k])) for k in best]
        for path in chunk:
            yield path, results[path]


def format_result(path, result, table):
    if isinstance(result, str):
        return f"{path}: {result}"
    lines = [path]
    for rank, (k, p) in enumerate(result, start=1):
        label = f"{table[k][0]}  {table[k][1]}".rstrip() if table else f"class {k}"
        lines.append(f"  {rank}. {label:<60} {100 * p:6.2f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------

def _timed(fn, warmup, repeats, max_seconds):
    """Median and p90 (seconds) of fn() over up to `repeats` runs after `warmup` runs (at least 3 runs)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    median, p90 = np.percentile(times, [50, 90])
    return {"median_s": float(median), "p90_s": float(p90), "runs": len(times)}


def benchmark(predict, image_path, eval_resize, crop, batch_sizes=(1, 8, 32), warmup=3, repeats=30,
              max_seconds=30.0):
    """Latency at batch 1 (end to end, preprocessing, model) and throughput per batch size."""
    view = centre_view(image_path, eval_resize, crop)
    one = view[None]
    results = {
        "end_to_end_batch1": _timed(lambda: predict(centre_view(image_path, eval_resize, crop)[None]), warmup,
                                    repeats, max_seconds),
        "preprocess_only": _timed(lambda: centre_view(image_path, eval_resize, crop), warmup, repeats, max_seconds),
        "model_only_batch1": _timed(lambda: predict(one), warmup, repeats, max_seconds),
        "throughput": {},
    }
    for b in batch_sizes:
        batch = np.ascontiguousarray(np.broadcast_to(view, (b,) + view.shape))
        t = _timed(lambda: predict(batch), warmup, repeats, max_seconds)
        t.update(images_per_s_median=b / t["median_s"], images_per_s_p90=b / t["p90_s"])
        results["throughput"][str(b)] = t
    return results


def device_name():
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU ({details.get('device_name', gpus[0].name)})"
    return f"CPU ({os.cpu_count()} cores visible)"


def format_benchmark(results, device, model, size):
    ms = lambda t: f"median {1e3 * t['median_s']:8.2f} ms   p90 {1e3 * t['p90_s']:8.2f} ms   ({t['runs']} runs)"  # noqa: E731
    lines = [f"Benchmark of {model} on {device}, {size}x{size} input:",
             f"  latency, {LATENCY_NOTE}: {ms(results['end_to_end_batch1'])}",
             f"    preprocessing only:              {ms(results['preprocess_only'])}",
             f"    model only:                      {ms(results['model_only_batch1'])}"]
    for b, t in results["throughput"].items():
        lines.append(f"  throughput at batch {b:>4}: {t['images_per_s_median']:9.1f} img/s at the median call time, "
                     f"{t['images_per_s_p90']:9.1f} at the p90 ({1e3 * t['median_s']:.1f} / {1e3 * t['p90_s']:.1f} ms "
                     f"per call, {t['runs']} runs)")
    return "\n".join(lines)


def sample_image(folder):
    """A generated 500x375 RGB JPEG for --benchmark without an image argument."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    base = np.stack([xx * 255 / 499, yy * 255 / 374, (xx + yy) * 255 / 873], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    path = os.path.join(folder, "benchmark_500x375.JPEG")
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def _batch_sizes(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, received '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes >= 1, received '{text}'")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="epoch folder <path_for_saving>/<run>/<epoch> or its saved_model/")
    p.add_argument("inputs", nargs="*", help="image files and/or folders (--benchmark: optional, first file used)")
    p.add_argument("--top", type=int, default=5, help="classes to show per image")
    p.add_argument("--synset_words", help="'wnid name' lines for human-readable class names")
    p.add_argument("--batch_images", type=int, default=32, help="images per model call when classifying")
    p.add_argument("--config", help="config for eval_resize/crop_size and class lists (default: the epoch "
                                    "folder's config.txt, else config.txt next to this script)")
    b = p.add_argument_group("benchmark")
    b.add_argument("--benchmark", action="store_true", help="measure latency and throughput instead of classifying")
    b.add_argument("--batch_sizes", type=_batch_sizes, default=[1, 8, 32], help="throughput batch sizes (1,8,32)")
    b.add_argument("--warmup", type=int, default=3, help="untimed calls before each measurement")
    b.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (fewer past --max_seconds)")
    b.add_argument("--max_seconds", type=float, default=30.0, help="time budget per measurement (at least 3 runs)")
    b.add_argument("--json", help="also write the benchmark figures to this JSON file")
    args = p.parse_args(argv)
    for name in ("top", "batch_images", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, received {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, received {args.warmup}")
    if not args.benchmark and not args.inputs:
        p.error("give image files or folders to classify, or --benchmark")
    return args


def main(argv=None):
    args = parse_args(argv)
    saved_model, epoch_config = resolve_model(args.model)
    default_config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.txt")
    settings = load_settings(args.config or epoch_config or default_config, stats=False, decoder=False, devices=False)
    eval_resize, crop = settings.images.eval_resize, settings.images.crop_size
    files = list_images(args.inputs)
    predict, num_outputs = load_predictor(saved_model, crop)
    if args.benchmark:
        with tempfile.TemporaryDirectory() as tmp:
            image = files[0] if files else sample_image(tmp)
            results = benchmark(predict, image, eval_resize, crop, args.batch_sizes, args.warmup, args.repeats,
                                args.max_seconds)
        device = device_name()
        print(format_benchmark(results, device, saved_model, crop))
        if args.json:
            record = {"model": saved_model, "device": device, "image": image if files else "generated 500x375",
                      "eval_resize": eval_resize, "crop": crop, **results}
            atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")
        return 0
    table = class_table(settings, num_outputs, args.synset_words)
    if table is None:
        print(f"(no class list with {num_outputs} entries found, so classes show as indices; run preprocess_val.py "
              f"for this config to record the class order)")
    failed = 0
    for path, result in classify(predict, files, eval_resize, crop, min(args.top, num_outputs), args.batch_images):
        print(format_result(path, result, table), flush=True)
        failed += isinstance(result, str)
    if failed == len(files):
        raise UserError(f"none of the {len(files)} input file(s) could be read as an image (see above); "
                              f"pass JPEG or PNG files, or folders holding them.")
    if failed:
        print(f"warning: {failed} of {len(files)} input files could not be read as images (see above).",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
