import json

import keras
import numpy as np
import pytest
from keras import ops

from keras_matquant.training import WarmupCosineDecay

# Peak 1e-3, 4 warm-up steps, decay over steps 4..12. Hand values:
# warm-up 1e-3 * s / 4; decay 1e-3 * (1 + cos(pi * (s - 4) / 8)) / 2, where
# cos(pi / 4) = 0.70710678 and cos(3 pi / 4) = -0.70710678.
HAND_VALUES = [
    (0, 0.0),
    (1, 2.5e-4),
    (2, 5.0e-4),
    (3, 7.5e-4),
    (4, 1.0e-3),
    (6, 8.5355339e-4),
    (8, 5.0e-4),
    (10, 1.4644661e-4),
    (12, 0.0),
    (100, 0.0),
]


def rate(schedule, step):
    return float(ops.convert_to_numpy(schedule(step)))


@pytest.mark.parametrize("step, expected", HAND_VALUES)
def test_warmup_cosine_hand_values(step, expected):
    schedule = WarmupCosineDecay(1e-3, warmup_steps=4, total_steps=12)
    assert rate(schedule, step) == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    # initial 2e-4: warm-up 2e-4 + 8e-4 * s / 4. final 1e-4: decay
    # 1e-4 + 9e-4 * (1 + cos(pi * (s - 4) / 8)) / 2.
    [(0, 2.0e-4), (2, 6.0e-4), (4, 1.0e-3), (8, 5.5e-4), (12, 1.0e-4), (50, 1.0e-4)],
)
def test_warmup_cosine_initial_and_final_rates(step, expected):
    schedule = WarmupCosineDecay(
        1e-3, 4, 12, initial_learning_rate=2e-4, final_learning_rate=1e-4
    )
    assert rate(schedule, step) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("step, expected", [(0, 1e-3), (2, 5e-4), (4, 0.0)])
def test_warmup_cosine_without_warmup(step, expected):
    schedule = WarmupCosineDecay(1e-3, warmup_steps=0, total_steps=4)
    assert rate(schedule, step) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_warmup_cosine_config_round_trip():
    schedule = WarmupCosineDecay(1e-5, 150, 1000, final_learning_rate=1e-6)
    config = schedule.get_config()
    assert config == {
        "peak_learning_rate": 1e-5,
        "warmup_steps": 150,
        "total_steps": 1000,
        "initial_learning_rate": 0.0,
        "final_learning_rate": 1e-6,
        "name": "WarmupCosineDecay",
    }
    serialized = json.loads(json.dumps(keras.optimizers.schedules.serialize(schedule)))
    rebuilt = keras.optimizers.schedules.deserialize(serialized)
    assert isinstance(rebuilt, WarmupCosineDecay)
    assert rebuilt.get_config() == config
    for step in (0, 75, 150, 500, 1000):
        assert rate(rebuilt, step) == rate(schedule, step)


def test_optimizer_with_schedule_round_trip():
    schedule = WarmupCosineDecay(1e-3, 4, 12)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule)
    config = json.loads(json.dumps(optimizer.get_config()))
    assert config["learning_rate"]["class_name"] == "WarmupCosineDecay"

    rebuilt = keras.optimizers.AdamW.from_config(config)

    for step, expected in [(2, 5e-4), (6, 8.5355339e-4)]:
        rebuilt.iterations.assign(step)
        value = float(ops.convert_to_numpy(rebuilt.learning_rate))
        assert value == pytest.approx(expected, rel=1e-6)


def test_schedule_drives_sgd_updates():
    # SGD moves w by -lr(step) * grad; with loss sum(w) the gradient is 1.
    schedule = WarmupCosineDecay(1.0, warmup_steps=2, total_steps=4)
    variable = keras.Variable(np.zeros((1,), dtype="float32"))
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    positions = []
    for _ in range(5):
        optimizer.apply([ops.ones((1,))], [variable])
        positions.append(float(ops.convert_to_numpy(variable)[0]))
    # Rates of steps 0..4: 0, 0.5, 1, 0.5, 0.
    np.testing.assert_allclose(positions, [0.0, -0.5, -1.5, -2.0, -2.0], atol=1e-6)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ((0.0, 4, 12), ValueError, "must be positive"),
        ((-1e-3, 4, 12), ValueError, "finite non-negative"),
        ((float("nan"), 4, 12), ValueError, "finite non-negative"),
        ((1e-3, -1, 12), ValueError, "warmup_steps` must be at least 0"),
        ((1e-3, 4, 4), ValueError, "total_steps` must be at least 5"),
        ((1e-3, 4.0, 12), TypeError, "warmup_steps` must be an int"),
        (("fast", 4, 12), TypeError, "must be a number"),
    ],
)
def test_invalid_schedule_arguments_rejected(arguments, error, message):
    with pytest.raises(error, match=message):
        WarmupCosineDecay(*arguments)


def test_final_rate_above_peak_rejected():
    with pytest.raises(ValueError, match="must not exceed `peak_learning_rate`"):
        WarmupCosineDecay(1e-3, 4, 12, final_learning_rate=2e-3)
