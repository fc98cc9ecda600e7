"""Streaming `tf.data` pipelines of packed token windows for `fit`.

Texts are tokenized with any KerasHub tokenizer, joined into one token
stream and cut into fixed-length windows, as `pack_token_sequences` does
for a list in memory, but without holding the corpus in memory. Batches
have a fixed shape, so a jit-compiled train step compiles once per fit.
"""

from collections.abc import Iterator

import numpy as np

from keras_matquant.data.text import tokenize_paragraphs


def iter_token_windows(token_lists, sequence_length, bos_id, separator_ids=()):
    """Yield `[bos_id] + chunk` windows from a stream of tokenized documents.

    The documents are joined with `separator_ids` between them and cut into
    consecutive chunks of `sequence_length` tokens. A final chunk that is
    shorter is dropped. The windows are those of `pack_token_sequences`,
    produced one at a time.

    Args:
        token_lists: iterable of lists (or 1-D arrays) of int token ids.
        sequence_length: int >= 1, tokens per chunk.
        bos_id: int, the id put first in every window.
        separator_ids: sequence of int ids placed between documents.

    Yields:
        int32 arrays of shape `(sequence_length + 1,)`.

    Example:

    >>> [w.tolist() for w in iter_token_windows([[5, 6, 7], [8, 9]], 2, 2)]
    [[2, 5, 6], [2, 7, 8]]
    """
    sequence_length = _check_positive_int(sequence_length, "sequence_length")
    separator = [int(i) for i in separator_ids]
    buffer = []
    for index, tokens in enumerate(token_lists):
        if index and separator:
            buffer.extend(separator)
        buffer.extend(int(t) for t in tokens)
        start = 0
        while len(buffer) - start >= sequence_length:
            chunk = buffer[start : start + sequence_length]
            start += sequence_length
            yield np.asarray([bos_id] + chunk, dtype="int32")
        del buffer[:start]


def _iter_texts(texts):
    """Yield Python strings from a `tf.data.Dataset` or a list of str."""
    if hasattr(texts, "as_numpy_iterator"):
        for text in texts.as_numpy_iterator():
            yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
    else:
        yield from texts


def _iter_token_lists(tokenizer, texts, tokenize_batch_size):
    batch = []
    for text in _iter_texts(texts):
        batch.append(text)
        if len(batch) == tokenize_batch_size:
            yield from tokenize_paragraphs(tokenizer, batch, tokenize_batch_size)
            batch = []
    if batch:
        yield from tokenize_paragraphs(tokenizer, batch, tokenize_batch_size)


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {value!r}.")
    return int(value)


def packed_dataset(
    texts,
    tokenizer,
    sequence_length,
    batch_size,
    bos_id=None,
    separator="\n\n",
    shuffle_buffer_size=None,
    seed=None,
    tokenize_batch_size=256,
):
    """Tokenize texts and pack them into a batched `tf.data.Dataset` for `fit`.

    Texts are separated by the tokens of `separator` (a blank line by
    default) and every window starts with `bos_id`. For a list of
    paragraphs the windows equal those of `language_modeling_data`. Each
    element is `(x, y, sample_weight)`: `x` is `{"token_ids",
    "padding_mask"}` and all three are `(batch_size, sequence_length)`.
    A last batch with fewer than `batch_size` windows is dropped, so every
    batch has the same shape. Tokenization runs in Python inside the
    pipeline (SentencePiece, byte-pair or any other KerasHub tokenizer), so
    the dataset works with `MatQuantModel.fit` on the JAX, TensorFlow and
    PyTorch backends. Each epoch reads `texts` again.

    NOTE: the number of batches is unknown until the texts are read, so
    the dataset has unknown cardinality. With such a dataset, Keras 3.15's
    TensorFlow backend ends each epoch with one extra step that updates no
    weight but counts in `optimizer.iterations` and in the epoch's mean
    loss. Train on `dataset.repeat()` with `steps_per_epoch` to avoid it.

    Args:
        texts: a `tf.data.Dataset` of scalar strings (as from
            `load_text_dataset`) or a list or tuple of str.
        tokenizer: a KerasHub tokenizer (e.g. `Gemma3Tokenizer`).
        sequence_length: int >= 1, tokens per input sequence.
        batch_size: int >= 1, sequences per batch.
        bos_id: int or None, the id that starts every window. None uses
            `tokenizer.start_token_id`.
        separator: str, text whose tokens go between two texts. `""` joins
            them directly.
        shuffle_buffer_size: None, or an int >= 1: shuffle windows through
            a buffer of this many before batching.
        seed: int or None, the shuffle seed.
        tokenize_batch_size: int >= 1, texts tokenized per tokenizer call.

    Returns:
        A `tf.data.Dataset` of `(x, y, sample_weight)` batches with int32
        inputs and targets and float32 weights (all ones).

    Raises:
        ValueError: if a size is not a positive integer, `texts` is a
            one-shot iterator, or the tokenizer has no start token and no
            `bos_id` is given.

    Example:

    ```python
    texts = load_text_dataset("c4/en", split="train", data_dir=data_dir)
    data = packed_dataset(texts, causal_lm.preprocessor.tokenizer, 1024, 8)
    trainer.fit(data.repeat(), steps_per_epoch=1000, epochs=1)
    ```
    """
    import tensorflow as tf

    sequence_length = _check_positive_int(sequence_length, "sequence_length")
    batch_size = _check_positive_int(batch_size, "batch_size")
    tokenize_batch_size = _check_positive_int(tokenize_batch_size, "tokenize_batch_size")
    if shuffle_buffer_size is not None:
        shuffle_buffer_size = _check_positive_int(shuffle_buffer_size, "shuffle_buffer_size")
    if isinstance(texts, Iterator) or isinstance(texts, str):
        raise ValueError(
            "`texts` must be a tf.data.Dataset or a list of str that can be "
            f"read once per epoch. Received a {type(texts).__name__}; pass "
            "`list(texts)` or a tf.data.Dataset."
        )
    if bos_id is None:
        bos_id = getattr(tokenizer, "start_token_id", None)
        if bos_id is None:
            raise ValueError(
                f"Tokenizer {type(tokenizer).__name__} has no start token. "
                "Pass the id that starts each window as `bos_id`."
            )
    separator_ids = tokenize_paragraphs(tokenizer, [separator])[0] if separator else []

    def generate():
        token_lists = _iter_token_lists(tokenizer, texts, tokenize_batch_size)
        yield from iter_token_windows(
            token_lists, sequence_length, int(bos_id), separator_ids
        )

    windows = tf.data.Dataset.from_generator(
        generate,
        output_signature=tf.TensorSpec((sequence_length + 1,), tf.int32),
    )
    if shuffle_buffer_size is not None:
        windows = windows.shuffle(shuffle_buffer_size, seed=seed)

    def to_model_inputs(batch):
        token_ids = batch[:, :-1]
        x = {"token_ids": token_ids, "padding_mask": tf.ones_like(token_ids)}
        return x, batch[:, 1:], tf.ones(tf.shape(token_ids), tf.float32)

    batches = windows.batch(batch_size, drop_remainder=True)
    return batches.map(to_model_inputs).prefetch(tf.data.AUTOTUNE)
