"""Producer throughput against a naive pipeline, a bare decode and a tf.data decode-and-crop pipeline.

    python bench/bench_producer.py [--images 400] [--rounds 6] [--batch_size 64]
    python bench/bench_producer.py --images_dir /data/ImageNet [--images 2000]   # your own JPEGs

Times an ImageNet-like generated corpus (bench/corpus.py: photo-like JPEGs of 500x375
and similar at quality 90-96, a third 4:4:4, one in ten of 1-6 megapixels; ~115 KB and
0.4 MP on average), or with --images_dir a random sample of --images training files
of your dataset (any layout data/sources/index.py accepts), and prints the corpus's mean file
size and megapixels beside every figure, then how many producer workers feed a GPU at
the published rates (--feed adds yours). Every pipeline gets the same geometry (data/transforms/scale_crop.py's draws: shorter side 256..480,
224 crop, flip). Each one-core figure runs in a fresh process pinned to one CPU
(sched_setaffinity before any import, so TensorFlow's threads are pinned too):
  naive      decode (PIL) -> full resize to S -> crop -> flip -> float (x/255-mu)/sigma
  decode     bare full PIL decode to RGB
  tf.data    read_file -> decode_and_crop_jpeg(window) -> resize 224 -> flip, num_parallel_calls=1,
             private thread pool of 1, intra/inter-op threads 1
  augment    ours, in-process: draws, window decode + resample + flip into the batch slot (a
             worker's per-image work, without writing batch files; the PCA lighting shift is
             computed on the trainer's device, model/preprocessing.py)
  producer1  runtime_preprocessing's Producer (main process and 1 worker on the pinned CPU),
             writing batch files to --buffer_dir, in its steady state: a consumer process takes
             the batches as train.py's reader does (on another CPU, as a trainer would be) and
             reports progress, so the producer deletes and refills an 8-batch
             buffer all the time; the rate is what the consumer receives over 5 epochs between a
             warm-up epoch and a cool-down one, clocked between batches it had to wait for (consume)
and, unpinned (the producer and its consumer share the 2 CPUs): producer1u with 1 worker and
producer2 with 2. tf.data, augment and the producers each process 5 passes over the images,
so that short runs are not favoured by best-of on a shared machine (naive and decode: 1 pass).
Targets: producer1 / tf.data >= 1.0 and producer2 / producer1u >= 1.8. Each figure is the
best of --rounds interleaved runs (the
machine is shared); every run's figure is kept in the JSON output.
"""
import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.buffer.sizing import settled_count  # noqa: E402

