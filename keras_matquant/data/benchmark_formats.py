"""Readers for the row formats of standard zero-shot benchmarks.

Each reader turns one row of a published benchmark file into a
`MultipleChoiceExample` with the prompt that lm-eval (EleutherAI's
evaluation harness, v0.4) uses for that task, so accuracies are comparable
with published zero-shot numbers:

- `"arc"` (ARC-Easy and ARC-Challenge): `Question: {question}\\nAnswer:`,
  choices are the answer texts, the label is the position of `answerKey`.
  Reads the Hugging Face rows (`choices: {"text": [...], "label": [...]}`)
  and the original AI2 rows (`question: {"stem", "choices": [{"text",
  "label"}]}`).
- `"hellaswag"`: `{activity_label}: {ctx_a} {Ctx_b}` with the wikiHow
  `[title]` and `[step]`-style markers removed; choices are the endings.
- `"piqa"`: `Question: {goal}\\nAnswer:`, choices `sol1` and `sol2`.
- `"boolq"`: `{passage}\\nQuestion: {question}?\\nAnswer:`, choices
  `no` and `yes`. Reads SuperGLUE rows (`label` 0/1) and the original rows
  (`answer` false/true).
- `"winogrande"`: partial scoring. The context is the sentence up to the
  blank `_`, the choices are `option1` and `option2`, and the continuation
  is the rest of the sentence after the blank.
"""

import re

from keras_matquant.data.multiple_choice import parse_example
from keras_matquant.data.multiple_choice import read_jsonl_rows


def _require(row, keys, source, format_name):
    if not isinstance(row, dict):
        raise ValueError(
            f"{source}: each {format_name} row must be a JSON object, got "
            f"{type(row).__name__}."
        )
    missing = [key for key in keys if key not in row]
    if missing:
        raise ValueError(
            f"{source}: missing key(s) {', '.join(missing)}; this {format_name} "
            f"row needs {', '.join(keys)}. Check that the file is in the "
            f"{format_name} format."
        )


def _arc_row(row, source):
    _require(row, ("question", "answerKey"), source, "ARC")
    question = row["question"]
    if isinstance(question, dict):
        # Original AI2 release: the choices sit inside the question.
        _require(question, ("stem", "choices"), source + " question", "ARC")
        texts = [choice["text"] for choice in question["choices"]]
        letters = [choice["label"] for choice in question["choices"]]
        question = question["stem"]
    else:
        _require(row, ("question", "choices", "answerKey"), source, "ARC")
        choices = row["choices"]
        if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
            raise ValueError(
                f"{source}: ARC `choices` must be {{'text': [...], 'label': [...]}}."
            )
        texts, letters = list(choices["text"]), list(choices["label"])
    answer = row["answerKey"]
    if answer not in letters:
        raise ValueError(
            f"{source}: answerKey {answer!r} is not one of the choice labels "
            f"{letters}."
        )
    return {
        "context": f"Question: {question}\nAnswer:",
        "choices": texts,
        "label": letters.index(answer),
    }


def _clean_hellaswag(text):
    # The wikiHow part of HellaSwag keeps markup such as "[title]" and
    # "[step]"; lm-eval's cleaning turns " [title]" into ". " and drops the
    # other bracketed markers.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_row(row, source):
    _require(
        row, ("activity_label", "ctx_a", "ctx_b", "endings", "label"), source, "HellaSwag"
    )
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    label = row["label"]
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    return {
        "context": _clean_hellaswag(row["activity_label"] + ": " + context),
        "choices": [_clean_hellaswag(ending) for ending in row["endings"]],
        "label": label,
    }


def _piqa_row(row, source):
    if isinstance(row, dict) and "goal" in row and "label" not in row:
        raise ValueError(
            f"{source}: the PIQA row has no `label`. The original release "
            "keeps labels in a separate *-labels.lst file; add each line's "
            "label to its row as `\"label\": 0` or `1`."
        )
    _require(row, ("goal", "sol1", "sol2", "label"), source, "PIQA")
    return {
        "context": f"Question: {row['goal']}\nAnswer:",
        "choices": [row["sol1"], row["sol2"]],
        "label": row["label"],
    }


