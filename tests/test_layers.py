import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from keras_matquant.layers import contracted_kernel_axes
from tests.conftest import TINY_CAUSAL_LMS
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


# Every equation KerasHub uses in Gemma, Gemma 2, Gemma 3, Mistral and Llama
# projections, plus a plain matmul, with and without bias.
EINSUM_CASES = [
    ("btd,df->btf", (6, 10), (2, 3, 6), (None, 10), (0,), None),
    ("btf,fd->btd", (10, 6), (2, 3, 10), (None, 6), (0,), "d"),
    ("btd,ndh->btnh", (2, 4, 3), (2, 5, 4), (None, 2, 3), (1,), None),
    ("btd,ndh->btnh", (2, 4, 3), (2, 5, 4), (None, 2, 3), (1,), "nh"),
    ("btnh,nhd->btd", (2, 3, 4), (2, 5, 2, 3), (None, 4), (0, 1), None),
    ("btnh,nhd->btd", (2, 3, 4), (2, 5, 2, 3), (None, 4), (0, 1), "d"),
    ("bsd,kdh->bskh", (1, 4, 3), (2, 5, 4), (None, 1, 3), (1,), None),
    ("bqm,muh->bquh", (4, 2, 3), (2, 5, 4), (None, 2, 3), (0,), None),
    ("bkm,mvh->bkvh", (4, 1, 3), (2, 5, 4), (None, 1, 3), (0,), "vh"),
    ("bquh,uhm->bqm", (2, 3, 4), (2, 5, 2, 3), (None, 4), (0, 1), None),
    ("bquh,uhm->bqm", (2, 3, 4), (2, 5, 2, 3), (None, 4), (0, 1), "m"),
    ("ab,bc->ac", (4, 5), (3, 4), (5,), (0,), None),
    ("ab,bc->ac", (4, 5), (3, 4), (5,), (0,), "c"),
]


def dequantize_then_apply(layer, x, target_bits):
    """Dequantize the layer's own codes in numpy, then run the float op."""
    codes = ops.convert_to_numpy(layer.quantized_codes(target_bits))
    scale, zero_point = (ops.convert_to_numpy(t) for t in layer.quantization_parameters())
    step = np.float32(2 ** (layer.bits - target_bits))
    w_hat = scale * (codes.astype("float32") * step - zero_point)
    if isinstance(layer, kmq.MatQuantEinsumDense):
        y = ops.einsum(layer.equation, x, w_hat)
    else:
        y = ops.matmul(x, w_hat)
    if layer.bias is not None:
        y = ops.add(y, layer.bias)
    return ops.convert_to_numpy(y)


@pytest.mark.parametrize(
    "equation, kernel_shape, input_shape, output_shape, reduce_axes, bias_axes",
    EINSUM_CASES,
)
@pytest.mark.parametrize("target_bits", [8, 4, 2])
def test_einsum_dense_matches_dequantize_then_einsum(
    equation, kernel_shape, input_shape, output_shape, reduce_axes, bias_axes, target_bits
):
    rng = np.random.default_rng(0)
    layer = kmq.MatQuantEinsumDense(
        equation, output_shape, bias_axes=bias_axes, bias_initializer="random_normal"
    )
    x = rng.normal(size=input_shape).astype("float32")
    layer.build(input_shape)
    assert tuple(layer.kernel.shape) == kernel_shape
    assert layer.channel_reduce_axes == reduce_axes
    scale, _ = layer.quantization_parameters()
    expected_scale_shape = tuple(
        1 if axis in reduce_axes else size for axis, size in enumerate(kernel_shape)
    )
    assert tuple(scale.shape) == expected_scale_shape

    kernel = ops.convert_to_numpy(layer.kernel)
    with kmq.precision(target_bits):
        result = ops.convert_to_numpy(layer(x))
    np.testing.assert_array_equal(result, dequantize_then_apply(layer, x, target_bits))
    expected = np.einsum(
        equation, x, reference_dequantized(kernel, reduce_axes, 8, target_bits)
    )
    if bias_axes is not None:
        expected = expected + ops.convert_to_numpy(layer.bias)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(TINY_CAUSAL_LMS))
def test_kerashub_projections_match_dequantized(family):
    keras.utils.set_random_seed(0)
    causal_lm = TINY_CAUSAL_LMS[family]()
    kmq.matquantize(causal_lm, targets="all")
    rng = np.random.default_rng(1)
    for path, layer in kmq.matquant_layers(causal_lm).items():
        input_shape = [2 if size is None else size for size in layer.get_build_config()["input_shape"]]
        x = rng.normal(size=input_shape).astype("float32")
        for target_bits in (8, 2):
            with kmq.precision(target_bits):
                result = ops.convert_to_numpy(layer(x))
            expected = dequantize_then_apply(layer, x, target_bits)
            np.testing.assert_array_equal(result, expected, err_msg=path)


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


