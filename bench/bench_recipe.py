"""What each recipe feature costs per training step: steps/s with and without it, side by side.

The trainer's own step (engine/train_step.py, the tf.function train.py runs) on the demo-size network
(configs/demo.txt: ResNet-50 at width 0.25, 64 px crops, batch 64), on fixed synthetic batches, for:
  plain       every feature off (today's step)
  smoothing   [train] label_smoothing = 0.1
  ema         [train] ema_decay = 0.9999 (one EMA update of every weight and statistic per step)
  ema_across  the same EMA updated the way it was before the numerics change: every moving statistic
              read across replicas (one all-reduce per statistic per step) instead of each replica's own
  mixup       [train] mixup_alpha = 0.2, mix_prob = 1 (every batch mixed)
  cutmix      [train] cutmix_alpha = 1.0, mix_prob = 1
  all         the four together
Rounds are interleaved (plain, smoothing, ..., plain, ...) so load from other processes hits all
alike; each round times `--steps` steps and syncs once. The median over rounds is the headline, and
each feature's cost is its median step time over plain's. --replicas 2 mirrors the step over 2 logical
CPUs (MirroredStrategy, as on a 2-GPU machine).

    .venv/bin/python bench/bench_recipe.py [--rounds 5] [--steps 10] [--replicas 2] [--only plain,ema,ema_across]
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
    "ema_across": {"ema_decay": "0.9999"},
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
    p.add_argument("--replicas", type=int, default=1, help="logical CPU replicas (MirroredStrategy when > 1)")
    p.add_argument("--only", default="", help="comma-separated variants (default all; plain is always run)")
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


def _ema_read_across_replicas():
    """engine.ema.WeightEMA as it was updated before: weights and statistics in cross-replica context, each
    statistic read as its replicas' mean (an all-reduce per statistic per step)."""
    import tensorflow as tf

    from engine import ema

    class AcrossReplicas(ema.WeightEMA):
        def update_weights(self, step):
            decay = self.decay_at(step)
            for v, s in self.pairs:
                s.assign(s * decay + tf.convert_to_tensor(v) * (1.0 - decay))

        def update_statistics(self, step, values, finite=True):
            pass

    return AcrossReplicas


def build(name, folder, batches, replicas):
    from engine import ema
    from engine.trainer import Trainer
    from settings import load_settings
    sub = os.path.join(folder, name)
    os.makedirs(os.path.join(sub, "run"))
    train = {**VARIANTS[name], "distribute": "mirrored" if replicas > 1 else "one_device"}
    settings = load_settings(_config(sub, train)).with_classes(CLASSES, "the bench's")
    original = ema.WeightEMA
    if name == "ema_across":
        ema.WeightEMA = _ema_read_across_replicas()
    try:
        return Trainer(settings, _Reader(batches), os.path.join(sub, "run"), batch_size=len(batches[0].labels),
                       learning_rate=0.01)
    finally:
        ema.WeightEMA = original


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
    if args.replicas > 1:
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    names = ["plain"] + [n for n in (args.only.split(",") if args.only else VARIANTS) if n in VARIANTS and n != "plain"]
    rng = np.random.default_rng(0)
    from data.buffer.reader import Batch
    batches = [Batch(images=rng.integers(0, 256, (args.batch, 64, 64, 3), dtype=np.uint8),
                     labels=rng.integers(0, CLASSES, args.batch).astype(np.int32),
                     lighting=rng.normal(0, 0.1, (args.batch, 3)).astype(np.float32), epoch=0, batch=b)
               for b in range(4)]
    times = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as folder:
        trainers = {name: build(name, folder, batches, args.replicas) for name in names}
        for trainer in trainers.values():
            run_steps(trainer, batches, 0, 2)  # trace and warm up
        for r in range(args.rounds):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                run_steps(trainer, batches, 2 + r * args.steps, args.steps)
                times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"bench_recipe: trainer step, demo-size ResNet-50 (width 0.25), 64 px, batch {args.batch}, "
          f"{args.rounds} interleaved rounds of {args.steps} steps, {args.replicas} replica(s)")
    for name in names:
        print(f"  {name:10s} {median[name] * 1000:8.1f} ms/step {1 / median[name]:6.2f} steps/s  "
              f"(min {min(times[name]) * 1000:.1f} ms)  step time / plain: median {median[name] / median['plain']:.3f}, "
              f"min {min(times[name]) / min(times['plain']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
