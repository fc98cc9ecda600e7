import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from keras_matquant.data import load_bundled_multiple_choice
from keras_matquant.evaluation.lm_eval_adapter import KerasCausalLM
from tests.stub_models import LN2
from tests.stub_models import CharTokenizer
from tests.stub_models import bigram_stub
from tests.test_data import ARC_HF_ROW
from tests.test_data import BOOLQ_SUPERGLUE_ROW
from tests.test_data import HELLASWAG_ROW
from tests.test_data import PIQA_ROW
from tests.test_data import WINOGRANDE_ROW

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
LM_EVAL_TASKS = pathlib.Path(lm_eval.__file__).parent / "tasks"


def requests_of(kind, arguments):
    return [
        Instance(request_type=kind, doc={}, arguments=args, idx=index)
        for index, args in enumerate(arguments)
    ]


def stub_lm(**kwargs):
    return KerasCausalLM(bigram_stub(), tokenizer=CharTokenizer(), verbose=False, **kwargs)


def test_registered_under_package_name():
    assert get_model("keras-matquant") is KerasCausalLM


def test_loglikelihood_hand_computed():
    lm = stub_lm(bits=None, batch_size=2)
    results = lm.loglikelihood(
        requests_of("loglikelihood", [("a", " b"), ("a", " a"), ("", "ab")])
    )
    expected = [(-3 * LN2, False), (-2 * LN2, True), (-3 * LN2, False)]
    for (value, greedy), (expected_value, expected_greedy) in zip(results, expected):
        assert value == pytest.approx(expected_value, abs=1e-6)
        assert greedy is expected_greedy


@pytest.mark.parametrize(
    "max_length, exponent",
    [
        # <bos> a b \n \n b a in one window: 1 + 2 + 4 + 1 + 3 + 1.
        (8, 12),
        # Windows <bos> a b | <bos> \n \n | <bos> b a: 1 + 2 + 6 + 1 + 2 + 1.
        (2, 13),
    ],
)
def test_loglikelihood_rolling_hand_computed(max_length, exponent):
    lm = stub_lm(bits=None, max_length=max_length)
    results = lm.loglikelihood_rolling(requests_of("loglikelihood_rolling", [("ab\n\nba",), ("",)]))
    assert results[0] == pytest.approx(-exponent * LN2, abs=1e-5)
    assert results[1] == 0.0


def test_rolling_without_bos_uses_end_token():
    # <eos> is not in the stub's table, so it predicts 'a' with p = 1/2.
    lm = stub_lm(bits=None, add_bos=False)
    results = lm.loglikelihood_rolling(requests_of("loglikelihood_rolling", [("ab",)]))
    assert results[0] == pytest.approx(-3 * LN2, abs=1e-6)


def test_generate_until_names_alternative():
    lm = stub_lm()
    with pytest.raises(NotImplementedError, match="precision\\(bits\\)"):
        lm.generate_until(requests_of("generate_until", [("a", {"until": ["\n"]})]))


def test_model_args_string_loads_and_matquantizes(monkeypatch, tmp_path):
    import keras_matquant.hub.gguf
    from keras_matquant.hub import matquant_layers
    from tests.test_cli import tiny_gemma3_with_tokenizer

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", lambda path: tiny_gemma3_with_tokenizer())
    checkpoint = tmp_path / "tiny.gguf"
    checkpoint.write_bytes(b"")
    lm = KerasCausalLM.create_from_arg_string(
        f"model={checkpoint},bits=4,targets=ffn,verbose=False", {"batch_size": "2", "device": "cpu"}
    )
    assert lm.bits == 4
    assert lm.batch_size == 2
    assert len(matquant_layers(lm.model)) == 6
    float_lm = KerasCausalLM.create_from_arg_string(f"model={checkpoint},bits=float")
    assert float_lm.bits is None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"bits": 9}, ValueError, "1..8"),
        ({"bits": "int4"}, ValueError, "precision"),
        ({"batch_size": "auto"}, ValueError, "batch_size"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"max_length": 0}, ValueError, "max_length"),
        ({"add_bos": "yes"}, ValueError, "add_bos"),
    ],
)
def test_invalid_adapter_arguments_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        stub_lm(**kwargs)


def test_model_without_tokenizer_rejected():
    with pytest.raises(ValueError, match="tokenizer="):
        KerasCausalLM(bigram_stub())


def test_missing_model_file_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.keras"):
        KerasCausalLM(str(tmp_path / "absent.keras"))
    with pytest.raises(ValueError, match=".gguf.*.keras"):
        KerasCausalLM(str(tmp_path / "model.bin"))


# ---------------------------------------------------------------------------
# Per-layer plans.


def matquantized_tiny_lm():
    import keras

    import keras_matquant as kmq
    from tests.conftest import tiny_gemma3_causal_lm

    keras.utils.set_random_seed(0)
    model = tiny_gemma3_causal_lm()
    kmq.matquantize(model)
    return model


