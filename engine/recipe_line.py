"""What the trainer's start-up line says about the recipe: every feature in force, and settings without effect.

Before, only the precision was named; jit_compile, label smoothing, the EMA and mixing showed only in
an epoch's config.txt, and a key whose feature is off (mix_prob with both mixing alphas at 0,
ema_warmup with ema_decay = 0...) was dropped without a word. Here `features` names what is on and
`ignored` names, once, each key set away from its default that the current settings make inert.
Both take plain mappings of the [train] and [schedule] values, so they are tested without TensorFlow.
"""
from utils.schema import SCHEMA

STEP_KEYS = ("boundaries", "boundaries_unit", "factors")
FLOAT16_ON_CPU = ("mixed_precision = mixed_float16 on a CPU: it runs, but slower than none (CPUs have no float16 "
                  "tensor cores); it is what auto picks on a GPU with tensor cores.")


def features(train, precision_reason):
    """'mixed_precision none (auto: no GPU), sgd momentum 0.9, ...': the recipe features in force
    (train['mixed_precision'] resolved for this machine, `precision_reason` saying why)."""
    t = train
    parts = [f"mixed_precision {t['mixed_precision']} ({precision_reason})",
             f"sgd momentum {t['sgd_momentum']:g}" if t["optimizer"] == "sgd" else t["optimizer"]]
    parts += [name for name in ("jit_compile", "deterministic") if t[name]]
    if t["label_smoothing"] > 0:
        parts.append(f"label_smoothing {t['label_smoothing']:g}")
    if t["ema_decay"] > 0:
        parts.append(f"ema_decay {t['ema_decay']:g}" + (" with ema_warmup" if t["ema_warmup"] else ""))
    alphas = [f"{k} {t[k]:g}" for k in ("mixup_alpha", "cutmix_alpha") if t[k] > 0]
    if alphas:
        mixing = [f"mix_prob {t['mix_prob']:g}"] + ([f"switch_prob {t['switch_prob']:g}"] if len(alphas) == 2 else [])
        parts.append(" + ".join(alphas) + f" ({', '.join(mixing)})")
    return ", ".join(parts)


def _inert(train, schedule, learning_rate):
    """{(section, key): why it has no effect} for every key the current settings ignore."""
    t, s = train, schedule
    found = {}
    mixing = t["mixup_alpha"] > 0 or t["cutmix_alpha"] > 0
    if not mixing:
        found["train", "mix_prob"] = "mixup_alpha and cutmix_alpha are 0"
    if not (t["mixup_alpha"] > 0 and t["cutmix_alpha"] > 0):
        found["train", "switch_prob"] = "it chooses between mixup and cutmix, and only one alpha is > 0" \
            if mixing else "mixup_alpha and cutmix_alpha are 0"
    if t["ema_decay"] <= 0:
        found["train", "ema_warmup"] = "ema_decay is 0"
    if t["optimizer"] != "sgd":
        found["train", "sgd_momentum"] = f"optimizer is {t['optimizer']}"
    if learning_rate is not None:
        for key in s:
            found["schedule", key] = f"--learning_rate {learning_rate:g} sets a constant rate"
        return found
    if s["type"] != "step":
        found.update({("schedule", k): f"type is {s['type']}, not step" for k in STEP_KEYS})
    if s["type"] not in ("cosine", "onecycle", "linear"):
        found["schedule", "total_epochs"] = f"type is {s['type']}, not cosine, onecycle or linear"
    if s["type"] not in ("cosine", "linear"):
        found["schedule", "final_factor"] = f"type is {s['type']}, not cosine or linear"
    if s["type"] != "onecycle":
        found.update({("schedule", k): f"type is {s['type']}, not onecycle"
                      for k in ("onecycle_end_percentage", "onecycle_scale_percentage")})
    if s["warmup_epochs"] <= 0:
        found["schedule", "warmup_start_factor"] = "warmup_epochs is 0"
    return found


def ignored(train, schedule, learning_rate=None):
    """'[train] mix_prob = 0.5 (mixup_alpha and cutmix_alpha are 0); ...' for the keys set away from their
    default that have no effect here (keys inert for one reason named together), or None.
    `learning_rate`: train.py's --learning_rate."""
    values = {"train": train, "schedule": schedule}
    groups = {}
    for (section, key), why in _inert(train, schedule, learning_rate).items():
        if values[section][key] != SCHEMA[section][key].default:
            groups.setdefault((section, why), []).append(f"{key} = {_text(values[section][key])}")
    named = [f"[{section}] {', '.join(keys)} ({why})" for (section, why), keys in groups.items()]
    return "; ".join(named) if named else None


def warnings(train, schedule, learning_rate=None, gpu=False):
    """The start-up line's companions: the ignored keys, and mixed_float16 on a CPU (`gpu`: whether
    TensorFlow sees a GPU)."""
    named = ignored(train, schedule, learning_rate)
    lines = [f"ignored in these settings: {named}."] if named else []
    if train["mixed_precision"] == "mixed_float16" and not gpu:
        lines.append(FLOAT16_ON_CPU)
    return lines


def _text(value):
    """As config.txt writes it: lists comma-separated, booleans lower case."""
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)
