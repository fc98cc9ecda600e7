"""Mix'n'Match: per-block precisions from one MatQuant model.

A plan gives each transformer block (or each MatQuant layer) its own
precision. The four layer orders compared in Matryoshka Quantization
(arXiv:2502.06786) shape the plan by depth:

- `"pyramid"`: the middle blocks get the highest precision, the first and
  last blocks the lowest, the blocks between the middle ones.
- `"reverse_pyramid"`: the first and last blocks get the highest precision,
  the middle blocks the lowest.
- `"increasing"`: precision grows with depth.
- `"decreasing"`: precision falls with depth.

Every plan is costed by its effective bits: the mean storage bits per
kernel weight of the MatQuant layers, weighted by kernel size, with
extra-precision levels counted (see `keras_matquant.effective_bits`).
"""

import itertools
import math
import numbers
from typing import NamedTuple

import numpy as np

from keras_matquant.layers.tree import matquant_layers
from keras_matquant.quantizers import MAX_BITS
from keras_matquant.quantizers import validate_bits

LAYER_ORDERS = ("pyramid", "reverse_pyramid", "increasing", "decreasing")
GRANULARITIES = ("block", "layer")
DEFAULT_PRECISIONS = (2, 4, 8)

# Staircases that `order_plan` compares at most; the count is
# C(units + precisions - 1, precisions - 1).
MAX_STAIRCASES = 2_000_000


class UnitCosts(NamedTuple):
    """Storage cost of each plan unit at each precision.

    Attributes:
        units: dict `{unit_name: tuple of layer paths}` in model order. A
            unit is a transformer block (all its MatQuant layers share one
            precision) or a single layer.
        precisions: tuple of int, ascending: the columns of `bits`.
        bits: int64 array `(units, precisions)`, the storage bits of the
            unit's kernels at each precision (`effective_bits * size`,
            rounded to whole bits).
        sizes: int64 array `(units,)`, the number of kernel weights.
    """

    units: dict
    precisions: tuple
    bits: np.ndarray
    sizes: np.ndarray

    @property
    def total_size(self):
        """The number of kernel weights over all units."""
        return int(self.sizes.sum())

    def bit_range(self):
        """Return the lowest and highest achievable effective bits."""
        total = self.total_size
        return float(self.bits.min(axis=1).sum() / total), float(
            self.bits.max(axis=1).sum() / total
        )

    def budget(self, target_bits):
        """Return the storage bits a plan may use at `target_bits` per weight.

        Raises:
            ValueError: if `target_bits` is not a number within
                `bit_range()`.
        """
        target_bits = _check_target_bits(target_bits)
        low, high = self.bit_range()
        # A relative tolerance of 1e-9 accepts a target written with fewer
        # digits than the range, such as 2.05 for 2.0500000001.
        if not low * (1 - 1e-9) <= target_bits <= high * (1 + 1e-9):
            raise ValueError(
                f"`target_bits={target_bits}` is outside the effective bits "
                f"that precisions {list(self.precisions)} can reach on this "
                f"model: {low:.6g}..{high:.6g}. Pick a target in that range, "
                "or change the precisions."
            )
        budget = math.floor(target_bits * self.total_size + 1e-9 * self.total_size)
        return max(budget, int(self.bits.min(axis=1).sum()))

    def plan(self, precision_by_unit):
        """Expand `{unit: bits}` (or bits in unit order) to `{layer_path: bits}`."""
        if not isinstance(precision_by_unit, dict):
            precision_by_unit = dict(zip(self.units, precision_by_unit))
        return {
            path: int(precision_by_unit[name])
            for name, paths in self.units.items()
            for path in paths
        }


def validate_order(order):
    """Check a layer order name.

    Args:
        order: str, one of `LAYER_ORDERS`.

    Returns:
        The order, unchanged.

    Raises:
        ValueError: if `order` is not one of `LAYER_ORDERS`.

    Example:

    >>> validate_order("pyramid")
    'pyramid'
    """
    if not isinstance(order, str) or order not in LAYER_ORDERS:
        raise ValueError(
            f"Unknown layer order {order!r}. Accepted orders: "
            f"{', '.join(LAYER_ORDERS)}."
        )
    return order


def validate_precision_set(precisions):
    """Check a set of precisions and return it sorted, without repeats.

    Args:
        precisions: iterable of int in `1..8`.

    Returns:
        A tuple of int, ascending.

    Raises:
        ValueError: if the set is empty or a value is not an integer in
            `1..8`.

    Example:

    >>> validate_precision_set([8, 2, 4, 4])
    (2, 4, 8)
    """
    if isinstance(precisions, (str, bytes)) or not hasattr(precisions, "__iter__"):
        raise ValueError(
            "`precisions` must be a non-empty collection of integers in "
            f"1..{MAX_BITS}, such as (2, 4, 8). Received: {precisions!r}."
        )
    values = list(precisions)
    if not values:
        raise ValueError(
            "`precisions` is empty. Pass at least one integer in "
            f"1..{MAX_BITS}, such as (2, 4, 8)."
        )
    return tuple(sorted({validate_bits(value, name="precisions") for value in values}))


