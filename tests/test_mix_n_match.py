"""Mix'n'Match: layer orders, plan effective bits, knapsack, KL search."""

import itertools

import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from keras_matquant import serving
from keras_matquant.data import LanguageModelingData
from keras_matquant.serving.knapsack import solve_knapsack
from keras_matquant.serving.mix_n_match import order_ranking
from tests.conftest import tiny_gemma3_causal_lm
from tests.conftest import token_batch


def dense_stack(units, input_dim=4, seed=0, **options):
    """A Sequential of MatQuantDense layers named d0, d1, ... (one block each)."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((input_dim,))]
    layers += [
        kmq.MatQuantDense(width, name=f"d{index}", **options) for index, width in enumerate(units)
    ]
    return keras.Sequential(layers)


def by_unit(plan, names):
    return [plan[name] for name in names]


# ---------------------------------------------------------------------------
# Layer orders


@pytest.mark.parametrize(
    "order, num_units, expected",
    [
        ("pyramid", 5, [2, 1, 3, 0, 4]),
        ("pyramid", 4, [1, 2, 0, 3]),
        ("reverse_pyramid", 5, [0, 4, 1, 3, 2]),
        ("reverse_pyramid", 4, [0, 3, 1, 2]),
        ("increasing", 3, [2, 1, 0]),
        ("decreasing", 3, [0, 1, 2]),
        ("pyramid", 1, [0]),
    ],
)
def test_order_ranking_hand_values(order, num_units, expected):
    assert order_ranking(order, num_units) == expected


# Six blocks of 16 weights at 4 bits from (2, 4, 8) have a budget of 96 * 4
# bits. The (int8, int4, int2) runs that use it all are (0, 6, 0), (1, 3, 2)
# and (2, 0, 4), and the most even of them is (1, 3, 2).
@pytest.mark.parametrize(
    "order, expected",
    [
        ("pyramid", [2, 4, 8, 4, 4, 2]),
        ("reverse_pyramid", [8, 4, 2, 2, 4, 4]),
        ("increasing", [2, 2, 4, 4, 4, 8]),
        ("decreasing", [8, 4, 4, 4, 2, 2]),
    ],
)
def test_order_plan_six_equal_blocks(order, expected):
    model = dense_stack([4] * 6)
    names = [f"d{index}" for index in range(6)]
    plan = serving.order_plan(model, order, target_bits=4)
    assert set(plan) == set(names)
    assert by_unit(plan, names) == expected
    assert kmq.effective_bits(model, plan=plan) == 4.0


def test_pyramid_eighteen_blocks_at_four_bits():
    model = dense_stack([4] * 18)
    plan = serving.order_plan(model, "pyramid", 4)
    # Runs (4, 6, 8): blocks 7..10 at int8, 4..6 and 11..13 at int4.
    expected = [2] * 4 + [4] * 3 + [8] * 4 + [4] * 3 + [2] * 4
    assert by_unit(plan, [f"d{index}" for index in range(18)]) == expected
    assert kmq.effective_bits(model, plan=plan) == 4.0


def test_order_plan_weights_blocks_by_size():
    # Kernels of 16, 8 and 16 weights, 40 in all; 3 bits allow 120 bits.
    # Upgrading the first ranked block of 16 to int4 costs 112 bits (2.8);
    # a second upgrade would cost 128.
    model = dense_stack([4, 2, 8])
    names = ["d0", "d1", "d2"]
    increasing = serving.order_plan(model, "increasing", 3, precisions=(2, 4))
    assert by_unit(increasing, names) == [2, 2, 4]
    assert kmq.effective_bits(model, plan=increasing) == pytest.approx(2.8)
    decreasing = serving.order_plan(model, "decreasing", 3, precisions=(4, 2))
    assert by_unit(decreasing, names) == [4, 2, 2]
    # The pyramid's first block is the 8-weight middle one (2.4 bits); the
    # next one would cost 128 bits.
    pyramid = serving.order_plan(model, "pyramid", 3, precisions=(2, 4))
    assert by_unit(pyramid, names) == [2, 4, 2]
    assert kmq.effective_bits(model, plan=pyramid) == pytest.approx(2.4)


def test_order_plan_gemma_blocks_share_precision():
    causal_lm = tiny_gemma3_causal_lm()
    kmq.matquantize(causal_lm, targets="ffn")
    plan = serving.order_plan(causal_lm, "increasing", target_bits=5)
    # Two equal blocks at 5 bits: int2 then int8 uses the whole budget.
    for path, bits in plan.items():
        assert bits == (2 if path.startswith("decoder_block_0/") else 8)
    assert len(plan) == 6
    assert kmq.effective_bits(causal_lm, plan=plan) == 5.0


def test_order_plan_per_layer_granularity():
    causal_lm = tiny_gemma3_causal_lm()
    kmq.matquantize(causal_lm, targets="ffn")
    units = serving.plan_units(causal_lm, granularity="layer")
    assert list(units) == list(kmq.matquant_layers(causal_lm))
    # Six layers of 512 weights at 4 bits: the runs (1, 3, 2) of the
    # six-block case, in layer order.
    plan = serving.order_plan(causal_lm, "decreasing", 4, granularity="layer")
    assert list(plan.values()) == [8, 4, 4, 4, 2, 2]


def test_single_precision_and_full_range_targets():
    model = dense_stack([4] * 3)
    assert set(serving.order_plan(model, "pyramid", 2).values()) == {2}
    assert set(serving.order_plan(model, "pyramid", 8).values()) == {8}
    assert set(serving.order_plan(model, "increasing", 3, precisions=(3,)).values()) == {3}


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"order": "zigzag"}, "Unknown layer order 'zigzag'. Accepted orders: pyramid, reverse_pyramid, increasing, decreasing"),
        ({"target_bits": 1.5}, r"target_bits=1.5.*2..8"),
        ({"target_bits": 8.5}, r"target_bits=8.5.*2..8"),
        ({"target_bits": 5, "precisions": ()}, "`precisions` is empty"),
        ({"target_bits": 5, "precisions": (2, 9)}, r"1\.\.8\. Received: precisions=9"),
        ({"target_bits": "4"}, "target_bits='4'"),
        ({"target_bits": float("nan")}, "must be finite"),
        ({"granularity": "head"}, "Unknown plan granularity 'head'. Accepted: block, layer"),
    ],
)
def test_order_plan_invalid_input(arguments, message):
    model = dense_stack([4] * 3)
    arguments = {"order": "pyramid", "target_bits": 4, **arguments}
    with pytest.raises(ValueError, match=message):
        serving.order_plan(model, **arguments)


def test_precision_above_layer_bits_rejected():
    model = dense_stack([4, 4], bits=4)
    with pytest.raises(ValueError, match="Precision 8 is above the 4-bit codes of layer 'd0'"):
        serving.order_plan(model, "pyramid", 4)


# ---------------------------------------------------------------------------
# Effective bits of a plan


def extra_precision_model():
    # Channel [0, 1.00, 2.30, 2.55]: int8 codes 0, 100, 230, 255; sliced to
    # int2 (step 64) they are 0, 2, 4, 4, so half the weights sit in the
    # extra level and int2 costs 2.5 bits per weight.
    extra = kmq.MatQuantDense(1, use_bias=False, slicing="extra_precision", name="extra")
    extra.build((None, 4))
    extra.kernel.assign(np.array([[0.0], [1.0], [2.3], [2.55]], dtype="float32"))
    clamped = kmq.MatQuantDense(3, use_bias=False, name="clamped")
    model = keras.Sequential([keras.Input((4,)), extra, keras.layers.Dense(4), clamped])
    return model


def test_effective_bits_of_plan_counts_extra_level():
    model = extra_precision_model()
    plan = {"extra": 2, "clamped": 4}
    # (2.5 * 4 + 4 * 12) / 16
    assert kmq.effective_bits(model, plan=plan) == 3.625
    assert kmq.effective_bits_by_layer(model, plan=plan) == {"extra": (2.5, 4), "clamped": (4.0, 12)}
    # Layers the plan leaves out count at `precision`: (2.5 * 4 + 8 * 12) / 16.
    assert kmq.effective_bits(model, 8, plan={"extra": 2}) == 6.625
    costs = serving.unit_costs(model, (2, 8))
    np.testing.assert_array_equal(costs.bits, [[10, 32], [24, 96]])
    assert costs.bit_range() == (34 / 16, 8.0)


def test_effective_bits_invalid_plan():
    model = extra_precision_model()
    with pytest.raises(ValueError, match=r"Valid layer paths: \['extra', 'clamped'\]"):
        kmq.effective_bits(model, plan={"dense": 2})
    with pytest.raises(ValueError, match=r"plan\['clamped'\]"):
        kmq.effective_bits(model, plan={"clamped": 9})
    with pytest.raises(ValueError, match=r"\['extra'\] are None"):
        kmq.effective_bits(model, plan={"extra": None})


def test_extra_precision_order_range_starts_above_two():
    model = extra_precision_model()
    with pytest.raises(ValueError, match=r"2\.125\.\.8"):
        serving.order_plan(model, "pyramid", 2.0, precisions=(2, 8))
    plan = serving.order_plan(model, "increasing", 2.125, precisions=(2, 8))
    assert plan == {"extra": 2, "clamped": 2}


# ---------------------------------------------------------------------------
# Knapsack

# Three units, options costing 1, 2 and 4, with losses that fall as the
# cost rises. Checked by listing every choice within each budget.
COSTS = [[1, 2, 4]] * 3
LOSSES = [[10.0, 2.0, 0.0], [5.0, 1.0, 0.0], [0.5, 0.1, 0.0]]


@pytest.mark.parametrize(
    "budget, choices, loss",
    [
        (3, [0, 0, 0], 15.5),
        (6, [1, 1, 1], 3.1),  # beats (4, 1, 1) at 5.5
        (7, [2, 1, 0], 1.5),  # beats (2, 4, 1) at 2.5
        (8, [2, 1, 1], 1.1),
        (12, [2, 2, 2], 0.0),
        (100, [2, 2, 2], 0.0),
    ],
)
def test_knapsack_hand_cases(budget, choices, loss):
    allocation = solve_knapsack(COSTS, LOSSES, budget)
    assert allocation.choices.tolist() == choices
    assert allocation.loss == pytest.approx(loss)
    assert allocation.cost == sum(COSTS[0][c] for c in choices)
    assert allocation.exact


def test_knapsack_prefers_cheaper_on_equal_loss():
    allocation = solve_knapsack([[1, 2], [1, 2]], [[1.0, 1.0], [3.0, 0.0]], 4)
    assert allocation.choices.tolist() == [0, 1]
    assert allocation.cost == 3


def test_knapsack_scales_by_common_divisor():
    block = 3 * 640 * 2048
    costs = np.array(COSTS, dtype=np.int64) * 2 * block
    allocation = solve_knapsack(costs, LOSSES, 7 * 2 * block, max_cells=100)
    assert allocation.choices.tolist() == [2, 1, 0]
    assert allocation.exact


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 9, size=(5, 3))
    losses = rng.normal(size=(5, 3))
    budget = int(rng.integers(costs.min(axis=1).sum(), costs.max(axis=1).sum() + 1))
    best = min(
        (sum(losses[u, c] for u, c in enumerate(choice)), choice)
        for choice in itertools.product(range(3), repeat=5)
        if sum(costs[u, c] for u, c in enumerate(choice)) <= budget
    )
    allocation = solve_knapsack(costs, losses, budget)
    assert allocation.loss == pytest.approx(best[0])
    assert allocation.cost <= budget


def test_knapsack_rounded_grid_still_fits():
    rng = np.random.default_rng(7)
    costs = rng.integers(1000, 9000, size=(6, 3))
    losses = rng.normal(size=(6, 3))
    budget = int(costs.mean(axis=1).sum())
    allocation = solve_knapsack(costs, losses, budget, max_cells=50)
    assert not allocation.exact
    assert allocation.cost <= budget
    assert allocation.cost == costs[np.arange(6), allocation.choices].sum()


@pytest.mark.parametrize(
    "costs, losses, budget, message",
    [
        (COSTS, LOSSES, 2, "below 3, the cost of the cheapest option"),
        ([[1.5, 2.0]], [[0.0, 1.0]], 3, "non-negative integers"),
        ([[-1, 2]], [[0.0, 1.0]], 3, "non-negative integers"),
        ([[1, 2]], [[0.0, np.nan]], 3, "NaN or inf"),
        ([[1, 2]], [[0.0]], 3, r"same shape.*\(1, 2\) and \(1, 1\)"),
        ([], [], 3, "non-empty"),
        ([[1, 2]], [[0.0, 1.0]], 2.5, "budget=2.5"),
    ],
)
def test_knapsack_invalid_input(costs, losses, budget, message):
    with pytest.raises(ValueError, match=message):
        solve_knapsack(costs, losses, budget)


# ---------------------------------------------------------------------------
# KL divergence and search on a tiny Gemma 3


def tiny_lm():
    keras.utils.set_random_seed(0)
    causal_lm = tiny_gemma3_causal_lm()
    kmq.matquantize(causal_lm, targets="ffn")
    return causal_lm


def calibration(sequences=3, length=8, seed=0):
    x, y, weights = token_batch(batch=sequences, length=length, seed=seed)
    weights[0, :2] = 0.0  # positions that must not count
    return LanguageModelingData(x, y, weights)


def numpy_kl(causal_lm, data, plan):
    """Reference: logits from the layers' own forward pass, KL in float64."""
    with kmq.precision(None):
        float_logits = ops.convert_to_numpy(causal_lm(data.x)).astype("float64")
    with kmq.precision_plan(causal_lm, plan):
        plan_logits = ops.convert_to_numpy(causal_lm(data.x)).astype("float64")

    def log_softmax(logits):
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    p, q = log_softmax(float_logits), log_softmax(plan_logits)
    per_token = (np.exp(p) * (p - q)).sum(axis=-1)
    return float((per_token * data.sample_weight).sum() / data.sample_weight.sum())


