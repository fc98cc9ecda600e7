import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from keras_matquant.training import LOSS_WEIGHT_PRESETS
from keras_matquant.training import QATRecipe
from keras_matquant.training import build_qat_trainer
from keras_matquant.training import qat_recipe
from keras_matquant.training import resolve_loss_weights
from tests.conftest import backend_gradient
from tests.conftest import token_batch
from tests.test_training import masked_mean_cross_entropy

FFN_LAYERS = 2 * 3
FFN_AND_ATTENTION_LAYERS = 2 * (3 + 4)


def test_loss_weight_preset_values():
    assert LOSS_WEIGHT_PRESETS == {
        "gemma": {8: 0.1, 4: 0.1, 2: 1.0},
        "mistral_qat": {8: 0.2, 4: 0.2, 2: 1.0},
        "mistral_omniquant": {8: 0.4, 4: 0.4, 2: 1.0},
        "uniform": {8: 1.0, 4: 1.0, 2: 1.0},
    }


def test_resolve_loss_weights_returns_copy():
    weights = resolve_loss_weights("gemma")
    weights[8] = 5.0
    assert LOSS_WEIGHT_PRESETS["gemma"][8] == 0.1
    assert resolve_loss_weights({"2": 1, 8: 0.5}) == {8: 0.5, 2: 1.0}


def test_unknown_preset_rejected():
    with pytest.raises(ValueError, match="'gemma', 'mistral_qat', 'mistral_omniquant', 'uniform'"):
        resolve_loss_weights("gemma2")


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ({}, QATRecipe("matquant", 8, {8: 0.1, 4: 0.1, 2: 1.0})),
        (
            {"name": "matquant", "loss_weights": "mistral_omniquant", "co_distillation": "8,4,2,8->4;2"},
            QATRecipe("matquant", 8, {8: 0.4, 4: 0.4, 2: 1.0}, "[8, 4, 2, 8->4;2]"),
        ),
        ({"name": "baseline", "bits": 2}, QATRecipe("baseline", 2, {2: 1.0})),
        ({"name": "baseline", "bits": 8}, QATRecipe("baseline", 8, {8: 1.0})),
        ({"name": "sliced_int8"}, QATRecipe("sliced_int8", 8, {8: 1.0})),
        ({"name": "sliced_int8", "bits": 8}, QATRecipe("sliced_int8", 8, {8: 1.0})),
        ({"name": "single_precision"}, QATRecipe("single_precision", 8, {2: 1.0})),
        ({"name": "single_precision", "bits": 4}, QATRecipe("single_precision", 8, {4: 1.0})),
    ],
)
def test_qat_recipe_values(arguments, expected):
    assert qat_recipe(**arguments) == expected


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"name": "omniquant"}, "Unknown QAT recipe 'omniquant'. Accepted: 'matquant', 'baseline'"),
        ({"name": "matquant", "bits": 2}, "set those instead of bits"),
        ({"name": "baseline"}, "pass bits=r"),
        ({"name": "baseline", "bits": 9}, r"1\.\.8"),
        ({"name": "sliced_int8", "bits": 2}, "trains int8 only"),
        ({"name": "single_precision", "bits": 8}, r"1\.\.7"),
        ({"name": "baseline", "bits": 4, "loss_weights": "gemma"}, "sets `loss_weights` itself"),
        ({"name": "sliced_int8", "co_distillation": "[8, 8->2]"}, "sets `co_distillation` itself"),
        ({"loss_weights": {8: -0.1, 2: 1.0}}, "non-negative"),
        ({"co_distillation": "[8, 4, 2, 8->3]"}, "uses precision 3, which is not trained"),
        ({"co_distillation": "eight to two"}, r"is not a precision.*\[8, 4, 8->2\]"),
    ],
)
def test_invalid_recipes_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        qat_recipe(**arguments)


@pytest.mark.parametrize(
    "recipe, bits, targets, layer_bits, precisions, layer_count",
    [
        ("matquant", None, "ffn", 8, (8, 4, 2), FFN_LAYERS),
        ("matquant", None, "all", 8, (8, 4, 2), FFN_AND_ATTENTION_LAYERS),
        ("baseline", 4, "ffn", 4, (4,), FFN_LAYERS),
        ("baseline", 2, "all", 2, (2,), FFN_AND_ATTENTION_LAYERS),
        ("sliced_int8", None, "ffn", 8, (8,), FFN_LAYERS),
        ("single_precision", None, "all", 8, (2,), FFN_AND_ATTENTION_LAYERS),
    ],
)
def test_build_qat_trainer_layers_and_precisions(
    gemma3_lm, recipe, bits, targets, layer_bits, precisions, layer_count
):
    trainer = build_qat_trainer(gemma3_lm, recipe, targets=targets, bits=bits)

    layers = kmq.matquant_layers(gemma3_lm)
    assert len(layers) == layer_count
    assert {layer.bits for layer in layers.values()} == {layer_bits}
    assert trainer.precisions == precisions


