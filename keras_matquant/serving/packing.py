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
