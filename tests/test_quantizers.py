import numpy as np
import pytest
from keras import ops

from keras_matquant import quantizers
from tests.conftest import backend_gradient


def reference_quantize_dequantize(w, bits, target_bits):
    """Plain-numpy restatement of min-max quantization and clamped slicing.

    Channels are the columns of a 2-D kernel (axis 0 is reduced).
    """
    w = np.asarray(w, dtype=np.float64)
    levels = 2**bits - 1
    w_min = w.min(axis=0, keepdims=True)
    w_max = w.max(axis=0, keepdims=True)
    scale = (w_max - w_min) / levels
    scale = np.where(scale > 0, scale, 1.0)
    zero = -w_min / scale
    q = np.clip(np.floor(w / scale + zero + 0.5), 0, levels)
    step = 2 ** (bits - target_bits)
    s = np.clip(np.floor(q / step + 0.5), 0, 2**target_bits - 1) * step
    return scale * (s - zero)


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
