"""Run MatQuant fit steps on a virtual CPU device mesh and save the results.

`tests/test_distribution.py` starts this module in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`, because JAX reads that
flag once, when it starts. The test runs the same fit on one device and
compares. Usage:

    python -m tests.mesh_fit_worker OUTPUT_DIR CASE [CASE ...]

where CASE is `FAMILY-MESH`: FAMILY in `gemma`, `gemma3`, `mistral` and MESH
`data` (DataParallel over 4 devices) or `model` (ModelParallel on a
`(batch=2, model=2)` mesh with `matquant_layout_map`).
"""

import json
import logging
import os
import re
import sys

import numpy as np

SEQUENCE_LENGTH = 8
NUM_SEQUENCES = 8
BATCH_SIZE = 4
LEARNING_RATE = 0.5
# Two precisions keep the XLA compilation of the tiny models short; the
# weighted sum over three is tested on one device in test_training.py.
LOSS_WEIGHTS = {8: 0.5, 2: 1.0}
FFN_LAYERS = (
    "ffw_gating",
    "ffw_gating_2",
    "ffw_linear",
    "feedforward_intermediate_dense",
    "feedforward_gate_dense",
    "feedforward_output_dense",
)
# Variables whose sharding the test checks.
CHECKED_PATHS = {
    "gemma3": (
        "decoder_block_0/ffw_linear/kernel",
        "decoder_block_0/ffw_linear/clip_max_logit",
        "decoder_block_0/attention/query/clip_max_logit",
    ),
    "mistral": (
        "transformer_layer_0/feedforward_gate_dense/kernel",
        "transformer_layer_0/feedforward_gate_dense/clip_min_logit",
        "transformer_layer_0/self_attention/query/clip_max_logit",
        "token_embedding/reverse_embeddings",
    ),
}


def build_matquantized_lm(family):
    """Build a seeded tiny causal LM with every projection matquantized.

    Two key/value heads (the shared conftest builders have one) so that the
    model axis of size 2 divides every axis KerasHub's layouts split.
    """
    import keras
    import keras_hub

    import keras_matquant as kmq

    keras.utils.set_random_seed(0)
    common = dict(
        vocabulary_size=32,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )
    if family == "gemma":
        backbone = keras_hub.models.GemmaBackbone(head_dim=8, **common)
        causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    elif family == "gemma3":
        backbone = keras_hub.models.Gemma3Backbone(
            image_size=16,
            head_dim=8,
            use_query_key_norm=True,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            sliding_window_size=16,
            vision_encoder=None,
            **common,
        )
        causal_lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    elif family == "mistral":
        backbone = keras_hub.models.MistralBackbone(sliding_window=16, **common)
        causal_lm = keras_hub.models.MistralCausalLM(backbone=backbone, preprocessor=None)
    else:
        raise ValueError(f"Unknown family {family!r}.")
    # Clipping logits start at 0 (factor 0.5), where the sigmoid is steepest,
    # so that one SGD step moves them well above the comparison tolerance.
    kmq.matquantize(
        causal_lm, targets="all", learnable_clipping=True, clipping_init=0.5
    )
    return causal_lm


def training_batch():
    """Token ids, next-token targets and weights, with two padded positions."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 32, size=(NUM_SEQUENCES, SEQUENCE_LENGTH + 1))
    tokens = tokens.astype("int32")
    weights = np.ones((NUM_SEQUENCES, SEQUENCE_LENGTH), dtype="float32")
    weights[0, -2:] = 0.0
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((NUM_SEQUENCES, SEQUENCE_LENGTH), dtype="int32"),
    }
    return x, tokens[:, 1:], weights


class CompileCounter(logging.Handler):
    """Count XLA compilations of the train step from JAX's compile log."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if re.match(r"Compiling jit\(train_step\)", record.getMessage()):
            self.count += 1


def fit_two_steps(causal_lm):
    """Fit one epoch of two batches with SGD.

    Returns:
        `(loss, weights, compilations)`: the epoch's mean loss, a dict of
        every variable of the model by path after the update, and the number
        of times XLA compiled the train step.
    """
    import jax
    import keras

    import keras_matquant as kmq

    counter = CompileCounter()
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(counter)
    jax.config.update("jax_log_compiles", True)
    try:
        trainer = kmq.MatQuantModel(causal_lm, loss_weights=LOSS_WEIGHTS)
        trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE))
        x, y, weights = training_batch()
        history = trainer.fit(
            x, y, sample_weight=weights, batch_size=BATCH_SIZE, epochs=1,
            shuffle=False, verbose=0,
        )
    finally:
        jax.config.update("jax_log_compiles", False)
        jax_logger.removeHandler(counter)
    values = {v.path: np.asarray(keras.ops.convert_to_numpy(v)) for v in causal_lm.weights}
    return history.history["loss"][0], values, counter.count


def _distribution(mesh_kind, family):
    import keras
    import keras_hub

    from keras_matquant.hub.layout_map import matquant_layout_map

    devices = keras.distribution.list_devices()
    if len(devices) != 4:
        raise RuntimeError(
            f"Expected 4 virtual devices, found {len(devices)}; set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=4 before JAX starts."
        )
    if mesh_kind == "data":
        return keras.distribution.DataParallel(devices=devices), None
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices)
    backbone_class = {
        "gemma": keras_hub.models.GemmaBackbone,
        "gemma3": keras_hub.models.Gemma3Backbone,
        "mistral": keras_hub.models.MistralBackbone,
    }[family]
    layout_map = matquant_layout_map(backbone_class, mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    return distribution, layout_map


def run_case(case):
    """Fit one `FAMILY-MESH` case under its distribution; return the results."""
    import keras

    family, mesh_kind = case.split("-")
    distribution, layout_map = _distribution(mesh_kind, family)
    with distribution.scope():
        causal_lm = build_matquantized_lm(family)
        initial = {
            v.path: np.asarray(keras.ops.convert_to_numpy(v)) for v in causal_lm.weights
        }
        shardings = {
            v.path: [
                None if axis is None else str(axis)
                for axis in v.value.sharding.spec
            ]
            for v in causal_lm.weights
            if v.path in CHECKED_PATHS.get(family, ())
        }
        num_devices = {
            v.path: len(v.value.sharding.device_set) for v in causal_lm.weights
        }
        loss, final, compilations = fit_two_steps(causal_lm)
    return {
        "loss": loss,
        "initial": initial,
        "final": final,
        "shardings": shardings,
        "num_devices": num_devices,
        "compilations": compilations,
    }


def main(argv):
    output_dir, cases = argv[0], argv[1:]
    arrays, summary = {}, {}
    for case in cases:
        result = run_case(case)
        for key in ("initial", "final"):
            for path, value in result[key].items():
                arrays[f"{case}|{key}|{path}"] = value
        summary[case] = {
            key: result[key]
            for key in ("loss", "shardings", "num_devices", "compilations")
        }
    np.savez(os.path.join(output_dir, "weights.npz"), **arrays)
    with open(os.path.join(output_dir, "summary.json"), "w") as file:
        json.dump(summary, file)


if __name__ == "__main__":
    main(sys.argv[1:])
