"""Effective bit width: storage bits per quantized weight, layer and model."""

import math

from keras_matquant.layers.tree import matquant_layers


def _planned_precisions(model, layers, plan):
    """Return `{path: precision or None}` for every layer, with `plan` checked."""
    if plan is None:
        return {}
    from keras_matquant.precision import resolve_plan

    resolved = resolve_plan(model, plan)
    floats = [path for path, (_, bits) in resolved.items() if bits is None]
    if floats:
        raise ValueError(
            f"Plan entries {floats} are None (the float master kernel), which "
            "has no quantized bit width. Give every planned layer a precision "
            f"in 1..8, or leave it out of the plan. Valid layer paths: {list(layers)}."
        )
    return {path: bits for path, (_, bits) in resolved.items()}


def effective_bits_by_layer(model, precision=None, plan=None):
    """Return each MatQuant layer's effective bits at a precision or plan.

    Args:
        model: a Keras model or layer, or a KerasHub `CausalLM`.
        precision: int, or None for each layer's own `bits` (for a layer
            with stored codes: its `stored_bits`).
        plan: optional dict `{layer_path: bits}` (Mix'n'Match). Layers it
            names use their planned precision; the others use `precision`.

    Returns:
        A dict `{path: (bits, kernel_size)}` in model order, where `bits`
        is the average storage bits per kernel weight (see
        `MatQuantLayerMixin.effective_bits`) and `kernel_size` the number of
        kernel weights.

    Raises:
        ValueError: if the model has no MatQuant layer, a precision is
            outside `1..bits` of a layer, or the plan names an unknown
            layer path (the message lists the valid paths) or a None
            precision.

    Example:

    ```python
    for path, (bits, size) in effective_bits_by_layer(lm, 2).items():
        print(path, bits)
    ```
    """
    layers = matquant_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no MatQuant layers. Matquantize it "
            "first (`keras_matquant.matquantize`)."
        )
    planned = _planned_precisions(model, layers, plan)
    return {
        path: (
            layer.effective_bits(planned.get(path, precision)),
            math.prod(layer.kernel_shape),
        )
        for path, layer in layers.items()
    }


def effective_bits(model, precision=None, plan=None):
    """Return the parameter-weighted mean storage bits of a model's kernels.

    Clamped slicing to r bits costs r bits per weight; extra-precision
    slicing costs r plus the fraction of weights in the extra level. The
    mean is over the kernels of the MatQuant layers, weighted by their
    number of weights (float layers are not counted). With a Mix'n'Match
    `plan`, each layer counts at its planned precision.

    Args:
        model: a Keras model or layer, or a KerasHub `CausalLM`.
        precision: int, or None for each layer's own `bits` (for a layer
            with stored codes: its `stored_bits`).
        plan: optional dict `{layer_path: bits}`. Layers it names count at
            their planned precision; the others at `precision`.

    Returns:
        A Python float.

    Raises:
        ValueError: if the model has no MatQuant layer, a precision is
            outside `1..bits` of a layer, or the plan is invalid for the
            model.

    Example:

    ```python
    effective_bits(causal_lm, 2)  # 2.0 with clamped slicing
    effective_bits(causal_lm, plan={"decoder_block_0/ffw_gating": 2})
    ```
    """
    rows = effective_bits_by_layer(model, precision, plan).values()
    total_size = sum(size for _, size in rows)
    return sum(bits * size for bits, size in rows) / total_size
