"""Measure the step time and peak memory of MatQuant QAT against its baselines.

Usage (JAX only):

    KERAS_BACKEND=jax python benchmarks/training_cost.py

The models are the real Gemma 3 270M from its GGUF file and a mid-size
Gemma 3 configuration with random weights. For each, the script measures
four training steps side by side. Each runs in a fresh child process, so
that one variant's memory does not count towards the next:

- `float`: the unquantized model, fine-tuned on the masked cross entropy;
- `one_precision`: MatQuant layers trained at int8 alone (R = {8});
- `matquant`: R = {8, 4, 2}, one backward pass over the summed loss;
- `matquant_accumulated`: R = {8, 4, 2}, one backward pass per precision
  (`accumulate_gradients=True`).

Every variant quantizes (or, for `float`, trains) the same FFN projections
and freezes everything else, and runs the training step that Keras's `fit`
compiles: `jax.jit(model.train_step, donate_argnums=0)`. Reported per
variant: the median step time after one warm-up step, the peak resident set
size (RSS) sampled every 2 ms during the steps, and the buffer sizes XLA
assigns to the compiled step (arguments + outputs - aliased + temporaries).
The results go to `benchmarks/results/training_cost.{json,md}`.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time

VARIANTS = ("float", "one_precision", "matquant", "matquant_accumulated")
MODELS = ("gemma3_270m", "mid", "tiny")
TINY_CONFIG = {
    "vocabulary_size": 256,
    "num_layers": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 32,
    "intermediate_dim": 64,
    "head_dim": 16,
}
MID_CONFIG = {
    "vocabulary_size": 32768,
    "num_layers": 6,
    "num_query_heads": 4,
    "num_key_value_heads": 1,
    "hidden_dim": 1024,
    "intermediate_dim": 4096,
    "head_dim": 256,
}
FFN_LAYER_NAMES = ("ffw_gating", "ffw_gating_2", "ffw_linear")
RESULT_PREFIX = "TRAINING_COST_RESULT "


# ---------------------------------------------------------------------------
# Child process: one model, one variant.


class PeakRSS:
    """Sample this process's resident set size in a background thread."""

    def __init__(self, interval=0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current():
        with open("/proc/self/statm", encoding="ascii") as file:
            resident_pages = int(file.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def build_model(name):
    import keras
    import keras_hub

    if name == "gemma3_270m":
        from keras_matquant.hub.gguf import load_gemma3_gguf

        return load_gemma3_gguf()
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma3Backbone(
        **(MID_CONFIG if name == "mid" else TINY_CONFIG),
        image_size=16,
        query_head_dim_normalize=True,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        use_sliding_window_attention=True,
        sliding_window_size=512,
        vision_encoder=None,
    )
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)


def float_trainer(causal_lm):
    """Wrap a float causal LM to train on the same loss as `MatQuantModel`."""
    import keras

    import keras_matquant as kmq
    from keras_matquant.training import masked_cross_entropy

    class FloatTrainer(keras.Model):
        def __init__(self, model):
            super().__init__()
            self.language_model = model

        def call(self, inputs, training=None):
            return self.language_model(inputs, training=training)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return masked_cross_entropy(y, y_pred, sample_weight)

    for _, _, layer in kmq.iter_layers(causal_lm):
        if not any(True for _ in layer._flatten_layers(include_self=False)):
            layer.trainable = layer.name in FFN_LAYER_NAMES
    return FloatTrainer(causal_lm)


def qat_trainer(causal_lm, variant):
    import keras_matquant as kmq

    kmq.matquantize(causal_lm, targets="ffn")
    kmq.train_only_matquant_layers(causal_lm)
    if variant == "one_precision":
        return kmq.MatQuantModel(causal_lm, loss_weights={8: 1.0})
    return kmq.MatQuantModel(
        causal_lm,
        loss_weights="gemma",
        accumulate_gradients=variant == "matquant_accumulated",
    )


def run_variant(model_name, variant, steps, batch_size, sequence_length):
    """Compile and time one training step variant; return its figures."""
    import jax
    import keras
    import numpy as np

    started = time.perf_counter()
    causal_lm = build_model(model_name)
    load_seconds = time.perf_counter() - started
    vocabulary = causal_lm.backbone.vocabulary_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocabulary, size=(batch_size, sequence_length + 1))
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((batch_size, sequence_length), dtype="int32"),
    }
    data = (x, tokens[:, 1:].astype("int32"), np.ones((batch_size, sequence_length), "float32"))

    if variant == "float":
        trainer = float_trainer(causal_lm)
    else:
        trainer = qat_trainer(causal_lm, variant)
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-5))
    trainer.build({key: value.shape for key, value in x.items()})
    trainer.optimizer.build(trainer.trainable_variables)
    trainable_count = sum(int(np.prod(v.shape)) for v in trainer.trainable_variables)
    state = (
        [v.value for v in trainer.trainable_variables],
        [v.value for v in trainer.non_trainable_variables],
        [v.value for v in trainer.optimizer.variables],
        [v.value for v in trainer.metrics_variables],
    )

    started = time.perf_counter()
    step = jax.jit(trainer.train_step, donate_argnums=0)
    compiled = step.lower(state, data).compile()
    compile_seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()

    step_seconds = []
    with PeakRSS() as rss:
        rss_before = rss.peak
        for _ in range(steps + 1):
            started = time.perf_counter()
            logs, state = compiled(state, data)
            jax.block_until_ready((logs, state))
            step_seconds.append(time.perf_counter() - started)
    loss = float(np.asarray(logs["loss"]))

    return {
        "model": model_name,
        "variant": variant,
        "trainable_parameters": trainable_count,
        "load_seconds": round(load_seconds, 1),
        "compile_seconds": round(compile_seconds, 1),
        "warmup_step_seconds": round(step_seconds[0], 4),
        "step_seconds": [round(s, 4) for s in step_seconds[1:]],
        "median_step_seconds": round(statistics.median(step_seconds[1:]), 4),
        "rss_before_steps_bytes": rss_before,
        "peak_rss_bytes": rss.peak,
        "xla_argument_bytes": memory.argument_size_in_bytes,
        "xla_output_bytes": memory.output_size_in_bytes,
        "xla_alias_bytes": memory.alias_size_in_bytes,
        "xla_temp_bytes": memory.temp_size_in_bytes,
        "xla_step_bytes": (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
        ),
        "final_loss": loss,
    }


