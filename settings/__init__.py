"""Settings: the loaded config with every `auto` resolved and every cross-key check done, frozen, before TensorFlow.

Each script calls `load_settings(path, ...)` once, first thing; library code (data/, engine/, model/) receives
the result, or plain values from it, and never the raw config (after timm's resolve_data_config() and Model
Garden's typed configs handed to build_inputs). Every section is a frozen dataclass generated from
utils/schema.py, so a new key is one schema line; a key with an `auto` also gets one resolver below.

What is resolved here, and from where:
  [utils] mu_*/sigma_* auto            get_mu_sigma.py's mu_sigma.json (stats=True; False leaves mu None)
  [runtime_preprocessing] decoder auto turbojpeg when its library loads, else pil (decoder=True)
  [train] mixed_precision, distribute  the training devices (settings/devices.py, devices=True)
  [model] num_classes 0                the dataset's count, once known (with_classes)
plus the values derived from keys (scales, crop schedule, replicas). `autos` names the keys that said auto;
`resolved_text()` is what every epoch's config.txt records: the resolved values, loadable as a config.
Two autos are policies, not values, and stay 'auto': [runtime_preprocessing] num_of_threads (the producer
sizes its workers as it runs, data/buffer/sizing.py) and [model] stride_on (build_model's per-variant default).
"""
import dataclasses
import json
import os

from data.transforms.progressive import parse_crop_schedule
from settings import devices
from utils.config import format_value, load_config
from utils.errors import ConfigError, UserError
from utils.processes import worker_info
from utils.schema import SCHEMA

MU_SIGMA_FILE = "mu_sigma.json"


def _section_class(name, keys):
    return dataclasses.make_dataclass("".join(p.title() for p in name.split("_")) + "Section", list(keys),
                                      frozen=True)


SECTION_CLASSES = {name: _section_class(name, keys) for name, keys in SCHEMA.items()}


class _SettingsMethods:
    def resolved_text(self):
        """INI text of every resolved value (defaults filled in, autos resolved, paths absolute)."""
        lines = [f"# resolved from {self.path}"]
        if self.autos:
            lines.append(f"# resolved from auto: {', '.join(self.autos)}")
        for name in SCHEMA:
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {format_value(v)}" for k, v in dataclasses.asdict(getattr(self, name)).items()]
        return "\n".join(lines) + "\n"

    def with_classes(self, num_classes, where):
        """These settings with [model] num_classes resolved from the dataset's `num_classes` (counted `where`):
        refuses fewer than [data] min_classes, and a [model] num_classes that disagrees."""
        check_class_count(self, num_classes, where)
        configured = self.model.num_classes
        if configured and configured != num_classes:
            raise UserError(f"[model] num_classes is {configured} but the dataset has {num_classes} classes; "
                            f"set num_classes = 0 to use the dataset's count, or point the config at the right "
                            f"dataset.")
        autos = self.autos if configured else self.autos + ("model.num_classes",)
        return dataclasses.replace(self, model=dataclasses.replace(self.model, num_classes=int(num_classes)),
                                   autos=autos)


Settings = dataclasses.make_dataclass(
    "Settings",
    [(name, SECTION_CLASSES[name]) for name in SCHEMA] + [
        ("path", str),
        ("mu", tuple), ("sigma", tuple),            # None unless resolved (stats=True)
        ("scales", tuple),                          # shorter sides of the scale augmentation
        ("crop_sizes", list),                       # [[first_epoch, crop], ...] as the buffer manifest stores it
        ("precision_reason", str),                  # why [train] mixed_precision is what it is
        ("replicas", int),                          # global replicas (devices=True), else None
        ("worker", tuple),                          # (w, W): this machine's slice of each global batch
        ("batch_size", int),                        # the scripts' --batch_size, None where there is none
        ("autos", tuple),                           # 'section.key' of every value resolved from auto
    ],
    bases=(_SettingsMethods,), frozen=True)


def load_settings(path, *, stats=True, decoder=True, devices=True, batch_size=None, worker=None):
    """Load `path` and resolve it (see resolve)."""
    return resolve(load_config(path), stats=stats, decoder=decoder, devices=devices, batch_size=batch_size,
                   worker=worker)


