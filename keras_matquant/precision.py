"""The active precision that MatQuant layers read when they are traced."""

import contextlib
import threading

from keras_matquant.quantizers import MAX_BITS
from keras_matquant.quantizers import validate_bits

_state = threading.local()


def _stack():
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def validate_precision(bits):
    """Check a precision value: an int in `1..8`, or None for float weights.

    Args:
        bits: int or None.

    Returns:
        The value unchanged.

    Raises:
        ValueError: if `bits` is neither None nor an integer in `1..8`.

    Example:

    >>> validate_precision(4)
    4
    """
    if bits is None:
        return None
    return validate_bits(bits, name="precision", max_bits=MAX_BITS)


@contextlib.contextmanager
def precision(bits):
    """Set the precision every MatQuant layer uses inside this scope.

    The precision is read when a layer is called, so it is fixed into a
    traced function (`jax.jit`, `tf.function`) when that function is traced.
    Keras caches the functions of `fit`, `predict` and `evaluate` on the
    model: the evaluation helpers of this package keep one compiled function
    per precision; code that calls `model.predict` under several precisions
    must reset `model.predict_function = None` between them.

    Outside every scope a layer runs at its own code width (int8 by default).
    Scopes nest; the innermost one wins. The scope is per thread.

    Args:
        bits: int in `1..8`, the number of most significant bits kept from
            each int8 code, or None to run the float master weights.

    Yields:
        The precision, validated.

    Raises:
        ValueError: if `bits` is neither None nor an integer in `1..8`.

    Example:

    ```python
    with keras_matquant.precision(2):
        logits = causal_lm(inputs)  # every MatQuant layer uses int2 weights
    with keras_matquant.precision(None):
        logits = causal_lm(inputs)  # float master weights
    ```
    """
    bits = validate_precision(bits)
    stack = _stack()
    stack.append(bits)
    try:
        yield bits
    finally:
        stack.pop()


class _Plan:
    """Per-layer precisions, keyed by layer identity."""

    def __init__(self, bits_by_layer):
        self.bits_by_layer = bits_by_layer


def resolve_plan(model, plan):
    """Check a per-layer precision plan against a model.

    Args:
        model: a Keras model or a KerasHub `CausalLM` with MatQuant layers.
        plan: dict `{layer_path: bits}` with paths as listed by
            `keras_matquant.matquant_layers(model)` and bits an int in
            `1..layer.bits` (or None for the float master kernel).

    Returns:
        A dict `{path: (layer, bits)}`.

    Raises:
        ValueError: if `plan` is not a dict, names a path that is not a
            MatQuant layer of the model (the message lists the valid paths),
            or gives a precision outside `1..layer.bits`.

    Example:

    ```python
    resolve_plan(causal_lm, {"decoder_block_0/ffw_gating": 2})
    ```
    """
    from keras_matquant.layers.tree import matquant_layers

    if not isinstance(plan, dict):
        raise ValueError(
            "A precision plan must be a dict {layer_path: bits}. Received: "
            f"plan of type {type(plan).__name__}."
        )
    layers = matquant_layers(model)
    unknown = [path for path in plan if path not in layers]
    if unknown:
        raise ValueError(
            f"Plan paths {unknown} are not MatQuant layers of the model. "
            f"Valid layer paths: {list(layers)}."
        )
    resolved = {}
    for path, bits in plan.items():
        layer = layers[path]
        if bits is not None:
            bits = validate_bits(bits, name=f"plan['{path}']", max_bits=layer.bits)
        resolved[path] = (layer, bits)
    return resolved


@contextlib.contextmanager
def precision_plan(model, plan):
    """Run chosen MatQuant layers at their own precision (Mix'n'Match).

    Layers named in `plan` use their planned precision; every other layer
    uses the enclosing `precision` scope, or its own code width. Like
    `precision`, the plan is read when a layer is called, so it is fixed
    into a function when that function is traced.

    Args:
        model: the model whose layers the plan names.
        plan: dict `{layer_path: bits}`; see `resolve_plan`.

    Yields:
        The resolved plan, `{path: (layer, bits)}`.

    Raises:
        ValueError: if the plan names an unknown layer path or an invalid
            precision.

    Example:

    ```python
    plan = {"decoder_block_0/ffw_gating": 2, "decoder_block_1/ffw_gating": 8}
    with keras_matquant.precision_plan(causal_lm, plan):
        logits = causal_lm(inputs)
    ```
    """
    resolved = resolve_plan(model, plan)
    entry = _Plan({id(layer): bits for layer, bits in resolved.values()})
    stack = _stack()
    stack.append(entry)
    try:
        yield resolved
    finally:
        stack.pop()


def active_precision(default, layer=None):
    """Return the precision that applies in the open scopes.

    The innermost `precision` scope wins, except that an open
    `precision_plan` naming `layer` wins over the scopes outside it.

    Args:
        default: the value to return when no scope applies (a layer passes
            its own code width).
        layer: optional, the layer asking; plans are looked up for it.

    Returns:
        An int in `1..8`, None for float weights, or `default`.

    Example:

    >>> active_precision(default=8)
    8
    """
    for entry in reversed(_stack()):
        if isinstance(entry, _Plan):
            if layer is not None and id(layer) in entry.bits_by_layer:
                return entry.bits_by_layer[id(layer)]
            continue
        return entry
    return default
