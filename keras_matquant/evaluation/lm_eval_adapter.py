"""A model class for EleutherAI's lm-eval harness backed by a Keras causal LM.

Importing this module registers `KerasCausalLM` with lm-eval under the name
`"keras-matquant"`, so each of these runs a MatQuant model at a precision
or at a per-layer plan:

```python
import lm_eval
import keras_matquant.evaluation.lm_eval_adapter  # registers the model

lm_eval.simple_evaluate(
    model="keras-matquant",
    model_args="model=gemma3-matquant.keras,bits=4",
    tasks=["arc_easy"],
)
lm_eval.simple_evaluate(
    model="keras-matquant",
    model_args="model=gemma3-matquant.keras,plan=plan.json",
    tasks=["arc_easy"],
)
lm_eval.simple_evaluate(model=KerasCausalLM(causal_lm, bits=2), tasks=[...])
```

The adapter needs the optional `lm-eval` extra:
`pip install "keras-matquant[lm-eval]"`.
"""

import logging

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:
    raise ImportError(
        "keras_matquant.evaluation.lm_eval_adapter needs EleutherAI's lm-eval "
        'harness. Install it with `pip install "keras-matquant[lm-eval]"`.'
    ) from error

import keras

from keras_matquant.data.text import tokenize_paragraphs
from keras_matquant.data.windows import sliding_window_data
from keras_matquant.evaluation.loglikelihood import score_continuations
from keras_matquant.evaluation.loglikelihood import score_token_pairs
from keras_matquant.evaluation.scoring import DEFAULT_BITS
from keras_matquant.evaluation.scoring import check_batch_size
from keras_matquant.evaluation.scoring import check_precision_or_plan
from keras_matquant.precision import validate_precision
from keras_matquant.serving.export import check_bits_or_plan

logger = logging.getLogger("keras_matquant")

# lm-eval's Hugging Face model uses this many positions when the model does
# not say otherwise.
DEFAULT_MAX_LENGTH = 2048

# Values of `bits` in a model_args string that select the float weights.
FLOAT_NAMES = ("float", "none")


def _parse_bits(bits):
    if bits is DEFAULT_BITS:
        return bits
    if isinstance(bits, str):
        if bits.strip().lower() in FLOAT_NAMES:
            return None
        if bits.strip().isdigit():
            bits = int(bits)
    return validate_precision(bits)


def _read_plan(plan):
    """Return the plan dict that a dict, a JSON file path or None gives."""
    if isinstance(plan, str):
        from keras_matquant.serving_command import read_plan_file

        return read_plan_file(plan, option="`plan`")
    return plan


def _parse_positive_int(value, name):
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {value!r}.")
    return value


