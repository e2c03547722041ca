"""Gradient accumulation ([train] accumulation_steps): one update per k buffer batches, equal to an update with
the mean of the k micro-batch gradients; a run killed mid-group resumes bit-identically; a non-finite
micro-batch skips its whole group.

In-process trainers on one device (crop 32, width 0.0625, batch 8), the way tests/test_recipe.py builds them.
Every test trains epochs of 3 batches at k = 2: the groups [0, 1] and the short [2]. One trainer, built and
traced once for the module, serves the tests that need the real step; each starts it from its initial state
(a trainer and its first epoch's two traces cost ~6 s of CPU, each later epoch ~0.1 s).
"""
import numpy as np
import pytest
import tensorflow as tf

from engine import run_folder
from tests.fake_trainer import FakeReader, make_trainer

K = 2
STEPS = 3
GROUPS = ((0, 1), (2,))


class KillableReader(FakeReader):
    """FakeReader that raises once right after batch `kill[1]` of epoch `kill[0]` was trained (mid-group)."""
    kill = None

    def report_progress(self, epoch, done):
        if self.kill is not None and (epoch, done) == (self.kill[0], self.kill[1] + 1):
            self.kill = None
            raise KeyboardInterrupt("killed mid-accumulation")


def initial_checkpoint(trainer, folder):
    """The trainer's state before any step (epoch -1), written to `folder`: restore() starts a test from it."""
    prefix = run_folder.checkpoint_prefix(str(folder))
    trainer.checkpoint.write(prefix)
    return prefix


@pytest.fixture(scope="module")
def accumulating(tmp_path_factory):
    """(trainer, its initial checkpoint): k = 2 with the EMA on, no injection hooks in its step."""
    tmp = tmp_path_factory.mktemp("accumulation")
    trainer = make_trainer(tmp, "shared", reader=KillableReader(steps=STEPS), accumulation_steps=K,
                           ema_decay=0.5, ema_warmup="true")
    return trainer, initial_checkpoint(trainer, tmp / "initial")


def from_the_start(accumulating):
    trainer, initial = accumulating
    trainer.reader.kill = None
    trainer.restore(initial, expected_epoch=-1)
    return trainer


def test_the_accumulated_update_equals_one_update_with_the_mean_of_the_micro_batch_gradients(accumulating):
    """Reference: the same network and SGD, each micro-batch's gradient computed one by one (its batch-renorm
    statistics updated by its own forward, as the trainer commits them per micro-batch), then one
    apply_gradients of their mean per group: / 2 for [0, 1], / 1 for the short [2]."""
    import keras
    from model import build_model, model_kwargs
    from model.preprocessing import to_model_input
    trainer = from_the_start(accumulating)
    keras.utils.set_random_seed(trainer.settings.train.seed)
    net = build_model(**model_kwargs(trainer.settings))
    for ours, theirs in zip(trainer.net.variables, net.variables):  # the restore gave the initial state back
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    opt = keras.optimizers.SGD(learning_rate=trainer.schedule(0), momentum=trainer.settings.train.sgd_momentum)
    opt.build(net.trainable_variables)

    @tf.function
    def gradients(images, labels, lighting):
        with tf.GradientTape() as tape:
            logits = net(to_model_input(images, lighting, trainer.mu, trainer.sigma), training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)) \
                + net.regularization_loss()
        net.train_step.assign_add(1)
        return tape.gradient(loss, net.trainable_variables)

    for group in GROUPS:
        opt.learning_rate = trainer.schedule(group[0])  # one rate per update: the one at its first batch
        micro = [gradients(tf.constant(b.images), tf.constant(b.labels), tf.constant(b.lighting))
                 for b in (trainer.reader.read(0, i) for i in group)]
        mean = [tf.add_n(list(g)) / len(group) for g in zip(*micro)]
        opt.apply_gradients(zip(mean, net.trainable_variables))
    before = [v.numpy() for v in trainer.net.trainable_variables]
    trainer.train_epoch(0)
    assert int(trainer.optimizer.iterations.numpy()) == len(GROUPS) and trainer.global_step() == STEPS
    assert trainer.traces["train_step"] == 2  # accumulate and apply once each: the short group's count is a tensor
    worst = 0.0
    for ours, theirs in zip(trainer.net.variables, net.variables):
        a, b = ours.numpy(), theirs.numpy()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=ours.name)
        worst = max(worst, float(np.abs(a - b).max()))
    moved = sum(not np.array_equal(v.numpy(), s) for v, s in zip(trainer.net.trainable_variables, before))
    assert moved > len(before) // 2  # the updates happened
    print(f"largest difference from the one-by-one means: {worst:.3g}")
    sums = trainer._train_step.sums
    assert len(sums) == len(trainer.net.trainable_variables)
    assert all(float(tf.reduce_max(tf.abs(s))) == 0.0 for s in sums)  # emptied after the update


