"""What a new user sees when a first run goes wrong (issue 18): each refusal is one sentence naming
what was expected, what was found and the next command, and a refused train.py leaves no run folder."""
import os
import subprocess
import sys

import pytest

from tests.helpers import merge_sections, write_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def run(script, *args, timeout=60):
    return subprocess.run([PY, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def write_config(folder, data_root, **sections):
    """configs/demo.txt with this test's folders, fixed mu/sigma and a 1 s wait_timeout."""
    values = {"preprocess": {"ImageNet_folder": data_root, "path_to_save": os.path.join(folder, "scales"),
                             "num_workers": "1"},
              "train": {"buffer_folder": os.path.join(folder, "buffer"),
                        "path_for_saving": os.path.join(folder, "runs"), "wait_timeout": "1"},
              "utils": {**{f"mu_{c}": "0.5" for c in range(3)}, **{f"sigma_{c}": "0.25" for c in range(3)}}}
    return write_config_file(folder, os.path.join(ROOT, "configs", "demo.txt"), merge_sections(values, sections))


@pytest.fixture(scope="module")
def one_class(tmp_path_factory):
    """A one-class training set (ImageNet_folder pointed one level too deep looks like this) and a
    buffer of batches of 4 that the producer filled from it."""
    sys.path.insert(0, ROOT)
    from tools.make_demo_dataset import make_dataset
    folder = tmp_path_factory.mktemp("one_class")
    data = str(folder / "imagenet")
    make_dataset(data, num_classes=1, train_per_class=8, val_per_class=1, odd_files=False, min_side=72, max_side=80)
    config = write_config(str(folder), data)
    produced = run("runtime_preprocessing.py", "--config", config, "--epoch_start=0", "--epoch_end=1",
                   "--batch_size=4", "--once", "--no_progress", "--num_workers=1")
    assert produced.returncode == 0, produced.stderr
    return config


def test_train_refuses_a_one_class_training_set_and_creates_no_run_folder(one_class):
    result = run("train.py", "--config", one_class, "--run_folder=first", "--epoch_start=0", "--epoch_end=1",
                 "--batch_size=4")
    assert result.returncode == 2, result.stderr
    assert "has 1 class (per the producer's manifest), expected at least [data] min_classes = 2" in result.stderr
    assert "set [data] min_classes = 1" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(os.path.dirname(one_class), "runs", "first"))


def test_a_train_py_refused_for_its_batch_size_leaves_no_run_folder(one_class):
    result = run("train.py", "--config", one_class, "--run_folder=mismatch", "--epoch_start=0", "--epoch_end=1",
                 "--batch_size=8")
    assert result.returncode == 2, result.stderr
    assert "holds batches of 4 images but this run asks for --batch_size=8" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(os.path.dirname(one_class), "runs", "mismatch"))


def test_preprocess_refuses_a_one_class_training_set_unless_min_classes_is_1(one_class, tmp_path):
    result = run("preprocess.py", "--config", one_class, "--shorter_side=72")
    assert result.returncode == 2 and "expected at least [data] min_classes = 2" in result.stderr, result.stderr
    data = open(one_class).read().split("ImageNet_folder = ")[1].splitlines()[0]
    forced = write_config(str(tmp_path), data, data={"min_classes": "1"})
    result = run("preprocess.py", "--config", forced, "--shorter_side=72")
    assert result.returncode == 0, result.stderr


def test_preprocess_refuses_a_side_no_run_draws_and_names_the_scales(tmp_path):
    # configs/demo.txt draws scales 72, 76, ..., 96: a cache at 73 would never be read.
    config = write_config(str(tmp_path), str(tmp_path / "no_dataset_needed"))
    result = run("preprocess.py", "--config", config, "--shorter_side=73")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --shorter_side 73 is not one of the scales training draws ([images] scale_min 72 to scale_max 96 "
        "step 4: 72, 76, 80, 84, 88, 92, 96), so no run would read that cache; pass one of those, 'all', or "
        "--any_side to build it anyway."]
    assert not os.path.exists(tmp_path / "scales")


def test_config_naming_a_folder_says_it_is_a_folder(tmp_path):
    (tmp_path / "config.txt").write_text("")
    result = run("preprocess.py", "--config", str(tmp_path), "--shorter_side=72")
    assert result.returncode == 2
    assert f"--config {tmp_path} is a folder, not a config file; pass --config {tmp_path / 'config.txt'}." \
        in result.stderr


def _complete_epoch(run, epoch):
    folder = run / str(epoch)
    (folder / "saved_model").mkdir(parents=True)
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "ckpt.index").write_text("")
    (folder / "config.txt").write_text("")


