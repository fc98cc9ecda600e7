"""Token-level losses used by MatQuant training and evaluation."""

import keras
from keras import ops


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
    logits = ops.cast(logits, "float32")
    per_token = keras.losses.sparse_categorical_crossentropy(
        y_true, logits, from_logits=True
    )
    if sample_weight is None:
        return ops.mean(per_token)
    weights = ops.cast(sample_weight, "float32")
    total = ops.sum(ops.multiply(per_token, weights))
    return ops.divide(total, ops.maximum(ops.sum(weights), 1.0))
