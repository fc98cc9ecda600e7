"""KL divergence from a float model's next-token distribution to a plan's.

`PlanDivergence` runs the model with its float master kernels replaced by
the dequantized kernels of a precision plan. The model is traced once at
`precision(None)` and every plan only swaps kernel values, so on JAX one
compiled function serves every plan. A plan read from a `precision_plan`
scope is fixed into a function when it is traced, so it would need one
compilation per plan.
"""

import math
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_matquant.layers.tree import matquant_layers
from keras_matquant.precision import precision
from keras_matquant.precision import resolve_plan
from keras_matquant.precision import validate_precision


def _pad_rows(array, num_rows, fill):
    missing = num_rows - array.shape[0]
    if missing <= 0:
        return array
    padding = np.full((missing,) + array.shape[1:], fill, dtype=array.dtype)
    return np.concatenate([array, padding], axis=0)


# `exp(-d)` in `_token_kl` overflows float32 above exp(88); below this
# bound the sum over a vocabulary of a few million entries stays finite.
_MAX_EXPONENT = 60.0


def _token_kl(float_log_probs, logits, weights):
    """Return `sum(w * KL(p_float || p_plan))` over the positions of a batch.

    In float32, `log p - log q` loses as much to rounding as a small KL is
    worth. So the KL is computed from `d = log p - z_q`, where `z_q` are the
    plan's logits, shifted so that `E_p[d] = 0`:
    `KL = E_p[d] + log E_p[exp(-d)] = E_p[d] + log1p(E_p[expm1(-d)])` keeps
    full precision when p and q are close. Positions where `exp(-d)` could
    overflow use the plain `sum(p * (log p - log q))`.
    """
    logits = ops.cast(logits, "float32")
    probabilities = ops.exp(float_log_probs)
    shift = ops.subtract(float_log_probs, logits)
    shift = ops.subtract(
        shift, ops.sum(ops.multiply(probabilities, shift), axis=-1, keepdims=True)
    )
    mean = ops.sum(ops.multiply(probabilities, shift), axis=-1)
    spread = ops.sum(ops.multiply(probabilities, ops.add(ops.expm1(-shift), shift)), axis=-1)
    close = ops.add(mean, ops.log1p(ops.subtract(spread, mean)))

    log_probs = ops.log_softmax(logits, axis=-1)
    plain = ops.sum(
        ops.multiply(probabilities, ops.subtract(float_log_probs, log_probs)), axis=-1
    )
    safe = ops.greater(ops.min(shift, axis=-1), -_MAX_EXPONENT)
    per_token = ops.where(safe, close, plain)

    weights = ops.cast(weights, "float32")
    # `where`, not a product alone, so that a non-finite value at a padding
    # position cannot turn the sum into NaN.
    return ops.sum(ops.where(ops.greater(weights, 0.0), ops.multiply(per_token, weights), 0.0))


def _target_log_likelihood(log_probs, targets, weights):
    """Return `sum(w * log p(target))` over the positions of a batch."""
    picked = ops.take_along_axis(log_probs, ops.expand_dims(ops.cast(targets, "int32"), -1), axis=-1)
    weights = ops.cast(weights, "float32")
    counted = ops.greater(weights, 0.0)
    return ops.sum(ops.where(counted, ops.multiply(ops.squeeze(picked, -1), weights), 0.0))


class PlanScore(NamedTuple):
    """Scores of a plan on the data of a `PlanDivergence`.

    Attributes:
        kl_divergence: float, mean `KL(p_float || p_plan)` in nats per
            weighted target position.
        log_perplexity: float, the plan's mean negative log-likelihood of
            the target tokens in nats.
        perplexity: float, `exp(log_perplexity)` (inf past exp(700)).
    """

    kl_divergence: float
    log_perplexity: float
    perplexity: float


def _score(kl_total, log_likelihood_total, num_tokens):
    log_perplexity = -log_likelihood_total / num_tokens
    perplexity = math.exp(log_perplexity) if log_perplexity < 700 else float("inf")
    return PlanScore(kl_total / num_tokens, log_perplexity, perplexity)


