"""Per-sequence log-likelihood of target tokens at a precision or plan."""

import weakref
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_matquant.layers.tree import matquant_layers
from keras_matquant.precision import precision
from keras_matquant.precision import precision_plan
from keras_matquant.precision import resolve_plan
from keras_matquant.precision import validate_precision
from keras_matquant.serving.export import check_bits_or_plan

# One compiled function per model, precision (or per-layer precisions of a
# plan) and variable set. A precision is read when the function is traced,
# so a function traced for one precision must not serve another.
_compiled_functions = weakref.WeakKeyDictionary()


class _DefaultBits(int):
    """The int 8, distinguished by identity from an explicit `bits=8`."""


# The default `bits` of every evaluator: int8 without a plan. With a plan it
# counts as not given, so `plan=` alone works while an explicit `bits` next
# to a plan is rejected.
DEFAULT_BITS = _DefaultBits(8)


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


def check_precision_or_plan(model, bits, plan):
    """Check the `bits` and `plan` arguments of an evaluator against a model.

    A plan replaces `bits`, as in `keras_matquant.serving.export`: pass
    either an explicit `bits` or a `plan`, not both. `bits` left at its
    default (`DEFAULT_BITS`) or None counts as not given when a plan is
    given.

    Args:
        model: the model to evaluate; the plan's paths must name its
            MatQuant layers.
        bits: int in `1..8`, None for the float master weights, or
            `DEFAULT_BITS`.
        plan: None, or a dict `{layer_path: bits}`.

    Returns:
        The pair `(bits, plan)` to run with: `(int or None, None)` without
        a plan, `(None, a copy of plan)` with one.

    Raises:
        ValueError: if `bits` is invalid, `plan` is not a dict, or both an
            explicit `bits` and a plan are given. Also if the plan names a
            path that is not a MatQuant layer of the model (the message
            lists the valid paths) or an invalid precision.

    Example:

    ```python
    check_precision_or_plan(causal_lm, DEFAULT_BITS, {"decoder_block_0/ffw_gating": 2})
    # (None, {'decoder_block_0/ffw_gating': 2})
    ```
    """
    if plan is None:
        return validate_precision(bits), None
    if bits is DEFAULT_BITS:
        bits = None
    check_bits_or_plan(bits, plan)
    resolve_plan(model, plan)
    return None, dict(plan)


def plan_label(model, plan):
    """Name a per-layer plan with the effective bits it stores per weight.

    Layers that the plan does not name count at their own code width (see
    `keras_matquant.effective_bits`).

    Args:
        model: the model whose MatQuant layers the plan names.
        plan: dict `{layer_path: bits}`.

    Returns:
        `"plan (N.NN bits)"`, or `"plan"` when the effective bits are not
        defined: the model has no MatQuant layer, or the plan runs a layer
        on its float kernel (None).

    Example:

    ```python
    plan = {path: 4 for path in keras_matquant.matquant_layers(causal_lm)}
    plan_label(causal_lm, plan)  # 'plan (4.00 bits)'
    ```
    """
    from keras_matquant.effective_bits import effective_bits

    if not matquant_layers(model) or any(bits is None for bits in plan.values()):
        return "plan"
    return f"plan ({effective_bits(model, plan=plan):.2f} bits)"


def evaluation_label(model, bits, plan=None):
    """Name the precision or plan that an evaluation runs at.

    Args:
        model: the evaluated model.
        bits: int in `1..8`, or None for the float master weights.
        plan: None, or a dict `{layer_path: bits}` that replaces `bits`.

    Returns:
        `plan_label(model, plan)` for a plan, else `precision_label(bits)`.

    Example:

    ```python
    evaluation_label(causal_lm, 4)  # 'int4'
    ```
    """
    if plan is not None:
        return plan_label(model, plan)
    return precision_label(bits)


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


def _precision_scope(model, bits, plan):
    if plan is not None:
        return precision_plan(model, plan)
    return precision(bits)