def everything(trainer):
    """Every variable the checkpoint and the exports hold: weights, statistics, optimizer slots, EMA."""
    return list(trainer.net.variables) + list(trainer.optimizer.variables) + list(trainer.ema.net.variables)


def test_a_run_killed_between_micro_batches_resumes_bit_identically(accumulating, tmp_path):
    """The run trains epochs 0 and 1 uninterrupted, then its twin restores epoch 0's checkpoint into the same
    trainer, is killed after batch 0 of epoch 1 (the first micro-batch of a group, its gradient in the
    accumulator), restores the checkpoint again (its accumulator not empty: stricter than a new process) and
    retrains epoch 1."""
    trainer = from_the_start(accumulating)
    trainer.train_epoch(0)
    prefix = run_folder.checkpoint_prefix(str(tmp_path / "epoch0"))
    trainer.epoch_var.assign(0)
    trainer.checkpoint.write(prefix)
    trainer.train_epoch(1)
    assert int(trainer.optimizer.iterations.numpy()) == 4 and trainer.global_step() == 6  # 2 updates per epoch
    whole = [(v.name, v.numpy()) for v in everything(trainer)]
    trainer.restore(prefix, expected_epoch=0)
    trainer.reader.kill = (1, 0)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_epoch(1)
    assert any(float(tf.reduce_max(tf.abs(s))) > 0 for s in trainer._train_step.sums)  # killed mid-group
    trainer.restore(prefix, expected_epoch=0)
    trainer.train_epoch(1)
    for (name, a), b in zip(whole, everything(trainer)):
        np.testing.assert_array_equal(a, b.numpy(), err_msg=name)


def test_a_non_finite_micro_batch_skips_its_whole_group_and_equals_the_twin_that_skips_it_by_construction(tmp_path):
    """+inf in the gradient of batch 0 (the first of group [0, 1]) leaves every variable finite, skips that
    group, counts both its batches as skipped, applies the group [2] after it (the accumulator was emptied of
    the +inf), and equals bit for bit the twin whose batch 0 is declared non-finite with nothing non-finite in
    it. One trainer runs both: its injection tables are variables the twin re-plans."""
    from engine.numerics import Injection
    inject = Injection(steps=STEPS)
    trainer = make_trainer(tmp_path, "injected", reader=FakeReader(steps=STEPS), inject=inject, accumulation_steps=K)
    initial = initial_checkpoint(trainer, tmp_path / "initial")
    state = lambda t: list(t.net.variables) + list(t.optimizer.variables)  # noqa: E731
    inject.plan(gradients={0: 0})
    summary = trainer.train_epoch(0)
    assert int(trainer.optimizer.iterations.numpy()) == 1 and summary["skipped_steps"] == 2
    assert all(np.all(np.isfinite(v.numpy())) for v in state(trainer))
    injected = [(v.name, v.numpy()) for v in state(trainer)]
    trainer.restore(initial, expected_epoch=-1)
    inject.plan(skips=(0,))
    assert trainer.train_epoch(0)["skipped_steps"] == 2
    for (name, a), b in zip(injected, state(trainer)):
        np.testing.assert_array_equal(a, b.numpy(), err_msg=name)
