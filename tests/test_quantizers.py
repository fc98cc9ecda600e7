import numpy as np
import pytest
from keras import ops

from keras_matquant import quantizers
from tests.conftest import backend_gradient


def reference_quantize_dequantize(
    w, bits, target_bits, slicing="clamped", clip_max=1.0, clip_min=1.0
):
    """Plain-numpy restatement of min-max quantization and slicing.

    Channels are the columns of a 2-D kernel (axis 0 is reduced).
    """
    w = np.asarray(w, dtype=np.float64)
    levels = 2**bits - 1
    w_min = w.min(axis=0, keepdims=True) * clip_min
    w_max = w.max(axis=0, keepdims=True) * clip_max
    scale = (w_max - w_min) / levels
    scale = np.where(scale > 0, scale, 1.0)
    zero = -w_min / scale
    q = np.clip(np.floor(w / scale + zero + 0.5), 0, levels)
    step = 2 ** (bits - target_bits)
    s = np.floor(q / step + 0.5)
    if slicing == "clamped":
        s = np.clip(s, 0, 2**target_bits - 1)
    return scale * (s * step - zero)


def test_round_half_up_halves():
    x = ops.convert_to_tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49])
    result = ops.convert_to_numpy(quantizers.round_half_up(x))
    np.testing.assert_array_equal(result, [1.0, 2.0, 3.0, 0.0, -1.0, 0.0])


def test_slice_codes_hand_values():
    codes = ops.convert_to_tensor([53.0, 240.0, 0.0, 255.0, 31.0, 32.0, 96.0])
    int2 = ops.convert_to_numpy(quantizers.slice_codes(codes, 8, 2))
    # 53/64 = 0.83 -> 1; 240/64 = 3.75 -> 4 -> clamped 3; 255 -> 3;
    # 31/64 = 0.48 -> 0; 32/64 = 0.5 -> 1 (half up); 96/64 = 1.5 -> 2.
    np.testing.assert_array_equal(int2, [64.0, 192.0, 0.0, 192.0, 0.0, 64.0, 128.0])


def test_slice_codes_int4_hand_values():
    codes = ops.convert_to_tensor([7.0, 8.0, 24.0, 250.0, 255.0])
    int4 = ops.convert_to_numpy(quantizers.slice_codes(codes, 8, 4))
    # step 16: 7 -> 0, 8 -> 1 (half up), 24 -> 2 (1.5 up), 250 -> 16 -> 15.
    np.testing.assert_array_equal(int4, [0.0, 16.0, 32.0, 240.0, 240.0])


def test_slice_codes_full_width_unchanged():
    codes = ops.convert_to_tensor(np.arange(256, dtype="float32"))
    result = ops.convert_to_numpy(quantizers.slice_codes(codes, 8, 8))
    np.testing.assert_array_equal(result, np.arange(256, dtype="float32"))


def test_quantize_hand_values():
    w = ops.convert_to_tensor([[0.0], [0.5], [2.55]])
    params = quantizers.compute_quantization_parameters(w, bits=8)
    np.testing.assert_allclose(ops.convert_to_numpy(params.scale), [[0.01]], rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(params.zero_point), [[0.0]], atol=1e-6)
    codes = ops.convert_to_numpy(quantizers.quantize(w, *params, bits=8))
    np.testing.assert_array_equal(codes, [[0.0], [50.0], [255.0]])


def test_asymmetric_zero_point():
    # min -1, max 1.55: scale 0.01, zero point 100, weight 0 -> code 100.
    w = ops.convert_to_tensor([[-1.0], [0.0], [1.55]])
    params = quantizers.compute_quantization_parameters(w, bits=8)
    np.testing.assert_allclose(ops.convert_to_numpy(params.zero_point), [[100.0]], rtol=1e-5)
    codes = ops.convert_to_numpy(quantizers.quantize(w, *params, bits=8))
    np.testing.assert_array_equal(codes, [[0.0], [100.0], [255.0]])


@pytest.mark.parametrize("target_bits", range(1, 9))
def test_constant_and_zero_channels_exact(target_bits):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4)).astype("float32")
    w[:, 1] = 0.37
    w[:, 2] = 0.0
    w_hat = quantizers.quantize_dequantize(
        ops.convert_to_tensor(w), bits=8, target_bits=target_bits
    )
    w_hat = ops.convert_to_numpy(w_hat)
    assert np.all(np.isfinite(w_hat))
    np.testing.assert_array_equal(w_hat[:, 1], np.full(3, 0.37, dtype="float32"))
    np.testing.assert_array_equal(w_hat[:, 2], np.zeros(3, dtype="float32"))


