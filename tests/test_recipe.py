"""Label smoothing, the weight EMA and mixup/cutmix (engine/mixing.py, engine/ema.py, their trainer hooks)."""
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from engine import ema, mixing
from tests.fake_trainer import FakeReader, make_trainer
from tests.helpers import stop_process, write_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
K = 5


# ----------------------------------------------------------------------------
# Label smoothing
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("e", [0.0, 0.1, 0.35])
def test_label_smoothing_equals_keras_categorical_crossentropy(e):
    import keras
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (16, K)).astype(np.float32)
    labels = rng.integers(0, K, 16)
    recipe = mixing.DeviceRecipe(mixing.MixConfig(label_smoothing=e), K, seed=0)
    ours = recipe.per_example_loss(tf.constant(labels, tf.int32), tf.constant(logits)).numpy()
    keras_loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=e, reduction=None)
    theirs = np.asarray(keras_loss(np.eye(K, dtype=np.float32)[labels], logits))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Mixup / cutmix
# ----------------------------------------------------------------------------

def numpy_targets(labels, lam, e):
    """timm's mixup_target in numpy."""
    off = e / K
    y = np.full((len(labels), K), off, np.float64)
    y[np.arange(len(labels)), labels] = 1 - e + off
    return y * lam + y[::-1] * (1 - lam)


def test_mixup_images_and_targets_equal_a_numpy_reference_for_given_draws():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 8, 10, 3)).astype(np.float32)
    labels = rng.integers(0, K, 6)
    lam = np.float32(0.3)
    mixed = mixing.mix_images(tf.constant(x), lam, mixing.MIXUP, tf.zeros([4], tf.int32)).numpy()
    np.testing.assert_allclose(mixed, x * lam + x[::-1] * (np.float32(1) - lam), rtol=1e-6, atol=1e-6)
    targets = mixing.soft_targets(tf.constant(labels), K, 0.1, lam).numpy()
    np.testing.assert_allclose(targets, numpy_targets(labels, 0.3, 0.1), atol=1e-6)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)


def test_cutmix_images_and_targets_equal_a_numpy_reference_for_given_draws():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 12, 9, 3)).astype(np.float32)
    labels = rng.integers(0, K, 4)
    yl, yh, xl, xh = 2, 7, 3, 9
    lam = 1 - (yh - yl) * (xh - xl) / (12 * 9)
    mixed = mixing.mix_images(tf.constant(x), np.float32(lam), mixing.CUTMIX, tf.constant([yl, yh, xl, xh])).numpy()
    expected = x.copy()
    expected[:, yl:yh, xl:xh] = x[::-1, yl:yh, xl:xh]
    np.testing.assert_array_equal(mixed, expected)
    np.testing.assert_allclose(mixing.soft_targets(tf.constant(labels), K, 0.0, np.float32(lam)).numpy(),
                               numpy_targets(labels, lam, 0.0), atol=1e-6)


def test_cutmix_box_area_matches_the_lambda_it_reports():
    config = mixing.MixConfig(cutmix_alpha=1.0)
    modes = set()
    for batch in range(60):
        lam, mode, (yl, yh, xl, xh) = mixing.draw(config, 3, 0, batch, 24, 40)
        modes.add(int(mode))
        if mode == mixing.CUTMIX:
            assert 0 <= yl <= yh <= 24 and 0 <= xl <= xh <= 40
            assert lam == pytest.approx(1 - (yh - yl) * (xh - xl) / (24 * 40), abs=1e-6)
            # The mask the device builds covers exactly that area.
            x = np.zeros((2, 24, 40, 1), np.float32)
            x[1] = 1.0
            mixed = mixing.mix_images(tf.constant(x), lam, mode, tf.constant([yl, yh, xl, xh])).numpy()
            assert mixed[0].mean() == pytest.approx(1 - lam, abs=1e-6)
    assert modes == {mixing.CUTMIX}


def test_draws_derive_from_seed_epoch_and_batch_and_follow_the_probabilities():
    both = mixing.MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.5, switch_prob=0.5)
    draws = [mixing.draw(both, 7, 2, b, 32, 32) for b in range(400)]
    again = [mixing.draw(both, 7, 2, b, 32, 32) for b in range(400)]
    for a, b in zip(draws, again):
        assert a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert mixing.draw(both, 7, 3, 0, 32, 32)[0] != mixing.draw(both, 7, 2, 0, 32, 32)[0] or \
        mixing.draw(both, 8, 2, 1, 32, 32)[0] != mixing.draw(both, 7, 2, 1, 32, 32)[0]
    modes = np.array([int(d[1]) for d in draws])
    assert 0.4 < np.mean(modes == mixing.NONE) < 0.6  # mix_prob 0.5
    assert 0.3 < np.mean(modes[modes != mixing.NONE] == mixing.CUTMIX) < 0.7  # switch_prob 0.5
    never = mixing.MixConfig(mixup_alpha=0.2, mix_prob=0.0)
    assert all(mixing.draw(never, 0, 0, b, 8, 8)[0] == 1.0 for b in range(50))


