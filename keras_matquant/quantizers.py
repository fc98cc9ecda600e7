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

import math
import numbers
from typing import NamedTuple

from keras import ops

MIN_BITS = 1
MAX_BITS = 8
SLICING_MODES = ("clamped", "extra_precision")
DEFAULT_SLICING = "clamped"

# OmniQuant initialises its clipping logits to 4.0: sigmoid(4.0) = 0.982.
DEFAULT_CLIPPING_LOGIT = 4.0
# The float32 sigmoid of this logit is exactly 1.0, so a clipping value of 1
# (no clipping) is stored as this logit.
_UNCLIPPED_LOGIT = 20.0

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

    >>> validate_slicing("extra_precision")
    'extra_precision'
    """
    if not isinstance(slicing, str) or slicing not in SLICING_MODES:
        raise ValueError(
            f"Unknown slicing mode {slicing!r}. "
            f"Accepted modes: {', '.join(map(repr, SLICING_MODES))}."
        )
    return slicing


def validate_clipping(value, name="clipping_init"):
    """Check that a clipping factor is a number in `(0, 1]`.

    Args:
        value: float, the fraction of the channel's maximum (or minimum)
            that the quantization range keeps.
        name: str, the argument name used in the error message.

    Returns:
        The value, as a `float`.

    Raises:
        ValueError: if `value` is not a real number in `(0, 1]`.

    Example:

    >>> validate_clipping(0.9)
    0.9
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"`{name}` must be a number in (0, 1]. Received: {name}={value!r} "
            f"of type {type(value).__name__}."
        )
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"`{name}` must be a number in (0, 1]: the fraction of each "
            f"channel's range that quantization keeps. Received: {name}={value}."
        )
    return float(value)


def clipping_logit(value):
    """Return the logit whose sigmoid is the clipping factor `value`.

    Learnable clipping stores its factors as logits. A factor of 1 (no
    clipping) maps to a logit of 20, whose float32 sigmoid is exactly 1.

    Args:
        value: float in `(0, 1]`.

    Returns:
        A Python float.

    Raises:
        ValueError: if `value` is outside `(0, 1]`.

    Example:

    >>> round(clipping_logit(0.5), 6)
    0.0
    """
    value = validate_clipping(value)
    if value == 1.0:
        return _UNCLIPPED_LOGIT
    return min(math.log(value) - math.log1p(-value), _UNCLIPPED_LOGIT)


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


