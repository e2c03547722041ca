"""Training-step time of our ResNet-50 vs keras.applications.ResNet50 on this machine.

One step = forward, backward and an SGD-momentum update inside one tf.function,
on a fixed synthetic batch (no input pipeline), float32, same batch size and
resolution for both. Repetitions are interleaved (ours, Keras, ours+XLA, ...)
so that load from other processes hits all of them alike; the median is reported.

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

from utils import quiet_tensorflow  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--resolution", type=int, default=128, help="square input side in pixels (default 128)")
    parser.add_argument("--reps", type=int, default=7, help="timed steps per model, after 2 warm-up steps (default 7)")
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
    import tensorflow as tf
    from model import build_model

    ours = build_model(num_classes=args.classes, l2_penalty=5e-4)

    def ours_call(images):
        return ours(images, training=True), ours.regularization_loss()

    def ours_after():
        ours.train_step.assign_add(1)

    theirs = keras.applications.ResNet50(weights=None, input_shape=(args.resolution, args.resolution, 3),
                                         classes=args.classes, classifier_activation=None)

    def keras_call(images):
        return theirs(images, training=True), 0.0

    steps = {"ours": make_step(ours_call, ours.trainable_variables, ours_after, False),
             "keras": make_step(keras_call, theirs.trainable_variables, lambda: None, False)}
    if not args.no_xla:
        steps["ours_xla"] = make_step(ours_call, ours.trainable_variables, ours_after, True)
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
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    args = parse_args(argv)
    quiet_tensorflow()
    import tensorflow as tf
    tf.random.set_seed(0)
    images = tf.random.normal([args.batch, args.resolution, args.resolution, 3])
    labels = tf.random.uniform([args.batch], 0, args.classes, tf.int32)
    median = time_steps(build_steps(args), images, labels, args.reps)
    print(f"bench_model: ResNet-50 training step, float32, batch {args.batch}, {args.resolution}px, "
          f"median of {args.reps} interleaved reps, {os.cpu_count()} CPU threads visible")
    for name, seconds in median.items():
        print(f"  {name:9s} {seconds * 1000:8.1f} ms/step  {args.batch / seconds:7.2f} img/s")
    ratio = median["ours"] / median["keras"]
    print(f"  ratio ours/keras step time: {ratio:.3f}" + (" (target <= 1.0)" if ratio <= 1.0 else " (target <= 1.0 MISSED)"))
    if "ours_xla" in median:
        print(f"  ratio ours_xla/keras step time: {median['ours_xla'] / median['keras']:.3f}")
    return {"median_seconds": median, "ratio_ours_keras": ratio}


if __name__ == "__main__":
    main(sys.argv[1:])
