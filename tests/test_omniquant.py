"""Block-wise calibration of learnable clipping (OmniQuant style)."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from keras_matquant.training.omniquant import calibrate
from tests.conftest import TINY_CAUSAL_LMS
from tests.conftest import token_batch


def calibrated_setup(family="gemma3"):
    keras.utils.set_random_seed(0)
    causal_lm = TINY_CAUSAL_LMS[family]()
    kmq.matquantize(causal_lm, targets="ffn", learnable_clipping=True)
    x, _, _ = token_batch(batch=8, length=16)
    return causal_lm, x


def snapshot(causal_lm):
    return {v.path: ops.convert_to_numpy(v).copy() for v in causal_lm.backbone.weights}


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_calibration_changes_only_clipping_logits(family):
    causal_lm, x = calibrated_setup(family)
    before = snapshot(causal_lm)
    trainable_before = [v.trainable for v in causal_lm.backbone.weights]
    # The tiny models' block errors are near 1e-8, so their gradients are
    # far below Adam's epsilon: a large rate makes the logit change visible.
    report = calibrate(causal_lm, x, epochs=3, batch_size=4, learning_rate=5e-2, verbose=0)
    after = snapshot(causal_lm)
    changed = [path for path in before if not np.array_equal(before[path], after[path])]
    assert changed
    assert all(path.endswith(("clip_max_logit", "clip_min_logit")) for path in changed)
    assert [v.trainable for v in causal_lm.backbone.weights] == trainable_before
    assert len(report) == 2


def test_each_block_loss_lowers():
    causal_lm, x = calibrated_setup()
    report = calibrate(causal_lm, x, epochs=6, batch_size=4, learning_rate=5e-2, verbose=0)
    for block, row in report.items():
        assert row["last_epoch_loss"] < row["first_epoch_loss"], block
        assert set(row) == {"mse_int8", "mse_int4", "mse_int2", "first_epoch_loss", "last_epoch_loss"}


def test_calibration_lowers_first_block_int2_error():
    from keras_matquant.training.omniquant import _BlockInputRecorder

    causal_lm, x = calibrated_setup()
    block = causal_lm.backbone.transformer_layers[0]
    with _BlockInputRecorder(block) as recorder, kmq.precision(None):
        causal_lm.backbone(x)
    inputs, args, kwargs = recorder.calls[0]

    def int2_error():
        with kmq.precision(None):
            reference = ops.convert_to_numpy(block(inputs, *args, **kwargs))
        with kmq.precision(2):
            result = ops.convert_to_numpy(block(inputs, *args, **kwargs))
        return float(np.mean((result - reference) ** 2))

    before = int2_error()
    calibrate(causal_lm, x, loss_weights={2: 1.0}, epochs=8, learning_rate=5e-2, verbose=0)
    assert int2_error() < before


def test_co_distillation_report_and_logits_only():
    causal_lm, x = calibrated_setup()
    before = snapshot(causal_lm)
    report = calibrate(
        causal_lm, x, co_distillation="[8, 4, 8->2]", epochs=2, learning_rate=5e-2, verbose=0
    )
    after = snapshot(causal_lm)
    changed = [path for path in before if not np.array_equal(before[path], after[path])]
    assert changed
    assert all(path.endswith(("clip_max_logit", "clip_min_logit")) for path in changed)
    for row in report.values():
        assert set(row) == {
            "mse_int8", "mse_int4", "distillation_int8_to_int2", "first_epoch_loss", "last_epoch_loss"
        }


def one_step_logit_change(data, loss_weights, co_distillation=None, stop_teacher_gradient=True):
    """Clipping logit change after one SGD step of a one-layer block."""
    from keras_matquant.training.omniquant import BlockCalibrator

    keras.utils.set_random_seed(3)
    block = kmq.MatQuantDense(5, learnable_clipping=True, clipping_init=0.9)
    block.build((None, 6))
    calibrator = BlockCalibrator(
        block, loss_weights, {}, 0,
        co_distillation=co_distillation and kmq.parse_co_distillation(co_distillation),
        stop_teacher_gradient=stop_teacher_gradient,
    )
    calibrator.compile(optimizer=keras.optimizers.SGD(learning_rate=10.0))
    before = ops.convert_to_numpy(block.clip_max_logit).copy()
    calibrator.fit(data, batch_size=8, epochs=1, verbose=0, shuffle=False)
    return ops.convert_to_numpy(block.clip_max_logit) - before


def test_stop_gradient_trains_student_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6)).astype("float32")
    keras.utils.set_random_seed(3)
    block = kmq.MatQuantDense(5, learnable_clipping=True, clipping_init=0.9)
    block.build((None, 6))
    with kmq.precision(None):
        float_out = ops.convert_to_numpy(block(x))
    with kmq.precision(8):
        int8_out = ops.convert_to_numpy(block(x))

    # With lambda_8 = 0, "[8, 8->2]" leaves one term: MSE(int8 output,
    # int2 output). With a stop-gradient teacher it equals a label term
    # whose target is the int8 output as a constant array.
    distilled = one_step_logit_change(
        {"target": float_out, "x_8": x, "x_2": x}, {8: 0.0, 2: 1.0}, "[8, 8->2]"
    )
    reference = one_step_logit_change({"target": int8_out, "x_2": x}, {2: 1.0})
    assert np.abs(reference).max() > 1e-4
    np.testing.assert_allclose(distilled, reference, rtol=1e-4, atol=1e-7)

    through_teacher = one_step_logit_change(
        {"target": float_out, "x_8": x, "x_2": x}, {8: 0.0, 2: 1.0}, "[8, 8->2]",
        stop_teacher_gradient=False,
    )
    assert np.abs(through_teacher - reference).max() > 0.01 * np.abs(reference).max()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"co_distillation": "[8, 4, 8=>2]"}, r"'\[8, 4, 8->2\]'"),
        ({"co_distillation": "[8, 4, 8->3]"}, "not trained"),
        ({"co_distillation": "[8, 4]"}, "gives it no term"),
        ({"stop_teacher_gradient": "yes"}, "True or False"),
    ],
)
def test_invalid_co_distillation_rejected(options, message):
    causal_lm, x = calibrated_setup()
    before = snapshot(causal_lm)
    with pytest.raises(ValueError, match=message):
        calibrate(causal_lm, x, **options)
    after = snapshot(causal_lm)
    assert all(np.array_equal(before[path], after[path]) for path in before)


def test_without_learnable_clipping_rejected():
    keras.utils.set_random_seed(0)
    causal_lm = TINY_CAUSAL_LMS["gemma3"]()
    kmq.matquantize(causal_lm, targets="ffn")
    x, _, _ = token_batch()
    with pytest.raises(ValueError, match="learnable_clipping=True"):
        calibrate(causal_lm, x)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss_weights": {8: -1.0, 2: 1.0}}, "non-negative"),
        ({"loss_weights": {8: 0.0}}, "positive"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 1.5}, "epochs"),
    ],
)
def test_invalid_options_rejected(options, message):
    causal_lm, x = calibrated_setup()
    before = snapshot(causal_lm)
    with pytest.raises(ValueError, match=message):
        calibrate(causal_lm, x, **options)
    after = snapshot(causal_lm)
    assert all(np.array_equal(before[path], after[path]) for path in before)


def test_model_without_blocks_rejected():
    model = keras.Sequential([keras.Input((4,)), kmq.MatQuantDense(2, learnable_clipping=True)])
    with pytest.raises(ValueError, match="transformer_layers"):
        calibrate(model, {"x": np.ones((2, 4))})
