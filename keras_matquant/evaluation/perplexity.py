"""Held-out perplexity of a causal LM at a MatQuant precision or plan."""

import logging
import math
from typing import NamedTuple

import keras

from keras_matquant.data.text import load_bundled_paragraphs
from keras_matquant.data.text import tokenize_paragraphs
from keras_matquant.data.windows import sliding_window_data
from keras_matquant.evaluation.scoring import DEFAULT_BITS
from keras_matquant.evaluation.scoring import check_batch_size
from keras_matquant.evaluation.scoring import check_precision_or_plan
from keras_matquant.evaluation.scoring import evaluation_label
from keras_matquant.evaluation.scoring import sequence_scorer

logger = logging.getLogger("keras_matquant")

# Paragraphs of held-out text are joined with a blank line, as
# `language_modeling_data` joins training text.
PARAGRAPH_SEPARATOR = "\n\n"


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

    @property
    def log_perplexity(self):
        """Log-perplexity in nats per token, the same value as `nll`."""
        return self.nll


def evaluate_perplexity(
    model, data, bits=DEFAULT_BITS, batch_size=2, verbose=True, plan=None
):
    """Compute token-level perplexity of `model` at precision `bits` or a plan.

    Runs the model over `data` in batches inside `precision(bits)`, or
    inside `precision_plan(model, plan)`, and returns
    `exp(sum(nll * w) / sum(w))`. Padding positions and context-only
    positions of sliding windows carry weight 0 and are not counted. On JAX
    the forward pass is compiled once per model, precision (or plan) and
    input shape and reused on later calls.

    Args:
        model: a causal LM `keras.Model` that maps `data.x` to logits
            `(batch, time, vocabulary)`.
        data: a `keras_matquant.data.LanguageModelingData`.
        bits: int in `1..8`, the precision, or None for the float master
            weights. Defaults to 8. Leave it at its default (or None) when
            `plan` is given.
        batch_size: int >= 1, sequences per forward pass.
        verbose: bool, whether to log the precision or plan and show a
            progress bar.
        plan: optional dict `{layer_path: bits}` (Mix'n'Match) in place of
            `bits`; see `keras_matquant.evaluation.sequence_scorer` for the
            layers it does not name.

    Returns:
        A `PerplexityResult(perplexity, nll, num_tokens)`.

    Raises:
        ValueError: if `bits`, `plan` or `batch_size` is invalid, both an
            explicit `bits` and `plan` are given, or `data` contains no
            weighted token.

    Example:

    ```python
    heldout = language_modeling_data(tokenizer, paragraphs, 512)
    evaluate_perplexity(causal_lm, heldout, bits=4).perplexity
    plan = {"decoder_block_0/ffw_gating": 2, "decoder_block_1/ffw_gating": 8}
    evaluate_perplexity(causal_lm, heldout, plan=plan).perplexity
    ```
    """
    bits, plan = check_precision_or_plan(model, bits, plan)
    check_batch_size(batch_size)
    if data.num_tokens <= 0:
        raise ValueError("The evaluation data has no weighted target token.")

    score = sequence_scorer(model, bits, batch_size=batch_size, plan=plan)
    num_sequences = data.num_sequences
    progress = None
    if verbose:
        logger.info(
            "Perplexity at %s over %d sequences.",
            evaluation_label(model, bits, plan),
            num_sequences,
        )
        progress = keras.utils.Progbar(num_sequences, unit_name="sequence")

    total_log_likelihood = 0.0
    total_tokens = 0.0
    for start in range(0, num_sequences, batch_size):
        batch = data.take(batch_size, start=start)
        scores = score(batch.x, batch.y, batch.sample_weight)
        total_log_likelihood += float(scores.log_likelihood.sum())
        total_tokens += float(scores.num_tokens.sum())
        if progress is not None:
            progress.add(batch.num_sequences)

    mean_nll = -total_log_likelihood / total_tokens
    perplexity = math.exp(mean_nll) if mean_nll < 700 else float("inf")
    return PerplexityResult(
        perplexity=perplexity, nll=mean_nll, num_tokens=int(round(total_tokens))
    )


def evaluate_heldout_perplexity(
    model,
    tokenizer,
    paragraphs=None,
    sequence_length=512,
    stride=None,
    bits=DEFAULT_BITS,
    batch_size=2,
    max_sequences=None,
    verbose=True,
    plan=None,
):
    """Compute perplexity of held-out text with sliding windows.

    The paragraphs are tokenized without special tokens, joined with a
    blank line into one stream and cut by `sliding_window_data`. Every
    window starts with the tokenizer's start token. Each stream token is
    scored once, with at most `sequence_length - 1` stream tokens of context.
    A `stride` below `sequence_length` gives later tokens more context at the
    cost of more windows.

    Args:
        model: a causal LM `keras.Model` that maps
            `{"token_ids", "padding_mask"}` to logits.
        tokenizer: a KerasHub tokenizer with a `start_token_id`.
        paragraphs: list of str. Defaults to None, which uses the bundled
            held-out split (`load_bundled_paragraphs("heldout")`).
        sequence_length: int >= 1, input positions per window.
        stride: int in `1..sequence_length`, tokens between window starts.
            Defaults to None, which uses `sequence_length`.
        bits: int in `1..8`, the precision, or None for the float master
            weights. Defaults to 8. Leave it at its default (or None) when
            `plan` is given.
        batch_size: int >= 1, windows per forward pass.
        max_sequences: optional int, score only the first this many windows.
        verbose: bool, whether to log the precision or plan and show a
            progress bar.
        plan: optional dict `{layer_path: bits}` (Mix'n'Match) in place of
            `bits`; see `keras_matquant.evaluation.sequence_scorer` for the
            layers it does not name.

    Returns:
        A `PerplexityResult(perplexity, nll, num_tokens)`; its
        `log_perplexity` is `nll`.

    Raises:
        ValueError: if an argument is invalid, both an explicit `bits` and
            `plan` are given, or the text has no token.

    Example:

    ```python
    tokenizer = causal_lm.preprocessor.tokenizer
    result = evaluate_heldout_perplexity(causal_lm, tokenizer, stride=256)
    result.perplexity, result.log_perplexity
    plan = keras_matquant.serving.order_plan(causal_lm, "pyramid", target_bits=4)
    evaluate_heldout_perplexity(causal_lm, tokenizer, plan=plan).perplexity
    ```
    """
    bits, plan = check_precision_or_plan(model, bits, plan)
    check_batch_size(batch_size)
    if max_sequences is not None and (
        isinstance(max_sequences, bool)
        or not isinstance(max_sequences, int)
        or max_sequences < 1
    ):
        raise ValueError(
            "`max_sequences` must be None or a positive integer. "
            f"Received: {max_sequences!r}."
        )
    if paragraphs is None:
        paragraphs = load_bundled_paragraphs("heldout")

    separator = tokenize_paragraphs(tokenizer, [PARAGRAPH_SEPARATOR])[0]
    data = sliding_window_data(
        tokenize_paragraphs(tokenizer, paragraphs),
        sequence_length,
        stride=stride,
        bos_id=tokenizer.start_token_id,
        separator_ids=separator,
    )
    if max_sequences is not None and max_sequences < data.num_sequences:
        data = data.take(max_sequences)
    return evaluate_perplexity(
        model, data, bits=bits, batch_size=batch_size, verbose=verbose, plan=plan
    )
