import numpy as np
import pytest

from keras_matquant.data import load_bundled_paragraphs
from keras_matquant.data import pack_token_sequences


def test_pack_hand_example():
    data = pack_token_sequences([[5, 6, 7], [8, 9]], 2, bos_id=2)
    np.testing.assert_array_equal(data.x["token_ids"], [[2, 5], [2, 7]])
    np.testing.assert_array_equal(data.y, [[5, 6], [7, 8]])
    np.testing.assert_array_equal(data.x["padding_mask"], np.ones((2, 2)))
    np.testing.assert_array_equal(data.sample_weight, np.ones((2, 2)))
    assert data.num_tokens == 4


def test_pack_with_separator():
    data = pack_token_sequences([[5, 6], [8, 9]], 3, bos_id=2, separator_ids=[1, 1])
    # stream 5 6 1 1 8 9 -> chunks [5 6 1] [1 8 9]
    np.testing.assert_array_equal(data.x["token_ids"], [[2, 5, 6], [2, 1, 8]])
    np.testing.assert_array_equal(data.y, [[5, 6, 1], [1, 8, 9]])


def test_pack_too_little_text_rejected():
    with pytest.raises(ValueError, match="3 tokens.*sequence of 4"):
        pack_token_sequences([[1, 2, 3]], 4, bos_id=2)


@pytest.mark.parametrize("length", [0, -3, 2.5, True])
def test_pack_invalid_length_rejected(length):
    with pytest.raises(ValueError, match="sequence_length"):
        pack_token_sequences([[1, 2, 3]], length, bos_id=2)


def test_take_slices_every_field():
    data = pack_token_sequences([list(range(10, 30))], 4, bos_id=2)
    part = data.take(2, start=1)
    np.testing.assert_array_equal(part.x["token_ids"], data.x["token_ids"][1:3])
    np.testing.assert_array_equal(part.y, data.y[1:3])
    assert part.num_sequences == 2


def test_bundled_splits_are_disjoint_and_real():
    train = load_bundled_paragraphs("train")
    heldout = load_bundled_paragraphs("heldout")
    assert len(train) == 1423 + 1815
    assert len(heldout) == 158 + 202
    assert not set(train) & set(heldout)
    assert sum(len(p) for p in train + heldout) > 2_500_000


def test_unknown_split_rejected():
    with pytest.raises(ValueError, match="'test'.*train, heldout"):
        load_bundled_paragraphs("test")


# ---------------------------------------------------------------------------
# Multiple-choice rows, bundled sets and standard benchmark formats.

import json

from keras_matquant.data import BUNDLED_SETS
from keras_matquant.data import convert_benchmark_row
from keras_matquant.data import convert_benchmark_rows
from keras_matquant.data import load_bundled_multiple_choice
from keras_matquant.data import read_benchmark_jsonl
from keras_matquant.data import read_multiple_choice_jsonl


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, count", [("quartz", 3860), ("goal_step_wikihow", 2250),
                    ("physical_intuition", 81), ("social_iqa", 1954)]
)
def test_bundled_multiple_choice_sets(name, count):
    examples = load_bundled_multiple_choice(name)
    assert len(examples) == count
    assert all(0 <= e.label < len(e.choices) for e in examples)
    assert load_bundled_multiple_choice(name, limit=5) == examples[:5]


def test_bundled_multiple_choice_first_row():
    first = load_bundled_multiple_choice("quartz", limit=1)[0]
    assert first.context == "Eric adds more resistors to the series circuit. The resistance"
    assert first.choices == ("increases", "decreases")
    assert first.label == 0
    assert set(BUNDLED_SETS) == {"quartz", "goal_step_wikihow", "physical_intuition", "social_iqa"}


def test_unknown_bundled_set_rejected():
    with pytest.raises(ValueError, match="'arc'.*quartz"):
        load_bundled_multiple_choice("arc")


def test_multiple_choice_jsonl_round_trip(tmp_path):
    rows = [
        {"context": "2 + 2 =", "choices": ["4", "5"], "label": 0},
        {"context": "x", "choices": ["a", "b"], "label": 1, "continuation": "y"},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    examples = read_multiple_choice_jsonl(path)
    assert [e.as_row() for e in examples] == rows


def test_multiple_choice_jsonl_bad_line_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{not json\n')
    with pytest.raises(ValueError, match="rows.jsonl line 2 is not valid JSON"):
        read_multiple_choice_jsonl(path)


def test_multiple_choice_jsonl_bad_row_named(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 5}])
    with pytest.raises(ValueError, match="rows.jsonl line 1: `label` is 5.*0..1"):
        read_multiple_choice_jsonl(path)


def test_multiple_choice_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        read_multiple_choice_jsonl(tmp_path / "absent.jsonl")


def test_multiple_choice_jsonl_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no multiple-choice row"):
        read_multiple_choice_jsonl(path)


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_multiple_choice_invalid_limit(tmp_path, limit):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 0}])
    with pytest.raises(ValueError, match="limit"):
        read_multiple_choice_jsonl(path, limit=limit)


