"""What the training devices are, found without importing TensorFlow into the calling process.

The settings resolve [train] mixed_precision = auto and distribute = auto, and check the batch size against the
replica count, before TensorFlow loads, so a bad config fails in the first second. How the devices are found:
  1. TensorFlow already imported in this process (a test or a notebook that set up logical CPUs first):
     ask it; that costs nothing more and sees exactly what the strategy will see.
  2. No NVIDIA driver (/proc/driver/nvidia/gpus empty or missing) or CUDA_VISIBLE_DEVICES hiding every GPU:
     no GPU, decided from the file system in microseconds (TensorFlow's CUDA build sees none either).
  3. Otherwise a one-off probe in a child process (`python -c` listing tf.config's GPUs and their compute
     capability): exact, and the calling process still never loads TensorFlow. It runs only after every
     static check has passed, and costs one TensorFlow import (~3-5 s) on GPU machines only.
nvidia-smi alone was not enough: its compute_cap field is missing on older drivers, and it lists GPUs that a
TensorFlow without CUDA libraries would not use.
"""
import json
import os
import subprocess
import sys

from utils.errors import UserError

NVIDIA_PROC = "/proc/driver/nvidia/gpus"
_PROBE = ("import json, os; os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3'); import tensorflow as tf; "
          "print(json.dumps([tf.config.experimental.get_device_details(g) "
          "for g in tf.config.list_physical_devices('GPU')]))")
_cache = {}


def gpu_details():
    """[{'device_name': ..., 'compute_capability': (major, minor)}, ...] of the GPUs TensorFlow would use."""
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        return [tf.config.experimental.get_device_details(g) for g in tf.config.list_physical_devices("GPU")]
    if not _driver_gpus():
        return []
    if "gpus" not in _cache:
        _cache["gpus"] = _probe()
    return _cache["gpus"]


def local_replicas(kind, gpus):
    """Replicas of this machine for a resolved strategy kind: GPUs, or logical CPUs for mirrored without GPUs."""
    if kind == "one_device":
        return 1
    if gpus:
        return len(gpus)
    if kind == "mirrored" and "tensorflow" in sys.modules:
        return len(sys.modules["tensorflow"].config.list_logical_devices("CPU"))
    return 1


def _driver_gpus():
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        return len(os.listdir(NVIDIA_PROC))
    except OSError:
        return 0


def _probe():
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
        details = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        raise UserError("could not list the GPUs (a TensorFlow probe in a child process failed); set [train] "
                        "mixed_precision and distribute explicitly instead of auto.") from None
    for d in details:
        if d.get("compute_capability"):
            d["compute_capability"] = tuple(d["compute_capability"])
    return details


# ----------------------------------------------------------------------------
# [train] mixed_precision = auto and distribute = auto
# ----------------------------------------------------------------------------

MIN_COMPUTE_CAPABILITY = (7, 0)


def resolve_mixed_precision(choice, details=None):
    """(policy, reason): `choice` itself unless it is 'auto'; `details` defaults to gpu_details().

    auto -> mixed_float16 (float16 compute, float32 variables, dynamic loss scaling: the original run's AMP on
    its RTX 2080) when every GPU is an NVIDIA GPU of compute capability >= 7.0 (Volta and later: float16
    tensor cores, where a float32 ResNet-50 step is 2-3x slower); none (float32) on a CPU, on older NVIDIA
    GPUs (no tensor cores: float16 gains little or loses) and on GPUs that report no CUDA compute capability.
    """
    if choice != "auto":
        return choice, "set in the config"
    details = gpu_details() if details is None else details
    if not details:
        return "none", "auto: no GPU"
    names = ", ".join(d.get("device_name", "GPU") for d in details)
    capabilities = [tuple(d["compute_capability"]) if d.get("compute_capability") else None for d in details]
    if all(c is not None and c >= MIN_COMPUTE_CAPABILITY for c in capabilities):
        shown = ", ".join(f"{c[0]}.{c[1]}" for c in capabilities)
        return "mixed_float16", f"auto: {names}, compute capability {shown} (tensor cores)"
    return "none", (f"auto: {names} without CUDA compute capability >= "
                    f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}")


def resolve_distribute(choice, workers, details=None):
    """The strategy kind: auto = multi_worker with a multi-worker TF_CONFIG, mirrored with > 1 GPU, else one_device."""
    if choice != "auto":
        return choice
    if workers > 1:
        return "multi_worker"
    details = gpu_details() if details is None else details
    return "mirrored" if len(details) > 1 else "one_device"