def _check_target_bits(target_bits):
    if isinstance(target_bits, bool) or not isinstance(target_bits, numbers.Real):
        raise ValueError(
            "`target_bits` must be a number of bits per weight, such as 4 or "
            f"3.5. Received: target_bits={target_bits!r}."
        )
    if not math.isfinite(target_bits):
        raise ValueError(
            f"`target_bits` must be finite. Received: target_bits={target_bits}."
        )
    return float(target_bits)


def validate_granularity(granularity):
    """Check a plan granularity: `"block"` or `"layer"`.

    Args:
        granularity: str.

    Returns:
        The granularity, unchanged.

    Raises:
        ValueError: if it is neither `"block"` nor `"layer"`.

    Example:

    >>> validate_granularity("block")
    'block'
    """
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise ValueError(
            f"Unknown plan granularity {granularity!r}. Accepted: "
            f"{', '.join(GRANULARITIES)}."
        )
    return granularity


def plan_units(model, granularity="block"):
    """Group a model's MatQuant layers into the units a plan assigns.

    A block is the first component of the layer path (`decoder_block_3`
    for `decoder_block_3/ffw_gating`). A model whose MatQuant layers sit at
    the top level has one block per layer.

    Args:
        model: a Keras model or a KerasHub `CausalLM` with MatQuant layers.
        granularity: `"block"` (one precision per transformer block) or
            `"layer"` (one per MatQuant layer).

    Returns:
        A dict `{unit_name: tuple of layer paths}` in model order.

    Raises:
        ValueError: if the granularity is unknown or the model has no
            MatQuant layers.

    Example:

    ```python
    plan_units(causal_lm)["decoder_block_0"]
    # ('decoder_block_0/ffw_gating', 'decoder_block_0/ffw_gating_2', ...)
    ```
    """
    granularity = validate_granularity(granularity)
    layers = matquant_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no MatQuant layers. Matquantize it "
            "first (`keras_matquant.matquantize`)."
        )
    units = {}
    for path in layers:
        name = path if granularity == "layer" else path.split("/")[0]
        units.setdefault(name, []).append(path)
    return {name: tuple(paths) for name, paths in units.items()}


def unit_costs(model, precisions=DEFAULT_PRECISIONS, granularity="block"):
    """Compute the storage bits of every plan unit at every precision.

    Args:
        model: a Keras model or a KerasHub `CausalLM` with MatQuant layers.
        precisions: iterable of int in `1..8`, each at most the `bits` of
            every layer.
        granularity: `"block"` or `"layer"`.

    Returns:
        A `UnitCosts`.

    Raises:
        ValueError: if the precisions, the granularity or the model are
            invalid, or a precision exceeds a layer's `bits`.

    Example:

    ```python
    costs = unit_costs(causal_lm, (2, 4, 8))
    costs.bit_range()  # (2.0, 8.0) with clamped slicing
    ```
    """
    precisions = validate_precision_set(precisions)
    units = plan_units(model, granularity)
    layers = matquant_layers(model)
    bits = np.zeros((len(units), len(precisions)), dtype=np.int64)
    sizes = np.zeros(len(units), dtype=np.int64)
    for row, paths in enumerate(units.values()):
        for path in paths:
            layer = layers[path]
            size = math.prod(layer.kernel_shape)
            sizes[row] += size
            for column, precision in enumerate(precisions):
                if precision > layer.bits:
                    raise ValueError(
                        f"Precision {precision} is above the {layer.bits}-bit "
                        f"codes of layer '{path}'. Use precisions in "
                        f"1..{layer.bits}."
                    )
                # Whole bits: r * size, plus one bit per weight in the extra
                # level with extra-precision slicing.
                bits[row, column] += int(round(layer.effective_bits(precision) * size))
    return UnitCosts(units=units, precisions=precisions, bits=bits, sizes=sizes)


def order_ranking(order, num_units):
    """Rank units for a layer order, the unit that gets the most bits first.

    Pyramid ranks units by their distance to the middle, nearest first;
    reverse pyramid farthest first. Equal distances (a unit and its mirror
    image) rank the earlier unit first.

    Args:
        order: str, one of `LAYER_ORDERS`.
        num_units: int, the number of units in model order.

    Returns:
        A list of unit indices.

    Raises:
        ValueError: if the order is unknown.

    Example:

    >>> order_ranking("pyramid", 5)
    [2, 1, 3, 0, 4]
    """
    order = validate_order(order)
    indices = list(range(num_units))
    if order == "decreasing":
        return indices
    if order == "increasing":
        return indices[::-1]
    # Twice the distance to the middle, so that it is an integer.
    distance = [abs(2 * index - (num_units - 1)) for index in indices]
    if order == "pyramid":
        return sorted(indices, key=lambda index: (distance[index], index))
    return sorted(indices, key=lambda index: (-distance[index], index))


