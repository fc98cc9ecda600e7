"""Learning-rate schedules for MatQuant QAT."""

import math
import numbers

import keras


def _check_steps(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"WarmupCosineDecay `{name}` must be an int. Received: "
            f"{name}={value!r} of type {type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(
            f"WarmupCosineDecay `{name}` must be at least {minimum}. "
            f"Received: {name}={value}."
        )
    return int(value)


def _check_rate(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"WarmupCosineDecay `{name}` must be a number. Received: "
            f"{name}={value!r} of type {type(value).__name__}."
        )
    if not 0.0 <= value < math.inf:
        raise ValueError(
            f"WarmupCosineDecay `{name}` must be a finite non-negative "
            f"number. Received: {name}={value}."
        )
    return float(value)


@keras.saving.register_keras_serializable(package="keras_matquant")
class WarmupCosineDecay(keras.optimizers.schedules.CosineDecay):
    """Linear warm-up to a peak learning rate, then cosine decay.

    With `s` the optimizer step (0 for the first update), `w` the warm-up
    steps and `T` the total steps:

        lr(s) = initial + (peak - initial) * s / w             for s < w
        lr(s) = final + (peak - final) * (1 + cos(pi * (s - w) / (T - w))) / 2
                                                              for w <= s <= T
        lr(s) = final                                          for s > T

    This is the QAT schedule of Matryoshka Quantization: linear warm-up to
    1e-5 over 150 steps, then cosine decay over the rest of the run. The
    arithmetic is Keras's `CosineDecay` with `warmup_target` set; this class
    takes the run's total steps and an absolute final rate instead.

    Args:
        peak_learning_rate: float > 0, the rate at the end of the warm-up.
        warmup_steps: int >= 0, the number of warm-up steps `w`.
        total_steps: int > `warmup_steps`, the step `T` at which the decay
            ends, usually the number of steps of the run.
        initial_learning_rate: float in `[0, inf)`, the rate at step 0.
            Defaults to 0.0, so the first update does not move the weights
            unless `warmup_steps` is 0.
        final_learning_rate: float in `[0, peak_learning_rate]`, the rate at
            and after step `T`. Defaults to 0.0.
        name: str, the name of the schedule's ops. Defaults to
            `"WarmupCosineDecay"`.

    Raises:
        TypeError: if a step count is not an int or a rate not a number.
        ValueError: if a value is outside its range.

    References:
        Nair et al., "Matryoshka Quantization", arXiv:2502.06786 (2025).

    Example:

    >>> schedule = WarmupCosineDecay(1e-3, warmup_steps=4, total_steps=12)
    >>> float(schedule(2)), float(schedule(8))
    (0.0005, 0.0005)
    >>> optimizer = keras.optimizers.AdamW(learning_rate=schedule)
    """

    def __init__(
        self,
        peak_learning_rate,
        warmup_steps,
        total_steps,
        initial_learning_rate=0.0,
        final_learning_rate=0.0,
        name="WarmupCosineDecay",
    ):
        peak_learning_rate = _check_rate(peak_learning_rate, "peak_learning_rate")
        if peak_learning_rate == 0.0:
            raise ValueError(
                "WarmupCosineDecay `peak_learning_rate` must be positive. "
                "Received: peak_learning_rate=0.0."
            )
        warmup_steps = _check_steps(warmup_steps, "warmup_steps", 0)
        total_steps = _check_steps(total_steps, "total_steps", warmup_steps + 1)
        initial_learning_rate = _check_rate(
            initial_learning_rate, "initial_learning_rate"
        )
        final_learning_rate = _check_rate(final_learning_rate, "final_learning_rate")
        if final_learning_rate > peak_learning_rate:
            raise ValueError(
                "WarmupCosineDecay `final_learning_rate` must not exceed "
                f"`peak_learning_rate` ({peak_learning_rate}). Received: "
                f"final_learning_rate={final_learning_rate}."
            )
        super().__init__(
            initial_learning_rate=initial_learning_rate,
            decay_steps=total_steps - warmup_steps,
            alpha=final_learning_rate / peak_learning_rate,
            name=name,
            warmup_target=peak_learning_rate,
            warmup_steps=warmup_steps,
        )
        self.peak_learning_rate = peak_learning_rate
        self.total_steps = total_steps
        self.final_learning_rate = final_learning_rate

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "initial_learning_rate": self.initial_learning_rate,
            "final_learning_rate": self.final_learning_rate,
            "name": self.name,
        }
