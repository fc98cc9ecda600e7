"""Zero-shot multiple-choice rows: validation, JSONL files, bundled sets.

A row is `{"context": str, "choices": [str, ...], "label": int}`: the model
scores `delimiter + choice` after `context` for each choice, and `label` is
the index of the correct one.

A partial-scoring row (Winogrande) also has `"continuation": str`. There the
choices fill a blank: the model scores `delimiter + continuation` after
`context + choice`, so every choice is judged by how well the same text
follows it.
"""

import json
import pathlib
from importlib import resources
from typing import NamedTuple

BUNDLED_SETS = ("quartz", "goal_step_wikihow", "physical_intuition", "social_iqa")
MIN_CHOICES = 2
REQUIRED_KEYS = ("context", "choices", "label")


class MultipleChoiceExample(NamedTuple):
    """One multiple-choice question.

    Attributes:
        context: str, the text before each choice.
        choices: tuple of non-empty str, the candidate answers.
        label: int, the index of the correct choice.
        continuation: str or None. When given, the row is partial-scoring:
            each choice completes the context and this text is scored after
            it.
    """

    context: str
    choices: tuple
    label: int
    continuation: str | None = None

    def as_row(self):
        """Return the example as a JSON-ready dict (no `None` continuation)."""
        row = {"context": self.context, "choices": list(self.choices), "label": self.label}
        if self.continuation is not None:
            row["continuation"] = self.continuation
        return row


def parse_example(row, source="row"):
    """Check one multiple-choice row and convert it to an example.

    Args:
        row: dict with `"context"`, `"choices"`, `"label"` and optionally
            `"continuation"`.
        source: str, where the row comes from, used in error messages (for
            example `"quartz.jsonl line 3"`).

    Returns:
        A `MultipleChoiceExample`.

    Raises:
        ValueError: if a key is missing, a value has the wrong type, there
            are fewer than two choices, a choice is empty, or the label is
            not a valid choice index.

    Example:

    >>> parse_example({"context": "2 + 2 =", "choices": ["4", "5"], "label": 0})
    MultipleChoiceExample(context='2 + 2 =', choices=('4', '5'), label=0, continuation=None)
    """
    if not isinstance(row, dict):
        raise ValueError(
            f"{source}: a multiple-choice row must be a JSON object, got "
            f"{type(row).__name__}."
        )
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise ValueError(
            f"{source}: missing key(s) {', '.join(missing)}. A row needs "
            '{"context": str, "choices": [str, ...], "label": int}.'
        )

    context = row["context"]
    if not isinstance(context, str):
        raise ValueError(
            f"{source}: `context` must be a str, got {type(context).__name__}."
        )
    choices = row["choices"]
    if not isinstance(choices, (list, tuple)) or len(choices) < MIN_CHOICES:
        count = len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__
        raise ValueError(
            f"{source}: `choices` must be a list of at least {MIN_CHOICES} "
            f"strings, got {count}. Drop the row or add the missing choices."
        )
    for index, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise ValueError(
                f"{source}: choice {index} is {choice!r}; every choice must be "
                "a non-empty str."
            )
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(
            f"{source}: `label` is {label!r}, but it must be an int index in "
            f"0..{len(choices) - 1} of the correct choice."
        )
    continuation = row.get("continuation")
    if continuation is not None and (
        not isinstance(continuation, str) or not continuation.strip()
    ):
        raise ValueError(
            f"{source}: `continuation` is {continuation!r}; it must be a "
            "non-empty str, or absent for a row that scores its choices."
        )
    return MultipleChoiceExample(context, tuple(choices), label, continuation)


def _check_limit(limit):
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be None or a positive integer. Received: {limit!r}.")


def read_jsonl_rows(path, limit=None):
    """Read the JSON objects of a JSONL file, skipping blank lines.

    Args:
        path: str or `pathlib.Path`.
        limit: optional int, read at most this many rows.

    Returns:
        A list of `(source, row)` pairs, where `source` is `"FILE line N"`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if a line is not valid JSON or `limit` is invalid.

    Example:

    ```python
    rows = read_jsonl_rows("arc_easy_test.jsonl", limit=100)
    ```
    """
    _check_limit(limit)
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            source = f"{path.name} line {number}"
            try:
                rows.append((source, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{source} is not valid JSON: {error.msg}.") from None
            if limit is not None and len(rows) >= limit:
                break
    return rows


def read_multiple_choice_jsonl(path, limit=None):
    """Read multiple-choice rows from a JSONL file.

    Args:
        path: str or `pathlib.Path` of a file with one row per line.
        limit: optional int, read at most this many rows.

    Returns:
        A list of `MultipleChoiceExample`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if a row is invalid (see `parse_example`) or the file
            has no row.

    Example:

    ```python
    examples = read_multiple_choice_jsonl("my_questions.jsonl")
    ```
    """
    examples = [parse_example(row, source) for source, row in read_jsonl_rows(path, limit)]
    if not examples:
        raise ValueError(f"{path} has no multiple-choice row.")
    return examples


def bundled_multiple_choice_path(name):
    """Return the path of a bundled multiple-choice set.

    Args:
        name: str, one of `BUNDLED_SETS`.

    Returns:
        A `pathlib.Path` inside the installed package.

    Raises:
        ValueError: if `name` is not a bundled set.

    Example:

    >>> bundled_multiple_choice_path("quartz").name
    'quartz.jsonl'
    """
    if name not in BUNDLED_SETS:
        raise ValueError(
            f"Unknown bundled multiple-choice set {name!r}. Bundled sets: "
            f"{', '.join(BUNDLED_SETS)}."
        )
    folder = resources.files("keras_matquant.data").joinpath("mc")
    return pathlib.Path(str(folder.joinpath(f"{name}.jsonl")))


def load_bundled_multiple_choice(name, limit=None):
    """Load one of the real multiple-choice sets that ship with the package.

    `keras_matquant/data/mc/SOURCES.md` gives the origin and license of
    each set.

    Args:
        name: str, one of `"quartz"` (2 choices, science, close to ARC),
            `"goal_step_wikihow"` (4 choices, close to HellaSwag),
            `"physical_intuition"` (close to PIQA) and `"social_iqa"`.
        limit: optional int, load at most this many rows (the first ones).

    Returns:
        A list of `MultipleChoiceExample`.

    Raises:
        ValueError: if `name` is not a bundled set.

    Example:

    >>> len(load_bundled_multiple_choice("physical_intuition"))
    81
    """
    return read_multiple_choice_jsonl(bundled_multiple_choice_path(name), limit)