TARGET_TFDATA = 1.0
TARGET_SCALING = 1.8
CROP = 224
SCALES = list(range(256, 481, 7))
MU, SIGMA = (0.48180, 0.44969, 0.39839), (0.27336, 0.26435, 0.27563)  # the original's config values
ONE_CORE = ("naive", "decode", "tfdata", "augment", "producer1")
TWO_CORES = ("producer1u", "producer2", "pair")  # the scaling ratio compares the producers; pair is the ceiling
ALL = ONE_CORE + TWO_CORES
WARMUP = 16
BUFFER_BATCHES = 8  # producer runs: a small buffer, so the producer deletes and refills all the time
# Published single-GPU ResNet-50 training rates (docs/references.md section 1:
# V100 AMP 1,270-1,300, A100 AMP 2,375-2,470, H100 higher; the RTX 2080 with AMP about 400, issue 15).
GPU_RATES = (("RTX 2080, AMP", 400), ("V100, AMP", 1300), ("A100, AMP", 2400), ("H100", 3000))
PASSES = 5  # tf.data, augment and the producers all process PASSES x --images images: equal exposure to noise


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400, help="images to time: generated, or sampled from --images_dir")
    p.add_argument("--images_dir", help="a dataset root (any layout the index accepts): time a sample of its "
                                        "training JPEGs instead of the generated corpus")
    p.add_argument("--feed", type=int, nargs="*", default=[], help="GPU rates (img/s) to size the producer for, "
                                                                   "besides the published ones")
    p.add_argument("--pipelines", nargs="+", choices=ALL, help="measure only these (default: all; the ratios need "
                                                                "all, the sizing line producer1)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved repetitions; the best is reported")
    p.add_argument("--batch_size", type=int, default=64, help="producer batch size (config.txt trains with 64)")
    p.add_argument("--cpu", type=int, default=None, help="CPU for the one-core runs (default: the last one)")
    p.add_argument("--buffer_dir", default=tempfile.gettempdir(), help="where the producer runs write batch files")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_producer.json"))
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one pipeline, print its rate
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--consume", help=argparse.SUPPRESS)  # internal: the trainer side of a producer run
    p.add_argument("--consumer_cpu", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def make_corpus(folder, args):
    """The images to time, in folder/train/<class>/: bench/corpus.py's generated ones or a sample of --images_dir."""
    from bench import corpus
    if args.images_dir:
        return corpus.sample_dataset(args.images_dir, args.images, folder)
    return corpus.generated(folder, args.images)


def sizing_line(per_worker, rates):
    """How many workers feed each GPU rate, at `per_worker` img/s per worker (scaling measured at >= 1.8 for 2)."""
    # Beside each: the count num_of_threads = auto settles at for the same rates (data/buffer/sizing.py).
    feeds = "; ".join(f"to feed {rate:,} img/s{f' ({name})' if name else ''} use {math.ceil(rate / per_worker)} "
                      f"worker{'s' if math.ceil(rate / per_worker) > 1 else ''} (auto settles at "
                      f"{settled_count(rate, per_worker)})" for name, rate in rates)
    return f"one producer worker builds {per_worker:,.0f} img/s of these images at {CROP}; {feeds}"


def image_list(folder):
    from data.sources.index import load_index
    return load_index(folder, "train").paths


def draws_for(count):
    from data.transforms import scale_crop
    return [scale_crop.image_draws(0, 0, i, SCALES, 0.1) for i in range(count)]


# ----------------------------------------------------------------------------
# Pipelines (each runs in its own process)
# ----------------------------------------------------------------------------

def _timed(func, items):
    for item in items[:WARMUP]:
        func(item)
    start = time.perf_counter()
    for item in items[WARMUP:]:
        func(item)
    return (len(items) - WARMUP) / (time.perf_counter() - start)


def measure_naive(folder):
    import numpy as np
    from data.transforms import scale_crop
    from data.transforms import images
    mu, sigma = np.asarray(MU, np.float32), np.asarray(SIGMA, np.float32)

    def one(item):
        path, d = item
        resized = np.asarray(images.resize_shorter(images.decode_rgb(path), d.scale))
        top, left = scale_crop.crop_origin(resized.shape[1], resized.shape[0], CROP, d)
        out = resized[top:top + CROP, left:left + CROP]
        out = out[:, ::-1] if d.flip else out
        return (out.astype(np.float32) / 255.0 - mu) / sigma
    paths = image_list(folder)
    return _timed(one, list(zip(paths, draws_for(len(paths)))))


def measure_decode(folder):
    from data.transforms import images
    return _timed(images.decode_rgb, image_list(folder))


def measure_augment(folder):
    import numpy as np
    from data.transforms import jpeg_window, scale_crop
    decoder = jpeg_window.resolve_decoder("auto")
    out = np.empty((CROP, CROP, 3), np.uint8)

    def one(item):
        position, path = item
        d = scale_crop.image_draws(0, 0, position, SCALES, 0.1)
        return scale_crop.scale_crop(path, CROP, d, decoder, out=out)
    return _timed(one, list(enumerate(image_list(folder) * PASSES)))


def measure_tfdata(folder):
    import math
    import numpy as np
    from utils.cli import quiet_tensorflow
    quiet_tensorflow()
    import tensorflow as tf
    from data.transforms import scale_crop
    from PIL import Image
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    paths = image_list(folder)
    windows, flips = [], []
    for path, d in zip(paths, draws_for(len(paths))):
        with Image.open(path) as img:
            x0, y0, x1, y1 = scale_crop.source_box(img.width, img.height, CROP, d)
            y1, x1 = min(math.ceil(y1), img.height), min(math.ceil(x1), img.width)  # a box edge can be 500.00000000000006
        windows.append([int(y0), int(x0), y1 - int(y0), x1 - int(x0)])
        flips.append(d.flip)

    def load(path, window, flip):
        img = tf.io.decode_and_crop_jpeg(tf.io.read_file(path), window, channels=3)
        img = tf.image.resize(img, [CROP, CROP], method="bilinear")
        return tf.cond(flip, lambda: tf.image.flip_left_right(img), lambda: img)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    ds = tf.data.Dataset.from_tensor_slices((paths * PASSES, np.asarray(windows * PASSES, np.int32),
                                             np.asarray(flips * PASSES)))
    ds = ds.map(load, num_parallel_calls=1).with_options(options)
    it = iter(ds)
    for _ in range(WARMUP):
        next(it)
    start = time.perf_counter()
    count = sum(1 for _ in it)
    return count / (time.perf_counter() - start)


def measure_producer(folder, workers, batch_size, buffer_dir=None, consumer_cpu=None):
    """Images per second a producer delivers to a trainer that is never the bottleneck (steady state).

    The consumer is a second process playing the trainer's side of the buffer protocol
    (pinned to `consumer_cpu` when given): it takes each batch and reports progress, and so
    lets the producer delete consumed files and refill, the producer's regular regime; its
    rate is measured in steady state (consume).
    """
    from settings import load_settings
    from data.buffer.producer import Producer
    from tests.helpers import write_solid_config
    with tempfile.TemporaryDirectory(dir=buffer_dir, prefix="bench_buffer_") as work:
        config = write_solid_config(work, preprocess={"ImageNet_folder": folder, "path_to_save": os.path.join(work, "c")},
                              train={"buffer_size": str(BUFFER_BATCHES), "sleep_time": "0.02", "wait_timeout": "120"},
                              runtime_preprocessing={"num_of_threads": str(workers), "sleep_time": "0.005"},
                              images={"crop_size": str(CROP), "scale_min": "256", "scale_max": "480",
                                      "scale_step": "7", "eval_resize": "256"},
                              utils={f"mu_{c}": str(MU[c]) for c in range(3)} | {f"sigma_{c}": str(SIGMA[c])
                                                                                 for c in range(3)})
        pin = (lambda: os.sched_setaffinity(0, {consumer_cpu})) if consumer_cpu is not None else None
        consumer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--consume", config,
                                     "--batch_size", str(batch_size)], stdout=subprocess.PIPE, text=True,
                                    preexec_fn=pin)
        try:
            Producer(load_settings(config), batch_size, 0, 2 + PASSES, progress=False).run()
            out, _ = consumer.communicate(timeout=600)
        finally:
            consumer.kill()
        if consumer.returncode != 0:
            raise RuntimeError(f"the consumer failed (exit code {consumer.returncode})")
        return float(out.strip().splitlines()[-1])


