"""OmniQuant-style block-wise calibration of learnable clipping, MatQuant way.

Each transformer block is calibrated in order. For every trained precision
r the block gets, as input, the output of the blocks before it at precision
r (already calibrated), and its target is the float model's output of that
block. With the master weights frozen, only the block's clipping logits
train, on `sum_r lambda_r * MSE(float output, precision-r output)`. With
co-distillation, a pair `a->b` adds `lambda_b * MSE(int-a output, int-b
output)`: the int-a block output is the target of the int-b one. Block
inputs are cached, so calibrating a block costs one pass of the block before
it per precision, not a pass of the whole model.
"""

import keras
import numpy as np
from keras import ops

from keras_matquant.layers.tree import matquant_layers
from keras_matquant.precision import precision
from keras_matquant.training.co_distillation import CoDistillation
from keras_matquant.training.co_distillation import parse_co_distillation
from keras_matquant.training.loss_weights import resolve_loss_weights

DEFAULT_CALIBRATION_LOSS_WEIGHTS = {8: 0.1, 4: 0.1, 2: 1.0}


def _backbone(model):
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "transformer_layers", None)
    if not blocks:
        raise ValueError(
            f"Model '{model.name}' has no `transformer_layers`; block-wise "
            "calibration needs a KerasHub causal LM or backbone (Gemma, "
            "Gemma 3, Mistral, Llama)."
        )
    return backbone, list(blocks)


def _clipping_layers(block):
    layers = matquant_layers(block)
    return [layer for layer in layers.values() if layer.learnable_clipping]


class _BlockInputRecorder:
    """Records the arguments of the first block's call during one forward."""

    def __init__(self, block):
        self.block = block
        self.calls = []

    def __enter__(self):
        original = self.block.call

        def call(x, *args, **kwargs):
            self.calls.append((x, args, kwargs))
            return original(x, *args, **kwargs)

        self.original = original
        object.__setattr__(self.block, "call", call)
        return self

    def __exit__(self, *exc_info):
        object.__delattr__(self.block, "call")


def _batch_arguments(args, kwargs, batch_size):
    """Split recorded call arguments into per-sample tensors and constants."""
    per_sample, constants = {}, {}
    for index, value in enumerate(args):
        key = f"arg_{index}"
        (per_sample if _is_per_sample(value, batch_size) else constants)[key] = value
    for name, value in kwargs.items():
        key = f"kwarg_{name}"
        (per_sample if _is_per_sample(value, batch_size) else constants)[key] = value
    return per_sample, constants


def _is_per_sample(value, batch_size):
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) > 0 and shape[0] == batch_size


def _call_block(block, x, per_sample, constants, count):
    values = {**constants, **per_sample}
    args = [values[f"arg_{index}"] for index in range(count)]
    kwargs = {
        key[len("kwarg_"):]: value for key, value in values.items() if key.startswith("kwarg_")
    }
    return block(x, *args, **kwargs)


