"""Budget-aware Mix'n'Match search: sensitivity once, then a knapsack.

Each unit (a transformer block, or one MatQuant layer) is measured once per
precision: the KL divergence from the float model's next-token
distribution when only that unit runs at that precision and every other
layer at its own code width (int8). The search then treats the units as
independent and adds their KL increases, so choosing one precision per
unit within a bit budget is a multiple-choice knapsack, solved exactly by
`solve_knapsack`. That costs `units * (precisions - 1)` forward passes over
the calibration data, where an evolutionary search evaluates whole plans
generation after generation.
"""

import logging
from typing import NamedTuple

import numpy as np

from keras_matquant.effective_bits import effective_bits
from keras_matquant.layers.tree import matquant_layers
from keras_matquant.serving.divergence import PlanDivergence
from keras_matquant.serving.knapsack import DEFAULT_MAX_CELLS
from keras_matquant.serving.knapsack import solve_knapsack
from keras_matquant.serving.mix_n_match import DEFAULT_PRECISIONS
from keras_matquant.serving.mix_n_match import unit_costs

logger = logging.getLogger("keras_matquant")


class Sensitivities(NamedTuple):
    """KL divergence of the model with one unit changed at a time.

    Attributes:
        costs: the `UnitCosts` of the units and precisions measured.
        kl: float array `(units, precisions)`: the mean KL divergence (nats
            per token) from the float model when only that unit runs at
            that precision and every other layer at its own `bits`.
        reference_kl: float, the KL divergence with every layer at its own
            `bits` (int8 by default).
    """

    costs: object
    kl: np.ndarray
    reference_kl: float

    @property
    def increase(self):
        """`kl - reference_kl`: the KL each choice adds, as the search sums it."""
        return self.kl - self.reference_kl


class PlanSearchResult(NamedTuple):
    """A plan chosen by `search_plan`.

    Attributes:
        plan: dict `{layer_path: bits}` naming every MatQuant layer.
        precision_by_unit: dict `{unit_name: bits}`.
        effective_bits: float, the plan's effective bits per kernel weight.
        predicted_kl: float, `reference_kl` plus the sum of the chosen
            units' KL increases: the figure the search minimised.
        measured_kl: float, the KL divergence of the whole plan, measured
            on the same calibration data.
        exact: bool, whether the knapsack was solved without rounding costs.
        sensitivities: the `Sensitivities` the search used.
    """

    plan: dict
    precision_by_unit: dict
    effective_bits: float
    predicted_kl: float
    measured_kl: float
    exact: bool
    sensitivities: Sensitivities


def measure_sensitivities(
    model,
    data,
    precisions=DEFAULT_PRECISIONS,
    granularity="block",
    batch_size=1,
    divergence=None,
):
    """Measure the KL divergence of every unit at every precision.

    Args:
        model: a causal LM with MatQuant layers that keep float master
            kernels.
        data: a `LanguageModelingData` of calibration text.
        precisions: iterable of int in `1..8`; defaults to (2, 4, 8).
        granularity: `"block"` or `"layer"`.
        batch_size: int >= 1, sequences per forward pass.
        divergence: optional `PlanDivergence` on `model` to reuse (its data
            and batch size win over `data` and `batch_size`).

    Returns:
        A `Sensitivities`.

    Raises:
        ValueError: if the precisions, granularity or data are invalid, or
            the model's layers keep no float master kernels.

    Example:

    ```python
    sensitivities = measure_sensitivities(causal_lm, calibration)
    sensitivities.increase  # (blocks, 3): KL added by int2, int4, int8
    ```
    """
    costs = unit_costs(model, precisions, granularity)
    if divergence is None:
        divergence = PlanDivergence(model, data, batch_size=batch_size)
    layers = matquant_layers(model)
    reference_kl = divergence.kl_divergence()
    logger.info(
        "Measuring %d units at precisions %s on %d tokens.",
        len(costs.units),
        list(costs.precisions),
        divergence.num_tokens,
    )
    kl = np.empty((len(costs.units), len(costs.precisions)))
    for row, (name, paths) in enumerate(costs.units.items()):
        for column, bits in enumerate(costs.precisions):
            if all(layers[path].bits == bits for path in paths):
                # The unit already runs at its own width.
                kl[row, column] = reference_kl
                continue
            kl[row, column] = divergence.kl_divergence(plan={path: bits for path in paths})
            logger.debug("%s at int%d: KL %.6g nats per token.", name, bits, kl[row, column])
    return Sensitivities(costs=costs, kl=kl, reference_kl=reference_kl)


def search_plan(
    model,
    data,
    target_bits,
    precisions=DEFAULT_PRECISIONS,
    granularity="block",
    batch_size=1,
    sensitivities=None,
    divergence=None,
    max_cells=DEFAULT_MAX_CELLS,
):
    """Choose per-unit precisions with the least KL within a bit budget.

    Measures each unit's sensitivity once (`measure_sensitivities`), then
    picks one precision per unit that minimises the summed KL increase
    subject to the plan's effective bits being at most `target_bits`
    (`solve_knapsack`), and measures the chosen plan's KL.

    Args:
        model: a causal LM with MatQuant layers that keep float master
            kernels.
        data: a `LanguageModelingData` of calibration text (not the text
            the plan is evaluated on).
        target_bits: float, the largest effective bits per kernel weight.
        precisions: iterable of int in `1..8`; defaults to (2, 4, 8).
        granularity: `"block"` (one precision per transformer block) or
            `"layer"`.
        batch_size: int >= 1, sequences per forward pass.
        sensitivities: optional `Sensitivities` from an earlier call on
            this model and data, to search another budget without measuring
            again. Its precisions and granularity win over the arguments.
        divergence: optional `PlanDivergence` on `model` to reuse (its data
            and batch size win over `data` and `batch_size`).
        max_cells: int, the knapsack's largest budget grid (see
            `solve_knapsack`).

    Returns:
        A `PlanSearchResult`.

    Raises:
        ValueError: if an argument is invalid, `target_bits` is outside the
            effective bits the precisions can reach (the message gives the
            range), or the model's layers keep no float master kernels.

    Example:

    ```python
    result = search_plan(causal_lm, calibration, target_bits=4)
    keras_matquant.serving.export(causal_lm, "gemma3-mix.keras", plan=result.plan)
    ```
    """
    if divergence is None:
        divergence = PlanDivergence(model, data, batch_size=batch_size)
    if sensitivities is None:
        sensitivities = measure_sensitivities(
            model, data, precisions, granularity, divergence=divergence
        )
    costs = sensitivities.costs
    budget = costs.budget(target_bits)
    allocation = solve_knapsack(costs.bits, sensitivities.increase, budget, max_cells=max_cells)
    chosen = np.asarray(costs.precisions)[allocation.choices]
    precision_by_unit = {name: int(bits) for name, bits in zip(costs.units, chosen)}
    plan = costs.plan(precision_by_unit)
    return PlanSearchResult(
        plan=plan,
        precision_by_unit=precision_by_unit,
        effective_bits=effective_bits(model, plan=plan),
        predicted_kl=sensitivities.reference_kl + allocation.loss,
        measured_kl=divergence.kl_divergence(plan=plan),
        exact=allocation.exact,
        sensitivities=sensitivities,
    )
