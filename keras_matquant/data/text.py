"""Text to packed, fixed-length token sequences for causal LM training."""

from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

BUNDLED_FILES = ("wikipedia.txt", "nyt.txt")
HELDOUT_FRACTION = 0.1
SPLITS = ("train", "heldout")


class LanguageModelingData(NamedTuple):
    """Inputs, targets and token weights for next-token prediction.

    Attributes:
        x: dict with `"token_ids"` and `"padding_mask"`, int32 arrays of shape
            `(num_sequences, sequence_length)`, the input of a KerasHub
            causal LM.
        y: int32 array `(num_sequences, sequence_length)`, the next token of
            each input position.
        sample_weight: float32 array of the same shape, 1 for every target
            token that counts.
    """

    x: dict
    y: np.ndarray
    sample_weight: np.ndarray

    @property
    def num_sequences(self):
        """Number of sequences."""
        return int(self.y.shape[0])

    @property
    def num_tokens(self):
        """Number of target tokens that count (sum of the weights)."""
        return int(self.sample_weight.sum())

    def take(self, count, start=0):
        """Return sequences `start .. start + count - 1` as new data."""
        end = start + count
        return LanguageModelingData(
            x={key: value[start:end] for key, value in self.x.items()},
            y=self.y[start:end],
            sample_weight=self.sample_weight[start:end],
        )


def load_bundled_paragraphs(split="train"):
    """Load the real English paragraphs that ship with the package.

    Wikipedia and New York Times paragraphs from SQuADShifts (CC BY 4.0);
    `keras_matquant/data/text/SOURCES.md` gives their origin. The last 10% of
    each file is the held-out split.

    Args:
        split: `"train"` or `"heldout"`.

    Returns:
        A list of paragraph strings.

    Raises:
        ValueError: if `split` is unknown.

    Example:

    >>> paragraphs = load_bundled_paragraphs("heldout")
    """
    if split not in SPLITS:
        raise ValueError(
            f"Unknown split {split!r}. Accepted splits: {', '.join(SPLITS)}."
        )
    paragraphs = []
    for path in bundled_text_paths():
        lines = path.read_text(encoding="utf-8").splitlines()
        paragraphs.extend(split_paragraphs(lines, split))
    return paragraphs


def bundled_text_paths():
    """Return the paths of the bundled text files, one paragraph a line.

    Returns:
        A list of `pathlib.Path`, Wikipedia first, then New York Times.

    Example:

    >>> [path.name for path in bundled_text_paths()]
    ['wikipedia.txt', 'nyt.txt']
    """
    folder = resources.files("keras_matquant.data").joinpath("text")
    return [Path(str(folder.joinpath(name))) for name in BUNDLED_FILES]


def split_paragraphs(lines, split, heldout_fraction=HELDOUT_FRACTION):
    """Return the train or held-out part of one file's non-blank lines.

    The held-out part is the last `round(n * heldout_fraction)` of the `n`
    non-blank lines, and the train part is everything before it.

    Args:
        lines: list of str, the lines of one file.
        split: `"train"` or `"heldout"`.
        heldout_fraction: float in `[0, 1]`. Defaults to 0.1.

    Returns:
        A list of the non-blank lines of that part, in file order.

    Raises:
        ValueError: if `split` is unknown.

    Example:

    >>> split_paragraphs(["a", "", "b", "c", "d"], "heldout", 0.25)
    ['d']
    """
    if split not in SPLITS:
        raise ValueError(
            f"Unknown split {split!r}. Accepted splits: {', '.join(SPLITS)}."
        )
    lines = [line for line in lines if line.strip()]
    boundary = len(lines) - int(round(len(lines) * heldout_fraction))
    return lines[:boundary] if split == "train" else lines[boundary:]


def join_token_lists(token_lists, separator_ids=()):
    """Concatenate tokenized documents into one stream.

    Args:
        token_lists: iterable of lists (or 1-D arrays) of int token ids.
        separator_ids: sequence of int ids placed between documents.

    Returns:
        A list of int token ids.

    Example:

    >>> join_token_lists([[5, 6], [7]], separator_ids=[1])
    [5, 6, 1, 7]
    """
    separator = [int(i) for i in separator_ids]
    stream = []
    for index, tokens in enumerate(token_lists):
        if index and separator:
            stream.extend(separator)
        stream.extend(int(t) for t in tokens)
    return stream


