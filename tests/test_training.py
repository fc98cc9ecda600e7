import keras
import numpy as np
import pytest
from keras import ops

import keras_matquant as kmq
from keras_matquant.training import validate_loss_weights
from tests.conftest import backend_gradient
from tests.conftest import token_batch


def masked_mean_cross_entropy(logits, targets, weights):
    """Independent numpy cross entropy: -log softmax at the target, weighted."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return float(-(picked * weights).sum() / weights.sum())


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype("float32")
    targets = rng.integers(0, 5, size=(2, 3)).astype("int32")
    weights = np.array([[1, 1, 0], [1, 0, 0]], dtype="float32")
    result = float(ops.convert_to_numpy(kmq.masked_cross_entropy(targets, logits, weights)))
    assert result == pytest.approx(masked_mean_cross_entropy(logits, targets, weights), rel=1e-5)


def test_loss_is_weighted_sum_of_precisions(gemma3_lm):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)
    loss_weights = {8: 0.1, 4: 0.3, 2: 1.0}
    trainer = kmq.MatQuantModel(gemma3_lm, loss_weights=loss_weights)
    trainer.compile(optimizer="sgd")

    logs = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)

    expected = {}
    for bits in loss_weights:
        with kmq.precision(bits):
            logits = ops.convert_to_numpy(gemma3_lm(x))
        expected[bits] = masked_mean_cross_entropy(logits, y, weights)
        assert logs[f"loss_int{bits}"] == pytest.approx(expected[bits], rel=1e-4)
    total = sum(loss_weights[bits] * expected[bits] for bits in loss_weights)
    assert logs["loss"] == pytest.approx(total, rel=1e-4)


def test_fit_lowers_summed_loss(gemma3_lm):
    x, y, weights = token_batch(batch=4, length=8)
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm)
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2))

    before = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)
    history = trainer.fit(x, y, sample_weight=weights, batch_size=4, epochs=1, verbose=0)
    after = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)

    assert set(history.history) == {"loss", "loss_int8", "loss_int4", "loss_int2"}
    assert len(history.history["loss_int2"]) == 1
    assert after["loss"] < before["loss"]


def test_fit_updates_master_kernels(gemma3_lm):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)
    count = kmq.train_only_matquant_layers(gemma3_lm)
    layers = kmq.matquant_layers(gemma3_lm)
    assert count == sum(int(np.prod(layer.kernel.shape)) for layer in layers.values())
    embedding = ops.convert_to_numpy(gemma3_lm.backbone.token_embedding.embeddings)
    kernel = ops.convert_to_numpy(layers["decoder_block_0/ffw_linear"].kernel)

    trainer = kmq.MatQuantModel(gemma3_lm)
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
    trainer.fit(x, y, sample_weight=weights, epochs=1, verbose=0)

    new_kernel = ops.convert_to_numpy(layers["decoder_block_0/ffw_linear"].kernel)
    assert not np.array_equal(kernel, new_kernel)
    np.testing.assert_array_equal(
        embedding, ops.convert_to_numpy(gemma3_lm.backbone.token_embedding.embeddings)
    )


def test_gradient_is_sum_of_precision_gradients():
    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.normal(size=(6, 4)).astype("float32"))
    targets = ops.convert_to_tensor(rng.integers(0, 5, size=(6,)).astype("int32"))
    layer = kmq.MatQuantDense(5, use_bias=False)
    layer.build((None, 4))
    kernel = ops.convert_to_numpy(layer.kernel)
    loss_weights = {8: 0.1, 4: 0.1, 2: 1.0}

    def objective(precisions):
        def loss(kernel_value):
            total = 0.0
            for bits in precisions:
                with kmq.precision(bits):
                    logits, _ = layer.stateless_call([kernel_value], [], x)
                total = total + loss_weights[bits] * kmq.masked_cross_entropy(
                    targets, logits
                )
            return total

        return loss

    combined = backend_gradient(objective((8, 4, 2)), kernel)
    separate = sum(backend_gradient(objective((bits,)), kernel) for bits in (8, 4, 2))
    np.testing.assert_allclose(combined, separate, rtol=1e-5, atol=1e-7)
    assert np.abs(combined).max() > 0


def test_model_without_matquant_layers_rejected(gemma3_lm):
    with pytest.raises(ValueError, match="no MatQuant layers.*matquantize"):
        kmq.MatQuantModel(gemma3_lm)


def test_non_model_rejected():
    with pytest.raises(ValueError, match="keras.Model"):
        kmq.MatQuantModel("gemma")


def test_precision_above_layer_bits_rejected(gemma3_lm):
    kmq.matquantize(gemma3_lm, bits=4)
    with pytest.raises(ValueError, match=r"\[8\].*4-bit codes"):
        kmq.MatQuantModel(gemma3_lm, loss_weights={8: 1.0, 2: 1.0})


def test_compile_with_loss_rejected(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm)
    with pytest.raises(ValueError, match="loss_weights"):
        trainer.compile(optimizer="adam", loss="mse")


@pytest.mark.parametrize(
    "loss_weights, message",
    [
        ({}, "dict such as"),
        ([0.1, 1.0], "dict such as"),
        ({9: 1.0}, r"1\.\.8"),
        ({0: 1.0}, r"1\.\.8"),
        ({"int4": 1.0}, "Received key 'int4'"),
        ({8: -0.1, 2: 1.0}, "non-negative"),
        ({8: float("nan")}, "non-negative"),
        ({8: 0.0, 2: 0.0}, "only zero weights"),
        ({8: "heavy"}, "must be a number"),
    ],
)
def test_invalid_loss_weights_rejected(loss_weights, message):
    with pytest.raises(ValueError, match=message):
        validate_loss_weights(loss_weights)


def test_loss_weights_sorted_and_string_keys_accepted():
    assert validate_loss_weights({"2": 1, "8": 0.1}) == {8: 0.1, 2: 1.0}


def test_trainer_config_round_trip(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm, loss_weights={8: 0.2, 2: 1.0})
    config = trainer.get_config()
    assert config["loss_weights"] == {"8": 0.2, "2": 1.0}
    rebuilt = kmq.MatQuantModel.from_config(config)
    assert rebuilt.precisions == (8, 2)
    assert rebuilt.loss_weights_by_bits == {8: 0.2, 2: 1.0}


def test_trainer_save_and_load_round_trip(gemma3_lm, tmp_path):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm, loss_weights={4: 0.5, 2: 1.0})
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
    trainer.fit(x, y, sample_weight=weights, epochs=1, verbose=0)
    path = tmp_path / "trainer.keras"
    trainer.save(path)

    loaded = keras.saving.load_model(path)

    assert isinstance(loaded, kmq.MatQuantModel)
    assert loaded.loss_weights_by_bits == {4: 0.5, 2: 1.0}
    assert sorted(kmq.matquant_layers(loaded.language_model)) == sorted(
        kmq.matquant_layers(gemma3_lm)
    )
    for key, expected in trainer(x).items():
        np.testing.assert_array_equal(
            ops.convert_to_numpy(loaded(x)[key]), ops.convert_to_numpy(expected)
        )


def test_train_only_matquant_layers_requires_matquant(gemma3_lm):
    with pytest.raises(ValueError, match="no MatQuant layers to train"):
        kmq.train_only_matquant_layers(gemma3_lm)


def test_fit_traces_train_step_once(gemma3_lm):
    x, y, weights = token_batch(batch=6, length=8)
    kmq.matquantize(gemma3_lm)
    trace_count = []

    class CountingTrainer(kmq.MatQuantModel):
        def call(self, inputs, training=None):
            trace_count.append(training)
            return super().call(inputs, training=training)

    trainer = CountingTrainer(gemma3_lm)
    trainer.compile(optimizer="sgd")
    trainer.fit(x, y, sample_weight=weights, batch_size=2, epochs=2, verbose=0)

    # JAX and TensorFlow trace the compiled train step once for all six
    # steps (three batches in each of two epochs). PyTorch runs eagerly and
    # calls the model at every step.
    expected = 6 if keras.backend.backend() == "torch" else 1
    assert trace_count.count(True) == expected


def test_fit_without_targets_rejected(gemma3_lm):
    x, _, _ = token_batch()
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm)
    trainer.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="needs targets"):
        trainer.fit(x, verbose=0)


def test_loaded_trainer_keeps_training(gemma3_lm, tmp_path):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm)
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3))
    trainer.fit(x, y, sample_weight=weights, epochs=1, verbose=0)
    path = tmp_path / "trainer.keras"
    trainer.save(path)

    loaded = keras.saving.load_model(path)

    assert isinstance(loaded.optimizer, keras.optimizers.AdamW)
    assert loaded.optimizer.learning_rate.numpy() == pytest.approx(1e-3)
    history = loaded.fit(x, y, sample_weight=weights, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_summed_cross_entropy_returns_sum_and_count():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5)).astype("float32")
    targets = rng.integers(0, 5, size=(2, 3)).astype("int32")
    weights = np.array([[1, 0, 1], [1, 1, 0]], dtype="float32")
    from keras_matquant.training import summed_cross_entropy

    total, count = summed_cross_entropy(targets, logits, weights)
    expected_mean = masked_mean_cross_entropy(logits, targets, weights)
    assert float(ops.convert_to_numpy(count)) == 4.0
    assert float(ops.convert_to_numpy(total)) == pytest.approx(4.0 * expected_mean, rel=1e-5)


# ---------------------------------------------------------------------------
# Co-distillation and per-precision gradient accumulation.


def tiny_dense_lm(vocabulary=6, hidden=5):
    """Frozen embedding and one MatQuant output projection: logits = h @ w_hat."""
    keras.utils.set_random_seed(1)
    tokens = keras.Input((None,), dtype="int32")
    embedding = keras.layers.Embedding(vocabulary, hidden, trainable=False, name="embedding")
    head = kmq.MatQuantDense(vocabulary, use_bias=False, name="head")
    return keras.Model(tokens, head(embedding(tokens)))


def dense_batch():
    x = np.array([[0, 3, 5, 1], [2, 2, 4, 0]], dtype="int32")
    y = np.array([[3, 5, 1, 2], [2, 4, 0, 1]], dtype="int32")
    weights = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype="float32")
    return x, y, weights


def reference_kl(teacher, student, weights):
    """KL(teacher || student) per token, masked mean, written with logsumexp."""
    teacher, student, weights = map(ops.convert_to_tensor, (teacher, student, weights))
    log_p = teacher - ops.logsumexp(teacher, axis=-1, keepdims=True)
    log_q = student - ops.logsumexp(student, axis=-1, keepdims=True)
    per_token = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
    return ops.sum(per_token * weights) / ops.sum(weights)


def reference_soft_cross_entropy(teacher, student, weights):
    teacher, student, weights = map(ops.convert_to_tensor, (teacher, student, weights))
    log_p = teacher - ops.logsumexp(teacher, axis=-1, keepdims=True)
    log_q = student - ops.logsumexp(student, axis=-1, keepdims=True)
    per_token = -ops.sum(ops.exp(log_p) * log_q, axis=-1)
    return ops.sum(per_token * weights) / ops.sum(weights)


def sgd_step_gradient(trainer, layer_kernel, x, y, weights):
    """One SGD step at learning rate 1: returns kernel_before - kernel_after."""
    before = ops.convert_to_numpy(layer_kernel)
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))
    trainer.train_on_batch(x, y, sample_weight=weights)
    return before - ops.convert_to_numpy(layer_kernel)


@pytest.mark.parametrize("accumulate", [False, True])
def test_stop_gradient_teacher_trains_only_student(accumulate):
    x, y, weights = dense_batch()
    lm = tiny_dense_lm()
    head = lm.get_layer("head")
    hidden = ops.convert_to_numpy(lm.get_layer("embedding")(x))
    kernel = ops.convert_to_numpy(head.kernel)
    with kmq.precision(8):
        teacher = ops.convert_to_numpy(lm(x))

    def student_only(kernel_value):
        with kmq.precision(2):
            student, _ = head.stateless_call([kernel_value], [], hidden)
        return reference_kl(ops.convert_to_tensor(teacher), student, weights)

    def both_passes(kernel_value):
        with kmq.precision(8):
            teacher_logits, _ = head.stateless_call([kernel_value], [], hidden)
        with kmq.precision(2):
            student, _ = head.stateless_call([kernel_value], [], hidden)
        return reference_kl(teacher_logits, student, weights)

    expected = backend_gradient(student_only, kernel)
    through_teacher = backend_gradient(both_passes, kernel)
    # The int8 pass's gradient is a large part of the joint gradient, so the
    # check below can tell the two apart.
    assert np.abs(expected - through_teacher).max() > 0.1 * np.abs(expected).max()

    trainer = kmq.MatQuantModel(
        lm,
        loss_weights={8: 0.0, 2: 1.0},
        co_distillation="[8, 8->2]",
        accumulate_gradients=accumulate,
    )
    gradient = sgd_step_gradient(trainer, head.kernel, x, y, weights)

    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize(
    "kind, reference",
    [("kl", reference_kl), ("soft_cross_entropy", reference_soft_cross_entropy)],
)
def test_teacher_gradient_option_reaches_both_passes(accumulate, kind, reference):
    x, y, weights = dense_batch()
    lm = tiny_dense_lm()
    head = lm.get_layer("head")
    hidden = ops.convert_to_numpy(lm.get_layer("embedding")(x))
    kernel = ops.convert_to_numpy(head.kernel)

    def both_passes(kernel_value):
        with kmq.precision(8):
            teacher, _ = head.stateless_call([kernel_value], [], hidden)
        with kmq.precision(2):
            student, _ = head.stateless_call([kernel_value], [], hidden)
        return 0.5 * reference(teacher, student, weights)

    expected = backend_gradient(both_passes, kernel)
    trainer = kmq.MatQuantModel(
        lm,
        loss_weights={8: 0.0, 2: 0.5},
        co_distillation="[8, 8->2]",
        distillation_loss=kind,
        stop_teacher_gradient=False,
        accumulate_gradients=accumulate,
    )
    assert trainer.gradient_groups == ((8, 2),)
    gradient = sgd_step_gradient(trainer, head.kernel, x, y, weights)

    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6)


def test_co_distillation_loss_matches_reference(gemma3_lm):
    x, y, weights = token_batch()
    weights[1, 5:] = 0.0
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(
        gemma3_lm, loss_weights="mistral_qat", co_distillation="[8, 4, 2, 8->4;2]"
    )
    trainer.compile(optimizer="sgd")

    logs = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)

    logits = {}
    for bits in (8, 4, 2):
        with kmq.precision(bits):
            logits[bits] = ops.convert_to_numpy(gemma3_lm(x))
    cross_entropy = {
        bits: masked_mean_cross_entropy(logits[bits], y, weights) for bits in logits
    }
    distillation = {
        bits: float(ops.convert_to_numpy(reference_kl(logits[8], logits[bits], weights)))
        for bits in (4, 2)
    }
    expected = (
        0.2 * cross_entropy[8]
        + 0.2 * (cross_entropy[4] + distillation[4])
        + 1.0 * (cross_entropy[2] + distillation[2])
    )
    assert logs["distillation_int8_to_int4"] == pytest.approx(distillation[4], rel=1e-4)
    assert logs["distillation_int8_to_int2"] == pytest.approx(distillation[2], rel=1e-4)
    assert logs["loss_int2"] == pytest.approx(cross_entropy[2], rel=1e-4)
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)


def test_student_only_precision_has_no_label_term(gemma3_lm):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm, co_distillation="[8, 4, 8->2]")
    trainer.compile(optimizer="sgd")

    logs = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)

    expected = (
        0.1 * logs["loss_int8"]
        + 0.1 * logs["loss_int4"]
        + 1.0 * logs["distillation_int8_to_int2"]
    )
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)
    assert logs["loss_int2"] > 0.0


def add_regularizers(causal_lm):
    """An L2 weight penalty on one MatQuant kernel and an L2 activity penalty.

    The activity penalty sits on block 0's pre-FFN norm, whose output comes
    before any MatQuant layer, so it is the same at every precision.
    """
    layers = {path: layer for path, _, layer in kmq.iter_layers(causal_lm)}
    layers["decoder_block_0/ffw_linear"].kernel.regularizer = keras.regularizers.L2(0.05)
    layers["decoder_block_0/pre_ffw_norm"].activity_regularizer = keras.regularizers.L2(0.01)


@pytest.mark.parametrize(
    "co_distillation, stop_teacher_gradient, groups",
    [
        (None, True, ((8,), (4,), (2,))),
        ("[8, 4, 2, 8->4;2]", True, ((8,), (4,), (2,))),
        ("[8, 4, 8->2]", False, ((8, 2), (4,))),
    ],
)
def test_accumulated_gradient_equals_plain(
    gemma3_lm, co_distillation, stop_teacher_gradient, groups
):
    x, y, weights = token_batch()
    weights[0, 6:] = 0.0
    kmq.matquantize(gemma3_lm)
    add_regularizers(gemma3_lm)
    start = [ops.convert_to_numpy(v) for v in gemma3_lm.weights]
    deltas = {}
    logs = {}
    for accumulate in (False, True):
        gemma3_lm.set_weights(start)
        trainer = kmq.MatQuantModel(
            gemma3_lm,
            co_distillation=co_distillation,
            stop_teacher_gradient=stop_teacher_gradient,
            accumulate_gradients=accumulate,
        )
        assert trainer.gradient_groups == groups
        trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))
        logs[accumulate] = trainer.train_on_batch(
            x, y, sample_weight=weights, return_dict=True
        )
        deltas[accumulate] = [
            before - ops.convert_to_numpy(v) for before, v in zip(start, gemma3_lm.weights)
        ]

    for name in logs[False]:
        assert logs[True][name] == pytest.approx(logs[False][name], rel=1e-5)
    changed = 0
    for plain, accumulated in zip(deltas[False], deltas[True]):
        np.testing.assert_allclose(accumulated, plain, rtol=1e-4, atol=2e-6)
        changed += int(np.abs(plain).max() > 1e-4)
    # Embeddings, norms, attention and FFN kernels all received gradients.
    assert changed > 10


def test_penalties_counted_once_per_pass(gemma3_lm):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)

    def evaluate_loss(loss_weights):
        trainer = kmq.MatQuantModel(gemma3_lm, loss_weights=loss_weights)
        trainer.compile(optimizer="sgd")
        logs = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)
        return logs["loss"]

    one_pass = {8: 1.0}
    three_passes = {8: 0.1, 4: 0.1, 2: 1.0}
    plain_one = evaluate_loss(one_pass)
    plain_three = evaluate_loss(three_passes)
    add_regularizers(gemma3_lm)
    penalised_one = evaluate_loss(one_pass)
    penalised_three = evaluate_loss(three_passes)

    kernel = kmq.matquant_layers(gemma3_lm)["decoder_block_0/ffw_linear"].kernel
    weight_penalty = 0.05 * float(np.sum(ops.convert_to_numpy(kernel).astype(np.float64) ** 2))
    activity_penalty = penalised_one - plain_one - weight_penalty
    assert activity_penalty > 1e-3
    # The weight penalty counts once per step, the activity penalty once for
    # each of the three precision passes.
    assert penalised_three - plain_three == pytest.approx(
        weight_penalty + 3 * activity_penalty, rel=1e-3
    )


def test_accumulated_fit_reports_every_metric(gemma3_lm):
    x, y, weights = token_batch(batch=4)
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(
        gemma3_lm, co_distillation="[8, 4, 2, 8->2]", accumulate_gradients=True
    )
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2))
    before = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)

    history = trainer.fit(x, y, sample_weight=weights, batch_size=2, epochs=2, verbose=0)

    after = trainer.evaluate(x, y, sample_weight=weights, return_dict=True, verbose=0)
    assert set(history.history) == {
        "loss", "loss_int8", "loss_int4", "loss_int2", "distillation_int8_to_int2"
    }
    assert len(history.history["loss"]) == 2
    assert after["loss"] < before["loss"]


@pytest.mark.parametrize(
    "precisions, pairs, stop, expected",
    [
        ((8, 4, 2), [], True, ((8,), (4,), (2,))),
        ((8, 4, 2), [(8, 2)], True, ((8,), (4,), (2,))),
        ((8, 4, 2), [(8, 2)], False, ((8, 2), (4,))),
        ((8, 4, 2), [(8, 4), (8, 2)], False, ((8, 4, 2),)),
        ((8, 6, 4, 2), [(6, 2), (8, 4)], False, ((8, 4), (6, 2))),
        ((8, 4, 3, 2), [(4, 3), (3, 2)], False, ((8,), (4, 3, 2))),
    ],
)
def test_gradient_groups(precisions, pairs, stop, expected):
    from keras_matquant.training.gradient_accumulation import gradient_groups

    assert gradient_groups(precisions, pairs, stop) == expected


def test_untrained_distillation_precision_rejected(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    with pytest.raises(ValueError, match=r"uses precision 3, which is not trained.*\[8, 4, 8->2\]"):
        kmq.MatQuantModel(gemma3_lm, co_distillation="[8, 4, 2, 8->3]")


def test_unknown_co_distillation_string_rejected(gemma3_lm):
    kmq.matquantize(gemma3_lm)
    with pytest.raises(ValueError, match=r"'int8 teaches int2' is not a precision.*\[8, 4, 8->2\]"):
        kmq.MatQuantModel(gemma3_lm, co_distillation="int8 teaches int2")


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"distillation_loss": "mse"}, ValueError, "'kl', 'soft_cross_entropy'"),
        ({"stop_teacher_gradient": "yes"}, TypeError, "stop_teacher_gradient"),
        ({"accumulate_gradients": 1}, TypeError, "accumulate_gradients"),
        ({"loss_weights": "llama"}, ValueError, "'gemma', 'mistral_qat'"),
        (
            {"loss_weights": {8: -1.0, 2: 1.0}},
            ValueError,
            r"non-negative number.*Write the weights as a dict such as \{8: 0.1, 4: 0.1, 2: 1.0\}",
        ),
        (
            {"loss_weights": {8: 0.0, 2: 0.0}},
            ValueError,
            r"only zero weights.*Write the weights as a dict such as \{8: 0.1, 4: 0.1, 2: 1.0\}",
        ),
    ],
)
def test_invalid_trainer_options_rejected(gemma3_lm, arguments, error, message):
    kmq.matquantize(gemma3_lm)
    with pytest.raises(error, match=message):
        kmq.MatQuantModel(gemma3_lm, **arguments)


def test_co_distillation_config_round_trip(gemma3_lm, tmp_path):
    x, y, weights = token_batch()
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(
        gemma3_lm,
        loss_weights="uniform",
        co_distillation="8->4;2, 8, 4",
        distillation_loss="soft_cross_entropy",
        stop_teacher_gradient=False,
        accumulate_gradients=True,
    )
    config = trainer.get_config()
    assert config["co_distillation"] == "[8, 4, 8->4;2]"
    assert config["loss_weights"] == {"8": 1.0, "4": 1.0, "2": 1.0}
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
    trainer.fit(x, y, sample_weight=weights, epochs=1, verbose=0)
    path = tmp_path / "trainer.keras"
    trainer.save(path)

    loaded = keras.saving.load_model(path)

    loaded_config = loaded.get_config()
    for key in (
        "co_distillation",
        "distillation_loss",
        "stop_teacher_gradient",
        "accumulate_gradients",
        "loss_weights",
    ):
        assert loaded_config[key] == config[key]
    assert loaded.gradient_groups == ((8, 4, 2),)
    for key, expected in trainer(x).items():
        np.testing.assert_array_equal(
            ops.convert_to_numpy(loaded(x)[key]), ops.convert_to_numpy(expected)
        )