def _boolq_row(row, source):
    answer_key = "label" if isinstance(row, dict) and "label" in row else "answer"
    _require(row, ("passage", "question", answer_key), source, "BoolQ")
    answer = row[answer_key]
    if answer_key == "answer":
        if not isinstance(answer, bool):
            raise ValueError(
                f"{source}: BoolQ `answer` must be true or false, got {answer!r}."
            )
        answer = int(answer)
    return {
        "context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
        "choices": ["no", "yes"],
        "label": answer,
    }


def _winogrande_row(row, source):
    _require(row, ("sentence", "option1", "option2", "answer"), source, "Winogrande")
    sentence = row["sentence"]
    if sentence.count("_") != 1:
        raise ValueError(
            f"{source}: a Winogrande sentence must contain exactly one blank "
            f"'_', found {sentence.count('_')}."
        )
    answer = str(row["answer"]).strip()
    if answer not in ("1", "2"):
        raise ValueError(
            f"{source}: Winogrande `answer` is {row['answer']!r}; it must be "
            "'1' or '2'. Test-split rows have no answer and cannot be scored."
        )
    blank = sentence.index("_")
    return {
        "context": sentence[:blank],
        "choices": [row["option1"], row["option2"]],
        "label": int(answer) - 1,
        "continuation": sentence[blank + 1 :].strip(),
    }


BENCHMARK_FORMATS = {
    "arc": _arc_row,
    "hellaswag": _hellaswag_row,
    "piqa": _piqa_row,
    "boolq": _boolq_row,
    "winogrande": _winogrande_row,
}


def _check_format(format_name):
    if format_name not in BENCHMARK_FORMATS:
        raise ValueError(
            f"Unknown benchmark format {format_name!r}. Known formats: "
            f"{', '.join(BENCHMARK_FORMATS)}."
        )


def convert_benchmark_row(row, format_name, source="row"):
    """Convert one row of a standard benchmark into a multiple-choice example.

    Args:
        row: dict, one row as the benchmark's JSONL file or Hugging Face
            dataset has it.
        format_name: str, one of `"arc"`, `"hellaswag"`, `"piqa"`,
            `"boolq"`, `"winogrande"`.
        source: str, where the row comes from, used in error messages.

    Returns:
        A `MultipleChoiceExample`.

    Raises:
        ValueError: if `format_name` is unknown or the row does not fit the
            format.

    Example:

    >>> convert_benchmark_row(
    ...     {"goal": "Dry hair", "sol1": "towel", "sol2": "oven", "label": 0},
    ...     "piqa",
    ... ).context
    'Question: Dry hair\\nAnswer:'
    """
    _check_format(format_name)
    return parse_example(BENCHMARK_FORMATS[format_name](row, source), source)


def convert_benchmark_rows(rows, format_name):
    """Convert rows of a standard benchmark into multiple-choice examples.

    Args:
        rows: iterable of dicts, for example a Hugging Face `Dataset`.
        format_name: str, one of `"arc"`, `"hellaswag"`, `"piqa"`,
            `"boolq"`, `"winogrande"`.

    Returns:
        A list of `MultipleChoiceExample`.

    Raises:
        ValueError: if `format_name` is unknown or a row does not fit it.

    Example:

    ```python
    examples = convert_benchmark_rows(hf_dataset["validation"], "boolq")
    ```
    """
    _check_format(format_name)
    return [
        convert_benchmark_row(row, format_name, source=f"{format_name} row {index}")
        for index, row in enumerate(rows)
    ]


def read_benchmark_jsonl(path, format_name, limit=None):
    """Read a standard benchmark's JSONL file as multiple-choice examples.

    Args:
        path: str or `pathlib.Path`.
        format_name: str, one of `"arc"`, `"hellaswag"`, `"piqa"`,
            `"boolq"`, `"winogrande"`.
        limit: optional int, read at most this many rows.

    Returns:
        A list of `MultipleChoiceExample`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if `format_name` is unknown, a row does not fit the
            format, or the file has no row.

    Example:

    ```python
    examples = read_benchmark_jsonl("winogrande_1.1/dev.jsonl", "winogrande")
    ```
    """
    _check_format(format_name)
    examples = [
        convert_benchmark_row(row, format_name, source)
        for source, row in read_jsonl_rows(path, limit)
    ]
    if not examples:
        raise ValueError(f"{path} has no {format_name} row.")
    return examples