@pytest.mark.parametrize("target_bits", range(1, 9))
def test_matches_numpy_reference(target_bits):
    rng = np.random.default_rng(target_bits)
    w = rng.normal(size=(64, 16)).astype("float32")
    expected = reference_quantize_dequantize(w, 8, target_bits)
    result = quantizers.quantize_dequantize(
        ops.convert_to_tensor(w), bits=8, target_bits=target_bits
    )
    np.testing.assert_allclose(ops.convert_to_numpy(result), expected, atol=1e-5)


def test_int8_error_bounded_by_half_step():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(128, 8)).astype("float32")
    w_hat = ops.convert_to_numpy(
        quantizers.quantize_dequantize(ops.convert_to_tensor(w), bits=8)
    )
    half_step = (w.max(axis=0) - w.min(axis=0)) / 255 / 2
    assert np.all(np.abs(w_hat - w) <= half_step * (1 + 1e-4))


def test_large_finite_weights_give_finite_scale():
    w = ops.convert_to_tensor([[-3e38], [3e38], [0.0]])
    params = quantizers.compute_quantization_parameters(w, bits=8)
    assert np.all(np.isfinite(ops.convert_to_numpy(params.scale)))
    w_hat = ops.convert_to_numpy(quantizers.quantize_dequantize(w, bits=8))
    assert np.all(np.isfinite(w_hat))


def test_reduce_axes_per_channel_shapes():
    w = ops.convert_to_tensor(np.random.default_rng(2).normal(size=(2, 4, 3)))
    params = quantizers.compute_quantization_parameters(w, bits=8, reduce_axes=(1,))
    assert tuple(params.scale.shape) == (2, 1, 3)
    assert tuple(params.zero_point.shape) == (2, 1, 3)


def test_fake_quantize_straight_through_gradient():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 3)).astype("float32")
    upstream = ops.convert_to_tensor(rng.normal(size=(8, 3)).astype("float32"))

    def loss(weights):
        w_hat = quantizers.fake_quantize(weights, bits=8, target_bits=2)
        return ops.sum(ops.multiply(w_hat, upstream))

    gradient = backend_gradient(loss, w)
    np.testing.assert_array_equal(gradient, ops.convert_to_numpy(upstream))


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True, "4", None])
def test_invalid_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        quantizers.validate_bits(bits)


def test_target_above_parent_rejected():
    with pytest.raises(ValueError, match="target_bits"):
        quantizers.slice_codes(ops.ones((2,)), bits=4, target_bits=8)


def test_unknown_slicing_rejected():
    with pytest.raises(ValueError, match="clamped"):
        quantizers.slice_codes(ops.ones((2,)), bits=8, target_bits=2, slicing="floor")


def test_extra_precision_slice_hand_values():
    # int2 from int8: step 64. 53 -> 0.83 -> 1; 234 -> 3.66 -> 4 (the extra
    # level, code 256); 240 -> 3.75 -> 4; 31 -> 0.48 -> 0; 32 -> 0.5 -> 1.
    q = ops.convert_to_tensor([53.0, 234.0, 240.0, 31.0, 32.0, 255.0])
    extra = quantizers.slice_codes(q, bits=8, target_bits=2, slicing="extra_precision")
    clamped = quantizers.slice_codes(q, bits=8, target_bits=2, slicing="clamped")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(extra), [64.0, 256.0, 256.0, 0.0, 64.0, 256.0]
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(clamped), [64.0, 192.0, 192.0, 0.0, 64.0, 192.0]
    )


def test_extra_precision_int4_hand_values():
    # int4 from int8: step 16. 248 -> 15.5 -> 16 (extra level); 247 -> 15.
    q = ops.convert_to_tensor([248.0, 247.0, 8.0])
    extra = quantizers.slice_codes(q, bits=8, target_bits=4, slicing="extra_precision")
    np.testing.assert_array_equal(ops.convert_to_numpy(extra), [256.0, 240.0, 16.0])


def test_extra_precision_full_width_unchanged():
    q = ops.convert_to_tensor([0.0, 128.0, 255.0])
    result = quantizers.slice_codes(q, bits=8, target_bits=8, slicing="extra_precision")
    np.testing.assert_array_equal(ops.convert_to_numpy(result), [0.0, 128.0, 255.0])


@pytest.mark.parametrize("target_bits", range(1, 9))
def test_extra_precision_matches_numpy_reference(target_bits):
    rng = np.random.default_rng(10 + target_bits)
    w = rng.normal(size=(64, 16)).astype("float32")
    expected = reference_quantize_dequantize(w, 8, target_bits, "extra_precision")
    result = quantizers.quantize_dequantize(
        ops.convert_to_tensor(w),
        bits=8,
        target_bits=target_bits,
        slicing="extra_precision",
    )
    np.testing.assert_allclose(ops.convert_to_numpy(result), expected, atol=1e-5)


