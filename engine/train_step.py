"""The compiled training step: forward_backward, replica_step, and train_step, which sums the replicas'
gradients itself, decides whether the update is finite, and applies or skips it on every replica
(engine/numerics.py). engine/trainer.py owns the loop, saving and restoring; this module owns what one
step computes.

Gradient accumulation ([train] accumulation_steps = k > 1): one optimizer update per k buffer batches
(micro-batches). Each micro-batch runs the same forward_backward and the same sum over replicas; the sum
is added to an accumulator, one float32 copy of the trainable variables (4 bytes per parameter on every
replica: 102 MB for ResNet-50's 25.6 M, 6.4 MB at width 0.25). The group's last micro-batch decides
finiteness over the accumulated sum, every micro-batch's loss and statistics flags (so a non-finite
micro-batch skips its whole group, everywhere), applies sum / k (the mean of the micro-batch gradients;
over a partial last group of an epoch, / its size), advances the loss scale and the EMA once, and empties
the accumulator. Batch-renorm statistics are committed per micro-batch (the README says why), each only
if its own micro-batch was finite. The global step still counts buffer batches. Keras 3's own
`gradient_accumulation_steps` is not used: it accumulates inside apply(), which this step bypasses (it
sums over replicas itself and skips non-finite updates on every replica), and its accumulators would live
in the optimizer's checkpoint; here a group never spans an epoch boundary and the accumulator is emptied
at every epoch start, so an interrupted group is redone from its first micro-batch on resume.
"""
from engine.distribute import split_batch


