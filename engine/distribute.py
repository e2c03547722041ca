"""One device, several GPUs (MirroredStrategy) or several machines (MultiWorkerMirroredStrategy).

The buffer holds global batches (--batch_size is the global batch). Every replica
takes its contiguous slice of rows: replica r of R gets rows [r*B/R, (r+1)*B/R).
The loss is averaged over the global batch (tf.nn.compute_average_loss) and the
L2 term divided by R, so the all-reduced (summed) gradient equals the gradient
of the single-device loss on the whole batch: synchronous SGD, as the TF official ResNet recipe ran
on 4 GPUs.

Multi-worker: every worker runs its own producer (runtime_preprocessing.py with
the same config, seed and batch size, on its own buffer_folder) and its own
train.py with TF_CONFIG naming it, for example on two machines

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}'

(index 1 on the second). Producers are deterministic, so each worker's buffer
holds the same global batches; each worker trains on its replicas' rows of them.
This spends producer CPU on rows a worker does not use (the simplest honest
version: nothing needs to agree on a sharding scheme besides the seed). Worker 0
is the chief: it writes the run folder; the others save into a scratch folder
that is deleted. All workers resume from <run>/<epoch-1>/checkpoint, so the run
folder must be on a filesystem every worker can read (or copied to each).
"""
import json
import os

from utils import UserError

KINDS = ("auto", "one_device", "mirrored", "multi_worker")


def worker_info():
    """(task_index, num_workers) from TF_CONFIG, without importing TensorFlow; (0, 1) when unset."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return 0, 1
    try:
        config = json.loads(raw)
        workers = config["cluster"].get("worker", [])
        chiefs = config["cluster"].get("chief", [])
        task_type, index = config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError("TF_CONFIG is not valid JSON of the form {\"cluster\": {\"worker\": [...]}, "
                        "\"task\": {\"type\": \"worker\", \"index\": i}}; fix or unset it.") from None
    # With an explicit chief task the chief is task 0 of the combined list.
    position = index if task_type == "chief" else index + len(chiefs)
    return position, len(chiefs) + len(workers)


def is_chief():
    return worker_info()[0] == 0


def resolve_kind(kind):
    """The strategy 'auto' stands for: multi_worker with a multi-worker TF_CONFIG, mirrored with >1 GPU."""
    if kind != "auto":
        return kind
    if worker_info()[1] > 1:
        return "multi_worker"
    import tensorflow as tf
    return "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "one_device"


def make_strategy(kind):
    import tensorflow as tf
    kind = resolve_kind(kind)
    if kind == "multi_worker":
        if worker_info()[1] < 2:
            raise UserError("[train] distribute = multi_worker needs TF_CONFIG naming at least two workers; "
                            "set TF_CONFIG or use distribute = auto.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "mirrored":
        # Without GPUs, mirror over the logical CPUs (tests split the CPU in two).
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def check_divisible(global_batch, num_replicas):
    if global_batch % num_replicas:
        raise UserError(f"--batch_size {global_batch} is not divisible by the {num_replicas} replicas; "
                        f"use a multiple of {num_replicas} for both runtime_preprocessing.py and train.py.")
    return global_batch // num_replicas


def split_batch(strategy, tensors, per_replica):
    """Distribute each global-batch tensor as per-replica row slices (works inside tf.function)."""
    def slice_rows(tensor):
        def value_fn(ctx):
            start = ctx.replica_id_in_sync_group * per_replica
            return tensor[start:start + per_replica]
        return strategy.experimental_distribute_values_from_function(value_fn)
    return tuple(slice_rows(t) for t in tensors)
