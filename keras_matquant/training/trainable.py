"""Choose which variables a MatQuant QAT run updates."""

import math

from keras_matquant.layers import MatQuantLayerMixin


def train_only_matquant_layers(model):
    """Freeze every layer of `model` except its MatQuant layers.

    Embeddings, norms and float projections become non-trainable; the float
    master weights of the MatQuant layers stay trainable. This is the cheap
    QAT setting where only the quantized projections learn.

    Args:
        model: a `keras.Model` with MatQuant layers.

    Returns:
        The number of trainable parameters left.

    Raises:
        ValueError: if `model` has no MatQuant layers.

    Example:

    ```python
    matquantize(causal_lm, targets="ffn")
    train_only_matquant_layers(causal_lm)
    ```
    """
    layers = list(model._flatten_layers(include_self=False))
    if not any(isinstance(layer, MatQuantLayerMixin) for layer in layers):
        raise ValueError(
            f"Model '{model.name}' has no MatQuant layers to train. Call "
            "`keras_matquant.matquantize(model)` first."
        )
    for layer in layers:
        # Only leaf layers are switched: setting `trainable` on a container
        # would also switch the MatQuant layers inside it.
        has_children = any(True for _ in layer._flatten_layers(include_self=False))
        if not has_children:
            layer.trainable = isinstance(layer, MatQuantLayerMixin)
    return sum(math.prod(variable.shape) for variable in model.trainable_variables)