def block_plan(causal_lm, bits_by_block):
    return {
        path: bits_by_block[path.split("/")[0]]
        for path in kmq.matquant_layers(causal_lm)
    }


@pytest.mark.parametrize(
    "bits_by_block",
    [
        {"decoder_block_0": 2, "decoder_block_1": 8},
        {"decoder_block_0": 4, "decoder_block_1": 3},
        {"decoder_block_0": 8, "decoder_block_1": 8},
    ],
)
def test_kl_divergence_matches_numpy(bits_by_block):
    causal_lm = tiny_lm()
    data = calibration()
    plan = block_plan(causal_lm, bits_by_block)
    divergence = serving.PlanDivergence(causal_lm, data, batch_size=2)
    expected = numpy_kl(causal_lm, data, plan)
    assert expected > 0
    assert divergence.kl_divergence(plan=plan) == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_kl_divergence_float_plan_is_zero():
    causal_lm = tiny_lm()
    divergence = serving.PlanDivergence(causal_lm, calibration())
    float_plan = {path: None for path in kmq.matquant_layers(causal_lm)}
    assert divergence.kl_divergence(plan=float_plan) == pytest.approx(0.0, abs=1e-9)
    int2 = divergence.kl_divergence(bits=2)
    assert int2 == pytest.approx(numpy_kl(causal_lm, calibration(), block_plan(
        causal_lm, {"decoder_block_0": 2, "decoder_block_1": 2})), rel=1e-4)
    assert int2 > divergence.kl_divergence(bits=4) > divergence.kl_divergence() > 0


