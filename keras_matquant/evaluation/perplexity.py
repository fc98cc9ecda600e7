"""Held-out perplexity of a causal LM at a chosen MatQuant precision."""

import logging
import math
import weakref
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_matquant.precision import precision
from keras_matquant.precision import validate_precision
from keras_matquant.training.losses import summed_cross_entropy

logger = logging.getLogger("keras_matquant")

# One compiled function per model, precision and variable set, so that a
# precision (read when the function is traced) is never served by a
# function traced for another one.
_compiled_functions = weakref.WeakKeyDictionary()


class PerplexityResult(NamedTuple):
    """Perplexity over a set of target tokens.

    Attributes:
        perplexity: float, `exp(nll)`.
        nll: float, mean negative log-likelihood per token in nats (the
            log-perplexity).
        num_tokens: int, the number of target tokens counted.
    """

    perplexity: float
    nll: float
    num_tokens: int


def _jax_batch_function(model, bits):
    import jax

    key = (
        bits,
        tuple(id(v) for v in model.trainable_variables),
        tuple(id(v) for v in model.non_trainable_variables),
    )
    cache = _compiled_functions.setdefault(model, {})
    if key not in cache:

        def batch_nll(trainable, non_trainable, x, y, sample_weight):
            logits, _ = model.stateless_call(trainable, non_trainable, x)
            return summed_cross_entropy(y, logits, sample_weight)

        cache[key] = jax.jit(batch_nll)
    compiled = cache[key]

    def run(x, y, sample_weight):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        with precision(bits):
            return compiled(trainable, non_trainable, x, y, sample_weight)

    return run


def _eager_batch_function(model, bits):
    def run(x, y, sample_weight):
        with precision(bits):
            logits = model(x, training=False)
        return summed_cross_entropy(y, logits, sample_weight)

    return run


def evaluate_perplexity(model, data, bits=8, batch_size=2, verbose=True):
    """Compute token-level perplexity of `model` at precision `bits`.

    Runs the model over `data` in batches inside `precision(bits)` and
    returns `exp(sum(nll * w) / sum(w))`. On JAX the forward pass is
    compiled once per model and precision and reused on later calls.

    Args:
        model: a causal LM `keras.Model` that maps `data.x` to logits
            `(batch, time, vocabulary)`.
        data: a `keras_matquant.data.LanguageModelingData`.
        bits: int in `1..8`, the precision, or None for the float master
            weights.
        batch_size: int >= 1, sequences per forward pass.
        verbose: bool, whether to show a progress bar.

    Returns:
        A `PerplexityResult(perplexity, nll, num_tokens)`.

    Raises:
        ValueError: if `bits` or `batch_size` is invalid or `data` contains no
            weighted token.

    Example:

    ```python
    heldout = language_modeling_data(tokenizer, paragraphs, 512)
    evaluate_perplexity(causal_lm, heldout, bits=4).perplexity
    ```
    """
    bits = validate_precision(bits)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: {batch_size!r}."
        )
    if data.num_tokens <= 0:
        raise ValueError("The evaluation data has no weighted target token.")

    if keras.backend.backend() == "jax":
        run = _jax_batch_function(model, bits)
    else:
        run = _eager_batch_function(model, bits)

    label = "float" if bits is None else f"int{bits}"
    num_sequences = data.num_sequences
    progress = None
    if verbose:
        logger.info("Perplexity at %s over %d sequences.", label, num_sequences)
        progress = keras.utils.Progbar(num_sequences, unit_name="sequence")

    total_nll = 0.0
    total_tokens = 0.0
    for start in range(0, num_sequences, batch_size):
        batch = data.take(batch_size, start=start)
        nll, count = run(batch.x, batch.y, batch.sample_weight)
        total_nll += float(ops.convert_to_numpy(nll))
        total_tokens += float(ops.convert_to_numpy(count))
        if progress is not None:
            progress.add(batch.num_sequences)

    mean_nll = total_nll / total_tokens
    perplexity = math.exp(mean_nll) if mean_nll < 700 else float("inf")
    return PerplexityResult(
        perplexity=perplexity, nll=mean_nll, num_tokens=int(np.round(total_tokens))
    )
