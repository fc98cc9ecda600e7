"""`keras-matquant calibrate`: OmniQuant-style calibration of Gemma 3 270M."""

import logging
import time

from keras_matquant.quantizers import DEFAULT_CLIPPING_LOGIT

logger = logging.getLogger("keras_matquant")


def add_calibrate_parser(commands, parse_loss_weights, parse_bits_list, positive_int, positive_float):
    """Add the `calibrate` subcommand to the `keras-matquant` parser.

    Args:
        commands: the subparsers object of the main parser.
        parse_loss_weights: the argument type that parses `--loss-weights`.
        parse_bits_list: the argument type that parses `--eval-bits`.
        positive_int: the argument type for positive integers.
        positive_float: the argument type for positive floats.

    Returns:
        The `calibrate` subparser.
    """
    calibrate = commands.add_parser(
        "calibrate",
        help="OmniQuant-style block-wise MatQuant calibration of Gemma 3 270M "
        "(learnable clipping, frozen weights), with held-out perplexity "
        "per precision before and after.",
        description="Load Gemma 3 270M from its GGUF file, matquantize the "
        "chosen projections with learnable clipping, report held-out "
        "perplexity, calibrate the clipping block by block on bundled text "
        "(sum of lambda_r * MSE to the float block output), and report it "
        "again.",
    )
    calibrate.add_argument("--gguf", default=None, help="path of a Gemma 3 GGUF file")
    calibrate.add_argument(
        "--calibration-sequences",
        type=positive_int,
        default=16,
        help="calibration sequences from the bundled training text (default: 16)",
    )
    calibrate.add_argument(
        "--sequence-length",
        type=positive_int,
        default=256,
        help="tokens per calibration sequence (default: 256)",
    )
    calibrate.add_argument(
        "--epochs", type=positive_int, default=2, help="epochs per block (default: 2)"
    )
    calibrate.add_argument(
        "--batch-size", type=positive_int, default=4, help="sequences per step (default: 4)"
    )
    calibrate.add_argument(
        "--learning-rate",
        type=positive_float,
        default=1e-3,
        help="AdamW learning rate of the clipping logits (default: 1e-3)",
    )
    calibrate.add_argument(
        "--loss-weights",
        type=parse_loss_weights,
        default={8: 0.1, 4: 0.1, 2: 1.0},
        help="calibrated precisions and weights, e.g. 8:0.1,4:0.1,2:1 "
        "(default), or 8:1 for the Sliced int8 comparison",
    )
    calibrate.add_argument(
        "--co-distillation",
        default=None,
        help="co-distillation terms, written as in Matryoshka Quantization: "
        "'[8, 4, 8->2]' calibrates int2 on the int8 block output only, "
        "'[8, 4, 2, 8->2]' on both the float and the int8 outputs "
        "(default: none)",
    )
    calibrate.add_argument(
        "--teacher-gradient",
        action="store_true",
        help="let the distillation gradient flow through the teacher's pass "
        "too (default: the teacher output is a constant)",
    )
    calibrate.add_argument(
        "--targets",
        choices=("ffn", "attention", "all"),
        default="ffn",
        help="projections to matquantize (default: ffn)",
    )
    calibrate.add_argument(
        "--eval-bits",
        type=parse_bits_list,
        default=(8, 6, 4, 3, 2),
        help="precisions to evaluate (default: 8,6,4,3,2)",
    )
    calibrate.add_argument(
        "--eval-sequences", type=positive_int, default=8, help="held-out sequences (default: 8)"
    )
    calibrate.add_argument(
        "--eval-sequence-length",
        type=positive_int,
        default=512,
        help="tokens per held-out sequence (default: 512)",
    )
    calibrate.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    calibrate.add_argument("--output", default=None, help="write the results as JSON here")
    calibrate.add_argument(
        "--save", default=None, help="save the calibrated causal LM to this .keras file"
    )
    calibrate.add_argument("--quiet", action="store_true", help="print only the table")
    return calibrate


