import io
import json
import os

import keras
import numpy as np
import pytest

from keras_matquant import cli
from keras_matquant.data import load_bundled_paragraphs


def tiny_gemma3_with_tokenizer(path=None):
    """A tiny Gemma 3 causal LM with a SentencePiece tokenizer trained here."""
    import keras_hub
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(load_bundled_paragraphs("train")[:300]),
        model_writer=model,
        vocab_size=256,
        character_coverage=0.99,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        byte_fallback=False,
    )
    tokenizer = keras_hub.models.Gemma3Tokenizer(
        proto=model.getvalue(), has_vision_tokens=False
    )
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        image_size=16,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        sliding_window_size=16,
        vision_encoder=None,
    )
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=16
    )
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)


def test_train_end_to_end_on_tiny_model(monkeypatch, tmp_path, capsys):
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    output = tmp_path / "r.json"
    status = cli.main([
        "train", "--steps", "3", "--sequence-length", "16",
        "--eval-sequences", "2", "--eval-sequence-length", "16",
        "--eval-bits", "8,2", "--learning-rate", "1e-2", "--quiet",
        "--output", str(output),
    ])

    assert status == 0
    results = json.loads(output.read_text())
    assert set(results) == {"float", "before", "after", "steps", "tokens", "seconds", "settings"}
    assert list(results["before"]) == ["int8", "int2"]
    assert list(results["after"]) == ["int8", "int2"]
    assert results["steps"] == 3
    assert results["tokens"] == 3 * 2 * 16
    assert results["settings"]["eval_tokens"] == 2 * 16
    # The default recipe keeps the settings the command wrote before recipes.
    assert set(results["settings"]) == {
        "backend", "targets", "loss_weights", "learning_rate", "batch_size",
        "sequence_length", "eval_sequences", "eval_sequence_length",
        "eval_tokens", "seed",
    }
    # The tiny random model barely learns in three steps with its embedding
    # frozen, so the check is that training changed the quantized kernels and
    # that int8 tracks float before training.
    assert results["after"]["int2"] != results["before"]["int2"]
    assert results["before"]["int8"] == pytest.approx(results["float"], rel=0.05)
    table = capsys.readouterr().out
    assert "int2" in table
    assert "before/float" in table


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--steps", "0"], "positive integer"),
        (["--steps", "ten"], "positive integer"),
        (["--learning-rate", "-1"], "positive finite number"),
        (["--learning-rate", "inf"], "positive finite number"),
        (["--learning-rate", "nan"], "positive finite number"),
        (["--loss-weights", "8=0.1"], "BITS:WEIGHT"),
        (["--loss-weights", "x:1"], "BITS must be an integer"),
        (["--eval-bits", "8,9"], "1..8"),
        (["--targets", "mlp"], "invalid choice"),
        (["--recipe", "omniquant"], "invalid choice"),
        (["--distillation-loss", "mse"], "invalid choice"),
        (["--schedule", "linear"], "invalid choice"),
        (["--warmup-steps", "-1"], "non-negative integer"),
        (["--bits", "0"], "positive integer"),
        (["--loss-weights", "gemma2"], "preset name: gemma, mistral_qat"),
    ],
)
def test_invalid_arguments_rejected(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["train", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_loss_weight_values_reported(capsys):
    status = cli.main(["train", "--loss-weights", "9:1", "--quiet"])
    assert status == 2
    assert "1..8" in capsys.readouterr().err


def test_format_table_ratios():
    table = cli.format_table(
        {"float": 10.0, "before": {"int8": 10.5, "int2": 1e6}, "after": {"int8": 10.2, "int2": 40.0}}
    )
    lines = table.splitlines()
    assert lines[1].split() == ["float", "10.000", "10.000", "1.000", "1.000"]
    assert lines[2].split() == ["int8", "10.5", "10.2", "1.05", "1.02"]
    assert lines[3].split() == ["int2", "1e+06", "40", "1e+05", "4"]


def test_missing_output_folder_rejected_before_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output", str(tmp_path / "missing" / "r.json")])
    assert exit_info.value.code == 2
    assert "does not exist or is not writable" in capsys.readouterr().err


def test_missing_gguf_reported_in_one_line(tmp_path, capsys):
    status = cli.main(["train", "--gguf", str(tmp_path / "absent.gguf"), "--quiet"])
    assert status == 2
    error = capsys.readouterr().err
    assert "GGUF file not found" in error
    assert "Traceback" not in error


def test_non_gguf_file_reported_with_path(tmp_path, capsys):
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("plain text, not a checkpoint")
    status = cli.main(["train", "--gguf", str(not_gguf), "--quiet"])
    assert status == 2
    error = capsys.readouterr().err
    assert f"Failed to read {not_gguf} as a GGUF file" in error


def test_perplexity_rows_float_first():
    rows = cli.perplexity_rows(
        {"float": 10.0, "before": {"int8": 20.0, "int2": 40.0}, "after": {"int8": 15.0, "int2": 30.0}}
    )
    assert rows == [
        ("float", 10.0, 10.0, 1.0, 1.0),
        ("int8", 20.0, 15.0, 2.0, 1.5),
        ("int2", 40.0, 30.0, 4.0, 3.0),
    ]


# ---------------------------------------------------------------------------
# keras-matquant eval


EVAL_SMALL = [
    "--tasks", "physical_intuition,quartz", "--limit", "4",
    "--sequence-length", "16", "--stride", "8", "--perplexity-sequences", "3",
    "--batch-size", "3", "--quiet",
]


def library_results(causal_lm, bits):
    """The same evaluation through the library functions, for comparison."""
    from keras_matquant.data import load_bundled_multiple_choice
    from keras_matquant.evaluation import evaluate_heldout_perplexity
    from keras_matquant.evaluation import evaluate_multiple_choice

    tokenizer = causal_lm.preprocessor.tokenizer
    perplexity = evaluate_heldout_perplexity(
        causal_lm, tokenizer, sequence_length=16, stride=8, bits=bits,
        max_sequences=3, verbose=False,
    )
    accuracy = {
        name: evaluate_multiple_choice(
            causal_lm, tokenizer, load_bundled_multiple_choice(name, limit=4),
            bits=bits, verbose=False,
        )
        for name in ("physical_intuition", "quartz")
    }
    return perplexity, accuracy


def test_eval_end_to_end_on_tiny_model(monkeypatch, tmp_path, capsys):
    import keras_matquant.hub.gguf
    from keras_matquant import matquantize

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    output = tmp_path / "eval.json"
    status = cli.main(["eval", "--bits", "8,2", *EVAL_SMALL, "--output", str(output)])

    assert status == 0
    report = json.loads(output.read_text())
    assert set(report) == {"results", "seconds", "settings"}
    results = report["results"]
    assert list(results) == ["float", "int8", "int2"]
    assert list(results["int2"]["tasks"]) == ["physical_intuition", "quartz"]
    assert results["int2"]["tasks"]["quartz"]["num_examples"] == 4
    assert results["float"]["perplexity_tokens"] == 16 + 2 * 8
    assert results["int8"]["perplexity"] == pytest.approx(results["float"]["perplexity"], rel=0.05)
    assert report["settings"]["targets"] == "ffn"
    assert report["settings"]["matquant_layers"] == 6
    assert report["settings"]["stride"] == 8

    reference = tiny_gemma3_with_tokenizer()
    matquantize(reference, targets="ffn")
    perplexity, accuracy = library_results(reference, bits=2)
    assert results["int2"]["log_perplexity"] == pytest.approx(perplexity.log_perplexity, rel=1e-6)
    for name, result in accuracy.items():
        assert results["int2"]["tasks"][name]["acc"] == result.acc
        assert results["int2"]["tasks"][name]["acc_norm"] == result.acc_norm
    expected_average = (accuracy["physical_intuition"].acc + accuracy["quartz"].acc) / 2
    assert results["int2"]["average_acc"] == pytest.approx(expected_average)

    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["precision", "perplexity", "log-ppl", "physical_intuition", "quartz", "average"]
    assert [line.split()[0] for line in table[1:4]] == ["float", "int8", "int2"]
    assert "acc/acc_norm" in table[4]


def test_eval_keras_file_matches_gguf_path(monkeypatch, tmp_path):
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    saved = tmp_path / "tiny.keras"
    tiny_gemma3_with_tokenizer().save(saved)
    from_gguf = tmp_path / "gguf.json"
    from_keras = tmp_path / "keras.json"

    assert cli.main(["eval", "--bits", "4", *EVAL_SMALL, "--output", str(from_gguf)]) == 0
    assert cli.main([
        "eval", "--model", str(saved), "--targets", "ffn", "--bits", "4", *EVAL_SMALL,
        "--output", str(from_keras),
    ]) == 0

    gguf_results = json.loads(from_gguf.read_text())["results"]
    keras_results = json.loads(from_keras.read_text())["results"]
    for label in ("float", "int4"):
        assert keras_results[label]["log_perplexity"] == pytest.approx(
            gguf_results[label]["log_perplexity"], rel=1e-6
        )
        assert keras_results[label]["tasks"] == gguf_results[label]["tasks"]


def test_eval_saved_trainer_keeps_its_layers(tmp_path, capsys):
    from keras_matquant import MatQuantModel
    from keras_matquant import matquantize

    causal_lm = tiny_gemma3_with_tokenizer()
    matquantize(causal_lm, targets="ffn")
    saved = tmp_path / "trainer.keras"
    MatQuantModel(causal_lm).save(saved)
    output = tmp_path / "r.json"

    status = cli.main(["eval", "--model", str(saved), "--bits", "2", *EVAL_SMALL, "--output", str(output)])
    assert status == 0
    report = json.loads(output.read_text())
    assert report["settings"]["targets"] == "as saved"
    assert report["settings"]["matquant_layers"] == 6
    perplexity, accuracy = library_results(causal_lm, bits=2)
    assert report["results"]["int2"]["log_perplexity"] == pytest.approx(
        perplexity.log_perplexity, rel=1e-6
    )
    assert report["results"]["int2"]["tasks"]["quartz"]["acc"] == accuracy["quartz"].acc

    status = cli.main(["eval", "--model", str(saved), "--targets", "ffn", *EVAL_SMALL])
    assert status == 2
    assert "already has 6 MatQuant layers" in capsys.readouterr().err


def test_eval_reads_local_task_files(monkeypatch, tmp_path):
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    own = tmp_path / "mine.jsonl"
    own.write_text(json.dumps({"context": "The sky is", "choices": ["blue", "green"], "label": 0}) + "\n")
    winogrande = tmp_path / "dev.jsonl"
    winogrande.write_text(json.dumps({
        "sentence": "The cup fell off the table because the _ was tilted.",
        "option1": "cup", "option2": "table", "answer": "2",
    }) + "\n")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(load_bundled_paragraphs("heldout")[:3]) + "\n")
    output = tmp_path / "r.json"

    status = cli.main([
        "eval", "--bits", "4", "--tasks", f"{own},winogrande:{winogrande}",
        "--heldout", str(heldout), "--sequence-length", "16", "--quiet", "--output", str(output),
    ])

    assert status == 0
    report = json.loads(output.read_text())
    assert list(report["results"]["int4"]["tasks"]) == ["mine", "dev"]
    assert report["settings"]["tasks"] == {"mine": str(own), "dev": f"winogrande:{winogrande}"}
    assert report["results"]["int4"]["tasks"]["dev"]["num_examples"] == 1


def test_train_recipe_options_end_to_end(monkeypatch, tmp_path):
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    output = tmp_path / "r.json"
    status = cli.main([
        "train", "--steps", "3", "--sequence-length", "16",
        "--eval-sequences", "2", "--eval-sequence-length", "16",
        "--learning-rate", "1e-2", "--quiet", "--output", str(output),
        "--loss-weights", "mistral_qat", "--co-distillation", "[8, 4, 8->2]",
        "--accumulate-gradients", "--schedule", "warmup-cosine",
        "--warmup-steps", "1", "--targets", "all",
    ])

    assert status == 0
    results = json.loads(output.read_text())
    assert list(results["after"]) == ["int8", "int6", "int4", "int3", "int2"]
    assert results["after"]["int2"] != results["before"]["int2"]
    settings = results["settings"]
    assert settings["loss_weights"] == {"8": 0.2, "4": 0.2, "2": 1.0}
    assert settings["co_distillation"] == "[8, 4, 8->2]"
    assert settings["distillation_loss"] == "kl"
    assert settings["stop_teacher_gradient"] is True
    assert settings["accumulate_gradients"] is True
    assert settings["schedule"] == "warmup-cosine"
    assert settings["warmup_steps"] == 1
    assert "recipe" not in settings


def test_train_baseline_recipe_end_to_end(monkeypatch, tmp_path):
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    output = tmp_path / "r.json"
    status = cli.main([
        "train", "--steps", "2", "--sequence-length", "16",
        "--eval-sequences", "2", "--eval-sequence-length", "16",
        "--quiet", "--output", str(output), "--recipe", "baseline", "--bits", "4",
    ])

    assert status == 0
    results = json.loads(output.read_text())
    assert list(results["before"]) == ["int4", "int3", "int2"]
    assert results["settings"]["recipe"] == "baseline"
    assert results["settings"]["parent_bits"] == 4
    assert results["settings"]["loss_weights"] == {"4": 1.0}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--bits", "8,9"], "1..8"),
        (["--bits", "x"], "integers in 1..8"),
        (["--tasks", "mmlu"], "invalid task 'mmlu'"),
        (["--tasks", ","], "at least one task"),
        (["--tasks", "a/dev.jsonl,winogrande:b/dev.jsonl"], "dev appear more than once"),
        (["--limit", "0"], "positive integer"),
        (["--stride", "0"], "positive integer"),
        (["--targets", "mlp"], "invalid choice"),
        (["--gguf", "a.gguf", "--model", "b.keras"], "not allowed with"),
    ],
)
def test_invalid_eval_arguments_rejected(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["eval", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--stride", "32", "--sequence-length", "16"], "--stride 32 is larger than --sequence-length 16"),
        (["--gguf", "{tmp}/absent.gguf"], "GGUF file not found"),
        (["--model", "{tmp}/model.h5"], "expected a .keras file"),
        (["--model", "{tmp}/absent.keras"], "file not found"),
        (["--heldout", "{tmp}/absent.txt"], "--heldout"),
        (["--tasks", "piqa:{tmp}/absent.jsonl"], "file not found: "),
        (["--output", "{tmp}/missing/r.json"], "does not exist or is not writable"),
    ],
)
def test_eval_options_checked_before_loading(monkeypatch, tmp_path, capsys, arguments, message):
    import keras_matquant.hub.gguf

    def fail(path=None):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", fail)
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_bad_task_row_reported_before_loading(monkeypatch, tmp_path, capsys):
    import keras_matquant.hub.gguf

    def fail(path=None):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", fail)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"context": "a", "choices": ["b", "c"], "label": 0}) + "\n"
        + json.dumps({"context": "a", "choices": ["b", "c"], "label": 7}) + "\n"
    )
    status = cli.main(["eval", "--tasks", str(rows), "--quiet"])
    assert status == 2
    error = capsys.readouterr().err
    assert "rows.jsonl line 2: `label` is 7" in error
    assert "Traceback" not in error


