"""Training memory per image of our ResNet-50 at 224, measured here at reduced width and scaled to width 1:
the figures behind README's "which batch for 8/24/80 GB".

Each width runs in its own process: one float32 training step (forward, backward, SGD-momentum update in one
tf.function) at batch B, then at batch 2B; the growth of the process's peak resident memory between the two,
divided by B, is the memory one more image costs (activations kept for the backward pass, their gradients,
workspace), free of the fixed costs (TensorFlow, the graph, weights, slots). Activation memory grows linearly
with the channel count, so two widths give a line whose value at width 1 is the estimate for the full
network; float16 keeps activations in half the bytes (an estimate, halved, not measured: no GPU here).
CPU memory stands in for GPU memory (TensorFlow's GPU allocator stats need a GPU): treat the figures as
+-30% and keep ~1.5 GB of a card for the CUDA context and cuDNN workspace.

    .venv/bin/python bench/bench_memory.py [--widths 0.125 0.25] [--crop 224] [--batch 4]
"""
import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PARAMETERS_WIDTH_1 = 25.6e6  # ResNet-50 (1000 classes)


def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(width, crop, batch):
    """{batch: peak RSS after one training step at that batch} for batch and 2 x batch, in this process."""
    from utils.cli import quiet_tensorflow
    quiet_tensorflow()
    import tensorflow as tf
    from model import build_model
    net = build_model(num_classes=1000, width_multiplier=width)
    opt = tf.keras.optimizers.SGD(0.01, momentum=0.9)

    @tf.function(reduce_retracing=False)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=net(x, training=True)))
        opt.apply_gradients(zip(tape.gradient(loss, net.trainable_variables), net.trainable_variables))

    peaks = {}
    for b in (batch, 2 * batch):
        x = tf.random.uniform((b, crop, crop, 3))
        step(x, tf.zeros((b,), tf.int32))
        peaks[b] = peak_bytes()
    return peaks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=float, nargs="+", default=[0.125, 0.25])
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--one", type=float, help=argparse.SUPPRESS)  # internal: measure one width in this process
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.crop, args.batch)))
        return 0
    per_image = {}
    for width in args.widths:
        out = subprocess.run([sys.executable, __file__, "--one", str(width), "--crop", str(args.crop),
                              "--batch", str(args.batch)], capture_output=True, text=True, check=True)
        peaks = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
        per_image[width] = (peaks[2 * args.batch] - peaks[args.batch]) / args.batch
        print(f"width {width:g}: {per_image[width] / 2**20:.1f} MiB per image at crop {args.crop} (float32)")
    (w0, m0), (w1, m1) = sorted(per_image.items())[:1] + sorted(per_image.items())[-1:]
    slope = (m1 - m0) / (w1 - w0) if w1 != w0 else m1 / w1
    full = m1 + slope * (1.0 - w1)
    fixed = PARAMETERS_WIDTH_1 * 4 * 4  # weights, gradients, momentum, accumulator: float32 each
    print(f"width 1 (extrapolated): {full / 2**20:.0f} MiB per image float32, ~{full / 2**21:.0f} MiB float16; "
          f"fixed {fixed / 2**30:.2f} GiB (weights, gradients, momentum, accumulator)")
    for gib in (8, 24, 80):
        usable = (gib - 1.5) * 2**30 - fixed
        print(f"{gib} GB card: batch <= {int(usable // full)} float32, <= {int(usable // (full / 2))} float16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
