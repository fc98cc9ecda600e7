"""Keras `LayoutMap`s that shard matquantized KerasHub models on a device mesh.

A MatQuant layer keeps the float layer's variable paths (for example
`decoder_block_0/ffw_gating/kernel`), so KerasHub's own kernel patterns
already place the float master kernels. What KerasHub's maps lack are the
learnable clipping logits `clip_max_logit` and `clip_min_logit`. They have the
kernel's rank with size 1 on the contracted axes, so each gets the kernel's
layout with those axes replicated. A size-1 axis cannot be split across
devices. Scales and zero points are not variables: the forward pass derives
them from the kernel, and XLA places them next to the kernel shards.
"""

import re

import keras

# Each family maps to the KerasHub class whose `get_layout_map` the map
# starts from, and to a table of its projections. Each table entry gives
# the kernel path in block 0 and the kernel axes contracted with the input,
# which are the axes where a clipping logit has size 1. Gemma 3 shares
# Gemma's block and layer names and kernel equations, and Mistral shares
# Llama's. KerasHub 0.32 defines `get_layout_map` on GemmaBackbone and
# LlamaBackbone only.
_GEMMA_PROJECTIONS = {
    "query": ("decoder_block_0/attention/query/kernel", (1,)),
    "key": ("decoder_block_0/attention/key/kernel", (1,)),
    "value": ("decoder_block_0/attention/value/kernel", (1,)),
    "attention_output": ("decoder_block_0/attention/attention_output/kernel", (0, 1)),
    "ffw_gating": ("decoder_block_0/ffw_gating/kernel", (0,)),
    "ffw_gating_2": ("decoder_block_0/ffw_gating_2/kernel", (0,)),
    "ffw_linear": ("decoder_block_0/ffw_linear/kernel", (0,)),
}
_LLAMA_PROJECTIONS = {
    "query": ("transformer_layer_0/self_attention/query/kernel", (0,)),
    "key": ("transformer_layer_0/self_attention/key/kernel", (0,)),
    "value": ("transformer_layer_0/self_attention/value/kernel", (0,)),
    "attention_output": (
        "transformer_layer_0/self_attention/attention_output/kernel",
        (0, 1),
    ),
    "feedforward_intermediate_dense": (
        "transformer_layer_0/feedforward_intermediate_dense/kernel",
        (0,),
    ),
    "feedforward_gate_dense": (
        "transformer_layer_0/feedforward_gate_dense/kernel",
        (0,),
    ),
    "feedforward_output_dense": (
        "transformer_layer_0/feedforward_output_dense/kernel",
        (0,),
    ),
}
FAMILY_LAYOUTS = {
    "GemmaBackbone": ("GemmaBackbone", _GEMMA_PROJECTIONS),
    "Gemma3Backbone": ("GemmaBackbone", _GEMMA_PROJECTIONS),
    "MistralBackbone": ("LlamaBackbone", _LLAMA_PROJECTIONS),
    "LlamaBackbone": ("LlamaBackbone", _LLAMA_PROJECTIONS),
}
CLIPPING_LOGIT_NAMES = ("clip_max_logit", "clip_min_logit")


def _backbone_class(model):
    import keras_hub

    if isinstance(model, type):
        if issubclass(model, keras_hub.models.CausalLM):
            return model.backbone_cls
        if issubclass(model, keras_hub.models.Backbone):
            return model
    elif isinstance(model, keras_hub.models.CausalLM):
        return type(model.backbone)
    elif isinstance(model, keras_hub.models.Backbone):
        return type(model)
    raise ValueError(
        "matquant_layout_map expects a KerasHub causal LM or backbone, class "
        "or instance, such as `keras_hub.models.Gemma3Backbone`. Received: "
        f"{model!r}."
    )


def _check_mesh(device_mesh, model_dim, data_dim):
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`device_mesh` must be a `keras.distribution.DeviceMesh`. "
            f"Received: {type(device_mesh).__name__}."
        )
    for argument, name in (("model_dim", model_dim), ("data_dim", data_dim)):
        if name not in device_mesh.axis_names:
            raise ValueError(
                f"`{argument}={name!r}` is not an axis of the device mesh, "
                f"whose axes are {list(device_mesh.axis_names)}. Pass one of "
                "them, or build the mesh with that axis name."
            )
    if model_dim == data_dim:
        raise ValueError(
            f"`model_dim` and `data_dim` are both {model_dim!r}. Use two "
            "different mesh axes."
        )


def _clipping_layout(kernel_layout, kernel_path, contracted_axes):
    if kernel_layout is None or len(kernel_layout.axes) <= max(contracted_axes):
        raise ValueError(
            f"KerasHub's layout map gives '{kernel_path}' the layout "
            f"{None if kernel_layout is None else kernel_layout.axes}, not "
            "one axis per kernel dimension, so the clipping-logit layouts "
            "cannot be derived from it. This KerasHub version is not "
            "supported by matquant_layout_map; build the LayoutMap by hand."
        )
    return tuple(
        None if axis in contracted_axes else name
        for axis, name in enumerate(kernel_layout.axes)
    )


