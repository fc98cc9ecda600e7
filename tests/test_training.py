import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from keras_matquant.training import validate_loss_weights
from tests.conftest import backend_gradient
from tests.conftest import token_batch


def masked_mean_cross_entropy(logits, targets, weights):
    """Independent numpy cross entropy: -log softmax at the target, weighted."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return float(-(picked * weights).sum() / weights.sum())


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype("float32")
    targets = rng.integers(0, 5, size=(2, 3)).astype("int32")
    weights = np.array([[1, 1, 0], [1, 0, 0]], dtype="float32")
    result = float(ops.convert_to_numpy(kmq.masked_cross_entropy(targets, logits, weights)))
    assert result == pytest.approx(masked_mean_cross_entropy(logits, targets, weights), rel=1e-5)


def test_loss_is_weighted_sum_of_precisions(gemma3_lm):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)
    loss_weights = {8: 0.1, 4: 0.3, 2: 1.0}
    trainer = kmq.MatQuantModel(gemma3_lm, loss_weights=loss_weights)
    trainer.compile(optimizer="sgd")

    logs = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)

    expected = {}
    for bits in loss_weights:
        with kmq.precision(bits):
            logits = ops.convert_to_numpy(gemma3_lm(x))
        expected[bits] = masked_mean_cross_entropy(logits, y, weights)
        assert logs[f"loss_int{bits}"] == pytest.approx(expected[bits], rel=1e-4)
    total = sum(loss_weights[bits] * expected[bits] for bits in loss_weights)
    assert logs["loss"] == pytest.approx(total, rel=1e-4)


def test_fit_lowers_summed_loss(gemma3_lm):
    x, y, weights = token_batch(batch=4, length=8)
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm)
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2))

    before = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)
    history = trainer.fit(x, y, sample_weight=weights, batch_size=4, epochs=1, verbose=0)
    after = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)

    assert set(history.history) == {"loss", "loss_int8", "loss_int4", "loss_int2"}
    assert len(history.history["loss_int2"]) == 1
    assert after["loss"] < before["loss"]


def test_fit_updates_master_kernels(gemma3_lm):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)
    count = kmq.train_only_matquant_layers(gemma3_lm)
    layers = kmq.matquant_layers(gemma3_lm)
    assert count == sum(int(np.prod(layer.kernel.shape)) for layer in layers.values())
    embedding = ops.convert_to_numpy(gemma3_lm.backbone.token_embedding.embeddings)
    kernel = ops.convert_to_numpy(layers["decoder_block_0/ffw_linear"].kernel)

    trainer = kmq.MatQuantModel(gemma3_lm)
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
    trainer.fit(x, y, sample_weight=weights, epochs=1, verbose=0)

    new_kernel = ops.convert_to_numpy(layers["decoder_block_0/ffw_linear"].kernel)
    assert not np.array_equal(kernel, new_kernel)
    np.testing.assert_array_equal(
        embedding, ops.convert_to_numpy(gemma3_lm.backbone.token_embedding.embeddings)
    )


def test_gradient_is_sum_of_precision_gradients():
    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.normal(size=(6, 4)).astype("float32"))
    targets = ops.convert_to_tensor(rng.integers(0, 5, size=(6,)).astype("int32"))
    layer = kmq.MatQuantDense(5, use_bias=False)
    layer.build((None, 4))
    kernel = ops.convert_to_numpy(layer.kernel)
    loss_weights = {8: 0.1, 4: 0.1, 2: 1.0}

    def objective(precisions):
        def loss(kernel_value):
            total = 0.0
            for bits in precisions:
                with kmq.precision(bits):
                    logits, _ = layer.stateless_call([kernel_value], [], x)
                total = total + loss_weights[bits] * kmq.masked_cross_entropy(
                    targets, logits
                )
            return total

        return loss

    combined = backend_gradient(objective((8, 4, 2)), kernel)
    separate = sum(backend_gradient(objective((bits,)), kernel) for bits in (8, 4, 2))
    np.testing.assert_allclose(combined, separate, rtol=1e-5, atol=1e-7)
    assert np.abs(combined).max() > 0


def test_model_without_matquant_layers_rejected(gemma3_lm):
    with pytest.raises(ValueError, match="no MatQuant layers.*matquantize"):
        kmq.MatQuantModel(gemma3_lm)


def test_non_model_rejected():
    with pytest.raises(ValueError, match="keras.Model"):
        kmq.MatQuantModel("gemma")


def test_precision_above_layer_bits_rejected(gemma3_lm):
    kmq.matquantize(gemma3_lm, bits=4)
    with pytest.raises(ValueError, match=r"\[8\].*4-bit codes"):
        kmq.MatQuantModel(gemma3_lm, loss_weights={8: 1.0, 2: 1.0})


def test_compile_with_loss_rejected(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm)
    with pytest.raises(ValueError, match="loss_weights"):
        trainer.compile(optimizer="adam", loss="mse")


@pytest.mark.parametrize(
    "loss_weights, message",
    [
        ({}, "dict such as"),
        ([0.1, 1.0], "dict such as"),
        ({9: 1.0}, r"1\.\.8"),
        ({0: 1.0}, r"1\.\.8"),
        ({"int4": 1.0}, "Received key 'int4'"),
        ({8: -0.1, 2: 1.0}, "non-negative"),
        ({8: float("nan")}, "non-negative"),
        ({8: 0.0, 2: 0.0}, "only zero weights"),
        ({8: "heavy"}, "must be a number"),
    ],
)
def test_invalid_loss_weights_rejected(loss_weights, message):
    with pytest.raises(ValueError, match=message):
        validate_loss_weights(loss_weights)


def test_loss_weights_sorted_and_string_keys_accepted():
    assert validate_loss_weights({"2": 1, "8": 0.1}) == {8: 0.1, 2: 1.0}


def test_trainer_config_round_trip(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm, loss_weights={8: 0.2, 2: 1.0})
    config = trainer.get_config()
    assert config["loss_weights"] == {"8": 0.2, "2": 1.0}
    rebuilt = kmq.MatQuantModel.from_config(config)
    assert rebuilt.precisions == (8, 2)
    assert rebuilt.loss_weights_by_bits == {8: 0.2, 2: 1.0}


def test_trainer_save_and_load_round_trip(gemma3_lm, tmp_path):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm, loss_weights={4: 0.5, 2: 1.0})
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
    trainer.fit(x, y, sample_weight=weights, epochs=1, verbose=0)
    path = tmp_path / "trainer.keras"
    trainer.save(path)

    loaded = keras.saving.load_model(path)

    assert isinstance(loaded, kmq.MatQuantModel)
    assert loaded.loss_weights_by_bits == {4: 0.5, 2: 1.0}
    assert sorted(kmq.matquant_layers(loaded.language_model)) == sorted(
        kmq.matquant_layers(gemma3_lm)
    )
    for key, expected in trainer(x).items():
        np.testing.assert_array_equal(
            ops.convert_to_numpy(loaded(x)[key]), ops.convert_to_numpy(expected)
        )


def test_train_only_matquant_layers_requires_matquant(gemma3_lm):
    with pytest.raises(ValueError, match="no MatQuant layers to train"):
        kmq.train_only_matquant_layers(gemma3_lm)


def test_fit_traces_train_step_once(gemma3_lm):
    x, y, weights = token_batch(batch=6, length=8)
    kmq.matquantize(gemma3_lm)
    trace_count = []

    class CountingTrainer(kmq.MatQuantModel):
        def call(self, inputs, training=None):
            trace_count.append(training)
            return super().call(inputs, training=training)

    trainer = CountingTrainer(gemma3_lm)
    trainer.compile(optimizer="sgd")
    trainer.fit(x, y, sample_weight=weights, batch_size=2, epochs=2, verbose=0)

    # JAX and TensorFlow trace the compiled train step once for all six
    # steps (three batches in each of two epochs). PyTorch runs eagerly and
    # calls the model at every step.
    expected = 6 if keras.backend.backend() == "torch" else 1
    assert trace_count.count(True) == expected


def test_fit_without_targets_rejected(gemma3_lm):
    x, _, _ = token_batch()
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm)
    trainer.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="needs targets"):
        trainer.fit(x, verbose=0)


def test_loaded_trainer_keeps_training(gemma3_lm, tmp_path):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm)
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3))
    trainer.fit(x, y, sample_weight=weights, epochs=1, verbose=0)
    path = tmp_path / "trainer.keras"
    trainer.save(path)

    loaded = keras.saving.load_model(path)

    assert isinstance(loaded.optimizer, keras.optimizers.AdamW)
    assert loaded.optimizer.learning_rate.numpy() == pytest.approx(1e-3)
    history = loaded.fit(x, y, sample_weight=weights, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_summed_cross_entropy_returns_sum_and_count():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5)).astype("float32")
    targets = rng.integers(0, 5, size=(2, 3)).astype("int32")
    weights = np.array([[1, 0, 1], [1, 1, 0]], dtype="float32")
    from keras_matquant.training import summed_cross_entropy

    total, count = summed_cross_entropy(targets, logits, weights)
    expected_mean = masked_mean_cross_entropy(logits, targets, weights)
    assert float(ops.convert_to_numpy(count)) == 4.0
    assert float(ops.convert_to_numpy(total)) == pytest.approx(4.0 * expected_mean, rel=1e-5)
