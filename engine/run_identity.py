"""A resumed run's identity: the settings that shape its checkpoint, checked before the checkpoint is read.

A checkpoint restores only into the network and optimizer it was written from, and a precision
change may even restore silently (mixed_bfloat16 -> none: float32 variables either way) while the
README promises a run resumes only with the precision it started with. So train.py compares the
settings below with those recorded in the resumed epoch's config.txt (written by the trainer),
before TensorFlow reads the checkpoint (both sides are resolved settings: settings/__init__.py): a difference in an IDENTITY key is refused in one sentence
naming the key, the run's value and the new one; a difference in any other key that shapes the
training (a learning rate, an EMA decay, label smoothing, augmentation...) is accepted and named
in one line, from the resumed epoch on. Where files live, how long to wait and how much to log
(OPERATIONAL) are not compared.

Everything here takes plain mappings {section: {key: text}} (the INI text of config.txt, parsed
with configparser), so the comparison is a pure function tested without TensorFlow.
"""
import configparser
import os
import re
import shlex

from engine import run_folder
from utils.errors import UserError

# Settings whose change makes the checkpoint another network or optimizer: refused on resume.
IDENTITY = (
    ("model", "arch"), ("model", "width_multiplier"), ("model", "variant"), ("model", "stride_on"),
    ("model", "stage_blocks"),
    ("model", "normalization"), ("model", "num_classes"),
    ("train", "mixed_precision"), ("train", "optimizer"), ("train", "ema_decay"),  # ema_decay: on/off only
    # accumulation_steps: the effective batch the run's rate (reference_batch), loss scale and EMA were set for;
    # its accumulator is not in the checkpoint (empty at every epoch boundary), but a change is another recipe.
    ("train", "accumulation_steps"),
)
# Settings that do not change what is trained: never compared.
OPERATIONAL = {
    "preprocess": None, "preprocess_val": None, "get_mu_sigma": None, "data": None,  # None: the whole section
    "train": {"buffer_folder", "path_for_saving", "N", "buffer_size", "sleep_time", "wait_timeout", "log_every",
              "profile_steps", "distribute", "deterministic", "jit_compile"},
    "runtime_preprocessing": {"sleep_time", "num_of_threads", "refill_threshold", "heartbeat_interval",
                              "use_scale_cache"},
    "images": {"eval_resize", "eval_scales_50"},  # evaluation only
    "model": {"zero_init_last_gamma"},  # initialisation only: no effect on a resumed run
}
CLASSES_COMMENT = "# num_classes {} (the output layer's width)"  # in config.txt's header: [model] num_classes may be 0
_CLASSES_RE = re.compile(r"^# num_classes (\d+) ")
COMMAND = "train.py"  # the pseudo-section of train.py's own settings
LEARNING_RATE_FLAG = "--learning_rate"  # train.py's per-invocation constant rate, recorded in the command line


def read_record(epoch_path):
    """The settings recorded in <epoch>/config.txt: {section: {key: text}}, plus the header's class count
    as [model] num_classes and the command line's --learning_rate as [train.py] learning_rate."""
    with open(run_folder.config_path(epoch_path), encoding="utf-8") as f:
        return parse_record(f.read())


def parse_record(text):
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read_string(text)
    record = {name: dict(parser[name]) for name in parser.sections()}
    for line in text.splitlines():
        match = _CLASSES_RE.match(line)
        if match:
            record.setdefault("model", {})["num_classes"] = match.group(1)
        if line.startswith("# command: "):
            rate = command_learning_rate(line[len("# command: "):])
            record[COMMAND] = {"learning_rate": rate} if rate else {}
    if record.get("model", {}).get("num_classes") == "0":  # a run recorded before the header line: unknown
        del record["model"]["num_classes"]
    return record


