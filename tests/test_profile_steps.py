"""[train] profile_steps = first, last: a profiler trace of global steps first..last inclusive, and a line saying
so when the run ends before (or inside) the window."""
import logging
import os

import pytest

from utils.config import load_config
from engine import logs
from tests.helpers import ROOT

tf = pytest.importorskip("tensorflow")


def run_steps(window, steps, run_path, caplog):
    """Drive a ProfilerWindow as Trainer.train_epoch does over global steps 0..steps-1; returns the log text."""
    profiler = logs.ProfilerWindow(str(run_path), window)
    x = tf.ones([8, 8])
    with caplog.at_level(logging.INFO, logger="train"):
        for step in range(steps):
            profiler.at_step(step)
            x = tf.matmul(x, x) / 8.0
        profiler.close()
        profiler.close()  # train()'s finally may close an already closed window: said once
    return caplog.text


def traces(run_path):
    return os.path.isdir(os.path.join(str(run_path), logs.TENSORBOARD_DIR, "plugins", "profile"))


def test_profile_steps_traces_first_through_last_inclusive(tmp_path, caplog):
    text = run_steps((3, 6), 10, tmp_path, caplog)
    assert "profiler trace of steps 3..6 written under" in text and "ended" not in text
    assert traces(tmp_path)


def test_profile_steps_says_when_the_run_ends_inside_the_window(tmp_path, caplog):
    text = run_steps((10, 20), 12, tmp_path, caplog)
    assert "profiler trace of steps 10..11 written under" in text
    assert "the run ended after step 11, before profile_steps' last step 20" in text
    assert traces(tmp_path)


def test_profile_steps_says_when_the_run_ends_before_the_window(tmp_path, caplog):
    text = run_steps((100, 110), 12, tmp_path, caplog)
    assert text.count("no profiler trace written") == 1
    assert "[train] profile_steps = 100, 110 but the run's last global step was 11" in text
    assert not traces(tmp_path)


def test_profile_steps_of_one_step_is_accepted(tmp_path):
    path = tmp_path / "c.txt"
    from tests.helpers import write_config_file
    write_config_file(str(tmp_path), os.path.join(ROOT, "configs", "demo.txt"),
                      {"train": {"profile_steps": "5, 5"}}, name="c.txt")
    assert load_config(str(path)).train.profile_steps == (5, 5)
