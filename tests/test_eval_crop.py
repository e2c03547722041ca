"""check_accuracy.py --crop: the same epoch scored at another crop (up to the stored eval_resize) reaches the
network as other inputs and gets its own rows in accuracy.csv."""
import shutil

import numpy as np
import pytest

from engine import accuracy_log, scoring
from tests.eval_helpers import (CROP, EVAL_RESIZE, coded_dataset, table_model_dir,  # noqa: F401 (fixtures)
                                write_eval_config)
from utils.errors import UserError


def test_the_same_epoch_at_two_crops_gives_two_rows_and_different_inputs(coded_dataset, tmp_path, table_model_dir,
                                                                          capsys):
    """--crop 20 (the stored eval_resize) beside the store's crop 16: the network receives 20-pixel views, not
    the 16-pixel ones; accuracy.csv keeps one row per crop; an old CSV without the crop column reads as the
    store's crop; a crop above eval_resize is one sentence."""
    import check_accuracy
    from data.sources.val_store import build_store, open_val_store
    index, images = coded_dataset
    build_store(str(tmp_path / "store"), index, CROP, EVAL_RESIZE, num_workers=1, progress=False, say=lambda m: None)
    store = open_val_store(str(tmp_path / "store"))
    seen = {}
    for crop in (None, EVAL_RESIZE):
        batches = []
        scoring.evaluate_epoch(lambda b: batches.append(np.array(b)) or np.full((len(b), 3), 1 / 3, np.float32),
                               store, 10, epoch=0, show_progress=False, crop=crop)
        seen[crop] = np.concatenate(batches)
    assert seen[None].shape == (20, CROP, CROP, 3) and seen[EVAL_RESIZE].shape == (20, EVAL_RESIZE, EVAL_RESIZE, 3)
    first = images[store.classes[store.labels[0]]]
    np.testing.assert_array_equal(seen[EVAL_RESIZE][0], first[:EVAL_RESIZE, :EVAL_RESIZE])  # top-left at 20
    config = write_eval_config(tmp_path, tmp_path / "store")
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(table_model_dir, run / "0" / "saved_model")
    (run / "accuracy.csv").write_text("epoch,protocol,top1,top5,images,weights\n3,10,50.0,90.0,2,raw\n")  # old file
    argv = ["--run_folder=tiny", "--epoch_start=0", "--epoch_end=1", f"--config={config}", "--timeout=5"]
    for extra in ([], [f"--crop={EVAL_RESIZE}"], ["--views=1", f"--crop={EVAL_RESIZE}"]):
        assert check_accuracy.main(argv + extra) == 0
    rows = accuracy_log.read_rows(str(run / "accuracy.csv"))
    assert [(r["epoch"], r["protocol"], r["crop"]) for r in rows] == \
        [(0, 1, EVAL_RESIZE), (0, 10, CROP), (3, 10, CROP), (0, 10, EVAL_RESIZE)]
    assert f"10 views at crop {EVAL_RESIZE}" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"--crop must be between 1 and {EVAL_RESIZE}"):
        check_accuracy.main(argv + [f"--crop={EVAL_RESIZE + 1}"])