def command_learning_rate(command):
    """The --learning_rate of a recorded command line, as text, or None."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word.startswith(LEARNING_RATE_FLAG + "="):
            return _number(word.split("=", 1)[1])
        if word == LEARNING_RATE_FLAG and i + 1 < len(words):
            return _number(words[i + 1])
    return None


def _number(text):
    """'1e-2' and '0.01' alike as '0.01' (str of the float, as this invocation's rate is shown)."""
    try:
        return str(float(text))
    except ValueError:
        return text


def _ema(text):
    return "on" if float(text) > 0 else "off"


def compare(recorded, new):
    """(refused, changed): lists of (section, key, recorded text, new text). A key missing on either
    side (a run recorded before the key existed, say) is not compared; [train.py] learning_rate is
    compared when `new` has a [train.py] section, a missing rate being 'none' ([schedule] sets it)."""
    refused, changed = [], []
    for section in new.keys() & recorded.keys() | ({COMMAND} & new.keys()):
        skip = OPERATIONAL.get(section, set())
        if skip is None:
            continue
        old_keys, new_keys = recorded.get(section, {}), new[section]
        for key in old_keys.keys() | new_keys.keys():
            before, after = old_keys.get(key), new_keys.get(key)
            if section == COMMAND:
                before, after = before or "none", after or "none"
            if key in skip or before is None or after is None or before == after:
                continue
            if (section, key) == ("train", "ema_decay"):  # the EMA copy is in the checkpoint only when on
                (refused if _ema(before) != _ema(after) else changed).append((section, key, before, after))
            else:
                (refused if (section, key) in IDENTITY else changed).append((section, key, before, after))
    order = {k: i for i, k in enumerate(IDENTITY)}
    refused.sort(key=lambda d: order[d[:2]])
    changed.sort(key=lambda d: (d[0] == COMMAND, d[0], d[1]))
    return refused, changed


def _shown(section, key, text, note=None):
    value = f"{text} (EMA {_ema(text)})" if (section, key) == ("train", "ema_decay") else text
    return f"{value} ({note})" if note else value


def _name(section, key):
    return LEARNING_RATE_FLAG if section == COMMAND else f"[{section}] {key}"


def refusal(run_path, epoch, refused, notes=None):
    """The one sentence for settings that differ from the run's: key, the run's value, the new one, the fix."""
    notes = notes or {}
    was = " and ".join(f"{_name(s, k)} = {_shown(s, k, old)}" for s, k, old, _ in refused)
    now = " and ".join(f"{k} = {_shown(s, k, new, notes.get((s, k)))}" for s, k, _, new in refused)
    back = " and ".join(f"{k} = {old}" for _, k, old, _ in refused)
    return (f"cannot resume {run_path} from epoch {epoch}: its config.txt records {was}, this config gives "
            f"{now}; set {back} to resume the run, or pass a new --run_folder to start a new run "
            f"with these settings.")


def changes_line(epoch_start, changed):
    """The one line naming the accepted recipe changes, or None."""
    if not changed:
        return None
    items = ", ".join(f"{_name(s, k)} {old} -> {new}" for s, k, old, new in changed)
    return f"resuming with changed settings from epoch {epoch_start} on (the checkpoint is unaffected): {items}."


def invocation(config_text, precision, num_classes, learning_rate):
    """(settings, notes) of this invocation for compare/refusal: `config_text` is the resolved config's
    INI text; `precision` (policy, reason) is [train] mixed_precision resolved for this machine;
    `num_classes` the output layer's width (None while unknown: not compared); `learning_rate`
    train.py's --learning_rate or None."""
    settings = parse_record(config_text)
    policy, reason = precision
    settings["train"]["mixed_precision"] = policy
    if num_classes:
        settings["model"]["num_classes"] = str(num_classes)
    else:
        settings["model"].pop("num_classes", None)
    settings[COMMAND] = {"learning_rate": str(float(learning_rate))} if learning_rate is not None else {}
    notes = {("train", "mixed_precision"): reason} if reason.startswith("auto") else {}
    return settings, notes


def check_resume(run_path, epoch_start, config_text, precision, num_classes=None, learning_rate=None):
    """Refuse (UserError) a resume of `run_path` at `epoch_start` whose IDENTITY settings differ from those
    recorded in epoch epoch_start - 1; return the line naming accepted changes (or None). The arguments
    after `epoch_start` are invocation()'s."""
    new, notes = invocation(config_text, precision, num_classes, learning_rate)
    epoch = epoch_start - 1
    try:
        recorded = read_record(os.path.join(run_path, str(epoch)))
    except (OSError, configparser.Error, UnicodeDecodeError) as e:
        raise UserError(f"cannot resume {run_path}: epoch {epoch}'s config.txt is unreadable ({type(e).__name__}); "
                        f"restore it from a copy, or resume from an earlier epoch with --epoch_start.") from None
    refused, changed = compare(recorded, new)
    if refused:
        raise UserError(refusal(run_path, epoch, refused, notes))
    return changes_line(epoch_start, changed)
