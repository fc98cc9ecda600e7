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


def active_precision(default):
    """Return the precision of the innermost open `precision` scope.

    Args:
        default: the value to return when no scope is open (a layer passes
            its own code width).

    Returns:
        An int in `1..8`, None for float weights, or `default`.

    Example:

    >>> active_precision(default=8)
    8
    """
    stack = _stack()
    if not stack:
        return default
    return stack[-1]
