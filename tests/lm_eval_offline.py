"""Run lm-eval and this package on the same local tasks; write both results.

`tests/test_lm_eval.py` runs this file in a subprocess, because the Hugging
Face libraries read HF_HOME and the offline switches once, when they are
first imported:

    python -m tests.lm_eval_offline CONFIG.json OUTPUT.json

CONFIG lists the task folder and, for each task, its name, its data file and
the reader format of that file (None for rows already in this package's
form). OUTPUT maps each task to lm-eval's and this package's accuracies and
per-choice log-likelihoods.
"""

import json
import sys

import numpy as np


def main(config_path, output_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from keras_matquant.data import read_benchmark_jsonl
    from keras_matquant.data import read_multiple_choice_jsonl
    from keras_matquant.evaluation import evaluate_multiple_choice
    from keras_matquant.evaluation.lm_eval_adapter import KerasCausalLM
    from tests.test_cli import tiny_gemma3_with_tokenizer

    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    bits = config["bits"]
    causal_lm = tiny_gemma3_with_tokenizer()
    tokenizer = causal_lm.preprocessor.tokenizer

    lm = KerasCausalLM(causal_lm, bits=bits, batch_size=4, verbose=False)
    manager = TaskManager(include_path=config["task_folder"], include_defaults=False)
    names = [task["name"] for task in config["tasks"]]
    harness = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, log_samples=True,
        bootstrap_iters=0,
    )

    output = {}
    for task in config["tasks"]:
        name = task["name"]
        if task["format"] is None:
            examples = read_multiple_choice_jsonl(task["data"])
        else:
            examples = read_benchmark_jsonl(task["data"], task["format"])
        ours = evaluate_multiple_choice(
            causal_lm, tokenizer, examples, bits=bits, batch_size=3, verbose=False
        )
        metrics = harness["results"][name]
        samples = sorted(harness["samples"][name], key=lambda sample: sample["doc_id"])
        output[name] = {
            "lm_eval": {
                "acc": metrics["acc,none"],
                "acc_norm": metrics.get("acc_norm,none"),
                "log_likelihoods": [
                    [float(response[0]) for response in sample["filtered_resps"]]
                    for sample in samples
                ],
            },
            "ours": {
                "acc": ours.acc,
                "acc_norm": ours.acc_norm,
                "log_likelihoods": [np.asarray(v).tolist() for v in ours.log_likelihoods],
            },
        }
    with open(output_path, "w", encoding="utf-8") as file:
        json.dump(output, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
