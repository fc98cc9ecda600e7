"""Text generation at a chosen precision or per-layer plan."""

import contextlib
import weakref

from keras_matquant.precision import precision
from keras_matquant.precision import precision_plan
from keras_matquant.precision import validate_precision
from keras_matquant.serving.export import check_bits_or_plan

# One compiled generate function per model and precision (or plan): the
# precision is fixed into the function when KerasHub traces it.
_FUNCTIONS = weakref.WeakKeyDictionary()


def _scope(causal_lm, bits, plan):
    check_bits_or_plan(bits, plan)
    if plan is not None:
        return precision_plan(causal_lm, plan), ("plan", tuple(sorted(plan.items())))
    if bits is None:
        return contextlib.nullcontext(), ("default",)
    return precision(validate_precision(bits)), ("bits", bits)


def generate(causal_lm, inputs, max_length=None, bits=None, plan=None, stop_token_ids=None):
    """Generate with a KerasHub causal LM at a precision or plan.

    Strings go through the model's preprocessor and `causal_lm.generate`.
    Token inputs (a dict with `"token_ids"` and `"padding_mask"`, as the
    preprocessor makes them) run the model's compiled sampler directly and
    return token ids, so models without a preprocessor can generate too.
    The compiled function is kept per precision, so switching precision
    does not reuse a function traced at another one.

    Args:
        causal_lm: a KerasHub `CausalLM` with MatQuant layers (trained, or
            exported / loaded with stored codes).
        inputs: a string or list of strings, or a dict of int arrays
            `{"token_ids", "padding_mask"}` of shape `(batch, length)`
            where the prompt is the masked prefix and the rest is filled.
        max_length: int, the generated sequence length for string inputs
            (KerasHub's `max_length`). Token inputs generate up to their
            length.
        bits: int in `1..8` for every MatQuant layer, None for each
            layer's default (its `bits`, or `stored_bits` once exported).
        plan: dict `{layer_path: bits}` instead of `bits`.
        stop_token_ids: for token inputs, an optional tuple of token ids
            that end generation; string inputs use the preprocessor's end
            token.

    Returns:
        For strings, what `causal_lm.generate` returns. For token inputs, a
        dict `{"token_ids", "padding_mask"}` of numpy arrays.

    Raises:
        ValueError: if `bits` and `plan` are both given, a precision is
            invalid, or string inputs are given to a model without a
            preprocessor.

    Example:

    ```python
    text = generate(causal_lm, "The capital of France is", max_length=32, bits=2)
    ```
    """
    import keras

    scope, key = _scope(causal_lm, bits, plan)
    is_text = isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)
    )
    if is_text and causal_lm.preprocessor is None:
        raise ValueError(
            "String inputs need the model's preprocessor, but "
            f"'{causal_lm.name}' has none. Pass token ids as a dict "
            "{'token_ids', 'padding_mask'} instead."
        )
    functions = _FUNCTIONS.setdefault(causal_lm, {})
    causal_lm.generate_function = functions.get(key)
    try:
        with scope:
            if is_text:
                return causal_lm.generate(inputs, max_length=max_length)
            if causal_lm.generate_function is None:
                causal_lm.make_generate_function()
            outputs = causal_lm.generate_function(dict(inputs), stop_token_ids)
            return {name: keras.ops.convert_to_numpy(value) for name, value in outputs.items()}
    finally:
        functions[key] = causal_lm.generate_function
        causal_lm.generate_function = None
