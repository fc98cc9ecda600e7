"""Token-level losses used by MatQuant training."""

import keras
from keras import ops


def summed_cross_entropy(y_true, logits, sample_weight):
    """Sum next-token cross entropy over the weighted tokens.

    Args:
        y_true: int tensor `(batch, time)`, the target token ids.
        logits: float tensor `(batch, time, vocabulary)`.
        sample_weight: tensor `(batch, time)`, 1 for tokens that count and 0
            for padding.

    Returns:
        A pair of float32 scalars `(sum(ce * w), sum(w))`, where `ce` is the
        per-token cross entropy in nats.

    Example:

    ```python
    total, count = summed_cross_entropy(labels, causal_lm(inputs), mask)
    ```
    """
    logits = ops.cast(logits, "float32")
    per_token = keras.losses.sparse_categorical_crossentropy(
        y_true, logits, from_logits=True
    )
    weights = ops.cast(sample_weight, "float32")
    return ops.sum(ops.multiply(per_token, weights)), ops.sum(weights)


def masked_cross_entropy(y_true, logits, sample_weight=None):
    """Mean next-token cross entropy over the weighted tokens.

    Args:
        y_true: int tensor `(batch, time)`, the target token ids.
        logits: float tensor `(batch, time, vocabulary)`.
        sample_weight: optional tensor `(batch, time)`, 1 for tokens that
            count and 0 for padding. None counts every token.

    Returns:
        A float32 scalar: `sum(ce * w) / max(sum(w), 1)`, where `ce` is the
        per-token cross entropy in nats.

    Example:

    ```python
    loss = masked_cross_entropy(labels, causal_lm(inputs), padding_mask)
    ```
    """
    if sample_weight is None:
        sample_weight = ops.ones(ops.shape(y_true), dtype="float32")
    total, count = summed_cross_entropy(y_true, logits, sample_weight)
    return ops.divide(total, ops.maximum(count, 1.0))


DISTILLATION_LOSSES = ("kl", "soft_cross_entropy")


def masked_distillation_loss(
    teacher_logits, student_logits, sample_weight=None, kind="kl"
):
    """Mean per-token distillation loss from teacher to student logits.

    With `p = softmax(teacher_logits)` and `log_q = log_softmax(student_logits)`
    over the vocabulary, the per-token loss is the soft cross entropy
    `-sum(p * log_q)`, or for `kind="kl"` the KL divergence
    `sum(p * (log p - log_q))`. Both have the same gradient with respect to
    the student. They differ by the teacher's entropy, which makes the KL
    divergence 0 when the two outputs agree. Both work in log space, unlike
    `keras.losses.KLDivergence`, which clips probabilities at 1e-7 and so
    distorts the many tiny probabilities of a large vocabulary. The loss
    does not stop the teacher's gradient; the caller decides that.

    Args:
        teacher_logits: float tensor `(batch, time, vocabulary)`.
        student_logits: float tensor of the same shape.
        sample_weight: optional tensor `(batch, time)`, 1 for tokens that
            count and 0 for padding. None counts every token.
        kind: str, `"kl"` (default) or `"soft_cross_entropy"`.

    Returns:
        A float32 scalar: `sum(loss * w) / max(sum(w), 1)`, in nats.

    Raises:
        ValueError: if `kind` is not a known distillation loss.

    Example:

    ```python
    with keras_matquant.precision(8):
        teacher = causal_lm(x)
    with keras_matquant.precision(2):
        student = causal_lm(x)
    loss = masked_distillation_loss(
        keras.ops.stop_gradient(teacher), student, padding_mask
    )
    ```
    """
    if kind not in DISTILLATION_LOSSES:
        raise ValueError(
            f"Unknown distillation loss {kind!r}. Accepted: "
            f"{', '.join(map(repr, DISTILLATION_LOSSES))}."
        )
    teacher_log_probs = ops.log_softmax(ops.cast(teacher_logits, "float32"), axis=-1)
    student_log_probs = ops.log_softmax(ops.cast(student_logits, "float32"), axis=-1)
    teacher_probs = ops.exp(teacher_log_probs)
    if kind == "kl":
        log_ratio = ops.subtract(teacher_log_probs, student_log_probs)
    else:
        log_ratio = ops.negative(student_log_probs)
    per_token = ops.sum(ops.multiply(teacher_probs, log_ratio), axis=-1)

    if sample_weight is None:
        sample_weight = ops.ones(ops.shape(per_token), dtype="float32")
    weights = ops.cast(sample_weight, "float32")
    total = ops.sum(ops.multiply(per_token, weights))
    return ops.divide(total, ops.maximum(ops.sum(weights), 1.0))
