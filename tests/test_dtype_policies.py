"""MatQuant layers and training under every supported dtype policy."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from tests.conftest import token_batch
from tests.test_quantizers import reference_quantize_dequantize

# (policy, compute dtype, tolerance of the output against float64 math)
POLICIES = [
    ("float32", "float32", 1e-5),
    ("bfloat16", "bfloat16", 0.1),
    ("mixed_bfloat16", "bfloat16", 0.1),
    ("float16", "float16", 2e-2),
    ("mixed_float16", "float16", 2e-2),
]


@pytest.fixture
def global_policy():
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("policy, compute_dtype, tolerance", POLICIES)
@pytest.mark.parametrize("learnable_clipping", [False, True])
def test_dense_under_policy(policy, compute_dtype, tolerance, learnable_clipping):
    rng = np.random.default_rng(0)
    layer = kmq.MatQuantDense(
        3, dtype=policy, learnable_clipping=learnable_clipping, clipping_init=1.0 if learnable_clipping else None
    )
    layer.build((None, 4))
    x = rng.normal(size=(2, 4)).astype("float32")

    scale, zero_point = layer.quantization_parameters()
    assert keras.backend.standardize_dtype(scale.dtype) == "float32"
    assert keras.backend.standardize_dtype(zero_point.dtype) == "float32"
    if learnable_clipping:
        assert layer.clip_max_logit.dtype == "float32"
        assert layer.clip_min_logit.dtype == "float32"

    kernel = ops.convert_to_numpy(ops.cast(layer.kernel, "float32"))
    bias = ops.convert_to_numpy(ops.cast(layer.bias, "float32"))
    for target_bits in (8, 2):
        with kmq.precision(target_bits):
            outputs = layer(x)
        assert keras.backend.standardize_dtype(outputs.dtype) == compute_dtype
        expected = x @ reference_quantize_dequantize(kernel, 8, target_bits) + bias
        result = ops.convert_to_numpy(ops.cast(outputs, "float32"))
        np.testing.assert_allclose(result, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16", "float16", "mixed_float16"])
def test_einsum_dense_under_policy(policy):
    layer = kmq.MatQuantEinsumDense("btd,ndh->btnh", (None, 2, 3), dtype=policy)
    x = np.random.default_rng(1).normal(size=(2, 5, 4)).astype("float32")
    with kmq.precision(4):
        outputs = layer(x)
    assert keras.backend.standardize_dtype(outputs.dtype) == layer.compute_dtype
    assert keras.backend.standardize_dtype(layer.quantization_parameters().scale.dtype) == "float32"
    assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(outputs, "float32"))))


@pytest.mark.parametrize("policy", ["float16", "mixed_float16", "mixed_bfloat16"])
def test_fit_finite_under_policy(policy, global_policy):
    import keras_hub

    from tests.conftest import tiny_gemma3_causal_lm

    global_policy(policy)
    keras.utils.set_random_seed(0)
    causal_lm = tiny_gemma3_causal_lm()
    assert isinstance(causal_lm, keras_hub.models.Gemma3CausalLM)
    kmq.matquantize(causal_lm, targets="ffn", learnable_clipping=True)
    layers = kmq.matquant_layers(causal_lm)
    before = {p: ops.convert_to_numpy(ops.cast(l.kernel, "float32")) for p, l in layers.items()}

    trainer = kmq.MatQuantModel(causal_lm)
    trainer.compile(optimizer=keras.optimizers.SGD(1e-2))
    x, y, w = token_batch()
    history = trainer.fit(x, y, sample_weight=w, epochs=2, batch_size=2, verbose=0)

    for name in ("loss", "loss_int8", "loss_int4", "loss_int2"):
        assert np.all(np.isfinite(history.history[name])), name
    for path, layer in layers.items():
        assert layer.compute_dtype == keras.DTypePolicy(policy).compute_dtype
        kernel = ops.convert_to_numpy(ops.cast(layer.kernel, "float32"))
        logits = ops.convert_to_numpy(layer.clip_max_logit)
        assert np.all(np.isfinite(kernel)), path
        assert np.all(np.isfinite(logits)), path
        # Finite gradients moved the weights.
        assert not np.array_equal(kernel, before[path]), path
