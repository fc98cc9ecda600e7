"""Layout maps for matquantized models, and sharded fit steps on a CPU mesh.

The mesh tests start `tests/mesh_fit_worker.py` in a subprocess with four
virtual CPU devices (JAX fixes its device count when it starts, so this
process keeps one) and compare its results with the same fit run here on
one device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import keras_hub
import numpy as np
import pytest

import keras_matquant as kmq
from keras_matquant.hub.layout_map import check_layout_map
from keras_matquant.hub.layout_map import matquant_layout_map
from tests import mesh_fit_worker
from tests.conftest import tiny_gemma_causal_lm

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the Keras distribution API shards variables on JAX only",
)

REPOSITORY = Path(__file__).resolve().parents[1]
MESH_CASES = ("gemma3-model", "mistral-model", "gemma3-data")
BACKBONES = {
    "gemma": keras_hub.models.GemmaBackbone,
    "gemma3": keras_hub.models.Gemma3Backbone,
    "mistral": keras_hub.models.MistralBackbone,
}


def fake_mesh(shape=(2, 2), names=("batch", "model")):
    """A mesh for building layout maps; no variable is placed on it."""
    return keras.distribution.DeviceMesh(
        shape, names, devices=["cpu:0"] * int(np.prod(shape))
    )


# Layout maps, checked on one device.


def test_gemma_layouts_of_kernels_and_logits():
    layout_map = matquant_layout_map(keras_hub.models.GemmaBackbone, fake_mesh())
    expected = {
        # KerasHub's own kernel layouts.
        "decoder_block_5/ffw_gating/kernel": ("batch", "model"),
        "decoder_block_5/ffw_linear/kernel": ("model", "batch"),
        "decoder_block_5/attention/query/kernel": ("model", "batch", None),
        "decoder_block_5/attention/attention_output/kernel": ("model", None, "batch"),
        # Clipping logits: the kernel's layout, None on the contracted axes.
        "decoder_block_5/ffw_gating/clip_max_logit": (None, "model"),
        "decoder_block_5/ffw_gating_2/clip_min_logit": (None, "model"),
        "decoder_block_5/ffw_linear/clip_max_logit": (None, "batch"),
        "decoder_block_5/attention/query/clip_min_logit": ("model", None, None),
        "decoder_block_5/attention/key/clip_max_logit": ("model", None, None),
        "decoder_block_5/attention/attention_output/clip_max_logit": (
            None,
            None,
            "batch",
        ),
    }
    for path, axes in expected.items():
        assert layout_map[path].axes == axes, path


def test_mistral_layouts_of_kernels_and_logits():
    layout_map = matquant_layout_map(keras_hub.models.MistralCausalLM, fake_mesh())
    expected = {
        "transformer_layer_1/feedforward_gate_dense/kernel": ("batch", "model"),
        "transformer_layer_1/feedforward_gate_dense/clip_max_logit": (None, "model"),
        "transformer_layer_1/feedforward_output_dense/clip_min_logit": (None, "batch"),
        "transformer_layer_1/self_attention/query/kernel": ("model", "batch", None),
        "transformer_layer_1/self_attention/query/clip_max_logit": (None, "batch", None),
        "transformer_layer_1/self_attention/attention_output/clip_min_logit": (
            None,
            None,
            "batch",
        ),
        "token_embedding/reverse_embeddings": ("batch", "model"),
    }
    for path, axes in expected.items():
        assert layout_map[path].axes == axes, path


def test_layouts_use_given_axis_names():
    mesh = fake_mesh((2, 2), ("data", "shard"))
    layout_map = matquant_layout_map(
        keras_hub.models.Gemma3Backbone, mesh, model_dim="shard", data_dim="data"
    )
    assert layout_map["decoder_block_0/ffw_gating/clip_max_logit"].axes == (None, "shard")
    assert layout_map["decoder_block_0/ffw_linear/kernel"].axes == ("shard", "data")


def test_norm_scales_and_biases_are_unmatched():
    layout_map = matquant_layout_map(keras_hub.models.Gemma3Backbone, fake_mesh())
    for path in (
        "decoder_block_0/pre_ffw_norm/scale",
        "decoder_block_0/attention/query_norm/scale",
        "decoder_block_0/ffw_gating/bias",
        "decoder_block_0/ffw_gating/clip_max_logit_extra",
    ):
        assert layout_map[path] is None, path


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_every_layout_has_its_variable_rank(family):
    causal_lm = mesh_fit_worker.build_matquantized_lm(family)
    layout_map = matquant_layout_map(causal_lm, fake_mesh())

    layouts = check_layout_map(layout_map, causal_lm)

    for variable in causal_lm.weights:
        layout = layout_map[variable.path]
        if layout is not None:
            assert len(layout.axes) == len(variable.shape), variable.path
    # One block of seven projections, each with a kernel and two logits,
    # and the embedding (Mistral also has an untied output embedding).
    expected_count = 7 * 3 + (2 if family == "mistral" else 1)
    assert len(layouts) == expected_count
    matquant_paths = [
        f"{path}/{name}"
        for path in kmq.matquant_layers(causal_lm)
        for name in ("kernel", "clip_max_logit", "clip_min_logit")
    ]
    assert sorted(p for p in layouts if "embeddings" not in p) == sorted(matquant_paths)


def test_pattern_of_other_rank_rejected():
    causal_lm = mesh_fit_worker.build_matquantized_lm("gemma3")
    layout_map = keras.distribution.LayoutMap(fake_mesh())
    # Written for the 3-D query kernel and its logits, but it also matches
    # the 1-D query norm scale.
    layout_map["decoder_block.*attention/query.*"] = ("model", None, None)
    with pytest.raises(
        ValueError, match=r"pattern 'decoder.*rank 3.*query_norm/scale' of shape \(8,\)"
    ):
        check_layout_map(layout_map, causal_lm)


def test_indivisible_head_axis_rejected():
    # One key/value head cannot be split over a model axis of size 2.
    causal_lm = tiny_gemma_causal_lm()
    kmq.matquantize(causal_lm, targets="all")
    layout_map = matquant_layout_map(causal_lm, fake_mesh())
    with pytest.raises(
        ValueError,
        match=r"attention/key/kernel' has shape \(1, 16, 8\).*pattern 'decoder_block",
    ):
        check_layout_map(layout_map, causal_lm)


@pytest.mark.parametrize(
    "model, message",
    [
        ("gemma", "causal LM or backbone"),
        (keras.Model, "causal LM or backbone"),
        (keras_hub.models.BertBackbone, "no layouts for BertBackbone"),
    ],
)
def test_unknown_model_rejected(model, message):
    with pytest.raises(ValueError, match=message):
        matquant_layout_map(model, fake_mesh())


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"device_mesh": "mesh"}, "must be a `keras.distribution.DeviceMesh`"),
        ({"model_dim": "tensor"}, r"model_dim='tensor'.*\['batch', 'model'\]"),
        ({"data_dim": "data"}, r"data_dim='data'.*\['batch', 'model'\]"),
        ({"model_dim": "batch"}, "both 'batch'"),
    ],
)
def test_invalid_mesh_arguments_rejected(arguments, message):
    arguments = {"device_mesh": fake_mesh(), **arguments}
    with pytest.raises(ValueError, match=message):
        matquant_layout_map(keras_hub.models.GemmaBackbone, **arguments)


# Sharded fit steps against one device.


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    """Start the 4-device worker, fit each family here, then collect both."""
    output_dir = tmp_path_factory.mktemp("mesh")
    environment = dict(os.environ)
    environment["XLA_FLAGS"] = (
        environment.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    environment["KERAS_BACKEND"] = "jax"
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), environment.get("PYTHONPATH", "")]
    )

    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.mesh_fit_worker", str(output_dir), *MESH_CASES],
        cwd=REPOSITORY,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        references = {}
        for family in sorted({case.split("-")[0] for case in MESH_CASES}):
            causal_lm = mesh_fit_worker.build_matquantized_lm(family)
            initial = {
                v.path: keras.ops.convert_to_numpy(v) for v in causal_lm.weights
            }
            loss, final, compilations = mesh_fit_worker.fit_two_steps(causal_lm)
            references[family] = {
                "initial": initial,
                "final": final,
                "loss": loss,
                "compilations": compilations,
            }
        output, _ = worker.communicate(timeout=600)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, output[-4000:]

    summary = json.loads((output_dir / "summary.json").read_text())
    arrays = np.load(output_dir / "weights.npz")
    sharded = {}
    for case in MESH_CASES:
        sharded[case] = dict(summary[case])
        for key in ("initial", "final"):
            prefix = f"{case}|{key}|"
            sharded[case][key] = {
                name[len(prefix):]: arrays[name]
                for name in arrays.files
                if name.startswith(prefix)
            }
    return references, sharded


@pytest.mark.parametrize("case", MESH_CASES)
def test_sharded_fit_matches_one_device(mesh_run, case):
    references, sharded = mesh_run
    reference = references[case.split("-")[0]]
    result = sharded[case]

    assert sorted(result["initial"]) == sorted(reference["initial"])
    for path, value in reference["initial"].items():
        np.testing.assert_array_equal(result["initial"][path], value, err_msg=path)
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    for path, value in reference["final"].items():
        np.testing.assert_allclose(
            result["final"][path], value, rtol=1e-5, atol=1e-7, err_msg=path
        )
    # Matching final weights would also hold for a step that did nothing:
    # check that every kernel and the FFN clipping logits moved by more
    # than ten times the tolerance.
    ffn_names = set(mesh_fit_worker.FFN_LAYERS)
    for path in reference["final"]:
        layer, name = path.rsplit("/", 1)
        if name == "kernel" or (
            name.startswith("clip_") and layer.rsplit("/", 1)[-1] in ffn_names
        ):
            change = np.abs(reference["final"][path] - reference["initial"][path])
            assert change.max() > 1e-6, path


@pytest.mark.parametrize("case", MESH_CASES)
def test_sharded_fit_compiles_train_step_once(mesh_run, case):
    references, sharded = mesh_run
    assert references[case.split("-")[0]]["compilations"] == 1
    assert sharded[case]["compilations"] == 1


def test_model_mesh_shards_kernels_and_logits(mesh_run):
    _, sharded = mesh_run
    expected = {
        "gemma3-model": {
            "decoder_block_0/ffw_linear/kernel": ["model", "batch"],
            "decoder_block_0/ffw_linear/clip_max_logit": [None, "batch"],
            "decoder_block_0/attention/query/clip_max_logit": ["model", None, None],
        },
        "mistral-model": {
            "transformer_layer_0/feedforward_gate_dense/kernel": ["batch", "model"],
            "transformer_layer_0/feedforward_gate_dense/clip_min_logit": [None, "model"],
            "transformer_layer_0/self_attention/query/clip_max_logit": [
                None,
                "batch",
                None,
            ],
            "token_embedding/reverse_embeddings": ["batch", "model"],
        },
    }
    for case, shardings in expected.items():
        assert sharded[case]["shardings"] == shardings, case
        assert set(sharded[case]["num_devices"].values()) == {4}, case


def test_data_mesh_replicates_every_variable(mesh_run):
    _, sharded = mesh_run
    shardings = sharded["gemma3-data"]["shardings"]
    assert sorted(shardings) == sorted(mesh_fit_worker.CHECKED_PATHS["gemma3"])
    for path, axes in shardings.items():
        assert all(axis is None for axis in axes), path
    assert set(sharded["gemma3-data"]["num_devices"].values()) == {4}
