import numpy as np
import pytest
from keras import ops

from keras_matquant.training import CoDistillation
from keras_matquant.training import DistillationPair
from keras_matquant.training import masked_distillation_loss
from keras_matquant.training import parse_co_distillation

ACCEPTED = r"such as '\[8, 4, 8->2\]'"


@pytest.mark.parametrize(
    "text, labels, pairs",
    [
        ("[8, 4, 8->2]", (8, 4), ((8, 2),)),
        ("[8, 4, 2, 8->2]", (8, 4, 2), ((8, 2),)),
        ("[8, 4, 2, 8->4;2]", (8, 4, 2), ((8, 4), (8, 2))),
        ("[8, 4, 2]", (8, 4, 2), ()),
        ("8,4,8->2", (8, 4), ((8, 2),)),
        (" [ 2 , 8 -> 2 ; 4 , 4 ] ", (4, 2), ((8, 4), (8, 2))),
        ("[8, 4->2, 8->2]", (8,), ((8, 2), (4, 2))),
    ],
)
def test_parse_reference_forms(text, labels, pairs):
    config = parse_co_distillation(text)
    assert config.label_precisions == labels
    assert config.pairs == tuple(DistillationPair(a, b) for a, b in pairs)


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("[8, 4, 8->2]", "[8, 4, 8->2]"),
        ("[8, 4, 2, 8->4;2]", "[8, 4, 2, 8->4;2]"),
        ("2,4,8,8->2,8->4", "[8, 4, 2, 8->4;2]"),
        ("[8, 4->2, 8->2]", "[8, 8->2, 4->2]"),
    ],
)
def test_canonical_string_round_trip(text, canonical):
    config = parse_co_distillation(text)
    assert str(config) == canonical
    assert parse_co_distillation(str(config)) == config


def test_precisions_and_teachers():
    config = parse_co_distillation("[8, 4, 2, 8->4;2, 4->2]")
    assert config.precisions == (8, 4, 2)
    assert config.teachers == (8, 4)


def test_parsed_object_passes_through():
    config = CoDistillation((8, 2), ((8, 2),))
    assert parse_co_distillation(config) is config


@pytest.mark.parametrize(
    "text, message",
    [
        ("distill", "'distill' is not a precision"),
        ("[8, 4, 8=>2]", "'8=>2' is not a precision"),
        ("[8, 4, 8->4->2]", "'4->2' is not a precision"),
        ("[8, 4, 8->]", "'' is not a precision"),
        ("[8.0, 4]", "'8.0' is not a precision"),
        ("[]", "it is empty"),
        ("", "it is empty"),
        ("[8, 9]", r"precision 9 is outside 1\.\.8"),
        ("[8, 0->2]", r"precision 0 is outside 1\.\.8"),
        ("[8, 4, 4]", "label precision twice"),
        ("[8, 8->2, 8->2]", "repeats a pair"),
        ("[8, 2->8]", "teacher must have more bits"),
        ("[8, 4->4]", "teacher must have more bits"),
    ],
)
def test_invalid_strings_show_accepted_form(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_co_distillation(text)
    if "teacher" not in message and "repeats" not in message:
        assert "'[8, 4, 2, 8->4;2]'" in str(error.value)


def test_non_string_rejected_with_form():
    with pytest.raises(ValueError, match=ACCEPTED):
        parse_co_distillation([8, 4, (8, 2)])


def test_untrained_pair_precision_rejected():
    config = parse_co_distillation("[8, 4, 2, 8->3]")
    with pytest.raises(ValueError, match=r"uses precision 3, which is not trained") as error:
        config.check_trained([8, 4, 2])
    assert "[8, 4, 2]" in str(error.value)
    assert "'[8, 4, 8->2]'" in str(error.value)


def test_untrained_teacher_rejected():
    config = parse_co_distillation("[4, 2, 8->2]")
    with pytest.raises(ValueError, match="uses precision 8, which is not trained"):
        config.check_trained([4, 2])


def test_trained_precision_without_term_rejected():
    config = parse_co_distillation("[8, 4]")
    with pytest.raises(ValueError, match="precision 2, but co-distillation '\\[8, 4\\]' gives it no term"):
        config.check_trained([8, 4, 2])


def test_student_only_precision_accepted():
    parse_co_distillation("[8, 4, 8->2]").check_trained([8, 4, 2])


def numpy_distillation(teacher, student, weights):
    """Independent float64 KL and soft cross entropy, masked mean per token."""

    def log_softmax(logits):
        logits = np.asarray(logits, dtype=np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    log_p = log_softmax(teacher)
    log_q = log_softmax(student)
    p = np.exp(log_p)
    kl = (p * (log_p - log_q)).sum(-1)
    soft = -(p * log_q).sum(-1)
    count = weights.sum()
    return (kl * weights).sum() / count, (soft * weights).sum() / count


def test_distillation_loss_matches_numpy():
    rng = np.random.default_rng(3)
    teacher = rng.normal(size=(2, 3, 6)).astype("float32")
    student = rng.normal(size=(2, 3, 6)).astype("float32")
    weights = np.array([[1, 1, 0], [1, 0, 0]], dtype="float32")
    kl, soft = numpy_distillation(teacher, student, weights)

    result_kl = ops.convert_to_numpy(masked_distillation_loss(teacher, student, weights))
    result_soft = ops.convert_to_numpy(
        masked_distillation_loss(teacher, student, weights, kind="soft_cross_entropy")
    )
    assert float(result_kl) == pytest.approx(kl, rel=1e-5)
    assert float(result_soft) == pytest.approx(soft, rel=1e-5)


def test_distillation_loss_hand_values():
    # Two classes: teacher probabilities (0.5, 0.5), student (1/(1+e), e/(1+e)).
    teacher = np.zeros((1, 1, 2), dtype="float32")
    student = np.array([[[0.0, 1.0]]], dtype="float32")
    log_q0 = -np.log1p(np.e)
    log_q1 = 1.0 - np.log1p(np.e)
    soft = -0.5 * (log_q0 + log_q1)
    kl = soft + np.log(0.5)

    result_kl = masked_distillation_loss(teacher, student)
    result_soft = masked_distillation_loss(teacher, student, kind="soft_cross_entropy")
    assert float(ops.convert_to_numpy(result_kl)) == pytest.approx(kl, rel=1e-6)
    assert float(ops.convert_to_numpy(result_soft)) == pytest.approx(soft, rel=1e-6)


def test_distillation_loss_zero_for_equal_logits():
    logits = np.random.default_rng(0).normal(size=(2, 4, 5)).astype("float32")
    result = masked_distillation_loss(logits, logits)
    assert abs(float(ops.convert_to_numpy(result))) < 1e-6


def test_distillation_loss_unknown_kind_rejected():
    logits = np.zeros((1, 1, 2), dtype="float32")
    with pytest.raises(ValueError, match="'kl', 'soft_cross_entropy'"):
        masked_distillation_loss(logits, logits, kind="mse")
