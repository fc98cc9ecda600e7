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


def numpy_log_likelihood(model, context_ids, continuation_ids, bits, plan=None):
    """Reference: one unpadded forward pass and a float64 log-softmax.

    With `plan`, the pass runs inside `precision_plan(model, plan)` and
    `bits` is not used.
    """
    tokens = np.asarray(list(context_ids) + list(continuation_ids), dtype="int32")
    inputs = {
        "token_ids": tokens[None, :-1],
        "padding_mask": np.ones((1, len(tokens) - 1), dtype="int32"),
    }
    scope = kmq.precision(bits) if plan is None else kmq.precision_plan(model, plan)
    with scope:
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


# ---------------------------------------------------------------------------
# Per-layer plans (Mix'n'Match) in every evaluator.

from keras_matquant.evaluation import sequence_scorer
from keras_matquant.evaluation.suite import evaluate_suite
from tests.conftest import tiny_gemma3_causal_lm

# Every MatQuant layer of `tiny_gemma3_causal_lm` after `matquantize`.
TINY_LAYER_PATHS = [
    f"decoder_block_{block}/{name}"
    for block in (0, 1)
    for name in ("ffw_gating", "ffw_gating_2", "ffw_linear")
]
# Block 0 at int2 and block 1 at int8: 5.0 effective bits, since the six
# layers have the same number of weights in pairs across blocks.
MIXED_PLAN = {path: 2 if path.startswith("decoder_block_0") else 8 for path in TINY_LAYER_PATHS}
# The mirror image of MIXED_PLAN, with the same effective bits.
MIRRORED_PLAN = {path: 10 - bits for path, bits in MIXED_PLAN.items()}


def numpy_perplexity_nll(model, data, plan=None, bits=None):
    """Reference mean NLL: one forward pass in a plan or precision scope."""
    scope = kmq.precision(bits) if plan is None else kmq.precision_plan(model, plan)
    with scope:
        logits = ops.convert_to_numpy(model(data.x))
    return masked_mean_cross_entropy(logits, data.y, data.sample_weight)


