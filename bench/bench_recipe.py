"""What each recipe feature costs per training step: steps/s with and without it, side by side.

The trainer's own step (engine/trainer.py, the tf.function train.py runs) on the demo-size network
(configs/demo.txt: ResNet-50 at width 0.25, 64 px crops, batch 64), on fixed synthetic batches, for:
  plain       every feature off (today's step)
  smoothing   [train] label_smoothing = 0.1
  ema         [train] ema_decay = 0.9999 (one EMA update of every weight and statistic per step)
  mixup       [train] mixup_alpha = 0.2, mix_prob = 1 (every batch mixed)
  cutmix      [train] cutmix_alpha = 1.0, mix_prob = 1
  all         the four together
Rounds are interleaved (plain, smoothing, ..., plain, ...) so load from other processes hits all
alike; each round times `--steps` steps and syncs once. The median over rounds is the headline, and
each feature's cost is its median step time over plain's.

    .venv/bin/python bench/bench_recipe.py [--rounds 5] [--steps 10]
"""
import argparse
import configparser
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from utils.cli import quiet_tensorflow  # noqa: E402

VARIANTS = {
    "plain": {},
    "smoothing": {"label_smoothing": "0.1"},
    "ema": {"ema_decay": "0.9999"},
    "mixup": {"mixup_alpha": "0.2", "mix_prob": "1"},
    "cutmix": {"cutmix_alpha": "1.0", "mix_prob": "1"},
    "all": {"label_smoothing": "0.1", "ema_decay": "0.9999", "mixup_alpha": "0.2", "cutmix_alpha": "1.0",
            "mix_prob": "1"},
}
CLASSES = 10


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round (default 10)")
    p.add_argument("--batch", type=int, default=64, help="global batch (default 64, the demo's)")
    return p.parse_args(argv)


class _Reader:
    def __init__(self, batches):
        self.batches = batches

    @property
    def batches_per_epoch(self):
        return len(self.batches)



def _config(folder, train):
    parser = configparser.ConfigParser()
    parser.optionxform = str
    parser.read(os.path.join(ROOT, "configs", "demo.txt"))
    for c in range(3):
        parser.set("utils", f"mu_{c}", "0.5")
        parser.set("utils", f"sigma_{c}", "0.25")
    for section, key in (("train", "buffer_folder"), ("train", "path_for_saving")):
        parser.set(section, key, os.path.join(folder, key))
    for key, value in train.items():
        parser.set("train", key, value)
    path = os.path.join(folder, "config.txt")
    with open(path, "w") as f:
        parser.write(f)
    return path


def build(name, folder, batches):
    from settings import load_settings
    from engine.trainer import Trainer
    sub = os.path.join(folder, name)
    os.makedirs(os.path.join(sub, "run"))
    settings = load_settings(_config(sub, VARIANTS[name])).with_classes(CLASSES, "the bench's")
    return Trainer(settings, _Reader(batches), os.path.join(sub, "run"), batch_size=len(batches[0].labels),
                   learning_rate=0.01)


def run_steps(trainer, batches, first, count):
    import tensorflow as tf
    out = None
    for i in range(first, first + count):
        batch = batches[i % len(batches)]
        out = trainer._train_step(tf.constant(batch.images), tf.constant(batch.labels), tf.constant(batch.lighting),
                                  tf.constant(0.01, tf.float32),
                                  *trainer.recipe.step_args(0, i, batch.images.shape))
    float(out[0])  # one sync per round


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_tensorflow()
    rng = np.random.default_rng(0)
    from data.buffer.reader import Batch
    batches = [Batch(images=rng.integers(0, 256, (args.batch, 64, 64, 3), dtype=np.uint8),
                     labels=rng.integers(0, CLASSES, args.batch).astype(np.int32),
                     lighting=rng.normal(0, 0.1, (args.batch, 3)).astype(np.float32), epoch=0, batch=b)
               for b in range(4)]
    times = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        trainers = {name: build(name, folder, batches) for name in VARIANTS}
        for trainer in trainers.values():
            run_steps(trainer, batches, 0, 2)  # trace and warm up
        for r in range(args.rounds):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                run_steps(trainer, batches, 2 + r * args.steps, args.steps)
                times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"bench_recipe: trainer step, demo-size ResNet-50 (width 0.25), 64 px, batch {args.batch}, "
          f"{args.rounds} interleaved rounds of {args.steps} steps")
    for name in VARIANTS:
        print(f"  {name:10s} {median[name] * 1000:8.1f} ms/step {1 / median[name]:6.2f} steps/s  "
              f"(min {min(times[name]) * 1000:.1f} ms)  step time / plain: median {median[name] / median['plain']:.3f}, "
              f"min {min(times[name]) / min(times['plain']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
