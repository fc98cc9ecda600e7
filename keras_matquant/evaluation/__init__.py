"""Evaluation of MatQuant models at any precision.

Perplexity with sliding windows, zero-shot multiple-choice accuracy, and
(in `keras_matquant.evaluation.lm_eval_adapter`, which needs the
`lm-eval` extra) a model class for EleutherAI's lm-eval harness.
"""

from keras_matquant.evaluation.loglikelihood import ContinuationScore
from keras_matquant.evaluation.loglikelihood import score_continuations
from keras_matquant.evaluation.loglikelihood import score_token_pairs
from keras_matquant.evaluation.multiple_choice import MultipleChoiceResult
from keras_matquant.evaluation.multiple_choice import evaluate_multiple_choice
from keras_matquant.evaluation.multiple_choice import example_requests
from keras_matquant.evaluation.perplexity import PerplexityResult
from keras_matquant.evaluation.perplexity import evaluate_heldout_perplexity
from keras_matquant.evaluation.perplexity import evaluate_perplexity
from keras_matquant.evaluation.scoring import SequenceScores
from keras_matquant.evaluation.scoring import sequence_scorer