def consume(config, batch_size):
    """The trainer's side of measure_producer: take every batch, print the steady rate over epochs 1..PASSES.

    It follows the protocol as BufferReader does (a batch is there once its X file is; then
    report progress) but does not load the arrays: that is the trainer's CPU time (2.5 ms per
    64-image batch here, mostly faulting in fresh memory), not the producer's, and with both
    on two cores it would be charged to the producer. The clock runs between two batches the
    consumer had to wait for (the buffer empty, the workers busy with the batches after it),
    so the work in flight is the same at both ends and nothing built before the clock started
    is counted.
    """
    from settings import load_settings
    from data.buffer import files, reader as buffer_reader
    reader = buffer_reader.BufferReader(load_settings(config), batch_size)
    reader.check_manifest()
    first = last = None
    count = counted = 0
    for epoch in range(2 + PASSES):  # epoch 0 warms up, the last one keeps the workers busy to the end
        for b in range(reader.batches_per_epoch):
            waited = False
            while not os.path.exists(files.batch_file(reader.folder, "X", epoch, b)):
                waited = True
                time.sleep(0.005)
            reader.report_progress(epoch, b + 1)
            now = time.perf_counter()
            if not 1 <= epoch <= PASSES:
                continue
            count += 1
            if waited:
                if first is None:
                    first, count = now, 0
                else:
                    last, counted = now, count
    return counted * batch_size / (last - first)