def library_plan_results(causal_lm, plan):
    """The `eval --plan` numbers through the library functions."""
    from keras_matquant.data import load_bundled_multiple_choice
    from keras_matquant.evaluation import evaluate_heldout_perplexity
    from keras_matquant.evaluation import evaluate_multiple_choice

    tokenizer = causal_lm.preprocessor.tokenizer
    perplexity = evaluate_heldout_perplexity(
        causal_lm, tokenizer, sequence_length=16, stride=8, plan=plan,
        max_sequences=3, verbose=False,
    )
    accuracy = {
        name: evaluate_multiple_choice(
            causal_lm, tokenizer, load_bundled_multiple_choice(name, limit=4),
            plan=plan, verbose=False,
        )
        for name in ("physical_intuition", "quartz")
    }
    return perplexity, accuracy


# Block 0 at int2 and block 1 at int8 on the tiny model's six FFN layers.
EVAL_PLAN = {
    f"decoder_block_{block}/{name}": 2 if block == 0 else 8
    for block in (0, 1)
    for name in ("ffw_gating", "ffw_gating_2", "ffw_linear")
}


def test_eval_plan_end_to_end(monkeypatch, tmp_path, capsys):
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"plan": EVAL_PLAN, "effective_bits": 5.0}))
    output = tmp_path / "eval.json"
    status = cli.main(["eval", "--plan", str(plan_file), *EVAL_SMALL, "--output", str(output)])

    assert status == 0
    report = json.loads(output.read_text())
    results = report["results"]
    assert list(results) == ["float", "plan (5.00 bits)"]
    assert report["settings"]["plan_file"] == str(plan_file)
    assert report["settings"]["plan"] == EVAL_PLAN
    assert report["settings"]["bits"] == []

    perplexity, accuracy = library_plan_results(tiny_matquantized(), EVAL_PLAN)
    row = results["plan (5.00 bits)"]
    assert row["log_perplexity"] == pytest.approx(perplexity.log_perplexity, rel=1e-6)
    assert row["perplexity_tokens"] == perplexity.num_tokens
    for name, result in accuracy.items():
        assert row["tasks"][name]["acc"] == result.acc
        assert row["tasks"][name]["acc_norm"] == result.acc_norm

    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[0] == "float"
    assert table[2].startswith("plan (5.00 bits) ")