def test_no_mix_leaves_the_images_untouched():
    x = np.random.default_rng(4).normal(size=(3, 5, 5, 3)).astype(np.float32)
    out = mixing.mix_images(tf.constant(x), np.float32(1.0), mixing.NONE, tf.zeros([4], tf.int32)).numpy()
    np.testing.assert_array_equal(out, x)


# ----------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------

def tiny_net():
    from model import build_model  # one block per stage: every kind of layer and statistic, a quarter of the trace
    return build_model(num_classes=3, width_multiplier=0.0625, seed=0, stage_blocks=(1, 1, 1, 1))


def test_device_ema_equals_a_numpy_ema_over_the_same_steps():
    net = tiny_net()
    # Decay 0.3 with the warm-up: (1+t)/(10+t) = 0.1, 0.18, 0.25 for t = 0..2, then 0.3 from t = 3 on.
    weights = ema.WeightEMA(net, tiny_net(), decay=0.3, warmup=True)
    variables = list(net.trainable_variables) + list(net.statistics())
    assert any(not v.trainable for v in variables)  # the moving statistics take part
    reference = [v.numpy().astype(np.float64) for v in variables]
    rng = np.random.default_rng(5)
    steps = [[rng.normal(0, 0.1, v.shape).astype(np.float32) for v in variables] for _ in range(5)]

    @tf.function
    def step(t, deltas):
        for v, delta in zip(variables, deltas):
            v.assign_add(delta)
        weights.update(t)

    for t, deltas in enumerate(steps):
        step(tf.constant(t, tf.int64), deltas)
        d = min(0.3, (1 + t) / (10 + t))
        reference = [d * r + (1 - d) * v.numpy() for r, v in zip(reference, variables)]
    for (_, shadow), expected in zip(weights.pairs, reference):
        np.testing.assert_allclose(shadow.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=shadow.name)
    assert float(ema.WeightEMA.decay_at(types.SimpleNamespace(decay=0.3, warmup=False), 0)) == pytest.approx(0.3)


# ----------------------------------------------------------------------------
# The trainer's step
# ----------------------------------------------------------------------------

def test_with_every_feature_off_the_step_is_byte_for_byte_the_plain_step(tmp_path):
    """Today's step written out (sparse cross-entropy + L2, SGD), against the trainer with the new keys at 0."""
    import keras
    from model import build_model, model_kwargs
    from model.preprocessing import to_model_input
    trainer = make_trainer(tmp_path, "off", label_smoothing=0, ema_decay=0, mixup_alpha=0, cutmix_alpha=0)
    assert trainer.ema is None and not trainer.recipe.active
    assert trainer.recipe.step_args(0, 0, (8, 32, 32, 3)) == ()
    keras.utils.set_random_seed(trainer.settings.train.seed)
    net = build_model(**model_kwargs(trainer.settings))
    opt = keras.optimizers.SGD(learning_rate=0.005, momentum=0.9)
    opt.build(net.trainable_variables)

    @tf.function
    def plain_step(images, labels, lighting):
        with tf.GradientTape() as tape:
            logits = net(to_model_input(images, lighting, trainer.mu, trainer.sigma), training=True)
            cross_entropy = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=labels, logits=logits)) / 8.0
            loss = cross_entropy + net.regularization_loss()
        opt.apply_gradients(zip(tape.gradient(loss, net.trainable_variables), net.trainable_variables))
        net.train_step.assign_add(1)

    for b in range(2):
        batch = trainer.reader.read(0, b)
        plain_step(tf.constant(batch.images), tf.constant(batch.labels), tf.constant(batch.lighting))
    trainer.train_epoch(0)
    for ours, plain in zip(trainer.net.variables, net.variables):
        np.testing.assert_array_equal(ours.numpy(), plain.numpy(), err_msg=ours.name)


RECIPE = dict(label_smoothing=0.1, mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5)


