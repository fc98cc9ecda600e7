"""Layer surgery: swap KerasHub projections for MatQuant layers in place."""

import contextlib
import logging

import keras
import numpy as np

from keras_matquant.layers import MatQuantDense
from keras_matquant.layers import MatQuantEinsumDense
from keras_matquant.layers.matquant_layer import check_finite_kernel
from keras_matquant.layers.matquant_layer import check_source_layer
from keras_matquant.layers.matquant_layer import validate_options
from keras_matquant.layers.tree import iter_layers
from keras_matquant.layers.tree import matquant_layers
from keras_matquant.quantizers import DEFAULT_SLICING

logger = logging.getLogger("keras_matquant")

# Names of the projection layers inside one transformer block, per KerasHub
# backbone class and target group. Gemma 2 models use `GemmaBackbone`.
_GEMMA_TARGETS = {
    "ffn": ("ffw_gating", "ffw_gating_2", "ffw_linear"),
    "attention": ("query", "key", "value", "attention_output"),
}
_MISTRAL_TARGETS = {
    "ffn": (
        "feedforward_intermediate_dense",
        "feedforward_gate_dense",
        "feedforward_output_dense",
    ),
    "attention": ("query", "key", "value", "attention_output"),
}
FAMILY_TARGETS = {
    "GemmaBackbone": _GEMMA_TARGETS,
    "Gemma3Backbone": _GEMMA_TARGETS,
    "MistralBackbone": _MISTRAL_TARGETS,
    "LlamaBackbone": _MISTRAL_TARGETS,
}
TARGET_GROUPS = ("ffn", "attention")


def _get_backbone(model):
    import keras_hub

    if isinstance(model, keras_hub.models.CausalLM):
        return model.backbone
    if isinstance(model, keras_hub.models.Backbone):
        return model
    raise ValueError(
        "matquantize expects a KerasHub causal LM or backbone, such as "
        "`keras_hub.models.Gemma3CausalLM`. Received: model of type "
        f"{type(model).__name__}."
    )


def _normalize_targets(targets):
    if targets is None or not isinstance(targets, (str, list, tuple)):
        raise ValueError(
            f"Invalid matquantize targets {targets!r}. Accepted: 'ffn', "
            "'attention', 'all', or a list of 'ffn' and 'attention'; or pass "
            "explicit `layer_paths`."
        )
    if isinstance(targets, str):
        targets = ("ffn", "attention") if targets == "all" else (targets,)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGET_GROUPS]
    if not targets or unknown:
        raise ValueError(
            f"Unknown matquantize targets {unknown or targets!r}. Accepted: "
            "'ffn', 'attention', 'all', or a list of 'ffn' and 'attention'; "
            "or pass explicit `layer_paths`."
        )
    return targets


def _select_paths(model, targets, layer_paths, all_layers):
    if layer_paths is not None:
        if isinstance(layer_paths, str):
            layer_paths = [layer_paths]
        layer_paths = list(layer_paths)
        repeated = sorted({p for p in layer_paths if layer_paths.count(p) > 1})
        if repeated:
            raise ValueError(
                f"`layer_paths` lists {repeated} more than once. Give each "
                "layer path once."
            )
        missing = [p for p in layer_paths if p not in all_layers]
        if missing:
            projections = [
                p
                for p, (_, layer) in all_layers.items()
                if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
            ]
            raise ValueError(
                f"Layer paths {missing} were not found in the model. Valid "
                f"projection paths include: {projections[:8]}"
                f"{' ...' if len(projections) > 8 else ''}"
            )
        return list(layer_paths)

    backbone = _get_backbone(model)
    family = type(backbone).__name__
    if family not in FAMILY_TARGETS:
        raise ValueError(
            f"matquantize does not know the layer names of {family} models "
            f"(known: {', '.join(FAMILY_TARGETS)}). Pass the layers to "
            "quantize explicitly, e.g. "
            "`matquantize(model, layer_paths=['decoder_block_0/ffw_gating'])`; "
            "`iter_layers(model)` lists every layer path."
        )
    names = set()
    for group in _normalize_targets(targets):
        names.update(FAMILY_TARGETS[family][group])
    return [
        path
        for path, (_, layer) in all_layers.items()
        if layer.name in names
        and isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    ]


def _build_replacement(path, layer, options):
    if isinstance(layer, keras.layers.EinsumDense):
        layer_class, new_class = keras.layers.EinsumDense, MatQuantEinsumDense
        convert = MatQuantEinsumDense.from_einsum_dense
    elif isinstance(layer, keras.layers.Dense):
        layer_class, new_class = keras.layers.Dense, MatQuantDense
        convert = MatQuantDense.from_dense
    else:
        raise ValueError(
            f"Layer '{path}' is a {type(layer).__name__}; only Dense and "
            "EinsumDense layers can be matquantized."
        )
    check_source_layer(layer, layer_class)
    check_finite_kernel(layer.kernel, new_class._reduce_axes_for(layer), path)
    # Building inside the ancestors' name scopes gives the new variables the
    # same paths as the old ones (e.g. "decoder_block_0/ffw_gating/kernel").
    with contextlib.ExitStack() as scopes:
        for name in path.split("/")[:-1]:
            scopes.enter_context(keras.name_scope(name))
        return convert(layer, **options)


