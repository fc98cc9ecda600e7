"""Per-precision loss weights (lambda_r) and named presets.

Matryoshka Quantization (arXiv:2502.06786) minimises
`sum over r of lambda_r * L_r` and reports these weights
`(lambda_8, lambda_4, lambda_2)`: (0.1, 0.1, 1) for Gemma 2 models,
(0.2, 0.2, 1) for Mistral 7B with QAT and (0.4, 0.4, 1) for Mistral 7B
with OmniQuant. The `uniform` preset weights every precision 1, the
objective without reweighting.
"""

from keras_matquant.quantizers import MAX_BITS
from keras_matquant.quantizers import MIN_BITS

LOSS_WEIGHT_PRESETS = {
    "gemma": {8: 0.1, 4: 0.1, 2: 1.0},
    "mistral_qat": {8: 0.2, 4: 0.2, 2: 1.0},
    "mistral_omniquant": {8: 0.4, 4: 0.4, 2: 1.0},
    "uniform": {8: 1.0, 4: 1.0, 2: 1.0},
}
DEFAULT_LOSS_WEIGHTS = LOSS_WEIGHT_PRESETS["gemma"]


def validate_loss_weights(loss_weights):
    """Check a `{bits: weight}` mapping of per-precision loss weights.

    Args:
        loss_weights: dict mapping int precisions in `1..8` to non-negative
            float weights, at least one of them positive. String keys such as
            `"4"` (as in a JSON config) are accepted.

    Returns:
        A new dict `{int: float}` sorted by decreasing precision.

    Raises:
        ValueError: if the mapping is empty, a key is not a precision in
            `1..8`, or a weight is negative, not finite, or all are zero.

    Example:

    >>> validate_loss_weights({2: 1.0, 8: 0.1, 4: 0.1})
    {8: 0.1, 4: 0.1, 2: 1.0}
    """
    accepted = "a dict such as {8: 0.1, 4: 0.1, 2: 1.0}"
    if not isinstance(loss_weights, dict) or not loss_weights:
        raise ValueError(
            f"`loss_weights` must be {accepted}. Received: {loss_weights!r}."
        )
    result = {}
    for key, weight in loss_weights.items():
        try:
            bits = int(key)
        except (TypeError, ValueError):
            bits = None
        if bits is None or isinstance(key, (bool, float)) or str(bits) != str(key).strip():
            raise ValueError(
                f"`loss_weights` keys must be precisions in {MIN_BITS}..{MAX_BITS}, "
                f"as in {accepted}. Received key {key!r}."
            )
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(
                f"`loss_weights` keys must be precisions in {MIN_BITS}..{MAX_BITS}. "
                f"Received key {bits}."
            )
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(
                f"`loss_weights[{bits}]` must be a number. Received: {weight!r}."
            ) from None
        if not weight >= 0.0 or weight == float("inf"):
            raise ValueError(
                f"`loss_weights[{bits}]` must be a finite non-negative number. "
                f"Received: {weight}. Write the weights as {accepted}."
            )
        result[bits] = weight
    if all(weight == 0.0 for weight in result.values()):
        raise ValueError(
            f"`loss_weights` has only zero weights: {result}. Give at least "
            f"one precision a positive weight. Write the weights as {accepted}."
        )
    return dict(sorted(result.items(), reverse=True))


def resolve_loss_weights(loss_weights):
    """Turn a preset name or a `{bits: weight}` dict into validated weights.

    Args:
        loss_weights: a preset name or a dict accepted by
            `validate_loss_weights`. The presets give precisions (8, 4, 2)
            the weights (0.1, 0.1, 1) for `"gemma"`, (0.2, 0.2, 1) for
            `"mistral_qat"`, (0.4, 0.4, 1) for `"mistral_omniquant"` and
            (1, 1, 1) for `"uniform"`.

    Returns:
        A new dict `{int: float}` sorted by decreasing precision.

    Raises:
        ValueError: if a name is not a preset, or the dict is invalid (see
            `validate_loss_weights`).

    Example:

    >>> resolve_loss_weights("mistral_qat")
    {8: 0.2, 4: 0.2, 2: 1.0}
    """
    if isinstance(loss_weights, str):
        if loss_weights not in LOSS_WEIGHT_PRESETS:
            raise ValueError(
                f"Unknown loss weight preset {loss_weights!r}. Accepted "
                f"presets: {', '.join(map(repr, LOSS_WEIGHT_PRESETS))}; or "
                "pass a dict such as {8: 0.1, 4: 0.1, 2: 1.0}."
            )
        return dict(LOSS_WEIGHT_PRESETS[loss_weights])
    return validate_loss_weights(loss_weights)