def fail_to_load(monkeypatch):
    import keras_matquant.hub.gguf

    def fail(path=None):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", fail)


def test_loglikelihood_with_plan_matches_numpy():
    from tests.stub_models import BOS
    from tests.test_evaluation import MIXED_PLAN
    from tests.test_evaluation import numpy_log_likelihood

    model = matquantized_tiny_lm()
    tokenizer = CharTokenizer()
    lm = KerasCausalLM(model, tokenizer=tokenizer, plan=MIXED_PLAN, batch_size=2, verbose=False)
    assert lm.bits is None
    assert lm.plan == MIXED_PLAN

    pairs = [("ab", " ba"), ("b", "\na"), ("", "ab")]
    results = lm.loglikelihood(requests_of("loglikelihood", pairs))
    for (context, continuation), (value, _) in zip(pairs, results):
        context_ids = [BOS] + tokenizer([context])[0]
        expected = numpy_log_likelihood(
            model, context_ids, tokenizer([continuation])[0], None, plan=MIXED_PLAN
        )
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_rolling_with_plan_matches_numpy():
    from tests.stub_models import BOS
    from tests.test_evaluation import MIXED_PLAN
    from tests.test_evaluation import numpy_log_likelihood

    model = matquantized_tiny_lm()
    tokenizer = CharTokenizer()
    lm = KerasCausalLM(model, tokenizer=tokenizer, plan=MIXED_PLAN, verbose=False)
    results = lm.loglikelihood_rolling(requests_of("loglikelihood_rolling", [("ab\n\nba",)]))
    expected = numpy_log_likelihood(model, [BOS], tokenizer(["ab\n\nba"])[0], None, plan=MIXED_PLAN)
    assert results[0] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_plan_every_layer_equals_bits():
    from tests.test_evaluation import TINY_LAYER_PATHS

    model = matquantized_tiny_lm()
    requests = requests_of("loglikelihood", [("ab", " ba"), ("b", "\na")])
    int4 = KerasCausalLM(model, tokenizer=CharTokenizer(), bits=4, verbose=False)
    planned = KerasCausalLM(
        model, tokenizer=CharTokenizer(), plan={path: 4 for path in TINY_LAYER_PATHS}, verbose=False
    )
    for (expected, _), (value, _) in zip(int4.loglikelihood(requests), planned.loglikelihood(requests)):
        assert value == pytest.approx(expected, rel=1e-6)


def test_model_args_plan_file_loads(monkeypatch, tmp_path):
    import keras_matquant.hub.gguf
    from tests.test_cli import tiny_gemma3_with_tokenizer
    from tests.test_evaluation import MIXED_PLAN

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", lambda path: tiny_gemma3_with_tokenizer())
    checkpoint = tmp_path / "tiny.gguf"
    checkpoint.write_bytes(b"")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"plan": MIXED_PLAN, "effective_bits": 5.0}))

    lm = KerasCausalLM.create_from_arg_string(
        f"model={checkpoint},plan={plan_file},targets=ffn,verbose=False", {"batch_size": "2"}
    )
    assert lm.plan == MIXED_PLAN
    assert lm.bits is None
    results = lm.loglikelihood(requests_of("loglikelihood", [("The sky is", " blue")]))
    assert results[0][0] < 0.0


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ("bits=4,plan={tmp}/plan.json", ValueError, "Pass either `bits` or `plan`, not both"),
        ("bits=8,plan={tmp}/plan.json", ValueError, "Received: bits=8"),
        ("plan={tmp}/absent.json", FileNotFoundError, "`plan` {tmp}/absent.json: file not found"),
        ("plan={tmp}/text.json", ValueError, "`plan` {tmp}/text.json: not valid JSON"),
        ("plan={tmp}/nine.json", ValueError, "layer 'decoder_block_0/ffw_gating' has precision 9"),
    ],
)
def test_model_args_plan_checked_before_loading(monkeypatch, tmp_path, arguments, error, message):
    fail_to_load(monkeypatch)
    checkpoint = tmp_path / "tiny.gguf"
    checkpoint.write_bytes(b"")
    (tmp_path / "plan.json").write_text(json.dumps({"decoder_block_0/ffw_gating": 2}))
    (tmp_path / "text.json").write_text("decoder_block_0/ffw_gating: 2")
    (tmp_path / "nine.json").write_text(json.dumps({"decoder_block_0/ffw_gating": 9}))
    arguments = arguments.replace("{tmp}", str(tmp_path))
    with pytest.raises(error) as raised:
        KerasCausalLM.create_from_arg_string(f"model={checkpoint},{arguments}")
    assert message.replace("{tmp}", str(tmp_path)) in str(raised.value)


def test_plan_unknown_layer_rejected():
    model = matquantized_tiny_lm()
    with pytest.raises(ValueError, match="Valid layer paths: \\['decoder_block_0/ffw_gating'"):
        KerasCausalLM(model, tokenizer=CharTokenizer(), plan={"decoder_block_5/ffw_linear": 2})