def test_recipe_object_rejects_extra_options(gemma3_lm):
    recipe = qat_recipe("baseline", bits=4)
    with pytest.raises(ValueError, match="do not pass them again"):
        build_qat_trainer(gemma3_lm, recipe, bits=4)
    assert not kmq.matquant_layers(gemma3_lm)


def test_invalid_recipe_leaves_model_unchanged(gemma3_lm):
    with pytest.raises(ValueError, match="uses precision 3"):
        build_qat_trainer(gemma3_lm, co_distillation="[8, 4, 2, 8->3]")
    assert not kmq.matquant_layers(gemma3_lm)


@pytest.mark.parametrize(
    "recipe, bits, targets, options",
    [
        ("matquant", None, "ffn", {}),
        ("matquant", None, "all", {"co_distillation": "[8, 4, 8->2]", "accumulate_gradients": True}),
        ("matquant", None, "ffn", {"co_distillation": "[8, 4, 2, 8->4;2]", "loss_weights": "mistral_qat"}),
        ("baseline", 4, "ffn", {}),
        ("baseline", 2, "all", {}),
        ("sliced_int8", None, "all", {}),
        ("single_precision", None, "ffn", {}),
    ],
)
def test_each_recipe_lowers_its_own_loss(gemma3_lm, recipe, bits, targets, options):
    x, y, weights = token_batch(batch=4, length=8)
    trainer = build_qat_trainer(gemma3_lm, recipe, targets=targets, bits=bits, **options)
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2))

    before = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)
    trainer.fit(x, y, sample_weight=weights, batch_size=4, epochs=3, verbose=0)
    after = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)

    assert after["loss"] < before["loss"]


def test_single_precision_loss_is_int2_slice_only(gemma3_lm):
    x, y, weights = token_batch()
    weights[1, 4:] = 0.0
    trainer = build_qat_trainer(gemma3_lm, "single_precision", targets="ffn")
    trainer.compile(optimizer="sgd")

    logs = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)

    logits = {}
    for bits in (8, 2):
        with kmq.precision(bits):
            logits[bits] = ops.convert_to_numpy(gemma3_lm(x))
    int2_loss = masked_mean_cross_entropy(logits[2], y, weights)
    int8_loss = masked_mean_cross_entropy(logits[8], y, weights)
    assert set(logs) == {"loss", "loss_int2"}
    assert logs["loss"] == pytest.approx(int2_loss, rel=1e-5)
    assert abs(int2_loss - int8_loss) > 1e-3
    assert set(trainer(x)) == {"int2"}


def test_single_precision_gradient_is_int2_only(gemma3_lm):
    x, y, weights = token_batch()
    trainer = build_qat_trainer(gemma3_lm, "single_precision", targets="ffn")
    kmq.train_only_matquant_layers(gemma3_lm)
    layer = kmq.matquant_layers(gemma3_lm)["decoder_block_1/ffw_linear"]
    assert layer.bits == 8
    trainable = [v.value for v in gemma3_lm.trainable_variables]
    non_trainable = [v.value for v in gemma3_lm.non_trainable_variables]
    index = [id(v) for v in gemma3_lm.trainable_variables].index(id(layer.kernel))
    kernel = ops.convert_to_numpy(layer.kernel)
    targets = ops.expand_dims(ops.convert_to_tensor(y), -1)
    mask = ops.convert_to_tensor(weights)

    def cross_entropy_at(bits):
        def loss(kernel_value):
            values = list(trainable)
            values[index] = kernel_value
            with kmq.precision(bits):
                logits, _ = gemma3_lm.stateless_call(values, non_trainable, x)
            log_probs = logits - ops.logsumexp(logits, axis=-1, keepdims=True)
            picked = ops.take_along_axis(log_probs, targets, axis=-1)[..., 0]
            return -ops.sum(picked * mask) / ops.sum(mask)

        return loss

    expected = backend_gradient(cross_entropy_at(2), kernel)
    int8_gradient = backend_gradient(cross_entropy_at(8), kernel)
    assert np.abs(expected - int8_gradient).max() > 0.1 * np.abs(expected).max()

    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))
    trainer.train_on_batch(x, y, sample_weight=weights)

    # The int8 master kernel moved by exactly the int2 slice's gradient.
    gradient = kernel - ops.convert_to_numpy(layer.kernel)
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6)
    with kmq.precision(8):
        assert np.all(np.isfinite(ops.convert_to_numpy(gemma3_lm(x))))


def test_baseline_codes_are_its_own_precision(gemma3_lm):
    x, _, _ = token_batch()
    build_qat_trainer(gemma3_lm, "baseline", bits=4)

    plain = ops.convert_to_numpy(gemma3_lm(x))
    with kmq.precision(4):
        sliced = ops.convert_to_numpy(gemma3_lm(x))
    np.testing.assert_array_equal(plain, sliced)
    with pytest.raises(ValueError, match="stores 4-bit codes"):
        with kmq.precision(8):
            gemma3_lm(x)