def test_sensitivities_one_block_at_a_time():
    causal_lm = tiny_lm()
    data = calibration()
    sensitivities = serving.measure_sensitivities(causal_lm, data, precisions=(2, 4, 8))
    assert sensitivities.costs.precisions == (2, 4, 8)
    assert list(sensitivities.costs.units) == ["decoder_block_0", "decoder_block_1"]
    reference = numpy_kl(causal_lm, data, {})
    assert sensitivities.reference_kl == pytest.approx(reference, rel=1e-4)
    np.testing.assert_allclose(sensitivities.kl[:, 2], reference, rtol=1e-4)
    for row, block in enumerate(("decoder_block_0", "decoder_block_1")):
        for column, bits in enumerate((2, 4)):
            other = "decoder_block_1" if block == "decoder_block_0" else "decoder_block_0"
            expected = numpy_kl(causal_lm, data, block_plan(causal_lm, {block: bits, other: 8}))
            assert sensitivities.kl[row, column] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("target_bits", [3.0, 5.0, 6.0])
def test_search_minimises_summed_increase(target_bits):
    causal_lm = tiny_lm()
    data = calibration()
    result = serving.search_plan(causal_lm, data, target_bits)
    increase = result.sensitivities.increase
    precisions = (2, 4, 8)
    # Brute force over the nine block assignments within the budget.
    best = min(
        (increase[0, a] + increase[1, b], (precisions[a], precisions[b]))
        for a, b in itertools.product(range(3), repeat=2)
        if (precisions[a] + precisions[b]) / 2 <= target_bits
    )
    assert (result.precision_by_unit["decoder_block_0"], result.precision_by_unit["decoder_block_1"]) == best[1]
    assert result.predicted_kl == pytest.approx(result.sensitivities.reference_kl + best[0])
    assert result.effective_bits <= target_bits
    assert result.effective_bits == kmq.effective_bits(causal_lm, plan=result.plan)
    assert result.measured_kl == pytest.approx(numpy_kl(causal_lm, data, result.plan), rel=1e-4)
    assert result.exact