def build(trainer):
    """The compiled step. Reading order: forward_backward (one replica's loss and gradients, with its
    batch-renorm updates only proposed), replica_step (the injection hook, the statistics' own
    finiteness), then in train_step: sum over replicas, decide, apply or skip everywhere."""
    tf, net, opt, strategy = trainer.tf, trainer.net, trainer.optimizer, trainer.strategy
    # Imported here: model/ and engine.numerics load TensorFlow, which train.py loads only after its checks.
    from model.batch_renorm import deferred_statistics, proposed_statistics
    from model.preprocessing import to_model_input
    from model import COMPUTE_DTYPE_OF_POLICY
    from engine.numerics import all_finite, grow_or_halve
    compute_dtype = getattr(tf, COMPUTE_DTYPE_OF_POLICY[trainer.settings.train.mixed_precision])
    mu, sigma = trainer.mu, trainer.sigma
    global_batch, replicas, per_replica = trainer.batch_size, trainer.replicas, trainer.per_replica
    loss_scaling = trainer.loss_scaling
    recipe, weight_ema, inject = trainer.recipe, trainer.ema, trainer.inject
    inner = opt.inner_optimizer if loss_scaling else opt  # the SGD/RMSprop that owns the slots
    variables, statistics = net.trainable_variables, net.statistics()

    def forward_backward(images, labels, lighting, *mix):  # mix: engine.mixing draws, when mixing is on
        trainer.traces["forward_backward"] += 1  # Python: runs once per trace (per XLA compile with jit)
        with tf.GradientTape() as tape, deferred_statistics() as proposed:
            if recipe.active:  # label smoothing and/or mixup/cutmix (engine/mixing.py)
                x = recipe.model_input(to_model_input, images, lighting, mu, sigma, compute_dtype, *mix)
            else:
                x = to_model_input(images, lighting, mu, sigma, dtype=compute_dtype)
            if inject is not None:
                x = inject.forward(x, net.train_step)
            logits = net(x, training=True)
            if recipe.active:
                per_example = recipe.per_example_loss(labels, tf.cast(logits, tf.float32), *mix)
            else:
                per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=labels, logits=tf.cast(logits, tf.float32))
            cross_entropy = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            l2 = net.regularization_loss()
            # Gradients are summed over replicas, so each contributes 1/replicas of the L2 term.
            loss = cross_entropy + l2 / replicas
            target = opt.scale_loss(loss) if loss_scaling else loss
        grads = tape.gradient(target, variables)
        hits = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels),
                                     tf.float32))
        return grads, cross_entropy, l2, hits, proposed_statistics(proposed, statistics)

    if trainer.settings.train.jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True, autograph=False)

    def replica_step(images, labels, lighting, *mix):
        grads, cross_entropy, l2, hits, new_statistics = forward_backward(images, labels, lighting, *mix)
        if inject is not None:
            grads = inject.gradients(grads, net.train_step)
        # A forward overflow can reach this replica's statistics and not its loss: it counts too.
        bad_statistics = 1.0 - tf.cast(all_finite(new_statistics), tf.float32)
        return grads, tf.stack([cross_entropy, l2, hits, bad_statistics]), new_statistics

    def apply_update(summed, lr, count=None):
        # Keras' apply() would all-reduce the gradients again (and, with LossScaleOptimizer, decide
        # from replica 0's unsummed ones): the summed gradients go to each variable's update_step.
        # `count`: accumulated micro-batches, whose sum becomes their mean here.
        scale = opt.dynamic_scale if loss_scaling else None
        if count is not None:
            scale = scale * count if loss_scaling else count
        for grad, var in zip(summed, variables):
            strategy.extended.update(
                var, lambda v, g: inner.update_step(g / scale if scale is not None else g, v, lr),
                args=(grad,), group=False)
        inner.iterations.assign_add(1)
        if weight_ema is not None:
            weight_ema.update_weights(net.train_step)

    def commit_statistics(finite, new_statistics, ema_finite=None):  # replica context: this replica's copies
        kept = [tf.where(finite, new, v) for v, new in zip(statistics, new_statistics)]
        for v, value in zip(statistics, kept):
            v.assign(value)
        if weight_ema is not None and ema_finite is not False:
            weight_ema.update_statistics(net.train_step, kept, finite if ema_finite is None else ema_finite)

    def forward_and_sum(images, labels, lighting, *mix):
        """Every replica's forward/backward, summed over replicas; `finite` for this batch alone."""
        parts = split_batch(strategy, (images, labels, lighting), per_replica)
        grads, scalars, new_statistics = strategy.run(replica_step, args=tuple(parts) + mix)
        # One all-reduce of the gradients (identical result on every replica and worker), one of the scalars.
        summed = strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, list(zip(grads, variables)))
        cross_entropy, l2_sum, hits, bad_statistics = tf.unstack(
            strategy.reduce(tf.distribute.ReduceOp.SUM, scalars, axis=None))
        local = [strategy.experimental_local_results(g)[0] for g in summed]
        finite = tf.logical_and(all_finite(local + [cross_entropy, l2_sum]), tf.equal(bad_statistics, 0.0))
        if inject is not None:
            finite = inject.decide(finite, net.train_step)
        return summed, (cross_entropy, l2_sum, hits), finite, new_statistics

    def outputs(scalars, finite):
        cross_entropy, l2_sum, hits = scalars
        loss_scale = opt.dynamic_scale.value if loss_scaling else tf.constant(0.0)
        return (cross_entropy, l2_sum / replicas, hits, 1.0 - tf.cast(finite, tf.float32),
                tf.convert_to_tensor(loss_scale))

    # autograph=False on every compiled function here: their Python branches test Python values and the one on a
    # tensor is an explicit tf.cond, so AutoGraph's rewrite of the step and of everything it calls (~190 functions,
    # the Keras layers included) changed nothing in the graph but its cost. Measured on the tests' network: the
    # first float16 epoch 5.1 -> 2.7 s of CPU, with XLA 19.7 -> 13.3 s; weights bit-identical after 8 steps
    # (float32, mixing with EMA, accumulation).
    @tf.function(autograph=False)
    def train_step(images, labels, lighting, lr, *mix):
        trainer.traces["train_step"] += 1
        opt.learning_rate.assign(lr)
        summed, scalars, finite, new_statistics = forward_and_sum(images, labels, lighting, *mix)
        # No collective in either branch: a worker can never wait for one that another skipped.
        tf.cond(finite, lambda: apply_update(summed, lr), lambda: None)
        if loss_scaling:
            grow_or_halve(opt, finite)
        strategy.run(commit_statistics, args=(finite, new_statistics))
        net.train_step.assign_add(1)  # skipped or not: see the module docstring
        return outputs(scalars, finite)

    if trainer.accumulation == 1:
        return Step(train_step)
    return _accumulating_step(trainer, forward_and_sum, apply_update, commit_statistics, outputs)