def _parent_attribute(parent, layer, path):
    # On the torch backend a layer is also a `torch.nn.Module`, which keeps
    # its sublayers in `_modules` instead of the instance dict.
    attributes = dict(getattr(parent, "_modules", None) or {})
    attributes.update(vars(parent))
    for name, value in attributes.items():
        if value is layer:
            return name
    raise ValueError(
        f"Layer '{path}' is not stored as an attribute of its parent "
        f"'{parent.name}', so it cannot be replaced in place."
    )


def _swap_layer(parent, attribute, old_layer, new_layer):
    tracker = parent._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        # Replacing in place keeps the variable order of the model, which
        # `save_weights` / `load_weights` rely on.
        tracker.replace_tracked_value("layers", old_layer, new_layer)
        setattr(parent, attribute, new_layer)
    finally:
        if was_locked:
            tracker.lock()


def _reset_compiled_functions(model):
    for name in (
        "train_function",
        "test_function",
        "predict_function",
        "generate_function",
    ):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def matquantize(
    model,
    targets="ffn",
    bits=8,
    slicing=DEFAULT_SLICING,
    layer_paths=None,
    learnable_clipping=False,
    clipping_init=None,
    stored_bits=None,
):
    """Swap projection layers of a KerasHub model for MatQuant layers.

    Each selected `EinsumDense` becomes a `MatQuantEinsumDense` and each
    `Dense` a `MatQuantDense`, with the same name, config and bit-identical
    float weights, so the model computes the same outputs under
    `precision(None)`. The swap happens in place; every input is checked
    before the first layer is replaced, so a failed call leaves the model
    unchanged.

    Args:
        model: a built KerasHub `CausalLM` or `Backbone` of a known family
            (Gemma, Gemma 2, Gemma 3, Mistral, Llama), or of any family when
            `layer_paths` is given.
        targets: str or sequence of str, the projection groups to swap:
            `"ffn"` (default), `"attention"`, or `"all"`. Ignored when
            `layer_paths` is given.
        bits: int in `1..8`, the width of the parent codes. Defaults to 8.
        slicing: str, `"clamped"` (default) or `"extra_precision"`.
        layer_paths: optional list of layer paths (see `iter_layers`) to swap
            instead of a target group.
        learnable_clipping: bool, whether the new layers learn per-channel
            clipping factors (OmniQuant's LWC). Defaults to False.
        clipping_init: None or float in `(0, 1]`, the initial clipping
            factor with learnable clipping (None: OmniQuant's logit 4.0).
        stored_bits: None to keep float master kernels (for training), or
            an int in `1..bits`: the new layers store packed codes of that
            precision computed from the float kernels, and no float kernel.

    Returns:
        The list of swapped layer paths.

    Raises:
        ValueError: if the model is not a KerasHub causal LM or backbone.
            Also if its family is unknown and no `layer_paths` are given, a
            target or path is unknown, a selected layer is already quantized
            or has a non-finite kernel, or an option is invalid.

    Example:

    ```python
    causal_lm = keras_hub.models.Gemma3CausalLM(backbone=backbone)
    paths = matquantize(causal_lm, targets="ffn")
    # ['decoder_block_0/ffw_gating', 'decoder_block_0/ffw_gating_2', ...]
    ```
    """
    options = validate_options(
        bits, slicing, learnable_clipping, clipping_init, stored_bits
    )
    _get_backbone(model)
    all_layers = {path: (parent, layer) for path, parent, layer in iter_layers(model)}
    paths = _select_paths(model, targets, layer_paths, all_layers)
    if not paths:
        raise ValueError(
            f"matquantize found no layers for targets={targets!r} in this "
            "model. Pass `layer_paths` explicitly."
        )

    plan = []
    for path in paths:
        parent, layer = all_layers[path]
        if parent is None:
            raise ValueError(
                f"Layer '{path}' is a direct layer of the backbone's "
                "functional graph and cannot be swapped in place; choose a "
                "layer inside a transformer block."
            )
        attribute = _parent_attribute(parent, layer, path)
        new_layer = _build_replacement(path, layer, options)
        plan.append((parent, attribute, layer, new_layer))

    for parent, attribute, layer, new_layer in plan:
        _swap_layer(parent, attribute, layer, new_layer)
    _reset_compiled_functions(model)
    logger.info("Matquantized %d layers at %d bits.", len(plan), options["bits"])
    return paths
