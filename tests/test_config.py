"""Config validation: every kind of bad value stops loading with one sentence naming the problem."""
import configparser
import json
import os

import pytest

from settings import MU_SIGMA_FILE, load_settings, scales_of
from utils.config import load_config
from utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.txt")


def write_config(tmp_path, edit=None, text=None, name="config.txt"):
    """Write configs/demo.txt, changed by edit(parser), into tmp_path; return its path."""
    path = tmp_path / name
    if text is None:
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str
        parser.read(DEMO)
        if edit:
            edit(parser)
        with open(path, "w") as f:
            parser.write(f)
    else:
        path.write_text(text)
    return str(path)


def load_error(tmp_path, edit=None, text=None):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, edit, text))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_shipped_configs_load():
    full = load_config(os.path.join(ROOT, "config.txt"))
    demo = load_config(DEMO)
    assert full.train.N == 1281167 and full.preprocess_val.N == 50000
    assert scales_of(full.images)[0] == 256 and scales_of(full.images)[-1] == 480 and len(scales_of(full.images)) == 33
    assert demo.images.crop_size <= demo.images.scale_min


def test_paths_are_relative_to_the_config_folder(tmp_path, monkeypatch):
    path = write_config(tmp_path, lambda p: p.set("preprocess", "ImageNet_folder", "data/imagenet"))
    monkeypatch.chdir("/")
    cfg = load_config(path)
    assert cfg.preprocess.ImageNet_folder == str(tmp_path / "data" / "imagenet")


def test_missing_key(tmp_path):
    message = load_error(tmp_path, lambda p: p.remove_option("train", "sgd_momentum"))
    assert "missing key 'sgd_momentum'" in message and "[train]" in message


def test_unknown_key(tmp_path):
    message = load_error(tmp_path, lambda p: p.set("train", "sgd_momentun", "0.9"))
    assert "unknown key 'sgd_momentun'" in message and "[train]" in message


def test_a_key_under_another_section_names_the_section_it_belongs_in(tmp_path):
    message = load_error(tmp_path, lambda p: p.set("schedule", "ema_decay", "0.999"))
    assert message.endswith("unknown key 'ema_decay' in [schedule]; it belongs in [train]: move the line there.")


def test_a_negative_alpha_is_refused_naming_its_lower_bound_only(tmp_path):
    message = load_error(tmp_path, lambda p: p.set("train", "mixup_alpha", "-1"))
    assert message.endswith("[train] mixup_alpha must be a number >= 0.0, received '-1'.")


def test_the_seeds_preprocess_N_is_refused_with_where_it_lives(tmp_path):
    message = load_error(tmp_path, lambda p: p.set("preprocess", "N", "50000"))
    assert "[preprocess] N" in message and "lives in [preprocess_val] N" in message and message.endswith(".")


def test_unknown_section(tmp_path):
    message = load_error(tmp_path, lambda p: p.add_section("trian"))
    assert "unknown section [trian]" in message


def test_wrong_type(tmp_path):
    message = load_error(tmp_path, lambda p: p.set("train", "buffer_size", "ten"))
    assert "[train] buffer_size" in message and "an integer" in message and "'ten'" in message


def test_out_of_range(tmp_path):
    message = load_error(tmp_path, lambda p: p.set("train", "sgd_momentum", "1.5"))
    assert "[train] sgd_momentum" in message and "'1.5'" in message


def test_bad_value_in_my_sections(tmp_path):
    message = load_error(tmp_path, lambda p: p.set("preprocess", "jpeg_quality", "101"))
    assert "[preprocess] jpeg_quality" in message
    message = load_error(tmp_path, lambda p: p.set("preprocess_val", "chunk_images", "0"))
    assert "[preprocess_val] chunk_images" in message
    message = load_error(tmp_path, lambda p: p.set("get_mu_sigma", "max_images", "-1"))
    assert "[get_mu_sigma] max_images" in message


def test_bad_cross_key(tmp_path):
    message = load_error(tmp_path, lambda p: p.set("images", "crop_size", "80"))
    assert "crop_size (80)" in message and "scale_min" in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.txt"))


def test_not_ini(tmp_path):
    assert "not valid INI" in load_error(tmp_path, text="this is not ini\n")


def test_auto_mu_sigma_needs_the_stats_file(tmp_path):
    path = write_config(tmp_path, lambda p: p.set("get_mu_sigma", "path_to_save", "stats"))
    with pytest.raises(ConfigError, match="run get_mu_sigma.py first"):
        load_settings(path)
    assert load_settings(path, stats=False).mu is None  # the scripts that do not normalise leave it unresolved
    os.makedirs(tmp_path / "stats")
    (tmp_path / "stats" / MU_SIGMA_FILE).write_text(json.dumps({"mu": [0.5, 0.4, 0.3], "sigma": [0.2] * 3}))
    settings = load_settings(path)
    assert (settings.mu, settings.sigma) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    assert settings.autos[:2] == ("utils.mu_0", "utils.mu_1") and "mu_0 = 0.5" in settings.resolved_text()