def test_search_reuses_sensitivities():
    causal_lm = tiny_lm()
    data = calibration()
    first = serving.search_plan(causal_lm, data, 5.0)
    again = serving.search_plan(causal_lm, data, 3.0, sensitivities=first.sensitivities)
    assert again.sensitivities is first.sensitivities
    assert again.effective_bits <= 3.0
    with pytest.raises(ValueError, match=r"target_bits=9.*2..8"):
        serving.search_plan(causal_lm, data, 9, sensitivities=first.sensitivities)


def test_divergence_rejects_stored_codes(tmp_path):
    causal_lm = tiny_lm()
    exported = serving.export(causal_lm, tmp_path / "int8.keras")
    with pytest.raises(ValueError, match="store packed codes and no float master kernel"):
        serving.PlanDivergence(exported, calibration())
    # Orders need only sizes, so the int8 artifact can be planned.
    plan = serving.order_plan(exported, "pyramid", 5)
    assert sorted(set(plan.values())) == [2, 8]


def test_divergence_rejects_empty_data():
    causal_lm = tiny_lm()
    data = calibration()
    empty = LanguageModelingData(data.x, data.y, np.zeros_like(data.sample_weight))
    with pytest.raises(ValueError, match="no weighted target position"):
        serving.PlanDivergence(causal_lm, empty)
    with pytest.raises(ValueError, match="batch_size"):
        serving.PlanDivergence(causal_lm, data, batch_size=0)