def _jax_function(model, bits, plan):
    import jax

    variables_key = (
        tuple(id(v) for v in model.trainable_variables),
        tuple(id(v) for v in model.non_trainable_variables),
    )
    layers = list(matquant_layers(model).values())
    cache = _compiled_functions.setdefault(model, {})
    # The cached functions reach the model through a weak reference: a
    # strong one would keep every evaluated model alive in the cache.
    model_reference = weakref.ref(model)

    def compile_score():
        # A new Python function per key, because JAX shares traces between
        # `jit` wrappers of one function and would reuse another key's trace.
        def score(trainable, non_trainable, x, y, sample_weight):
            logits, _ = model_reference().stateless_call(trainable, non_trainable, x)
            return target_log_probabilities(logits, y, sample_weight)

        return jax.jit(score)

    def run(x, y, sample_weight):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        with _precision_scope(model, bits, plan):
            if plan is None:
                precision_key = ("bits", bits)
            else:
                # The layers a plan leaves out read the scopes around this
                # call, so the key is the precision each layer resolves now.
                precision_key = (
                    "plan",
                    tuple(layer.resolve_precision() for layer in layers),
                )
            key = (precision_key, variables_key)
            if key not in cache:
                cache[key] = compile_score()
            return cache[key](trainable, non_trainable, x, y, sample_weight)

    return run


def _eager_function(model, bits, plan):
    def run(x, y, sample_weight):
        with _precision_scope(model, bits, plan):
            logits = model(x, training=False)
        return target_log_probabilities(logits, y, sample_weight)

    return run


def _pad_rows(array, num_rows, fill):
    missing = num_rows - array.shape[0]
    if missing <= 0:
        return array
    padding = np.full((missing,) + array.shape[1:], fill, dtype=array.dtype)
    return np.concatenate([array, padding], axis=0)


def sequence_scorer(model, bits=DEFAULT_BITS, batch_size=None, plan=None):
    """Build a function that scores batches of sequences at a precision or plan.

    On JAX the forward pass is compiled once per model, precision (for a
    plan: the precision each MatQuant layer resolves) and input shape, and
    reused by later calls; the other backends run it eagerly. With
    `batch_size`, a smaller batch is padded with rows of weight 0 (and
    `padding_mask` 1, so no attention row is empty) up to `batch_size` rows,
    so the last batch reuses the compiled function.

    Args:
        model: a causal LM `keras.Model` that maps
            `{"token_ids", "padding_mask"}` to logits
            `(batch, time, vocabulary)`.
        bits: int in `1..8`, the precision, or None for the float master
            weights. Defaults to 8. Leave it at its default (or None) when
            `plan` is given.
        batch_size: optional int, the number of rows every call is padded
            to. Defaults to None (no padding).
        plan: optional dict `{layer_path: bits}` with paths as
            `keras_matquant.matquant_layers(model)` lists them, run inside
            `keras_matquant.precision_plan`. Layers it does not name run at
            the precision of the enclosing `precision` scope, or at their
            own code width outside every scope.

    Returns:
        A function `(x, y, sample_weight) -> SequenceScores` on numpy inputs;
        the scores have one entry per input row, padding removed.

    Raises:
        ValueError: if `bits` is neither None nor an integer in `1..8`, or
            both an explicit `bits` and `plan` are given. Also if the plan
            names a path that is not a MatQuant layer of the model (the
            message lists the valid paths) or an invalid precision.

    Example:

    ```python
    score = sequence_scorer(causal_lm, bits=4)
    scores = score(data.x, data.y, data.sample_weight)
    score_mix = sequence_scorer(causal_lm, plan={"decoder_block_0/ffw_gating": 2})
    ```
    """
    bits, plan = check_precision_or_plan(model, bits, plan)
    if keras.backend.backend() == "jax":
        run = _jax_function(model, bits, plan)
    else:
        run = _eager_function(model, bits, plan)

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
