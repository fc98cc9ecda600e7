"""Matryoshka Quantization math: min-max parameters, codes, slicing, STE.

Everything here is pure `keras.ops` and runs on every Keras backend. The
dequantization formula used throughout the package is

    w_hat = scale * (q - zero_point)

with `q` the unsigned integer code, `scale` the step between two levels and
`zero_point` the (float) code that represents the weight 0.0.

References:
    P. Nair, P. Datta, J. Dean, P. Jain, A. Kusupati, "Matryoshka
    Quantization", arXiv:2502.06786 (2025).
"""

import numbers
from typing import NamedTuple

from keras import ops

MIN_BITS = 1
MAX_BITS = 8
SLICING_MODES = ("clamped",)
DEFAULT_SLICING = "clamped"

# Scales below the smallest normal float32 would make `w / scale` overflow or
# divide by zero. A channel whose range is that small (a constant channel,
# for instance) gets scale 1 instead, and then `w_hat = 1 * (0 - z) = min(w)`
# reproduces the constant exactly.
_SMALLEST_NORMAL_FLOAT32 = 1.1754944e-38


class QuantizationParameters(NamedTuple):
    """Per-channel affine quantization parameters.

    Attributes:
        scale: float32 tensor, the step between two adjacent codes. Its shape
            broadcasts against the kernel (size 1 on every reduced axis).
        zero_point: float32 tensor of the same shape, the real-valued code
            of the weight 0.0.
    """

    scale: object
    zero_point: object