def timm_draw(seed, epoch, batch, height, width):
    """timm's batch-mode Mixup draws written out from the batch's own generator (seed, epoch, batch, the
    mixing stream): ('mixup' or 'cutmix', lambda, box or None). The cutmix box comes from the Beta draw
    (timm's rand_bbox, then correct_lam), so a box that only matched the lambda it reports would differ."""
    from data.random_streams import MIXING_STREAM
    rng = np.random.default_rng([seed, epoch, batch, MIXING_STREAM])
    assert rng.random() < RECIPE["mix_prob"]
    cut = rng.random() < RECIPE["switch_prob"]
    alpha = RECIPE["cutmix_alpha"] if cut else RECIPE["mixup_alpha"]
    beta = rng.beta(alpha, alpha)
    if not cut:
        return "mixup", beta, None
    ratio = np.sqrt(1.0 - beta)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.integers(0, height), rng.integers(0, width)
    yl, yh = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    xl, xh = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return "cutmix", 1.0 - (yh - yl) * (xh - xl) / (height * width), (yl, yh, xl, xh)


def reference_loss_and_gradients(net, x, labels, kind, lam, box, smoothing=RECIPE["label_smoothing"]):
    """The recipe's loss written in NumPy and plain TensorFlow: the input mixed with its reversed batch, the
    smoothed one-hot targets mixed by lambda, mean cross-entropy of log_softmax; gradients by a tape over the
    network's own forward (its statistic updates held back, so the real step starts from the same state)."""
    from model.batch_renorm import deferred_statistics
    mixed = x.copy()
    if kind == "mixup":
        mixed = lam * x + (1.0 - lam) * x[::-1]
    elif kind == "cutmix":
        yl, yh, xl, xh = box
        mixed[:, yl:yh, xl:xh] = x[::-1, yl:yh, xl:xh]
    onehot = np.eye(K_STEP)[labels]
    smooth = onehot * (1.0 - smoothing) + smoothing / K_STEP
    targets = (lam * smooth + (1.0 - lam) * smooth[::-1]).astype(np.float32)
    with tf.GradientTape() as tape, deferred_statistics():
        logits = net(tf.constant(mixed.astype(np.float32)), training=True)
        loss = tf.reduce_mean(-tf.reduce_sum(targets * tf.nn.log_softmax(logits), axis=-1))
    return float(loss), [g.numpy() for g in tape.gradient(loss, net.trainable_variables)]


K_STEP = 4
STEP_TOLERANCE = 2e-5  # of the largest gradient entry; measured 2.4e-6 (cutmix), 1.7e-6 (mixup): float32 rounding


def test_the_recipe_step_equals_an_independent_reference_from_the_same_draws(tmp_path):
    """One real train step with label smoothing, mixup or cutmix (one batch each), SGD without momentum at
    lr 1: the weights move by minus the reference gradient, and the step reports the reference loss."""
    from engine.trainer import Trainer
    from model.preprocessing import to_model_input
    config = write_train_config(
        str(tmp_path), str(tmp_path / "unused"),
        train={**{k: str(v) for k, v in RECIPE.items()}, "ema_decay": "0", "sgd_momentum": "0"},
        model={"arch": "concat_resnet", "normalization": "batch_norm", "width_multiplier": "0.0625",
               "zero_init_last_gamma": "false"},
        l2={"l2_penalty": "0"})
    from settings import load_settings
    reader = FakeReader(steps=1, batch=8, crop=16, classes=K_STEP)
    os.makedirs(tmp_path / "run")
    trainer = Trainer(load_settings(config).with_classes(K_STEP, "test"), reader, str(tmp_path / "run"), 8)
    seed, variables = trainer.settings.train.seed, trainer.net.trainable_variables
    draws = {}
    for b in range(200):  # epoch 0's first mixup batch and first cutmix batch that mix well (Beta(0.4) is
        kind, lam, box = timm_draw(seed, 0, b, 16, 16)  # mostly near 0 or 1)
        if 0.2 < lam < 0.8:
            draws.setdefault(kind, (b, lam, box))
    assert set(draws) == {"mixup", "cutmix"}
    batch = reader.read(0, 0)
    x = to_model_input(batch.images, batch.lighting, trainer.mu, trainer.sigma).numpy()
    for kind, (b, lam, box) in sorted(draws.items()):
        args = trainer.recipe.step_args(0, b, batch.images.shape)  # what train_epoch passes for batch b
        assert float(args[0]) == pytest.approx(lam, abs=1e-6)
        if box is not None:
            assert args[2].numpy().tolist() == list(box)
        loss, grads = reference_loss_and_gradients(trainer.net, x, batch.labels, kind, lam, box)
        ignored, ignored_grads = reference_loss_and_gradients(trainer.net, x, batch.labels, "none", 1.0, None)
        before = [v.numpy() for v in variables]
        outputs = trainer._train_step(batch.images, batch.labels, batch.lighting, tf.constant(1.0), *args)
        moved = [b - v.numpy() for b, v in zip(before, variables)]  # lr 1, no momentum: the gradient
        scale = max(float(np.max(np.abs(g))) for g in grads)
        error = max(float(np.max(np.abs(m - g))) for m, g in zip(moved, grads)) / scale
        ignoring = max(float(np.max(np.abs(g - h))) for g, h in zip(grads, ignored_grads)) / scale
        print(f"{kind}: lambda {lam:.4f}, loss {loss:.6f} vs step {float(outputs[0]):.6f}, gradient error "
              f"{error:.2e} of the largest entry; a step ignoring the draws would be {ignoring:.2e} away")
        assert float(outputs[0]) == pytest.approx(loss, rel=1e-5), kind
        assert error <= STEP_TOLERANCE, (kind, error)
        # The checks can fail: a step that ignored the draws is far outside both tolerances.
        assert ignoring > 100 * STEP_TOLERANCE and abs(ignored - loss) > 10 * 1e-5 * loss, kind