def test_eval_plan_unknown_layer_reported(monkeypatch, tmp_path, capsys):
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"decoder_block_7/ffw_gating": 2}))
    status = cli.main(["eval", "--plan", str(plan_file), *EVAL_SMALL])
    assert status == 2
    error = capsys.readouterr().err
    assert "decoder_block_7/ffw_gating" in error
    assert "Valid layer paths: ['decoder_block_0/ffw_gating'" in error
    assert "Traceback" not in error


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--plan", "{tmp}/absent.json"], "--plan {tmp}/absent.json: file not found"),
        (["--plan", "{tmp}/text.json"], "--plan {tmp}/text.json: not valid JSON"),
        (["--plan", "{tmp}/nine.json"], "layer 'decoder_block_0/ffw_gating' has precision 9"),
        (["--plan", "{tmp}/list.json"], "expected a non-empty JSON object"),
        (["--plan", "{tmp}/plan.json", "--bits", "4"], "argument --bits: not allowed with argument --plan"),
    ],
)
def test_eval_plan_checked_before_loading(monkeypatch, tmp_path, capsys, arguments, message):
    import keras_matquant.hub.gguf

    def fail(path=None):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", fail)
    (tmp_path / "plan.json").write_text(json.dumps({"decoder_block_0/ffw_gating": 2}))
    (tmp_path / "nine.json").write_text(json.dumps({"decoder_block_0/ffw_gating": 9}))
    (tmp_path / "text.json").write_text("decoder_block_0: 4")
    (tmp_path / "list.json").write_text("[4, 2]")
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *arguments])
    assert exit_info.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, precisions, planned",
    [
        ([], [None, 8, 4, 2], False),
        (["--bits", "4"], [None, 4], False),
        (["--plan", "{tmp}/plan.json"], [None], True),
    ],
)
def test_eval_rows_from_bits_or_plan(monkeypatch, tmp_path, arguments, precisions, planned):
    import keras_matquant.evaluation.suite
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    calls = []

    def record(model, tokenizer, precisions, tasks, **kwargs):
        calls.append((list(precisions), kwargs["plan"]))
        return {}

    monkeypatch.setattr(keras_matquant.evaluation.suite, "evaluate_suite", record)
    (tmp_path / "plan.json").write_text(json.dumps(EVAL_PLAN))
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    args = cli.build_parser().parse_args(["eval", *arguments, *EVAL_SMALL])
    report = cli.run_eval(args)

    assert calls == [(precisions, EVAL_PLAN if planned else None)]
    assert report["settings"]["bits"] == [bits for bits in precisions if bits is not None]