def test_plan_with_explicit_bits_dict_rejected():
    model = matquantized_tiny_lm()
    with pytest.raises(ValueError, match="not both"):
        KerasCausalLM(model, tokenizer=CharTokenizer(), bits=2, plan={"decoder_block_0/ffw_gating": 2})


# ---------------------------------------------------------------------------
# lm-eval's own tasks, offline, against this package on the same rows.

BENCHMARK_ROWS = {
    "arc": [
        ARC_HF_ROW,
        {"id": "q2", "question": "What do bees make?",
         "choices": {"text": ["honey", "milk", "silk", "glass"], "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
        {"id": "q3", "question": "Which is a mammal?",
         "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]},
         "answerKey": "B"},
    ],
    "hellaswag": [
        HELLASWAG_ROW,
        {**HELLASWAG_ROW, "activity_label": "Baking cookies",
         "ctx_a": "A woman puts dough on a tray.", "ctx_b": "she",
         "endings": ["puts the tray in the oven.", "eats the tray.", "runs away.", "sleeps."],
         "label": "0"},
    ],
    "piqa": [
        PIQA_ROW,
        {"goal": "Cool a hot drink", "sol1": "Add ice.", "sol2": "Add fire.", "label": 0},
        {"goal": "Dry wet shoes", "sol1": "Soak them.", "sol2": "Stuff them with paper.", "label": 1},
    ],
    "boolq": [
        BOOLQ_SUPERGLUE_ROW,
        {"question": "do fish breathe air", "passage": "Most fish breathe through gills.",
         "idx": 1, "label": 0},
    ],
    "winogrande": [
        WINOGRANDE_ROW,
        {"qID": "2", "sentence": "Anna gave Beth a gift because _ was kind.",
         "option1": "Anna", "option2": "Beth", "answer": "1"},
        {"qID": "3", "sentence": "The cat chased the mouse until the _ hid in a hole.",
         "option1": "cat", "option2": "mouse", "answer": "2"},
    ],
}

# lm-eval's task file for each format; the local copy replaces its dataset.
HARNESS_TASK_FILES = {
    "arc": "arc/arc_easy.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "winogrande": "winogrande/default.yaml",
}

LOCAL_DATASET = """dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data}
training_split: null
validation_split: validation
test_split: null
"""

OWN_FORM_TASK = """task: kmq_bundled
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder):
    """Write each task's data and YAML; return the task list of the config."""
    tasks = []
    for format_name, rows in BENCHMARK_ROWS.items():
        data = folder / f"{format_name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        name = f"kmq_{format_name}"
        (folder / f"{name}.yaml").write_text(
            f"include: {LM_EVAL_TASKS / HARNESS_TASK_FILES[format_name]}\n"
            f"task: {name}\ntag: null\n" + LOCAL_DATASET.format(data=data),
            encoding="utf-8",
        )
        tasks.append({"name": name, "data": str(data), "format": format_name})

    bundled = folder / "bundled.jsonl"
    rows = [e.as_row() for e in load_bundled_multiple_choice("physical_intuition", limit=6)]
    rows += [e.as_row() for e in load_bundled_multiple_choice("social_iqa", limit=6)]
    bundled.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / "kmq_bundled.yaml").write_text(
        OWN_FORM_TASK.format() + LOCAL_DATASET.format(data=bundled), encoding="utf-8"
    )
    tasks.append({"name": "kmq_bundled", "data": str(bundled), "format": None})
    return tasks


@pytest.fixture(scope="module")
def harness_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval")
    tasks_folder = folder / "tasks"
    tasks_folder.mkdir()
    config = folder / "config.json"
    config.write_text(json.dumps({
        "task_folder": str(tasks_folder), "tasks": write_tasks(tasks_folder), "bits": 4,
    }))
    output = folder / "output.json"
    environment = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(folder / "hf_home"),
        PYTHONPATH=os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")]),
    )
    completed = subprocess.run(
        [sys.executable, "-m", "tests.lm_eval_offline", str(config), str(output)],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(output.read_text())


@pytest.mark.parametrize("task", [f"kmq_{name}" for name in BENCHMARK_ROWS] + ["kmq_bundled"])
def test_lm_eval_accuracy_equals_ours(harness_results, task):
    harness = harness_results[task]["lm_eval"]
    ours = harness_results[task]["ours"]
    assert len(harness["log_likelihoods"]) == len(ours["log_likelihoods"])
    for theirs, mine in zip(harness["log_likelihoods"], ours["log_likelihoods"]):
        np.testing.assert_allclose(theirs, mine, rtol=1e-4, atol=1e-4)
    assert harness["acc"] == pytest.approx(ours["acc"], abs=1e-12)
    if harness["acc_norm"] is not None:
        assert harness["acc_norm"] == pytest.approx(ours["acc_norm"], abs=1e-12)
