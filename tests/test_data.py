import numpy as np
import pytest

from keras_matquant.data import load_bundled_paragraphs
from keras_matquant.data import pack_token_sequences


def test_pack_hand_example():
    data = pack_token_sequences([[5, 6, 7], [8, 9]], 2, bos_id=2)
    np.testing.assert_array_equal(data.x["token_ids"], [[2, 5], [2, 7]])
    np.testing.assert_array_equal(data.y, [[5, 6], [7, 8]])
    np.testing.assert_array_equal(data.x["padding_mask"], np.ones((2, 2)))
    np.testing.assert_array_equal(data.sample_weight, np.ones((2, 2)))
    assert data.num_tokens == 4


def test_pack_with_separator():
    data = pack_token_sequences([[5, 6], [8, 9]], 3, bos_id=2, separator_ids=[1, 1])
    # stream 5 6 1 1 8 9 -> chunks [5 6 1] [1 8 9]
    np.testing.assert_array_equal(data.x["token_ids"], [[2, 5, 6], [2, 1, 8]])
    np.testing.assert_array_equal(data.y, [[5, 6, 1], [1, 8, 9]])


def test_pack_too_little_text_rejected():
    with pytest.raises(ValueError, match="3 tokens.*sequence of 4"):
        pack_token_sequences([[1, 2, 3]], 4, bos_id=2)


@pytest.mark.parametrize("length", [0, -3, 2.5, True])
def test_pack_invalid_length_rejected(length):
    with pytest.raises(ValueError, match="sequence_length"):
        pack_token_sequences([[1, 2, 3]], length, bos_id=2)


def test_take_slices_every_field():
    data = pack_token_sequences([list(range(10, 30))], 4, bos_id=2)
    part = data.take(2, start=1)
    np.testing.assert_array_equal(part.x["token_ids"], data.x["token_ids"][1:3])
    np.testing.assert_array_equal(part.y, data.y[1:3])
    assert part.num_sequences == 2


def test_bundled_splits_are_disjoint_and_real():
    train = load_bundled_paragraphs("train")
    heldout = load_bundled_paragraphs("heldout")
    assert len(train) == 1423 + 1815
    assert len(heldout) == 158 + 202
    assert not set(train) & set(heldout)
    assert sum(len(p) for p in train + heldout) > 2_500_000


def test_unknown_split_rejected():
    with pytest.raises(ValueError, match="'test'.*train, heldout"):
        load_bundled_paragraphs("test")
