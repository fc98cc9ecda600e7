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
