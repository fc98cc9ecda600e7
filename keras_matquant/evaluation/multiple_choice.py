"""Zero-shot multiple-choice accuracy by log-likelihood at a precision or plan."""

from typing import NamedTuple

import numpy as np

from keras_matquant.data.multiple_choice import MultipleChoiceExample
from keras_matquant.data.multiple_choice import parse_example
from keras_matquant.evaluation.loglikelihood import score_continuations
from keras_matquant.evaluation.scoring import DEFAULT_BITS
from keras_matquant.evaluation.scoring import check_precision_or_plan

# lm-eval's default `target_delimiter`: the text between a context and the
# scored choice.
DEFAULT_DELIMITER = " "


class MultipleChoiceResult(NamedTuple):
    """Accuracy of a model on a multiple-choice set.

    Attributes:
        acc: float, the fraction of examples whose correct choice has the
            highest log-likelihood.
        acc_norm: float, the same with each log-likelihood divided by the
            length of its choice in characters (lm-eval's `acc_norm`).
        acc_bytes: float, the same with the length in UTF-8 bytes (lm-eval's
            `acc_bytes`).
        num_examples: int.
        log_likelihoods: list of float arrays, one per example, the
            log-likelihood of each choice in nats.
    """

    acc: float
    acc_norm: float
    acc_bytes: float
    num_examples: int
    log_likelihoods: list


def example_requests(example, delimiter=DEFAULT_DELIMITER):
    """List the `(context, continuation)` pairs that score an example.

    A plain row scores `delimiter + choice` after the context. A
    partial-scoring row (with a `continuation`) scores
    `delimiter + continuation` after `context + choice`, as lm-eval does for
    Winogrande.

    Args:
        example: a `MultipleChoiceExample`.
        delimiter: str put between the context and the scored text.

    Returns:
        A list of `(context, continuation)` str pairs, one per choice.

    Example:

    >>> example_requests(MultipleChoiceExample("2 + 2 =", ("4", "5"), 0))
    [('2 + 2 =', ' 4'), ('2 + 2 =', ' 5')]
    """
    if example.continuation is None:
        return [(example.context, delimiter + choice) for choice in example.choices]
    return [
        (example.context + choice, delimiter + example.continuation)
        for choice in example.choices
    ]


def choice_accuracy(log_likelihoods, choice_lengths, label):
    """Score one example: whether the argmax choice is the label.

    Ties go to the first choice, as with `numpy.argmax`.

    Args:
        log_likelihoods: sequence of float, one per choice.
        choice_lengths: sequence of positive numbers, one per choice, the
            lengths to divide by for the normalised accuracy.
        label: int, the index of the correct choice.

    Returns:
        A pair of floats `(correct, correct_normalised)`, each 0.0 or 1.0.

    Example:

    >>> choice_accuracy([-4.0, -6.0], [2, 6], 1)
    (0.0, 1.0)
    """
    log_likelihoods = np.asarray(log_likelihoods, dtype="float64")
    lengths = np.asarray(choice_lengths, dtype="float64")
    correct = float(np.argmax(log_likelihoods) == label)
    correct_normalised = float(np.argmax(log_likelihoods / lengths) == label)
    return correct, correct_normalised


