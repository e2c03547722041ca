"""Resuming a run with changed settings (issue 26): what would not fit the checkpoint is refused in one
sentence before TensorFlow reads it; recipe changes are named in one line; the start-up line names the
recipe in force and the keys without effect; the launcher repeats a trainer's error line."""
import dataclasses
import hashlib
import os
import subprocess

import pytest

from settings import load_settings
from utils.errors import UserError
from engine import recipe_line, run_identity
from tests.helpers import (PY, ROOT, make_data, run_path, run_train, start_train_producer, write_config_file,
                           write_train_config)

NO_GPU = ("none", "auto: no GPU")


def unresolved(config):
    """Settings with mu/sigma, decoder and devices left as the file says (the comparison gets the precision apart)."""
    return load_settings(config, stats=False, decoder=False, devices=False)
SET = "set in the config"


def demo_record(tmp_path, command="python train.py --epoch_start=0", classes=4, **train):
    """A run folder whose epoch 0 records configs/demo.txt with `train` overrides, as the trainer writes it
    (mixed_precision resolved: none unless given)."""
    train.setdefault("mixed_precision", "none")
    config = write_config_file(str(tmp_path), os.path.join(ROOT, "configs", "demo.txt"),
                               {"train": {k: str(v) for k, v in train.items()}}, name="recorded.txt")
    text = unresolved(config).resolved_text()
    header = [f"# command: {command}", run_identity.CLASSES_COMMENT.format(classes)] if classes else []
    run = tmp_path / "runs" / "run"
    (run / "0").mkdir(parents=True)
    (run / "0" / "config.txt").write_text("\n".join(["# epoch 0 of run", *header, text]))
    return str(run)


def this_config(tmp_path, **train):
    config = write_config_file(str(tmp_path), os.path.join(ROOT, "configs", "demo.txt"),
                               {"train": {k: str(v) for k, v in train.items()}}, name="new.txt")
    return unresolved(config).resolved_text()


# ----------------------------------------------------------------------------
# The comparison (no TensorFlow)
# ----------------------------------------------------------------------------

def test_a_bfloat16_run_resumed_with_auto_on_a_cpu_is_refused_naming_the_key_and_both_values(tmp_path):
    run = demo_record(tmp_path, mixed_precision="mixed_bfloat16")
    with pytest.raises(UserError) as refused:
        run_identity.check_resume(run, 1, this_config(tmp_path, mixed_precision="auto"), NO_GPU, 4)
    text = str(refused.value)
    assert "[train] mixed_precision = mixed_bfloat16" in text and "mixed_precision = none (auto: no GPU)" in text
    assert "set mixed_precision = mixed_bfloat16" in text and "new --run_folder" in text and "\n" not in text


def test_a_float32_run_resumed_with_mixed_float16_is_refused_in_one_sentence(tmp_path):
    run = demo_record(tmp_path, mixed_precision="none")
    with pytest.raises(UserError) as refused:
        run_identity.check_resume(run, 1, this_config(tmp_path), ("mixed_float16", SET), 4)
    text = str(refused.value)
    assert text.count(". ") == 0 and text.endswith(".") and "\n" not in text
    assert "mixed_precision = none" in text and "mixed_precision = mixed_float16" in text


@pytest.mark.parametrize("recorded, new", [("0.9", "0"), ("0", "0.9")])
def test_switching_the_ema_on_or_off_is_refused_naming_ema_decay_and_the_runs_value(tmp_path, recorded, new):
    run = demo_record(tmp_path, ema_decay=recorded)
    with pytest.raises(UserError, match=rf"\[train\] ema_decay = {recorded}(\.0)? \(EMA o"):
        run_identity.check_resume(run, 1, this_config(tmp_path, ema_decay=new), NO_GPU, 4)


def test_a_run_resumed_with_another_accumulation_steps_is_refused_naming_the_key(tmp_path):
    run = demo_record(tmp_path, accumulation_steps=2)
    with pytest.raises(UserError, match=r"\[train\] accumulation_steps = 2"):
        run_identity.check_resume(run, 1, this_config(tmp_path, accumulation_steps=1), NO_GPU, 4)
    run_identity.check_resume(run, 1, this_config(tmp_path, accumulation_steps=2), NO_GPU, 4)  # the same: fine


def test_a_new_ema_decay_learning_rate_or_smoothing_is_accepted_with_one_line_from_the_resumed_epoch(tmp_path):
    run = demo_record(tmp_path, command="python train.py --learning_rate 1e-2", ema_decay=0.9)
    new = this_config(tmp_path, ema_decay=0.99, label_smoothing=0.1, log_every=7, buffer_folder="/elsewhere")
    line = run_identity.check_resume(run, 1, new, NO_GPU, 4, learning_rate=0.001)
    assert line == ("resuming with changed settings from epoch 1 on (the checkpoint is unaffected): [train] "
                    "ema_decay 0.9 -> 0.99, [train] label_smoothing 0.0 -> 0.1, --learning_rate 0.01 -> 0.001.")
    assert run_identity.check_resume(run, 1, this_config(tmp_path, ema_decay=0.9), NO_GPU, 4, 0.01) is None


def test_architecture_width_and_classes_are_identity_and_unknown_values_are_not_compared(tmp_path):
    recorded = run_identity.parse_record("\n".join([run_identity.CLASSES_COMMENT.format(4),
                                                    this_config(tmp_path)]))
    for section, key, value in [("model", "arch", "concat_resnet"), ("model", "width_multiplier", "0.5"),
                                ("model", "num_classes", "5"), ("train", "optimizer", "rmsprop")]:
        new = {s: dict(keys) for s, keys in recorded.items()}
        new[section][key] = value
        refused, changed = run_identity.compare(recorded, new)
        assert [d[:2] for d in refused] == [(section, key)] and not changed
    # A run recorded before the class-count header line, with [model] num_classes = 0: the count is unknown.
    old = run_identity.parse_record(this_config(tmp_path))
    assert "num_classes" not in old["model"]
    assert run_identity.compare(old, recorded) == ([], [])