def test_format_suite_table_hand_values():
    from keras_matquant.evaluation.suite import format_suite_table

    table = format_suite_table({
        "float": {"perplexity": 20.0, "log_perplexity": 2.995732, "average_acc": 0.5,
                  "average_acc_norm": 0.625,
                  "tasks": {"quartz": {"acc": 0.5, "acc_norm": 0.75},
                            "piqa": {"acc": 0.5, "acc_norm": 0.5}}},
        "int2": {"perplexity": 1.5e6, "log_perplexity": 14.2209, "average_acc": 0.25,
                 "average_acc_norm": 0.25,
                 "tasks": {"quartz": {"acc": 0.25, "acc_norm": 0.0},
                           "piqa": {"acc": 0.25, "acc_norm": 0.5}}},
    })
    lines = table.splitlines()
    assert lines[0].split() == ["precision", "perplexity", "log-ppl", "quartz", "piqa", "average"]
    assert lines[1].split() == ["float", "20", "2.9957", "0.500/0.750", "0.500/0.500", "0.500/0.625"]
    assert lines[2].split() == ["int2", "1.5e+06", "14.2209", "0.250/0.000", "0.250/0.500", "0.250/0.250"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--recipe", "baseline"], "pass bits=r"),
        (["--recipe", "matquant", "--bits", "2"], "instead of bits"),
        (["--recipe", "sliced_int8", "--loss-weights", "gemma"], "sets `loss_weights` itself"),
        (["--recipe", "single_precision", "--bits", "8"], "1..7"),
        (["--recipe", "baseline", "--bits", "4", "--eval-bits", "8,4"], "--eval-bits 8 exceed the 4-bit codes"),
        (["--co-distillation", "[8, 4, 2, 8->3]"], "uses precision 3, which is not trained"),
        (["--co-distillation", "int8 to int2"], "such as '[8, 4, 8->2]'"),
        (["--teacher-gradient"], "add --co-distillation"),
        (["--distillation-loss", "soft_cross_entropy"], "add --co-distillation"),
        (["--warmup-steps", "5"], "needs --schedule warmup-cosine"),
        (["--schedule", "warmup-cosine", "--warmup-steps", "40"], "smaller than --steps 40"),
        (["--loss-weights", "8:-1,2:1"], "non-negative"),
    ],
)
def test_invalid_recipe_options_reported_before_loading(arguments, message, monkeypatch, capsys):
    import keras_matquant.hub.gguf

    def fail_to_load(path=None):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", fail_to_load)
    status = cli.main(["train", "--quiet", *arguments])
    assert status == 2
    error = capsys.readouterr().err
    assert message in error