# ---------------------------------------------------------------------------
# Parent process: run every variant, then write the results.


def machine_description():
    """Describe the CPU, core count and Python of this machine in one line."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, "
        f"Python {platform.python_version()}"
    )


def run_child(model_name, variant, args):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--model", model_name,
        "--variant", variant,
        "--steps", str(args.steps),
        "--batch-size", str(args.batch_size),
        "--sequence-length", str(args.sequence_length),
    ]
    # The child imports the same keras_matquant as this script's checkout.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    print(f"== {model_name} / {variant}", flush=True)
    completed = subprocess.run(
        command, capture_output=True, text=True, check=False, env=env
    )
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            print(
                f"   step {result['median_step_seconds']} s, peak RSS "
                f"{result['peak_rss_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
            return result
    raise RuntimeError(
        f"The {model_name}/{variant} run failed with exit status "
        f"{completed.returncode}:\n{completed.stderr[-4000:]}"
    )


def add_ratios(rows):
    """Add each variant's ratios to the float and one-precision variants."""
    by_variant = {row["variant"]: row for row in rows}
    float_row = by_variant["float"]
    one_row = by_variant["one_precision"]
    for row in rows:
        row["step_vs_float"] = round(
            row["median_step_seconds"] / float_row["median_step_seconds"], 3
        )
        row["step_vs_one_precision"] = round(
            row["median_step_seconds"] / one_row["median_step_seconds"], 3
        )
        row["peak_rss_vs_one_precision"] = round(
            row["peak_rss_bytes"] / one_row["peak_rss_bytes"], 3
        )
        row["xla_step_bytes_vs_one_precision"] = round(
            row["xla_step_bytes"] / one_row["xla_step_bytes"], 3
        )


