"""Mix'n'Match benchmark: knapsack search against the four layer orders.

Not a test. Loads the real Gemma 3 270M (GGUF, dequantized to float32) and
matquantizes its FFN projections. It measures every transformer block's KL
divergence from the float model at int2 and int4 on calibration text (the
first sequences of the bundled training split). For each target bit width
it then compares the knapsack plan with the pyramid, reverse pyramid,
increasing and decreasing plans on held-out text, by KL divergence from the
float model and by perplexity. Writes `mix_n_match.json` and
`mix_n_match.md`:

    KERAS_BACKEND=jax python benchmarks/mix_n_match.py --output-dir benchmarks/results
"""

import argparse
import json
import logging
import os
import resource
import shlex
import sys
import time

logger = logging.getLogger("keras_matquant.benchmarks")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="benchmarks/results", help="folder for mix_n_match.{json,md}")
    parser.add_argument("--targets", default="3,4,5,6", help="target effective bits (default: 3,4,5,6)")
    parser.add_argument("--precisions", default="2,4,8", help="precisions a plan may use (default: 2,4,8)")
    parser.add_argument("--calibration-sequences", type=int, default=4, help="default: 4")
    parser.add_argument("--calibration-length", type=int, default=128, help="default: 128")
    parser.add_argument("--heldout-sequences", type=int, default=4, help="default: 4")
    parser.add_argument("--heldout-length", type=int, default=256, help="default: 256")
    parser.add_argument("--note", default="", help="a sentence about the machine load to put in the results")
    return parser.parse_args(argv)


def blocks_text(plan):
    """Join the precision of each block, in depth order, into one line."""
    blocks = {}
    for path, bits in plan.items():
        blocks.setdefault(path.split("/")[0], bits)
    return " ".join(str(bits) for bits in blocks.values())


def run(args):
    import keras_matquant as kmq
    from keras_matquant import serving
    from keras_matquant.data import language_modeling_data
    from keras_matquant.data import load_bundled_paragraphs
    from keras_matquant.hub.gguf import load_gemma3_gguf

    precisions = tuple(int(v) for v in args.precisions.split(","))
    targets = [float(v) for v in args.targets.split(",")]
    causal_lm = load_gemma3_gguf()
    tokenizer = causal_lm.preprocessor.tokenizer
    kmq.matquantize(causal_lm, targets="ffn")

    calibration = language_modeling_data(
        tokenizer, load_bundled_paragraphs("train"), args.calibration_length,
        max_sequences=args.calibration_sequences,
    )
    heldout = language_modeling_data(
        tokenizer, load_bundled_paragraphs("heldout"), args.heldout_length,
        max_sequences=args.heldout_sequences,
    )

    started = time.perf_counter()
    calibration_divergence = serving.PlanDivergence(causal_lm, calibration)
    sensitivities = serving.measure_sensitivities(
        causal_lm, calibration, precisions, divergence=calibration_divergence
    )
    sensitivity_seconds = time.perf_counter() - started
    measured_plans = sum(
        1 for row in range(len(sensitivities.costs.units)) for bits in precisions if bits != 8
    )
    logger.info("Measured sensitivities in %.1f s.", sensitivity_seconds)

    heldout_divergence = serving.PlanDivergence(causal_lm, heldout)
    float_score = heldout_divergence.float_score
    uniform = {}
    for bits in precisions:
        score = heldout_divergence.evaluate(bits=bits)
        uniform[f"int{bits}"] = score._asdict()

    comparisons = {}
    for target in targets:
        searched = serving.search_plan(
            causal_lm, calibration, target, sensitivities=sensitivities,
            divergence=calibration_divergence,
        )
        plans = {"knapsack": searched.plan}
        for order in serving.LAYER_ORDERS:
            plans[order] = serving.order_plan(causal_lm, order, target, precisions)
        rows = {}
        for name, plan in plans.items():
            score = heldout_divergence.evaluate(plan=plan)
            rows[name] = {
                "blocks": blocks_text(plan),
                "effective_bits": kmq.effective_bits(causal_lm, plan=plan),
                "calibration_kl": calibration_divergence.kl_divergence(plan=plan),
                "heldout": score._asdict(),
            }
        rows["knapsack"]["predicted_calibration_kl"] = searched.predicted_kl
        comparisons[f"{target:g}"] = rows
        logger.info("Target %g bits done.", target)

    return {
        "float": float_score._asdict(),
        "uniform": uniform,
        "comparisons": comparisons,
        "sensitivity": {
            "units": list(sensitivities.costs.units),
            "precisions": list(precisions),
            "kl": sensitivities.kl.tolist(),
            "reference_kl": sensitivities.reference_kl,
            "seconds": round(sensitivity_seconds, 1),
            "plans_measured": measured_plans,
        },
        "settings": {
            "precisions": list(precisions),
            "targets": targets,
            "calibration_tokens": calibration.num_tokens,
            "calibration_length": args.calibration_length,
            "heldout_tokens": heldout.num_tokens,
            "heldout_length": args.heldout_length,
        },
    }