def check_calibrate_arguments(args):
    """Return a message for inconsistent `calibrate` options, or None.

    Example:

    >>> check_calibrate_arguments(args)  # None when the options fit
    """
    from keras_matquant.training.co_distillation import parse_co_distillation
    from keras_matquant.training.loss_weights import resolve_loss_weights

    if args.save is not None and not args.save.endswith(".keras"):
        return f"--save {args.save}: expected a path ending in .keras"
    try:
        args.loss_weights = resolve_loss_weights(args.loss_weights)
    except ValueError as error:
        return f"--loss-weights: {error}"
    if args.co_distillation is not None:
        try:
            config = parse_co_distillation(args.co_distillation)
            config.check_trained(args.loss_weights)
        except ValueError as error:
            return f"--co-distillation: {error}"
        args.co_distillation = str(config)
    elif args.teacher_gradient:
        return "--teacher-gradient: it applies only with --co-distillation"
    return None


def run_calibrate(args):
    """Calibrate Gemma 3 270M and return perplexities before and after.

    Args:
        args: the parsed `calibrate` arguments.

    Returns:
        A dict like `run_train`'s: `{"float", "before", "after",
        "blocks", "seconds", "settings"}`.

    Example:

    >>> run_calibrate(build_parser().parse_args(["calibrate", "--epochs", "1"]))
    """
    import keras

    from keras_matquant.data import language_modeling_data
    from keras_matquant.data import load_bundled_paragraphs
    from keras_matquant.evaluation import evaluate_perplexity
    from keras_matquant.hub import gguf
    from keras_matquant.hub.surgery import matquantize
    from keras_matquant.training.omniquant import calibrate

    verbose = not args.quiet
    started = time.time()
    keras.utils.set_random_seed(args.seed)

    logger.info("Loading Gemma 3 from GGUF.")
    causal_lm = gguf.load_gemma3_gguf(args.gguf)
    tokenizer = causal_lm.preprocessor.tokenizer
    calibration = language_modeling_data(
        tokenizer, load_bundled_paragraphs("train"), args.sequence_length
    )
    if calibration.num_sequences < args.calibration_sequences:
        raise ValueError(
            f"--calibration-sequences {args.calibration_sequences} is more "
            f"than the {calibration.num_sequences} sequences of "
            f"{args.sequence_length} tokens in the bundled text."
        )
    calibration = calibration.take(args.calibration_sequences)
    heldout = language_modeling_data(
        tokenizer,
        load_bundled_paragraphs("heldout"),
        args.eval_sequence_length,
        max_sequences=args.eval_sequences,
    )
    eval_bits = tuple(bits for bits in args.eval_bits)

    def evaluate_all():
        return {
            f"int{bits}": evaluate_perplexity(causal_lm, heldout, bits=bits, verbose=verbose).perplexity
            for bits in eval_bits
        }

    float_ppl = evaluate_perplexity(causal_lm, heldout, bits=None, verbose=verbose).perplexity
    matquantize(causal_lm, targets=args.targets, learnable_clipping=True)
    before = evaluate_all()
    blocks = calibrate(
        causal_lm,
        calibration.x,
        loss_weights=args.loss_weights,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        epochs=args.epochs,
        co_distillation=args.co_distillation,
        stop_teacher_gradient=not args.teacher_gradient,
        verbose=1 if verbose else 0,
    )
    after = evaluate_all()
    if args.save:
        causal_lm.save(args.save)

    return {
        "float": float_ppl,
        "before": before,
        "after": after,
        "blocks": blocks,
        "seconds": round(time.time() - started, 1),
        "settings": {
            "backend": keras.backend.backend(),
            "method": "omniquant",
            "targets": args.targets,
            "loss_weights": {str(k): v for k, v in args.loss_weights.items()},
            "co_distillation": args.co_distillation,
            "stop_teacher_gradient": not args.teacher_gradient,
            "learning_rate": args.learning_rate,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "calibration_sequences": args.calibration_sequences,
            "sequence_length": args.sequence_length,
            "calibration_tokens": calibration.num_tokens,
            "clipping_logit_init": DEFAULT_CLIPPING_LOGIT,
            "eval_sequences": heldout.num_sequences,
            "eval_sequence_length": args.eval_sequence_length,
            "eval_tokens": heldout.num_tokens,
            "seed": args.seed,
        },
    }
