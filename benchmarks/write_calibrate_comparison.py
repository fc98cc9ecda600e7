"""Write two or more `keras-matquant calibrate --output` files as one page.

Usage:

    python benchmarks/write_calibrate_comparison.py benchmarks/results/NAME \\
        "MatQuant=matquant.json=COMMAND" "Sliced int8=sliced.json=COMMAND"

writes `NAME.json` (every run, keyed by its label) and `NAME.md` (held-out
perplexity per precision before and after calibration, one column pair per
run, with each run's command, budget and time) into the given folder.
"""

import json
import sys

from write_train_results import machine_description


def _format(value):
    if value >= 1e4:
        return f"{value:.3g}"
    return f"{value:.2f}"


def comparison_markdown(runs, machine):
    """Return the markdown page of `runs`, a dict `{label: (results, command)}`."""
    labels = list(runs)
    first = runs[labels[0]][0]
    settings = first["settings"]
    lines = [
        "# OmniQuant calibration of Gemma 3 270M: MatQuant against Sliced int8",
        "",
        f"Machine: {machine}; backend {settings['backend']}.",
        "",
        "Commands:",
        "",
    ]
    for label in labels:
        results, command = runs[label]
        weights = ", ".join(f"{bits}: {value}" for bits, value in results["settings"]["loss_weights"].items())
        lines.append(f"- {label}, loss weights {weights} ({results['seconds']} s): `{command}`")
    lines += [
        "",
        f"Budget: {settings['calibration_tokens']} calibration tokens "
        f"({settings['calibration_sequences']} x {settings['sequence_length']} from the "
        f"bundled training text), {settings['epochs']} epochs of batch "
        f"{settings['batch_size']} per block, AdamW learning rate "
        f"{settings['learning_rate']} on the clipping logits only (initial logit "
        f"{settings['clipping_logit_init']}), {settings['targets']} projections. Held-out "
        f"perplexity on {settings['eval_tokens']} tokens ({settings['eval_sequences']} x "
        f"{settings['eval_sequence_length']}).",
        "",
        "| precision | before | " + " | ".join(f"{label} after" for label in labels) + " |",
        "|---|---|" + "---|" * len(labels),
        f"| float | {_format(first['float'])} | "
        + " | ".join(_format(runs[label][0]["float"]) for label in labels) + " |",
    ]
    for precision in first["before"]:
        cells = [_format(runs[label][0]["after"][precision]) for label in labels]
        lines.append(
            f"| {precision} | {_format(first['before'][precision])} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) < 3:
        raise SystemExit(__doc__)
    target = argv[1]
    runs = {}
    for spec in argv[2:]:
        label, path, command = spec.split("=", 2)
        with open(path, encoding="utf-8") as file:
            runs[label] = (json.load(file), command)
    with open(target + ".json", "w", encoding="utf-8") as file:
        json.dump({label: {**results, "command": command} for label, (results, command) in runs.items()}, file, indent=2)
    with open(target + ".md", "w", encoding="utf-8") as file:
        file.write(comparison_markdown(runs, machine_description()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