def test_a_resumed_runs_ema_equals_the_uninterrupted_ones(tmp_path):
    """The run trains epochs 0 and 1; its resumed twin restores epoch 0's checkpoint into the same trainer
    (whose EMA, weights and slots have moved on by an epoch: any of them missing from the checkpoint shows)
    and retrains epoch 1. One trainer: a second one paid its own trace, half of the test's time
    (measured 12-25 s with two, 6-11 s with one)."""
    from engine import run_folder
    features = dict(label_smoothing=0.1, ema_decay=0.5, ema_warmup="true", mixup_alpha=0.4, cutmix_alpha=1.0)
    trainer = make_trainer(tmp_path, "whole", **features)
    trainer.train_epoch(0)
    prefix = run_folder.checkpoint_prefix(str(tmp_path / "epoch0"))
    trainer.epoch_var.assign(0)
    trainer.checkpoint.write(prefix)
    trainer.train_epoch(1)
    whole_ema = [(s.name, s.numpy()) for _, s in trainer.ema.pairs]
    moved = sum(not np.array_equal(v.numpy(), s.numpy()) for v, s in trainer.ema.pairs)
    assert moved > len(trainer.ema.pairs) // 2  # the average lags the weights: it is not a copy
    whole_net = [(v.name, v.numpy()) for v in trainer.net.variables]
    trainer.restore(prefix, expected_epoch=0)
    trainer.train_epoch(1)
    for (name, a), (_, b) in zip(whole_ema, trainer.ema.pairs):
        np.testing.assert_array_equal(a, b.numpy(), err_msg=name)
    for (name, a), b in zip(whole_net, trainer.net.variables):
        np.testing.assert_array_equal(a, b.numpy(), err_msg=name)


# ----------------------------------------------------------------------------
# End to end: producer + train.py + check_accuracy.py --weights ema
# ----------------------------------------------------------------------------

E2E_EPOCHS = 1  # of 32 steps: each epoch's save (two SavedModel exports) costs ~5 s, so one epoch, not 2 of 16
E2E_BATCH = 16
HUES = ((200, 40, 40), (40, 170, 40), (40, 60, 210), (190, 190, 60))  # class k: noisy pictures of this colour


