"""Walk a model's layers by path and find its MatQuant layers."""

import keras

from keras_matquant.layers.matquant_layer import MatQuantLayerMixin


def _root(model):
    # A KerasHub task (e.g. `Gemma3CausalLM`) keeps its weights in a
    # `backbone`; paths start below it so they match the backbone's layers.
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.Model):
        return backbone
    return model


def _child_layers(layer):
    if isinstance(layer, keras.Model) and hasattr(layer, "operations"):
        return list(layer.layers)
    # Keras keeps every sublayer assigned as an attribute in this list.
    return list(layer._flatten_layers(include_self=False, recursive=False))


def iter_layers(model):
    """Yield every sublayer of a model with its layer path.

    A path joins layer names from the model down, e.g.
    `"decoder_block_3/ffw_gating"` or `"decoder_block_0/attention/query"`.
    For a KerasHub task model (one with a `backbone`), paths start at the
    backbone.

    Args:
        model: a Keras model or layer, or a KerasHub `CausalLM`.

    Yields:
        `(path, parent, layer)` tuples, parents before children. `parent` is
        None for the root's direct children.

    Example:

    ```python
    for path, parent, layer in iter_layers(causal_lm):
        print(path, type(layer).__name__)
    ```
    """
    pending = [("", None, child) for child in _child_layers(_root(model))]
    seen = set()
    while pending:
        prefix, parent, layer = pending.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        path = f"{prefix}{layer.name}"
        yield path, parent, layer
        pending.extend(
            (f"{path}/", layer, child) for child in _child_layers(layer)
        )


def matquant_layers(model):
    """Return the MatQuant layers of a model by layer path.

    Args:
        model: a Keras model, or a KerasHub `CausalLM` or `Backbone`. A
            MatQuant layer passed on its own is returned under its name.

    Returns:
        A dict `{path: layer}` in model order.

    Example:

    ```python
    matquantize(causal_lm, targets="ffn")
    print(list(matquant_layers(causal_lm)))
    ```
    """
    if isinstance(model, MatQuantLayerMixin):
        return {model.name: model}
    return {
        path: layer
        for path, _, layer in iter_layers(model)
        if isinstance(layer, MatQuantLayerMixin)
    }