def compute_quantization_parameters(
    w, bits=8, reduce_axes=(0,), clip_max=None, clip_min=None
):
    """Compute per-channel asymmetric min-max scales and zero points.

    For each channel (every index of the axes not in `reduce_axes`), with
    `hi = clip_max * max(w)` and `lo = clip_min * min(w)`:
    `scale = (hi - lo) / (2**bits - 1)` and `zero_point = -lo / scale`,
    both float32. The range is computed as `hi / levels - lo / levels`, so
    finite weights up to float32's largest value give a finite scale. A
    channel with a zero (or subnormal) range gets `scale = 1`, which
    dequantizes it exactly back to its constant value.

    Args:
        w: float tensor, the weights.
        bits: int, the code width c in `1..8`.
        reduce_axes: tuple of int, the axes that make up one channel (the
            axes contracted with the layer input).
        clip_max: optional float32 tensor broadcastable to the per-channel
            shape, the factor in `(0, 1]` applied to each channel's maximum
            (OmniQuant's gamma). None means 1.
        clip_min: optional float32 tensor, the factor applied to each
            channel's minimum (OmniQuant's beta). None means 1.

    Returns:
        A `QuantizationParameters(scale, zero_point)` whose tensors keep
        `w`'s rank with size 1 on `reduce_axes`. Gradients flow from them to
        `w`, `clip_max` and `clip_min`.

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
    if clip_max is not None:
        w_max = ops.multiply(w_max, ops.cast(clip_max, "float32"))
    if clip_min is not None:
        w_min = ops.multiply(w_min, ops.cast(clip_min, "float32"))

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


def _check_slice_arguments(bits, target_bits, slicing):
    bits = validate_bits(bits)
    target_bits = validate_bits(target_bits, name="target_bits", max_bits=bits)
    validate_slicing(slicing)
    return bits, target_bits


def _clamp(x, low, high):
    # Unlike `ops.clip`, whose gradient JAX halves for a value exactly on a
    # bound, this passes the whole gradient for every value in [low, high].
    # Rounded codes sit on the bounds often, so the difference matters.
    x = ops.where(ops.less(x, low), ops.full_like(x, low), x)
    return ops.where(ops.greater(x, high), ops.full_like(x, high), x)


def _slice(codes, bits, target_bits, slicing, rounding):
    step = float(2 ** (bits - target_bits))
    sliced = rounding(ops.divide(codes, step))
    if slicing == "clamped":
        sliced = _clamp(sliced, 0.0, float(2**target_bits - 1))
    return ops.multiply(sliced, step)


def slice_codes(codes, bits, target_bits, slicing=DEFAULT_SLICING):
    """Slice c-bit codes to their `target_bits` most significant bits.

    The sliced code stays on the c-bit grid so that the c-bit scale and zero
    point are reused unchanged. With `slicing="clamped"`:

        S(q, r) = clamp(round_half_up(q / 2**(c - r)), 0, 2**r - 1) * 2**(c - r)

    With `slicing="extra_precision"` the clamp is dropped, so the carry can
    reach one extra level `2**r` (code `2**c` on the c-bit grid).
    With c = 8 and r = 2: q = 53 -> 64; q = 240 -> 192 clamped, or 256 with
    extra precision. `S(q, c) = q` in both modes. Because of the rounding
    carry, an r-bit code is not always the bit prefix of the c-bit code.

    Args:
        codes: float tensor of c-bit codes (integer values).
        bits: int, the parent code width c.
        target_bits: int, the sliced width r in `1..c`.
        slicing: str, `"clamped"` (default) or `"extra_precision"`.

    Returns:
        A float32 tensor of codes on the c-bit grid.

    Example:

    >>> q = keras.ops.convert_to_tensor([53.0, 240.0])
    >>> slice_codes(q, bits=8, target_bits=2)  # [64., 192.]
    >>> slice_codes(q, bits=8, target_bits=2, slicing="extra_precision")
    >>> # [64., 256.]
    """
    bits, target_bits = _check_slice_arguments(bits, target_bits, slicing)
    codes = ops.cast(codes, "float32")
    if target_bits == bits:
        return codes
    return _slice(codes, bits, target_bits, slicing, round_half_up)


def extra_level_fraction(codes, bits, target_bits):
    """Fraction of codes that extra-precision slicing sends to level `2**r`.

    Args:
        codes: float tensor of c-bit codes (integer values).
        bits: int, the parent code width c.
        target_bits: int, the sliced width r in `1..c`.

    Returns:
        A float32 scalar tensor in `[0, 1]`; 0 when `target_bits == bits`.

    Example:

    >>> q = keras.ops.convert_to_tensor([10.0, 100.0, 230.0, 250.0])
    >>> extra_level_fraction(q, bits=8, target_bits=2)  # 0.5
    """
    bits, target_bits = _check_slice_arguments(bits, target_bits, DEFAULT_SLICING)
    codes = ops.cast(codes, "float32")
    if target_bits == bits:
        return ops.zeros((), "float32")
    sliced = round_half_up(ops.divide(codes, float(2 ** (bits - target_bits))))
    in_extra_level = ops.greater_equal(sliced, float(2**target_bits))
    return ops.mean(ops.cast(in_extra_level, "float32"))


def effective_bits(codes, bits, target_bits, slicing=DEFAULT_SLICING):
    """Average storage cost in bits per weight of codes sliced to r bits.

    Clamped slicing costs exactly `r` bits. Extra-precision slicing costs
    `r + f`, where `f` is the fraction of weights in the extra level `2**r`
    (they need one more bit).

    Args:
        codes: float tensor of c-bit codes (integer values).
        bits: int, the parent code width c.
        target_bits: int, the sliced width r in `1..c`.
        slicing: str, the slicing mode.

    Returns:
        A float32 scalar tensor.

    Example:

    >>> q = keras.ops.convert_to_tensor([10.0, 100.0, 230.0, 250.0])
    >>> effective_bits(q, 8, 2, slicing="extra_precision")  # 2.5
    """
    bits, target_bits = _check_slice_arguments(bits, target_bits, slicing)
    if slicing == "clamped":
        return ops.convert_to_tensor(float(target_bits), "float32")
    fraction = extra_level_fraction(codes, bits, target_bits)
    return ops.add(float(target_bits), fraction)


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
    w,
    bits=8,
    target_bits=None,
    reduce_axes=(0,),
    slicing=DEFAULT_SLICING,
    clip_max=None,
    clip_min=None,
):
    """Quantize `w` to c-bit codes, slice to r bits and dequantize.

    Args:
        w: float tensor, the weights.
        bits: int, the parent code width c in `1..8`.
        target_bits: int or None, the sliced width r in `1..c`. None means c.
        reduce_axes: tuple of int, the axes that make up one channel.
        slicing: str, the slicing mode.
        clip_max: optional per-channel factor in `(0, 1]` on the maximum.
        clip_min: optional per-channel factor in `(0, 1]` on the minimum.

    Returns:
        A float32 tensor of `w`'s shape, the dequantized r-bit weights. No
        gradient flows through it; see `fake_quantize`.

    Example:

    >>> w = keras.random.normal((16, 4))
    >>> w_int4 = quantize_dequantize(w, bits=8, target_bits=4)
    """
    if target_bits is None:
        target_bits = bits
    params = compute_quantization_parameters(
        w, bits=bits, reduce_axes=reduce_axes, clip_max=clip_max, clip_min=clip_min
    )
    codes = quantize(w, params.scale, params.zero_point, bits=bits)
    codes = slice_codes(codes, bits, target_bits, slicing=slicing)
    return dequantize(codes, params.scale, params.zero_point)


def _round_half_up_straight_through(x):
    # Forward: round_half_up(x). Backward: identity. For the code range
    # (|x| < 2**24) `x + (round(x) - x)` equals `round(x)` exactly.
    return ops.add(x, ops.stop_gradient(ops.subtract(round_half_up(x), x)))


def fake_quantize(
    w,
    bits=8,
    target_bits=None,
    reduce_axes=(0,),
    slicing=DEFAULT_SLICING,
    clip_max=None,
    clip_min=None,
):
    """Quantize-dequantize `w` with a straight-through gradient.

    The forward value is `quantize_dequantize(w, ...)`. Without clipping
    factors, the gradient with respect to `w` is the identity (the
    straight-through estimator): min-max ranges cover every weight, so no
    weight falls outside the range where that identity holds.

    With clipping factors (learnable weight clipping, as in OmniQuant), only
    the rounding is straight-through: the gradient reaches `w` inside the
    clipped range and is zero for weights clamped to the lowest or highest
    code, and it reaches `clip_max` / `clip_min` through the scale and zero
    point. The channel minimum and maximum themselves are treated as
    constants.

    Args:
        w: float tensor, the weights.
        bits: int, the parent code width c in `1..8`.
        target_bits: int or None, the sliced width r in `1..c`. None means c.
        reduce_axes: tuple of int, the axes that make up one channel.
        slicing: str, the slicing mode.
        clip_max: optional per-channel factor in `(0, 1]` on the maximum.
        clip_min: optional per-channel factor in `(0, 1]` on the minimum.

    Returns:
        A tensor of `w`'s shape and dtype.

    Example:

    >>> w = keras.Variable(keras.random.normal((16, 4)))
    >>> w_int2 = fake_quantize(w, bits=8, target_bits=2)
    """
    if target_bits is None:
        target_bits = bits
    if clip_max is None and clip_min is None:
        w_hat = quantize_dequantize(
            ops.stop_gradient(w),
            bits=bits,
            target_bits=target_bits,
            reduce_axes=reduce_axes,
            slicing=slicing,
        )
        # `w_hat + (w - w)` is exactly `w_hat` in the forward pass, and its
        # gradient with respect to `w` is the identity.
        w_hat = ops.cast(w_hat, w.dtype)
        return ops.add(w_hat, ops.subtract(w, ops.stop_gradient(w)))

    bits, target_bits = _check_slice_arguments(bits, target_bits, slicing)
    params = compute_quantization_parameters(
        ops.stop_gradient(w),
        bits=bits,
        reduce_axes=reduce_axes,
        clip_max=clip_max,
        clip_min=clip_min,
    )
    x = ops.add(ops.divide(ops.cast(w, "float32"), params.scale), params.zero_point)
    codes = _clamp(_round_half_up_straight_through(x), 0.0, float(2**bits - 1))
    if target_bits < bits:
        codes = _slice(
            codes, bits, target_bits, slicing, _round_half_up_straight_through
        )
    w_hat = dequantize(codes, params.scale, params.zero_point)
    return ops.cast(w_hat, w.dtype)
