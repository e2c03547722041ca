"""inference.py: the same centre crop and top-1 as check_accuracy's 1-view path, names, benchmark figures."""
import json
import os

import numpy as np
import pytest

import inference
from settings import load_settings
from utils.errors import UserError
from data.sources import val_store
from data.sources.index import load_index
from tools.make_demo_dataset import make_dataset, wnid
from tests.helpers import write_solid_config

tf = pytest.importorskip("tensorflow")

CLASSES = 4
CROP, EVAL_RESIZE = 16, 20


class GridModel(tf.Module):
    """A stand-in network whose scores depend on where colours sit in the crop: 2x2 cell means -> linear."""

    def __init__(self):
        super().__init__()
        self.w = tf.constant(np.random.default_rng(0).normal(0, 1, (12, CLASSES)), tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        x = tf.cast(images, tf.float32) / 255.0
        h, w = tf.shape(x)[1] // 2, tf.shape(x)[2] // 2
        cells = [tf.reduce_mean(x[:, i * h:(i + 1) * h, j * w:(j + 1) * w], axis=[1, 2]) for i in (0, 1) for j in (0, 1)]
        features = tf.concat(cells, axis=1)
        logits = 20.0 * (features - tf.reduce_mean(features, axis=1, keepdims=True)) @ self.w
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    data = root / "data"
    make_dataset(str(data), num_classes=CLASSES, train_per_class=2, val_per_class=4, min_side=20, max_side=40)
    (data / "LOC_synset_mapping.txt").write_text("".join(f"{wnid(k)} shape number {k}, a test class\n"
                                                         for k in range(CLASSES)))
    config = write_solid_config(str(root), images={"crop_size": str(CROP), "scale_min": "20", "scale_max": "24",
                                             "eval_resize": str(EVAL_RESIZE)})
    cfg = load_settings(config)
    index = load_index(str(data), "val")
    val_store.build_store(cfg.preprocess_val.path_to_save, index, CROP, EVAL_RESIZE, num_workers=1, progress=False,
                          say=lambda *a: None)
    epoch = root / "runs" / "run" / "0"
    model = GridModel()
    tf.saved_model.save(model, str(epoch / "saved_model"), signatures={"serving_default": model.serve})
    (epoch / "config.txt").write_text("# epoch 0 of run\n" + cfg.resolved_text())  # as the trainer writes it
    return {"root": root, "data": data, "epoch": epoch, "cfg": cfg, "index": index,
            "store": val_store.ValStore(cfg.preprocess_val.path_to_save)}


def test_top1_and_pixels_equal_check_accuracy_centre_crop_path(setup):
    from engine.model_wait import SavedModelPredictor
    store, index = setup["store"], setup["index"]
    saved = str(setup["epoch"] / "saved_model")
    check_accuracy_predict = SavedModelPredictor(tf.saved_model.load(saved))
    predict, outputs = inference.load_predictor(saved, CROP)
    assert outputs == CLASSES
    files = [index.paths[p] for p in store.positions]
    results = dict(inference.classify(predict, files, EVAL_RESIZE, CROP, top=3, batch_images=5))
    tops = set()
    for j, path in enumerate(files):
        view = store.views(j, 1)  # what check_accuracy.py --views 1 feeds the model
        assert np.array_equal(inference.centre_view(path, EVAL_RESIZE, CROP), view[0])
        expected = np.asarray(check_accuracy_predict(view))[0]
        (top1, p1), *_ = results[path]
        assert top1 == int(np.argmax(expected)) and p1 == pytest.approx(float(expected.max()), abs=1e-5)
        tops.add(top1)
    assert len(tops) > 1  # the stand-in model really looks at the pixels
    assert len(files) == len(index) and len(store.meta["skipped"]) == 0


def test_cli_prints_synset_ids_and_names_from_the_epoch_config(setup, capsys):
    folder = setup["data"] / "val" / wnid(1)
    assert inference.main(["--model", str(setup["epoch"]), str(folder), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count(str(folder)) == len(os.listdir(folder))
    assert any(f"  1. {wnid(k)}  shape number {k}, a test class" in out for k in range(CLASSES))
    assert "  2. n" in out and "  3. " not in out and "%" in out


def test_unreadable_image_is_reported_and_others_still_classified(setup, tmp_path):
    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = setup["index"].paths[0]
    predict, _ = inference.load_predictor(str(setup["epoch"] / "saved_model"), CROP)
    results = dict(inference.classify(predict, [str(bad), good], EVAL_RESIZE, CROP))
    assert results[str(bad)].startswith("unreadable") and len(results[good]) == 4


def test_cli_names_the_unreadable_file_and_fails_when_no_input_was_an_image(setup, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(UserError, match=r"none of the 1 input file\(s\) could be read as an image"):
        inference.main(["--model", str(setup["epoch"]), str(text)])
    out = capsys.readouterr().out
    assert out.startswith(f"{text}: unreadable (") and "<file>" not in out and "notes.txt" in out.split("unreadable")[1]
    good = setup["index"].paths[0]
    assert inference.main(["--model", str(setup["epoch"]), str(text), good]) == 0
    assert "warning: 1 of 2 input files could not be read as images" in capsys.readouterr().err


def test_benchmark_reports_median_and_p90(setup, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert inference.main(["--model", str(setup["epoch"] / "saved_model"), "--benchmark", "--repeats", "4",
                           "--warmup", "1", "--batch_sizes", "1,4", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for key in ("end_to_end_batch1", "preprocess_only", "model_only_batch1", "throughput"):
        assert key in figures
    for t in [figures["end_to_end_batch1"], *figures["throughput"].values()]:
        assert 0 < t["median_s"] <= t["p90_s"] and t["runs"] >= 3
    assert set(figures["throughput"]) == {"1", "4"} and figures["image"] == "generated 500x375"
    assert "latency, batch 1, including preprocessing" in capsys.readouterr().out


def test_model_folder_without_saved_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="holds no SavedModel"):
        inference.resolve_model(str(tmp_path))