class PlanDivergence:
    """Measures how far a plan moves a model's next-token distribution.

    The divergence is the mean over weighted target positions of
    `KL(p_float || p_plan) = sum_v p_float(v) * (log p_float(v) - log
    p_plan(v))` in nats, where `p_float` is the softmax of the model's
    logits with float master kernels. `evaluate` also returns the plan's
    perplexity of the target tokens. The float log-probabilities are
    computed once and kept: `tokens * vocabulary * 4` bytes (512 MB for
    512 tokens of Gemma 3's 262,144-token vocabulary). They and the int8
    kernels are computed from the weights at construction, so create a new
    object after the weights change.

    Args:
        model: a causal LM `keras.Model` (a KerasHub `CausalLM`) whose
            MatQuant layers keep float master kernels.
        data: a `keras_matquant.data.LanguageModelingData`; its `x` is the
            model input and `sample_weight` marks the positions that count.
        batch_size: int >= 1, sequences per forward pass.

    Raises:
        ValueError: if the model has no MatQuant layers, a layer stores
            packed codes instead of a float master kernel, `batch_size` is
            not a positive integer, or `data` has no weighted position.

    Example:

    ```python
    calibration = language_modeling_data(tokenizer, paragraphs, 128).take(4)
    divergence = PlanDivergence(causal_lm, calibration)
    divergence.kl_divergence(bits=4)
    divergence.evaluate(plan={"decoder_block_0/ffw_gating": 2}).perplexity
    ```
    """

    def __init__(self, model, data, batch_size=1):
        from keras_matquant.evaluation.scoring import check_batch_size

        self.model = model
        self.batch_size = check_batch_size(batch_size)
        self.layers = matquant_layers(model)
        if not self.layers:
            raise ValueError(
                f"Model '{model.name}' has no MatQuant layers. Matquantize it "
                "first (`keras_matquant.matquantize`)."
            )
        stored = [path for path, layer in self.layers.items() if layer.stored_bits is not None]
        if stored:
            raise ValueError(
                f"Layers {stored} store packed codes and no float master "
                "kernel, so the float model cannot be measured. Measure the "
                "trained model (with float master kernels), before export."
            )
        if data.num_tokens <= 0:
            raise ValueError("The calibration data has no weighted target position.")
        self._slots = self._kernel_slots()
        self._batches = self._split(data)
        self.num_tokens = data.num_tokens
        self._default_kernels = {}
        # One jitted function per method on JAX; other backends run eagerly.
        self._compiled = {}
        float_values = self._values({})
        self._float_log_probs = []
        log_likelihood = 0.0
        for x, targets, weights in self._batches:
            log_probs = self._call(self._log_probabilities, *float_values, x)
            self._float_log_probs.append(log_probs)
            log_likelihood += float(
                ops.convert_to_numpy(_target_log_likelihood(log_probs, targets, weights))
            )
        self.float_score = _score(0.0, log_likelihood, self.num_tokens)

    def _kernel_slots(self):
        """Find each MatQuant kernel in the model's variable lists."""
        positions = {}
        for group, variables in (
            ("trainable", self.model.trainable_variables),
            ("non_trainable", self.model.non_trainable_variables),
        ):
            for index, variable in enumerate(variables):
                positions[id(variable)] = (group, index)
        return {path: positions[id(layer._kernel)] for path, layer in self.layers.items()}

    def _split(self, data):
        batches = []
        for start in range(0, data.num_sequences, self.batch_size):
            part = data.take(self.batch_size, start=start)
            x = {
                key: _pad_rows(np.asarray(value), self.batch_size, 1 if key == "padding_mask" else 0)
                for key, value in part.x.items()
            }
            targets = _pad_rows(np.asarray(part.y), self.batch_size, 0)
            weights = _pad_rows(np.asarray(part.sample_weight, dtype="float32"), self.batch_size, 0)
            batches.append((x, targets, weights))
        return batches

    def _kernel_at(self, path, bits):
        """Return the dequantized kernel of a layer at `bits` (None: float)."""
        layer = self.layers[path]
        if bits is None:
            return layer._kernel.value
        with precision(bits):
            return ops.cast(layer.fake_quantized_kernel(), layer._kernel.dtype)

    def _values(self, kernels):
        trainable = [variable.value for variable in self.model.trainable_variables]
        non_trainable = [variable.value for variable in self.model.non_trainable_variables]
        groups = {"trainable": trainable, "non_trainable": non_trainable}
        for path, value in kernels.items():
            group, index = self._slots[path]
            groups[group][index] = value
        return trainable, non_trainable

    def _log_probabilities(self, trainable, non_trainable, x):
        logits, _ = self.model.stateless_call(trainable, non_trainable, x)
        return ops.log_softmax(ops.cast(logits, "float32"), axis=-1)

    def _batch_scores(self, trainable, non_trainable, x, float_log_probs, targets, weights):
        logits, _ = self.model.stateless_call(trainable, non_trainable, x)
        log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        return (
            _token_kl(float_log_probs, logits, weights),
            _target_log_likelihood(log_probs, targets, weights),
        )

    def _call(self, function, *arguments):
        if keras.backend.backend() == "jax":
            import jax

            name = function.__name__
            if name not in self._compiled:
                self._compiled[name] = jax.jit(function)
            function = self._compiled[name]
        # Every MatQuant layer reads its kernel as a float: the planned
        # precision is already in the kernel values.
        with precision(None):
            return function(*arguments)

    def kernels(self, plan=None, bits=None):
        """Return the dequantized kernel of every MatQuant layer for a plan.

        Args:
            plan: optional dict `{layer_path: bits}`; see `resolve_plan`.
            bits: int in `1..8` for the layers the plan does not name, or
                None for each layer's own `bits`.

        Returns:
            A dict `{path: kernel tensor}` in the kernel variable's dtype.

        Example:

        ```python
        divergence.kernels(bits=2)["decoder_block_0/ffw_gating"].shape
        ```
        """
        bits = validate_precision(bits)
        planned = {}
        if plan is not None:
            planned = {path: value for path, (_, value) in resolve_plan(self.model, plan).items()}
        kernels = {}
        for path, layer in self.layers.items():
            if path in planned:
                kernels[path] = self._kernel_at(path, planned[path])
            elif bits is not None:
                kernels[path] = self._kernel_at(path, bits)
            else:
                if path not in self._default_kernels:
                    self._default_kernels[path] = self._kernel_at(path, layer.bits)
                kernels[path] = self._default_kernels[path]
        return kernels

    def evaluate(self, plan=None, bits=None):
        """Score a plan: KL divergence from the float model, and perplexity.

        Args:
            plan: optional dict `{layer_path: bits}` (a None value runs that
                layer's float master kernel).
            bits: int in `1..8` for the layers the plan does not name, or
                None for each layer's own `bits` (int8 by default).

        Returns:
            A `PlanScore(kl_divergence, log_perplexity, perplexity)`.

        Raises:
            ValueError: if the plan or `bits` is invalid for the model.

        Example:

        ```python
        divergence.evaluate(plan=order_plan(causal_lm, "pyramid", 4)).perplexity
        ```
        """
        values = self._values(self.kernels(plan, bits))
        kl_total = 0.0
        log_likelihood = 0.0
        for (x, targets, weights), float_log_probs in zip(self._batches, self._float_log_probs):
            kl, likelihood = self._call(
                self._batch_scores, *values, x, float_log_probs, targets, weights
            )
            kl_total += float(ops.convert_to_numpy(kl))
            log_likelihood += float(ops.convert_to_numpy(likelihood))
        return _score(kl_total, log_likelihood, self.num_tokens)

    def kl_divergence(self, plan=None, bits=None):
        """Return the mean KL divergence from the float model to a plan.

        Args:
            plan: optional dict `{layer_path: bits}`.
            bits: int in `1..8` for the layers the plan does not name, or
                None for each layer's own `bits`.

        Returns:
            A Python float: nats per weighted target position.

        Raises:
            ValueError: if the plan or `bits` is invalid for the model.

        Example:

        ```python
        divergence.kl_divergence(bits=2)
        ```
        """
        return self.evaluate(plan, bits).kl_divergence
