import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from tests.conftest import tiny_gemma3_causal_lm
from tests.conftest import tiny_gemma_causal_lm
from tests.conftest import tiny_mistral_causal_lm
from tests.conftest import token_batch


def weights_snapshot(model):
    return [(v.path, ops.convert_to_numpy(v)) for v in model.weights]


def assert_same_weights(before, after):
    assert [path for path, _ in before] == [path for path, _ in after]
    for (path, old), (_, new) in zip(before, after):
        np.testing.assert_array_equal(old, new, err_msg=path)


@pytest.mark.parametrize(
    "builder, expected_paths",
    [
        (
            tiny_gemma3_causal_lm,
            [
                f"decoder_block_{i}/{name}"
                for i in range(2)
                for name in ("ffw_gating", "ffw_gating_2", "ffw_linear")
            ],
        ),
        (
            tiny_gemma_causal_lm,
            [
                f"decoder_block_{i}/{name}"
                for i in range(2)
                for name in ("ffw_gating", "ffw_gating_2", "ffw_linear")
            ],
        ),
        (
            tiny_mistral_causal_lm,
            [
                f"transformer_layer_{i}/{name}"
                for i in range(2)
                for name in (
                    "feedforward_intermediate_dense",
                    "feedforward_gate_dense",
                    "feedforward_output_dense",
                )
            ],
        ),
    ],
)
def test_ffn_surgery_keeps_float_outputs(builder, expected_paths):
    keras.utils.set_random_seed(0)
    causal_lm = builder()
    x, _, _ = token_batch()
    reference = ops.convert_to_numpy(causal_lm(x))
    before = weights_snapshot(causal_lm)

    paths = kmq.matquantize(causal_lm, targets="ffn")

    assert sorted(paths) == sorted(expected_paths)
    assert sorted(kmq.matquant_layers(causal_lm)) == sorted(expected_paths)
    assert_same_weights(before, weights_snapshot(causal_lm))
    with kmq.precision(None):
        np.testing.assert_array_equal(ops.convert_to_numpy(causal_lm(x)), reference)


def test_attention_targets(gemma3_lm):
    paths = kmq.matquantize(gemma3_lm, targets="attention")
    assert sorted(paths) == sorted(
        f"decoder_block_{i}/attention/{name}"
        for i in range(2)
        for name in ("query", "key", "value", "attention_output")
    )
    query = kmq.matquant_layers(gemma3_lm)["decoder_block_0/attention/query"]
    assert isinstance(query, kmq.MatQuantEinsumDense)
    assert query.channel_reduce_axes == (1,)


def test_int8_close_to_float(gemma3_lm):
    x, _, _ = token_batch()
    kmq.matquantize(gemma3_lm, targets="all")
    with kmq.precision(None):
        reference = ops.convert_to_numpy(gemma3_lm(x))

    errors = {}
    for bits in (8, 4, 2):
        with kmq.precision(bits):
            logits = ops.convert_to_numpy(gemma3_lm(x))
        errors[bits] = np.linalg.norm(logits - reference) / np.linalg.norm(reference)

    # Relative logit errors of this tiny model measured 0.7-1.6% at int8,
    # 15-27% at int4 and 73-93% at int2 over four seeds on each backend.
    assert errors[8] < 0.03
    assert errors[4] > errors[8]
    assert errors[2] > errors[4]


def test_explicit_layer_paths(gemma3_lm):
    paths = kmq.matquantize(gemma3_lm, layer_paths=["decoder_block_1/ffw_linear"])
    assert paths == ["decoder_block_1/ffw_linear"]
    assert list(kmq.matquant_layers(gemma3_lm)) == ["decoder_block_1/ffw_linear"]


def test_unknown_layer_path_lists_valid_paths(gemma3_lm):
    with pytest.raises(ValueError, match="decoder_block_9/ffw_linear.*Valid"):
        kmq.matquantize(gemma3_lm, layer_paths=["decoder_block_9/ffw_linear"])


def test_not_a_kerashub_model_rejected():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="KerasHub causal LM or backbone.*Functional"):
        kmq.matquantize(model)


def test_unknown_family_names_family_and_option():
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=32,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )
    with pytest.raises(ValueError, match="GPT2Backbone.*layer_paths"):
        kmq.matquantize(backbone)


@pytest.mark.parametrize("targets", ["mlp", ["ffn", "embeddings"], []])
def test_unknown_targets_rejected(gemma3_lm, targets):
    with pytest.raises(ValueError, match="targets.*'ffn', 'attention', 'all'"):
        kmq.matquantize(gemma3_lm, targets=targets)


