"""Config loading and validation, user-facing errors, atomic file writes, logging.

One schema (SCHEMA below) describes every section and key of config.txt: its
type, its allowed range or choices, and its default (keys without a default are
required). `load_config` validates the whole file up front, so a typo stops a
script in its first second with one sentence, not an hour into training.

Paths in the config are resolved relative to the config file's folder, so no
script depends on the current directory.
"""
import argparse
import configparser
import contextlib
import ctypes
import errno
import fcntl
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import types

import numpy as np

REQUIRED = object()


class UserError(Exception):
    """A problem the user can fix; printed as one sentence, never a traceback."""


class ConfigError(UserError):
    pass


# ----------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------

class Key:
    """One config key: kind is str, path, int, float, bool, choice, ints, floats or stats."""

    def __init__(self, kind, default=REQUIRED, lo=None, hi=None, choices=None, help=""):
        self.kind, self.default, self.lo, self.hi = kind, default, lo, hi
        self.choices, self.help = choices, help


SCHEMA = {
    "preprocess": {
        "ImageNet_folder": Key("path", help="dataset root (train/ and val/ folders, or train.txt/val.txt lists)"),
        "path_to_save": Key("path", help="where preprocess.py writes the per-scale resize cache <path_to_save>/<S>/"),
        "num_workers": Key("int", 0, lo=0, help="worker processes for offline scripts; 0 = one per CPU core"),
        "jpeg_quality": Key("int", 95, lo=1, hi=100, help="JPEG quality of the resized images in <path_to_save>/<S>/"),
    },
    "preprocess_val": {
        "ImageNet_folder": Key("path", help="dataset root holding the validation split"),
        "path_to_save": Key("path", help="where preprocess_val.py writes the uint8 validation views"),
        "N": Key("int", lo=0, help="expected number of validation images (50000 for ImageNet); 0 = accept what is found"),
        "views_50": Key("bool", False, help="also store the original code's 5-scale set for --views 50"),
        "chunk_images": Key("int", 5000, lo=1, help="images per packed file; an interrupted run redoes at most one chunk"),
    },
    "get_mu_sigma": {
        "path_to_save": Key("path", help="folder where get_mu_sigma.py writes mu_sigma.json"),
        "max_images": Key("int", 0, lo=0, help="use a random subset of this many training images; 0 = all"),
    },
    "data": {
        "source": Key("choice", "folder", choices=("folder", "tfrecord"),
                      help="how [preprocess] and [preprocess_val] ImageNet_folder are read: folder = images "
                           "(train/, val/ or list files); tfrecord = train-*/validation-* shards from "
                           "tools/build_tfrecords.py (labels and class count from their dataset_info.json)"),
        "min_classes": Key("int", 2, lo=1, help="refuse a training set with fewer classes (one class usually means "
                                                "ImageNet_folder points one level too deep); 1 = train anyway"),
    },
    "train": {
        "buffer_folder": Key("path", help="folder of ready batch files shared by producer and trainer (RAM disk or SSD)"),
        "path_for_saving": Key("path", help="run folders are created here: <path_for_saving>/<run>/<epoch>/"),
        "N": Key("int", lo=0, help="number of training images (1281167 for ImageNet); 0 = accept what is found"),
        "sgd_momentum": Key("float", lo=0.0, hi=1.0),
        "buffer_size": Key("int", lo=1, help="maximum number of batches kept ready in the buffer"),
        "sleep_time": Key("float", lo=0.0, help="seconds the trainer sleeps between checks for a missing batch"),
        "wait_timeout": Key("float", 900.0, lo=0.0, help="seconds without a producer heartbeat before the trainer gives up"),
        "seed": Key("int", 0, lo=0, help="seeds the data order, augmentation and initialisation"),
        "deterministic": Key("bool", False, help="TF op determinism (slower); batches are deterministic regardless"),
        "optimizer": Key("choice", "sgd", choices=("sgd", "rmsprop"),
                         help="sgd = SGD with sgd_momentum; rmsprop = RMSprop, epsilon 1e-8 (the Tiny ImageNet recipe)"),
        "mixed_precision": Key("choice", "auto", choices=("auto", "none", "mixed_float16", "mixed_bfloat16"),
                               help="compute dtype; auto = mixed_float16 on NVIDIA GPUs of compute capability "
                                    ">= 7.0, else none; float16 uses dynamic loss scaling"),
        "jit_compile": Key("bool", False, help="compile the forward/backward pass with XLA (one device, not with deterministic)"),
        "distribute": Key("choice", "auto", choices=("auto", "one_device", "mirrored", "multi_worker"),
                          help="auto = multi_worker if TF_CONFIG is set, mirrored if >1 GPU, else one device"),
        "log_every": Key("int", 20, lo=1, help="steps between progress-bar and TensorBoard updates"),
        "label_smoothing": Key("float", 0.0, lo=0.0, hi=1.0,
                               help="cross-entropy against (1-e)*onehot + e/K; 0 = off (0.1 in NVIDIA's and FFCV's recipes)"),
        "ema_decay": Key("float", 0.0, lo=0.0, hi=1.0,
                         help="exponential moving average of the weights and moving statistics, exported as "
                              "saved_model_ema/ beside saved_model/; 0 = off (e.g. 0.9999)"),
        "ema_warmup": Key("bool", False, help="EMA decay min(ema_decay, (1+t)/(10+t)) at global step t"),
        "mixup_alpha": Key("float", 0.0, lo=0.0, help="mixup lambda ~ Beta(alpha, alpha) per batch; 0 = off (timm)"),
        "cutmix_alpha": Key("float", 0.0, lo=0.0, help="cutmix lambda ~ Beta(alpha, alpha) per batch; 0 = off (timm)"),
        "mix_prob": Key("float", 1.0, lo=0.0, hi=1.0, help="probability that a batch is mixed at all (timm prob)"),
        "switch_prob": Key("float", 0.5, lo=0.0, hi=1.0,
                           help="with both alphas > 0: probability of cutmix instead of mixup (timm switch_prob)"),
        "max_skipped_steps": Key("int", 50, lo=1,
                                 help="stop after this many steps in a row were skipped for a non-finite loss or "
                                      "gradient (a healthy float16 run skips at most ~15 in a row, while its "
                                      "loss scale falls from 2^15 to 1)"),
        "profile_steps": Key("ints", (), lo=0, help="first, last global step of a TensorBoard profiler trace "
                                                    "written to <run>/tensorboard/; empty = none"),
    },
    "schedule": {
        "type": Key("choice", "constant", choices=("constant", "step", "cosine", "onecycle", "linear"),
                    help="learning-rate schedule; train.py --learning_rate overrides it with a constant"),
        "base_lr": Key("float", 0.01, lo=0.0, help="initial rate (peak rate for onecycle)"),
        "boundaries": Key("floats", (), lo=0.0, help="step type: where the rate drops, in boundaries_unit"),
        "boundaries_unit": Key("choice", "epochs", choices=("epochs", "steps"),
                               help="epochs: the drop starts with that epoch; steps: piecewise_constant, after that step"),
        "factors": Key("floats", (0.1,), lo=0.0, help="multiplier at each boundary (one value = the same for all)"),
        "warmup_epochs": Key("float", 0.0, lo=0.0, help="linear warmup length, composes with any type"),
        "warmup_start_factor": Key("float", 0.0, lo=0.0, hi=1.0, help="warmup starts at base rate times this"),
        "total_epochs": Key("float", 0.0, lo=0.0, help="cosine/onecycle/linear length; 0 = train.py --epoch_end"),
        "final_factor": Key("float", 0.0, lo=0.0, hi=1.0, help="cosine and linear end at base_lr times this"),
        "onecycle_end_percentage": Key("float", 0.2, lo=0.0, hi=1.0, help="fraction of steps in the final decay"),
        "onecycle_scale_percentage": Key("float", 0.1, lo=0.0, hi=1.0, help="cycle starts and ends at base_lr times this"),
    },
    "batch_renorm": {
        "moving_avgs_momentum": Key("float", lo=0.0, hi=1.0),
        "rmax_max": Key("float", lo=1.0),
        "dmax_max": Key("float", lo=0.0),
        "start_relaxing_rmax": Key("int", lo=0),
        "reach_rmax_max": Key("int", lo=0),
        "start_relaxing_dmax": Key("int", lo=0),
        "reach_dmax_max": Key("int", lo=0),
        "epsilon": Key("float", 1e-3, lo=1.001e-5, help="added to the batch variance once, inside sigma_B"),
        "sync_replicas": Key("bool", False, help="synchronise batch statistics across replicas"),
    },
    "runtime_preprocessing": {
        "sleep_time": Key("float", lo=0.0, help="seconds the producer sleeps when the buffer needs no refill"),
        "num_of_threads": Key("int", lo=1, help="worker processes building batches in parallel"),
        "refill_threshold": Key("float", 0.8, lo=0.0, hi=1.0,
                                help="refill when fewer than this fraction of buffer_size batches are ready ahead"),
        "heartbeat_interval": Key("float", 2.0, lo=0.05,
                                  help="seconds between the producer's heartbeat writes (the trainer's liveness check)"),
        "decoder": Key("choice", "auto", choices=("auto", "turbojpeg", "pil"),
                       help="crop-window decoder: auto/turbojpeg = libjpeg-turbo region decode + OpenCV resize "
                            "(fast), pil = PIL draft + resize(box) (exact reference geometry, ~2x slower)"),
        "use_scale_cache": Key("bool", True, help="read preprocess.py's resized images when complete for a scale"),
    },
    "utils": {
        **{f"mu_{c}": Key("stats", help="channel mean of pixels in [0,1]; 'auto' = read get_mu_sigma.py's output")
           for c in range(3)},
        **{f"sigma_{c}": Key("stats", help="channel std of pixels in [0,1]; 'auto' = read get_mu_sigma.py's output")
           for c in range(3)},
    },
    "l2": {
        "l2_penalty": Key("float", lo=0.0, help="weight decay coefficient: loss += l2_penalty/2 * sum(w^2) over kernels"),
    },
    "images": {
        "crop_size": Key("int", 224, lo=8, help="training and evaluation crop side"),
        "scale_min": Key("int", 256, lo=8, help="smallest shorter side of the scale augmentation"),
        "scale_max": Key("int", 480, lo=8, help="largest shorter side of the scale augmentation"),
        "scale_step": Key("int", 7, lo=1, help="scales are scale_min, scale_min+step, ..., scale_max"),
        "eval_resize": Key("int", 256, lo=8, help="shorter side for the 10-crop and centre-crop evaluation"),
        "eval_scales_50": Key("ints", (224, 256, 384, 480, 640), help="shorter sides of the 50-view protocol"),
        "pca_std": Key("float", 0.1, lo=0.0, help="std of the AlexNet-style PCA lighting coefficients; 0 = off"),
        "crop_schedule": Key("str", "", help="progressive resizing: 'epoch:crop, ...' (e.g. '0:32, 10:48, 20:64'), "
                                             "the training crop from each listed epoch on, each <= crop_size; "
                                             "empty = crop_size throughout; evaluation stays at crop_size"),
        "augmentation": Key("choice", "scale", choices=("scale", "tiny", "inception"),
                            help="scale = random shorter side, crop, flip and PCA lighting; tiny = the Tiny ImageNet imgaug "
                                 "pipeline ([tiny_augment]) on images loaded at crop_size x crop_size, then a random crop; "
                                 "inception = Inception's distorted bounding-box crop resized to crop_size, and flip"),
    },
    "model": {
        "arch": Key("choice", "resnet50", choices=("resnet50", "concat_resnet"),
                    help="resnet50, or concat_resnet (the fully convolutional Tiny ImageNet network)"),
        "num_classes": Key("int", 0, lo=0, help="0 = number of classes found in the dataset"),
        "width_multiplier": Key("float", 1.0, lo=0.01),
        "variant": Key("choice", "standard", choices=("standard", "original"),
                       help="standard He et al. ResNet-50, or the original author's (ELU, parameter-free shortcuts, conv biases)"),
        "stride_on": Key("choice", "auto", choices=("auto", "3x3", "1x1"),
                         help="3x3 = ResNet v1.5, 1x1 = v1; auto = 3x3 for standard, 1x1 for original"),
        "zero_init_last_gamma": Key("bool", False, help="start the last batch renorm gamma of each block at 0"),
        "normalization": Key("choice", "batch_renorm", choices=("batch_renorm", "batch_norm"),
                             help="concat_resnet: batch_norm (the Tiny ImageNet recipe; momentum 0.99, epsilon 1e-3) or batch_renorm "
                                  "([batch_renorm]); resnet50 always uses batch renorm"),
    },
    "tiny_augment": {  # the Tiny ImageNet recipe's imgaug magnitudes, used when [images] augmentation = tiny
        "hflip": Key("float", 0.5, lo=0.0, hi=1.0, help="probability of a horizontal flip"),
        "vflip": Key("float", 0.2, lo=0.0, hi=1.0, help="probability of a vertical flip"),
        "sometimes": Key("float", 0.5, lo=0.0, hi=1.0, help="probability of each of blur, crop-and-pad, affine, dropout"),
        "blur_sigma_max": Key("float", 2.0, lo=0.0, help="Gaussian blur sigma ~ U(0, this), in pixels"),
        "crop_pad_min": Key("float", -0.1, lo=-0.49, hi=1.0, help="per side, fraction of the axis; negative crops"),
        "crop_pad_max": Key("float", 0.2, lo=-0.49, hi=1.0, help="per side, fraction of the axis; positive pads"),
        "scale_min": Key("float", 0.8, lo=0.01, help="affine zoom ~ U(scale_min, scale_max), x and y drawn apart"),
        "scale_max": Key("float", 1.5, lo=0.01),
        "translate": Key("float", 0.2, lo=0.0, hi=1.0, help="affine shift ~ U(-t, t) of the width and of the height"),
        "rotate": Key("float", 45.0, lo=0.0, hi=180.0, help="affine rotation ~ U(-r, r) degrees"),
        "shear": Key("float", 16.0, lo=0.0, hi=80.0, help="affine shear ~ U(-s, s) degrees"),
        "dropout_p_min": Key("float", 0.03, lo=0.0, hi=1.0, help="coarse dropout: cell drop probability ~ U(min, max)"),
        "dropout_p_max": Key("float", 0.15, lo=0.0, hi=1.0),
        "dropout_size_min": Key("float", 0.02, lo=0.0, hi=1.0,
                                help="coarse dropout grid: this fraction of each axis, at least dropout_min_cells cells"),
        "dropout_size_max": Key("float", 0.05, lo=0.0, hi=1.0),
        "dropout_per_channel": Key("float", 0.2, lo=0.0, hi=1.0, help="probability of one mask per channel"),
        "dropout_min_cells": Key("int", 4, lo=1, help="imgaug's min_size: the coarsest grid side"),
        "random_order": Key("bool", True, help="apply the six augmenters in a random order per image (imgaug random_order)"),
    },
}