ARC_HF_ROW = {
    "id": "Mercury_7",
    "question": "Which gas do plants take in for photosynthesis?",
    "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]},
    "answerKey": "B",
}
ARC_AI2_ROW = {
    "id": "NYSEDREGENTS_2",
    "question": {
        "stem": "What melts ice fastest?",
        "choices": [{"text": "salt", "label": "1"}, {"text": "sand", "label": "2"}],
    },
    "answerKey": "1",
}
HELLASWAG_ROW = {
    "ind": 4,
    "activity_label": "Home and Garden",
    "ctx_a": "[header] How to water a cactus [title] Check the soil.",
    "ctx_b": "",
    "ctx": "[header] How to water a cactus [title] Check the soil. ",
    "endings": [
        "[step] Water only when the soil is dry.",
        " Pour a bucket of water every hour.",
        "Paint the pot [title] blue.",
        "Sing to the cactus.",
    ],
    "source_id": "wikihow~1",
    "split": "val",
    "split_type": "indomain",
    "label": "0",
}
HELLASWAG_ACTIVITYNET_ROW = {
    "activity_label": "Baking cookies",
    "ctx_a": "A woman puts dough on a tray.",
    "ctx_b": "she",
    "endings": ["puts the tray in the oven.", "eats the tray.", "runs away.", "sleeps."],
    "label": 0,
}
PIQA_ROW = {"goal": "Keep a door open", "sol1": "Put a wedge under it.", "sol2": "Put a wedge on top of it.", "label": 0}
BOOLQ_SUPERGLUE_ROW = {
    "question": "is the sun a star",
    "passage": "The Sun is the star at the center of the Solar System.",
    "idx": 0,
    "label": 1,
}
BOOLQ_ORIGINAL_ROW = {
    "question": "is the moon a planet",
    "title": "Moon",
    "answer": False,
    "passage": "The Moon is Earth's only natural satellite.",
}
WINOGRANDE_ROW = {
    "qID": "3QHITW7-1",
    "sentence": "The trophy did not fit in the suitcase because the _ was too big.",
    "option1": "trophy",
    "option2": "suitcase",
    "answer": "1",
}


@pytest.mark.parametrize(
    "row, format_name, expected",
    [
        (ARC_HF_ROW, "arc", {
            "context": "Question: Which gas do plants take in for photosynthesis?\nAnswer:",
            "choices": ["oxygen", "carbon dioxide", "helium"], "label": 1}),
        (ARC_AI2_ROW, "arc", {
            "context": "Question: What melts ice fastest?\nAnswer:",
            "choices": ["salt", "sand"], "label": 0}),
        (HELLASWAG_ROW, "hellaswag", {
            "context": "Home and Garden: How to water a cactus. Check the soil.",
            "choices": [" Water only when the soil is dry.", "Pour a bucket of water every hour.",
                        "Paint the pot. blue.", "Sing to the cactus."],
            "label": 0}),
        (HELLASWAG_ACTIVITYNET_ROW, "hellaswag", {
            "context": "Baking cookies: A woman puts dough on a tray. She",
            "choices": ["puts the tray in the oven.", "eats the tray.", "runs away.", "sleeps."],
            "label": 0}),
        (PIQA_ROW, "piqa", {
            "context": "Question: Keep a door open\nAnswer:",
            "choices": ["Put a wedge under it.", "Put a wedge on top of it."], "label": 0}),
        (BOOLQ_SUPERGLUE_ROW, "boolq", {
            "context": "The Sun is the star at the center of the Solar System.\n"
                       "Question: is the sun a star?\nAnswer:",
            "choices": ["no", "yes"], "label": 1}),
        (BOOLQ_ORIGINAL_ROW, "boolq", {
            "context": "The Moon is Earth's only natural satellite.\n"
                       "Question: is the moon a planet?\nAnswer:",
            "choices": ["no", "yes"], "label": 0}),
        (WINOGRANDE_ROW, "winogrande", {
            "context": "The trophy did not fit in the suitcase because the ",
            "choices": ["trophy", "suitcase"], "label": 0,
            "continuation": "was too big."}),
    ],
)
def test_benchmark_row_converted(row, format_name, expected):
    assert convert_benchmark_row(row, format_name).as_row() == expected


@pytest.mark.parametrize(
    "row, format_name, message",
    [
        ({**ARC_HF_ROW, "answerKey": "E"}, "arc", "answerKey 'E'"),
        ({"question": "q", "answerKey": "A"}, "arc", "missing key.*choices"),
        ({k: v for k, v in HELLASWAG_ROW.items() if k != "endings"}, "hellaswag", "missing key.*endings"),
        ({**HELLASWAG_ROW, "label": ""}, "hellaswag", "`label` is ''"),
        ({k: v for k, v in PIQA_ROW.items() if k != "label"}, "piqa", "labels.lst"),
        ({**BOOLQ_ORIGINAL_ROW, "answer": "yes"}, "boolq", "true or false"),
        ({**WINOGRANDE_ROW, "answer": ""}, "winogrande", "'1' or '2'"),
        ({**WINOGRANDE_ROW, "sentence": "No blank here."}, "winogrande", "exactly one blank"),
        ({**WINOGRANDE_ROW, "sentence": "Ends in a blank _"}, "winogrande", "continuation"),
        (["not", "a", "dict"], "piqa", "JSON object"),
    ],
)
def test_invalid_benchmark_row_rejected(row, format_name, message):
    with pytest.raises(ValueError, match=message):
        convert_benchmark_row(row, format_name)


def test_unknown_benchmark_format_rejected(tmp_path):
    with pytest.raises(ValueError, match="'mmlu'.*arc, hellaswag, piqa, boolq, winogrande"):
        convert_benchmark_rows([PIQA_ROW], "mmlu")
    with pytest.raises(ValueError, match="'mmlu'"):
        read_benchmark_jsonl(tmp_path / "any.jsonl", "mmlu")


def test_benchmark_jsonl_read(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [WINOGRANDE_ROW, {**WINOGRANDE_ROW, "answer": "2"}])
    examples = read_benchmark_jsonl(path, "winogrande")
    assert [e.label for e in examples] == [0, 1]
    assert read_benchmark_jsonl(path, "winogrande", limit=1) == examples[:1]


def test_benchmark_jsonl_bad_row_names_line(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [PIQA_ROW, {"goal": "x"}])
    with pytest.raises(ValueError, match="dev.jsonl line 2"):
        read_benchmark_jsonl(path, "piqa")
