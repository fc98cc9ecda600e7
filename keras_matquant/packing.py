"""Pack unsigned integer codes of any width 1..8 into bytes, and back.

Codes are written most significant bit first, one after the other, as a
continuous bit stream: four 2-bit codes or two 4-bit codes fill one byte,
and 3-, 5-, 6- and 7-bit codes cross byte boundaries. The last byte is
padded with zero bits, and the number of codes and the array shape are kept
beside the bytes, so any shape round-trips exactly.
"""

import math
import numbers
from typing import NamedTuple

import numpy as np

MAX_WIDTH = 8


class PackedCodes(NamedTuple):
    """Codes packed into bytes.

    Attributes:
        data: uint8 numpy array of `ceil(size * width / 8)` bytes.
        width: int, bits per code.
        shape: tuple of int, the shape of the unpacked codes.
    """

    data: np.ndarray
    width: int
    shape: tuple


def _check_width(width):
    if isinstance(width, bool) or not isinstance(width, numbers.Integral):
        raise ValueError(
            f"`width` must be an integer in 1..{MAX_WIDTH}. Received: "
            f"width={width!r} of type {type(width).__name__}."
        )
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(
            f"`width` must be an integer in 1..{MAX_WIDTH}. Received: width={width}."
        )
    return int(width)


def pack_codes(codes, width):
    """Pack unsigned integer codes into a byte array.

    Args:
        codes: array-like of integers in `0..2**width - 1`, any shape.
        width: int in `1..8`, bits per code.

    Returns:
        A `PackedCodes(data, width, shape)`; `data` contains
        `ceil(codes.size * width / 8)` bytes.

    Raises:
        ValueError: if `width` is invalid, or a code is not an integer in
            range (the message gives the first bad index and value).

    Example:

    >>> pack_codes([3, 0, 1, 2], width=2).data
    array([198], dtype=uint8)
    """
    width = _check_width(width)
    codes = np.asarray(codes)
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        if not np.all(np.equal(np.mod(codes, 1), 0)):
            index = int(np.flatnonzero(np.mod(codes, 1).reshape(-1) != 0)[0])
            raise ValueError(
                f"Codes must be whole numbers; code {codes.reshape(-1)[index]!r} "
                f"at flat index {index} is not. Round the codes before packing."
            )
    flat = codes.reshape(-1).astype(np.int64)
    bad = (flat < 0) | (flat > 2**width - 1)
    if np.any(bad):
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"Code {int(flat[index])} at flat index {index} does not fit in "
            f"{width} bits (0..{2**width - 1}). Pack with a larger width."
        )

    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = ((flat[:, None] >> shifts) & 1).astype(np.uint8)
    data = np.packbits(bits.reshape(-1))
    return PackedCodes(data=data, width=width, shape=tuple(codes.shape))


def unpack_codes(packed):
    """Unpack a `PackedCodes` back into an integer array.

    Args:
        packed: a `PackedCodes` as returned by `pack_codes`.

    Returns:
        An int32 numpy array of `packed.shape`.

    Raises:
        ValueError: if the byte count does not match the shape and width.

    Example:

    >>> unpack_codes(pack_codes([[7, 0], [5, 1]], width=3))
    array([[7, 0],
           [5, 1]], dtype=int32)
    """
    width = _check_width(packed.width)
    size = math.prod(packed.shape)
    data = np.asarray(packed.data, dtype=np.uint8).reshape(-1)
    expected_bytes = math.ceil(size * width / 8)
    if data.size != expected_bytes:
        raise ValueError(
            f"Packed data has {data.size} bytes, but {size} codes of {width} "
            f"bits need {expected_bytes}. The data does not belong to shape "
            f"{packed.shape}."
        )
    bits = np.unpackbits(data)[: size * width].reshape(size, width).astype(np.int32)
    weights = (1 << np.arange(width - 1, -1, -1)).astype(np.int32)
    return (bits @ weights).astype(np.int32).reshape(packed.shape)


def packed_size(size, width):
    """Return the number of bytes that `size` codes of `width` bits take.

    Args:
        size: int, the number of codes.
        width: int in `1..8`.

    Returns:
        `ceil(size * width / 8)`.

    Example:

    >>> packed_size(15, 4)
    8
    """
    return math.ceil(size * _check_width(width) / 8)


def unpack_codes_tensor(data, width, shape):
    """Unpack bytes written by `pack_codes` with `keras.ops`, in the graph.

    The layers call this in their forward pass. Widths 1, 2, 4 and 8 split
    each byte with shifts; other widths go through the bit stream.

    Args:
        data: uint8 tensor of `packed_size(prod(shape), width)` bytes.
        width: int in `1..8`, bits per code.
        shape: tuple of int, the shape of the codes.

    Returns:
        A float32 tensor of `shape` holding the integer codes.

    Example:

    >>> packed = pack_codes([[3, 0], [1, 2]], width=2)
    >>> unpack_codes_tensor(packed.data, 2, (2, 2))  # [[3., 0.], [1., 2.]]
    """
    from keras import ops

    width = _check_width(width)
    size = math.prod(shape)
    data = ops.cast(ops.reshape(data, (-1, 1)), "int32")
    if 8 % width == 0:
        shifts = ops.convert_to_tensor(
            list(range(8 - width, -1, -width)), dtype="int32"
        )
        codes = ops.bitwise_and(ops.right_shift(data, shifts), 2**width - 1)
    else:
        shifts = ops.convert_to_tensor(list(range(7, -1, -1)), dtype="int32")
        bits = ops.reshape(ops.bitwise_and(ops.right_shift(data, shifts), 1), (-1,))
        bits = ops.reshape(bits[: size * width], (size, width))
        weights = ops.convert_to_tensor(
            [2**power for power in range(width - 1, -1, -1)], dtype="int32"
        )
        codes = ops.sum(ops.multiply(bits, weights), axis=1)
    codes = ops.reshape(codes, (-1,))[:size]
    return ops.reshape(ops.cast(codes, "float32"), shape)
