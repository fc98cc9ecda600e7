"""Overlapping token windows that score every token of a stream once."""

import numpy as np

from keras_matquant.data.text import LanguageModelingData
from keras_matquant.data.text import join_token_lists


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {value!r}.")
    return int(value)


def sliding_window_data(
    token_lists, sequence_length, stride=None, bos_id=None, separator_ids=()
):
    """Cut a token stream into sliding windows for perplexity evaluation.

    The documents are joined into one stream with `separator_ids` between
    them. Window k reads up to `W` stream tokens from position `k * stride`,
    where `W = sequence_length` when `bos_id` is given (the window is
    `[bos_id] + stream[k * stride : k * stride + W]`) and
    `W = sequence_length + 1` without it. The model input is the window
    minus its last token, so every input has `sequence_length` positions.

    Each stream token is a weighted target exactly once, in the first window
    that predicts it, so a token is scored with at most `W - 1` stream tokens
    of context (plus the BOS token). After the first window every scored
    token sees at least `W - stride` stream tokens of context. The last
    window is moved back to end at the end of the stream, so it also has
    full context. Without `bos_id` the first stream token has no context and
    is never scored. A stream shorter than one window gives one window padded
    on the right, with `padding_mask` and weight 0 on the padding.

    With `bos_id` and `stride == sequence_length` the windows are those of
    `pack_token_sequences`, plus one window for the tail that it drops.

    Args:
        token_lists: iterable of lists (or 1-D arrays) of int token ids.
        sequence_length: int >= 1, input positions per window.
        stride: int in `1..sequence_length`, stream tokens between the starts
            of two windows. Defaults to None, which uses `sequence_length`
            (disjoint windows).
        bos_id: int or None. When given, the beginning-of-sequence id put
            first in every window.
        separator_ids: sequence of int ids placed between documents.

    Returns:
        A `LanguageModelingData` whose `sample_weight` is 1 on the targets
        that each window scores and 0 elsewhere.

    Raises:
        ValueError: if `sequence_length` or `stride` is not a positive
            integer, `stride > sequence_length`, or the stream has no token
            to score.

    Example:

    >>> data = sliding_window_data([[5, 6, 7, 8]], 3, stride=1, bos_id=2)
    >>> data.x["token_ids"]  # [[2, 5, 6], [2, 6, 7]]
    >>> data.y  # [[5, 6, 7], [6, 7, 8]]
    >>> data.sample_weight  # [[1, 1, 1], [0, 0, 1]]
    """
    sequence_length = _check_positive_int(sequence_length, "sequence_length")
    if stride is None:
        stride = sequence_length
    stride = _check_positive_int(stride, "stride")
    if stride > sequence_length:
        raise ValueError(
            f"`stride` ({stride}) is larger than `sequence_length` "
            f"({sequence_length}), so some tokens would never be scored. Use "
            f"a stride in 1..{sequence_length}."
        )
    stream = np.asarray(join_token_lists(token_lists, separator_ids), dtype="int32")
    prefix = [] if bos_id is None else [int(bos_id)]
    # Stream tokens per window, and the position in the window of the first
    # stream token that is a target.
    window_tokens = sequence_length + 1 - len(prefix)
    first_target = 1 - len(prefix)
    if len(stream) <= first_target:
        raise ValueError(
            f"The text has {len(stream)} tokens and nothing to score. "
            "Provide at least one token with `bos_id`, or two without it."
        )

    rows = []
    next_unscored = first_target
    start = 0
    while next_unscored < len(stream):
        start = min(start, max(len(stream) - window_tokens, 0))
        chunk = stream[start : start + window_tokens]
        window = np.concatenate([np.asarray(prefix, dtype="int32"), chunk])
        # Stream index of each target of this window.
        target_index = start + first_target + np.arange(len(window) - 1)
        weights = (target_index >= next_unscored).astype("float32")
        rows.append((window, weights))
        next_unscored = start + len(chunk)
        start += stride

    token_ids = np.zeros((len(rows), sequence_length), dtype="int32")
    targets = np.zeros((len(rows), sequence_length), dtype="int32")
    padding_mask = np.zeros((len(rows), sequence_length), dtype="int32")
    sample_weight = np.zeros((len(rows), sequence_length), dtype="float32")
    for row, (window, weights) in enumerate(rows):
        length = len(window) - 1
        token_ids[row, :length] = window[:-1]
        targets[row, :length] = window[1:]
        padding_mask[row, :length] = 1
        sample_weight[row, :length] = weights
    return LanguageModelingData(
        x={"token_ids": token_ids, "padding_mask": padding_mask},
        y=targets,
        sample_weight=sample_weight,
    )
