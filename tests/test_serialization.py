"""Configs, `.keras` files, weight files and KerasHub presets."""

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from tests.conftest import TINY_CAUSAL_LMS
from tests.conftest import token_batch

OPTIONS = {
    "bits": 6,
    "slicing": "extra_precision",
    "learnable_clipping": True,
    "clipping_init": 0.9,
    "stored_bits": None,
}


def variables(layer):
    return [ops.convert_to_numpy(v) for v in layer.weights]


def outputs_at(model, x, precisions=(None, 8, 4, 2)):
    results = []
    for bits in precisions:
        if bits is not None and bits > 6:
            bits = 6
        with kmq.precision(bits):
            results.append(ops.convert_to_numpy(model(x)))
    return results


@pytest.mark.parametrize(
    "layer_class, args",
    [(kmq.MatQuantDense, (4,)), (kmq.MatQuantEinsumDense, ("btd,ndh->btnh", (None, 2, 3)))],
)
def test_config_keeps_every_option(layer_class, args):
    layer = layer_class(*args, name="projection", **OPTIONS)
    config = layer.get_config()
    for key, value in OPTIONS.items():
        assert config[key] == value
    rebuilt = layer_class.from_config(config)
    assert rebuilt.get_config() == config
    assert rebuilt.matquant_options() == OPTIONS


def small_model(seed, **options):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5, 4))
    hidden = kmq.MatQuantEinsumDense(
        "btd,ndh->btnh", (None, 2, 3), bias_axes="nh", name="heads", **options
    )(inputs)
    hidden = keras.layers.Reshape((5, 6))(hidden)
    outputs = kmq.MatQuantDense(3, name="out", **options)(hidden)
    return keras.Model(inputs, outputs)


def test_keras_file_round_trip(tmp_path):
    model = small_model(0, **OPTIONS)
    x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for name, layer_class in (("heads", kmq.MatQuantEinsumDense), ("out", kmq.MatQuantDense)):
        layer = loaded.get_layer(name)
        assert type(layer) is layer_class
        assert layer.matquant_options() == OPTIONS
        for saved, restored in zip(variables(model.get_layer(name)), variables(layer)):
            np.testing.assert_array_equal(restored, saved)
    for expected, result in zip(outputs_at(model, x), outputs_at(loaded, x)):
        np.testing.assert_array_equal(result, expected)


def test_save_weights_round_trip(tmp_path):
    source = small_model(0, **OPTIONS)
    # Move the clipping logits away from their initial value too.
    source.get_layer("out").clip_max_logit.assign(np.full((1, 3), 1.5, "float32"))
    target = small_model(1, **OPTIONS)
    assert not np.array_equal(
        variables(source.get_layer("out"))[0], variables(target.get_layer("out"))[0]
    )
    path = tmp_path / "model.weights.h5"
    source.save_weights(path)
    target.load_weights(path)
    for saved, restored in zip(source.weights, target.weights):
        assert saved.path == restored.path
        np.testing.assert_array_equal(ops.convert_to_numpy(restored), ops.convert_to_numpy(saved))
    x = np.random.default_rng(2).normal(size=(2, 5, 4)).astype("float32")
    for expected, result in zip(outputs_at(source, x), outputs_at(target, x)):
        np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize(
    "other",
    [
        {"bits": 8},
        {"slicing": "clamped"},
        {"learnable_clipping": False, "clipping_init": None},
    ],
)
def test_other_configuration_weights_rejected(tmp_path, other):
    source = small_model(0, **OPTIONS)
    path = tmp_path / "model.weights.h5"
    source.save_weights(path)
    target = small_model(1, **{**OPTIONS, **other})
    before = [ops.convert_to_numpy(v).copy() for v in target.weights]
    with pytest.raises(ValueError, match="saved with"):
        target.load_weights(path)
    for variable, value in zip(target.weights, before):
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), value)


