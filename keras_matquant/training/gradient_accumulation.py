"""Per-precision gradient accumulation for `MatQuantModel` training steps.

A plain MatQuant step differentiates the summed loss of every precision, so
the activations of all forward passes are live until the one backward pass
ends. The accumulated step runs one forward and backward pass per group of
precisions, adds the gradients (each pass's loss already carries its
lambda_r), and applies the optimizer once. Only one pass's activations are
live at a time; a stop-gradient teacher's logits are kept for its students.

Each backend differentiates differently, so the step has one function per
backend, beside `tests/test_training.py`, which checks on each backend that
the accumulated gradient equals the plain one.
"""

import keras


def gradient_groups(precisions, pairs, stop_teacher_gradient):
    """Group the precisions that must share one backward pass.

    A distillation term whose teacher passes gradients depends on two
    forward passes, so its teacher and student go in one group. With a
    stop-gradient teacher each precision is its own group.

    Args:
        precisions: sequence of int, the trained precisions.
        pairs: sequence of `(teacher, student)` pairs.
        stop_teacher_gradient: bool, whether teachers are stop-gradient.

    Returns:
        A tuple of tuples of int, each in decreasing order, ordered by their
        widest precision, so a teacher's group comes before its students'.

    Example:

    >>> gradient_groups((8, 4, 2), [(8, 2)], stop_teacher_gradient=False)
    ((8, 2), (4,))
    """
    group_of = {bits: {bits} for bits in precisions}
    if not stop_teacher_gradient:
        for teacher, student in pairs:
            merged = group_of[teacher] | group_of[student]
            for bits in merged:
                group_of[bits] = merged
    groups = {tuple(sorted(group, reverse=True)) for group in group_of.values()}
    return tuple(sorted(groups, reverse=True))