def machine():
    import jax
    import keras

    sys.path.insert(0, os.path.dirname(__file__))
    from write_train_results import machine_description

    return f"{machine_description()}; JAX {jax.__version__} on CPU, Keras {keras.__version__}"


def markdown(results):
    settings = results["settings"]
    sensitivity = results["sensitivity"]
    float_ppl = results["float"]["perplexity"]
    lines = [
        "# Mix'n'Match on Gemma 3 270M: knapsack search against layer orders",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}. {results['note']}".rstrip(),
        "",
        "Model: Gemma 3 270M from the Q4_K_M GGUF file, dequantized to "
        f"float32 (the float reference), FFN projections of its {len(sensitivity['units'])} blocks "
        "matquantized with untrained min-max int8 codes (no MatQuant "
        "training), clamped slicing, so int2 blocks are far worse than they "
        "would be after training.",
        "",
        f"Search: each block's KL divergence from the float model, with only "
        f"that block at int{' / int'.join(str(p) for p in settings['precisions'] if p != 8)} "
        f"and every other block at int8, on {settings['calibration_tokens']} "
        f"calibration tokens (training split, {settings['calibration_length']}-token "
        f"sequences): {sensitivity['plans_measured']} measured plans in "
        f"{sensitivity['seconds']} s including compilation; then an exact "
        "knapsack over the blocks for each budget. Orders: "
        "`keras_matquant.serving.order_plan`. Evaluation: "
        f"{settings['heldout_tokens']} held-out tokens "
        f"({settings['heldout_length']}-token sequences of the held-out split), "
        "KL divergence from the float model's next-token distribution (nats "
        "per token) and perplexity.",
        "",
        f"Float perplexity {float_ppl:.3f}. Uniform precisions: "
        + ", ".join(
            f"{name} KL {row['kl_divergence']:.4g}, perplexity {row['perplexity']:.4g}"
            for name, row in results["uniform"].items()
        )
        + ".",
        "",
    ]
    for target, rows in results["comparisons"].items():
        lines += [
            f"## Target {target} bits",
            "",
            "| plan | effective bits | calibration KL | held-out KL | held-out perplexity | / float | precision per block, first to last |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            heldout = row["heldout"]
            lines.append(
                f"| {name} | {row['effective_bits']:.3f} | {row['calibration_kl']:.4g} | "
                f"{heldout['kl_divergence']:.4g} | {heldout['perplexity']:.4g} | "
                f"{heldout['perplexity'] / float_ppl:.3g} | {row['blocks']} |"
            )
        knapsack = rows["knapsack"]
        lines += [
            "",
            f"Knapsack: predicted calibration KL {knapsack['predicted_calibration_kl']:.4g} "
            f"(sum of single-block increases), measured {knapsack['calibration_kl']:.4g}.",
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    results = run(args)
    results.update(
        command="KERAS_BACKEND=jax python benchmarks/mix_n_match.py " + shlex.join(argv or sys.argv[1:]),
        machine=machine(),
        note=args.note,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        seconds=round(time.perf_counter() - started, 1),
    )
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "mix_n_match.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
        file.write("\n")
    with open(os.path.join(args.output_dir, "mix_n_match.md"), "w", encoding="utf-8") as file:
        file.write(markdown(results))
    sys.stdout.write(markdown(results))


if __name__ == "__main__":
    main()