@register_model("keras-matquant")
class KerasCausalLM(LM):
    """An lm-eval `LM` that scores requests with a Keras causal LM.

    Implements `loglikelihood` (multiple-choice and continuation tasks) and
    `loglikelihood_rolling` (perplexity tasks) with this package's scoring,
    inside `keras_matquant.precision(bits)` or
    `keras_matquant.precision_plan(model, plan)`, so lm-eval reports the
    same log-likelihoods as `keras_matquant.evaluation` on the same text.

    Tokenization: a context and its continuation are tokenized separately,
    with the start token before the context when `add_bos` is True (see
    `keras_matquant.evaluation.loglikelihood`). A request longer than
    `max_length` keeps its last `max_length` input tokens. A rolling request
    is cut into windows of `max_length` positions that each begin with the
    start token (the end token when `add_bos` is False). Every token of the
    text is scored once, so the result is the log-likelihood of the whole
    text after that token.

    Args:
        model: a causal LM `keras.Model`, or a str path of a `.gguf` or
            `.keras` file to load (see `keras_matquant.hub.load_causal_lm`).
        tokenizer: a KerasHub tokenizer. Defaults to None, which uses
            `model.preprocessor.tokenizer`.
        bits: int in `1..8`, or None (also `"float"`) for the float master
            weights. Defaults to 8. Leave it at its default (or None) when
            `plan` is given.
        plan: None, a dict `{layer_path: bits}` (Mix'n'Match), or the str
            path of a JSON file with one (as `keras-matquant plan` writes
            it). Layers it does not name run at their own code width.
            Defaults to None.
        batch_size: int >= 1 (or its str), requests per forward pass.
            Defaults to 8.
        max_length: int >= 1, input positions per forward pass. Defaults to
            2048, lm-eval's default for Hugging Face models.
        add_bos: bool, whether to put the start token before each context.
            Defaults to True.
        targets: None, or the projection groups to matquantize after loading
            a path (`"ffn"`, `"attention"`, `"all"`). Defaults to None.
        verbose: bool, whether to show progress bars. Defaults to True.
        device: accepted because lm-eval passes it to every model. Ignored:
            Keras places the model on its default device.
        max_batch_size: accepted because lm-eval passes it to every model.
            Ignored: the batch size is fixed.

    Raises:
        ValueError: if an argument or the plan file is invalid, or both an
            explicit `bits` and `plan` are given. Also if the plan names a
            path that is not a MatQuant layer of the model, or the model has
            no tokenizer.
        FileNotFoundError: if the model or plan file does not exist.

    Example:

    ```python
    lm = KerasCausalLM(causal_lm, bits=4, batch_size=16)
    results = lm_eval.simple_evaluate(model=lm, tasks=["piqa"])
    plan = {"decoder_block_0/ffw_gating": 2}
    results = lm_eval.simple_evaluate(model=KerasCausalLM(causal_lm, plan=plan), tasks=["piqa"])
    ```
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        bits=DEFAULT_BITS,
        batch_size=8,
        max_length=DEFAULT_MAX_LENGTH,
        add_bos=True,
        targets=None,
        verbose=True,
        device=None,
        max_batch_size=None,
        plan=None,
    ):
        super().__init__()
        del device, max_batch_size
        bits = _parse_bits(bits)
        plan = _read_plan(plan)
        # Reject bits given with a plan before a model that may take minutes
        # loads. The plan's paths are checked once the model has loaded.
        check_bits_or_plan(None if bits is DEFAULT_BITS else bits, plan)
        self.batch_size = check_batch_size(_parse_positive_int(batch_size, "batch_size"))
        self.max_length = _parse_positive_int(max_length, "max_length")
        if not isinstance(add_bos, bool):
            raise ValueError(f"`add_bos` must be True or False. Received: {add_bos!r}.")
        self.add_bos = add_bos
        self.verbose = bool(verbose)

        if not isinstance(model, keras.Model):
            from keras_matquant.hub.loading import load_causal_lm

            model = load_causal_lm(model, targets=targets)
        elif targets is not None:
            from keras_matquant.hub.surgery import matquantize

            matquantize(model, targets=targets)
        self.model = model
        self.bits, self.plan = check_precision_or_plan(model, bits, plan)

        if tokenizer is None:
            preprocessor = getattr(model, "preprocessor", None)
            tokenizer = getattr(preprocessor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"Model '{model.name}' has no preprocessor with a tokenizer. "
                "Pass `tokenizer=` explicitly."
            )
        self.tokenizer = tokenizer

        prefix_name = "start_token_id" if add_bos else "end_token_id"
        self.prefix_token_id = getattr(tokenizer, prefix_name, None)
        if self.prefix_token_id is None:
            raise ValueError(
                f"The tokenizer has no `{prefix_name}`, which rolling "
                "log-likelihoods put before the text. Use a tokenizer with "
                "start and end tokens."
            )

    def loglikelihood(self, requests):
        """Score each request's continuation given its context.

        Args:
            requests: list of lm-eval `Instance`, each with
                `args == (context, continuation)`.

        Returns:
            A list of `(log_likelihood, is_greedy)` pairs, one per request.
        """
        pairs = [tuple(request.args) for request in requests]
        if not pairs:
            return []
        scores = score_continuations(
            self.model,
            self.tokenizer,
            pairs,
            bits=self.bits,
            batch_size=self.batch_size,
            add_bos=self.add_bos,
            max_length=self.max_length,
            verbose=self.verbose,
            plan=self.plan,
        )
        results = []
        for pair, score in zip(pairs, scores):
            result = (score.log_likelihood, score.is_greedy)
            self.cache_hook.add_partial("loglikelihood", pair, result)
            results.append(result)
        return results

    def _rolling_pairs(self, token_ids):
        """Cut one text into `(context_ids, continuation_ids)` windows."""
        data = sliding_window_data(
            [token_ids], self.max_length, bos_id=self.prefix_token_id
        )
        pairs = []
        for row in range(data.num_sequences):
            length = int(data.x["padding_mask"][row].sum())
            window = [int(data.x["token_ids"][row, 0])] + data.y[row, :length].tolist()
            # The weights are 1 on a suffix of the targets: the tokens that
            # no earlier window scored.
            first_scored = int((data.sample_weight[row, :length] > 0).argmax())
            pairs.append((window[: first_scored + 1], window[first_scored + 1 :]))
        return pairs

    def loglikelihood_rolling(self, requests):
        """Score the whole text of each request, for perplexity tasks.

        Args:
            requests: list of lm-eval `Instance`, each with `args == (text,)`.

        Returns:
            A list of floats, the log-likelihood of each text in nats (0.0
            for a text with no token).
        """
        texts = [request.args[0] for request in requests]
        if not texts:
            return []
        token_lists = tokenize_paragraphs(self.tokenizer, texts)

        pairs, owners = [], []
        for index, token_ids in enumerate(token_lists):
            if not token_ids:
                continue
            for pair in self._rolling_pairs(token_ids):
                pairs.append(pair)
                owners.append(index)
        scores = score_token_pairs(
            self.model,
            pairs,
            bits=self.bits,
            batch_size=self.batch_size,
            max_length=self.max_length,
            verbose=self.verbose,
            plan=self.plan,
        ) if pairs else []

        totals = [0.0] * len(texts)
        for owner, score in zip(owners, scores):
            totals[owner] += score.log_likelihood
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests):
        """Raise: generation tasks are not supported by this adapter.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(
            "KerasCausalLM scores text but does not generate it, so lm-eval "
            "tasks with output_type generate_until cannot run. Use "
            "loglikelihood or multiple_choice tasks, or call "
            "`causal_lm.generate(...)` inside `keras_matquant.precision(bits)`."
        )