def test_float_weights_load_into_backbone(tmp_path):
    keras.utils.set_random_seed(0)
    float_lm = TINY_CAUSAL_LMS["gemma3"]()
    path = tmp_path / "float.weights.h5"
    float_lm.backbone.save_weights(path)

    keras.utils.set_random_seed(1)
    target = TINY_CAUSAL_LMS["gemma3"]()
    kmq.matquantize(target, targets="ffn")
    target.backbone.load_weights(path)
    for saved, restored in zip(float_lm.backbone.weights, target.backbone.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(restored), ops.convert_to_numpy(saved))

    clipped = TINY_CAUSAL_LMS["gemma3"]()
    kmq.matquantize(clipped, targets="ffn", learnable_clipping=True)
    layers = kmq.matquant_layers(clipped)
    before = {path: variables(layer) for path, layer in layers.items()}
    with pytest.raises(ValueError, match="learns clipping factors"):
        clipped.backbone.load_weights(path)
    for path, layer in layers.items():
        for value, restored in zip(before[path], variables(layer)):
            np.testing.assert_array_equal(restored, value)


def matquantized_lm(family):
    keras.utils.set_random_seed(0)
    causal_lm = TINY_CAUSAL_LMS[family]()
    kmq.matquantize(causal_lm, targets="ffn", learnable_clipping=True)
    kmq.matquantize(causal_lm, targets="attention", bits=6, slicing="extra_precision")
    layers = kmq.matquant_layers(causal_lm)
    # Move the clipping logits off their initial value so that they are
    # visibly restored from the weights, not re-initialised.
    for index, layer in enumerate(layers.values()):
        if layer.learnable_clipping:
            layer.clip_min_logit.assign(ops.full(layer.clip_min_logit.shape, 1.0 + index))
    return causal_lm


def assert_same_matquant_layers(restored, original):
    original_layers = kmq.matquant_layers(original)
    restored_layers = kmq.matquant_layers(restored)
    assert list(restored_layers) == list(original_layers)
    for path, layer in original_layers.items():
        assert type(restored_layers[path]) is type(layer)
        assert restored_layers[path].matquant_options() == layer.matquant_options()


def backbone_logits(backbone, x):
    results = []
    for bits in (None, 6, 4, 2):
        with kmq.precision(bits):
            results.append(ops.convert_to_numpy(backbone(x)))
    return results


@pytest.mark.parametrize("family", sorted(TINY_CAUSAL_LMS))
def test_backbone_preset_round_trip(tmp_path, family):
    causal_lm = matquantized_lm(family)
    x, _, _ = token_batch()
    preset = str(tmp_path / "preset")
    causal_lm.backbone.save_to_preset(preset)
    restored = keras_hub.models.Backbone.from_preset(preset)
    assert type(restored) is type(causal_lm.backbone)
    assert_same_matquant_layers(restored, causal_lm.backbone)
    for expected, result in zip(backbone_logits(causal_lm.backbone, x), backbone_logits(restored, x)):
        np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("family", ["gemma", "mistral"])
def test_causal_lm_keras_file_round_trip(tmp_path, family):
    causal_lm = matquantized_lm(family)
    x, _, _ = token_batch()
    path = tmp_path / "lm.keras"
    causal_lm.save(path)
    restored = keras.saving.load_model(path, compile=False)
    assert type(restored) is type(causal_lm)
    assert_same_matquant_layers(restored, causal_lm)
    for expected, result in zip(
        backbone_logits(causal_lm.backbone, x), backbone_logits(restored.backbone, x)
    ):
        np.testing.assert_array_equal(result, expected)


def test_float_backbone_config_unchanged():
    keras.utils.set_random_seed(0)
    causal_lm = TINY_CAUSAL_LMS["gemma"]()
    assert "matquant_layers" not in causal_lm.backbone.get_config()
    kmq.matquantize(causal_lm, targets="ffn")
    config = causal_lm.backbone.get_config()
    assert sorted(config["matquant_layers"]) == sorted(kmq.matquant_layers(causal_lm))


def test_preset_other_configuration_rejected(tmp_path):
    causal_lm = matquantized_lm("gemma")
    preset = str(tmp_path / "preset")
    causal_lm.backbone.save_to_preset(preset)
    other = TINY_CAUSAL_LMS["gemma"]()
    kmq.matquantize(other, targets="ffn", bits=4, learnable_clipping=True)
    kmq.matquantize(other, targets="attention", bits=6, slicing="extra_precision")
    before = [ops.convert_to_numpy(v).copy() for v in other.backbone.weights]
    with pytest.raises(ValueError, match="saved with"):
        other.backbone.load_weights(f"{preset}/model.weights.h5")
    # The float layers that Keras loads before the failing one are restored.
    for variable, value in zip(other.backbone.weights, before):
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), value)