# Keys the seed's config.txt walk-through places in another section. Its "[preprocess]" list describes
# preprocess_val.py's keys (path of the 10 validation views, N = 50000); the original config.txt has
# them under [preprocess_val], and [preprocess] (the training-set resize cache) counts no images.
MOVED_KEYS = {
    ("preprocess", "N"): "[preprocess] N is the validation image count, which lives in [preprocess_val] N "
                         "(the seed's walk-through lists it under [preprocess], the original config.txt under "
                         "[preprocess_val]); move the line there.",
}


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _kind_text(key):
    if key.kind == "choice":
        return "one of " + ", ".join(key.choices)
    if key.kind == "stats":
        return "a number or 'auto'"
    text = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text",
            "path": "a path", "ints": "a comma-separated list of integers",
            "floats": "a comma-separated list of numbers"}[key.kind]
    hi = key.hi if key.hi is not None or key.kind not in ("float", "floats") else f"{MAX_FLOAT:g}"
    if key.lo is not None and hi is not None:
        text += f" in [{key.lo}, {hi}]"
    elif key.lo is not None:
        text += f" >= {key.lo}"
    elif hi is not None:
        text += f" <= {hi}"
    return text


def _parse(key, raw, base_dir):
    raw = raw.strip()
    kind = key.kind
    if kind == "path":
        if not raw or "\0" in raw:
            raise ValueError
        return os.path.normpath(os.path.join(base_dir, os.path.expanduser(raw)))
    if kind == "str":
        return raw
    if kind == "choice":
        if raw not in key.choices:
            raise ValueError
        return raw
    if kind == "bool":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError
    if kind == "stats":
        return "auto" if raw.lower() == "auto" else _finite(float(raw))
    if kind in ("ints", "floats"):
        cast = int if kind == "ints" else float
        values = tuple(_finite(cast(v)) for v in raw.replace(" ", "").split(",") if v)
        for v in values:
            _check_range(key, v)
        return values
    value = _finite(int(raw) if kind == "int" else float(raw))
    _check_range(key, value)
    return value