def results_markdown(results):
    gib = 2**30
    lines = [
        "# Training cost: MatQuant QAT step against float and one-precision steps",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; {results['versions']}. "
        f"{results['note']}",
        "",
        f"Batch: {results['batch_size']} x {results['sequence_length']} tokens "
        f"(random token ids; the cost does not depend on them). Times are "
        f"medians of {results['steps']} steps after one warm-up step. FFN "
        "projections quantized and trained, everything else frozen; AdamW.",
        "",
        "Memory: `peak RSS` is the resident set size of the child process, "
        "sampled every 2 ms during the steps (it includes the loaded model, "
        "optimizer state and libraries). `XLA step buffers` is what XLA's "
        "buffer assignment reserves for the compiled step: arguments + "
        "outputs - aliased (donated) + temporaries.",
        "",
        "Targets: MatQuant step <= 3.3x the float step; MatQuant peak memory "
        "<= 1.3x the one-precision QAT step.",
    ]
    for model_name, rows in results["models"].items():
        lines += [
            "",
            f"## {results['model_descriptions'][model_name]}",
            "",
            "| variant | step (s) | / float | / one-precision | peak RSS (GiB) "
            "| / one-precision | XLA step buffers (GiB) | / one-precision | compile (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| {row['variant']} | {row['median_step_seconds']:.2f} | "
                f"{row['step_vs_float']:.2f} | {row['step_vs_one_precision']:.2f} | "
                f"{row['peak_rss_bytes'] / gib:.2f} | "
                f"{row['peak_rss_vs_one_precision']:.2f} | "
                f"{row['xla_step_bytes'] / gib:.2f} | "
                f"{row['xla_step_bytes_vs_one_precision']:.2f} | "
                f"{row['compile_seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gemma3_270m,mid",
                        help=f"comma-separated models from {', '.join(MODELS)} "
                        "(default: gemma3_270m,mid)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--output-prefix", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "training_cost"),
        help="write PREFIX.json and PREFIX.md")
    parser.add_argument("--note", default="",
                        help="a sentence about the machine's load, for the results page")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for model_name in args.models.split(","):
        if model_name not in MODELS:
            parser.error(f"unknown model {model_name!r}; choose from {', '.join(MODELS)}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    if args.worker:
        result = run_variant(
            args.model, args.variant, args.steps, args.batch_size, args.sequence_length
        )
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    import jax
    import keras

    if keras.backend.backend() != "jax":
        print("training_cost.py measures compiled JAX steps; set KERAS_BACKEND=jax.",
              file=sys.stderr)
        return 2
    mid = ", ".join(f"{key} {value}" for key, value in MID_CONFIG.items())
    results = {
        "command": "KERAS_BACKEND=jax python benchmarks/training_cost.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(),
        "versions": f"jax {jax.__version__}, keras {keras.__version__}",
        "note": args.note,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "sequence_length": args.sequence_length,
        "model_descriptions": {
            "gemma3_270m": "Gemma 3 270M (GGUF Q4_K_M, dequantized to float32)",
            "mid": f"Mid-size Gemma 3 configuration with random weights ({mid})",
            "tiny": "Tiny Gemma 3 configuration, for a quick check of this script",
        },
        "models": {},
    }
    for model_name in args.models.split(","):
        rows = [run_child(model_name, variant, args) for variant in VARIANTS]
        add_ratios(rows)
        results["models"][model_name] = rows

    with open(args.output_prefix + ".json", "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
        file.write("\n")
    with open(args.output_prefix + ".md", "w", encoding="utf-8") as file:
        file.write(results_markdown(results))
    print(results_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
