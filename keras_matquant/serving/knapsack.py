"""Choose one option per unit at least total loss within a cost budget.

The multiple-choice knapsack problem, solved exactly by dynamic
programming over the budget. Mix'n'Match search uses it with one unit per
transformer block, one option per precision, the storage bits as the cost
and the measured KL divergence as the loss.
"""

import math
from typing import NamedTuple

import numpy as np

# Budget cells the dynamic programme may use per unit before costs are
# rounded up to a coarser grid.
DEFAULT_MAX_CELLS = 1_000_000


class Allocation(NamedTuple):
    """The option chosen for each unit.

    Attributes:
        choices: int array `(units,)`, the chosen column of each unit.
        cost: int, the total cost of the choices (in the input's units).
        loss: float, the total loss of the choices.
        exact: bool. True when the costs were solved on their own grid, so
            the choice minimises the loss. False when they were rounded up
            to fit `max_cells`: the choice then minimises the loss of the
            rounded costs and still fits the budget.
    """

    choices: np.ndarray
    cost: int
    loss: float
    exact: bool


def _check_tables(costs, losses, budget):
    costs = np.asarray(costs)
    losses = np.asarray(losses, dtype=np.float64)
    if costs.ndim != 2 or costs.shape != losses.shape or costs.size == 0:
        raise ValueError(
            "`costs` and `losses` must be non-empty 2-D arrays of the same "
            f"shape (units, options). Received shapes {costs.shape} and "
            f"{losses.shape}."
        )
    if not np.issubdtype(costs.dtype, np.integer) or np.any(costs < 0):
        raise ValueError(
            "`costs` must be non-negative integers (for example storage "
            "bits). Scale fractional costs to integers first."
        )
    if not np.all(np.isfinite(losses)):
        raise ValueError("`losses` contains NaN or inf; every option needs a finite loss.")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"`budget` must be an integer. Received: budget={budget!r}.")
    cheapest = int(costs.min(axis=1).sum())
    if budget < cheapest:
        raise ValueError(
            f"`budget={budget}` is below {cheapest}, the cost of the cheapest "
            "option of every unit, so no choice fits. Raise the budget."
        )
    return costs.astype(np.int64), losses, int(budget)


def _grid(costs, budget, max_cells):
    """Divide costs by their common divisor, or round them up to a grid."""
    # Cells beyond the dearest choice of every unit are never needed.
    budget = min(budget, int(costs.max(axis=1).sum()))
    step = math.gcd(*(int(value) for value in np.unique(costs))) or 1
    if budget // step <= max_cells:
        return costs // step, budget // step, True
    step = math.ceil(budget / max_cells)
    return -(-costs // step), budget // step, False


def solve_knapsack(costs, losses, budget, max_cells=DEFAULT_MAX_CELLS):
    """Choose one option per unit with the least total loss within a budget.

    Minimises `sum(losses[u, c_u])` subject to `sum(costs[u, c_u]) <=
    budget`. Costs are divided by their greatest common divisor first,
    which keeps the programme small and exact for storage bits (a block of
    n weights costs `r * n` bits). When the budget still spans more than
    `max_cells` cells, costs are rounded up to a coarser grid: the choice
    then always fits the budget but may miss the optimum by the rounding.
    Among choices with equal loss, the cheapest wins.

    Args:
        costs: int array `(units, options)`, non-negative.
        losses: float array `(units, options)`.
        budget: int, the largest total cost allowed.
        max_cells: int, the most budget cells before rounding.

    Returns:
        An `Allocation(choices, cost, loss, exact)`.

    Raises:
        ValueError: if the tables are not 2-D arrays of one shape, a cost
            is negative or fractional, a loss is not finite, or no choice
            fits the budget.

    Example:

    >>> solve_knapsack([[1, 2], [1, 2]], [[5.0, 0.0], [1.0, 0.0]], 3).choices
    array([1, 0])
    """
    costs, losses, budget = _check_tables(costs, losses, budget)
    grid_costs, grid_budget, exact = _grid(costs, budget, max_cells)
    num_units, num_options = costs.shape

    # best[b]: least loss of the units so far at a total grid cost of b.
    best = np.full(grid_budget + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((num_units, grid_budget + 1), dtype=np.int16)
    for unit in range(num_units):
        candidates = np.full((num_options, grid_budget + 1), np.inf)
        for option in range(num_options):
            shift = int(grid_costs[unit, option])
            if shift <= grid_budget:
                candidates[option, shift:] = best[: grid_budget + 1 - shift] + losses[unit, option]
        picks[unit] = np.argmin(candidates, axis=0)
        best = candidates[picks[unit], np.arange(grid_budget + 1)]

    if not np.isfinite(best.min()):
        raise ValueError(
            f"No choice fits `budget={budget}` once the costs are rounded up "
            f"to a grid of {max_cells} cells. Raise `max_cells`, or the budget."
        )
    # argmin returns the lowest cost among equal losses.
    cell = int(np.argmin(best))
    choices = np.zeros(num_units, dtype=np.int64)
    for unit in range(num_units - 1, -1, -1):
        choices[unit] = picks[unit, cell]
        cell -= int(grid_costs[unit, choices[unit]])
    rows = np.arange(num_units)
    return Allocation(
        choices=choices,
        cost=int(costs[rows, choices].sum()),
        loss=float(losses[rows, choices].sum()),
        exact=exact,
    )
