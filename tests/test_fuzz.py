"""Bad input, generated (hypothesis, bounded examples): config files, image bytes, list files, batch files.

- Config files: keys dropped, values of the wrong type or out of range, unknown keys and sections,
  garbage lines, bytes that are not UTF-8. load_config and the checks the scripts run next
  (scales, crop schedule, learning-rate schedule, model kwargs, augmentation recipe) either pass or
  raise UserError with one line ending in '.'; scripts exit 2 with a single 'error:' line.
- Image bytes: truncated or bit-flipped JPEG/PNG files are decoded or raise BadImageError on every
  decode path; in a class folder the batch builder decodes or skips and logs them, and every
  image in a batch carries the label of the file it was cut from.
- train.txt: a path that leaves the dataset folder ('../', absolute, '~') is refused; whatever the
  lines, the index is built or a UserError names the problem.
- Batch files of a foreign writer (dtype, shape, pickled objects, labels) are refused by the reader.
- Safe by default: no allow_pickle=True, shell=True, eval/exec or pickle loading in the code.
"""
import configparser
import dataclasses
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from settings import load_settings
from utils.errors import ConfigError, UserError
from utils.files import atomic_write_text
from utils.schema import SCHEMA
from data.transforms import jpeg_window, scale_crop
from data.buffer import files, protocol, reader as buffer_reader
from data.transforms import images
from data.buffer.builder import BatchBuilder, Recipe
from data.transforms.scale_crop import image_draws
from data.sources.index import load_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.txt")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def one_sentence(error):
    text = str(error)
    assert text and "\n" not in text and text.rstrip().endswith("."), repr(text)
    return text


# ----------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------

def demo_sections():
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(DEMO)
    return {name: dict(parser[name]) for name in parser.sections()}


SECTIONS = demo_sections()
ALL_KEYS = [(section, key) for section, keys in SCHEMA.items() for key in keys]
NUMBERS = st.one_of(st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["1e400", "-0", "0x10", "1_000", "٣", "²", "1.5.2", "", "  ", "inf", "nan"]))
VALUES = st.one_of(NUMBERS, st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"),
                                    max_size=30),
                   st.sampled_from(["true", "auto", "sgd", "0:16, 4:8", "0:8,,", "1:8", "0:999", "64, x", "~", "..",
                                    "/", "%(x)s", "a = b", "[images]"]))
EDITS = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(ALL_KEYS)),
    st.tuples(st.just("set"), st.sampled_from(ALL_KEYS), VALUES),
    st.tuples(st.just("unknown_key"), st.sampled_from(list(SCHEMA)), st.from_regex(r"[a-z_]{1,12}", fullmatch=True)),
    st.tuples(st.just("unknown_section"), st.from_regex(r"[a-z_]{1,12}", fullmatch=True)),
)
RAW_LINES = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40), max_size=3)


def render(sections, extra_lines=(), prefix=""):
    lines = [prefix]
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in keys.items())
    lines.extend(extra_lines)
    return "\n".join(lines) + "\n"


def apply_edits(edits):
    sections = {name: dict(keys) for name, keys in SECTIONS.items()}
    for edit in edits:
        if edit[0] == "drop":
            sections.get(edit[1][0], {}).pop(edit[1][1], None)
        elif edit[0] == "set":
            sections.setdefault(edit[1][0], {})[edit[1][1]] = edit[2]
        elif edit[0] == "unknown_key":
            sections.setdefault(edit[1], {})[edit[2]] = "1"
        else:
            sections.setdefault(edit[1], {})["x"] = "1"
    return sections


def load_and_derive(path):
    """What the scripts do with a config before any real work; only UserError may escape."""
    cfg = load_settings(path, stats=False)
    from engine import schedules
    from model import model_kwargs
    schedules.from_config(cfg.schedule, 16, 5)
    model_kwargs(cfg.with_classes(10, "test"))
    # 'auto' needs get_mu_sigma.py's file (stats=False left it unresolved): give numbers so the recipe is built too
    recipe_settings = cfg if cfg.mu is not None else dataclasses.replace(cfg, mu=(0.5,) * 3, sigma=(0.25,) * 3)
    Recipe.from_settings(recipe_settings, 4)
    return cfg


