import math

import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from keras_matquant.data import pack_token_sequences
from keras_matquant.evaluation import evaluate_perplexity
from tests.test_training import masked_mean_cross_entropy


def tiny_heldout():
    rng = np.random.default_rng(7)
    tokens = rng.integers(3, 32, size=40).tolist()
    return pack_token_sequences([tokens], 8, bos_id=2)


@pytest.mark.parametrize("bits", [None, 8, 2])
def test_perplexity_matches_numpy(gemma3_lm, bits):
    kmq.matquantize(gemma3_lm)
    data = tiny_heldout()
    with kmq.precision(bits):
        logits = ops.convert_to_numpy(gemma3_lm(data.x))
    nll = masked_mean_cross_entropy(logits, data.y, data.sample_weight)

    result = evaluate_perplexity(gemma3_lm, data, bits=bits, batch_size=2, verbose=False)

    assert result.num_tokens == 40
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_compiled_function_follows_precision(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    data = tiny_heldout()
    int8 = evaluate_perplexity(gemma3_lm, data, bits=8, verbose=False)
    int2 = evaluate_perplexity(gemma3_lm, data, bits=2, verbose=False)
    int8_again = evaluate_perplexity(gemma3_lm, data, bits=8, verbose=False)
    assert int8.nll != int2.nll
    assert int8_again.nll == int8.nll


def test_weight_mask_respected(gemma3_lm):
    data = tiny_heldout()
    masked = data._replace(sample_weight=np.concatenate(
        [np.ones((5, 4), "float32"), np.zeros((5, 4), "float32")], axis=1
    ))
    result = evaluate_perplexity(gemma3_lm, masked, bits=None, verbose=False)
    assert result.num_tokens == 20


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_invalid_batch_size_rejected(gemma3_lm, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_perplexity(gemma3_lm, tiny_heldout(), batch_size=batch_size)


def test_invalid_bits_rejected(gemma3_lm):
    with pytest.raises(ValueError, match="precision"):
        evaluate_perplexity(gemma3_lm, tiny_heldout(), bits=12)


# ---------------------------------------------------------------------------
# Shared helpers: a bigram stub whose log-likelihoods are known by hand.

import json

import keras

from keras_matquant.data import MultipleChoiceExample
from keras_matquant.data import sliding_window_data
from keras_matquant.evaluation import evaluate_heldout_perplexity
from keras_matquant.evaluation import evaluate_multiple_choice
from keras_matquant.evaluation import example_requests
from keras_matquant.evaluation import score_continuations
from keras_matquant.evaluation import score_token_pairs
from tests.stub_models import A
from tests.stub_models import B
from tests.stub_models import BOS
from tests.stub_models import LN2
from tests.stub_models import NEWLINE
from tests.stub_models import SPACE
from tests.stub_models import CharTokenizer
from tests.stub_models import bigram_stub


def numpy_log_likelihood(model, context_ids, continuation_ids, bits):
    """Reference: one unpadded forward pass and a float64 log-softmax."""
    tokens = np.asarray(list(context_ids) + list(continuation_ids), dtype="int32")
    inputs = {
        "token_ids": tokens[None, :-1],
        "padding_mask": np.ones((1, len(tokens) - 1), dtype="int32"),
    }
    with kmq.precision(bits):
        logits = np.asarray(ops.convert_to_numpy(model(inputs)), dtype="float64")[0]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    targets = tokens[1:]
    positions = np.arange(len(tokens) - 1 - len(continuation_ids), len(tokens) - 1)
    return float(log_probs[positions, targets[positions]].sum())


# ---------------------------------------------------------------------------
# Sliding windows.


def test_sliding_windows_hand_example():
    data = sliding_window_data([[5, 6, 7, 8]], 3, stride=1, bos_id=2)
    np.testing.assert_array_equal(data.x["token_ids"], [[2, 5, 6], [2, 6, 7]])
    np.testing.assert_array_equal(data.y, [[5, 6, 7], [6, 7, 8]])
    np.testing.assert_array_equal(data.sample_weight, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(data.x["padding_mask"], np.ones((2, 3)))


def test_sliding_windows_without_bos():
    data = sliding_window_data([[5, 6, 7, 8, 9]], 2, stride=1)
    # Windows of 3 stream tokens; 5 is never a target.
    np.testing.assert_array_equal(data.x["token_ids"], [[5, 6], [6, 7], [7, 8]])
    np.testing.assert_array_equal(data.y, [[6, 7], [7, 8], [8, 9]])
    np.testing.assert_array_equal(data.sample_weight, [[1, 1], [0, 1], [0, 1]])


def test_sliding_windows_short_stream_padded():
    data = sliding_window_data([[5, 6]], 4, bos_id=2)
    np.testing.assert_array_equal(data.x["token_ids"], [[2, 5, 0, 0]])
    np.testing.assert_array_equal(data.y, [[5, 6, 0, 0]])
    np.testing.assert_array_equal(data.x["padding_mask"], [[1, 1, 0, 0]])
    np.testing.assert_array_equal(data.sample_weight, [[1, 1, 0, 0]])


def test_sliding_windows_tail_window_moved_back():
    data = sliding_window_data([[10, 11, 12, 13, 14, 15]], 4, bos_id=2)
    np.testing.assert_array_equal(
        data.x["token_ids"], [[2, 10, 11, 12], [2, 12, 13, 14]]
    )
    np.testing.assert_array_equal(data.y, [[10, 11, 12, 13], [12, 13, 14, 15]])
    np.testing.assert_array_equal(data.sample_weight, [[1, 1, 1, 1], [0, 0, 1, 1]])


def test_sliding_windows_disjoint_match_packing():
    stream = list(range(10, 22))
    windows = sliding_window_data([stream], 4, bos_id=2)
    packed = pack_token_sequences([stream], 4, bos_id=2)
    np.testing.assert_array_equal(windows.x["token_ids"], packed.x["token_ids"])
    np.testing.assert_array_equal(windows.y, packed.y)
    np.testing.assert_array_equal(windows.sample_weight, packed.sample_weight)


@pytest.mark.parametrize("bos_id", [None, 2])
@pytest.mark.parametrize("length", [1, 3, 4, 7, 20])
@pytest.mark.parametrize("sequence_length, stride", [(1, 1), (4, 1), (4, 3), (4, 4), (5, 2)])
def test_sliding_windows_score_each_token_once(bos_id, length, sequence_length, stride):
    stream = list(range(100, 100 + length))
    if bos_id is None and length < 2:
        with pytest.raises(ValueError, match="nothing to score"):
            sliding_window_data([stream], sequence_length, stride=stride)
        return
    data = sliding_window_data([stream], sequence_length, stride=stride, bos_id=bos_id)
    scored = data.y[data.sample_weight > 0].tolist()
    expected = stream if bos_id is not None else stream[1:]
    assert sorted(scored) == expected
    window_tokens = sequence_length if bos_id is not None else sequence_length + 1
    for row in range(data.num_sequences):
        targets = np.flatnonzero(data.sample_weight[row])
        # The target at position p follows inputs 0..p, and a BOS input is
        # not a text token.
        context = targets if bos_id is not None else targets + 1
        assert context.max() <= window_tokens - 1
        if row > 0:
            assert context.min() >= window_tokens - stride


@pytest.mark.parametrize(
    "sequence_length, stride, message",
    [(0, None, "sequence_length"), (4, 0, "stride"), (4, 5, "1..4"), (4, 1.5, "stride")],
)
def test_sliding_windows_invalid_arguments(sequence_length, stride, message):
    with pytest.raises(ValueError, match=message):
        sliding_window_data([[1, 2, 3]], sequence_length, stride=stride, bos_id=2)


def test_sliding_windows_empty_text_rejected():
    with pytest.raises(ValueError, match="0 tokens"):
        sliding_window_data([[]], 4, bos_id=2)


# ---------------------------------------------------------------------------
# Perplexity with the bigram stub: every value below is a multiple of ln 2.


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_heldout_perplexity_hand_computed(stride):
    # Stream: a b \n \n b a after <bos>. Bigram exponents: bos->a 1, a->b 2,
    # b->\n 4, \n->\n 1, \n->b 3, b->a 1; 12 in total over 6 tokens. A stride
    # below the sequence length keeps each token's predecessor in its window.
    result = evaluate_heldout_perplexity(
        bigram_stub(), CharTokenizer(), ["ab", "ba"], sequence_length=4,
        stride=stride, bits=None, batch_size=2, verbose=False,
    )
    assert result.num_tokens == 6
    assert result.log_perplexity == pytest.approx(2 * LN2, abs=1e-6)
    assert result.perplexity == pytest.approx(4.0, rel=1e-6)


def test_disjoint_windows_restart_context():
    # Windows <bos> a b | <bos> \n \n | <bos> b a: the first token of each
    # window follows <bos>. Exponents 1 + 2 + 6 + 1 + 2 + 1 = 13 (bos->\n is
    # 1/64, the remainder of the bos row shared by four tokens).
    result = evaluate_heldout_perplexity(
        bigram_stub(), CharTokenizer(), ["ab", "ba"], sequence_length=2,
        bits=None, verbose=False,
    )
    assert result.num_tokens == 6
    assert result.nll == pytest.approx(13 * LN2 / 6, abs=1e-6)


def test_heldout_perplexity_max_sequences():
    result = evaluate_heldout_perplexity(
        bigram_stub(), CharTokenizer(), ["ab", "ba"], sequence_length=2,
        bits=None, max_sequences=1, verbose=False,
    )
    assert result.num_tokens == 2
    assert result.nll == pytest.approx(3 * LN2 / 2, abs=1e-6)


@pytest.mark.parametrize("max_sequences", [0, 1.5, True])
def test_heldout_perplexity_invalid_max_sequences(max_sequences):
    with pytest.raises(ValueError, match="max_sequences"):
        evaluate_heldout_perplexity(
            bigram_stub(), CharTokenizer(), ["ab"], sequence_length=2,
            max_sequences=max_sequences,
        )


@pytest.mark.parametrize("bits", [None, 2])
def test_sliding_perplexity_matches_numpy(gemma3_lm, bits):
    kmq.matquantize(gemma3_lm)
    stream = np.random.default_rng(3).integers(3, 32, size=11).tolist()
    data = sliding_window_data([stream], 4, stride=2, bos_id=2)
    with kmq.precision(bits):
        logits = ops.convert_to_numpy(gemma3_lm(data.x))
    nll = masked_mean_cross_entropy(logits, data.y, data.sample_weight)

    result = evaluate_perplexity(gemma3_lm, data, bits=bits, batch_size=3, verbose=False)

    assert result.num_tokens == 11
    assert result.nll == pytest.approx(nll, rel=1e-5)


def test_perplexity_progress_shown(capsys):
    data = sliding_window_data([[A, B, A, B, A]], 2, bos_id=BOS)
    evaluate_perplexity(bigram_stub(), data, bits=None, batch_size=2, verbose=True)
    assert "3/3" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Continuation log-likelihoods.


def test_continuation_scores_hand_computed():
    pairs = [
        ("a", " b"),   # a->' ' 1, ' '->b 2
        ("a ", "b"),   # the trailing space moves to the continuation
        ("a", " a"),   # a->' ' 1, ' '->a 1: both argmax, so greedy
        ("", "ab"),    # <bos>->a 1, a->b 2 (a->' ' is the argmax)
        ("b", "\n"),   # b->\n 4
    ]
    scores = score_continuations(
        bigram_stub(), CharTokenizer(), pairs, bits=None, batch_size=2, verbose=False
    )
    expected = [-3, -3, -2, -3, -4]
    for score, exponent in zip(scores, expected):
        assert score.log_likelihood == pytest.approx(exponent * LN2, abs=1e-6)
    assert [score.is_greedy for score in scores] == [False, False, True, False, False]
    assert [score.num_tokens for score in scores] == [2, 2, 2, 2, 1]


def test_left_truncation_keeps_last_tokens():
    # Inputs <bos> a b a -> b; with max_length 2 only "b a" is read, and the
    # bigram needs just the last one.
    scores = score_token_pairs(
        bigram_stub(), [([BOS, A, B, A], [B])], bits=None, max_length=2, verbose=False
    )
    assert scores[0].log_likelihood == pytest.approx(-2 * LN2, abs=1e-6)


def test_continuation_longer_than_max_length_rejected():
    with pytest.raises(ValueError, match="max_length"):
        score_token_pairs(bigram_stub(), [([BOS], [A, B, A])], bits=None, max_length=2)


@pytest.mark.parametrize("bits", [None, 8, 2])
def test_continuations_match_numpy_at_precision(gemma3_lm, bits):
    kmq.matquantize(gemma3_lm)
    rng = np.random.default_rng(5)
    token_pairs = [
        (rng.integers(3, 32, size=n).tolist(), rng.integers(3, 32, size=m).tolist())
        for n, m in [(1, 1), (5, 3), (2, 7), (19, 2), (3, 1)]
    ]
    scores = score_token_pairs(gemma3_lm, token_pairs, bits=bits, batch_size=2, verbose=False)
    for (context, continuation), score in zip(token_pairs, scores):
        expected = numpy_log_likelihood(gemma3_lm, context, continuation, bits)
        assert score.log_likelihood == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_continuation_precision_changes_scores(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    token_pairs = [([2, 5, 9, 11], [7, 8, 3])]
    int8 = score_token_pairs(gemma3_lm, token_pairs, bits=8, verbose=False)
    int2 = score_token_pairs(gemma3_lm, token_pairs, bits=2, verbose=False)
    assert int8[0].log_likelihood != int2[0].log_likelihood


@pytest.mark.parametrize(
    "pairs, add_bos, message",
    [
        ([("a", "")], True, "no token to score"),
        ([("", "a")], False, "context is empty"),
        ([("a",)], True, "pair of str"),
        ([("a", 3)], True, "pair of str"),
    ],
)
def test_invalid_continuation_requests_rejected(pairs, add_bos, message):
    with pytest.raises(ValueError, match=message):
        score_continuations(bigram_stub(), CharTokenizer(), pairs, add_bos=add_bos)


def test_tokenizer_without_start_token_rejected():
    tokenizer = CharTokenizer()
    tokenizer.start_token_id = None
    with pytest.raises(ValueError, match="add_bos=False"):
        score_continuations(bigram_stub(), tokenizer, [("a", " b")])


# ---------------------------------------------------------------------------
# Multiple choice.

HAND_EXAMPLES = [
    # " b": a->' ' 1 + ' '->b 2 = 3; " ab": 1 + ' '->a 1 + a->b 2 = 4.
    # acc picks "b" (wrong); per character -3 vs -2 picks "ab" (right).
    {"context": "a", "choices": ["b", "ab"], "label": 1},
    # " é": b->' ' 2 + ' '->é 3 = 5; " aa": 2 + 1 + a->a 3 = 6.
    # acc picks "é" (right); per character -5 vs -3 picks "aa" (wrong);
    # per byte ("é" is 2 bytes) -2.5 vs -3 picks "é" (right).
    {"context": "b", "choices": ["é", "aa"], "label": 0},
]


def test_multiple_choice_hand_computed():
    result = evaluate_multiple_choice(
        bigram_stub(), CharTokenizer(), HAND_EXAMPLES, bits=None, batch_size=3, verbose=False
    )
    np.testing.assert_allclose(result.log_likelihoods[0], [-3 * LN2, -4 * LN2], atol=1e-6)
    np.testing.assert_allclose(result.log_likelihoods[1], [-5 * LN2, -6 * LN2], atol=1e-6)
    assert result.acc == 0.5
    assert result.acc_norm == 0.5
    assert result.acc_bytes == 1.0
    assert result.num_examples == 2


def test_partial_scoring_hand_computed():
    # Winogrande style: "a_ b" with options a / b. Scored: " b" after "aa"
    # (a->' ' 1, ' '->b 2 = 3) and after "ab" (b->' ' 2, ' '->b 2 = 4).
    example = MultipleChoiceExample("a", ("a", "b"), 0, continuation="b")
    assert example_requests(example) == [("aa", " b"), ("ab", " b")]
    result = evaluate_multiple_choice(
        bigram_stub(), CharTokenizer(), [example], bits=None, verbose=False
    )
    np.testing.assert_allclose(result.log_likelihoods[0], [-3 * LN2, -4 * LN2], atol=1e-6)
    assert result.acc == 1.0
    assert result.acc_norm == 1.0


def test_multiple_choice_delimiter():
    example = MultipleChoiceExample("a", ("b", "a"), 0)
    assert example_requests(example, delimiter="\n") == [("a", "\nb"), ("a", "\na")]


@pytest.mark.parametrize("bits", [None, 4, 2])
def test_multiple_choice_matches_numpy_at_precision(gemma3_lm, bits):
    kmq.matquantize(gemma3_lm)
    tokenizer = CharTokenizer()
    examples = HAND_EXAMPLES + [
        {"context": "ab\nb", "choices": ["a", "bab", "é b"], "label": 2},
    ]
    result = evaluate_multiple_choice(
        gemma3_lm, tokenizer, examples, bits=bits, batch_size=4, verbose=False
    )

    correct = 0
    for row, log_likelihoods in zip(examples, result.log_likelihoods):
        context_ids = [BOS] + tokenizer([row["context"]])[0]
        expected = [
            numpy_log_likelihood(gemma3_lm, context_ids, tokenizer([" " + c])[0], bits)
            for c in row["choices"]
        ]
        np.testing.assert_allclose(log_likelihoods, expected, rtol=1e-4, atol=1e-4)
        correct += int(np.argmax(expected) == row["label"])
    assert result.acc == correct / len(examples)


def test_multiple_choice_progress_shown(capsys):
    evaluate_multiple_choice(
        bigram_stub(), CharTokenizer(), HAND_EXAMPLES, bits=None, verbose=True
    )
    assert "4/4" in capsys.readouterr().out


@pytest.mark.parametrize(
    "row, message",
    [
        ({"context": "a", "choices": [], "label": 0}, "at least 2"),
        ({"context": "a", "choices": ["b"], "label": 0}, "at least 2"),
        ({"context": "a", "choices": ["b", "a"], "label": 2}, "0..1"),
        ({"context": "a", "choices": ["b", "a"], "label": -1}, "0..1"),
        ({"context": "a", "choices": ["b", "a"], "label": True}, "0..1"),
        ({"context": "a", "choices": ["b", "a"], "label": "0"}, "0..1"),
        ({"context": "a", "choices": ["b", ""], "label": 0}, "choice 1"),
        ({"context": "a", "choices": "ba", "label": 0}, "list of at least 2"),
        ({"context": 3, "choices": ["b", "a"], "label": 0}, "context"),
        ({"choices": ["b", "a"], "label": 0}, "missing key.*context"),
        ({"context": "a", "choices": ["b", "a"]}, "missing key.*label"),
        ({"context": "a", "choices": ["b", "a"], "label": 0, "continuation": ""}, "continuation"),
    ],
)
def test_invalid_multiple_choice_rows_rejected(row, message):
    with pytest.raises(ValueError, match=message):
        evaluate_multiple_choice(bigram_stub(), CharTokenizer(), [row], verbose=False)


def test_empty_examples_rejected():
    with pytest.raises(ValueError, match="empty"):
        evaluate_multiple_choice(bigram_stub(), CharTokenizer(), [], verbose=False)


@pytest.mark.parametrize("bits", [0, 9, "4", 2.0])
def test_multiple_choice_invalid_bits_rejected(bits):
    with pytest.raises(ValueError, match="precision"):
        evaluate_multiple_choice(bigram_stub(), CharTokenizer(), HAND_EXAMPLES, bits=bits)


def test_multiple_choice_invalid_batch_size_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_multiple_choice(
            bigram_stub(), CharTokenizer(), HAND_EXAMPLES, batch_size=0
        )
