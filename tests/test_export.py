"""model/export.py: a SavedModel that loads and classifies without this repository, refusing to overwrite."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from model import build_model, export_saved_model
from tests.helpers import random_images, run_python
from utils.errors import UserError
from utils.files import is_temp_name


LOAD_WITHOUT_REPO = r"""
import json, sys
import numpy as np, tensorflow as tf
assert not any(__import__("os").path.isdir(p + "/model") and __import__("os").path.isfile(p + "/train.py")
               for p in sys.path if p), "the repository is on sys.path"
loaded = tf.saved_model.load("saved")
images = np.load("images.npy", allow_pickle=False)
default = loaded.signatures["serving_default"](images=tf.constant(images))
normalized = loaded.signatures["normalized"](images=tf.constant(np.load("normalized.npy", allow_pickle=False)))
np.save("logits.npy", default["logits"].numpy())
np.save("probabilities.npy", default["probabilities"].numpy())
np.save("normalized_logits.npy", normalized["logits"].numpy())
np.savez("variables.npz", **{v.name: v.numpy() for v in loaded.signatures["normalized"].variables})
print(json.dumps({"mu": loaded.mu.numpy().tolist(), "sigma": loaded.sigma.numpy().tolist()}))
"""


def test_saved_model_round_trip_without_project_code(tmp_path):
    # One block per stage at width 0.0625 keeps every kind of layer and variable; its export took 1.4 s here
    # against 5.7 s for the full depth at width 0.25 (64 px).
    net = build_model(num_classes=5, width_multiplier=0.0625, renorm=dict(momentum=0.0), stage_blocks=(1, 1, 1, 1))
    net(random_images([4, 32, 32, 3]), training=True)  # moving statistics = this batch's: sane logits
    mu, sigma = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    export_saved_model(net, str(tmp_path / "saved"), mu, sigma)
    images = np.random.RandomState(0).randint(0, 256, size=(3, 32, 32, 3)).astype(np.uint8)
    normalized = ((images / 255.0 - np.array(mu)) / np.array(sigma)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "normalized.npy", normalized)
    stored = json.loads(run_python(LOAD_WITHOUT_REPO, cwd=str(tmp_path), with_repo=False))
    with np.load(tmp_path / "variables.npz", allow_pickle=False) as loaded:
        inference_variables = [v for v in net.variables if v is not net.train_step]
        assert sorted(loaded.files) == sorted(v.name for v in inference_variables)
        for v in inference_variables:
            np.testing.assert_array_equal(loaded[v.name], v.numpy())
    # identical weights; logits equal up to float32 rounding (graph vs eager oneDNN kernels; the
    # uint8 signature normalises in float32, numpy above in float64)
    expected = net(tf.constant(normalized), training=False).numpy()
    scale = float(np.abs(expected).max())
    for name in ("normalized_logits.npy", "logits.npy"):
        np.testing.assert_allclose(np.load(tmp_path / name), expected, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(np.load(tmp_path / "probabilities.npy"),
                               tf.nn.softmax(np.load(tmp_path / "logits.npy")).numpy(), atol=1e-6)
    np.testing.assert_allclose(stored["mu"], mu, rtol=1e-6)
    np.testing.assert_allclose(stored["sigma"], sigma, rtol=1e-6)
    with pytest.raises(UserError):
        export_saved_model(net, str(tmp_path / "saved"), mu, sigma)
    assert not [n for n in os.listdir(tmp_path) if is_temp_name(n)]