def layer_state(layer):
    """Every variable of a layer as numpy, by name."""
    return {v.name: ops.convert_to_numpy(v).copy() for v in layer.weights}


def assert_same_state(layer, state):
    assert sorted(state) == sorted(v.name for v in layer.weights)
    for variable in layer.weights:
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), state[variable.name])


@pytest.mark.parametrize("slicing", ["clamped", "extra_precision"])
def test_layer_constant_channels_exact(slicing):
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 4)).astype("float32")
    kernel[:, 1] = 0.37
    kernel[:, 2] = 0.0
    layer = kmq.MatQuantDense(4, use_bias=False, slicing=slicing)
    layer.build((None, 3))
    layer.kernel.assign(kernel)
    scale, zero_point = layer.quantization_parameters()
    assert np.all(np.isfinite(ops.convert_to_numpy(scale)))
    assert np.all(np.isfinite(ops.convert_to_numpy(zero_point)))
    for target_bits in (8, 4, 2):
        with kmq.precision(target_bits):
            # The identity input returns the dequantized kernel itself.
            w_hat = ops.convert_to_numpy(layer(np.eye(3, dtype="float32")))
        assert not np.any(np.isnan(w_hat))
        np.testing.assert_array_equal(w_hat[:, 1], np.full(3, 0.37, dtype="float32"))
        np.testing.assert_array_equal(w_hat[:, 2], np.zeros(3, dtype="float32"))


@pytest.mark.parametrize("bad_value, channel", [(np.inf, 2), (np.nan, 1), (-np.inf, 0)])
def test_non_finite_kernel_names_layer_and_channel(bad_value, channel):
    dense = keras.layers.Dense(3, name="proj")
    dense.build((None, 4))
    kernel = ops.convert_to_numpy(dense.kernel).copy()
    kernel[1, channel] = bad_value
    dense.kernel.assign(kernel)
    with pytest.raises(ValueError, match=rf"'proj'.*channel {channel} of 3"):
        kmq.MatQuantDense.from_dense(dense)


def test_huge_weight_finite_under_mixed_float16():
    dense = keras.layers.Dense(3, name="proj", dtype="mixed_float16")
    dense.build((None, 4))
    kernel = ops.convert_to_numpy(dense.kernel).copy()
    kernel[0, 1] = 1e30
    dense.kernel.assign(kernel)
    layer = kmq.MatQuantDense.from_dense(dense)
    scale, zero_point = layer.quantization_parameters()
    assert keras.backend.standardize_dtype(scale.dtype) == "float32"
    assert np.all(np.isfinite(ops.convert_to_numpy(scale)))
    assert np.all(np.isfinite(ops.convert_to_numpy(zero_point)))
    # The other channels still quantize to their float values closely.
    with kmq.precision(8):
        w_hat = ops.convert_to_numpy(layer.fake_quantized_kernel()).astype("float32")
    np.testing.assert_allclose(w_hat[:, [0, 2]], kernel[:, [0, 2]], atol=1e-2)


def test_huge_weight_under_float16_rejected():
    # A float16 variable cannot hold 1e30: it becomes inf, which is reported.
    dense = keras.layers.Dense(3, name="proj", dtype="float16")
    dense.build((None, 4))
    kernel = ops.convert_to_numpy(dense.kernel).astype("float32")
    kernel[0, 1] = 1e30
    with np.errstate(over="ignore"):
        dense.kernel.assign(kernel.astype("float16"))
    with pytest.raises(ValueError, match="'proj'.*channel 1 of 3"):
        kmq.MatQuantDense.from_dense(dense)


