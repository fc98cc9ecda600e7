import numpy as np
import pytest

from keras_matquant.packing import PackedCodes
from keras_matquant.packing import pack_codes
from keras_matquant.packing import unpack_codes


def test_two_bit_codes_hand_packed():
    # 11 00 01 10 -> 0b11000110 = 198: four int2 codes in one byte.
    packed = pack_codes([3, 0, 1, 2], width=2)
    np.testing.assert_array_equal(packed.data, [198])
    assert packed.shape == (4,)


def test_four_bit_codes_hand_packed():
    # 1111 0001 -> 241, then 0101 padded with zeros -> 0b01010000 = 80.
    packed = pack_codes([15, 1, 5], width=4)
    np.testing.assert_array_equal(packed.data, [241, 80])


def test_three_bit_codes_cross_bytes():
    # 111 000 101 -> 11100010 1(0000000): 226, 128.
    packed = pack_codes([7, 0, 5], width=3)
    np.testing.assert_array_equal(packed.data, [226, 128])


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("shape", [(1,), (3, 1), (5, 3), (7, 2, 3)])
def test_round_trip_any_width_and_shape(width, shape):
    rng = np.random.default_rng(width)
    codes = rng.integers(0, 2**width, size=shape)
    codes.reshape(-1)[0] = 2**width - 1
    packed = pack_codes(codes, width)
    assert packed.data.dtype == np.uint8
    assert packed.data.size == -(-codes.size * width // 8)
    result = unpack_codes(packed)
    assert result.shape == shape
    np.testing.assert_array_equal(result, codes)


def test_byte_counts_for_a_64_by_64_kernel():
    codes = np.zeros((64, 64), dtype=np.int32)
    assert pack_codes(codes, 8).data.size == 4096
    assert pack_codes(codes, 4).data.size == 2048
    assert pack_codes(codes, 2).data.size == 1024


@pytest.mark.parametrize(
    "codes, width, message",
    [
        ([0, 4], 2, "Code 4 at flat index 1 does not fit in 2 bits"),
        ([-1], 8, "Code -1 at flat index 0"),
        ([0.5], 4, "whole numbers"),
        ([1], 0, "width"),
        ([1], 9, "width"),
        ([1], 2.0, "width"),
    ],
)
def test_invalid_codes_or_width_rejected(codes, width, message):
    with pytest.raises(ValueError, match=message):
        pack_codes(codes, width)


def test_truncated_data_rejected():
    packed = pack_codes(np.ones((5, 3), dtype=np.int32), 4)
    truncated = PackedCodes(packed.data[:-1], packed.width, packed.shape)
    with pytest.raises(ValueError, match="7 bytes, but 15 codes of 4 bits need 8"):
        unpack_codes(truncated)


@pytest.mark.parametrize("width", range(1, 9))
def test_tensor_unpacking_matches_numpy(width):
    from keras import ops

    from keras_matquant.packing import unpack_codes_tensor

    rng = np.random.default_rng(width)
    codes = rng.integers(0, 2**width, size=(5, 3))
    packed = pack_codes(codes, width)
    result = unpack_codes_tensor(ops.convert_to_tensor(packed.data), width, (5, 3))
    np.testing.assert_array_equal(ops.convert_to_numpy(result), codes)
