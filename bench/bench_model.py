"""Training-step time of our ResNet-50 vs keras.applications.ResNet50 on this machine.

One step = forward, backward and an SGD-momentum update inside one tf.function,
on a fixed synthetic batch (no input pipeline), float32, same batch size and
resolution for all. Rows:
  ours      our default network (v1.5: stride on the 3x3 conv), with weight decay
  ours_v1   stride on the first 1x1, the same layout as keras.applications.ResNet50
  keras     keras.applications.ResNet50(weights=None) (v1, conv biases, BatchNormalization)
  ours_xla  `ours` compiled with jit_compile=True
Repetitions are interleaved (ours, ours_v1, keras, ours_xla, ...) so that load
from other processes hits all of them alike. The median is the headline; the
minimum (least disturbed run) is printed too, since on a shared machine
interference only ever adds time.

    .venv/bin/python bench/bench_model.py [--batch 8] [--resolution 128] [--reps 7]
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.cli import quiet_tensorflow  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--resolution", type=int, default=128, help="square input side in pixels (default 128)")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per model, after 2 warm-up steps (default 10)")
    parser.add_argument("--classes", type=int, default=1000, help="output classes (default 1000)")
    parser.add_argument("--no-xla", action="store_true", help="skip the XLA (jit_compile) run of our model")
    return parser.parse_args(argv)


def make_step(model_call, variables, after_update, jit_compile):
    import keras
    import tensorflow as tf
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)

    @tf.function(jit_compile=jit_compile)
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits, extra_loss = model_call(images)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)) + extra_loss
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        after_update()
        return loss
    return step


def build_steps(args):
    import keras
    from model import build_model

    def ours_step(stride_on, jit_compile):
        net = build_model(num_classes=args.classes, l2_penalty=5e-4, stride_on=stride_on)
        return make_step(lambda images: (net(images, training=True), net.regularization_loss()),
                         net.trainable_variables, lambda: net.train_step.assign_add(1), jit_compile)

    theirs = keras.applications.ResNet50(weights=None, input_shape=(args.resolution, args.resolution, 3),
                                         classes=args.classes, classifier_activation=None)

    def keras_call(images):
        return theirs(images, training=True), 0.0

    steps = {"ours": ours_step("3x3", False), "ours_v1": ours_step("1x1", False),
             "keras": make_step(keras_call, theirs.trainable_variables, lambda: None, False)}
    if not args.no_xla:
        steps["ours_xla"] = ours_step("3x3", True)
    return steps


def time_steps(steps, images, labels, reps):
    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up: tracing, XLA compilation, allocator growth
        for _ in range(2):
            step(images, labels).numpy()
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step(images, labels).numpy()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    args = parse_args(argv)
    quiet_tensorflow()
    import tensorflow as tf
    tf.random.set_seed(0)
    images = tf.random.normal([args.batch, args.resolution, args.resolution, 3])
    labels = tf.random.uniform([args.batch], 0, args.classes, tf.int32)
    times = time_steps(build_steps(args), images, labels, args.reps)
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    print(f"bench_model: ResNet-50 training step, float32, batch {args.batch}, {args.resolution}px, "
          f"{args.reps} interleaved reps, {os.cpu_count()} CPU threads visible")
    print(f"  {'':9s} {'median':>14s} {'':>12s} {'min':>9s}")
    for name in times:
        print(f"  {name:9s} {median[name] * 1000:8.1f} ms/step {args.batch / median[name]:7.2f} img/s "
              f"{best[name] * 1000:8.1f} ms/step")
    ratios = {name: median[name] / median["keras"] for name in times if name != "keras"}
    for name, ratio in ratios.items():
        verdict = "" if name == "ours_xla" else (" (target <= 1.0 met)" if ratio <= 1.0 else " (target <= 1.0 MISSED)")
        print(f"  step time {name}/keras: median {ratio:.3f}, min {best[name] / best['keras']:.3f}{verdict}")
    return {"median_seconds": median, "min_seconds": best, "ratios_to_keras": ratios}


if __name__ == "__main__":
    main(sys.argv[1:])