def test_gradient_at_channel_extremes():
    # Dense(3 -> 2): each channel's minimum and maximum sit exactly on the
    # quantization bounds; their gradient must still be the float one.
    kernel = np.array([[-1.0, 0.5], [0.25, -2.0], [1.0, 3.0]], dtype="float32")
    bias = np.array([0.1, -0.2], dtype="float32")
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], dtype="float32")
    upstream = np.array([[1.0, -1.0], [0.5, 2.0]], dtype="float32")
    layer = kmq.MatQuantDense(2)
    layer.build((None, 3))

    def loss(value):
        outputs, _ = layer.stateless_call([value, ops.convert_to_tensor(bias)], [], x)
        return ops.sum(ops.multiply(outputs, upstream))

    expected = x.T @ upstream
    for target_bits in (8, 4, 2, 1):
        with kmq.precision(target_bits):
            gradient = backend_gradient(loss, kernel)
        np.testing.assert_allclose(gradient, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("second_bits", [8, 4])
def test_matquantize_twice_rejected(second_bits):
    dense = keras.layers.Dense(32)
    dense.build((None, 16))
    layer = kmq.MatQuantDense.from_dense(dense, bits=8)
    codes = ops.convert_to_numpy(layer.quantized_codes())
    state = layer_state(layer)
    with pytest.raises(ValueError, match=f"Layer '{layer.name}' is already a MatQuantDense"):
        kmq.MatQuantDense.from_dense(layer, bits=second_bits)
    assert layer.bits == 8
    assert_same_state(layer, state)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.quantized_codes()), codes)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"slicing": "floor"}, "extra_precision"),
        ({"learnable_clipping": True, "clipping_init": 0.0}, r"\(0, 1\]"),
        ({"learnable_clipping": True, "clipping_init": 1.5}, r"\(0, 1\]"),
        ({"learnable_clipping": True, "clipping_init": -0.2}, r"\(0, 1\]"),
        ({"clipping_init": 0.9}, "learnable_clipping=True"),
        ({"learnable_clipping": "yes"}, "True or False"),
        ({"dtype": "int8_from_float32"}, "quantized dtype policy"),
        ({"lora_rank": 2}, "LoRA"),
    ],
)
def test_invalid_layer_options_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        kmq.MatQuantDense(4, **options)
    with pytest.raises(ValueError, match=message):
        kmq.MatQuantEinsumDense("ab,bc->ac", 4, **options)


def test_invalid_option_leaves_source_unchanged():
    dense = keras.layers.Dense(3, name="proj", dtype="mixed_bfloat16")
    dense.build((None, 4))
    state = layer_state(dense)
    x = np.ones((1, 4), dtype="float32")
    before = ops.convert_to_numpy(ops.cast(dense(x), "float32"))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        kmq.MatQuantDense.from_dense(dense, learnable_clipping=True, clipping_init=2.0)
    assert_same_state(dense, state)
    assert dense.dtype_policy.name == "mixed_bfloat16"
    np.testing.assert_array_equal(ops.convert_to_numpy(ops.cast(dense(x), "float32")), before)


def test_failed_calls_leave_layer_unchanged():
    layer = kmq.MatQuantDense(3, bits=4, learnable_clipping=True)
    x = np.random.default_rng(0).normal(size=(2, 5)).astype("float32")
    before = ops.convert_to_numpy(layer(x))
    state = layer_state(layer)
    with pytest.raises(ValueError):
        with kmq.precision(8):
            layer(x)
    with pytest.raises(ValueError):
        layer.quantize("int8")
    with pytest.raises(ValueError):
        layer.enable_lora(2)
    with pytest.raises(ValueError):
        layer.quantized_codes(6)
    assert_same_state(layer, state)
    assert layer.dtype_policy.name == "float32"
    assert not layer.lora_enabled
    np.testing.assert_array_equal(ops.convert_to_numpy(layer(x)), before)


def test_effective_bits_per_layer_and_model():
    # Channel [0, 1.00, 2.30, 2.55] has scale 0.01 and codes 0, 100, 230,
    # 255. Sliced to int2 (step 64): 0, 2, 4, 4 -> half in the extra level.
    extra = kmq.MatQuantDense(1, use_bias=False, slicing="extra_precision", name="extra")
    extra.build((None, 4))
    extra.kernel.assign(np.array([[0.0], [1.0], [2.3], [2.55]], dtype="float32"))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(extra.quantized_codes(2)), [[0], [2], [4], [4]]
    )
    assert extra.effective_bits(2) == 2.5
    assert extra.effective_bits(8) == 8.0
    assert extra.effective_bits() == 8.0

    clamped = kmq.MatQuantDense(3, use_bias=False, name="clamped")
    clamped.build((None, 4))
    assert clamped.effective_bits(2) == 2.0

    model = keras.Sequential([keras.Input((4,)), extra, keras.layers.Dense(4), clamped])
    # Weighted by kernel size: (2.5 * 4 + 2.0 * 12) / 16 = 2.125.
    assert kmq.effective_bits(model, 2) == 2.125
    assert kmq.effective_bits_by_layer(model, 2) == {"extra": (2.5, 4), "clamped": (2.0, 12)}
    with pytest.raises(ValueError, match="no MatQuant layers"):
        kmq.effective_bits(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="precision"):
        kmq.effective_bits(model, 9)