def test_tiny_model_layer_paths(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    assert list(kmq.matquant_layers(gemma3_lm)) == TINY_LAYER_PATHS
    assert kmq.effective_bits(gemma3_lm, plan=MIXED_PLAN) == 5.0


def test_perplexity_with_plan_matches_numpy(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    data = tiny_heldout()
    nll = numpy_perplexity_nll(gemma3_lm, data, plan=MIXED_PLAN)

    result = evaluate_perplexity(gemma3_lm, data, plan=MIXED_PLAN, batch_size=2, verbose=False)

    assert result.num_tokens == 40
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_mixed_plan_differs_from_each_precision(gemma3_lm):
    # Guards the references above: a plan that ran at one precision for
    # every layer would match one of these.
    kmq.matquantize(gemma3_lm)
    data = tiny_heldout()
    mixed = evaluate_perplexity(gemma3_lm, data, plan=MIXED_PLAN, verbose=False).nll
    for bits in (2, 8):
        uniform = evaluate_perplexity(gemma3_lm, data, bits=bits, verbose=False).nll
        assert mixed != pytest.approx(uniform, rel=1e-4)


def test_heldout_perplexity_with_plan_matches_numpy(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    tokenizer = CharTokenizer()
    stream = tokenizer(["ab ab\n\nba"])[0]
    data = sliding_window_data([stream], 4, stride=2, bos_id=BOS)
    nll = numpy_perplexity_nll(gemma3_lm, data, plan=MIXED_PLAN)

    result = evaluate_heldout_perplexity(
        gemma3_lm, tokenizer, ["ab ab", "ba"], sequence_length=4, stride=2,
        plan=MIXED_PLAN, batch_size=3, verbose=False,
    )

    assert result.num_tokens == len(stream)
    assert result.nll == pytest.approx(nll, rel=1e-5)


def test_plan_of_every_layer_equals_bits(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    data = tiny_heldout()
    plan = {path: 4 for path in TINY_LAYER_PATHS}
    int4 = evaluate_perplexity(gemma3_lm, data, bits=4, verbose=False)
    planned = evaluate_perplexity(gemma3_lm, data, plan=plan, verbose=False)
    assert planned.nll == pytest.approx(int4.nll, rel=1e-6)
    assert planned.num_tokens == int4.num_tokens


def test_plans_in_a_row_use_own_function(gemma3_lm):
    # On JAX each plan must get its own compiled function: a plan served by
    # a function traced for the previous plan or precision would repeat its
    # result and miss the reference.
    kmq.matquantize(gemma3_lm)
    data = tiny_heldout()
    results = {}
    for name, plan in [
        ("mixed", MIXED_PLAN), ("mirrored", MIRRORED_PLAN), ("mixed_again", MIXED_PLAN),
    ]:
        results[name] = evaluate_perplexity(gemma3_lm, data, plan=plan, verbose=False).nll
    int8 = evaluate_perplexity(gemma3_lm, data, bits=8, verbose=False).nll

    assert results["mixed"] != results["mirrored"]
    assert results["mixed_again"] == results["mixed"]
    assert results["mirrored"] == pytest.approx(
        numpy_perplexity_nll(gemma3_lm, data, plan=MIRRORED_PLAN), rel=1e-5
    )
    assert int8 == pytest.approx(numpy_perplexity_nll(gemma3_lm, data, bits=8), rel=1e-5)


def test_plan_scorer_follows_enclosing_precision(gemma3_lm):
    # Layers the plan leaves out read the enclosing `precision` scope, so
    # one scorer called inside and outside `precision(2)` gives two results.
    kmq.matquantize(gemma3_lm)
    data = tiny_heldout()
    plan = {"decoder_block_0/ffw_gating": 8}
    score = sequence_scorer(gemma3_lm, plan=plan)
    outside = score(data.x, data.y, data.sample_weight)
    with kmq.precision(2):
        inside = score(data.x, data.y, data.sample_weight)
        reference = numpy_perplexity_nll(gemma3_lm, data, plan=plan)

    inside_nll = -inside.log_likelihood.sum() / inside.num_tokens.sum()
    outside_nll = -outside.log_likelihood.sum() / outside.num_tokens.sum()
    assert inside_nll == pytest.approx(reference, rel=1e-5)
    assert outside_nll == pytest.approx(numpy_perplexity_nll(gemma3_lm, data, plan=plan), rel=1e-5)
    assert inside_nll != pytest.approx(outside_nll, rel=1e-4)


def test_continuations_with_plan_match_numpy(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    rng = np.random.default_rng(5)
    token_pairs = [
        (rng.integers(3, 32, size=n).tolist(), rng.integers(3, 32, size=m).tolist())
        for n, m in [(1, 1), (5, 3), (2, 7), (19, 2)]
    ]
    scores = score_token_pairs(
        gemma3_lm, token_pairs, plan=MIXED_PLAN, batch_size=2, verbose=False
    )
    for (context, continuation), score in zip(token_pairs, scores):
        expected = numpy_log_likelihood(gemma3_lm, context, continuation, None, plan=MIXED_PLAN)
        assert score.log_likelihood == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_text_continuations_with_plan_match_numpy(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    tokenizer = CharTokenizer()
    scores = score_continuations(
        gemma3_lm, tokenizer, [("ab", " ba"), ("b", "\na")], plan=MIXED_PLAN, verbose=False
    )
    expected = [
        numpy_log_likelihood(gemma3_lm, [BOS, A, B], [SPACE, B, A], None, plan=MIXED_PLAN),
        numpy_log_likelihood(gemma3_lm, [BOS, B], [NEWLINE, A], None, plan=MIXED_PLAN),
    ]
    for score, value in zip(scores, expected):
        assert score.log_likelihood == pytest.approx(value, rel=1e-4, abs=1e-4)


def test_multiple_choice_with_plan_matches_numpy(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    tokenizer = CharTokenizer()
    examples = HAND_EXAMPLES + [
        {"context": "ab\nb", "choices": ["a", "bab", "é b"], "label": 2},
    ]
    result = evaluate_multiple_choice(
        gemma3_lm, tokenizer, examples, plan=MIXED_PLAN, batch_size=4, verbose=False
    )

    correct = 0
    for row, log_likelihoods in zip(examples, result.log_likelihoods):
        context_ids = [BOS] + tokenizer([row["context"]])[0]
        expected = [
            numpy_log_likelihood(
                gemma3_lm, context_ids, tokenizer([" " + c])[0], None, plan=MIXED_PLAN
            )
            for c in row["choices"]
        ]
        np.testing.assert_allclose(log_likelihoods, expected, rtol=1e-4, atol=1e-4)
        correct += int(np.argmax(expected) == row["label"])
    assert result.acc == correct / len(examples)
    assert result.num_examples == 3


def test_suite_adds_plan_row(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    tokenizer = CharTokenizer()
    tasks = {"hand": HAND_EXAMPLES}
    results = evaluate_suite(
        gemma3_lm, tokenizer, [None], tasks, paragraphs=["ab ab", "ba"],
        sequence_length=4, stride=2, verbose=False, plan=MIXED_PLAN,
    )
    assert list(results) == ["float", "plan (5.00 bits)"]

    row = results["plan (5.00 bits)"]
    stream = tokenizer(["ab ab\n\nba"])[0]
    data = sliding_window_data([stream], 4, stride=2, bos_id=BOS)
    assert row["log_perplexity"] == pytest.approx(
        numpy_perplexity_nll(gemma3_lm, data, plan=MIXED_PLAN), rel=1e-5
    )
    correct = 0
    for example in HAND_EXAMPLES:
        context_ids = [BOS] + tokenizer([example["context"]])[0]
        expected = [
            numpy_log_likelihood(
                gemma3_lm, context_ids, tokenizer([" " + c])[0], None, plan=MIXED_PLAN
            )
            for c in example["choices"]
        ]
        correct += int(np.argmax(expected) == example["label"])
    assert row["tasks"]["hand"]["acc"] == correct / len(HAND_EXAMPLES)
    assert row["average_acc"] == row["tasks"]["hand"]["acc"]


def test_suite_unknown_plan_path_rejected_first(gemma3_lm):
    kmq.matquantize(gemma3_lm)

    def fail(*args, **kwargs):
        raise AssertionError("no row may run before the plan is checked")

    plan = {"decoder_block_9/ffw_gating": 2}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("keras_matquant.evaluation.suite.evaluate_heldout_perplexity", fail)
        with pytest.raises(ValueError, match="Valid layer paths"):
            evaluate_suite(gemma3_lm, CharTokenizer(), [None, 8], {}, plan=plan, verbose=False)


def test_suite_needs_precision_or_plan():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_suite(bigram_stub(), CharTokenizer(), [], {}, verbose=False)


def test_format_suite_table_widens_plan_label():
    from keras_matquant.evaluation.suite import format_suite_table

    row = {"perplexity": 20.0, "log_perplexity": 2.995732, "average_acc": 0.5,
           "average_acc_norm": 0.25, "tasks": {"quartz": {"acc": 0.5, "acc_norm": 0.25}}}
    lines = format_suite_table({"float": row, "plan (3.50 bits)": row}).splitlines()
    assert lines[2].startswith("plan (3.50 bits) ")
    assert len({len(line) for line in lines}) == 1
    assert lines[2].split()[-4:] == ["20", "2.9957", "0.500/0.250", "0.500/0.250"]


EVALUATOR_CALLS = {
    "perplexity": lambda model, **kw: evaluate_perplexity(model, tiny_heldout(), verbose=False, **kw),
    "heldout": lambda model, **kw: evaluate_heldout_perplexity(
        model, CharTokenizer(), ["ab"], sequence_length=4, verbose=False, **kw
    ),
    "token_pairs": lambda model, **kw: score_token_pairs(model, [([BOS], [A])], verbose=False, **kw),
    "continuations": lambda model, **kw: score_continuations(
        model, CharTokenizer(), [("a", " b")], verbose=False, **kw
    ),
    "multiple_choice": lambda model, **kw: evaluate_multiple_choice(
        model, CharTokenizer(), HAND_EXAMPLES, verbose=False, **kw
    ),
    "scorer": lambda model, **kw: sequence_scorer(model, **kw),
}


@pytest.fixture(scope="module")
def matquantized_lm():
    keras.utils.set_random_seed(0)
    model = tiny_gemma3_causal_lm()
    kmq.matquantize(model)
    return model


@pytest.mark.parametrize("evaluator", list(EVALUATOR_CALLS))
@pytest.mark.parametrize("bits", [8, 4])
def test_plan_with_explicit_bits_rejected(matquantized_lm, evaluator, bits):
    # An explicit 8 is rejected too: only the default counts as not given.
    with pytest.raises(ValueError, match="Pass either `bits` or `plan`, not both") as error:
        EVALUATOR_CALLS[evaluator](matquantized_lm, bits=bits, plan=MIXED_PLAN)
    assert f"bits={bits}" in str(error.value)


def test_plan_with_bits_none_equals_plan_alone(matquantized_lm):
    data = tiny_heldout()
    alone = evaluate_perplexity(matquantized_lm, data, plan=MIXED_PLAN, verbose=False)
    with_none = evaluate_perplexity(matquantized_lm, data, bits=None, plan=MIXED_PLAN, verbose=False)
    assert with_none.nll == alone.nll


@pytest.mark.parametrize("evaluator", list(EVALUATOR_CALLS))
def test_plan_unknown_path_rejected(matquantized_lm, evaluator):
    plan = {"decoder_block_0/ffw_gating": 2, "decoder_block_9/attention": 4}
    with pytest.raises(ValueError, match="decoder_block_9/attention") as error:
        EVALUATOR_CALLS[evaluator](matquantized_lm, plan=plan)
    assert "Valid layer paths: ['decoder_block_0/ffw_gating'" in str(error.value)


@pytest.mark.parametrize(
    "plan, message",
    [
        ({"decoder_block_0/ffw_gating": 9}, "1..8"),
        ({"decoder_block_0/ffw_gating": 0}, "1..8"),
        ([("decoder_block_0/ffw_gating", 2)], "dict"),
    ],
)
def test_invalid_plan_rejected(matquantized_lm, plan, message):
    with pytest.raises(ValueError, match=message):
        evaluate_perplexity(matquantized_lm, tiny_heldout(), plan=plan, verbose=False)


def test_default_bits_still_int8(matquantized_lm):
    data = tiny_heldout()
    default = evaluate_perplexity(matquantized_lm, data, verbose=False)
    assert default.nll == pytest.approx(
        numpy_perplexity_nll(matquantized_lm, data, bits=8), rel=1e-5
    )


def test_plan_progress_names_plan(matquantized_lm, caplog, capsys):
    with caplog.at_level("INFO", logger="keras_matquant"):
        evaluate_perplexity(matquantized_lm, tiny_heldout(), plan=MIXED_PLAN, verbose=True)
        score_token_pairs(matquantized_lm, [([BOS], [A])], plan=MIXED_PLAN, verbose=True)
    messages = [record.getMessage() for record in caplog.records]
    assert "Perplexity at plan (5.00 bits) over 5 sequences." in messages
    assert "Scoring 1 continuations at plan (5.00 bits)." in messages
    assert "5/5" in capsys.readouterr().out


def test_plan_with_float_layer_labelled_plan(matquantized_lm, caplog):
    plan = {"decoder_block_0/ffw_gating": None}
    data = tiny_heldout()
    with caplog.at_level("INFO", logger="keras_matquant"):
        result = evaluate_perplexity(matquantized_lm, data, plan=plan, verbose=True)
    assert "Perplexity at plan over 5 sequences." in [r.getMessage() for r in caplog.records]
    assert result.nll == pytest.approx(
        numpy_perplexity_nll(matquantized_lm, data, plan=plan), rel=1e-5
    )