def run_measure(kind, folder, batch_size, buffer_dir=None, consumer_cpu=None):
    if kind == "naive":
        return measure_naive(folder)
    if kind == "decode":
        return measure_decode(folder)
    if kind == "tfdata":
        return measure_tfdata(folder)
    if kind == "augment":
        return measure_augment(folder)
    if kind.startswith("producer"):
        return measure_producer(folder, int(kind[len("producer")]), batch_size, buffer_dir, consumer_cpu)
    raise ValueError(kind)


def spawn(kind, folder, batch_size, cpu, buffer_dir, consumer_cpu=None):
    """Run one measurement in a fresh interpreter, pinned to `cpu` (None: unpinned); returns img/s."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", kind, "--folder", folder,
                          "--batch_size", str(batch_size), "--buffer_dir", buffer_dir]
                         + (["--consumer_cpu", str(consumer_cpu)] if consumer_cpu is not None else []),
                         capture_output=True, text=True, env=env,
                         preexec_fn=pin, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def spawn_pair(folder, batch_size, cpus, buffer_dir):
    """The machine's own two-core ceiling: two independent `augment` runs at once, one pinned to each CPU (summed img/s).

    Two processes that share nothing scale by this much here; on a shared virtual machine it
    is often well below 2 (neighbours, SMT siblings), and no producer can scale better.
    """
    with concurrent.futures.ThreadPoolExecutor(len(cpus)) as pool:
        return sum(pool.map(lambda c: spawn("augment", folder, batch_size, c, buffer_dir), cpus))


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def check_args(args, kinds):
    """The flags' own mistakes, before any image is sampled: one sentence naming the flag (UserError)."""
    from utils.errors import UserError
    if args.images_dir and not os.path.isdir(args.images_dir):
        raise UserError(f"--images_dir {os.path.abspath(args.images_dir)} does not exist; pass the dataset "
                              f"root (the folder holding train/ or train.txt), or leave it out to time generated "
                              f"JPEGs.")
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, received {args.rounds}.")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, received {args.batch_size}.")
    if args.images <= WARMUP:
        raise UserError(f"--images {args.images} is not more than the {WARMUP} warm-up images each pipeline "
                              f"decodes before its clock starts; pass --images {WARMUP + 1} or more.")
    if args.images < args.batch_size and any(k.startswith("producer") for k in kinds):
        raise UserError(f"--images {args.images} is fewer than --batch_size {args.batch_size}, so the producer "
                              f"would have no whole batch to build; pass --images {args.batch_size} or more, or a "
                              f"smaller --batch_size.")