def test_effective_bits_hand_values():
    # Codes 10, 100, 230, 250 sliced to int2 (step 64): 0, 2, 4, 4. Two of
    # four reach the extra level 4, so the cost is 2 + 2/4 = 2.5 bits.
    q = ops.convert_to_tensor([10.0, 100.0, 230.0, 250.0])
    fraction = quantizers.extra_level_fraction(q, bits=8, target_bits=2)
    extra = quantizers.effective_bits(q, 8, 2, slicing="extra_precision")
    clamped = quantizers.effective_bits(q, 8, 2, slicing="clamped")
    assert float(ops.convert_to_numpy(fraction)) == 0.5
    assert float(ops.convert_to_numpy(extra)) == 2.5
    assert float(ops.convert_to_numpy(clamped)) == 2.0
    full = quantizers.effective_bits(q, 8, 8, slicing="extra_precision")
    assert float(ops.convert_to_numpy(full)) == 8.0


@pytest.mark.parametrize("target_bits", range(1, 9))
def test_extra_precision_constant_channels_exact(target_bits):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4)).astype("float32")
    w[:, 1] = 0.37
    w[:, 2] = 0.0
    w_hat = quantizers.quantize_dequantize(
        ops.convert_to_tensor(w),
        bits=8,
        target_bits=target_bits,
        slicing="extra_precision",
    )
    w_hat = ops.convert_to_numpy(w_hat)
    np.testing.assert_array_equal(w_hat[:, 1], np.full(3, 0.37, dtype="float32"))
    np.testing.assert_array_equal(w_hat[:, 2], np.zeros(3, dtype="float32"))


@pytest.mark.parametrize("slicing", [None, 1, "Clamped", "extra"])
def test_invalid_slicing_values_rejected(slicing):
    with pytest.raises(ValueError, match="extra_precision"):
        quantizers.validate_slicing(slicing)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_invalid_clipping_rejected(value):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        quantizers.validate_clipping(value)


def test_clipping_logit_values():
    assert quantizers.clipping_logit(0.5) == 0.0
    np.testing.assert_allclose(quantizers.clipping_logit(0.9), np.log(9.0), rtol=1e-12)
    # A factor of 1 is stored as a logit whose float32 sigmoid is exactly 1.
    logit = quantizers.clipping_logit(1.0)
    sigmoid = ops.convert_to_numpy(ops.sigmoid(ops.convert_to_tensor(logit, "float32")))
    assert float(sigmoid) == 1.0


@pytest.mark.parametrize("target_bits", [8, 4, 2])
@pytest.mark.parametrize("slicing", ["clamped", "extra_precision"])
def test_clipped_quantization_matches_numpy(target_bits, slicing):
    rng = np.random.default_rng(20 + target_bits)
    w = rng.normal(size=(32, 6)).astype("float32")
    clip_max = np.linspace(0.6, 1.0, 6).astype("float32")[None, :]
    clip_min = np.linspace(1.0, 0.7, 6).astype("float32")[None, :]
    expected = reference_quantize_dequantize(
        w, 8, target_bits, slicing, clip_max.astype(np.float64), clip_min.astype(np.float64)
    )
    for function in (quantizers.quantize_dequantize, quantizers.fake_quantize):
        result = function(
            ops.convert_to_tensor(w),
            bits=8,
            target_bits=target_bits,
            slicing=slicing,
            clip_max=ops.convert_to_tensor(clip_max),
            clip_min=ops.convert_to_tensor(clip_min),
        )
        np.testing.assert_allclose(ops.convert_to_numpy(result), expected, atol=1e-5)


def test_unit_clipping_equals_min_max_exactly():
    w = np.random.default_rng(4).normal(size=(16, 5)).astype("float32")
    ones = ops.ones((1, 5), "float32")
    for target_bits in (8, 4, 2):
        plain = quantizers.fake_quantize(ops.convert_to_tensor(w), target_bits=target_bits)
        clipped = quantizers.fake_quantize(
            ops.convert_to_tensor(w), target_bits=target_bits, clip_max=ones, clip_min=ones
        )
        np.testing.assert_array_equal(
            ops.convert_to_numpy(clipped), ops.convert_to_numpy(plain)
        )