MAX_FLOAT = 1e12  # no setting is meant beyond this; larger ones overflow in sleeps and step counts


def _finite(value):
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= MAX_FLOAT):
        raise ValueError
    return value


def _check_range(key, value):
    if (key.lo is not None and value < key.lo) or (key.hi is not None and value > key.hi):
        raise ValueError


class Config(types.SimpleNamespace):
    """Sections as attributes: cfg.train.buffer_folder. `path` is the config file."""

    def as_dict(self):
        return {name: dict(vars(section)) for name, section in vars(self).items() if name != "path"}

    def resolved_text(self):
        """INI text of every resolved value (defaults filled in, paths absolute)."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str
        for name, values in self.as_dict().items():
            parser[name] = {k: _format(v) for k, v in values.items()}
        out = io.StringIO()
        out.write(f"# resolved from {self.path}\n")
        parser.write(out)
        return out.getvalue()


def _format(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def load_config(path, schema=None):
    """Read and validate an INI config; raise ConfigError naming section, key, expected and received."""
    schema = SCHEMA if schema is None else schema
    path = os.path.abspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, "config.txt")
        hint = f"pass --config {inside}" if os.path.isfile(inside) else "pass --config with the config file's path"
        raise ConfigError(f"--config {path} is a folder, not a config file; {hint}.")
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path} does not exist; pass --config PATH or copy config.txt.")
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive: ImageNet_folder, N
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as e:
        first_line = str(e).splitlines()[0]
        raise ConfigError(f"Config file {path} is not valid INI ({first_line}); fix its syntax.") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"Config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    base_dir = os.path.dirname(path)
    for section in parser.sections():
        if section not in schema:
            raise ConfigError(f"{path}: unknown section [{section}]; expected one of "
                              f"{', '.join('[' + s + ']' for s in schema)}.")
        for name in parser[section]:
            if name not in schema[section]:
                if (section, name) in MOVED_KEYS:
                    raise ConfigError(f"{path}: {MOVED_KEYS[section, name]}")
                raise ConfigError(f"{path}: unknown key '{name}' in [{section}]; expected one of "
                                  f"{', '.join(schema[section])}.")
    sections = {}
    for section, keys in schema.items():
        values = {}
        for name, key in keys.items():
            if parser.has_option(section, name):
                raw = parser[section][name]
                try:
                    values[name] = _parse(key, raw, base_dir)
                except ValueError:
                    raise ConfigError(f"{path}: [{section}] {name} must be {_kind_text(key)}, "
                                      f"received '{raw.strip()}'.") from None
            elif key.default is REQUIRED:
                raise ConfigError(f"{path}: missing key '{name}' in [{section}]; add it ({_kind_text(key)}).")
            else:
                values[name] = key.default
        sections[section] = types.SimpleNamespace(**values)
    cfg = Config(path=path, **sections)
    _check_cross_keys(cfg)
    return cfg


def _check_cross_keys(cfg):
    im = cfg.images
    if im.scale_min > im.scale_max:
        raise ConfigError(f"{cfg.path}: [images] scale_min ({im.scale_min}) must not exceed scale_max ({im.scale_max}).")
    if im.crop_size > im.scale_min:
        raise ConfigError(f"{cfg.path}: [images] crop_size ({im.crop_size}) must not exceed scale_min "
                          f"({im.scale_min}), or the random crop would not fit.")
    if im.crop_size > im.eval_resize:
        raise ConfigError(f"{cfg.path}: [images] crop_size ({im.crop_size}) must not exceed eval_resize ({im.eval_resize}).")
    steps = cfg.train.profile_steps
    if steps and (len(steps) != 2 or steps[0] >= steps[1]):
        raise ConfigError(f"{cfg.path}: [train] profile_steps must be two global steps 'first, last' with first < "
                          f"last (e.g. 100, 110) or empty, received '{', '.join(map(str, steps))}'.")
    br = cfg.batch_renorm
    for what in ("rmax", "dmax"):
        start, reach = getattr(br, f"start_relaxing_{what}"), getattr(br, f"reach_{what}_max")
        if reach < start:
            raise ConfigError(f"{cfg.path}: [batch_renorm] reach_{what}_max ({reach}) must be >= "
                              f"start_relaxing_{what} ({start}).")


def scales(cfg):
    """The shorter sides of the scale augmentation: 256, 263, ..., 480 by default."""
    im = cfg.images
    return list(range(im.scale_min, im.scale_max + 1, im.scale_step))


def check_class_count(cfg, num_classes, where):
    """Refuse a training set below [data] min_classes: with one class every loss is 0 and every
    accuracy 100%, which looks like success; the usual cause is a dataset root one level too deep."""
    if num_classes < cfg.data.min_classes:
        raise ConfigError(f"The training set at {cfg.preprocess.ImageNet_folder} has {num_classes} "
                          f"class{'' if num_classes == 1 else 'es'} ({where}), expected at least [data] min_classes = "
                          f"{cfg.data.min_classes}; point [preprocess] ImageNet_folder at the dataset root (the "
                          f"folder holding train/), or set [data] min_classes = 1 to train on it anyway.")


MU_SIGMA_FILE = "mu_sigma.json"


def mu_sigma(cfg):
    """(mu, sigma) as two 3-tuples of floats, resolving 'auto' from get_mu_sigma.py's output."""
    raw = [getattr(cfg.utils, f"mu_{c}") for c in range(3)] + [getattr(cfg.utils, f"sigma_{c}") for c in range(3)]
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
        raw = [c if v == "auto" else v for v, c in zip(raw, computed)]
    mu, sigma = tuple(float(v) for v in raw[:3]), tuple(float(v) for v in raw[3:])
    if min(sigma) <= 0:
        raise ConfigError(f"[utils] sigma must be positive, received {sigma}.")
    return mu, sigma