@FUZZ
@given(edits=st.lists(EDITS, min_size=1, max_size=4), extra=RAW_LINES)
def test_any_config_loads_or_fails_in_one_sentence(tmp_path, edits, extra):
    path = tmp_path / "config.txt"
    path.write_text(render(apply_edits(edits), extra), encoding="utf-8")
    try:
        load_and_derive(str(path))
    except UserError as e:
        one_sentence(e)


@FUZZ
@given(data=st.binary(max_size=64), at=st.integers(0, 2000))
def test_config_with_foreign_bytes_fails_in_one_sentence(tmp_path, data, at):
    text = render(SECTIONS).encode()
    at = min(at, len(text))
    (tmp_path / "config.txt").write_bytes(text[:at] + data + text[at:])
    try:
        load_and_derive(str(tmp_path / "config.txt"))
    except UserError as e:
        one_sentence(e)


def test_known_bad_values_are_refused(tmp_path):
    for section, key, value, expected in [
            ("train", "sleep_time", "inf", "[train] sleep_time must be a number in [0.0, 1e+12], received 'inf'."),
            ("schedule", "warmup_epochs", "nan", "must be a number in [0.0, 1e+12], received 'nan'"),
            ("schedule", "warmup_epochs", "1e308", "must be a number in [0.0, 1e+12], received '1e308'"),
            ("utils", "mu_0", "inf", "[utils] mu_0 must be a number or 'auto', received 'inf'."),
            ("images", "eval_scales_50", "64, 1e999", "must be a comma-separated list of integers"),
            ("train", "buffer_folder", "a\0b", "[train] buffer_folder must be a path")]:
        sections = apply_edits([("set", (section, key), value)])
        (tmp_path / "c.txt").write_text(render(sections))
        with pytest.raises(ConfigError) as err:
            load_settings(str(tmp_path / "c.txt"))
        assert expected in one_sentence(err.value)


@pytest.mark.parametrize("script, args", [
    ("train.py", ["--run_folder=r", "--epoch_start=0", "--epoch_end=1", "--batch_size=8"]),
    ("runtime_preprocessing.py", ["--epoch_start=auto", "--epoch_end=1", "--batch_size=8"]),
])
def test_scripts_exit_2_with_one_error_line_on_a_bad_config(tmp_path, script, args):
    sections = apply_edits([("set", ("train", "buffer_size"), "-3"), ("unknown_key", "images", "crop_sise")])
    (tmp_path / "bad.txt").write_bytes(render(sections, ["continued = a", "  second line"]).encode() + b"\xff\n")
    result = subprocess.run([sys.executable, script, f"--config={tmp_path / 'bad.txt'}", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert "not UTF-8" in lines[0]


# ----------------------------------------------------------------------------
# Image bytes
# ----------------------------------------------------------------------------

def encoded(kind, seed=0, size=(44, 36)):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).resize(size, Image.BILINEAR)  # smooth texture: crops differ, JPEG stays small
    out = io.BytesIO()
    if kind == "png":
        img.save(out, "PNG")
    elif kind == "gray":
        img.convert("L").save(out, "JPEG", quality=90)
    elif kind == "progressive":
        img.save(out, "JPEG", quality=90, progressive=True)
    else:
        img.save(out, "JPEG", quality=90)
    return out.getvalue()


SOURCES = {kind: encoded(kind) for kind in ("jpeg", "progressive", "gray", "png")}
MUTATIONS = st.tuples(
    st.sampled_from(sorted(SOURCES)),
    st.one_of(st.none(), st.floats(0.0, 1.0)),                                      # truncate at this fraction
    st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7)), max_size=8),  # bit flips
)


def mutate(kind, cut, flips):
    data = bytearray(SOURCES[kind])
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    if cut is not None:
        data = data[:int(cut * len(data))]
    return bytes(data)


DECODERS = ["pil"] + (["turbojpeg"] if jpeg_window.get_turbojpeg() is not None else [])