def accumulated_train_step(trainer, *args, **kwargs):
    """Run one accumulated training step of `trainer` on this backend.

    Args:
        trainer: a `MatQuantModel`.
        *args: the arguments of the backend's `train_step`: `(state, data)`
            on JAX, `(data,)` on TensorFlow and PyTorch.
        **kwargs: passed on with them.

    Returns:
        What the backend's `train_step` returns: `(logs, state)` on JAX,
        the logs dict elsewhere.

    Raises:
        NotImplementedError: on a backend other than JAX, TensorFlow and
            PyTorch.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_train_step(trainer, *args, **kwargs)
    if backend == "tensorflow":
        return _tensorflow_train_step(trainer, *args, **kwargs)
    if backend == "torch":
        return _torch_train_step(trainer, *args, **kwargs)
    raise NotImplementedError(
        f"MatQuantModel accumulates gradients on the JAX, TensorFlow and "
        f"PyTorch backends, not on {backend!r}. Create it with "
        "accumulate_gradients=False."
    )


def _batch_size(x):
    return keras.ops.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0]


def _teachers_of(trainer, group):
    return [bits for bits in group if bits in trainer.co_distillation.teachers]


def _record_loss(trainer, loss, x):
    # Keras trainers report `loss` through this private tracker (Keras 3.15,
    # `Trainer._loss_tracker`); a custom step has to update it itself.
    trainer._loss_tracker.update_state(loss, sample_weight=_batch_size(x))


def _jax_after(gradients, values):
    """Return `values` unchanged but computed after every gradient leaf.

    XLA may otherwise interleave the passes and keep all their activations
    live. `jax.lax.optimization_barrier` does not prevent that: XLA on CPU
    (jaxlib 0.10.2) removes it without ordering the passes. A data
    dependency orders them on every device: the term added here is
    `0 * isfinite(...)`, always exactly 0, and XLA does not fold a float
    multiplication by zero away.
    """
    import jax
    import jax.numpy as jnp

    firsts = [jnp.ravel(leaf)[0] for leaf in jax.tree.leaves(gradients)]
    zero = jnp.isfinite(jnp.sum(jnp.stack(firsts))).astype("float32") * 0.0
    return [value + zero.astype(value.dtype) for value in values]


def _jax_train_step(trainer, state, data):
    import jax

    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    loss_and_gradient = jax.value_and_grad(
        trainer.compute_loss_and_updates, has_aux=True
    )

    gradients = None
    total_loss = None
    predictions = {}
    teacher_logits = {}
    for index, group in enumerate(trainer.gradient_groups):
        if gradients is not None:
            trainable = _jax_after(gradients, trainable)
        with trainer.backward_pass(group, teacher_logits, index == 0):
            (_, aux), group_gradients = loss_and_gradient(
                trainable,
                non_trainable,
                metrics_variables,
                x,
                y,
                sample_weight,
                training=True,
                optimizer_variables=optimizer_variables,
            )
        loss, group_predictions, non_trainable, metrics_variables = aux
        for bits in _teachers_of(trainer, group):
            teacher_logits[bits] = jax.lax.stop_gradient(
                group_predictions[f"int{bits}"]
            )
        predictions.update(group_predictions)
        if gradients is None:
            gradients, total_loss = group_gradients, loss
        else:
            gradients = jax.tree.map(jax.numpy.add, gradients, group_gradients)
            total_loss = total_loss + loss

    trainable, optimizer_variables = trainer.optimizer.stateless_apply(
        optimizer_variables, gradients, trainable
    )
    with keras.StatelessScope(
        state_mapping=list(zip(trainer.metrics_variables, metrics_variables))
    ) as scope:
        _record_loss(trainer, total_loss, x)
        logs = trainer.compute_metrics(x, y, predictions, sample_weight)
    new_metrics_variables = []
    for variable in trainer.metrics_variables:
        value = scope.get_current_value(variable)
        new_metrics_variables.append(variable.value if value is None else value)
    metrics_variables = new_metrics_variables
    return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)


def _add_tensorflow_gradients(first, second):
    import tensorflow as tf

    if first is None:
        return second
    if second is None:
        return first
    if isinstance(first, tf.IndexedSlices) and isinstance(second, tf.IndexedSlices):
        # Embedding gradients are sparse; rows listed twice are summed when
        # the optimizer applies them, so concatenating adds them.
        return tf.IndexedSlices(
            tf.concat([first.values, second.values], axis=0),
            tf.concat([first.indices, second.indices], axis=0),
            first.dense_shape,
        )
    return tf.add(tf.convert_to_tensor(first), tf.convert_to_tensor(second))


def _tensorflow_train_step(trainer, data):
    import tensorflow as tf

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = trainer.trainable_weights
    gradients = [None] * len(variables)
    total_loss = None
    predictions = {}
    teacher_logits = {}
    for index, group in enumerate(trainer.gradient_groups):
        # In a traced step, ops created under these dependencies wait for
        # the previous pass's gradients; eagerly the order is the code's.
        previous = [
            g.values if isinstance(g, tf.IndexedSlices) else g
            for g in gradients
            if g is not None
        ]
        with tf.control_dependencies(previous):
            with tf.GradientTape() as tape:
                with trainer.backward_pass(group, teacher_logits, index == 0):
                    group_predictions = trainer(x, training=True)
                    loss = trainer.compute_loss(
                        x, y, group_predictions, sample_weight, training=True
                    )
                scaled_loss = trainer.optimizer.scale_loss(loss)
            group_gradients = tape.gradient(scaled_loss, variables)
        gradients = [
            _add_tensorflow_gradients(total, new)
            for total, new in zip(gradients, group_gradients)
        ]
        for bits in _teachers_of(trainer, group):
            teacher_logits[bits] = tf.stop_gradient(group_predictions[f"int{bits}"])
        predictions.update(group_predictions)
        total_loss = loss if total_loss is None else total_loss + loss

    _record_loss(trainer, total_loss, x)
    trainer.optimizer.apply_gradients(zip(gradients, variables))
    return trainer.compute_metrics(x, y, predictions, sample_weight=sample_weight)


def _torch_train_step(trainer, data):
    import torch

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    trainer.zero_grad()
    total_loss = None
    predictions = {}
    teacher_logits = {}
    for index, group in enumerate(trainer.gradient_groups):
        with trainer.backward_pass(group, teacher_logits, index == 0):
            group_predictions = trainer(x, training=True)
            loss = trainer.compute_loss(
                x, y, group_predictions, sample_weight, training=True
            )
        # `backward` adds into each variable's `.grad` and frees this pass's
        # graph before the next pass runs.
        trainer.optimizer.scale_loss(loss).backward()
        group_predictions = {
            key: value.detach() for key, value in group_predictions.items()
        }
        for bits in _teachers_of(trainer, group):
            teacher_logits[bits] = group_predictions[f"int{bits}"]
        predictions.update(group_predictions)
        loss = loss.detach()
        total_loss = loss if total_loss is None else total_loss + loss

    _record_loss(trainer, total_loss, x)
    variables = trainer.trainable_weights[:]
    with torch.no_grad():
        trainer.optimizer.apply([v.value.grad for v in variables], variables)
    return trainer.compute_metrics(x, y, predictions, sample_weight=sample_weight)
