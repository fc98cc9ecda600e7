"""Log-likelihood of text continuations given a context, in batches.

Tokenization follows lm-eval's convention for causal LMs. White space at the
end of the context moves to the front of the continuation. Then the context
and the continuation are tokenized separately, without special tokens. Only
the continuation tokens are scored, each conditioned on the context and the
continuation tokens before it. With `add_bos=True` (the default) the
tokenizer's start token is put before the context tokens, as KerasHub's
causal LM preprocessors do for Gemma, so an empty context is scored after
the start token alone.

lm-eval's Hugging Face model instead tokenizes `context + continuation` in
one piece and splits it after the context tokens; the two differ only where
a token would span the boundary (for SentencePiece, a continuation that does
not start with a space or punctuation).
"""

import logging
from typing import NamedTuple

import keras
import numpy as np

from keras_matquant.data.text import tokenize_paragraphs
from keras_matquant.evaluation.scoring import DEFAULT_BITS
from keras_matquant.evaluation.scoring import check_batch_size
from keras_matquant.evaluation.scoring import check_precision_or_plan
from keras_matquant.evaluation.scoring import evaluation_label
from keras_matquant.evaluation.scoring import sequence_scorer

logger = logging.getLogger("keras_matquant")

# Inputs are padded to a power of two of at least this many positions, so
# that JAX compiles a few shapes instead of one per distinct length.
MIN_PADDED_LENGTH = 16


class ContinuationScore(NamedTuple):
    """Score of one continuation.

    Attributes:
        log_likelihood: float, `sum log p(token | preceding tokens)` over the
            continuation tokens, in nats.
        is_greedy: bool, whether greedy decoding from the context would
            produce exactly these continuation tokens.
        num_tokens: int, the number of continuation tokens.
    """

    log_likelihood: float
    is_greedy: bool
    num_tokens: int


def split_trailing_space(context, continuation):
    """Move white space at the end of `context` to the front of `continuation`.

    Args:
        context: str.
        continuation: str.

    Returns:
        The pair `(context, continuation)` after the move.

    Example:

    >>> split_trailing_space("Answer: ", "yes")
    ('Answer:', ' yes')
    """
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def encode_pairs(tokenizer, pairs, add_bos=True):
    """Tokenize `(context, continuation)` pairs for scoring.

    Args:
        tokenizer: a KerasHub tokenizer (with a `start_token_id` when
            `add_bos` is True).
        pairs: list of `(context, continuation)` str pairs.
        add_bos: bool, whether to put the start token before each context.

    Returns:
        A list of `(context_ids, continuation_ids)` pairs of int lists.

    Raises:
        ValueError: if a pair is not two strings, a continuation has no
            token, a context has no token while `add_bos` is False, or the
            tokenizer has no start token while `add_bos` is True.

    Example:

    ```python
    encode_pairs(causal_lm.preprocessor.tokenizer, [("The sky is", " blue")])
    # [([2, 818, 7217, 563], [3730])]
    ```
    """
    bos = []
    if add_bos:
        start_token_id = getattr(tokenizer, "start_token_id", None)
        if start_token_id is None:
            raise ValueError(
                "The tokenizer has no `start_token_id`, so no start token can "
                "be put before the context. Pass `add_bos=False`."
            )
        bos = [int(start_token_id)]

    contexts, continuations = [], []
    for index, pair in enumerate(pairs):
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or not all(isinstance(text, str) for text in pair)
        ):
            raise ValueError(
                f"Request {index} must be a (context, continuation) pair of "
                f"str. Received: {type(pair).__name__}."
            )
        context, continuation = split_trailing_space(*pair)
        contexts.append(context)
        continuations.append(continuation)

    # Tokenize each distinct string once: the choices of one question share
    # their context.
    unique = sorted(set(contexts) | set(continuations))
    ids = dict(zip(unique, tokenize_paragraphs(tokenizer, unique)))

    encoded = []
    for index, (context, continuation) in enumerate(zip(contexts, continuations)):
        context_ids = bos + ids[context]
        continuation_ids = ids[continuation]
        if not continuation_ids:
            raise ValueError(
                f"Request {index}: the continuation {continuation!r} has no "
                "token to score. Give a non-empty continuation."
            )
        if not context_ids:
            raise ValueError(
                f"Request {index}: the context is empty and `add_bos` is "
                "False, so the first continuation token has nothing to be "
                "conditioned on. Give a context or pass `add_bos=True`."
            )
        encoded.append((context_ids, continuation_ids))
    return encoded


def _padded_length(length, max_length):
    padded = MIN_PADDED_LENGTH
    while padded < length:
        padded *= 2
    if max_length is not None:
        padded = min(padded, max_length)
    return max(padded, length)


def _truncate(context_ids, continuation_ids, max_length, index):
    """Return the model input and targets of one request, left-truncated."""
    if max_length is not None and len(continuation_ids) > max_length:
        raise ValueError(
            f"Request {index}: the continuation has {len(continuation_ids)} "
            f"tokens, more than `max_length` ({max_length}). Raise "
            "`max_length` or shorten the continuation."
        )
    tokens = list(context_ids) + list(continuation_ids)
    if max_length is not None:
        # Keep the last `max_length` inputs, as lm-eval does, so the start
        # token and the oldest context tokens go first.
        tokens = tokens[-(max_length + 1) :]
    return tokens[:-1], tokens[1:]