def colour_dataset(root, train_per_class=128, val_per_class=10):
    """A 4-class set a 4-channel-wide network learns in a few dozen steps (the demo's shapes take thousands):
    each image is its class's colour under noise and a random brightness."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for k, hue in enumerate(HUES):
            folder = os.path.join(root, split, f"n{k:08d}")
            os.makedirs(folder)
            for i in range(count):
                h, w = rng.integers(40, 57, 2)
                pixels = np.asarray(hue) * rng.uniform(0.6, 1.2) + rng.normal(0, 40, (h, w, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.JPEG"))
    return root


def test_a_small_run_with_every_feature_on_learns_and_its_ema_evaluates(tmp_path):
    import check_accuracy
    import train
    from engine import accuracy_log, run_folder
    data = colour_dataset(str(tmp_path / "imagenet"))
    config = write_train_config(
        str(tmp_path), data,
        preprocess_val={"ImageNet_folder": data, "path_to_save": str(tmp_path / "val")},
        train={"label_smoothing": "0.1", "ema_decay": "0.9", "ema_warmup": "true", "mixup_alpha": "0.2",
               "cutmix_alpha": "1.0", "mix_prob": "0.5", "deterministic": "false"},
        schedule={"type": "linear", "base_lr": "0.05", "warmup_epochs": "0.25", "warmup_start_factor": "0.1"},
        model={"width_multiplier": "0.0625"},
        # 32 steps: the moving statistics must settle within them for inference to work (0.99: 27% of the way).
        batch_renorm={"moving_avgs_momentum": "0.8"})
    subprocess.run([PY, "preprocess_val.py", f"--config={config}"], cwd=ROOT, check=True, capture_output=True)
    steps = ["--epoch_start=0", f"--epoch_end={E2E_EPOCHS}", f"--batch_size={E2E_BATCH}"]
    producer = subprocess.Popen([PY, "runtime_preprocessing.py", "--config", config, "--no_progress", *steps],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # train.py and check_accuracy.py in this process (nothing here needs a process of their own: no kill, no
    # exit code, no device set up before TensorFlow loads): each new interpreter importing TensorFlow cost 5 to
    # 11 s; check_accuracy in process costs ~2 s.
    sigterm = signal.getsignal(signal.SIGTERM)  # train.py turns SIGTERM into an exit; pytest's is given back
    try:
        assert train.main(["--config", config, "--run_folder=R", *steps]) == 0
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        stop_process(producer)
    run = os.path.join(str(tmp_path), "runs", "R")
    last = os.path.join(run, str(E2E_EPOCHS - 1))
    assert sorted(os.listdir(last)) == ["checkpoint", "config.txt", "saved_model", "saved_model_ema"]
    check = [f"--config={config}", "--run_folder=R", "--views=1", f"--epoch_start={E2E_EPOCHS - 1}",
             f"--epoch_end={E2E_EPOCHS}", "--timeout=5"]
    for weights in ("raw", "ema"):
        assert check_accuracy.main(check + [f"--weights={weights}"]) == 0
    rows = accuracy_log.read_rows(os.path.join(run, "accuracy.csv"))
    assert [(r["epoch"], r["weights"]) for r in rows] == [(E2E_EPOCHS - 1, "raw"), (E2E_EPOCHS - 1, "ema")]
    assert rows[1]["images"] == 40 and rows[1]["top1"] >= 50.0, rows  # chance is 25%
    assert run_folder.complete_epochs(run) == list(range(E2E_EPOCHS))


# ----------------------------------------------------------------------------
# accuracy.csv keeps raw and EMA rows apart
# ----------------------------------------------------------------------------

def test_accuracy_csv_keeps_raw_and_ema_rows_apart_and_reads_old_files_as_raw(tmp_path):
    from engine import accuracy_log, evaluate, scoring
    run = str(tmp_path / "run")
    os.makedirs(run)
    with open(os.path.join(run, "accuracy.csv"), "w") as f:  # written before the weights column existed
        f.write("epoch,protocol,top1,top5,images\n0,10,40.0,80.0,400\n")
    for epoch, weights, top1 in ((1, "raw", 50.0), (0, "ema", 42.0), (1, "ema", 55.0), (1, "raw", 51.0)):
        accuracy_log.record(run, scoring.EpochResult(epoch, 10, top1, 90.0, 400, 1.0, weights=weights))
    rows = accuracy_log.read_rows(os.path.join(run, "accuracy.csv"))
    assert [(r["weights"], r["epoch"], r["top1"]) for r in rows] == [
        ("raw", 0, 40.0), ("raw", 1, 51.0), ("ema", 0, 42.0), ("ema", 1, 55.0)]
    assert accuracy_log.first_missing_epoch(run, 10, 3, "raw") == 2
    assert accuracy_log.first_missing_epoch(tmp_path / "run", 1, 3, "ema") == 0
    assert "EMA weights" in evaluate.result_line(scoring.EpochResult(1, 10, 55.0, 90.0, 400, 1.0, weights="ema"))


def test_ema_weights_of_an_epoch_trained_without_ema_are_one_clear_sentence(tmp_path):
    from engine import model_wait, run_folder
    from utils.errors import UserError
    epoch = tmp_path / "run" / "0"
    os.makedirs(epoch / "saved_model")
    os.makedirs(os.path.dirname(run_folder.checkpoint_prefix(str(epoch))))
    open(run_folder.checkpoint_prefix(str(epoch)) + ".index", "w").close()
    (epoch / "config.txt").write_text("")
    with pytest.raises(UserError, match=r"no saved_model_ema/.*ema_decay = 0.*--weights raw"):
        model_wait.wait_for_model(str(tmp_path / "run"), 0, timeout=5, weights="ema", load=lambda p: None)