# ----------------------------------------------------------------------------
# Atomic writes: a file or folder appears under its final name only when complete
# ----------------------------------------------------------------------------

TMP_PREFIX = ".tmp-"


def _tmp_name(path):
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{TMP_PREFIX}{name}-{os.getpid()}-{os.urandom(3).hex()}")


def is_temp_name(name):
    return os.path.basename(name).startswith(TMP_PREFIX)


def disk_full_error(path, bytes_needed=None, too_large=False):
    """The UserError for ENOSPC/EDQUOT (disk or quota full) or, with too_large, EFBIG (a file-size limit)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    need = f" needs about {human_bytes(bytes_needed)}" if bytes_needed else ""
    has = f", {human_bytes(free)} free" if free is not None else ""
    if too_large:
        return UserError(f"File size limit hit writing {os.path.basename(path)} in {folder} (write{need}{has}); "
                         f"raise the limit (ulimit -f) or point the config at another disk, then rerun to resume.")
    return UserError(f"Disk full writing {os.path.basename(path)} in {folder} (write{need}{has}); "
                     f"free space there or point the config at a larger disk, then rerun to resume.")


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0


def fsync_path(path):
    """Flush a file's or a folder's data and metadata (a folder: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path):
    """fsync every file and folder under `path`, `path` last (TensorFlow's savers do not fsync)."""
    if not os.path.isdir(path):
        return fsync_path(path)
    for folder, _, names in os.walk(path, topdown=False):
        for name in names:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def _durable_replace(tmp, path, rename):
    """rename(tmp, path) so that a power cut leaves the old or the new content, never an empty file:
    the content reaches the disk before the rename and the folder's new entry after it. Without
    the first fsync, ext4 and XFS may commit the rename before the data blocks."""
    fsync_tree(tmp)
    rename(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_path(path, bytes_needed=None, tmp=None, durable=False):
    """Yield a temporary path in the same folder; on success rename it to `path`.

    On any failure the temporary file is removed, so a reader never sees a
    partial `path`. ENOSPC becomes a UserError naming the folder. `tmp`: a
    temporary name to use instead of a fresh one (it must be in the same folder).
    `durable`: survive a power cut too (fsync before and after the rename); for the run
    folder's files. The buffer, regenerable on a RAM disk, skips it.
    """
    tmp = tmp or _tmp_name(path)
    try:
        yield tmp
        if durable:
            _durable_replace(tmp, path, os.replace)
        else:
            os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise disk_full_error(path, bytes_needed, too_large=e.errno == errno.EFBIG) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def read_json(path):
    """The parsed JSON file, or None when it is missing or unreadable (callers treat both as 'not there')."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def atomic_write_bytes(path, data, durable=False):
    with atomic_path(path, len(data), durable=durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text, durable=False):
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_save_npy(path, array, reuse=None):
    """np.save's bytes, written so that a full disk is reported as one (np.save's array.tofile
    raises a bare "N requested and M written" OSError without its errno on a short write).

    `reuse`: a temp-named file in the same folder that is no longer needed (the buffer's
    consumed batches) to overwrite in place and rename to `path`. Rewriting pages the file
    already has skips freeing and allocating them (and the file system's block bookkeeping):
    a 4.8 MB batch took 0.3 ms that way against 0.9-11 ms as a new file on this machine.
    """
    array = np.asarray(array)
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    if array.dtype.hasobject:
        raise ValueError("object arrays are never written: they would need pickle to read back")
    with atomic_path(path, array.nbytes + 128, tmp=reuse) as tmp:
        try:
            f = open(tmp, "r+b" if reuse else "wb")
        except FileNotFoundError:
            if not reuse:
                raise
            f = open(tmp, "wb")  # swept meanwhile: a new file then
        with f:
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
            f.write(memoryview(array.reshape(-1)).cast("B"))
            f.truncate()  # a reused file may have been longer


@contextlib.contextmanager
def atomic_dir(path, durable=False):
    """Yield a temporary folder; on success it is renamed to `path` (which must not exist).
    `durable`: every file and folder inside is fsynced before the rename, the parent after."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = _tmp_name(path)
    os.makedirs(tmp)
    try:
        yield tmp
        if durable:
            _durable_replace(tmp, path, os.rename)
        else:
            os.rename(tmp, path)
    except OSError as e:
        _remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise disk_full_error(path, too_large=e.errno == errno.EFBIG) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def remove_stale_temps(folder):
    """Delete temp files/folders left by killed writers. Only call when no writer is active."""
    if not os.path.isdir(folder):
        return 0
    removed = 0
    for name in os.listdir(folder):
        if is_temp_name(name):
            _remove(os.path.join(folder, name))
            removed += 1
    return removed


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Processes: one lock policy, one parent-death rule
# ----------------------------------------------------------------------------

@contextlib.contextmanager
def exclusive_lock(path, busy_message=None):
    """Hold an exclusive flock on `path` (a folder, or a lock file created if missing) for the block.

    With `busy_message`, a second holder is refused at once with that UserError (two writers of one
    folder); without, it waits its turn (short read-modify-write sections). The lock dies with the
    process, so a killed holder never leaves a stale lock behind.
    """
    fd = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy_message else 0))
        except BlockingIOError:
            raise UserError(busy_message) from None
        yield
    finally:
        os.close(fd)