def main(argv=None):
    from utils.files import atomic_write_text
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if args.measure:
        print(run_measure(args.measure, args.folder, args.batch_size, args.buffer_dir, args.consumer_cpu))
        return 0
    if args.consume:
        print(consume(args.consume, args.batch_size))
        return 0
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    others = sorted(os.sched_getaffinity(0) - {cpu})
    consumer_cpu = others[-1] if others else None  # producer1's trainer side runs beside it, as a trainer would
    kinds = [k for k in ALL if k in (args.pipelines or ALL)]
    runs = {k: [] for k in kinds}
    check_args(args, kinds)
    with tempfile.TemporaryDirectory(prefix="bench_producer_") as folder:
        sample = make_corpus(folder, args)
        what = (f"JPEGs sampled from {os.path.abspath(args.images_dir)}"
                + (f" ({sample.skipped} non-JPEG or CMYK files passed over)" if sample.skipped else "")
                if args.images_dir else "generated ImageNet-like JPEGs")
        print(f"{args.images} {what}: mean {sample.mean_kb:.0f} KB, {sample.mean_mp:.2f} megapixels; crop {CROP}, "
              f"scales 256..480; one-core runs pinned to CPU {cpu}; best of {args.rounds} rounds; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        for r in range(args.rounds):
            for kind in kinds:
                if kind == "pair":
                    runs[kind].append(spawn_pair(folder, args.batch_size, [cpu] + others[-1:], args.buffer_dir))
                    continue
                runs[kind].append(spawn(kind, folder, args.batch_size, None if kind in TWO_CORES else cpu,
                                        args.buffer_dir, consumer_cpu if kind == "producer1" else None))
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()), flush=True)
    best = {k: max(v) for k, v in runs.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    labels = {"naive": "naive decode->resize->crop->float", "decode": "bare full PIL decode",
              "tfdata": "tf.data decode_and_crop+resize+flip", "augment": "ours: draws, window decode+resample+flip",
              "producer1": "ours: producer, 1 worker (1 core)", "producer1u": "ours: producer, 1 worker (2 cores)",
              "producer2": "ours: producer, 2 workers (2 cores)", "pair": "2 independent augment runs at once"}
    print(f"{'':42s} {'best':>7s} {'median':>7s}  img/s")
    for kind in kinds:
        print(f"{labels[kind]:42s} {best[kind]:7.0f} {median[kind]:7.0f}  ({'2 cores' if kind in TWO_CORES else '1 core'}"
              f"; {sample.describe()})")
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f} (other processes share the CPUs; ratios are of best runs)")
    ratios = print_ratios(best, median) if len(kinds) == len(ALL) else {}
    sizing = None
    if "producer1" in kinds:
        sizing = sizing_line(best["producer1"], list(GPU_RATES) + [("", rate) for rate in args.feed])
        print(sizing)
        print("(num_of_threads = workers, a core each; the per-worker figure includes the producer's main process on "
              "the same core; the trainer wants one more core)")
    from data.transforms import jpeg_window
    result = {"images": args.images, "images_dir": args.images_dir, "mean_kb": sample.mean_kb,
              "mean_megapixels": sample.mean_mp, "skipped_files": sample.skipped, "sizing": sizing, "crop": CROP,
              "buffer_dir": args.buffer_dir, "rounds": args.rounds, "cpu": cpu, "runs": runs,
              "best_img_per_s": best, "median_img_per_s": median, "load_average_end": load, **ratios,
              "decoder": jpeg_window.resolve_decoder("auto"), "targets": {"producer_vs_tfdata": TARGET_TFDATA,
                                                                      "two_vs_one_workers": TARGET_SCALING}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


def print_ratios(best, median):
    """Print the targets' ratios and the machine's ceiling (all pipelines measured); returns them."""
    vs_tf = best["producer1"] / best["tfdata"]
    scaling = best["producer2"] / best["producer1u"]
    ceiling = best["pair"] / best["augment"]
    print(f"producer / tf.data (1 core): {vs_tf:.2f}  (target >= {TARGET_TFDATA}; medians "
          f"{median['producer1'] / median['tfdata']:.2f}; per-image work without batch files: "
          f"{best['augment'] / best['tfdata']:.2f})")
    print(f"2 workers / 1 worker:        {scaling:.2f}  (target >= {TARGET_SCALING}; medians "
          f"{median['producer2'] / median['producer1u']:.2f}; {os.cpu_count()} CPUs, shared)")
    print(f"the machine's own 2-core ceiling in this run: {ceiling:.2f} (two independent one-core augment runs "
          f"at once / one alone; medians {median['pair'] / median['augment']:.2f})")
    print(f"producer / naive: {best['producer1'] / best['naive']:.2f}   producer / bare decode: "
          f"{best['producer1'] / best['decode']:.2f}")
    return {"producer_vs_tfdata": vs_tf, "two_vs_one_workers": scaling, "machine_two_core_ceiling": ceiling}


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(main)  # an argument mistake is one sentence (exit 2), not a traceback