def evaluate_multiple_choice(
    model,
    tokenizer,
    examples,
    bits=DEFAULT_BITS,
    batch_size=8,
    delimiter=DEFAULT_DELIMITER,
    add_bos=True,
    max_length=None,
    verbose=True,
    plan=None,
):
    """Compute zero-shot multiple-choice accuracy at precision `bits` or a plan.

    Every choice of every example is scored by the log-likelihood of its
    continuation tokens given the context tokens (see
    `keras_matquant.evaluation.loglikelihood` for the tokenization and the
    start token). `acc` counts the examples whose correct choice has the
    highest log-likelihood. `acc_norm` and `acc_bytes` divide each
    log-likelihood by the choice's length in characters and in UTF-8 bytes
    before the argmax, as lm-eval does. In a partial-scoring row every
    choice scores the same continuation, so the lengths are those of the
    continuation and `acc_norm` equals `acc` there.

    Args:
        model: a causal LM `keras.Model` that maps
            `{"token_ids", "padding_mask"}` to logits.
        tokenizer: the model's KerasHub tokenizer.
        examples: list of `MultipleChoiceExample` or of row dicts
            `{"context", "choices", "label"}`.
        bits: int in `1..8`, the precision, or None for the float master
            weights. Defaults to 8. Leave it at its default (or None) when
            `plan` is given.
        batch_size: int >= 1, scored choices per forward pass.
        delimiter: str put between the context and the scored text.
            Defaults to `" "`, lm-eval's default.
        add_bos: bool, whether to put the start token before each context.
        max_length: optional int, the maximum number of input positions.
        verbose: bool, whether to log the precision or plan and show a
            progress bar.
        plan: optional dict `{layer_path: bits}` (Mix'n'Match) in place of
            `bits`; see `keras_matquant.evaluation.sequence_scorer` for the
            layers it does not name.

    Returns:
        A `MultipleChoiceResult(acc, acc_norm, acc_bytes, num_examples,
        log_likelihoods)`.

    Raises:
        ValueError: if `examples` is empty, a row is invalid (see
            `keras_matquant.data.parse_example`), both an explicit `bits`
            and `plan` are given, or another argument is invalid.

    Example:

    ```python
    from keras_matquant.data import load_bundled_multiple_choice

    tokenizer = causal_lm.preprocessor.tokenizer
    examples = load_bundled_multiple_choice("quartz", limit=200)
    evaluate_multiple_choice(causal_lm, tokenizer, examples, bits=4).acc
    plan = {"decoder_block_0/ffw_gating": 2}
    evaluate_multiple_choice(causal_lm, tokenizer, examples, plan=plan).acc
    ```
    """
    bits, plan = check_precision_or_plan(model, bits, plan)
    if not isinstance(delimiter, str):
        raise ValueError(
            f"`delimiter` must be a str such as ' '. Received: {delimiter!r}."
        )
    examples = [
        example if isinstance(example, MultipleChoiceExample)
        else parse_example(example, source=f"example {index}")
        for index, example in enumerate(examples)
    ]
    if not examples:
        raise ValueError(
            "`examples` is empty. Pass at least one multiple-choice example."
        )

    pairs, owners = [], []
    for index, example in enumerate(examples):
        for pair in example_requests(example, delimiter):
            pairs.append(pair)
            owners.append(index)
    scores = score_continuations(
        model,
        tokenizer,
        pairs,
        bits=bits,
        batch_size=batch_size,
        add_bos=add_bos,
        max_length=max_length,
        verbose=verbose,
        plan=plan,
    )

    per_example = [[] for _ in examples]
    for owner, score in zip(owners, scores):
        per_example[owner].append(score.log_likelihood)

    correct = correct_norm = correct_bytes = 0.0
    for example, log_likelihoods in zip(examples, per_example):
        if example.continuation is None:
            texts = example.choices
        else:
            texts = [example.continuation] * len(example.choices)
        characters = [len(text) for text in texts]
        utf8_bytes = [len(text.encode("utf-8")) for text in texts]
        hit, hit_norm = choice_accuracy(log_likelihoods, characters, example.label)
        _, hit_bytes = choice_accuracy(log_likelihoods, utf8_bytes, example.label)
        correct += hit
        correct_norm += hit_norm
        correct_bytes += hit_bytes

    count = len(examples)
    return MultipleChoiceResult(
        acc=correct / count,
        acc_norm=correct_norm / count,
        acc_bytes=correct_bytes / count,
        num_examples=count,
        log_likelihoods=[np.asarray(values) for values in per_example],
    )
