"""Co-distillation configurations: which precision learns from which.

Matryoshka Quantization (arXiv:2502.06786) writes a configuration as a list
of the precisions trained on the labels and of pairs `a->b`, "the int-a
output teaches int-b". It reports `[8, 4, 8->2]` (int2 learns only from
int8), `[8, 4, 2, 8->2]` (int2 learns from the labels and from int8) and
`[8, 4, 2, 8->4;2]` (int8 teaches int4 and int2). The configuration does
not fix the loss: QAT compares logits and block-wise calibration compares
block outputs, so both can parse the same strings here.
"""

import dataclasses
import re
from typing import NamedTuple

from keras_matquant.quantizers import MAX_BITS
from keras_matquant.quantizers import MIN_BITS

ACCEPTED_FORM = (
    "a bracketed list of precisions trained on the labels and "
    "TEACHER->STUDENT pairs, with ';' between the students of one teacher, "
    "such as '[8, 4, 8->2]', '[8, 4, 2, 8->2]' or '[8, 4, 2, 8->4;2]'"
)
_INTEGER = re.compile(r"[0-9]+")


class DistillationPair(NamedTuple):
    """One distillation term: the `teacher` output is the target of `student`.

    Attributes:
        teacher: int, the precision whose output is the target.
        student: int, the precision trained towards it.
    """

    teacher: int
    student: int


@dataclasses.dataclass(frozen=True)
class CoDistillation:
    """A co-distillation configuration.

    Attributes:
        label_precisions: tuple of int, the precisions trained on the labels,
            in decreasing order.
        pairs: tuple of `DistillationPair`, the distillation terms, sorted
            by decreasing teacher, then decreasing student.

    Raises:
        ValueError: if a precision is outside `1..8` or repeated, a pair
            repeats, a pair's teacher does not have more bits than its
            student, or the configuration has no term at all.

    Example:

    >>> config = parse_co_distillation("[8, 4, 2, 8->4;2]")
    >>> str(config)
    '[8, 4, 2, 8->4;2]'
    >>> config.pairs
    (DistillationPair(teacher=8, student=4), DistillationPair(teacher=8, student=2))
    """

    label_precisions: tuple
    pairs: tuple = ()

    def __post_init__(self):
        labels = tuple(int(bits) for bits in self.label_precisions)
        pairs = tuple(DistillationPair(int(a), int(b)) for a, b in self.pairs)
        for bits in labels + tuple(bits for pair in pairs for bits in pair):
            if not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(
                    f"Co-distillation precision {bits} is outside "
                    f"{MIN_BITS}..{MAX_BITS}. Write {ACCEPTED_FORM}."
                )
        if len(set(labels)) != len(labels):
            raise ValueError(
                f"Co-distillation lists a label precision twice in "
                f"{list(labels)}. Give each precision once; write "
                f"{ACCEPTED_FORM}."
            )
        if len(set(pairs)) != len(pairs):
            raise ValueError(
                "Co-distillation repeats a pair in "
                f"{[f'{a}->{b}' for a, b in pairs]}. Give each pair once."
            )
        for teacher, student in pairs:
            if teacher <= student:
                raise ValueError(
                    f"Invalid co-distillation pair {teacher}->{student}: the "
                    "teacher must have more bits than the student, as in "
                    "8->2."
                )
        if not labels and not pairs:
            raise ValueError(f"Co-distillation has no terms. Write {ACCEPTED_FORM}.")
        object.__setattr__(self, "label_precisions", tuple(sorted(labels, reverse=True)))
        object.__setattr__(self, "pairs", tuple(sorted(pairs, reverse=True)))

    @property
    def precisions(self):
        """Every precision the configuration uses, in decreasing order."""
        used = set(self.label_precisions)
        for pair in self.pairs:
            used.update(pair)
        return tuple(sorted(used, reverse=True))

    @property
    def teachers(self):
        """The precisions whose output teaches another, in decreasing order."""
        return tuple(sorted({pair.teacher for pair in self.pairs}, reverse=True))

    def check_trained(self, trained_precisions):
        """Check the configuration against the set of trained precisions.

        Args:
            trained_precisions: iterable of int, the trained precisions (the
                keys of the loss weights).

        Raises:
            ValueError: if the configuration uses a precision that is not
                trained, or a trained precision has no term: neither a label
                term nor a pair where it is the student.

        Example:

        >>> parse_co_distillation("[8, 4, 8->2]").check_trained([8, 4, 2])
        """
        trained = sorted(set(trained_precisions), reverse=True)
        for bits in self.precisions:
            if bits not in trained:
                raise ValueError(
                    f"Co-distillation '{self}' uses precision {bits}, which "
                    f"is not trained: the loss weights train {trained}. Add "
                    f"{bits} to the loss weights or use only trained "
                    f"precisions; write {ACCEPTED_FORM}."
                )
        students = {pair.student for pair in self.pairs}
        for bits in trained:
            if bits not in self.label_precisions and bits not in students:
                raise ValueError(
                    f"The loss weights train precision {bits}, but "
                    f"co-distillation '{self}' gives it no term. List {bits} "
                    f"as a label precision or as a student, or drop it from "
                    "the loss weights."
                )

    def __str__(self):
        items = [str(bits) for bits in self.label_precisions]
        for teacher in self.teachers:
            students = [str(b) for a, b in self.pairs if a == teacher]
            items.append(f"{teacher}->{';'.join(students)}")
        return f"[{', '.join(items)}]"


def _parse_precision(text, source):
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        raise ValueError(
            f"Invalid co-distillation {source!r}: {text!r} is not a "
            f"precision. Write {ACCEPTED_FORM}."
        )
    return int(text)


def parse_co_distillation(text):
    """Parse a co-distillation configuration as Matryoshka Quantization writes it.

    Args:
        text: str such as `"[8, 4, 8->2]"`, a list of comma-separated
            items. Each item is a precision trained on the labels or a
            `TEACHER->STUDENT` pair, and `8->4;2` is short for the pairs
            `8->4` and `8->2`. The brackets and spaces are optional. A
            `CoDistillation` is returned as is.

    Returns:
        A `CoDistillation`.

    Raises:
        ValueError: if the text does not have that form, or the
            configuration is invalid (see `CoDistillation`). The message
            shows the accepted form.

    Example:

    >>> parse_co_distillation("[8, 4, 8->2]")
    CoDistillation(label_precisions=(8, 4), pairs=(DistillationPair(teacher=8, student=2),))
    """
    if isinstance(text, CoDistillation):
        return text
    if not isinstance(text, str):
        raise ValueError(
            f"Co-distillation must be a string, {ACCEPTED_FORM}. Received: "
            f"{text!r} of type {type(text).__name__}."
        )
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    if not body.strip():
        raise ValueError(
            f"Invalid co-distillation {text!r}: it is empty. Write {ACCEPTED_FORM}."
        )

    labels = []
    pairs = []
    for item in body.split(","):
        teacher, arrow, students = item.partition("->")
        if not arrow:
            labels.append(_parse_precision(item, text))
            continue
        teacher = _parse_precision(teacher, text)
        for student in students.split(";"):
            pairs.append((teacher, _parse_precision(student, text)))
    return CoDistillation(tuple(labels), tuple(pairs))
