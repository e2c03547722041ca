"""The compiled training step: forward_backward, replica_step, and train_step, which sums the replicas'
gradients itself, decides whether the update is finite, and applies or skips it on every replica
(engine/numerics.py). engine/trainer.py owns the loop, saving and restoring; this module owns what one
step computes.
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
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(images, labels, lighting, *mix):
        grads, cross_entropy, l2, hits, new_statistics = forward_backward(images, labels, lighting, *mix)
        if inject is not None:
            grads = inject.gradients(grads, net.train_step)
        # A forward overflow can reach this replica's statistics and not its loss: it counts too.
        bad_statistics = 1.0 - tf.cast(all_finite(new_statistics), tf.float32)
        return grads, tf.stack([cross_entropy, l2, hits, bad_statistics]), new_statistics

    def apply_update(summed, lr):
        # Keras' apply() would all-reduce the gradients again (and, with LossScaleOptimizer, decide
        # from replica 0's unsummed ones): the summed gradients go to each variable's update_step.
        scale = opt.dynamic_scale if loss_scaling else None
        for grad, var in zip(summed, variables):
            strategy.extended.update(
                var, lambda v, g: inner.update_step(g / scale if loss_scaling else g, v, lr),
                args=(grad,), group=False)
        inner.iterations.assign_add(1)
        if weight_ema is not None:
            weight_ema.update_weights(net.train_step)

    def commit_statistics(finite, new_statistics):  # replica context: this replica's own copies
        kept = [tf.where(finite, new, v) for v, new in zip(statistics, new_statistics)]
        for v, value in zip(statistics, kept):
            v.assign(value)
        if weight_ema is not None:
            weight_ema.update_statistics(net.train_step, kept, finite)

    @tf.function
    def train_step(images, labels, lighting, lr, *mix):
        trainer.traces["train_step"] += 1
        opt.learning_rate.assign(lr)
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
        # No collective in either branch: a worker can never wait for one that another skipped.
        tf.cond(finite, lambda: apply_update(summed, lr), lambda: None)
        if loss_scaling:
            grow_or_halve(opt, finite)
        strategy.run(commit_statistics, args=(finite, new_statistics))
        net.train_step.assign_add(1)  # skipped or not: see the module docstring
        loss_scale = opt.dynamic_scale.value if loss_scaling else tf.constant(0.0)
        return (cross_entropy, l2_sum / replicas, hits, 1.0 - tf.cast(finite, tf.float32),
                tf.convert_to_tensor(loss_scale))

    return train_step