@pytest.mark.parametrize(
    "arguments, eval_bits",
    [
        ([], (8, 6, 4, 3, 2)),
        (["--recipe", "baseline", "--bits", "4"], (4, 3, 2)),
        (["--recipe", "baseline", "--bits", "2"], (2,)),
        (["--recipe", "single_precision"], (8, 6, 4, 3, 2)),
        (["--recipe", "sliced_int8", "--eval-bits", "2,8"], (2, 8)),
    ],
)
def test_resolve_recipe_eval_bits(arguments, eval_bits):
    args = cli.build_parser().parse_args(["train", *arguments])
    assert cli.resolve_recipe(args)[1] == eval_bits


def test_default_run_adds_no_recipe_settings():
    args = cli.build_parser().parse_args(["train"])
    recipe, _ = cli.resolve_recipe(args)
    assert recipe.loss_weights == {8: 0.1, 4: 0.1, 2: 1.0}
    assert cli.recipe_settings(args, recipe) == {}


def test_warmup_cosine_schedule_from_arguments():
    from keras_matquant.training import WarmupCosineDecay

    args = cli.build_parser().parse_args(
        ["train", "--schedule", "warmup-cosine", "--warmup-steps", "4", "--steps", "12",
         "--learning-rate", "1e-3"]
    )
    schedule = cli.learning_rate_schedule(args)
    assert isinstance(schedule, WarmupCosineDecay)
    assert schedule.get_config()["total_steps"] == 12
    assert float(keras.ops.convert_to_numpy(schedule(8))) == pytest.approx(5e-4)
    assert cli.learning_rate_schedule(cli.build_parser().parse_args(["train"])) == 2e-5


