"""Evaluation of MatQuant models at any precision."""

from keras_matquant.evaluation.perplexity import PerplexityResult
from keras_matquant.evaluation.perplexity import evaluate_perplexity