def test_ctrl_c_advice_points_to_auto_only_once_the_command_would_collide_with_a_saved_epoch(tmp_path):
    from engine.run_folder import resume_advice
    run = tmp_path / "run"
    assert resume_advice(str(run), "0") == "Rerun the same command to resume."
    _complete_epoch(run, 0)
    assert resume_advice(str(run), "1") == "Rerun the same command to resume."  # resumes from epoch 0
    assert resume_advice(str(run), "auto") == "Rerun the same command to resume."
    assert resume_advice(str(run), "0") == (f"Epoch 0 is saved in {run}: rerun with --epoch_start=auto to "
                                            f"continue from epoch 1.")


def test_a_run_folder_left_with_only_its_lock_and_log_is_removed_on_a_user_error(tmp_path):
    from engine import run_folder
    from utils.errors import UserError
    new, old = tmp_path / "new", tmp_path / "old"
    old.mkdir()
    for run in (new, old):
        with pytest.raises(UserError):
            with run_folder.removed_if_left_empty(str(run)), run_folder.locked(str(run)):
                (run / "train.log").write_text("")
                raise UserError("jit_compile and deterministic cannot both be true")
    assert not new.exists() and sorted(os.listdir(old)) == ["train.lock", "train.log"]


def _help_entries(help_text):
    """{option line: its help text} from argparse's --help output."""
    entries, current = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            spec, _, text = line.strip().partition("  ")
            current = spec
            entries[current] = text.strip()
        elif current and line.startswith("    "):
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("script", [os.path.join("tools", "make_demo_dataset.py"), os.path.join("tools", "demo.py")])
def test_every_option_of_the_demo_tools_has_help_and_states_its_default_once(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    entries = _help_entries(result.stdout)
    assert len(entries) >= 4
    assert [spec for spec, text in entries.items() if not text] == []
    assert [spec for spec, text in entries.items() if text.lower().count("default") > 1] == []


def test_a_trainer_without_producer_says_at_once_what_it_waits_for_and_creates_no_run_or_buffer_folder(tmp_path):
    config = write_config(str(tmp_path), str(tmp_path / "data"))  # its wait_timeout: 1 s
    result = run("train.py", "--config", config, "--run_folder=early", "--epoch_start=0", "--epoch_end=3",
                 "--batch_size=4")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].endswith(f"train WARNING no producer has written {tmp_path / 'buffer' / 'manifest.json'} yet; "
                             f"start runtime_preprocessing.py --epoch_start=0 --epoch_end=3 --batch_size=4 with this "
                             f"config (waiting up to 1 s, [train] wait_timeout).")
    assert lines[-1].startswith(f"error: Waited 1 s for the buffer manifest in {tmp_path / 'buffer'} but the folder "
                                f"does not exist (no producer has started there; runtime_preprocessing.py creates it)")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "buffer").exists()  # the producer creates it


def test_a_reminder_repeats_with_the_time_waited_until_the_wait_ends():
    import threading
    from engine.waiting import Reminder
    from tests.helpers import wait_until
    said, done = [], threading.Event()
    with Reminder(said.append, lambda: not done.is_set(), "waiting for X", lambda t: t, every=0.1) as reminder:
        assert said == ["waiting for X"]  # at once
        assert wait_until(lambda: len(said) >= 3, timeout=30)
        done.set()
        # The reminder's thread ends by itself at its next check once the wait is over, inside the block.
        assert wait_until(lambda: not reminder._thread.is_alive(), timeout=30)
        after = len(said)
    times = said[1:]
    assert len(times) >= 2 and times == sorted(times) and times[0] >= 0.1
    assert len(said) == after  # no reminder once the wait is over


def test_the_readme_seed002_commands_work_on_the_generated_tiny_set(tmp_path):
    # The README's block, up to preprocess_val.py, run in a copy of the repo's layout on a small generated set.
    import shutil
    from tools.make_demo_dataset import make_dataset
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("## Seed 002's system", 1)[1].split("    python tools/launch.py", 1)[0]
    commands = [line.strip() for line in block.splitlines() if line.startswith("    ")]
    assert commands[0].startswith("python tools/make_demo_dataset.py --layout tiny --out tiny_data/tiny-imagenet-200")
    (tmp_path / "configs").mkdir()
    shutil.copy(os.path.join(ROOT, "configs", "seed002_tiny_imagenet.txt"), tmp_path / "configs")
    make_dataset(str(tmp_path / "tiny_data" / "tiny-imagenet-200"), num_classes=2, train_per_class=4,
                 val_per_class=3, layout="tiny", odd_files=False, min_side=64, max_side=64)
    script = "set -e\n" + "\n".join(c.replace("python ", f"{PY} {ROOT}/", 1) if c.startswith("python ") else c
                                    for c in commands[1:] if "get_mu_sigma.py" not in c)
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "6 validation images stored" in result.stdout + result.stderr