class BlockCalibrator(keras.Model):
    """Trains one block's clipping logits on the MatQuant block loss.

    The loss is `sum over r in labels of lambda_r * MSE(target, out_r)` plus
    `lambda_b * MSE(out_a, out_b)` for each co-distillation pair `a->b`,
    where `out_r` is the block output at precision r on its precision-r
    input.

    Inputs of `fit`: a dict with `"target"` (the float block output),
    `"x_{r}"` (the block input at precision r for each trained r) and the
    block's per-sample call arguments (padding masks).

    Args:
        block: the transformer block.
        loss_weights: dict `{bits: lambda}` of the trained precisions.
        constants: call arguments shared by every sample.
        argument_count: number of positional arguments after `x`.
        co_distillation: a `CoDistillation`, or None to train every
            precision on the float target alone.
        stop_teacher_gradient: bool, whether a distillation term treats the
            teacher output as a constant (default) or also trains through
            the teacher's pass.
    """

    def __init__(
        self,
        block,
        loss_weights,
        constants,
        argument_count,
        co_distillation=None,
        stop_teacher_gradient=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.block = block
        self.loss_weights_by_bits = dict(loss_weights)
        if co_distillation is None:
            co_distillation = CoDistillation(tuple(loss_weights))
        self.co_distillation = co_distillation
        self.stop_teacher_gradient = stop_teacher_gradient
        self.constants = constants
        self.argument_count = argument_count
        self.precision_trackers = {
            bits: keras.metrics.Mean(name=f"mse_int{bits}")
            for bits in co_distillation.label_precisions
        }
        self.distillation_trackers = {
            pair: keras.metrics.Mean(name=f"distillation_int{pair.teacher}_to_int{pair.student}")
            for pair in co_distillation.pairs
        }

    def call(self, inputs, training=False):
        per_sample = {
            key: value
            for key, value in inputs.items()
            if key.startswith("arg_") or key.startswith("kwarg_")
        }
        outputs = {}
        for bits in self.loss_weights_by_bits:
            with precision(bits):
                outputs[bits] = _call_block(
                    self.block,
                    inputs[f"x_{bits}"],
                    per_sample,
                    self.constants,
                    self.argument_count,
                )
        return outputs

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        target = ops.cast(x["target"], "float32")
        total = ops.zeros((), "float32")
        for bits in self.co_distillation.label_precisions:
            error = _mean_squared_error(target, y_pred[bits])
            self.precision_trackers[bits].update_state(error)
            total = ops.add(total, ops.multiply(self.loss_weights_by_bits[bits], error))
        for pair, tracker in self.distillation_trackers.items():
            teacher = ops.cast(y_pred[pair.teacher], "float32")
            if self.stop_teacher_gradient:
                teacher = ops.stop_gradient(teacher)
            error = _mean_squared_error(teacher, y_pred[pair.student])
            tracker.update_state(error)
            total = ops.add(total, ops.multiply(self.loss_weights_by_bits[pair.student], error))
        return total

    @property
    def metrics(self):
        return (
            super().metrics
            + list(self.precision_trackers.values())
            + list(self.distillation_trackers.values())
        )


def _mean_squared_error(target, output):
    return ops.mean(ops.square(ops.subtract(ops.cast(output, "float32"), target)))


def _block_outputs(block, x, per_sample, constants, count, bits, batch_size):
    outputs = []
    with precision(bits):
        for start in range(0, x.shape[0], batch_size):
            stop = start + batch_size
            chunk = {key: value[start:stop] for key, value in per_sample.items()}
            outputs.append(
                ops.convert_to_numpy(
                    _call_block(block, x[start:stop], chunk, constants, count)
                )
            )
    return np.concatenate(outputs, axis=0)


def calibrate(
    model,
    inputs,
    loss_weights=None,
    learning_rate=1e-3,
    batch_size=4,
    epochs=1,
    co_distillation=None,
    stop_teacher_gradient=True,
    verbose="auto",
):
    """Calibrate the learnable clipping of a matquantized model block by block.

    The model's MatQuant layers must learn clipping
    (`matquantize(..., learnable_clipping=True)`). Master weights and every
    other variable stay exactly as they are; only the clipping logits change.

    Args:
        model: a KerasHub causal LM or backbone with MatQuant layers.
        inputs: the calibration batch, a dict of numpy arrays as the backbone
            takes it (`{"token_ids", "padding_mask"}`, shape
            `(samples, length)`).
        loss_weights: dict `{bits: lambda}` of the calibrated precisions,
            or a preset name (`"gemma"`, `"mistral_omniquant"`, ...).
            Defaults to `{8: 0.1, 4: 0.1, 2: 1.0}`; `{8: 1.0}` calibrates
            int8 alone (the "Sliced int8" comparison).
        learning_rate: float, the learning rate of AdamW, which runs
            without weight decay as in OmniQuant (the reference: 1e-3).
            Adam moves a logit by about `learning_rate` per step, so small
            calibration sets need a larger rate.
        batch_size: int, samples per step (the reference: 4).
        epochs: int, passes over the calibration samples per block.
        co_distillation: optional str such as `"[8, 4, 8->2]"` (see
            `parse_co_distillation`): precisions trained on the float block
            output and `a->b` pairs where the int-a block output is the
            target of the int-b one, weighted by `lambda_b`. Every precision
            it names must be in `loss_weights`. Defaults to every precision
            trained on the float output.
        stop_teacher_gradient: bool. When True (default) a distillation
            term treats the teacher's block output as a constant; when
            False, its gradient also flows through the teacher's pass.
        verbose: passed to `fit` for each block.

    Returns:
        A dict `{block_name: {...}}` with, for the last epoch, the mean
        squared error of each precision trained on the float output
        (`"mse_int{r}"`) and of each distillation pair
        (`"distillation_int{a}_to_int{b}"`), and the weighted loss of the
        first and last epochs.

    Raises:
        ValueError: if the model has no transformer blocks, no layer learns
            clipping, `loss_weights` or `co_distillation` is invalid, or a
            count is not positive.

    Example:

    ```python
    matquantize(causal_lm, targets="ffn", learnable_clipping=True)
    calibrate(causal_lm, calibration_inputs, epochs=2)
    calibrate(causal_lm, calibration_inputs, co_distillation="[8, 4, 8->2]")
    ```
    """
    loss_weights = resolve_loss_weights(
        DEFAULT_CALIBRATION_LOSS_WEIGHTS if loss_weights is None else loss_weights
    )
    if co_distillation is None:
        co_distillation = CoDistillation(tuple(loss_weights))
    co_distillation = parse_co_distillation(co_distillation)
    co_distillation.check_trained(loss_weights)
    if not isinstance(stop_teacher_gradient, bool):
        raise ValueError(
            "`stop_teacher_gradient` must be True or False. Received: "
            f"stop_teacher_gradient={stop_teacher_gradient!r}."
        )
    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}.")
    backbone, blocks = _backbone(model)
    if not any(_clipping_layers(block) for block in blocks):
        raise ValueError(
            "No MatQuant layer of the model learns clipping, so there is "
            "nothing to calibrate. Matquantize with `learnable_clipping=True`."
        )
    too_wide = [bits for bits in loss_weights if any(
        bits > layer.bits for block in blocks for layer in _clipping_layers(block)
    )]
    if too_wide:
        raise ValueError(
            f"Precisions {too_wide} exceed the layers' code width; calibrate "
            "precisions in 1..bits."
        )

    samples = next(iter(inputs.values())).shape[0]
    with _BlockInputRecorder(blocks[0]) as recorder, precision(None):
        backbone(inputs)
    x, args, kwargs = recorder.calls[0]
    per_sample, constants = _batch_arguments(args, kwargs, samples)
    per_sample = {key: ops.convert_to_numpy(value) for key, value in per_sample.items()}
    count = len(args)
    x_float = ops.convert_to_numpy(x)
    x_by_bits = {bits: x_float for bits in loss_weights}

    trainable_flags = {id(v): v.trainable for v in backbone.weights}
    report = {}
    try:
        for v in backbone.weights:
            v.trainable = False
        for block in blocks:
            target = _block_outputs(block, x_float, per_sample, constants, count, None, batch_size)
            layers = _clipping_layers(block)
            if layers:
                for layer in layers:
                    layer.clip_max_logit.trainable = True
                    layer.clip_min_logit.trainable = True
                calibrator = BlockCalibrator(
                    block,
                    loss_weights,
                    constants,
                    count,
                    co_distillation=co_distillation,
                    stop_teacher_gradient=stop_teacher_gradient,
                )
                calibrator.compile(
                    optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.0)
                )
                data = {"target": target, **per_sample}
                data.update({f"x_{bits}": value for bits, value in x_by_bits.items()})
                history = calibrator.fit(
                    data, batch_size=batch_size, epochs=epochs, verbose=verbose, shuffle=False
                )
                report[block.name] = {
                    name: float(values[-1])
                    for name, values in history.history.items()
                    if name.startswith(("mse_", "distillation_"))
                }
                report[block.name]["first_epoch_loss"] = float(history.history["loss"][0])
                report[block.name]["last_epoch_loss"] = float(history.history["loss"][-1])
                for layer in layers:
                    layer.clip_max_logit.trainable = False
                    layer.clip_min_logit.trainable = False
            x_by_bits = {
                bits: _block_outputs(block, value, per_sample, constants, count, bits, batch_size)
                for bits, value in x_by_bits.items()
            }
            x_float = target
    finally:
        for v in backbone.weights:
            v.trainable = trainable_flags[id(v)]
    return report