def _frozen_rounding_loss(w, upstream, bits, target_bits, slicing):
    """Numpy float64 loss of the clipped quantizer with rounding frozen.

    The straight-through estimator treats each rounding as `x + constant`
    and each clamp that is active as a constant. Freezing those at the
    evaluation point gives a smooth function of the clipping logits whose
    finite-difference derivative is the expected straight-through gradient.
    """
    w = np.asarray(w, dtype=np.float64)
    levels = 2**bits - 1
    step = 2 ** (bits - target_bits)
    top = 2**target_bits - 1 if slicing == "clamped" else np.inf

    def parts(max_logit, min_logit):
        hi = w.max(axis=0, keepdims=True) / (1 + np.exp(-max_logit))
        lo = w.min(axis=0, keepdims=True) / (1 + np.exp(-min_logit))
        scale = hi / levels - lo / levels
        zero = -lo / scale
        return scale, zero, w / scale + zero

    def loss(max_logit, min_logit, frozen):
        scale, zero, x = parts(max_logit, min_logit)
        q_residual, q_fixed, s_residual, s_fixed = frozen
        q = np.where(np.isnan(q_fixed), x + q_residual, q_fixed)
        s = q / step
        s = np.where(np.isnan(s_fixed), s + s_residual, s_fixed)
        return np.sum(scale * (s * step - zero) * upstream)

    def freeze(max_logit, min_logit):
        _, _, x = parts(max_logit, min_logit)
        rounded = np.floor(x + 0.5)
        q_fixed = np.where(rounded < 0, 0.0, np.where(rounded > levels, levels, np.nan))
        q = np.where(np.isnan(q_fixed), rounded, q_fixed)
        s_rounded = np.floor(q / step + 0.5)
        s_fixed = np.where(s_rounded > top, top, np.nan)
        return rounded - x, q_fixed, s_rounded - q / step, s_fixed

    return loss, freeze


@pytest.mark.parametrize("target_bits", [8, 2])
@pytest.mark.parametrize("slicing", ["clamped", "extra_precision"])
def test_logit_gradients_match_frozen_rounding(target_bits, slicing):
    rng = np.random.default_rng(30 + target_bits)
    w = rng.normal(size=(12, 4)).astype("float32")
    upstream = rng.normal(size=(12, 4)).astype("float32")
    max_logit = np.array([[4.0, 2.0, 1.0, 3.0]], dtype="float32")
    min_logit = np.array([[3.0, 4.0, 0.5, 2.5]], dtype="float32")
    loss, freeze = _frozen_rounding_loss(w, upstream, 8, target_bits, slicing)
    frozen = freeze(max_logit.astype(np.float64), min_logit.astype(np.float64))

    def keras_loss(max_value, min_value):
        w_hat = quantizers.fake_quantize(
            ops.convert_to_tensor(w),
            bits=8,
            target_bits=target_bits,
            slicing=slicing,
            clip_max=ops.sigmoid(max_value),
            clip_min=ops.sigmoid(min_value),
        )
        return ops.sum(ops.multiply(w_hat, upstream))

    max_gradient = backend_gradient(lambda v: keras_loss(v, min_logit), max_logit)
    min_gradient = backend_gradient(lambda v: keras_loss(max_logit, v), min_logit)

    eps = 1e-6
    expected_max = np.zeros_like(max_gradient, dtype=np.float64)
    expected_min = np.zeros_like(min_gradient, dtype=np.float64)
    for channel in range(4):
        delta = np.zeros((1, 4))
        delta[0, channel] = eps
        base_max, base_min = max_logit.astype(np.float64), min_logit.astype(np.float64)
        expected_max[0, channel] = (
            loss(base_max + delta, base_min, frozen) - loss(base_max - delta, base_min, frozen)
        ) / (2 * eps)
        expected_min[0, channel] = (
            loss(base_max, base_min + delta, frozen) - loss(base_max, base_min - delta, frozen)
        ) / (2 * eps)
    np.testing.assert_allclose(max_gradient, expected_max, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(min_gradient, expected_min, rtol=2e-3, atol=2e-4)
    assert np.all(np.abs(expected_max) > 0)


def test_clipped_weights_get_no_gradient():
    # Channel range [-1, 2] clipped to [-0.5, 1]: scale 1.5 / 255. The
    # weights -1 and 2 are clamped to the end codes and get no gradient;
    # the others pass the upstream gradient unchanged.
    w = np.array([[-1.0], [-0.25], [0.5], [2.0]], dtype="float32")
    upstream = ops.convert_to_tensor([[1.0], [2.0], [3.0], [4.0]])
    half = ops.full((1, 1), 0.5)

    def loss(weights):
        w_hat = quantizers.fake_quantize(weights, clip_max=half, clip_min=half)
        return ops.sum(ops.multiply(w_hat, upstream))

    gradient = backend_gradient(loss, w)
    # `scale * (w / scale)` differentiates to 1 up to float32 rounding.
    np.testing.assert_allclose(gradient, [[0.0], [2.0], [3.0], [0.0]], rtol=1e-6, atol=0)
