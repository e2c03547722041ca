"""settings/: every auto resolved and every cross-key check done before TensorFlow loads, into frozen settings
that every epoch's config.txt records and that load back as the same settings."""
import dataclasses
import json
import os
import subprocess

import pytest

from model import build_model, model_kwargs
from settings import devices, load_settings
from tests.helpers import PY, ROOT, random_images, write_solid_config
from utils.errors import ConfigError, UserError

TWO_WORKERS = json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]},
                          "task": {"type": "worker", "index": 0}})
SCRIPTS = {
    "train.py": ["--run_folder=r", "--epoch_start=0", "--epoch_end=1"],
    "runtime_preprocessing.py": ["--epoch_start=0", "--epoch_end=1", "--no_progress"],
}


def run_script_with_importtime(script, config, batch_size, env=None):
    """(return code, stderr lines that are not import timings, whether TensorFlow was imported)."""
    result = subprocess.run([PY, "-X", "importtime", script, "--config", config, f"--batch_size={batch_size}",
                             *SCRIPTS[script]], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **(env or {})})
    lines = result.stderr.splitlines()
    imported_tf = any(line.startswith("import time:") and "tensorflow" in line for line in lines)
    return result.returncode, [line for line in lines if not line.startswith("import time:")], imported_tf


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_bad_cross_key_config_fails_in_one_sentence_without_importing_tensorflow(tmp_path, script):
    bad = write_solid_config(str(tmp_path), train={"jit_compile": "true", "deterministic": "true"})
    code, errors, imported_tf = run_script_with_importtime(script, bad, 4)
    assert code == 2 and not imported_tf
    assert errors == [f"error: {bad}: [train] jit_compile and deterministic cannot both be true: XLA has no "
                      f"deterministic max-pool gradient; set one of them to false."]
    good = write_solid_config(str(tmp_path))
    code, errors, imported_tf = run_script_with_importtime(script, good, 5, env={"TF_CONFIG": TWO_WORKERS})
    assert code == 2 and not imported_tf
    assert errors == ["error: --batch_size 5 is not divisible by the 2 workers; use a multiple of 2 for every "
                      "worker's runtime_preprocessing.py and train.py."]


def test_device_autos_resolve_on_this_cpu_without_importing_tensorflow(tmp_path):
    config = write_solid_config(str(tmp_path))
    code = ("import sys; from settings import load_settings; s = load_settings(sys.argv[1], batch_size=4); "
            "assert 'tensorflow' not in sys.modules; print(s.train.mixed_precision, s.train.distribute, s.replicas)")
    out = subprocess.run([PY, "-c", code, config], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["none", "one_device", "1"]


A100 = {"device_name": "NVIDIA A100-SXM4-40GB", "compute_capability": (8, 0)}


def test_replica_checks_count_the_gpus_the_probe_finds(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "gpu_details", lambda: [A100, A100])
    config = write_solid_config(str(tmp_path))
    settings = load_settings(config, batch_size=8)
    assert (settings.train.distribute, settings.train.mixed_precision, settings.replicas) == ("mirrored",
                                                                                           "mixed_float16", 2)
    assert "compute capability 8.0, 8.0" in settings.precision_reason
    with pytest.raises(UserError, match=r"--batch_size 9 is not divisible by the 2 replicas"):
        load_settings(config, batch_size=9)
    with pytest.raises(UserError, match=r"jit_compile = true works on one device only; this run has 2 replicas"):
        load_settings(write_solid_config(str(tmp_path), train={"jit_compile": "true"}), batch_size=8)
    one_device = write_solid_config(str(tmp_path), train={"distribute": "one_device"})
    assert load_settings(one_device, batch_size=9).replicas == 1


def test_settings_are_frozen_and_record_every_resolved_auto(tmp_path):
    config = write_solid_config(str(tmp_path), model={"num_classes": "0"},
                                runtime_preprocessing={"num_of_threads": "auto"})
    settings = load_settings(config, batch_size=4).with_classes(5, "in a test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.train.seed = 1
    assert settings.model.num_classes == 5 and "model.num_classes" in settings.autos
    assert {"train.mixed_precision", "train.distribute", "runtime_preprocessing.decoder"} <= set(settings.autos)
    text = settings.resolved_text()
    assert "mixed_precision = none" in text and "num_classes = 5" in text and "distribute = one_device" in text
    # policies stay auto: the producer's worker sizing, build_model's stride per variant
    assert [line for line in text.splitlines() if line.endswith("= auto")] == ["num_of_threads = auto",
                                                                               "stride_on = auto"]
    # config.txt of an epoch loads back as the same settings (the resume comparison relies on it)
    (tmp_path / "epoch").mkdir()
    (tmp_path / "epoch" / "config.txt").write_text(text)
    again = load_settings(str(tmp_path / "epoch" / "config.txt"), batch_size=4)
    for name in ("train", "model", "images", "utils", "runtime_preprocessing", "batch_renorm", "schedule"):
        assert getattr(again, name) == getattr(settings, name), name


def test_class_count_is_checked_against_the_config_and_the_minimum(tmp_path):
    settings = load_settings(write_solid_config(str(tmp_path), model={"num_classes": "7"}))
    with pytest.raises(UserError, match="num_classes is 7 but the dataset has 5 classes"):
        settings.with_classes(5, "in a test")
    with pytest.raises(ConfigError, match=r"has 1 class \(in a test\), expected at least \[data\] min_classes = 2"):
        settings.with_classes(1, "in a test")


def test_model_kwargs_from_the_shipped_configs():
    demo = load_settings(os.path.join(ROOT, "configs", "demo.txt"), stats=False)  # mu auto: no stats needed
    kwargs = model_kwargs(demo.with_classes(10, "test"))
    assert kwargs["num_classes"] == 10 and kwargs["width_multiplier"] == 0.25
    assert kwargs["renorm"]["momentum"] == demo.batch_renorm.moving_avgs_momentum
    assert kwargs["l2_penalty"] == demo.l2.l2_penalty
    json.dumps(kwargs)
    net = build_model(**kwargs)
    assert net(random_images([1, 64, 64, 3]), training=False).shape == (1, 10)

    full = load_settings(os.path.join(ROOT, "config.txt"), stats=False)
    kwargs = model_kwargs(full.with_classes(1000, "test"))
    assert kwargs["num_classes"] == 1000 and kwargs["renorm"]["reach_rmax_max"] == 140000
    assert model_kwargs(full)["num_classes"] == 1000
    with pytest.raises(UserError, match="num_classes is 1000 but the dataset has 10"):
        model_kwargs(full.with_classes(10, "test"))
    with pytest.raises(UserError):
        model_kwargs(demo)


def test_stage_blocks_set_resnet50s_depth_and_are_refused_in_one_sentence_elsewhere(tmp_path):
    config = write_solid_config(str(tmp_path), model={"stage_blocks": "3, 4, 23, 3", "width_multiplier": "0.0625"})
    net = build_model(**model_kwargs(load_settings(config).with_classes(4, "test")))
    assert len(net.block_order) == 33 and net.block_order[-4:] == (  # ResNet-101, blocks named by the same rule
        "conv4_block23", "conv5_block1", "conv5_block2", "conv5_block3")
    for arch, blocks in (("resnet50", "1, 1, 1"), ("concat_resnet", "1, 1, 1, 1")):
        bad = write_solid_config(str(tmp_path), model={"arch": arch, "stage_blocks": blocks})
        with pytest.raises(ConfigError, match=rf"\[model\] stage_blocks sets resnet50's 4 stages, received "
                                              rf"'{blocks}' for arch = {arch}; give 4 counts"):
            load_settings(bad)
