import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from keras_matquant.layers import contracted_kernel_axes
from tests.conftest import backend_gradient
from tests.test_quantizers import reference_quantize_dequantize


def reference_dequantized(kernel, reduce_axes, bits, target_bits):
    """Dequantize an N-D kernel per channel with the numpy reference."""
    kernel = np.asarray(kernel, dtype=np.float64)
    channel_axes = [axis for axis in range(kernel.ndim) if axis not in reduce_axes]
    order = list(reduce_axes) + channel_axes
    moved = np.transpose(kernel, order)
    rows = int(np.prod([kernel.shape[a] for a in reduce_axes]))
    flat = moved.reshape(rows, -1)
    result = reference_quantize_dequantize(flat, bits, target_bits).reshape(moved.shape)
    return np.transpose(result, np.argsort(order))


@pytest.mark.parametrize("target_bits", [8, 6, 4, 3, 2, 1])
def test_dense_matches_reference(target_bits):
    rng = np.random.default_rng(target_bits)
    layer = kmq.MatQuantDense(5, bits=8, bias_initializer="random_normal")
    x = rng.normal(size=(3, 7)).astype("float32")
    layer.build((None, 7))
    kernel = ops.convert_to_numpy(layer.kernel)
    bias = ops.convert_to_numpy(layer.bias)

    with kmq.precision(target_bits):
        result = ops.convert_to_numpy(layer(x))

    expected = x @ reference_dequantized(kernel, (0,), 8, target_bits) + bias
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_dense_default_is_int8():
    layer = kmq.MatQuantDense(4)
    x = np.random.default_rng(0).normal(size=(2, 6)).astype("float32")
    default = ops.convert_to_numpy(layer(x))
    with kmq.precision(8):
        int8 = ops.convert_to_numpy(layer(x))
    np.testing.assert_array_equal(default, int8)


def test_dense_float_precision_uses_master_kernel():
    layer = kmq.MatQuantDense(4, use_bias=False)
    x = np.random.default_rng(0).normal(size=(2, 6)).astype("float32")
    layer.build((None, 6))
    with kmq.precision(None):
        result = ops.convert_to_numpy(layer(x))
    expected = x @ ops.convert_to_numpy(layer.kernel)
    # float32 matmuls of the backend and numpy sum in different orders.
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "equation, kernel_shape, input_shape, output_shape, reduce_axes",
    [
        ("btd,df->btf", (6, 10), (2, 3, 6), (None, 10), (0,)),
        ("btf,fd->btd", (10, 6), (2, 3, 10), (None, 6), (0,)),
        ("btd,ndh->btnh", (2, 4, 3), (2, 5, 4), (None, 2, 3), (1,)),
        ("btnh,nhd->btd", (2, 3, 4), (2, 5, 2, 3), (None, 4), (0, 1)),
        ("ab,bc->ac", (4, 5), (3, 4), (5,), (0,)),
    ],
)
@pytest.mark.parametrize("target_bits", [8, 4, 2])
def test_einsum_dense_matches_dequantize_then_einsum(
    equation, kernel_shape, input_shape, output_shape, reduce_axes, target_bits
):
    rng = np.random.default_rng(0)
    layer = kmq.MatQuantEinsumDense(equation, output_shape)
    x = rng.normal(size=input_shape).astype("float32")
    layer.build(input_shape)
    assert tuple(layer.kernel.shape) == kernel_shape
    assert layer.channel_reduce_axes == reduce_axes

    kernel = ops.convert_to_numpy(layer.kernel)
    with kmq.precision(target_bits):
        result = ops.convert_to_numpy(layer(x))
    expected = np.einsum(
        equation, x, reference_dequantized(kernel, reduce_axes, 8, target_bits)
    )
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_query_kernel_channel_count():
    # Gemma's query kernel (heads, hidden, head_dim): heads x head_dim channels.
    assert contracted_kernel_axes("btd,ndh->btnh") == (1,)
    kernel = ops.convert_to_tensor(np.random.default_rng(0).normal(size=(4, 16, 8)))
    params = kmq.quantizers.compute_quantization_parameters(kernel, reduce_axes=(1,))
    assert int(np.prod(params.scale.shape)) == 4 * 8


@pytest.mark.parametrize("equation", ["ab,ab->ab", "...b,bc->...c", "abc", "ab,bc,cd->ad"])
def test_einsum_equation_rejected(equation):
    with pytest.raises(ValueError, match="equation|contracted"):
        contracted_kernel_axes(equation)


def test_dense_gradient_is_straight_through():
    rng = np.random.default_rng(5)
    x = ops.convert_to_tensor(rng.normal(size=(4, 3)).astype("float32"))
    upstream = ops.convert_to_tensor(rng.normal(size=(4, 2)).astype("float32"))
    kernel = rng.normal(size=(3, 2)).astype("float32")

    def loss(weights):
        w_hat = kmq.quantizers.fake_quantize(weights, bits=8, target_bits=2)
        return ops.sum(ops.multiply(ops.matmul(x, w_hat), upstream))

    gradient = backend_gradient(loss, kernel)
    # The float layer's gradient x^T @ upstream, at every element including
    # each channel's minimum and maximum.
    expected = ops.convert_to_numpy(x).T @ ops.convert_to_numpy(upstream)
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-6)


def test_precision_above_bits_rejected():
    layer = kmq.MatQuantDense(2, bits=4)
    with pytest.raises(ValueError, match="4-bit codes"):
        with kmq.precision(8):
            layer(np.ones((1, 3), dtype="float32"))


def test_keras_quantize_rejected():
    layer = kmq.MatQuantDense(2)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="MatQuant layer"):
        layer.quantize("int8")


@pytest.mark.parametrize("layer_class, args", [
    (kmq.MatQuantDense, (4,)),
    (kmq.MatQuantEinsumDense, ("ab,bc->ac", 4)),
])
def test_config_round_trip(layer_class, args):
    layer = layer_class(*args, bits=6, name="projection")
    config = layer.get_config()
    assert config["bits"] == 6
    assert config["slicing"] == "clamped"
    rebuilt = layer_class.from_config(config)
    assert rebuilt.get_config() == config


@pytest.mark.parametrize("bits", [0, 9, "8"])
def test_invalid_layer_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        kmq.MatQuantDense(4, bits=bits)


def test_from_dense_copies_weights_exactly():
    dense = keras.layers.Dense(5, name="source", bias_initializer="random_normal")
    dense.build((None, 3))
    layer = kmq.MatQuantDense.from_dense(dense)
    assert layer.name == "source"
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer.kernel), ops.convert_to_numpy(dense.kernel)
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer.bias), ops.convert_to_numpy(dense.bias)
    )


def test_from_dense_rejects_matquant_layer():
    layer = kmq.MatQuantDense(5)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="already a MatQuantDense"):
        kmq.MatQuantDense.from_dense(layer)


def test_from_dense_rejects_unbuilt_layer():
    with pytest.raises(ValueError, match="not built"):
        kmq.MatQuantDense.from_dense(keras.layers.Dense(5))


def test_saved_model_round_trip(tmp_path):
    inputs = keras.Input((6,))
    outputs = kmq.MatQuantDense(3, bits=8)(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(2, 6)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.layers[-1], kmq.MatQuantDense)
    with kmq.precision(2):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x))
        )