def score_token_pairs(
    model,
    token_pairs,
    bits=DEFAULT_BITS,
    batch_size=8,
    max_length=None,
    verbose=True,
    plan=None,
):
    """Score continuation tokens given context tokens at a precision or plan.

    Requests are sorted by length (longest first), batched, and padded on
    the right to a power of two of at least 16 positions (at most
    `max_length`), so the JAX backend compiles few shapes. A request longer
    than `max_length` keeps its last `max_length` input tokens.

    Args:
        model: a causal LM `keras.Model` that maps
            `{"token_ids", "padding_mask"}` to logits.
        token_pairs: list of `(context_ids, continuation_ids)`, each a
            non-empty list of int token ids.
        bits: int in `1..8`, the precision, or None for the float master
            weights. Defaults to 8. Leave it at its default (or None) when
            `plan` is given.
        batch_size: int >= 1, requests per forward pass.
        max_length: optional int, the maximum number of input positions.
        verbose: bool, whether to log the precision or plan and show a
            progress bar.
        plan: optional dict `{layer_path: bits}` (Mix'n'Match) in place of
            `bits`; see `keras_matquant.evaluation.sequence_scorer` for the
            layers it does not name.

    Returns:
        A list of `ContinuationScore`, in the order of `token_pairs`.

    Raises:
        ValueError: if an argument is invalid, both an explicit `bits` and
            `plan` are given, a context or continuation is empty, or a
            continuation is longer than `max_length`.

    Example:

    ```python
    scores = score_token_pairs(causal_lm, [([2, 818], [7217])], bits=4)
    scores[0].log_likelihood
    plan = {"decoder_block_0/ffw_gating": 2}
    score_token_pairs(causal_lm, [([2, 818], [7217])], plan=plan)
    ```
    """
    bits, plan = check_precision_or_plan(model, bits, plan)
    check_batch_size(batch_size)
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ValueError(
            f"`max_length` must be None or a positive integer. Received: {max_length!r}."
        )

    rows = []
    for index, (context_ids, continuation_ids) in enumerate(token_pairs):
        if not len(context_ids) or not len(continuation_ids):
            raise ValueError(
                f"Request {index} has {len(context_ids)} context and "
                f"{len(continuation_ids)} continuation tokens; both need at "
                "least one."
            )
        inputs, targets = _truncate(context_ids, continuation_ids, max_length, index)
        rows.append((inputs, targets, len(continuation_ids)))

    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    score = sequence_scorer(model, bits, batch_size=batch_size, plan=plan)
    progress = None
    if verbose:
        logger.info(
            "Scoring %d continuations at %s.",
            len(rows),
            evaluation_label(model, bits, plan),
        )
        progress = keras.utils.Progbar(len(rows), unit_name="request")

    results = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        length = _padded_length(len(rows[batch[0]][0]), max_length)
        token_ids = np.zeros((len(batch), length), dtype="int32")
        padding_mask = np.zeros((len(batch), length), dtype="int32")
        targets = np.zeros((len(batch), length), dtype="int32")
        weights = np.zeros((len(batch), length), dtype="float32")
        for row, index in enumerate(batch):
            inputs, target_ids, num_scored = rows[index]
            token_ids[row, : len(inputs)] = inputs
            padding_mask[row, : len(inputs)] = 1
            targets[row, : len(target_ids)] = target_ids
            weights[row, len(target_ids) - num_scored : len(target_ids)] = 1.0

        scores = score(
            {"token_ids": token_ids, "padding_mask": padding_mask}, targets, weights
        )
        for row, index in enumerate(batch):
            results[index] = ContinuationScore(
                log_likelihood=float(scores.log_likelihood[row]),
                is_greedy=bool(scores.is_greedy[row]),
                num_tokens=rows[index][2],
            )
        if progress is not None:
            progress.add(len(batch))
    return results


def score_continuations(
    model,
    tokenizer,
    pairs,
    bits=DEFAULT_BITS,
    batch_size=8,
    add_bos=True,
    max_length=None,
    verbose=True,
    plan=None,
):
    """Score text continuations given text contexts at a precision or plan.

    Args:
        model: a causal LM `keras.Model` that maps
            `{"token_ids", "padding_mask"}` to logits.
        tokenizer: the model's KerasHub tokenizer.
        pairs: list of `(context, continuation)` str pairs.
        bits: int in `1..8`, the precision, or None for the float master
            weights. Defaults to 8. Leave it at its default (or None) when
            `plan` is given.
        batch_size: int >= 1, requests per forward pass.
        add_bos: bool, whether to put the start token before each context.
        max_length: optional int, the maximum number of input positions.
        verbose: bool, whether to log the precision or plan and show a
            progress bar.
        plan: optional dict `{layer_path: bits}` (Mix'n'Match) in place of
            `bits`; see `keras_matquant.evaluation.sequence_scorer` for the
            layers it does not name.

    Returns:
        A list of `ContinuationScore`, in the order of `pairs`.

    Raises:
        ValueError: if an argument or a pair is invalid (see
            `encode_pairs` and `score_token_pairs`), or both an explicit
            `bits` and `plan` are given.

    Example:

    ```python
    tokenizer = causal_lm.preprocessor.tokenizer
    score_continuations(causal_lm, tokenizer, [("The sky is", " blue")], bits=2)
    plan = {"decoder_block_0/ffw_gating": 2}
    score_continuations(causal_lm, tokenizer, [("The sky is", " blue")], plan=plan)
    ```
    """
    bits, plan = check_precision_or_plan(model, bits, plan)
    token_pairs = encode_pairs(tokenizer, pairs, add_bos=add_bos)
    return score_token_pairs(
        model,
        token_pairs,
        bits=bits,
        batch_size=batch_size,
        max_length=max_length,
        verbose=verbose,
        plan=plan,
    )