@pytest.mark.parametrize("bits", [0, 9, 4.0])
def test_bits_outside_range_rejected(gemma3_lm, bits):
    with pytest.raises(ValueError, match=r"bits.*1\.\.8"):
        kmq.matquantize(gemma3_lm, bits=bits)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"slicing": "rounded"}, "extra_precision"),
        ({"learnable_clipping": True, "clipping_init": 0.0}, r"\(0, 1\]"),
        ({"learnable_clipping": True, "clipping_init": 1.01}, r"\(0, 1\]"),
        ({"clipping_init": 0.5}, "learnable_clipping=True"),
    ],
)
def test_invalid_options_leave_model_unchanged(gemma3_lm, options, message):
    before = weights_snapshot(gemma3_lm)
    with pytest.raises(ValueError, match=message):
        kmq.matquantize(gemma3_lm, **options)
    assert_same_weights(before, weights_snapshot(gemma3_lm))
    assert kmq.matquant_layers(gemma3_lm) == {}


def test_options_reach_every_swapped_layer(gemma3_lm):
    kmq.matquantize(
        gemma3_lm, bits=6, slicing="extra_precision", learnable_clipping=True, clipping_init=0.8
    )
    layers = kmq.matquant_layers(gemma3_lm)
    assert len(layers) == 6
    for layer in layers.values():
        assert layer.matquant_options() == {
            "bits": 6,
            "slicing": "extra_precision",
            "learnable_clipping": True,
            "clipping_init": 0.8,
            "stored_bits": None,
        }


def test_second_matquantize_rejected_and_model_unchanged(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    before = weights_snapshot(gemma3_lm)
    layers_before = kmq.matquant_layers(gemma3_lm)
    with pytest.raises(ValueError, match="decoder_block_0/ffw_gating|already a MatQuantEinsumDense"):
        kmq.matquantize(gemma3_lm, bits=4)
    assert_same_weights(before, weights_snapshot(gemma3_lm))
    assert kmq.matquant_layers(gemma3_lm) == layers_before


def test_non_finite_kernel_rejected_and_model_unchanged(gemma3_lm):
    block = gemma3_lm.backbone.get_layer("decoder_block_1")
    kernel = ops.convert_to_numpy(block.ffw_linear.kernel).copy()
    kernel[3, 5] = np.nan
    block.ffw_linear.kernel.assign(kernel)
    before = weights_snapshot(gemma3_lm)

    with pytest.raises(ValueError, match="decoder_block_1/ffw_linear.*channel 5"):
        kmq.matquantize(gemma3_lm)

    assert kmq.matquant_layers(gemma3_lm) == {}
    after = weights_snapshot(gemma3_lm)
    assert [p for p, _ in before] == [p for p, _ in after]
    for (_, old), (_, new) in zip(before, after):
        np.testing.assert_array_equal(old, new)


def test_weight_order_kept_for_save_weights(gemma3_lm, tmp_path):
    x, _, _ = token_batch()
    kmq.matquantize(gemma3_lm)
    path = tmp_path / "weights.weights.h5"
    gemma3_lm.save_weights(path)

    keras.utils.set_random_seed(1)
    other = tiny_gemma3_causal_lm()
    kmq.matquantize(other)
    other.load_weights(path)
    with kmq.precision(2):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(other(x)), ops.convert_to_numpy(gemma3_lm(x))
        )


def test_iter_layers_paths_and_parents(gemma3_lm):
    layers = {path: (parent, layer) for path, parent, layer in kmq.iter_layers(gemma3_lm)}
    parent, layer = layers["decoder_block_0/attention/query"]
    assert parent is layers["decoder_block_0/attention"][1]
    assert layer.name == "query"
    assert layers["token_embedding"][0] is None


def test_repeated_layer_path_rejected_and_model_unchanged(gemma3_lm):
    before = weights_snapshot(gemma3_lm)
    with pytest.raises(ValueError, match="more than once"):
        kmq.matquantize(gemma3_lm, layer_paths=["decoder_block_0/ffw_gating"] * 2)
    assert kmq.matquant_layers(gemma3_lm) == {}
    assert_same_weights(before, weights_snapshot(gemma3_lm))


@pytest.mark.parametrize("targets", [None, 3])
def test_non_string_targets_rejected(gemma3_lm, targets):
    with pytest.raises(ValueError, match="Invalid matquantize targets"):
        kmq.matquantize(gemma3_lm, targets=targets)


def test_numpy_integer_bits_accepted(gemma3_lm):
    kmq.matquantize(gemma3_lm, bits=np.int64(6))
    layers = kmq.matquant_layers(gemma3_lm).values()
    assert {layer.bits for layer in layers} == {6}
    assert all(type(layer.bits) is int for layer in layers)