def test_calibrate_end_to_end_on_tiny_model(monkeypatch, tmp_path, capsys):
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    output = tmp_path / "c.json"
    saved = tmp_path / "calibrated.keras"
    status = cli.main([
        "calibrate", "--calibration-sequences", "4", "--sequence-length", "16",
        "--epochs", "2", "--batch-size", "2", "--eval-sequences", "2",
        "--eval-sequence-length", "16", "--eval-bits", "8,2", "--quiet",
        "--output", str(output), "--save", str(saved), "--learning-rate", "1e-2",
    ])
    assert status == 0
    results = json.loads(output.read_text())
    assert list(results["before"]) == ["int8", "int2"]
    assert results["after"]["int2"] != results["before"]["int2"]
    assert results["settings"]["method"] == "omniquant"
    assert results["settings"]["calibration_tokens"] == 4 * 16
    assert sorted(results["blocks"]) == ["decoder_block_0", "decoder_block_1"]
    restored = keras.saving.load_model(saved, compile=False)
    from keras_matquant import matquant_layers

    layers = matquant_layers(restored)
    assert len(layers) == 6
    assert all(layer.learnable_clipping for layer in layers.values())
    assert "calibration tokens: 64" in capsys.readouterr().out


def test_calibrate_with_co_distillation(monkeypatch, tmp_path):
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)
    output = tmp_path / "c.json"
    status = cli.main([
        "calibrate", "--calibration-sequences", "4", "--sequence-length", "16",
        "--epochs", "1", "--batch-size", "2", "--eval-sequences", "1",
        "--eval-sequence-length", "16", "--eval-bits", "2", "--quiet",
        "--co-distillation", "8,4,8->2", "--teacher-gradient", "--output", str(output),
    ])
    assert status == 0
    results = json.loads(output.read_text())
    assert results["settings"]["co_distillation"] == "[8, 4, 8->2]"
    assert results["settings"]["stop_teacher_gradient"] is False
    assert set(results["blocks"]["decoder_block_0"]) == {
        "mse_int8", "mse_int4", "distillation_int8_to_int2", "first_epoch_loss", "last_epoch_loss"
    }


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--save", "model.h5"], "expected a path ending in .keras"),
        (["--epochs", "0"], "positive"),
        (["--loss-weights", "8:-1"], "non-negative"),
        (["--co-distillation", "[8, 4, 8=>2]"], "'[8, 4, 8->2]'"),
        (["--co-distillation", "[8, 4, 8->3]"], "not trained"),
        (["--teacher-gradient"], "only with --co-distillation"),
    ],
)
def test_invalid_calibrate_arguments_rejected(arguments, message, monkeypatch, capsys):
    import keras_matquant.hub.gguf

    def fail(path=None):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", fail)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["calibrate", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------