class Step:
    """The loop's handle on the compiled step: `step(images, labels, lighting, lr, *mix, last, count)`;
    without accumulation every batch is a whole update (`last` and `count` unused)."""

    def __init__(self, apply, accumulate=None, reset=None):
        self.apply, self.accumulate, self._reset = apply, accumulate, reset

    def __call__(self, images, labels, lighting, lr, *mix, last=True, count=1):
        if self.accumulate is None:
            return self.apply(images, labels, lighting, lr, *mix)
        if not last:
            return self.accumulate(images, labels, lighting, *mix)
        return self.apply(images, labels, lighting, lr, count, *mix)

    def reset(self):
        """Empty the accumulator: an interrupted group is redone from its first micro-batch."""
        if self._reset is not None:
            self._reset()


def _accumulating_step(trainer, forward_and_sum, apply_update, commit_statistics, outputs):
    """accumulate (every micro-batch but a group's last) and apply (its last), over one accumulator."""
    tf, net, opt, strategy = trainer.tf, trainer.net, trainer.optimizer, trainer.strategy
    from engine.numerics import all_finite, grow_or_halve  # loads TensorFlow (see build)
    loss_scaling, variables = trainer.loss_scaling, trainer.net.trainable_variables
    with strategy.scope():  # mirrored like the weights: each replica adds the all-reduced sum it holds
        sums = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="accumulated_" + v.name.replace(":", "_"))
                for v in variables]
        bad = tf.Variable(0.0, trainable=False, name="accumulated_non_finite")  # micro-batches not finite so far

    def add(summed, finite):
        for s, g in zip(sums, summed):
            strategy.extended.update(s, lambda v, value: v.assign_add(value), args=(g,), group=False)
        bad.assign_add(1.0 - tf.cast(finite, tf.float32))

    @tf.function(autograph=False)
    def accumulate(images, labels, lighting, *mix):
        trainer.traces["train_step"] += 1
        summed, scalars, finite, new_statistics = forward_and_sum(images, labels, lighting, *mix)
        add(summed, finite)
        # This micro-batch's statistics, if its own batch was finite; the EMA follows once per update.
        strategy.run(commit_statistics, args=(finite, new_statistics, False))
        net.train_step.assign_add(1)
        return outputs(scalars, tf.constant(True))  # the group's decision is reported with its last batch

    @tf.function(autograph=False)
    def apply(images, labels, lighting, lr, count, *mix):
        trainer.traces["train_step"] += 1
        opt.learning_rate.assign(lr)
        summed, scalars, own_finite, new_statistics = forward_and_sum(images, labels, lighting, *mix)
        add(summed, own_finite)
        local = [strategy.experimental_local_results(s)[0] for s in sums]
        finite = tf.logical_and(all_finite(local), tf.equal(bad, 0.0))
        tf.cond(finite, lambda: apply_update(sums, lr, count), lambda: None)
        if loss_scaling:
            grow_or_halve(opt, finite)
        strategy.run(commit_statistics, args=(own_finite, new_statistics, finite))
        net.train_step.assign_add(1)
        empty()
        return outputs(scalars, finite)

    def empty():
        for s in sums:
            s.assign(tf.zeros(s.shape, s.dtype))
        bad.assign(0.0)

    def apply_group(images, labels, lighting, lr, count, *mix):
        # `count` as a tensor: a Python float is part of the trace's signature, so the short last group of an
        # epoch (count 1 of k = 2 after 3 batches) traced `apply` a second time (+4 s of CPU at the tests' model).
        return apply(images, labels, lighting, lr, tf.constant(count, tf.float32), *mix)

    step = Step(apply_group, accumulate, tf.function(empty, autograph=False))
    step.sums = sums  # tests and the memory figure: one copy of the trainable variables
    return step