def _staircase_boundaries(num_units, num_precisions):
    count = math.comb(num_units + num_precisions - 1, num_precisions - 1)
    if count > MAX_STAIRCASES:
        raise ValueError(
            f"{num_units} units and {num_precisions} precisions give {count} "
            f"staircases to compare, more than {MAX_STAIRCASES}. Pass fewer "
            "precisions, or plan per block instead of per layer."
        )
    cuts = np.array(
        list(itertools.combinations_with_replacement(range(num_units + 1), num_precisions - 1)),
        dtype=np.int64,
    ).reshape(count, num_precisions - 1)
    start = np.zeros((count, 1), dtype=np.int64)
    end = np.full((count, 1), num_units, dtype=np.int64)
    return np.concatenate([start, cuts, end], axis=1)


def order_plan(model, order, target_bits, precisions=DEFAULT_PRECISIONS, granularity="block"):
    """Build a Mix'n'Match plan that follows a layer order.

    Units are ranked by `order_ranking`, and the ranking is cut into one
    run per precision: the first units get the highest precision, the next
    the one below, and so on (a run may be empty). Among all such cuts the
    plan is one that uses the most bits that fit in `target_bits` per
    weight. Among cuts with that cost it is the one whose runs are the most
    even in length (the sorted run lengths compared lexicographically,
    largest wins), then the one with more units at higher precisions.

    Take 18 equal blocks at 4 bits from (2, 4, 8). A pyramid puts the 4
    middle blocks at int8, the 3 on each side of them at int4 and the 4
    outermost on each end at int2, for effective bits of exactly 4.0.

    Args:
        model: a Keras model or KerasHub `CausalLM` with MatQuant layers.
        order: str, one of `"pyramid"`, `"reverse_pyramid"`,
            `"increasing"`, `"decreasing"`.
        target_bits: float, the effective bits per kernel weight that the
            plan may use at most.
        precisions: iterable of int in `1..8`; defaults to (2, 4, 8).
        granularity: `"block"` (the reference's unit: a transformer block)
            or `"layer"`.

    Returns:
        A dict `{layer_path: bits}` naming every MatQuant layer.

    Raises:
        ValueError: if the order is unknown, the precision set is empty or
            invalid, or `target_bits` is outside the effective bits the
            precisions can reach (the message gives the range).

    Example:

    ```python
    plan = order_plan(causal_lm, "pyramid", target_bits=4)
    keras_matquant.effective_bits(causal_lm, plan=plan)  # at most 4.0
    ```

    References:
        Matryoshka Quantization, arXiv:2502.06786 (Mix'n'Match).
    """
    order = validate_order(order)
    costs = unit_costs(model, precisions, granularity)
    budget = costs.budget(target_bits)
    ranking = order_ranking(order, len(costs.units))
    choices = _best_staircase(costs.bits[ranking], budget)
    precision_by_rank = np.asarray(costs.precisions)[choices]
    by_unit = dict(zip((list(costs.units)[index] for index in ranking), precision_by_rank))
    return costs.plan(by_unit)


def _best_staircase(ranked_bits, budget):
    """Return the precision index of each ranked unit for the best cut."""
    num_units, num_precisions = ranked_bits.shape
    # Column j of `descending` is the j-th highest precision.
    descending = ranked_bits[:, ::-1]
    prefix = np.concatenate(
        [np.zeros((1, num_precisions), dtype=np.int64), np.cumsum(descending, axis=0)]
    )
    bounds = _staircase_boundaries(num_units, num_precisions)
    columns = np.arange(num_precisions)
    cost = (prefix[bounds[:, 1:], columns] - prefix[bounds[:, :-1], columns]).sum(axis=1)
    runs = np.diff(bounds, axis=1)

    feasible = np.flatnonzero(cost <= budget)
    best_cost = cost[feasible].max()
    candidates = feasible[cost[feasible] == best_cost]
    # Most even runs first, then more units at the higher precisions.
    keys = [(tuple(np.sort(runs[index])), tuple(runs[index])) for index in candidates]
    chosen = candidates[max(range(len(candidates)), key=keys.__getitem__)]

    choices = np.empty(num_units, dtype=np.int64)
    for tier in range(num_precisions):
        choices[bounds[chosen, tier] : bounds[chosen, tier + 1]] = num_precisions - 1 - tier
    return choices