def pack_token_sequences(token_lists, sequence_length, bos_id, separator_ids=()):
    """Concatenate tokenized documents and cut them into training windows.

    The documents are joined into one stream with `separator_ids` between
    them, and the stream is cut into non-overlapping chunks of
    `sequence_length` tokens. Each window is `[bos_id] + chunk`. Its input is
    the first `sequence_length` tokens and its targets the last
    `sequence_length`, so every stream token is predicted exactly once. A
    final chunk shorter than `sequence_length` is dropped.

    Args:
        token_lists: iterable of lists (or 1-D arrays) of int token ids.
        sequence_length: int >= 1, tokens per input sequence.
        bos_id: int, the beginning-of-sequence id put first in each window.
        separator_ids: sequence of int ids placed between documents.

    Returns:
        A `LanguageModelingData` with all-ones padding mask and weights.

    Raises:
        ValueError: if `sequence_length` is not a positive integer or the
            text does not fill a single window.

    Example:

    >>> data = pack_token_sequences([[5, 6, 7], [8, 9]], 2, bos_id=2)
    >>> data.x["token_ids"]  # [[2, 5], [2, 7]]
    >>> data.y  # [[5, 6], [7, 8]]
    """
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int):
        raise ValueError(
            "`sequence_length` must be a positive integer. "
            f"Received: {sequence_length!r}."
        )
    if sequence_length < 1:
        raise ValueError(
            f"`sequence_length` must be a positive integer. Received: {sequence_length}."
        )
    stream = join_token_lists(token_lists, separator_ids)

    num_windows = len(stream) // sequence_length
    if num_windows == 0:
        raise ValueError(
            f"The text has {len(stream)} tokens, fewer than one sequence of "
            f"{sequence_length}. Provide more text or a shorter sequence_length."
        )
    chunks = np.asarray(stream[: num_windows * sequence_length], dtype="int32")
    chunks = chunks.reshape(num_windows, sequence_length)
    bos = np.full((num_windows, 1), bos_id, dtype="int32")
    windows = np.concatenate([bos, chunks], axis=1)

    token_ids = windows[:, :-1]
    return LanguageModelingData(
        x={
            "token_ids": token_ids,
            "padding_mask": np.ones_like(token_ids, dtype="int32"),
        },
        y=windows[:, 1:],
        sample_weight=np.ones(token_ids.shape, dtype="float32"),
    )


def tokenize_paragraphs(tokenizer, paragraphs, batch_size=256):
    """Tokenize paragraphs with a KerasHub tokenizer, without special tokens.

    Args:
        tokenizer: a KerasHub tokenizer (e.g. `Gemma3Tokenizer`).
        paragraphs: list of str.
        batch_size: int, paragraphs tokenized per call.

    Returns:
        A list of lists of int token ids, one per paragraph.

    Example:

    ```python
    tokens = tokenize_paragraphs(causal_lm.preprocessor.tokenizer, ["Hi."])
    ```
    """
    token_lists = []
    for start in range(0, len(paragraphs), batch_size):
        batch = tokenizer(paragraphs[start : start + batch_size])
        if hasattr(batch, "to_list"):
            batch = batch.to_list()
        token_lists.extend([int(t) for t in row] for row in batch)
    return token_lists


def language_modeling_data(
    tokenizer, paragraphs, sequence_length, max_sequences=None
):
    """Tokenize paragraphs and pack them into causal LM sequences.

    Paragraphs are separated by a blank line (`"\\n\\n"`) and every window
    starts with the tokenizer's start token.

    Args:
        tokenizer: a KerasHub tokenizer with a `start_token_id`.
        paragraphs: list of str.
        sequence_length: int, tokens per sequence.
        max_sequences: optional int, keep at most this many sequences.

    Returns:
        A `LanguageModelingData`.

    Example:

    ```python
    tokenizer = causal_lm.preprocessor.tokenizer
    heldout = language_modeling_data(
        tokenizer, load_bundled_paragraphs("heldout"), 512
    )
    ```
    """
    separator = tokenize_paragraphs(tokenizer, ["\n\n"])[0]
    data = pack_token_sequences(
        tokenize_paragraphs(tokenizer, paragraphs),
        sequence_length,
        bos_id=tokenizer.start_token_id,
        separator_ids=separator,
    )
    if max_sequences is not None and max_sequences < data.num_sequences:
        data = data.take(max_sequences)
    return data
