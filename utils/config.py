"""Loading config.txt: parse and validate every key against utils/schema.py, then the checks that tie keys together.

`load_config` validates the whole file up front, so a typo stops a script in its first second with one
sentence, not an hour into training. Paths are resolved relative to the config file's folder, so no script
depends on the current directory. Scripts turn the loaded Config into frozen settings (utils/settings.py);
library code never sees a Config.
"""
import configparser
import math
import os
import types

from utils.errors import ConfigError
from utils.schema import MOVED_KEYS, REQUIRED, SCHEMA

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _kind_text(key, raw=None):
    """'a number in [lo, hi]' etc.; the float ceiling MAX_FLOAT is named only when `raw` goes past it."""
    if key.kind == "choice":
        return "one of " + ", ".join(key.choices)
    if key.kind == "stats":
        return "a number or 'auto'"
    if key.kind == "count":
        return f"'auto' or an integer >= {key.lo}"
    text = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text",
            "path": "a path", "ints": "a comma-separated list of integers",
            "floats": "a comma-separated list of numbers"}[key.kind]
    hi = key.hi if key.hi is not None or not _past_max_float(raw) else f"{MAX_FLOAT:g}"
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
    if kind == "count":
        if raw.lower() == "auto":
            return "auto"
        value = int(raw)
        _check_range(key, value)
        return value
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


def _past_max_float(raw):
    """True when a received value (or a list's item) is a number beyond MAX_FLOAT, inf or nan."""
    for item in (raw or "").replace(" ", "").split(","):
        try:
            value = float(item)
        except ValueError:
            continue
        if not (math.isfinite(value) and abs(value) <= MAX_FLOAT):
            return True
    return False


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


def format_value(value):
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
                homes = [f"[{other}]" for other in schema if name in schema[other]]
                if homes:
                    raise ConfigError(f"{path}: unknown key '{name}' in [{section}]; it belongs in "
                                      f"{' or '.join(homes)}: move the line there.")
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
                    raise ConfigError(f"{path}: [{section}] {name} must be {_kind_text(key, raw)}, "
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
    if cfg.train.jit_compile and cfg.train.deterministic:
        raise ConfigError(f"{cfg.path}: [train] jit_compile and deterministic cannot both be true: XLA has no "
                          f"deterministic max-pool gradient; set one of them to false.")
    if cfg.model.arch == "resnet50" and cfg.model.normalization != "batch_renorm":
        raise ConfigError(f"{cfg.path}: [model] normalization = batch_norm is for arch = concat_resnet; resnet50 uses "
                          f"batch renorm (set [batch_renorm] rmax_max = 1 and dmax_max = 0 for batch-norm behaviour).")
    blocks = cfg.model.stage_blocks
    if blocks and (cfg.model.arch != "resnet50" or len(blocks) != 4):
        raise ConfigError(f"{cfg.path}: [model] stage_blocks sets resnet50's 4 stages, received "
                          f"'{', '.join(map(str, blocks))}' for arch = {cfg.model.arch}; give 4 counts "
                          f"(e.g. 3, 4, 6, 3) with arch = resnet50, or leave it empty.")
    if cfg.train.ema_decay >= 1 and not cfg.train.ema_warmup:
        raise ConfigError(f"{cfg.path}: [train] ema_decay = 1 without ema_warmup keeps the initial weights forever; "
                          f"use a decay below 1 (e.g. 0.9999), or set ema_warmup = true.")
    steps = cfg.train.profile_steps
    if steps and (len(steps) != 2 or steps[0] > steps[1]):
        raise ConfigError(f"{cfg.path}: [train] profile_steps must be two global steps 'first, last' (inclusive) "
                          f"with first <= last (e.g. 100, 110) or empty, received '{', '.join(map(str, steps))}'.")
    br = cfg.batch_renorm
    for what in ("rmax", "dmax"):
        start, reach = getattr(br, f"start_relaxing_{what}"), getattr(br, f"reach_{what}_max")
        if reach < start:
            raise ConfigError(f"{cfg.path}: [batch_renorm] reach_{what}_max ({reach}) must be >= "
                              f"start_relaxing_{what} ({start}).")

