"""One device, several GPUs (MirroredStrategy) or several machines (MultiWorkerMirroredStrategy).

--batch_size is the global batch B on both scripts. On one machine the buffer holds
whole global batches and replica r of R gets rows [r*B/R, (r+1)*B/R). The loss is
averaged over the global batch (tf.nn.compute_average_loss) and the L2 term divided
by R, so the all-reduced (summed) gradient equals the gradient of the single-device
loss on the whole batch: synchronous SGD, as the TF official ResNet recipe ran on 4 GPUs.

Multi-worker: every worker runs its own producer (runtime_preprocessing.py with
the same config, seed and batch size, on its own buffer_folder) and its own
train.py with TF_CONFIG naming it, for example on two machines

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}'

(index 1 on the second). Worker w of W (its TF_CONFIG position, or the producer's
--worker_index/--worker_count) builds only rows [w*B/W, (w+1)*B/W) of each global batch,
with draws keyed by the global position, so the W slices concatenated are the
single-machine global batch byte for byte and no producer builds a row nobody trains on.
Its manifest records the slice; the trainer reads the B/W rows as its local batch and
splits them over its local replicas (split_batch), and refuses a buffer whose slice is
not its TF_CONFIG position. So buffer_size, disk space and producer cores are per
machine: each producer feeds only its own machine's GPUs. Worker 0 is the chief: it
writes the run folder; the others save into a scratch folder that is deleted. All
workers resume from <run>/<epoch-1>/checkpoint, so the run folder must be on a
filesystem every worker can read (or copied to each).
"""
from utils.errors import UserError
from utils.processes import worker_info

KINDS = ("auto", "one_device", "mirrored", "multi_worker")


def is_chief():
    return worker_info()[0] == 0


def make_strategy(kind):
    """The tf.distribute strategy of a resolved [train] distribute (settings/devices.py resolves 'auto')."""
    import tensorflow as tf
    if kind == "multi_worker":
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
    """Distribute each local-batch tensor (this worker's rows) as per-replica row slices (works in tf.function).

    replica_id_in_sync_group is global under MultiWorkerMirroredStrategy (worker w's local
    replica l is w * local + l), while the tensors hold only this worker's rows: index locally.
    """
    local = len(strategy.extended.worker_devices)

    def slice_rows(tensor):
        def value_fn(ctx):
            start = (ctx.replica_id_in_sync_group % local) * per_replica
            return tensor[start:start + per_replica]
        return strategy.experimental_distribute_values_from_function(value_fn)
    return tuple(slice_rows(t) for t in tensors)
