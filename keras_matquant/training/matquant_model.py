"""`MatQuantModel`: trains one model on the weighted sum of per-precision losses."""

import keras
from keras import ops

from keras_matquant.layers import MatQuantLayerMixin
from keras_matquant.precision import precision
from keras_matquant.quantizers import MAX_BITS
from keras_matquant.quantizers import MIN_BITS
from keras_matquant.training.losses import masked_cross_entropy

DEFAULT_LOSS_WEIGHTS = {8: 0.1, 4: 0.1, 2: 1.0}


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
                f"Received: {weight}."
            )
        result[bits] = weight
    if all(weight == 0.0 for weight in result.values()):
        raise ValueError(
            f"`loss_weights` has only zero weights: {result}. Give at least "
            "one precision a positive weight."
        )
    return dict(sorted(result.items(), reverse=True))


@keras.saving.register_keras_serializable(package="keras_matquant")
class MatQuantModel(keras.Model):
    """Trains a matquantized causal LM on the MatQuant objective.

    Each training step runs the wrapped model once per trained precision r
    (inside `keras_matquant.precision(r)`) and minimises

        loss = sum over r of loss_weights[r] * CE_r

    where `CE_r` is the mean next-token cross entropy of the r-bit model over
    the tokens whose sample weight is non-zero. All precisions share the
    same float master weights, so one optimizer step updates the int8 codes
    and every slice of them. The History and progress bar report `loss` (the
    weighted sum) and one `loss_int{r}` per precision. Works with the
    standard `fit`, `evaluate` and `train_on_batch` on every backend.

    Data: `x` is the wrapped model's input (for KerasHub causal LMs a dict
    with `"token_ids"` and `"padding_mask"`), `y` the next-token ids and
    `sample_weight` the token mask. Calling the model returns a dict
    `{"int8": logits, ...}` with one entry per precision.

    Args:
        model: a `keras.Model` (e.g. `keras_hub.models.Gemma3CausalLM`) with
            at least one MatQuant layer, as produced by `matquantize`.
        loss_weights: dict mapping each trained precision to its weight.
            Defaults to `{8: 0.1, 4: 0.1, 2: 1.0}`, the Gemma recipe of
            Matryoshka Quantization.
        **kwargs: passed to `keras.Model`.

    References:
        Nair et al., "Matryoshka Quantization", arXiv:2502.06786 (2025).

    Example:

    ```python
    matquantize(causal_lm, targets="ffn")
    trainer = MatQuantModel(causal_lm, loss_weights={8: 0.1, 4: 0.1, 2: 1.0})
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-5))
    history = trainer.fit(dataset, epochs=1)
    history.history["loss_int2"]
    ```
    """

    def __init__(self, model, loss_weights=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(
                "MatQuantModel wraps a keras.Model such as a KerasHub causal "
                f"LM. Received: model of type {type(model).__name__}."
            )
        if loss_weights is None:
            loss_weights = DEFAULT_LOSS_WEIGHTS
        loss_weights = validate_loss_weights(loss_weights)

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
        self.precision_loss_trackers = [
            keras.metrics.Mean(name=f"loss_int{bits}") for bits in self.precisions
        ]

    def call(self, inputs, training=None):
        outputs = {}
        for bits in self.precisions:
            with precision(bits):
                outputs[f"int{bits}"] = self.language_model(inputs, training=training)
        return outputs

    def compile(self, optimizer="adamw", loss=None, **kwargs):
        """Configure the optimizer; the loss is the MatQuant objective.

        Args:
            optimizer: an optimizer instance or name, as for `keras.Model`.
            loss: must be None; the loss is fixed by `loss_weights`.
            **kwargs: other arguments of `keras.Model.compile`.

        Raises:
            ValueError: if a `loss` is given.
        """
        if loss is not None:
            raise ValueError(
                "MatQuantModel computes its own loss, the weighted sum of "
                "per-precision cross entropies; set it with `loss_weights` "
                f"when creating the model. Received: loss={loss!r}."
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
        total = ops.convert_to_tensor(0.0, dtype="float32")
        for bits, tracker in zip(self.precisions, self.precision_loss_trackers):
            cross_entropy = masked_cross_entropy(
                y, y_pred[f"int{bits}"], sample_weight
            )
            tracker.update_state(cross_entropy)
            total = ops.add(total, self.loss_weights_by_bits[bits] * cross_entropy)
        for loss in self.losses:
            total = ops.add(total, ops.cast(loss, "float32"))
        return total

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.language_model),
                "loss_weights": {
                    str(bits): weight
                    for bits, weight in self.loss_weights_by_bits.items()
                },
                "matquant_layers": _matquant_layer_configs(self.language_model),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        layer_configs = config.pop("matquant_layers", None) or {}
        _restore_matquant_layers(model, layer_configs)
        return cls(model, **config)


def _is_kerashub_model(model):
    import keras_hub

    return isinstance(model, (keras_hub.models.CausalLM, keras_hub.models.Backbone))


def _matquant_layer_configs(model):
    """Map each MatQuant layer path of a KerasHub model to its options.

    A KerasHub backbone's config rebuilds its original float layers, so the
    paths and options let `from_config` swap the same layers again.
    """
    from keras_matquant.hub.surgery import matquant_layers

    if not _is_kerashub_model(model):
        return {}
    return {
        path: {"bits": layer.bits, "slicing": layer.slicing}
        for path, layer in matquant_layers(model).items()
    }


def _restore_matquant_layers(model, layer_configs):
    from keras_matquant.hub.surgery import matquant_layers
    from keras_matquant.hub.surgery import matquantize

    if not layer_configs or not _is_kerashub_model(model):
        return
    present = matquant_layers(model)
    groups = {}
    for path, options in layer_configs.items():
        if path not in present:
            key = (int(options["bits"]), options["slicing"])
            groups.setdefault(key, []).append(path)
    for (bits, slicing), paths in groups.items():
        matquantize(model, layer_paths=paths, bits=bits, slicing=slicing)
