"""[train] mixed_precision = auto: the compute dtype this machine's training device should use.

auto -> mixed_float16 (float16 compute, float32 variables, dynamic loss scaling: the
original run's AMP on its RTX 2080) when every GPU TensorFlow sees is an NVIDIA GPU of
compute capability >= 7.0 (Volta, Turing, Ampere, Ada, Hopper and later: the ones with
float16 tensor cores, where a float32 ResNet-50 step is 2-3x slower); `none` (float32) on a
CPU, on older NVIDIA GPUs (Pascal and before have no tensor cores, and float16 there gains
little or loses) and on GPUs that report no CUDA compute capability. The explicit choices
none, mixed_float16 and mixed_bfloat16 are taken as they are.
"""

MIN_COMPUTE_CAPABILITY = (7, 0)
POLICIES = ("none", "mixed_float16", "mixed_bfloat16")


def gpu_details():
    """tf.config.experimental.get_device_details of every visible GPU (an empty list on a CPU-only machine)."""
    import tensorflow as tf
    return [tf.config.experimental.get_device_details(gpu) for gpu in tf.config.list_physical_devices("GPU")]


def resolve_mixed_precision(choice, details=None):
    """(policy, reason): `choice` itself unless it is 'auto'; `details` defaults to gpu_details()."""
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