def test_token_kl_close_and_far_distributions():
    from keras_matquant.serving.divergence import _token_kl

    rng = np.random.default_rng(0)
    float_logits = rng.normal(size=(1, 3, 50)) * 3
    plan_logits = float_logits + rng.normal(size=(1, 3, 50)) * np.array([1e-3, 0.5, 0.0])[:, None]
    plan_logits[0, 2, 7] += 150.0  # exp(150) overflows float32: plain formula
    weights = np.array([[1.0, 2.0, 1.0]])

    def log_softmax(logits):
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    p, q = log_softmax(float_logits), log_softmax(plan_logits)
    per_token = (np.exp(p) * (p - q)).sum(axis=-1)
    float_log_probs = ops.convert_to_tensor(log_softmax(float_logits).astype("float32"))
    result = float(ops.convert_to_numpy(_token_kl(float_log_probs, plan_logits.astype("float32"), weights)))
    assert per_token[0, 0] < 1e-5 < per_token[0, 1] < per_token[0, 2]
    assert result == pytest.approx(float((per_token * weights).sum()), rel=1e-4)
    close_only = float(ops.convert_to_numpy(
        _token_kl(float_log_probs[:, :1], plan_logits[:, :1].astype("float32"), weights[:, :1])
    ))
    assert close_only == pytest.approx(per_token[0, 0], rel=1e-4)


def test_plan_perplexity_matches_evaluation():
    from keras_matquant.evaluation import evaluate_perplexity

    causal_lm = tiny_lm()
    data = calibration()
    divergence = serving.PlanDivergence(causal_lm, data, batch_size=2)
    for bits in (None, 4, 2):
        expected = evaluate_perplexity(causal_lm, data, bits=bits, verbose=False)
        score = divergence.float_score if bits is None else divergence.evaluate(bits=bits)
        assert score.log_perplexity == pytest.approx(expected.nll, rel=1e-5)
        assert score.perplexity == pytest.approx(expected.perplexity, rel=1e-5)
    assert divergence.float_score.kl_divergence == 0.0