@FUZZ
@given(mutation=MUTATIONS)
def test_damaged_image_bytes_decode_or_raise_bad_image_error_on_every_path(tmp_path, mutation):
    path = str(tmp_path / "n00000001_0.JPEG")
    with open(path, "wb") as f:
        f.write(mutate(*mutation))
    from data.transforms import inception_crop
    from data.transforms import tiny_augment
    attempts = [lambda: images.decode_rgb(path),
                lambda: images.eval_views(np.asarray(images.resize_shorter(images.decode_rgb(path), 18)), 16),
                lambda: inception_crop.augment(path, 16, 0, 0, 3),
                lambda: tiny_augment.training_crop(path, 20, 16, tiny_augment.image_rng(0, 0, 3))]
    attempts += [lambda d=decoder: scale_crop.scale_crop(path, 16, image_draws(0, 0, 3, (18, 22), 0.1), d)
                 for decoder in DECODERS]
    for attempt in attempts:
        try:
            out = attempt()
        except images.BadImageError:
            continue
        out = np.asarray(out)
        assert out.dtype == np.uint8 and out.shape[-1] == 3


@pytest.fixture(scope="module")
def one_image_per_class(tmp_path_factory):
    """train/<wnid>/ with one textured image per class: a label names exactly one file."""
    root = tmp_path_factory.mktemp("classes")
    for k in range(5):
        folder = root / "train" / f"n{k:08d}"
        folder.mkdir(parents=True)
        (folder / f"n{k:08d}_0.JPEG").write_bytes(encoded("jpeg", seed=k + 1))
    return str(root)


@FUZZ
@given(mutation=MUTATIONS, victim=st.integers(0, 4), epoch=st.integers(0, 3))
def test_a_damaged_file_in_a_class_folder_is_decoded_or_skipped_never_mislabelled(one_image_per_class, tmp_path,
                                                                                  caplog, mutation, victim, epoch):
    index = load_index(one_image_per_class, "train")
    clean = index.paths[victim]
    damaged = str(tmp_path / os.path.basename(clean))
    with open(damaged, "wb") as f:
        f.write(mutate(*mutation))
    paths = list(index.paths)
    paths[victim] = damaged
    recipe = Recipe(seed=0, batch_size=5, crop=16, scales=(18, 22), pca_std=0.1, mu=(0.5,) * 3, sigma=(0.25,) * 3,
                    decoder=jpeg_window.resolve_decoder("auto"))
    builder = BatchBuilder(paths, index.labels, recipe)
    caplog.clear()
    out, labels, _ = builder.build(epoch, 0)  # the whole epoch in one batch
    for slot in range(5):
        draws = image_draws(0, epoch, slot, recipe.scales, recipe.pca_std)
        source = paths[int(np.flatnonzero(index.labels == labels[slot])[0])]
        # The crop must be exactly the one cut from the file its label names.
        assert np.array_equal(out[slot], scale_crop.scale_crop(source, 16, draws, recipe.decoder)), slot
    if damaged in builder.skipped.entries:
        assert f"skipping unreadable training image {damaged}" in caplog.text
        assert victim not in labels
    else:
        assert victim in labels


# ----------------------------------------------------------------------------
# List files
# ----------------------------------------------------------------------------

SEGMENTS = st.sampled_from(["..", ".", "imgs", "a.JPEG", "b.png", "sub", "", "~", "x.JPEG"])
LIST_PATHS = st.one_of(st.lists(SEGMENTS, min_size=1, max_size=5).map("/".join),
                       st.lists(SEGMENTS, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s)),
                       st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=20))


@pytest.fixture(scope="module")
def list_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("lists")
    root = base / "data"
    for rel in ("imgs/a.JPEG", "imgs/sub/b.png", "a.JPEG"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(SOURCES["jpeg"])
    (base / "x.JPEG").write_bytes(SOURCES["jpeg"])  # outside the dataset folder
    return str(root)


@FUZZ
@given(rels=st.lists(LIST_PATHS, min_size=1, max_size=4), labels=st.lists(st.sampled_from(["0", "1", "-1", "x", "²",
                                                                                          "--1", "0 0"]), max_size=4))
def test_list_file_paths_never_leave_the_dataset_folder(list_root, rels, labels):
    lines = [f"{rel} {labels[i] if i < len(labels) else '0'}" for i, rel in enumerate(rels)]
    with open(os.path.join(list_root, "train.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    escaping = [rel for rel in rels if rel.strip() and (os.path.isabs(rel.strip()) or not os.path.normpath(
        os.path.join(list_root, rel.strip())).startswith(list_root + os.sep))]
    try:
        index = load_index(list_root, "train")
    except UserError as e:
        one_sentence(e)
        return
    assert not escaping, f"{escaping} was accepted"
    assert all(p.startswith(list_root + os.sep) and os.path.isfile(p) for p in index.paths)


