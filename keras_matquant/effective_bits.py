"""Effective bit width: storage bits per quantized weight, layer and model."""

import math

from keras_matquant.layers.tree import matquant_layers


def effective_bits_by_layer(model, precision=None):
    """Return each MatQuant layer's effective bits at a precision.

    Args:
        model: a Keras model or layer, or a KerasHub `CausalLM`.
        precision: int, or None for each layer's own `bits`.

    Returns:
        A dict `{path: (bits, kernel_size)}` in model order, where `bits`
        is the average storage bits per kernel weight (see
        `MatQuantLayerMixin.effective_bits`) and `kernel_size` the number of
        kernel weights.

    Raises:
        ValueError: if the model has no MatQuant layer, or `precision` is
            outside `1..bits` of a layer.

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
    return {
        path: (layer.effective_bits(precision), math.prod(layer.kernel.shape))
        for path, layer in layers.items()
    }


def effective_bits(model, precision=None):
    """Return the parameter-weighted mean storage bits of a model's kernels.

    Clamped slicing to r bits costs r bits per weight; extra-precision
    slicing costs r plus the fraction of weights in the extra level. The
    mean is over the kernels of the MatQuant layers, weighted by their
    number of weights (float layers are not counted).

    Args:
        model: a Keras model or layer, or a KerasHub `CausalLM`.
        precision: int, or None for each layer's own `bits`.

    Returns:
        A Python float.

    Raises:
        ValueError: if the model has no MatQuant layer, or `precision` is
            outside `1..bits` of a layer.

    Example:

    ```python
    effective_bits(causal_lm, 2)  # 2.0 with clamped slicing
    ```
    """
    rows = effective_bits_by_layer(model, precision).values()
    total_size = sum(size for _, size in rows)
    return sum(bits * size for bits, size in rows) / total_size