def resolve(cfg, *, stats=True, decoder=True, devices=True, batch_size=None, worker=None):
    """Frozen Settings of a loaded Config. Flags say which autos this script needs (each has a cost or a
    precondition: mu_sigma.json must exist, the JPEG library loads, the devices are listed); `batch_size`
    adds the checks against the workers and, with devices, the replicas. Raises UserError on any conflict."""
    values = {name: dict(vars(getattr(cfg, name))) for name in SCHEMA}
    autos = []
    mu = sigma = None
    if stats or "auto" not in vars(cfg.utils).values():  # stats=False leaves 'auto' unresolved (None)
        mu, sigma = _mu_sigma(cfg, autos)
        for c in range(3):
            values["utils"][f"mu_{c}"], values["utils"][f"sigma_{c}"] = mu[c], sigma[c]
    if decoder:
        from data.transforms.jpeg_window import resolve_decoder  # loads the JPEG library: producers only
        _set(values, autos, "runtime_preprocessing", "decoder", resolve_decoder(cfg.runtime_preprocessing.decoder))
    worker = tuple(worker) if worker is not None else worker_info()
    if batch_size is not None:
        if batch_size < 1:
            raise UserError(f"--batch_size must be a positive integer, received {batch_size}.")
        if batch_size % worker[1]:
            raise UserError(f"--batch_size {batch_size} is not divisible by the {worker[1]} workers; use a "
                            f"multiple of {worker[1]} for every worker's runtime_preprocessing.py and train.py.")
    replicas, reason = None, ""
    if devices:
        replicas, reason = _resolve_devices(cfg, values, autos, worker, batch_size)
    crop_sizes = parse_crop_schedule(cfg.images.crop_schedule, cfg.images.crop_size)
    sections = {name: SECTION_CLASSES[name](**v) for name, v in values.items()}
    return Settings(**sections, path=cfg.path, mu=mu, sigma=sigma, scales=tuple(scales_of(cfg.images)),
                    crop_sizes=crop_sizes, precision_reason=reason, replicas=replicas, worker=worker,
                    batch_size=batch_size, autos=tuple(autos))


def _set(values, autos, section, key, value):
    if values[section][key] == "auto":
        autos.append(f"{section}.{key}")
    values[section][key] = value


def _resolve_devices(cfg, values, autos, worker, batch_size):
    """[train] mixed_precision and distribute resolved, the replica count, and the checks that need it.
    Runs after the static checks (utils/config.py) passed, so a device probe is never spent on a bad file."""
    train = cfg.train
    kind = devices.resolve_distribute(train.distribute, worker[1])
    if kind == "multi_worker" and worker[1] < 2:
        raise UserError("[train] distribute = multi_worker needs TF_CONFIG naming at least two workers; "
                        "set TF_CONFIG or use distribute = auto.")
    gpus = devices.gpu_details() if kind != "one_device" or train.mixed_precision == "auto" else []
    policy, reason = devices.resolve_mixed_precision(train.mixed_precision, gpus)
    _set(values, autos, "train", "distribute", kind)
    _set(values, autos, "train", "mixed_precision", policy)
    local = devices.local_replicas(kind, gpus)
    replicas = local * worker[1] if kind == "multi_worker" else local
    if train.jit_compile and replicas > 1:
        raise UserError(f"[train] jit_compile = true works on one device only; this run has {replicas} replicas: "
                        f"set jit_compile = false or distribute = one_device.")
    if batch_size is not None and batch_size % replicas:
        raise UserError(f"--batch_size {batch_size} is not divisible by the {replicas} replicas; use a multiple "
                        f"of {replicas} for both runtime_preprocessing.py and train.py.")
    return replicas, reason


def scales_of(images):
    """The shorter sides of the scale augmentation: 256, 263, ..., 480 by default."""
    return list(range(images.scale_min, images.scale_max + 1, images.scale_step))


def check_class_count(settings, num_classes, where):
    """Refuse a training set below [data] min_classes: with one class every loss is 0 and every
    accuracy 100%, which looks like success; the usual cause is a dataset root one level too deep."""
    if num_classes < settings.data.min_classes:
        raise ConfigError(f"The training set at {settings.preprocess.ImageNet_folder} has {num_classes} "
                          f"class{'' if num_classes == 1 else 'es'} ({where}), expected at least [data] min_classes = "
                          f"{settings.data.min_classes}; point [preprocess] ImageNet_folder at the dataset root (the "
                          f"folder holding train/), or set [data] min_classes = 1 to train on it anyway.")


def _mu_sigma(cfg, autos):
    """(mu, sigma) as two 3-tuples of floats, resolving 'auto' from get_mu_sigma.py's output."""
    names = [f"mu_{c}" for c in range(3)] + [f"sigma_{c}" for c in range(3)]
    raw = [getattr(cfg.utils, n) for n in names]
    if any(v == "auto" for v in raw):
        stats_path = os.path.join(cfg.get_mu_sigma.path_to_save, MU_SIGMA_FILE)
        try:
            with open(stats_path) as f:
                stats = json.load(f)
            computed = list(stats["mu"]) + list(stats["sigma"])
        except FileNotFoundError:
            raise ConfigError(f"[utils] asks for mu/sigma 'auto' but {stats_path} does not exist; "
                              f"run get_mu_sigma.py first or write the numbers into the config.") from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{stats_path} is not a valid mu/sigma file; delete it and rerun get_mu_sigma.py.") from None
        autos += [f"utils.{n}" for n, v in zip(names, raw) if v == "auto"]
        raw = [c if v == "auto" else v for v, c in zip(raw, computed)]
    mu, sigma = tuple(float(v) for v in raw[:3]), tuple(float(v) for v in raw[3:])
    if min(sigma) <= 0:
        raise ConfigError(f"[utils] sigma must be positive, received {sigma}.")
    return mu, sigma
