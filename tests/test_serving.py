"""Packed export, one-artifact loading, precision plans and generation."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from keras_matquant import serving
from keras_matquant.packing import PackedCodes
from keras_matquant.packing import unpack_codes
from tests.conftest import TINY_CAUSAL_LMS
from tests.conftest import token_batch


def dense_model(units, input_dim, seed=0, **options):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((input_dim,)),
            kmq.MatQuantDense(units, name="proj", bias_initializer="random_normal", **options),
        ]
    )


def unpacked(layer):
    from keras_matquant.layers.matquant_layer import storage_width

    width = storage_width(layer.bits, layer.stored_bits, layer.slicing)
    data = ops.convert_to_numpy(layer.packed_codes)
    return unpack_codes(PackedCodes(data, width, tuple(layer.kernel_shape)))


@pytest.mark.parametrize("bits", [4, 2])
def test_exported_codes_equal_codes_before_export(tmp_path, bits):
    model = dense_model(4, 8)
    layer = model.get_layer("proj")
    codes = ops.convert_to_numpy(layer.quantized_codes(bits))
    path = tmp_path / f"int{bits}.keras"
    serving.export(model, path, bits=bits)
    loaded = keras.saving.load_model(path).get_layer("proj")
    assert loaded.stored_bits == bits
    assert sorted(v.name for v in loaded.weights) == [
        "bias",
        "kernel_scale",
        "kernel_zero_point",
        "packed_codes",
    ]
    np.testing.assert_array_equal(unpacked(loaded), codes)
    assert np.any(codes != 0)
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded.bias), ops.convert_to_numpy(layer.bias))


@pytest.mark.parametrize("input_dim", [1, 3, 5, 7])
@pytest.mark.parametrize("bits", [4, 2, 3])
def test_odd_input_dims_round_trip(tmp_path, input_dim, bits):
    model = dense_model(3, input_dim, seed=input_dim)
    x = np.random.default_rng(0).normal(size=(2, input_dim)).astype("float32")
    codes = ops.convert_to_numpy(model.get_layer("proj").quantized_codes(bits))
    path = tmp_path / "model.keras"
    serving.export(model, path, bits=bits)
    loaded = keras.saving.load_model(path)
    result = unpacked(loaded.get_layer("proj"))
    assert result.shape == (input_dim, 3)
    np.testing.assert_array_equal(result, codes)
    with kmq.precision(bits):
        expected = ops.convert_to_numpy(model(x))
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), expected)


def test_packed_sizes_and_file_sizes(tmp_path):
    model = dense_model(64, 64)
    model.save(tmp_path / "float.keras")
    sizes = {}
    for bits, expected_bytes in ((8, 4096), (4, 2048), (2, 1024)):
        path = tmp_path / f"int{bits}.keras"
        exported = serving.export(model, path, bits=bits)
        layer = exported.get_layer("proj")
        assert tuple(layer.packed_codes.shape) == (expected_bytes,)
        assert tuple(layer.kernel_scale.shape) == (1, 64)
        assert tuple(layer.kernel_zero_point.shape) == (1, 64)
        assert layer.kernel_scale.dtype == "float32"
        sizes[bits] = os.path.getsize(path)
        assert serving.saved_precisions(path) == {"proj": bits}
    float_size = os.path.getsize(tmp_path / "float.keras")
    # The float kernel is 16384 bytes; each halving of the code width saves
    # half of the previous packed size (file overheads are equal).
    assert float_size - sizes[8] == pytest.approx(16384 - 4096 - 2 * 256, abs=600)
    assert sizes[8] - sizes[4] == pytest.approx(2048, abs=100)
    assert sizes[4] - sizes[2] == pytest.approx(1024, abs=100)
    assert serving.saved_precisions(tmp_path / "float.keras") == {"proj": None}


def test_export_leaves_model_unchanged(tmp_path):
    model = dense_model(4, 8, learnable_clipping=True)
    before = [ops.convert_to_numpy(v).copy() for v in model.weights]
    serving.export(model, tmp_path / "m.keras", bits=2)
    layer = model.get_layer("proj")
    assert layer.stored_bits is None
    assert layer.learnable_clipping
    for variable, value in zip(model.weights, before):
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), value)


def lm_logits(causal_lm, x, bits=None, plan=None):
    if plan is not None:
        with kmq.precision_plan(causal_lm, plan):
            return ops.convert_to_numpy(causal_lm.backbone(x))
    with kmq.precision(bits):
        return ops.convert_to_numpy(causal_lm.backbone(x))


def matquantized(family="gemma"):
    keras.utils.set_random_seed(0)
    causal_lm = TINY_CAUSAL_LMS[family]()
    kmq.matquantize(causal_lm, targets="all", learnable_clipping=True)
    for index, layer in enumerate(kmq.matquant_layers(causal_lm).values()):
        layer.clip_max_logit.assign(ops.full(layer.clip_max_logit.shape, 2.0 + index))
    return causal_lm


@pytest.mark.parametrize("family", ["gemma", "mistral"])
def test_tiny_lm_int2_export_reloads_identical(tmp_path, family):
    causal_lm = matquantized(family)
    x, _, _ = token_batch()
    expected = lm_logits(causal_lm, x, bits=2)
    exported = serving.export(causal_lm, tmp_path / "int2.keras", bits=2)
    np.testing.assert_array_equal(ops.convert_to_numpy(exported.backbone(x)), expected)
    loaded = keras.saving.load_model(tmp_path / "int2.keras", compile=False)
    assert type(loaded) is type(causal_lm)
    assert set(serving.stored_precisions(loaded).values()) == {2}
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded.backbone(x)), expected)

    serving.export(causal_lm, tmp_path / "preset", bits=2)
    from_preset = serving.load(tmp_path / "preset")
    np.testing.assert_array_equal(ops.convert_to_numpy(from_preset.backbone(x)), expected)


def test_one_artifact_serves_every_precision(tmp_path):
    causal_lm = matquantized()
    x, _, _ = token_batch()
    path = tmp_path / "int8.keras"
    serving.export(causal_lm, path)
    artifact = keras.saving.load_model(path, compile=False)
    for bits in (8, 6, 4, 3, 2, 1):
        expected = lm_logits(causal_lm, x, bits=bits)
        # The int8 codes slice at run time, or derive packed codes at load.
        np.testing.assert_array_equal(lm_logits(artifact, x, bits=bits), expected)
        derived = serving.load(path, bits=bits)
        assert set(serving.stored_precisions(derived).values()) == {bits}
        np.testing.assert_array_equal(ops.convert_to_numpy(derived.backbone(x)), expected)


def test_plan_export_and_load_match_plan_scope(tmp_path):
    causal_lm = matquantized()
    x, _, _ = token_batch()
    plan = {"decoder_block_0/ffw_gating": 2, "decoder_block_1/attention/query": 4}
    expected = lm_logits(causal_lm, x, plan=plan)
    exported = serving.export(causal_lm, tmp_path / "plan.keras", plan=plan)
    np.testing.assert_array_equal(ops.convert_to_numpy(exported.backbone(x)), expected)
    serving.export(causal_lm, tmp_path / "int8.keras")
    loaded = serving.load(tmp_path / "int8.keras", plan=plan)
    precisions = serving.stored_precisions(loaded)
    assert precisions["decoder_block_0/ffw_gating"] == 2
    assert precisions["decoder_block_1/attention/query"] == 4
    assert precisions["decoder_block_1/ffw_linear"] == 8
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded.backbone(x)), expected)


def test_trained_file_loads_packed(tmp_path):
    causal_lm = matquantized()
    x, _, _ = token_batch()
    causal_lm.save(tmp_path / "trained.keras")
    loaded = serving.load(tmp_path / "trained.keras", bits=4)
    assert set(serving.stored_precisions(loaded).values()) == {4}
    np.testing.assert_array_equal(
        ops.convert_to_numpy(loaded.backbone(x)), lm_logits(causal_lm, x, bits=4)
    )


def test_int2_code_is_derived_not_a_prefix(tmp_path):
    # Channel [0, 0.96, 2.55]: scale 0.01, int8 codes 0, 96, 255. Code 96 is
    # 0b01100000, whose top two bits read 1, but round_half_up(96 / 64) = 2.
    model = keras.Sequential([keras.Input((3,)), kmq.MatQuantDense(1, use_bias=False, name="proj")])
    model.get_layer("proj").kernel.assign(np.array([[0.0], [0.96], [2.55]], dtype="float32"))
    path = tmp_path / "int8.keras"
    serving.export(model, path)
    int8 = serving.load(path).get_layer("proj")
    np.testing.assert_array_equal(unpacked(int8).reshape(-1), [0, 96, 255])
    int2 = serving.load(path, bits=2).get_layer("proj")
    np.testing.assert_array_equal(unpacked(int2).reshape(-1), [0, 2, 3])


@pytest.mark.parametrize(
    "plan, message",
    [
        ({"decoder_block_9/ffw_gating": 2}, "Valid layer paths: \\['decoder_block_0/ffw_gating'"),
        ({"decoder_block_0/ffw_gating": 9}, r"1\.\.8"),
        ({"decoder_block_0/ffw_gating": 0}, r"1\.\.8"),
        ({"decoder_block_0/ffw_gating": "4"}, r"1\.\.8"),
    ],
)
def test_invalid_plan_rejected(tmp_path, plan, message):
    causal_lm = matquantized()
    with pytest.raises(ValueError, match=message):
        with kmq.precision_plan(causal_lm, plan):
            pass
    with pytest.raises(ValueError, match=message):
        serving.export(causal_lm, tmp_path / "plan.keras", plan=plan)
    serving.export(causal_lm, tmp_path / "int8.keras")
    with pytest.raises(ValueError, match=message):
        serving.load(tmp_path / "int8.keras", plan=plan)
    assert not os.path.exists(tmp_path / "plan.keras")


def test_bits_and_plan_together_rejected(tmp_path):
    causal_lm = matquantized()
    with pytest.raises(ValueError, match="either `bits` or `plan`"):
        serving.export(causal_lm, tmp_path / "m.keras", bits=4, plan={})


def test_stored_layer_precision_errors():
    model = dense_model(4, 8, stored_bits=4)
    layer = model.get_layer("proj")
    x = np.ones((1, 8), dtype="float32")
    with pytest.raises(ValueError, match="no float master kernel"):
        with kmq.precision(None):
            model(x)
    with pytest.raises(ValueError, match=r"cannot run at precision\(2\)"):
        with kmq.precision(2):
            model(x)
    assert layer.effective_bits() == 4.0
    artifact = dense_model(4, 8, stored_bits=8)
    with kmq.precision(2):
        artifact(x)


def test_precision_plan_runs_named_layers_only():
    causal_lm = matquantized()
    x, _, _ = token_batch()
    layers = kmq.matquant_layers(causal_lm)
    every_layer_at_2 = {path: 2 for path in layers}
    with kmq.precision(8):
        np.testing.assert_array_equal(
            lm_logits(causal_lm, x, plan=every_layer_at_2), lm_logits(causal_lm, x, bits=2)
        )
    assert not np.array_equal(
        lm_logits(causal_lm, x, plan={"decoder_block_0/ffw_gating": 2}),
        lm_logits(causal_lm, x, bits=8),
    )


def test_generate_tokens_at_precision_and_exported(tmp_path):
    causal_lm = matquantized("gemma3")
    x, _, _ = token_batch(batch=2, length=8)
    prompt_length = 3
    inputs = {
        "token_ids": x["token_ids"].copy(),
        "padding_mask": np.zeros_like(x["padding_mask"]),
    }
    inputs["padding_mask"][:, :prompt_length] = 1
    inputs["token_ids"][:, prompt_length:] = 0
    generated = serving.generate(causal_lm, inputs, bits=2)
    # The first new token is the int2 model's argmax after the prompt.
    with kmq.precision(2):
        logits = ops.convert_to_numpy(causal_lm(inputs))
    np.testing.assert_array_equal(
        generated["token_ids"][:, prompt_length], np.argmax(logits[:, prompt_length - 1], axis=-1)
    )
    np.testing.assert_array_equal(generated["token_ids"][:, :prompt_length], x["token_ids"][:, :prompt_length])

    exported = serving.export(causal_lm, tmp_path / "int2.keras", bits=2)
    from_export = serving.generate(exported, inputs)
    np.testing.assert_array_equal(from_export["token_ids"], generated["token_ids"])
    at_int8 = serving.generate(causal_lm, inputs, bits=8)
    again_int2 = serving.generate(causal_lm, inputs, bits=2)
    np.testing.assert_array_equal(again_int2["token_ids"], generated["token_ids"])
    assert at_int8["token_ids"].shape == generated["token_ids"].shape


def test_generate_text_needs_preprocessor():
    causal_lm = matquantized("gemma3")
    with pytest.raises(ValueError, match="preprocessor"):
        serving.generate(causal_lm, "hello", bits=2)


def test_generate_text_at_precision_matches_export(tmp_path):
    from tests.test_cli import tiny_gemma3_with_tokenizer

    causal_lm = tiny_gemma3_with_tokenizer()
    kmq.matquantize(causal_lm, targets="ffn")
    prompt = "The river"
    at_int2 = serving.generate(causal_lm, prompt, max_length=12, bits=2)
    exported = serving.export(causal_lm, tmp_path / "int2.keras", bits=2)
    assert serving.generate(exported, prompt, max_length=12) == at_int2
    assert at_int2.startswith(prompt)


def test_generate_with_bits_and_plan_rejected():
    causal_lm = matquantized("gemma3")
    x, _, _ = token_batch()
    with pytest.raises(ValueError, match="either `bits` or `plan`"):
        serving.generate(causal_lm, x, bits=2, plan={})
