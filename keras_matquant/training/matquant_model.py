"""`MatQuantModel`: trains one model on the weighted sum of per-precision losses."""

import contextlib

import keras
from keras import ops

from keras_matquant.layers import MatQuantLayerMixin
from keras_matquant.precision import precision
from keras_matquant.training.co_distillation import CoDistillation
from keras_matquant.training.co_distillation import parse_co_distillation
from keras_matquant.training.gradient_accumulation import accumulated_train_step
from keras_matquant.training.gradient_accumulation import gradient_groups
from keras_matquant.training.loss_weights import DEFAULT_LOSS_WEIGHTS
from keras_matquant.training.loss_weights import resolve_loss_weights
from keras_matquant.training.losses import DISTILLATION_LOSSES
from keras_matquant.training.losses import masked_cross_entropy
from keras_matquant.training.losses import masked_distillation_loss


class _PassScope:
    """The part of the objective that the current backward pass computes.

    Attributes:
        precisions: tuple of int, the precisions this pass runs, or None
            for every trained precision (a plain step, `evaluate`, `call`).
        teacher_logits: dict `{bits: logits}` of stop-gradient teacher
            outputs computed by earlier passes of the same step.
        count_weight_penalties: bool, whether this pass adds the weight
            regularization penalties, which a step counts once.
        forward_losses: list of the `add_loss` and activity-regularization
            losses of the latest `call`, from every precision it ran.
    """

    def __init__(self):
        self.precisions = None
        self.teacher_logits = {}
        self.count_weight_penalties = True
        self.forward_losses = []


def _count_regularized(variables):
    return sum(1 for variable in variables if variable.regularizer is not None)


def _check_flag(value, name):
    if not isinstance(value, bool):
        raise TypeError(
            f"MatQuantModel `{name}` must be True or False. Received: "
            f"{name}={value!r} of type {type(value).__name__}."
        )
    return value


