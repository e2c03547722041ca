"""Gradient accumulation ([train] accumulation_steps): one update per k buffer batches, equal to an update with
the mean of the k micro-batch gradients; a run killed mid-group resumes bit-identically; a non-finite
micro-batch skips its whole group.

In-process trainers on one device (crop 32, width 0.0625, batch 8), the way tests/test_recipe.py builds them.
"""
import numpy as np
import pytest
import tensorflow as tf

from engine import run_folder
from tests.fake_trainer import FakeReader, make_trainer

K = 2


def test_the_accumulated_update_equals_one_update_with_the_mean_of_the_micro_batch_gradients(tmp_path):
    """Reference: the same network and SGD, each micro-batch's gradient computed one by one (its batch-renorm
    statistics updated by its own forward, as the trainer commits them per micro-batch), then one
    apply_gradients of their mean."""
    import keras
    from model import build_model, model_kwargs
    from model.preprocessing import to_model_input
    reader = FakeReader(steps=K)
    trainer = make_trainer(tmp_path, "accumulated", reader=reader, accumulation_steps=K)
    keras.utils.set_random_seed(trainer.settings.train.seed)
    net = build_model(**model_kwargs(trainer.settings))
    for ours, theirs in zip(trainer.net.variables, net.variables):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    lr = trainer.schedule(0)
    opt = keras.optimizers.SGD(learning_rate=lr, momentum=trainer.settings.train.sgd_momentum)
    opt.build(net.trainable_variables)

    @tf.function
    def gradients(images, labels, lighting):
        with tf.GradientTape() as tape:
            logits = net(to_model_input(images, lighting, trainer.mu, trainer.sigma), training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)) \
                + net.regularization_loss()
        net.train_step.assign_add(1)
        return tape.gradient(loss, net.trainable_variables)

    micro = [gradients(tf.constant(b.images), tf.constant(b.labels), tf.constant(b.lighting))
             for b in (reader.read(0, i) for i in range(K))]
    mean = [tf.add_n(list(g)) / K for g in zip(*micro)]
    opt.apply_gradients(zip(mean, net.trainable_variables))
    before = [v.numpy() for v in trainer.net.trainable_variables]
    trainer.train_epoch(0)
    assert int(trainer.optimizer.iterations.numpy()) == 1 and trainer.global_step() == K
    worst = 0.0
    for ours, theirs in zip(trainer.net.variables, net.variables):
        a, b = ours.numpy(), theirs.numpy()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=ours.name)
        worst = max(worst, float(np.abs(a - b).max()))
    moved = sum(not np.array_equal(v.numpy(), s) for v, s in zip(trainer.net.trainable_variables, before))
    assert moved > len(before) // 2  # the update happened
    print(f"largest difference from the one-by-one mean: {worst:.3g}")
    sums = trainer._train_step.sums
    assert len(sums) == len(trainer.net.trainable_variables)
    assert all(float(tf.reduce_max(tf.abs(s))) == 0.0 for s in sums)  # emptied after the update


def everything(trainer):
    """Every variable the checkpoint and the exports hold: weights, statistics, optimizer slots, EMA."""
    return list(trainer.net.variables) + list(trainer.optimizer.variables) + list(trainer.ema.net.variables)


class KilledReader(FakeReader):
    """FakeReader that raises right after batch `kill_at` of epoch `kill_epoch` was trained (mid-group)."""

    def __init__(self, kill_epoch, kill_at, **kw):
        super().__init__(**kw)
        self.kill_epoch, self.kill_at = kill_epoch, kill_at

    def report_progress(self, epoch, done):
        if (epoch, done) == (self.kill_epoch, self.kill_at + 1):
            self.kill_epoch = None  # once
            raise KeyboardInterrupt("killed mid-accumulation")


def test_a_run_killed_between_micro_batches_resumes_bit_identically(tmp_path):
    """3 batches per epoch, k = 2: groups [0, 1] and the short [2]. The twin is killed after batch 0 of
    epoch 1 (the first micro-batch of a group, its gradient in the accumulator), restores epoch 0's
    checkpoint into the same trainer (its accumulator not empty: stricter than a new process) and
    retrains epoch 1."""
    features = dict(accumulation_steps=K, ema_decay=0.5, ema_warmup="true")
    whole = make_trainer(tmp_path, "whole", reader=FakeReader(steps=3), **features)
    whole.train_epoch(0)
    prefix = run_folder.checkpoint_prefix(str(tmp_path / "epoch0"))
    whole.epoch_var.assign(0)
    whole.checkpoint.write(prefix)
    whole.train_epoch(1)
    assert int(whole.optimizer.iterations.numpy()) == 4 and whole.global_step() == 6  # 2 updates per epoch
    killed = make_trainer(tmp_path, "killed", reader=KilledReader(1, 0, steps=3), **features)
    killed.restore(prefix, expected_epoch=0)
    with pytest.raises(KeyboardInterrupt):
        killed.train_epoch(1)
    assert any(float(tf.reduce_max(tf.abs(s))) > 0 for s in killed._train_step.sums)  # killed mid-group
    killed.restore(prefix, expected_epoch=0)
    killed.train_epoch(1)
    for a, b in zip(everything(whole), everything(killed)):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def test_a_non_finite_micro_batch_skips_its_whole_group_and_equals_the_twin_that_skips_it_by_construction(tmp_path):
    """4 batches, k = 2: +inf in the gradient of batch 2 (the first of group [2, 3]) leaves every variable
    finite, applies only group [0, 1], counts both batches of the group as skipped, and equals bit for bit the
    twin whose batch 2 is declared non-finite with nothing non-finite in it."""
    from engine.numerics import Injection
    runs = {}
    for name, inject in (("injected", Injection(gradients={2: 0})), ("twin", Injection(skips=(2,)))):
        trainer = make_trainer(tmp_path, name, reader=FakeReader(steps=4), inject=inject, accumulation_steps=K)
        runs[name] = (trainer, trainer.train_epoch(0))
    (injected, summary), (twin, _) = runs["injected"], runs["twin"]
    assert int(injected.optimizer.iterations.numpy()) == 1 and summary["skipped_steps"] == 2
    state = lambda t: list(t.net.variables) + list(t.optimizer.variables)  # noqa: E731
    assert all(np.all(np.isfinite(v.numpy())) for v in state(injected))
    for a, b in zip(state(injected), state(twin)):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
