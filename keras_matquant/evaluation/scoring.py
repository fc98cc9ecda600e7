"""Per-sequence log-likelihood of target tokens at a MatQuant precision."""

import weakref
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_matquant.precision import precision
from keras_matquant.precision import validate_precision

# One compiled function per model, precision and variable set, so that a
# precision (read when the function is traced) is never served by a
# function traced for another one.
_compiled_functions = weakref.WeakKeyDictionary()


class SequenceScores(NamedTuple):
    """Log-likelihood of the weighted target tokens of each sequence.

    Attributes:
        log_likelihood: float64 array `(batch,)`, `sum(w * log p(y | x))`
            in nats over the positions of each sequence.
        num_tokens: float64 array `(batch,)`, the sum of the weights.
        is_greedy: bool array `(batch,)`, True where every weighted target is
            the argmax of its logits (True for a sequence with no weighted
            target).
    """

    log_likelihood: np.ndarray
    num_tokens: np.ndarray
    is_greedy: np.ndarray


def check_batch_size(batch_size):
    """Check that `batch_size` is a positive integer and return it.

    Args:
        batch_size: the value to check.

    Returns:
        `batch_size` unchanged.

    Raises:
        ValueError: if `batch_size` is not a positive integer.

    Example:

    >>> check_batch_size(4)
    4
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: {batch_size!r}."
        )
    return batch_size


def precision_label(bits):
    """Name a precision as the tables of this package do.

    Args:
        bits: int in `1..8`, or None for the float master weights.

    Returns:
        `"float"` for None, else `"int{bits}"`.

    Example:

    >>> precision_label(4)
    'int4'
    """
    return "float" if bits is None else f"int{bits}"


def target_log_probabilities(logits, y_true, sample_weight):
    """Sum the log-probabilities of the target tokens of each sequence.

    `log p = logits[y] - logsumexp(logits)`, which equals `log_softmax` at the
    target without a second `(batch, time, vocabulary)` tensor.

    Args:
        logits: float tensor `(batch, time, vocabulary)`.
        y_true: int tensor `(batch, time)`, the target token ids.
        sample_weight: tensor `(batch, time)`, 1 for targets that count.

    Returns:
        Three tensors of shape `(batch,)`: the weighted sum of target
        log-probabilities (float32), the sum of the weights (float32) and
        whether every weighted target is the argmax (bool).

    Example:

    ```python
    total, count, greedy = target_log_probabilities(logits, y, weights)
    ```
    """
    logits = ops.cast(logits, "float32")
    y_true = ops.cast(y_true, "int32")
    weights = ops.cast(sample_weight, "float32")

    target_logits = ops.take_along_axis(logits, ops.expand_dims(y_true, -1), axis=-1)
    log_probabilities = ops.squeeze(target_logits, -1) - ops.logsumexp(logits, axis=-1)
    # `where`, not a product, so that a non-finite value at a padding
    # position cannot turn the sum into NaN.
    counted = ops.greater(weights, 0.0)
    total = ops.sum(
        ops.where(counted, ops.multiply(log_probabilities, weights), 0.0), axis=-1
    )

    matches = ops.equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), y_true)
    greedy = ops.all(ops.logical_or(matches, ops.logical_not(counted)), axis=-1)
    return total, ops.sum(weights, axis=-1), greedy


def _jax_function(model, bits):
    import jax

    key = (
        bits,
        tuple(id(v) for v in model.trainable_variables),
        tuple(id(v) for v in model.non_trainable_variables),
    )
    cache = _compiled_functions.setdefault(model, {})
    if key not in cache:

        def score(trainable, non_trainable, x, y, sample_weight):
            logits, _ = model.stateless_call(trainable, non_trainable, x)
            return target_log_probabilities(logits, y, sample_weight)

        cache[key] = jax.jit(score)
    compiled = cache[key]

    def run(x, y, sample_weight):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        with precision(bits):
            return compiled(trainable, non_trainable, x, y, sample_weight)

    return run


def _eager_function(model, bits):
    def run(x, y, sample_weight):
        with precision(bits):
            logits = model(x, training=False)
        return target_log_probabilities(logits, y, sample_weight)

    return run


def _pad_rows(array, num_rows, fill):
    missing = num_rows - array.shape[0]
    if missing <= 0:
        return array
    padding = np.full((missing,) + array.shape[1:], fill, dtype=array.dtype)
    return np.concatenate([array, padding], axis=0)


def sequence_scorer(model, bits, batch_size=None):
    """Build a function that scores batches of sequences at `bits`.

    On JAX the forward pass is compiled once per model, precision and input
    shape and reused by later calls; the other backends run it eagerly. With
    `batch_size`, a smaller batch is padded with rows of weight 0 (and
    `padding_mask` 1, so no attention row is empty) up to `batch_size` rows,
    so the last batch reuses the compiled function.

    Args:
        model: a causal LM `keras.Model` that maps
            `{"token_ids", "padding_mask"}` to logits
            `(batch, time, vocabulary)`.
        bits: int in `1..8`, the precision, or None for the float master
            weights.
        batch_size: optional int, the number of rows every call is padded
            to. Defaults to None (no padding).

    Returns:
        A function `(x, y, sample_weight) -> SequenceScores` on numpy inputs;
        the scores have one entry per input row, padding removed.

    Raises:
        ValueError: if `bits` is neither None nor an integer in `1..8`.

    Example:

    ```python
    score = sequence_scorer(causal_lm, bits=4)
    scores = score(data.x, data.y, data.sample_weight)
    ```
    """
    bits = validate_precision(bits)
    if keras.backend.backend() == "jax":
        run = _jax_function(model, bits)
    else:
        run = _eager_function(model, bits)

    def score(x, y, sample_weight):
        num_rows = int(np.shape(y)[0])
        if batch_size is not None and num_rows < batch_size:
            x = {
                key: _pad_rows(np.asarray(value), batch_size, 1 if key == "padding_mask" else 0)
                for key, value in x.items()
            }
            y = _pad_rows(np.asarray(y), batch_size, 0)
            sample_weight = _pad_rows(np.asarray(sample_weight), batch_size, 0)
        total, count, greedy = run(x, y, sample_weight)
        return SequenceScores(
            log_likelihood=ops.convert_to_numpy(total).astype("float64")[:num_rows],
            num_tokens=ops.convert_to_numpy(count).astype("float64")[:num_rows],
            is_greedy=ops.convert_to_numpy(greedy).astype(bool)[:num_rows],
        )

    return score
