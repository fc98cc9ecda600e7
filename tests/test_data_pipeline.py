"""Packed tf.data pipelines and `MatQuantModel.fit` on them, on every backend."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_matquant as kmq
from keras_matquant.data import iter_token_windows
from keras_matquant.data import language_modeling_data
from keras_matquant.data import load_bundled_paragraphs
from keras_matquant.data import pack_token_sequences
from keras_matquant.data import packed_dataset
from tests.test_cli import tiny_gemma3_with_tokenizer

NEWLINE = 10  # ByteTokenizer id of "\n"


def collect(dataset):
    """Concatenate the batches of a packed dataset into numpy arrays."""
    batches = list(dataset.as_numpy_iterator())
    x = {
        key: np.concatenate([batch[0][key] for batch in batches])
        for key in ("token_ids", "padding_mask")
    }
    y = np.concatenate([batch[1] for batch in batches])
    weights = np.concatenate([batch[2] for batch in batches])
    return x, y, weights


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_gemma3_with_tokenizer().preprocessor.tokenizer


def test_windows_hand_example():
    windows = iter_token_windows([[5, 6, 7], [8, 9]], 2, bos_id=2, separator_ids=[1])
    assert [w.tolist() for w in windows] == [[2, 5, 6], [2, 7, 1], [2, 8, 9]]


def test_windows_drop_short_tail():
    windows = iter_token_windows([[5, 6, 7]], 2, bos_id=2)
    assert [w.tolist() for w in windows] == [[2, 5, 6]]


def test_windows_match_in_memory_packing():
    rng = np.random.default_rng(0)
    token_lists = [
        rng.integers(3, 50, size=rng.integers(0, 40)).tolist() for _ in range(30)
    ]
    expected = pack_token_sequences(token_lists, 7, bos_id=2, separator_ids=[1, 1])

    windows = np.stack(list(iter_token_windows(token_lists, 7, 2, [1, 1])))

    np.testing.assert_array_equal(windows[:, :-1], expected.x["token_ids"])
    np.testing.assert_array_equal(windows[:, 1:], expected.y)


def test_byte_tokenizer_hand_example():
    # "abc" + "\n\n" + "de" -> 97 98 99 10 10 100 101, cut after 3 and 6.
    dataset = packed_dataset(
        ["abc", "de"], keras_hub.tokenizers.ByteTokenizer(), 3, 1, bos_id=2
    )
    x, y, weights = collect(dataset)

    np.testing.assert_array_equal(
        x["token_ids"], [[2, 97, 98], [2, NEWLINE, NEWLINE]]
    )
    np.testing.assert_array_equal(y, [[97, 98, 99], [NEWLINE, NEWLINE, 100]])
    np.testing.assert_array_equal(x["padding_mask"], np.ones((2, 3)))
    np.testing.assert_array_equal(weights, np.ones((2, 3)))


def test_empty_separator_joins_texts():
    dataset = packed_dataset(
        ["abc", "de"], keras_hub.tokenizers.ByteTokenizer(), 2, 1, bos_id=2, separator=""
    )
    _, y, _ = collect(dataset)
    np.testing.assert_array_equal(y, [[97, 98], [99, 100]])


@pytest.mark.parametrize("source", ["list", "tf.data"])
def test_packing_matches_language_modeling_data(tokenizer, source):
    paragraphs = load_bundled_paragraphs("heldout")[:40]
    expected = language_modeling_data(tokenizer, paragraphs, 32)
    texts = paragraphs if source == "list" else tf.data.Dataset.from_tensor_slices(paragraphs)

    x, y, weights = collect(packed_dataset(texts, tokenizer, 32, 4, tokenize_batch_size=7))

    count = expected.num_sequences // 4 * 4
    assert count >= 8
    assert y.shape == (count, 32)
    np.testing.assert_array_equal(x["token_ids"], expected.x["token_ids"][:count])
    np.testing.assert_array_equal(x["padding_mask"], expected.x["padding_mask"][:count])
    np.testing.assert_array_equal(y, expected.y[:count])
    np.testing.assert_array_equal(weights, expected.sample_weight[:count])


def test_batches_have_static_shape(tokenizer):
    dataset = packed_dataset(load_bundled_paragraphs("heldout")[:10], tokenizer, 16, 3)
    x_spec, y_spec, weight_spec = dataset.element_spec
    assert tuple(x_spec["token_ids"].shape) == (3, 16)
    assert tuple(y_spec.shape) == (3, 16)
    assert tuple(weight_spec.shape) == (3, 16)
    assert (x_spec["token_ids"].dtype, y_spec.dtype, weight_spec.dtype) == (
        tf.int32,
        tf.int32,
        tf.float32,
    )


def test_every_epoch_reads_texts_again(tokenizer):
    dataset = packed_dataset(load_bundled_paragraphs("heldout")[:10], tokenizer, 16, 2)
    first, second = collect(dataset), collect(dataset)
    np.testing.assert_array_equal(first[1], second[1])
    assert first[1].shape[0] >= 4


def test_shuffle_permutes_windows(tokenizer):
    paragraphs = load_bundled_paragraphs("heldout")[:20]
    _, ordered, _ = collect(packed_dataset(paragraphs, tokenizer, 16, 1))
    _, shuffled, _ = collect(
        packed_dataset(paragraphs, tokenizer, 16, 1, shuffle_buffer_size=100, seed=3)
    )
    assert not np.array_equal(ordered, shuffled)
    order = np.lexsort(ordered.T[::-1])
    np.testing.assert_array_equal(ordered[order], shuffled[np.lexsort(shuffled.T[::-1])])


def test_fit_on_pipeline_equals_fit_on_arrays():
    paragraphs = load_bundled_paragraphs("heldout")[:30]
    sequence_length, batch_size, num_batches = 16, 2, 3

    def train(data_kind):
        causal_lm = tiny_gemma3_with_tokenizer()
        kmq.matquantize(causal_lm)
        tokenizer = causal_lm.preprocessor.tokenizer
        trainer = kmq.MatQuantModel(causal_lm)
        trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5))
        if data_kind == "pipeline":
            dataset = packed_dataset(
                tf.data.Dataset.from_tensor_slices(paragraphs),
                tokenizer,
                sequence_length,
                batch_size,
            ).take(num_batches)
            # A repeated stream with steps_per_epoch, as for C4: the
            # dataset's length is unknown until the texts are read.
            history = trainer.fit(
                dataset.repeat(), steps_per_epoch=num_batches, epochs=2,
                shuffle=False, verbose=0,
            )
        else:
            data = language_modeling_data(tokenizer, paragraphs, sequence_length)
            data = data.take(batch_size * num_batches)
            history = trainer.fit(
                data.x, data.y, sample_weight=data.sample_weight,
                batch_size=batch_size, epochs=2, shuffle=False, verbose=0,
            )
        assert int(ops.convert_to_numpy(trainer.optimizer.iterations)) == 2 * num_batches
        kernels = [ops.convert_to_numpy(v) for v in causal_lm.trainable_weights]
        return history.history, kernels

    pipeline_history, pipeline_weights = train("pipeline")
    array_history, array_weights = train("arrays")

    assert len(pipeline_history["loss"]) == 2
    for key in ("loss", "loss_int8", "loss_int4", "loss_int2"):
        np.testing.assert_allclose(pipeline_history[key], array_history[key], rtol=1e-5)
    assert pipeline_history["loss"][1] < pipeline_history["loss"][0]
    for pipeline_value, array_value in zip(pipeline_weights, array_weights):
        np.testing.assert_allclose(pipeline_value, array_value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"sequence_length": 0}, "`sequence_length` must be a positive integer"),
        ({"sequence_length": 8.0}, "`sequence_length` must be a positive integer"),
        ({"batch_size": True}, "`batch_size` must be a positive integer"),
        ({"shuffle_buffer_size": 0}, "`shuffle_buffer_size` must be a positive"),
        ({"tokenize_batch_size": -1}, "`tokenize_batch_size` must be a positive"),
        ({"texts": iter(["abc"])}, "read once per epoch.*list_iterator"),
        ({"texts": "abc"}, "read once per epoch.*str"),
        ({"bos_id": None}, "ByteTokenizer has no start token.*`bos_id`"),
    ],
)
def test_invalid_pipeline_arguments_rejected(arguments, message):
    arguments = {
        "texts": ["abc"],
        "tokenizer": keras_hub.tokenizers.ByteTokenizer(),
        "sequence_length": 2,
        "batch_size": 1,
        "bos_id": 2,
        **arguments,
    }
    with pytest.raises(ValueError, match=message):
        packed_dataset(**arguments)
