"""Evaluation throughput vs the model's bare forward throughput on the same views.

    python bench/bench_eval.py [--images 400] [--views 10] [--width 0.25] [--crop 64] [--batch_images 25]

Builds a synthetic validation store (the demo generator's images, through
preprocess_val's store format) and a freshly initialised ResNet-50 exported as a
SavedModel, then times
  bare: the SavedModel's serving_default over the same batches of views, already in memory;
  eval: engine.evaluate.evaluate_epoch over the store (reading and cutting views in a
        background thread, averaging probabilities, ranking);
  reading: the store's batches alone, for scale.
The target is eval / bare >= 0.9: loading overlaps inference instead of adding to it.
Each figure is the best of --repeats interleaved runs (the machine may be shared).
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.cli import quiet_tensorflow, run_main  # noqa: E402
from utils.files import atomic_write_text  # noqa: E402

TARGET_RATIO = 0.9


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400, help="validation images in the synthetic store")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--views", type=int, default=10, choices=(1, 10, 50))
    p.add_argument("--width", type=float, default=0.25, help="ResNet-50 width multiplier")
    p.add_argument("--crop", type=int, default=64, help="view side")
    p.add_argument("--eval_resize", type=int, default=72, help="stored shorter side")
    p.add_argument("--batch_images", type=int, default=None, help="images per call (default: evaluate's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_eval.json"),
                   help="where the figures are also written as JSON")
    return p.parse_args(argv)


def build_synthetic_store(folder, images, classes, crop, eval_resize, views_50):
    from data.sources.index import load_index
    from data.sources.val_store import build_store, open_val_store
    from tools.make_demo_dataset import make_dataset
    root = os.path.join(folder, "dataset")
    per_class = -(-images // classes)
    make_dataset(root, num_classes=classes, train_per_class=1, val_per_class=per_class, odd_files=False,
                 num_workers=0)
    index = load_index(root, "val")
    scales_50 = (crop, eval_resize, eval_resize + 8, eval_resize + 16, eval_resize + 24)
    store_path = os.path.join(folder, "store")
    build_store(store_path, index, crop, eval_resize, views_50=views_50, scales_50=scales_50, num_workers=0,
                progress=False, say=lambda m: None)
    return open_val_store(store_path)


def export_model(folder, classes, width):
    import tensorflow as tf
    from model import build_model, export_saved_model
    net = build_model(num_classes=classes, width_multiplier=width)
    path = export_saved_model(net, os.path.join(folder, "saved_model"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return tf.saved_model.load(path)


def time_bare(predictor, batches):
    start = time.perf_counter()
    for flat in batches:
        predictor(flat).numpy()
    return time.perf_counter() - start


def time_loading(store, views, batch_images):
    start = time.perf_counter()
    for _ in store.iter_batches(views, batch_images):
        pass
    return time.perf_counter() - start


def time_eval(predictor, store, views, batch_images):
    from engine.scoring import evaluate_epoch
    result = evaluate_epoch(predictor, store, views, epoch=0, batch_images=batch_images, show_progress=False)
    return result.seconds


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_tensorflow()
    import tensorflow as tf
    from engine.model_wait import SavedModelPredictor
    from engine.scoring import images_per_call
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as folder:
        t0 = time.perf_counter()
        store = build_synthetic_store(folder, args.images, args.classes, args.crop, args.eval_resize,
                                      views_50=args.views == 50)
        predictor = SavedModelPredictor(export_model(folder, args.classes, args.width))
        per_call = images_per_call(args.views, args.batch_images)
        batches = [tf.constant(v.reshape((-1,) + v.shape[2:])) for v, _ in store.iter_batches(args.views, per_call)]
        predictor(batches[0]).numpy()  # trace and warm up outside the timings
        if len(batches[-1]) != len(batches[0]):
            predictor(batches[-1]).numpy()
        print(f"setup {time.perf_counter() - t0:.1f} s: {len(store)} images x {args.views} views of "
              f"{args.crop}x{args.crop}, ResNet-50 width {args.width}, {per_call} images per call")
        n = len(store)
        bare = full = loading = float("inf")
        for _ in range(args.repeats):  # interleaved, so a busy moment on a shared machine hits both alike
            bare = min(bare, time_bare(predictor, batches))
            full = min(full, time_eval(predictor, store, args.views, per_call))
            loading = min(loading, time_loading(store, args.views, per_call))
    figures = {"images": n, "views": args.views, "crop": args.crop, "width": args.width, "images_per_call": per_call,
               "bare_images_per_s": n / bare, "eval_images_per_s": n / full, "ratio": bare / full,
               "loading_images_per_s": n / loading,
               "target_ratio": TARGET_RATIO}
    print(f"bare forward:   {figures['bare_images_per_s']:8.1f} images/s "
          f"({figures['bare_images_per_s'] * args.views:.0f} views/s), views already in memory")
    print(f"check_accuracy: {figures['eval_images_per_s']:8.1f} images/s (store -> views -> model -> top-1/top-5)")
    print(f"reading views alone: {figures['loading_images_per_s']:8.1f} images/s (overlapped with inference)")
    verdict = "meets" if figures["ratio"] >= TARGET_RATIO else "BELOW"
    print(f"ratio eval/bare: {figures['ratio']:.3f} ({verdict} the {TARGET_RATIO} target)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
