"""Perplexity and multiple-choice accuracy at a list of precisions and a plan."""

from keras_matquant.evaluation.multiple_choice import evaluate_multiple_choice
from keras_matquant.evaluation.perplexity import evaluate_heldout_perplexity
from keras_matquant.evaluation.scoring import check_precision_or_plan
from keras_matquant.evaluation.scoring import evaluation_label
from keras_matquant.precision import validate_precision


def evaluate_suite(
    model,
    tokenizer,
    precisions,
    tasks,
    paragraphs=None,
    sequence_length=512,
    stride=None,
    max_sequences=None,
    perplexity_batch_size=2,
    batch_size=8,
    verbose=True,
    plan=None,
):
    """Evaluate held-out perplexity and every task at each precision and a plan.

    Args:
        model: a causal LM `keras.Model` with MatQuant layers.
        tokenizer: the model's KerasHub tokenizer.
        precisions: sequence of precisions, each an int in `1..8` or None
            for the float master weights. It may be empty when `plan` is
            given.
        tasks: dict mapping a task name to its list of
            `MultipleChoiceExample`.
        paragraphs: list of str, the held-out text. Defaults to None, the
            bundled held-out split.
        sequence_length: int, input positions per perplexity window.
        stride: int or None, tokens between perplexity windows (see
            `sliding_window_data`).
        max_sequences: optional int, score only this many windows.
        perplexity_batch_size: int, windows per forward pass.
        batch_size: int, scored choices per forward pass.
        verbose: bool, whether to log each precision or the plan and show
            progress bars.
        plan: optional dict `{layer_path: bits}` (Mix'n'Match), evaluated
            after the precisions as one more row. Layers it does not name
            run at their own code width (int8 by default).

    Returns:
        A dict mapping each row's label to `{"perplexity",
        "log_perplexity", "perplexity_tokens", "tasks": {name: {"acc",
        "acc_norm", "acc_bytes", "num_examples"}}, "average_acc",
        "average_acc_norm"}`. A precision's label is `"float"`, `"int8"` and
        so on. The plan's label is `"plan (N.NN bits)"` with its effective
        bits (see `keras_matquant.evaluation.scoring.plan_label`). The
        averages are the unweighted means over tasks (None without tasks).

    Raises:
        ValueError: if a precision, the plan (for the model) or another
            argument is invalid, or neither a precision nor a plan is given.

    Example:

    ```python
    tasks = {"quartz": load_bundled_multiple_choice("quartz", limit=100)}
    results = evaluate_suite(causal_lm, tokenizer, [None, 8, 4, 2], tasks)
    results["int2"]["tasks"]["quartz"]["acc"]
    plan = keras_matquant.serving.order_plan(causal_lm, "pyramid", target_bits=4)
    results = evaluate_suite(causal_lm, tokenizer, [None], tasks, plan=plan)
    list(results)  # ['float', 'plan (N.NN bits)'] with N.NN at most 4.00
    ```
    """
    # Check every row before the first one runs, so that a bad plan fails in
    # seconds, not after the float evaluation.
    rows = [(validate_precision(bits), None) for bits in precisions]
    if plan is not None:
        rows.append(check_precision_or_plan(model, None, plan))
    if not rows:
        raise ValueError(
            "`precisions` is empty and no `plan` is given, so there is nothing "
            "to evaluate. Pass precisions such as [None, 8, 4, 2] or a plan."
        )

    results = {}
    for bits, row_plan in rows:
        perplexity = evaluate_heldout_perplexity(
            model,
            tokenizer,
            paragraphs,
            sequence_length=sequence_length,
            stride=stride,
            bits=bits,
            batch_size=perplexity_batch_size,
            max_sequences=max_sequences,
            verbose=verbose,
            plan=row_plan,
        )
        task_results = {}
        for name, examples in tasks.items():
            result = evaluate_multiple_choice(
                model, tokenizer, examples, bits=bits, batch_size=batch_size,
                verbose=verbose, plan=row_plan,
            )
            task_results[name] = {
                "acc": result.acc,
                "acc_norm": result.acc_norm,
                "acc_bytes": result.acc_bytes,
                "num_examples": result.num_examples,
            }
        average_acc = average_acc_norm = None
        if task_results:
            average_acc = sum(t["acc"] for t in task_results.values()) / len(task_results)
            average_acc_norm = (
                sum(t["acc_norm"] for t in task_results.values()) / len(task_results)
            )
        results[evaluation_label(model, bits, row_plan)] = {
            "perplexity": perplexity.perplexity,
            "log_perplexity": perplexity.log_perplexity,
            "perplexity_tokens": perplexity.num_tokens,
            "tasks": task_results,
            "average_acc": average_acc,
            "average_acc_norm": average_acc_norm,
        }
    return results


def format_suite_table(results):
    """Format the results of `evaluate_suite` as a text table.

    Args:
        results: the dict that `evaluate_suite` returns.

    Returns:
        A str with one row per precision or plan: perplexity,
        log-perplexity, then `acc/acc_norm` for each task and their
        averages. The first column is as wide as the longest label.

    Example:

    >>> print(format_suite_table({"float": {
    ...     "perplexity": 20.0, "log_perplexity": 2.9957,
    ...     "perplexity_tokens": 100, "average_acc": 0.5,
    ...     "average_acc_norm": 0.25,
    ...     "tasks": {"quartz": {"acc": 0.5, "acc_norm": 0.25}}}}))
    """
    first = next(iter(results.values()))
    task_names = list(first["tasks"])
    widths = [max(len(name), len("0.000/0.000")) + 2 for name in task_names]
    average_width = len("0.000/0.000") + 2
    label_width = max([10] + [len(label) + 1 for label in results])
    header = f"{'precision':<{label_width}}{'perplexity':>12}{'log-ppl':>9}"
    header += "".join(f"{name:>{width}}" for name, width in zip(task_names, widths))
    if task_names:
        header += f"{'average':>{average_width}}"
    lines = [header]
    for label, row in results.items():
        line = f"{label:<{label_width}}{row['perplexity']:>12.4g}{row['log_perplexity']:>9.4f}"
        for name, width in zip(task_names, widths):
            task = row["tasks"][name]
            line += f"{task['acc']:.3f}/{task['acc_norm']:.3f}".rjust(width)
        if task_names:
            line += f"{row['average_acc']:.3f}/{row['average_acc_norm']:.3f}".rjust(
                average_width
            )
        lines.append(line)
    return "\n".join(lines)