# keras-matquant plan and export


def use_tiny_gemma3(monkeypatch):
    import keras_matquant.hub.gguf

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", tiny_gemma3_with_tokenizer)


def tiny_matquantized():
    from keras_matquant import matquantize

    causal_lm = tiny_gemma3_with_tokenizer()
    matquantize(causal_lm, targets="ffn")
    return causal_lm


def block_of(path):
    return path.split("/")[0]


def test_plan_order_writes_plan(monkeypatch, tmp_path, capsys):
    use_tiny_gemma3(monkeypatch)
    output = tmp_path / "plan.json"
    status = cli.main([
        "plan", "--order", "pyramid", "--target-bits", "5", "--quiet", "--output", str(output),
    ])
    assert status == 0
    results = json.loads(output.read_text())
    # Two equal blocks at 5 bits: one int8 and one int2 block; the pyramid
    # ranks the earlier of two mirror blocks first.
    assert results["precision_by_block"] == {"decoder_block_0": 8, "decoder_block_1": 2}
    assert len(results["plan"]) == 6
    for path, bits in results["plan"].items():
        assert bits == (8 if block_of(path) == "decoder_block_0" else 2)
    assert results["effective_bits"] == 5.0
    assert results["details"]["method"] == "order pyramid"
    assert results["details"]["precisions"] == [2, 4, 8]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["decoder_block_0", "8"]
    assert lines[2].split() == ["decoder_block_1", "2"]
    assert lines[3] == "effective bits: 5.0000 (order pyramid)"


def test_plan_search_matches_library(monkeypatch, tmp_path):
    from keras_matquant.data import language_modeling_data
    from keras_matquant.data import load_bundled_paragraphs
    from keras_matquant.serving import search_plan

    use_tiny_gemma3(monkeypatch)
    output = tmp_path / "plan.json"
    status = cli.main([
        "plan", "--search", "--target-bits", "4", "--calibration-sequences", "2",
        "--sequence-length", "16", "--quiet", "--output", str(output),
    ])
    assert status == 0
    results = json.loads(output.read_text())

    causal_lm = tiny_matquantized()
    data = language_modeling_data(
        causal_lm.preprocessor.tokenizer, load_bundled_paragraphs("train"), 16, max_sequences=2
    )
    expected = search_plan(causal_lm, data, 4)
    assert results["plan"] == expected.plan
    assert results["effective_bits"] <= 4.0
    details = results["details"]
    assert details["method"] == "search"
    assert details["measured_kl"] == pytest.approx(expected.measured_kl, rel=1e-5)
    assert details["predicted_kl"] == pytest.approx(expected.predicted_kl, rel=1e-5)
    assert set(details["kl_by_unit"]) == {"decoder_block_0", "decoder_block_1"}
    assert set(details["kl_by_unit"]["decoder_block_0"]) == {"int2", "int4", "int8"}


def test_export_plan_file_round_trip(monkeypatch, tmp_path):
    import keras_matquant as kmq
    from keras_matquant import serving
    from tests.conftest import token_batch

    use_tiny_gemma3(monkeypatch)
    plan = {
        "decoder_block_0/ffw_gating": 2, "decoder_block_0/ffw_gating_2": 4,
        "decoder_block_0/ffw_linear": 8, "decoder_block_1/ffw_gating": 3,
        "decoder_block_1/ffw_gating_2": 8, "decoder_block_1/ffw_linear": 2,
    }
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"plan": plan, "effective_bits": 4.5}))
    output = tmp_path / "mix.keras"
    status = cli.main(["export", "--plan", str(plan_file), "--quiet", "--output", str(output)])
    assert status == 0
    assert serving.saved_precisions(output) == plan

    x, _, _ = token_batch(vocabulary=256)
    reference = tiny_matquantized()
    with kmq.precision_plan(reference, plan):
        expected = keras.ops.convert_to_numpy(reference.backbone(x))
    loaded = keras.saving.load_model(output, compile=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded.backbone(x)), expected)


