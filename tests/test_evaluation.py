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