@keras.saving.register_keras_serializable(package="keras_matquant")
class MatQuantModel(keras.Model):
    """Trains a matquantized causal LM on the MatQuant objective.

    Each training step runs the wrapped model once per trained precision r
    (inside `keras_matquant.precision(r)`) and minimises

        loss = sum over r in labels of loss_weights[r] * CE_r
             + sum over pairs a->b of loss_weights[b] * D(a->b)

    where `CE_r` is the mean next-token cross entropy of the r-bit model over
    the tokens whose sample weight is non-zero, and `D(a->b)` the mean
    distillation loss from the int-a logits to the int-b logits over the
    same tokens. Without `co_distillation` every trained precision is a
    label precision and there are no pairs. All precisions share the same
    float master weights, so one optimizer step updates the int8 codes and
    every slice of them. The History and progress bar report `loss` (the
    objective), one `loss_int{r}` per precision (its cross entropy, also for
    a precision trained only by distillation) and one
    `distillation_int{a}_to_int{b}` per pair. Works with the standard `fit`,
    `evaluate` and `train_on_batch` on every backend.

    Data: `x` is the wrapped model's input (for KerasHub causal LMs a dict
    with `"token_ids"` and `"padding_mask"`), `y` the next-token ids and
    `sample_weight` the token mask. Calling the model returns a dict
    `{"int8": logits, ...}` with one entry per precision.

    Args:
        model: a `keras.Model` (e.g. `keras_hub.models.Gemma3CausalLM`) with
            at least one MatQuant layer, as produced by `matquantize`.
        loss_weights: dict mapping each trained precision to its weight, or
            a preset name: `"gemma"` (0.1, 0.1, 1), `"mistral_qat"`
            (0.2, 0.2, 1), `"mistral_omniquant"` (0.4, 0.4, 1) or
            `"uniform"` (1, 1, 1) for precisions (8, 4, 2). Defaults to the
            Gemma weights `{8: 0.1, 4: 0.1, 2: 1.0}`.
        co_distillation: optional str such as `"[8, 4, 8->2]"` (see
            `parse_co_distillation`) or a `CoDistillation`. Defaults to
            None: every trained precision learns from the labels only.
        distillation_loss: str, `"kl"` (default) or `"soft_cross_entropy"`.
        stop_teacher_gradient: bool. When True (default) the teacher's
            logits are a constant target, so a distillation term trains only
            the student's pass. When False its gradient also flows through
            the teacher's pass.
        accumulate_gradients: bool. When True, a training step runs one
            forward and backward pass per precision (per group of
            precisions that a distillation term with a teacher gradient
            couples), adds the gradients and applies the optimizer once, so
            the activations of only one pass are live at a time. The
            gradient is the same as without it, up to float rounding.
            Defaults to False.
        **kwargs: passed to `keras.Model`.

    Raises:
        ValueError: if `model` is not a `keras.Model` with MatQuant layers,
            the loss weights are invalid, they train a precision wider than
            the layers' codes, or the co-distillation configuration is
            invalid or does not match the trained precisions.
        TypeError: if a boolean option is not a bool.

    References:
        Nair et al., "Matryoshka Quantization", arXiv:2502.06786 (2025).

    Example:

    ```python
    matquantize(causal_lm, targets="ffn")
    trainer = MatQuantModel(
        causal_lm, loss_weights="gemma", co_distillation="[8, 4, 2, 8->2]"
    )
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-5))
    history = trainer.fit(dataset, epochs=1)
    history.history["loss_int2"]
    ```
    """

    def __init__(
        self,
        model,
        loss_weights=None,
        co_distillation=None,
        distillation_loss="kl",
        stop_teacher_gradient=True,
        accumulate_gradients=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(
                "MatQuantModel wraps a keras.Model such as a KerasHub causal "
                f"LM. Received: model of type {type(model).__name__}."
            )
        if loss_weights is None:
            loss_weights = DEFAULT_LOSS_WEIGHTS
        loss_weights = resolve_loss_weights(loss_weights)
        if co_distillation is None:
            co_distillation = CoDistillation(tuple(loss_weights))
        co_distillation = parse_co_distillation(co_distillation)
        co_distillation.check_trained(loss_weights)
        if distillation_loss not in DISTILLATION_LOSSES:
            raise ValueError(
                f"Unknown distillation loss {distillation_loss!r}. Accepted: "
                f"{', '.join(map(repr, DISTILLATION_LOSSES))}."
            )
        _check_flag(stop_teacher_gradient, "stop_teacher_gradient")
        _check_flag(accumulate_gradients, "accumulate_gradients")

        layers = [
            layer
            for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, MatQuantLayerMixin)
        ]
        if not layers:
            raise ValueError(
                f"Model '{model.name}' has no MatQuant layers, so every "
                "precision would train the same float model. Call "
                "`keras_matquant.matquantize(model)` first."
            )
        min_bits = min(layer.bits for layer in layers)
        too_wide = [bits for bits in loss_weights if bits > min_bits]
        if too_wide:
            raise ValueError(
                f"`loss_weights` trains precisions {too_wide}, but the model "
                f"has MatQuant layers with only {min_bits}-bit codes. Use "
                f"precisions in 1..{min_bits}."
            )

        self.language_model = model
        self.loss_weights_by_bits = loss_weights
        self.precisions = tuple(loss_weights)
        self.co_distillation = co_distillation
        self.distillation_loss = distillation_loss
        self.stop_teacher_gradient = stop_teacher_gradient
        self.accumulate_gradients = accumulate_gradients
        self.gradient_groups = gradient_groups(
            self.precisions, co_distillation.pairs, stop_teacher_gradient
        )
        self.precision_loss_trackers = [
            keras.metrics.Mean(name=f"loss_int{bits}") for bits in self.precisions
        ]
        self.distillation_trackers = [
            keras.metrics.Mean(name=f"distillation_int{a}_to_int{b}")
            for a, b in co_distillation.pairs
        ]
        self._pass_scope = _PassScope()

    def call(self, inputs, training=None):
        outputs = {}
        forward_losses = []
        recorded = set()
        for bits in self._pass_scope.precisions or self.precisions:
            with precision(bits):
                outputs[f"int{bits}"] = self.language_model(inputs, training=training)
            # Keras clears a model's losses when it is called outside another
            # layer's call (as JAX's `stateless_call` runs this method), but
            # keeps them when it is called inside one. Recording each pass's
            # losses by identity counts every pass once either way.
            for loss in self._language_model_forward_losses():
                if id(loss) not in recorded:
                    recorded.add(id(loss))
                    forward_losses.append(loss)
        self._pass_scope.forward_losses = forward_losses
        return outputs

    def _language_model_forward_losses(self):
        losses = self.language_model.losses
        # Keras 3.15 `Layer.losses` lists the `add_loss` and activity losses
        # first, then one penalty per regularized trainable weight.
        penalties = _count_regularized(self.language_model.trainable_weights)
        return losses[: len(losses) - penalties]

    @contextlib.contextmanager
    def backward_pass(self, precisions, teacher_logits, count_weight_penalties):
        """Restrict `call` and `compute_loss` to one pass of a training step.

        Used by the accumulated training step: inside this scope the model
        runs only `precisions`, and the loss has only their terms: their
        label cross entropies and the distillation terms whose student is
        one of them.

        Args:
            precisions: tuple of int, the precisions of this pass.
            teacher_logits: dict `{bits: logits}`, the stop-gradient outputs
                of teachers that earlier passes ran.
            count_weight_penalties: bool, whether this pass adds the weight
                regularization penalties (the first pass of a step does).

        Yields:
            None.

        Example:

        ```python
        with trainer.backward_pass((2,), {8: int8_logits}, False):
            y_pred = trainer(x, training=True)  # {"int2": ...}
            loss = trainer.compute_loss(x, y, y_pred, sample_weight)
        ```
        """
        scope = self._pass_scope
        scope.precisions = tuple(precisions)
        scope.teacher_logits = dict(teacher_logits)
        scope.count_weight_penalties = count_weight_penalties
        try:
            yield
        finally:
            scope.precisions = None
            scope.teacher_logits = {}
            scope.count_weight_penalties = True

    def train_step(self, *args, **kwargs):
        """Run one training step; see `accumulate_gradients` for the two forms."""
        if self.accumulate_gradients and len(self.gradient_groups) > 1:
            return accumulated_train_step(self, *args, **kwargs)
        return super().train_step(*args, **kwargs)

    def compile(self, optimizer="adamw", loss=None, **kwargs):
        """Configure the optimizer; the loss is the MatQuant objective.

        Args:
            optimizer: an optimizer instance or name, as for `keras.Model`.
            loss: must be None; the loss is fixed by `loss_weights` and
                `co_distillation`.
            **kwargs: other arguments of `keras.Model.compile`.

        Raises:
            ValueError: if a `loss` is given.
        """
        if loss is not None:
            raise ValueError(
                "MatQuantModel computes its own loss, the weighted sum of "
                "per-precision cross entropies and distillation terms; set "
                "it with `loss_weights` and `co_distillation` when creating "
                f"the model. Received: loss={loss!r}."
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        """Compile again from a saved compile config (used by `load_model`)."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if y is None:
            raise ValueError(
                "MatQuantModel needs targets: pass `y`, the next-token ids of "
                "shape (batch, time), to fit/evaluate, or yield (x, y) or "
                "(x, y, sample_weight) from the dataset."
            )
        scope = self._pass_scope
        pass_precisions = scope.precisions or self.precisions
        total = ops.convert_to_tensor(0.0, dtype="float32")

        # Cross entropy of every precision this pass runs; only the label
        # precisions add it to the objective.
        for bits, tracker in zip(self.precisions, self.precision_loss_trackers):
            if bits not in pass_precisions:
                continue
            cross_entropy = masked_cross_entropy(
                y, y_pred[f"int{bits}"], sample_weight
            )
            tracker.update_state(cross_entropy)
            if bits in self.co_distillation.label_precisions:
                weight = self.loss_weights_by_bits[bits]
                total = ops.add(total, weight * cross_entropy)

        # Distillation terms whose student this pass runs. The teacher's
        # logits come from this pass or, stopped, from an earlier one.
        for pair, tracker in zip(self.co_distillation.pairs, self.distillation_trackers):
            if pair.student not in pass_precisions:
                continue
            teacher_key = f"int{pair.teacher}"
            if teacher_key in y_pred:
                teacher_logits = y_pred[teacher_key]
            else:
                teacher_logits = scope.teacher_logits[pair.teacher]
            if self.stop_teacher_gradient:
                teacher_logits = ops.stop_gradient(teacher_logits)
            distillation = masked_distillation_loss(
                teacher_logits,
                y_pred[f"int{pair.student}"],
                sample_weight,
                kind=self.distillation_loss,
            )
            tracker.update_state(distillation)
            weight = self.loss_weights_by_bits[pair.student]
            total = ops.add(total, weight * distillation)

        for loss in self._model_losses():
            total = ops.add(total, ops.cast(loss, "float32"))
        return total

    def _model_losses(self):
        losses = list(self._pass_scope.forward_losses)
        if self._pass_scope.count_weight_penalties:
            # A variable read inside a stateless scope (JAX training) returns
            # the scope's value, so the penalty is differentiable there too.
            losses.extend(
                variable.regularizer(variable)
                for variable in self.trainable_weights
                if variable.regularizer is not None
            )
        return losses

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.language_model),
                "loss_weights": {
                    str(bits): weight
                    for bits, weight in self.loss_weights_by_bits.items()
                },
                "co_distillation": str(self.co_distillation),
                "distillation_loss": self.distillation_loss,
                "stop_teacher_gradient": self.stop_teacher_gradient,
                "accumulate_gradients": self.accumulate_gradients,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        from keras_matquant.hub.serialization import restore_matquant_layers

        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        # A KerasHub backbone's own config restores its MatQuant layers (see
        # `keras_matquant.hub.serialization`). Trainer configs written before
        # that kept the layer paths here, and still load.
        layer_configs = config.pop("matquant_layers", None)
        if layer_configs:
            restore_matquant_layers(model, layer_configs)
        return cls(model, **config)