def matquant_layout_map(model, device_mesh, model_dim="model", data_dim="batch"):
    """Build a `keras.distribution.LayoutMap` for a matquantized KerasHub model.

    The map starts from KerasHub's `get_layout_map` (Gemma's for Gemma and
    Gemma 3, Llama's for Llama and Mistral, which use the same layer names
    and kernel equations). That map shards the token embedding and every
    attention and FFN kernel over both mesh axes, so it also covers the
    float master kernels of MatQuant layers. This function adds one pattern
    per projection for its learnable clipping logits, with the kernel's
    layout and `None` on the contracted axes. Each added pattern matches the
    logits only, so a kernel pattern never applies to a variable of another
    rank. For Mistral it also shards the untied output embedding
    `token_embedding/reverse_embeddings` like the transposed input
    embedding. Norm scales and biases are replicated.

    Create and matquantize the model inside the distribution's scope: Keras
    places a variable when it is created. KerasHub's Gemma layouts split
    the key/value head axis over `model_dim`, so that mesh axis must divide
    the number of key/value heads (one in Gemma 2B and Gemma 3 270M and
    1B). `check_layout_map` reports each such mismatch.

    Args:
        model: a KerasHub causal LM or backbone, class or instance:
            Gemma (and Gemma 2, which uses `GemmaBackbone`), Gemma 3,
            Mistral or Llama.
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_dim: str, the mesh axis that splits weights (model
            parallelism). Defaults to `"model"`.
        data_dim: str, the mesh axis that splits the batch; KerasHub's maps
            also split one weight axis over it. Defaults to `"batch"`.

    Returns:
        A `keras.distribution.LayoutMap` on `device_mesh`.

    Raises:
        ValueError: if the model family is not one of the above, the mesh is
            not a `DeviceMesh`, or an axis name is not one of its axes.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh(
        (2, 4), ("batch", "model"), keras.distribution.list_devices()
    )
    layout_map = matquant_layout_map(keras_hub.models.MistralBackbone, mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        causal_lm = keras_hub.models.MistralCausalLM.from_preset("mistral_7b_en")
        matquantize(causal_lm, targets="ffn", learnable_clipping=True)
        trainer = MatQuantModel(causal_lm)
        trainer.compile(optimizer="adamw")
        trainer.fit(dataset)
    ```
    """
    import keras_hub

    backbone_class = _backbone_class(model)
    family = backbone_class.__name__
    if family not in FAMILY_LAYOUTS:
        raise ValueError(
            f"matquant_layout_map has no layouts for {family} models (known: "
            f"{', '.join(FAMILY_LAYOUTS)}). Build a "
            "`keras.distribution.LayoutMap` by hand, with one pattern for the "
            "kernels and one for the clipping logits of each MatQuant layer."
        )
    _check_mesh(device_mesh, model_dim, data_dim)
    source_name, projections = FAMILY_LAYOUTS[family]
    source = getattr(keras_hub.models, source_name)
    layout_map = source.get_layout_map(
        device_mesh,
        model_parallel_dim_name=model_dim,
        data_parallel_dim_name=data_dim,
    )

    logit_names = "|".join(CLIPPING_LOGIT_NAMES)
    for kernel_path, contracted_axes in projections.values():
        axes = _clipping_layout(layout_map[kernel_path], kernel_path, contracted_axes)
        # "decoder_block_0/ffw_gating/kernel" becomes
        # "decoder_block_\d+/ffw_gating/(clip_max_logit|clip_min_logit)".
        block, rest = kernel_path.split("/", 1)
        block_pattern = re.escape(block.rsplit("_", 1)[0]) + r"_\d+"
        layer_pattern = re.escape(rest.rsplit("/", 1)[0])
        layout_map[f"{block_pattern}/{layer_pattern}/({logit_names})"] = axes

    if family == "MistralBackbone":
        layout_map["token_embedding/reverse_embeddings"] = (data_dim, model_dim)
    return layout_map


def _matching_pattern(layout_map, path):
    # `path in layout_map` would also match by regex, so compare keys.
    for pattern in layout_map:
        if pattern == path or re.fullmatch(pattern, path):
            return pattern
    return None


def check_layout_map(layout_map, model):
    """Check that every layout a map gives a model's variables fits them.

    Keras applies a layout to any variable whose path matches the pattern.
    JAX then accepts a layout with fewer axes than the variable (the rest
    is replicated without notice) and rejects one that does not divide a
    dimension evenly with an error that does not name the variable. This
    check names both. It reads only paths and shapes, so `model` can be
    built on one device before the distributed run.

    Args:
        layout_map: a `keras.distribution.LayoutMap`.
        model: a built Keras model, or a KerasHub causal LM.

    Returns:
        A dict mapping the path of each variable that a pattern matches to
        its layout axes (a tuple of mesh axis names and None).

    Raises:
        ValueError: if a layout's rank differs from its variable's, a mesh
            axis size does not divide the dimension it splits, or a path
            matches two patterns.

    Example:

    ```python
    layouts = check_layout_map(layout_map, causal_lm)
    layouts["decoder_block_0/ffw_gating/clip_max_logit"]  # (None, "model")
    ```
    """
    mesh = layout_map.device_mesh
    mesh_sizes = dict(zip(mesh.axis_names, mesh.shape))
    layouts = {}
    for variable in model.weights:
        path = variable.path
        layout = layout_map[path]
        if layout is None:
            continue
        pattern = _matching_pattern(layout_map, path)
        shape = tuple(variable.shape)
        if len(layout.axes) != len(shape):
            raise ValueError(
                f"The layout {layout.axes} of pattern {pattern!r} has rank "
                f"{len(layout.axes)}, but it matches '{path}' of shape {shape} "
                f"(rank {len(shape)}). Narrow the pattern so that it matches "
                f"only variables of rank {len(layout.axes)}."
            )
        for dimension, (size, name) in enumerate(zip(shape, layout.axes)):
            if name is None:
                continue
            if size % mesh_sizes[name]:
                raise ValueError(
                    f"'{path}' has shape {shape}, and its layout {layout.axes} "
                    f"splits dimension {dimension} (size {size}) over the "
                    f"{mesh_sizes[name]} devices of mesh axis {name!r}, which "
                    "does not divide it. Use a mesh axis size that divides "
                    f"{size}, or replace {name!r} by None at dimension "
                    f"{dimension} of pattern {pattern!r}."
                )
        layouts[path] = layout.axes
    return layouts