# ----------------------------------------------------------------------------
# The start-up line
# ----------------------------------------------------------------------------

def demo_sections(**train):
    cfg = unresolved(os.path.join(ROOT, "configs", "demo.txt"))
    return {**dataclasses.asdict(cfg.train), "mixed_precision": "none", **train}, dataclasses.asdict(cfg.schedule)


def test_the_start_up_line_names_every_recipe_feature_in_force():
    train, _ = demo_sections(jit_compile=True, label_smoothing=0.1, ema_decay=0.999, ema_warmup=True,
                             mixup_alpha=0.2, cutmix_alpha=1.0)
    assert recipe_line.features(train, "auto: no GPU") == (
        "mixed_precision none (auto: no GPU), sgd momentum 0.9, jit_compile, label_smoothing 0.1, ema_decay 0.999 "
        "with ema_warmup, mixup_alpha 0.2 + cutmix_alpha 1 (mix_prob 1, switch_prob 0.5)")
    assert recipe_line.features(demo_sections()[0], "auto: no GPU") == "mixed_precision none (auto: no GPU), sgd momentum 0.9"


def test_keys_without_effect_are_named_once_and_defaults_are_not():
    train, schedule = demo_sections(mix_prob=0.5, switch_prob=0.3, ema_warmup=True)
    assert recipe_line.warnings(train, schedule) == [
        "ignored in these settings: [train] mix_prob = 0.5, switch_prob = 0.3 (mixup_alpha and cutmix_alpha are 0); "
        "[train] ema_warmup = true (ema_decay is 0)."]
    assert recipe_line.warnings(*demo_sections()) == []
    assert recipe_line.warnings(*demo_sections(mixup_alpha=0.2, switch_prob=0.3)) == [
        "ignored in these settings: [train] switch_prob = 0.3 (it chooses between mixup and cutmix, and only one "
        "alpha is > 0)."]
    assert "[schedule] type = cosine, base_lr = 0.2, reference_batch = 64, warmup_epochs = 1.0 (--learning_rate 0.01 sets a constant " \
           "rate)" in recipe_line.warnings(*demo_sections(), learning_rate=0.01)[0]


def test_mixed_float16_on_a_cpu_gets_a_one_line_note_and_on_a_gpu_none():
    train, schedule = demo_sections(mixed_precision="mixed_float16")
    assert recipe_line.warnings(train, schedule, gpu=False) == [recipe_line.FLOAT16_ON_CPU]
    assert recipe_line.warnings(train, schedule, gpu=True) == []


# ----------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------

def test_the_launcher_repeats_a_failed_scripts_error_line_not_the_warnings_after_it():
    from tools.launch import Child
    script = ("import sys\nprint('error: the one sentence.', file=sys.stderr)\n"
              "for i in range(40): print(f'tensorflow WARNING Value in checkpoint could not be found {i}', "
              "file=sys.stderr)\nsys.exit(2)")
    child = Child("trainer", [PY, "-c", script])
    assert child.proc.wait(timeout=30) == 2
    assert child.last_lines() == ["error: the one sentence."]
    plain = Child("trainer", [PY, "-c", "import sys\nfor i in range(3): print(f'line {i}', file=sys.stderr)"])
    plain.proc.wait(timeout=30)
    assert plain.last_lines() == ["line 0", "line 1", "line 2"]


# ----------------------------------------------------------------------------
# End to end: a tiny bfloat16 run resumed with auto
# ----------------------------------------------------------------------------

def folder_digest(path):
    digest = hashlib.sha256()
    for folder, dirs, names in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(names):
            file = os.path.join(folder, name)
            digest.update(os.path.relpath(file, path).encode())
            with open(file, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_a_bfloat16_run_resumed_with_auto_is_refused_and_leaves_the_run_folder_unchanged(tmp_path):
    data = make_data(str(tmp_path / "data"), classes=4, per_class=8)
    first = write_train_config(str(tmp_path / "a"), data, model={"width_multiplier": "0.125"},
                               train={"mixed_precision": "mixed_bfloat16", "mix_prob": "0.5"})
    producer = start_train_producer(first, 0, 1)
    result = run_train(first, "run", 0, 1)
    producer.wait(timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed_precision mixed_bfloat16 (set in the config), sgd momentum 0.9" in result.stderr
    assert "ignored in these settings: [train] mix_prob = 0.5 (mixup_alpha and cutmix_alpha are 0)." in result.stderr
    run = run_path(first, "run")
    before = folder_digest(run)
    resumed = write_train_config(str(tmp_path / "a"), data, model={"width_multiplier": "0.125"},
                                 train={"mixed_precision": "auto", "mix_prob": "0.5"})
    assert resumed == first  # the same config file, edited: no producer is needed to be refused
    result = subprocess.run([PY, "train.py", "--config", resumed, "--run_folder=run", "--epoch_start=auto",
                             "--epoch_end=2", "--batch_size=16"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert "Traceback" not in result.stderr and "tensorflow WARNING" not in result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot resume {run} from epoch 0: its config.txt "
                                                     f"records [train] mixed_precision = mixed_bfloat16, this config "
                                                     f"gives mixed_precision = none (auto: no GPU)")
    assert folder_digest(run) == before
