"""The QAT models that Matryoshka Quantization compares, built by one API.

- `"matquant"`: int8 parent codes, trained at every precision in the loss
  weights (default {8, 4, 2}), optionally with co-distillation.
- `"baseline"`: a model for one precision r alone: r-bit codes (c = r),
  trained at r. Matryoshka Quantization trains one per precision.
- `"sliced_int8"`: int8 codes trained at int8 only, sliced to fewer bits
  at evaluation without further training.
- `"single_precision"`: int8 parent codes trained only at the r-bit slice
  (Single Precision MatQuant, r = 2 by default). The int8 master weights
  learn from the loss of the slice alone, and the model can still be served
  at any precision up to 8.
"""

from typing import NamedTuple

from keras_matquant.quantizers import MAX_BITS
from keras_matquant.quantizers import validate_bits
from keras_matquant.training.co_distillation import parse_co_distillation
from keras_matquant.training.loss_weights import DEFAULT_LOSS_WEIGHTS
from keras_matquant.training.loss_weights import resolve_loss_weights

RECIPES = ("matquant", "baseline", "sliced_int8", "single_precision")
DEFAULT_SINGLE_PRECISION_BITS = 2


class QATRecipe(NamedTuple):
    """The code width and training objective of one comparison model.

    Attributes:
        name: str, one of `RECIPES`.
        parent_bits: int, the code width c of the MatQuant layers; the model
            can be served at any precision up to it.
        loss_weights: dict `{bits: weight}`, the trained precisions and
            their weights.
        co_distillation: str or None, the co-distillation configuration in
            its canonical form, such as `"[8, 4, 8->2]"`.
    """

    name: str
    parent_bits: int
    loss_weights: dict
    co_distillation: object = None


def _reject_option(name, option, value):
    if value is not None:
        raise ValueError(
            f"The {name!r} recipe sets `{option}` itself. Received: "
            f"{option}={value!r}; use recipe='matquant' to choose it."
        )


def qat_recipe(name="matquant", bits=None, loss_weights=None, co_distillation=None):
    """Describe one of the comparison models of Matryoshka Quantization.

    Args:
        name: str, one of `"matquant"` (default), `"baseline"`,
            `"sliced_int8"` or `"single_precision"`.
        bits: int or None. The trained precision r of `"baseline"`
            (required) and `"single_precision"` (default 2, at most 7);
            must be None for `"matquant"` and None or 8 for
            `"sliced_int8"`.
        loss_weights: dict or preset name, for `"matquant"` only. Defaults
            to the Gemma weights `{8: 0.1, 4: 0.1, 2: 1.0}`.
        co_distillation: str such as `"[8, 4, 8->2]"`, for `"matquant"`
            only. Defaults to None.

    Returns:
        A `QATRecipe`.

    Raises:
        ValueError: if the name is unknown, `bits` is missing or outside
            the recipe's range, an option is given to a recipe that sets it
            itself, or the loss weights or co-distillation are invalid.

    Example:

    >>> qat_recipe("baseline", bits=4)
    QATRecipe(name='baseline', parent_bits=4, loss_weights={4: 1.0}, co_distillation=None)
    """
    if name not in RECIPES:
        raise ValueError(
            f"Unknown QAT recipe {name!r}. Accepted: {', '.join(map(repr, RECIPES))}."
        )
    if name == "matquant":
        if bits is not None:
            raise ValueError(
                "The 'matquant' recipe trains the precisions of its loss "
                f"weights; set those instead of bits. Received: bits={bits!r}."
            )
        weights = resolve_loss_weights(
            DEFAULT_LOSS_WEIGHTS if loss_weights is None else loss_weights
        )
        if co_distillation is not None:
            parsed = parse_co_distillation(co_distillation)
            parsed.check_trained(weights)
            co_distillation = str(parsed)
        return QATRecipe(name, MAX_BITS, weights, co_distillation)

    _reject_option(name, "loss_weights", loss_weights)
    _reject_option(name, "co_distillation", co_distillation)
    if name == "baseline":
        if bits is None:
            raise ValueError(
                "The 'baseline' recipe trains one precision r with r-bit "
                "codes; pass bits=r, for example bits=2."
            )
        bits = validate_bits(bits)
        return QATRecipe(name, bits, {bits: 1.0})
    if name == "sliced_int8":
        if bits not in (None, MAX_BITS):
            raise ValueError(
                "The 'sliced_int8' recipe trains int8 only; slice it to "
                f"fewer bits when evaluating. Received: bits={bits!r}."
            )
        return QATRecipe(name, MAX_BITS, {MAX_BITS: 1.0})
    if bits is None:
        bits = DEFAULT_SINGLE_PRECISION_BITS
    bits = validate_bits(bits, max_bits=MAX_BITS - 1)
    return QATRecipe(name, MAX_BITS, {bits: 1.0})


def build_qat_trainer(
    causal_lm,
    recipe="matquant",
    targets="ffn",
    bits=None,
    loss_weights=None,
    co_distillation=None,
    **trainer_kwargs,
):
    """Matquantize a float model for a recipe and wrap it for training.

    Args:
        causal_lm: a float KerasHub causal LM (no MatQuant layers yet).
        recipe: str, a recipe name (see `qat_recipe`), or a `QATRecipe`.
        targets: str or sequence, the projections to quantize, as for
            `matquantize`: `"ffn"` (default) for the FFN projections, or
            `"all"` for FFN + attention.
        bits: int or None, the recipe's precision (see `qat_recipe`).
        loss_weights: dict or preset name, for `"matquant"` only.
        co_distillation: str, for `"matquant"` only.
        **trainer_kwargs: other `MatQuantModel` arguments, such as
            `stop_teacher_gradient` or `accumulate_gradients`.

    Returns:
        A `MatQuantModel` ready to `compile` and `fit`.

    Raises:
        ValueError: if the recipe or its options are invalid, or
            `matquantize` rejects the model or targets; the model is left
            unchanged then. Also if `MatQuantModel` rejects a
            `trainer_kwargs` value, which it checks after the layers are
            swapped.

    Example:

    ```python
    trainer = build_qat_trainer(causal_lm, "single_precision", targets="all")
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-5))
    trainer.fit(x, y, sample_weight=mask)
    with keras_matquant.precision(4):  # still servable at int4 and int8
        logits = causal_lm(x)
    ```
    """
    from keras_matquant.hub.surgery import matquantize
    from keras_matquant.training.matquant_model import MatQuantModel

    if not isinstance(recipe, QATRecipe):
        recipe = qat_recipe(recipe, bits, loss_weights, co_distillation)
    elif (bits, loss_weights, co_distillation) != (None, None, None):
        raise ValueError(
            f"build_qat_trainer received the recipe {recipe.name!r} as a "
            "QATRecipe, which fixes bits, loss weights and co-distillation; "
            "do not pass them again."
        )
    matquantize(causal_lm, targets=targets, bits=recipe.parent_bits)
    return MatQuantModel(
        causal_lm,
        loss_weights=recipe.loss_weights,
        co_distillation=recipe.co_distillation,
        **trainer_kwargs,
    )
