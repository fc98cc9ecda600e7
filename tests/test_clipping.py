"""Learnable weight clipping (OmniQuant's LWC) on the MatQuant layers."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from tests.conftest import backend_gradient
from tests.conftest import token_batch
from tests.test_quantizers import reference_quantize_dequantize


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@pytest.mark.parametrize(
    "layer, input_shape, logit_shape",
    [
        (lambda: kmq.MatQuantDense(5, learnable_clipping=True), (None, 3), (1, 5)),
        (
            lambda: kmq.MatQuantEinsumDense(
                "btd,ndh->btnh", (None, 2, 3), learnable_clipping=True
            ),
            (None, 4, 6),
            (2, 1, 3),
        ),
        (
            lambda: kmq.MatQuantEinsumDense(
                "btnh,nhd->btd", (None, 4), learnable_clipping=True
            ),
            (None, 4, 2, 3),
            (1, 1, 4),
        ),
    ],
)
def test_clipping_logits_float32_at_four(layer, input_shape, logit_shape):
    layer = layer()
    layer.build(input_shape)
    names = [v.name for v in layer.trainable_weights]
    assert names[-2:] == ["clip_max_logit", "clip_min_logit"]
    for variable in (layer.clip_max_logit, layer.clip_min_logit):
        assert variable.dtype == "float32"
        assert tuple(variable.shape) == logit_shape
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), np.full(logit_shape, 4.0))


def test_clipping_init_sets_the_factor():
    layer = kmq.MatQuantDense(3, learnable_clipping=True, clipping_init=0.9)
    layer.build((None, 4))
    clip_max, clip_min = layer.clipping_factors()
    np.testing.assert_allclose(ops.convert_to_numpy(clip_max), np.full((1, 3), 0.9), rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(clip_min), np.full((1, 3), 0.9), rtol=1e-6)
    assert kmq.MatQuantDense(3).clipping_factors() == (None, None)


@pytest.mark.parametrize("target_bits", [8, 4, 2])
def test_clipped_layer_matches_numpy_reference(target_bits):
    rng = np.random.default_rng(target_bits)
    layer = kmq.MatQuantDense(6, use_bias=False, learnable_clipping=True)
    layer.build((None, 16))
    layer.clip_max_logit.assign(np.linspace(0.5, 4.0, 6, dtype="float32")[None, :])
    layer.clip_min_logit.assign(np.linspace(3.0, 1.0, 6, dtype="float32")[None, :])
    kernel = ops.convert_to_numpy(layer.kernel)
    x = rng.normal(size=(2, 16)).astype("float32")
    with kmq.precision(target_bits):
        result = ops.convert_to_numpy(layer(x))
    w_hat = reference_quantize_dequantize(
        kernel,
        8,
        target_bits,
        clip_max=sigmoid(ops.convert_to_numpy(layer.clip_max_logit)),
        clip_min=sigmoid(ops.convert_to_numpy(layer.clip_min_logit)),
    )
    np.testing.assert_allclose(result, x @ w_hat, rtol=1e-5, atol=1e-5)


def test_clipping_at_one_equals_min_max_layer():
    x = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
    plain = kmq.MatQuantDense(4)
    plain.build((None, 8))
    clipped = kmq.MatQuantDense(4, learnable_clipping=True, clipping_init=1.0)
    clipped.build((None, 8))
    clipped.kernel.assign(plain.kernel)
    clipped.bias.assign(plain.bias)
    for target_bits in (8, 4, 2):
        with kmq.precision(target_bits):
            np.testing.assert_array_equal(
                ops.convert_to_numpy(clipped(x)), ops.convert_to_numpy(plain(x))
            )


def test_gradients_reach_logits_and_kernel():
    rng = np.random.default_rng(1)
    layer = kmq.MatQuantDense(3, learnable_clipping=True)
    layer.build((None, 6))
    x = rng.normal(size=(4, 6)).astype("float32")
    upstream = rng.normal(size=(4, 3)).astype("float32")
    kernel, bias, max_logit, min_logit = (ops.convert_to_numpy(v) for v in layer.trainable_weights)

    def loss_of(index):
        def loss(value):
            weights = [kernel, bias, max_logit, min_logit]
            weights[index] = value
            with kmq.precision(2):
                outputs, _ = layer.stateless_call(weights, [], x)
            return ops.sum(ops.multiply(outputs, upstream))

        return loss

    max_gradient = backend_gradient(loss_of(2), max_logit)
    min_gradient = backend_gradient(loss_of(3), min_logit)
    assert np.all(np.isfinite(max_gradient))
    assert np.all(max_gradient != 0)
    assert np.all(np.isfinite(min_gradient))
    assert np.all(min_gradient != 0)

    kernel_gradient = backend_gradient(loss_of(0), kernel)
    # Clipping at 0.982 moves each channel's maximum and minimum outside the
    # range: they are clamped and get no gradient.
    for channel in range(3):
        assert kernel_gradient[np.argmax(kernel[:, channel]), channel] == 0.0
        assert kernel_gradient[np.argmin(kernel[:, channel]), channel] == 0.0
    assert np.count_nonzero(kernel_gradient) > 0


def test_fit_trains_logits_only(gemma3_lm):
    kmq.matquantize(gemma3_lm, targets="ffn", learnable_clipping=True)
    layers = kmq.matquant_layers(gemma3_lm)
    for layer in layers.values():
        layer.kernel.trainable = False
    kernels = {path: ops.convert_to_numpy(layer.kernel) for path, layer in layers.items()}
    logits = {path: ops.convert_to_numpy(layer.clip_max_logit) for path, layer in layers.items()}
    trainer = kmq.MatQuantModel(gemma3_lm)
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-2))
    x, y, w = token_batch()
    trainer.fit(x, y, sample_weight=w, epochs=2, batch_size=2, verbose=0)
    for path, layer in layers.items():
        np.testing.assert_array_equal(ops.convert_to_numpy(layer.kernel), kernels[path])
        assert not np.array_equal(ops.convert_to_numpy(layer.clip_max_logit), logits[path])