def test_escaping_list_paths_are_named(list_root):
    for rel, expected in [("../x.JPEG", "leaves the dataset folder"), ("imgs/../../x.JPEG", "leaves the dataset"),
                          (os.path.join(os.path.dirname(list_root), "x.JPEG"), "must be relative"),
                          ("~/x.JPEG", "must be relative")]:
        with open(os.path.join(list_root, "train.txt"), "w") as f:
            f.write(f"a.JPEG 0\n{rel} 0\n")
        with pytest.raises(UserError, match=expected):
            load_index(list_root, "train")
    with open(os.path.join(list_root, "train.txt"), "wb") as f:
        f.write(b"a.JPEG 0\n\xff\xfe 0\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_index(list_root, "train")


# ----------------------------------------------------------------------------
# Batch files from a foreign writer
# ----------------------------------------------------------------------------

EXPECTED = {"X": ((4, 16, 16, 3), "uint8"), "Y": ((4,), "int32"), "L": ((4, 3), "float32")}
ARRAYS = st.fixed_dictionaries({kind: st.tuples(
    st.sampled_from([shape, shape[:-1], (8,) + shape[1:], (4, 16, 16, 3), ()]),
    st.sampled_from([dtype, "uint8", "int64", "float32", "float64", "object"]),
    st.integers(-2, 7)) for kind, (shape, dtype) in EXPECTED.items()})


@FUZZ
@given(arrays=ARRAYS)
def test_the_reader_takes_only_batches_of_its_own_format(tmp_path, arrays):
    from tests.helpers import fake_manifest, write_heartbeat, write_solid_config
    import json
    cfg = load_settings(write_solid_config(str(tmp_path), train={"wait_timeout": "0.2"}))
    folder = cfg.train.buffer_folder
    os.makedirs(folder, exist_ok=True)
    manifest = fake_manifest()  # batch 4, crop 16, 5 classes
    atomic_write_text(os.path.join(folder, protocol.MANIFEST), json.dumps(manifest))
    write_heartbeat(folder)
    for kind in ("Y", "L", "X"):
        shape, dtype, value = arrays[kind]
        array = np.full(shape, value).astype(dtype)
        with open(files.batch_file(folder, kind, 0, 0), "wb") as f:
            np.save(f, array, allow_pickle=True)  # a foreign writer may pickle
    own = all(arrays[k][:2] == EXPECTED[k] for k in EXPECTED) and 0 <= arrays["Y"][2] < 5
    reader = buffer_reader.BufferReader(cfg, 4)
    if own:
        batch = reader.read(0, 0)
        assert batch.images.shape == (4, 16, 16, 3) and batch.labels.dtype == np.int32
    else:
        with pytest.raises(UserError) as err:
            reader.read(0, 0)
        assert folder in one_sentence(err.value)


# ----------------------------------------------------------------------------
# Safe by default
# ----------------------------------------------------------------------------

UNSAFE = [r"allow_pickle\s*=\s*True", r"shell\s*=\s*True", r"(?<![\w.])eval\(", r"(?<![\w.])exec\(",
          r"pickle\.loads?\(", r"yaml\.load\(", r"os\.system\(", r"__import__\(\s*[^\"']"]


def test_no_unsafe_calls_in_the_code():
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "demo_data", "demo_runs")]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    for no, line in enumerate(f, 1):
                        if any(re.search(p, line) for p in UNSAFE):
                            found.append(f"{os.path.relpath(path, ROOT)}:{no}: {line.strip()}")
    assert found == []