def die_with_parent(sig, parent_pid):
    """Have Linux send `sig` to this process when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG).

    Called in a child (a producer worker, or a launcher's child before exec); if the parent
    `parent_pid` died before the request took effect, the child exits at once.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def git_hash():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def setup_logging(log_file=None, level=logging.INFO):
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)


UNDER_LAUNCHER_ENV = "RESNET_UNDER_LAUNCHER"  # set by tools/launch.py for its children
_interrupt_advice = None  # a callable giving the rerun advice at Ctrl-C time (set_interrupt_advice)


def set_interrupt_advice(advice):
    """`advice()` -> the sentence printed after 'interrupted;' on Ctrl-C, computed when it happens
    (train.py's depends on which epochs were saved meanwhile)."""
    global _interrupt_advice
    _interrupt_advice = advice


def interrupt_line():
    advice = _interrupt_advice() if _interrupt_advice else "Rerun the same command to resume."
    return f"interrupted; nothing half-written was kept. {advice}"


def run_main(main):
    """Run a script's main(); print a UserError as one sentence and exit 2, Ctrl-C as exit 130.

    Under tools/launch.py a child says nothing on Ctrl-C: the launcher prints the one line.
    """
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if not os.environ.get(UNDER_LAUNCHER_ENV):
            print(interrupt_line(), file=sys.stderr)
        sys.exit(130)


def epoch_start_arg(text):
    """The argparse type of every script's --epoch_start: an epoch >= 0, or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an epoch >= 0 or 'auto', received '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an epoch >= 0 or 'auto', received {value}")
    return value


def add_epoch_args(parser, start_help, end_help):
    """--epoch_start (epoch_start_arg) and --epoch_end (int), the same in every script."""
    parser.add_argument("--epoch_start", required=True, type=epoch_start_arg, help=start_help)
    parser.add_argument("--epoch_end", required=True, type=int, help=end_help)


def check_epoch_range(epoch_start, epoch_end):
    """UserError unless epoch_start < epoch_end: epochs epoch_start..epoch_end-1 are processed."""
    if epoch_end <= epoch_start:
        raise UserError(f"--epoch_end ({epoch_end}) must be greater than --epoch_start ({epoch_start}); "
                        f"epochs epoch_start..epoch_end-1 are processed.")


def worker_info():
    """(task_index, num_workers) from TF_CONFIG, without importing TensorFlow; (0, 1) when unset.

    Here (not in engine/distribute.py) because the producer needs it too and data/ does not import engine/.
    """
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


def add_config_arg(parser):
    parser.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.txt"),
                        help="INI config file (default: config.txt next to the scripts)")


def quiet_tensorflow():
    """Silence TF's C++ start-up chatter; call before importing tensorflow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