def test_export_artifact_then_derive(monkeypatch, tmp_path, capsys):
    from keras_matquant import serving

    use_tiny_gemma3(monkeypatch)
    artifact = tmp_path / "int8.keras"
    assert cli.main(["export", "--quiet", "--output", str(artifact)]) == 0
    assert set(serving.saved_precisions(artifact).values()) == {8}
    assert "effective bits: 8.0000" in capsys.readouterr().out

    int2 = tmp_path / "int2.keras"
    assert cli.main(["export", "--model", str(artifact), "--bits", "2", "--quiet", "--output", str(int2)]) == 0
    assert set(serving.saved_precisions(int2).values()) == {2}
    assert os.path.getsize(int2) < os.path.getsize(artifact)

    ordered = tmp_path / "ordered.keras"
    assert cli.main([
        "export", "--model", str(artifact), "--order", "increasing", "--target-bits", "5",
        "--quiet", "--output", str(ordered),
    ]) == 0
    assert {block_of(p): b for p, b in serving.saved_precisions(ordered).items()} == {
        "decoder_block_0": 2, "decoder_block_1": 8,
    }

    capsys.readouterr()
    status = cli.main(["plan", "--model", str(artifact), "--search", "--target-bits", "4", "--quiet"])
    assert status == 2
    assert "store packed codes and no float master kernel" in capsys.readouterr().err


def test_plan_unknown_layer_reported(monkeypatch, tmp_path, capsys):
    use_tiny_gemma3(monkeypatch)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"decoder_block_7/ffw_gating": 2}))
    status = cli.main(["plan", "--plan", str(plan_file), "--quiet"])
    assert status == 2
    error = capsys.readouterr().err
    assert "decoder_block_7/ffw_gating" in error
    assert "Valid layer paths: ['decoder_block_0/ffw_gating'" in error


@pytest.mark.parametrize(
    "command, arguments, message",
    [
        ("plan", ["--order", "pyramid"], "--order needs --target-bits"),
        ("plan", ["--search"], "--search needs --target-bits"),
        ("plan", [], "choose the plan with one of --bits, --plan, --order or --search"),
        ("plan", ["--bits", "4", "--target-bits", "4"], "--target-bits applies only with --order or --search"),
        ("plan", ["--bits", "4", "--precisions", "2,4"], "--precisions applies only with"),
        ("plan", ["--order", "pyramid", "--target-bits", "4", "--calibration-sequences", "2"],
         "--calibration-sequences applies only with --search"),
        ("plan", ["--order", "pyramid", "--target-bits", "1.5"], "--target-bits 1.5 is outside 2..8"),
        ("plan", ["--order", "pyramid", "--target-bits", "5", "--precisions", "2,4"], "outside 2..4"),
        ("plan", ["--order", "pyramid", "--target-bits", "9"], "in 1..8, got 9"),
        ("plan", ["--order", "pyramid", "--target-bits", "four"], "got 'four'"),
        ("plan", ["--order", "zigzag", "--target-bits", "4"], "invalid choice: 'zigzag'"),
        ("plan", ["--order", "pyramid", "--search", "--target-bits", "4"], "not allowed with"),
        ("plan", ["--search", "--target-bits", "4", "--precisions", "2,9"], "every value must be in 1..8"),
        ("plan", ["--bits", "0"], "expected an integer in 1..8, got 0"),
        ("plan", ["--plan", "{tmp}/absent.json"], "--plan {tmp}/absent.json: file not found"),
        ("plan", ["--plan", "{tmp}/nine.json"], "layer 'decoder_block_0/ffw_gating' has precision 9"),
        ("plan", ["--plan", "{tmp}/text.json"], "not valid JSON"),
        ("plan", ["--plan", "{tmp}/list.json"], "expected a non-empty JSON object"),
        ("plan", ["--model", "{tmp}/absent.keras", "--bits", "4"], "file not found"),
        ("plan", ["--gguf", "{tmp}/absent.gguf", "--bits", "4"], "GGUF file not found"),
        ("export", [], "the following arguments are required: --output"),
        ("export", ["--output", "{tmp}/text.json"], "is an existing file that is not a .keras file"),
        ("export", ["--output", "{tmp}/missing/m.keras"], "does not exist or is not writable"),
    ],
)
def test_plan_options_checked_before_loading(monkeypatch, tmp_path, capsys, command, arguments, message):
    import keras_matquant.hub.gguf

    def fail(path=None):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(keras_matquant.hub.gguf, "load_gemma3_gguf", fail)
    (tmp_path / "nine.json").write_text(json.dumps({"decoder_block_0/ffw_gating": 9}))
    (tmp_path / "text.json").write_text("decoder_block_0: 4")
    (tmp_path / "list.json").write_text("[4, 2]")
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, *arguments])
    assert exit_info.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