def validate_bits(bits, name="bits", max_bits=MAX_BITS):
    """Check that `bits` is a whole number of bits in `1..max_bits`.

    Args:
        bits: int, the value to check.
        name: str, the argument name used in the error message.
        max_bits: int, the largest accepted value.

    Returns:
        The value, as an `int`.

    Raises:
        ValueError: if `bits` is not an integer in `1..max_bits`.

    Example:

    >>> validate_bits(4)
    4
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(
            f"`{name}` must be an integer in {MIN_BITS}..{max_bits}. "
            f"Received: {name}={bits!r} of type {type(bits).__name__}."
        )
    if not MIN_BITS <= bits <= max_bits:
        raise ValueError(
            f"`{name}` must be an integer in {MIN_BITS}..{max_bits}. "
            f"Received: {name}={bits}."
        )
    return int(bits)


def validate_slicing(slicing):
    """Check that `slicing` names a supported slicing mode.

    Args:
        slicing: str, the slicing mode.

    Returns:
        The mode string.

    Raises:
        ValueError: if the mode is unknown.

    Example:

    >>> validate_slicing("clamped")
    'clamped'
    """
    if slicing not in SLICING_MODES:
        raise ValueError(
            f"Unknown slicing mode {slicing!r}. "
            f"Accepted modes: {', '.join(map(repr, SLICING_MODES))}."
        )
    return slicing


def round_half_up(x):
    """Round to the nearest integer, halves rounded towards +infinity.

    `floor(x + 0.5)`, the rounding rule of Matryoshka Quantization. It is not
    the banker's rounding of `keras.ops.round`, which sends 2.5 to 2.

    Args:
        x: float tensor.

    Returns:
        A float tensor of the same shape and dtype holding integer values.

    Example:

    >>> round_half_up(keras.ops.convert_to_tensor([0.5, 1.5, 2.5, -0.5]))
    # [1.0, 2.0, 3.0, 0.0]
    """
    return ops.floor(ops.add(x, 0.5))


def compute_quantization_parameters(w, bits=8, reduce_axes=(0,)):
    """Compute per-channel asymmetric min-max scales and zero points.

    For each channel (every index of the axes not in `reduce_axes`):
    `scale = (max(w) - min(w)) / (2**bits - 1)` and
    `zero_point = -min(w) / scale`, both float32. The range is computed as
    `max / levels - min / levels`, so finite weights up to float32's largest
    value give a finite scale. A channel with a zero (or subnormal) range gets
    `scale = 1`, which dequantizes it exactly back to its constant value.

    Args:
        w: float tensor, the weights.
        bits: int, the code width c in `1..8`.
        reduce_axes: tuple of int, the axes that make up one channel (the
            axes contracted with the layer input).

    Returns:
        A `QuantizationParameters(scale, zero_point)` whose tensors keep
        `w`'s rank with size 1 on `reduce_axes`.

    Example:

    >>> w = keras.ops.convert_to_tensor([[0.0, 1.0], [2.55, 1.0]])
    >>> params = compute_quantization_parameters(w, bits=8)
    >>> # channel 0: scale 0.01, zero point 0; channel 1 is constant.
    """
    bits = validate_bits(bits)
    levels = float(2**bits - 1)
    w = ops.cast(w, "float32")
    reduce_axes = tuple(reduce_axes)

    w_min = ops.min(w, axis=reduce_axes, keepdims=True)
    w_max = ops.max(w, axis=reduce_axes, keepdims=True)

    scale = ops.subtract(ops.divide(w_max, levels), ops.divide(w_min, levels))
    scale = ops.where(
        ops.greater_equal(scale, _SMALLEST_NORMAL_FLOAT32),
        scale,
        ops.ones_like(scale),
    )
    zero_point = ops.divide(ops.negative(w_min), scale)
    return QuantizationParameters(scale=scale, zero_point=zero_point)


def quantize(w, scale, zero_point, bits=8):
    """Map weights to unsigned `bits`-bit codes.

    `q = clamp(round_half_up(w / scale + zero_point), 0, 2**bits - 1)`.

    Args:
        w: float tensor, the weights.
        scale: float32 tensor broadcastable to `w`.
        zero_point: float32 tensor broadcastable to `w`.
        bits: int, the code width c in `1..8`.

    Returns:
        A float32 tensor of `w`'s shape holding integer codes in
        `0..2**bits - 1`. Codes stay float so that the forward pass can use
        them directly; cast them to `"uint8"` to store them.

    Example:

    >>> w = keras.ops.convert_to_tensor([[0.0], [0.5], [2.55]])
    >>> params = compute_quantization_parameters(w, bits=8)
    >>> quantize(w, *params, bits=8)  # [[0.], [50.], [255.]]
    """
    bits = validate_bits(bits)
    w = ops.cast(w, "float32")
    codes = round_half_up(ops.add(ops.divide(w, scale), zero_point))
    return ops.clip(codes, 0.0, float(2**bits - 1))


def slice_codes(codes, bits, target_bits, slicing=DEFAULT_SLICING):
    """Slice c-bit codes to their `target_bits` most significant bits.

    The sliced code stays on the c-bit grid so that the c-bit scale and zero
    point are reused unchanged:

        S(q, r) = clamp(round_half_up(q / 2**(c - r)), 0, 2**r - 1) * 2**(c - r)

    With c = 8 and r = 2: q = 53 -> 64 and q = 240 -> 192 (4 is clamped to 3).
    `S(q, c) = q`. Because of the rounding carry, an r-bit code is not always
    the bit prefix of the c-bit code.

    Args:
        codes: float tensor of c-bit codes (integer values).
        bits: int, the parent code width c.
        target_bits: int, the sliced width r in `1..c`.
        slicing: str, the slicing mode. Only `"clamped"` is implemented.

    Returns:
        A float32 tensor of codes on the c-bit grid.

    Example:

    >>> q = keras.ops.convert_to_tensor([53.0, 240.0])
    >>> slice_codes(q, bits=8, target_bits=2)  # [64., 192.]
    """
    bits = validate_bits(bits)
    target_bits = validate_bits(target_bits, name="target_bits", max_bits=bits)
    validate_slicing(slicing)
    if target_bits == bits:
        return ops.cast(codes, "float32")

    step = float(2 ** (bits - target_bits))
    sliced = round_half_up(ops.divide(ops.cast(codes, "float32"), step))
    sliced = ops.clip(sliced, 0.0, float(2**target_bits - 1))
    return ops.multiply(sliced, step)


def dequantize(codes, scale, zero_point):
    """Map codes back to weights: `w_hat = scale * (q - zero_point)`.

    Args:
        codes: float tensor of codes (integer values).
        scale: float32 tensor broadcastable to `codes`.
        zero_point: float32 tensor broadcastable to `codes`.

    Returns:
        A float32 tensor of `codes`'s shape.

    Example:

    >>> dequantize(keras.ops.convert_to_tensor([50.0]), 0.01, 0.0)  # [0.5]
    """
    codes = ops.cast(codes, "float32")
    return ops.multiply(scale, ops.subtract(codes, zero_point))


def quantize_dequantize(
    w, bits=8, target_bits=None, reduce_axes=(0,), slicing=DEFAULT_SLICING
):
    """Quantize `w` to c-bit codes, slice to r bits and dequantize.

    Args:
        w: float tensor, the weights.
        bits: int, the parent code width c in `1..8`.
        target_bits: int or None, the sliced width r in `1..c`. None means c.
        reduce_axes: tuple of int, the axes that make up one channel.
        slicing: str, the slicing mode.

    Returns:
        A float32 tensor of `w`'s shape, the dequantized r-bit weights. No
        gradient flows through it; see `fake_quantize`.

    Example:

    >>> w = keras.random.normal((16, 4))
    >>> w_int4 = quantize_dequantize(w, bits=8, target_bits=4)
    """
    if target_bits is None:
        target_bits = bits
    params = compute_quantization_parameters(w, bits=bits, reduce_axes=reduce_axes)
    codes = quantize(w, params.scale, params.zero_point, bits=bits)
    codes = slice_codes(codes, bits, target_bits, slicing=slicing)
    return dequantize(codes, params.scale, params.zero_point)


def fake_quantize(
    w, bits=8, target_bits=None, reduce_axes=(0,), slicing=DEFAULT_SLICING
):
    """Quantize-dequantize `w` with a straight-through gradient.

    The forward value is `quantize_dequantize(w, ...)`. The gradient with
    respect to `w` is the identity (the straight-through estimator). Min-max
    clipping covers every weight, so no weight falls outside the range where
    that identity holds.

    Args:
        w: float tensor, the weights.
        bits: int, the parent code width c in `1..8`.
        target_bits: int or None, the sliced width r in `1..c`. None means c.
        reduce_axes: tuple of int, the axes that make up one channel.
        slicing: str, the slicing mode.

    Returns:
        A tensor of `w`'s shape and dtype.

    Example:

    >>> w = keras.Variable(keras.random.normal((16, 4)))
    >>> w_int2 = fake_quantize(w, bits=8, target_bits=2)
    """
    w_hat = quantize_dequantize(
        ops.stop_gradient(w),
        bits=bits,
        target_bits=target_bits,
        reduce_axes=reduce_axes,
        slicing=slicing,
    )
    w_hat = ops.cast(w_hat, w.dtype)
    return ops.add(w, ops.stop_gradient(ops.subtract(w_hat, w)))

