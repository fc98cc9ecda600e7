"""Shared fixtures: tiny KerasHub backbones built from configs."""

import numpy as np
import pytest


def tiny_gemma3_causal_lm():
    import keras_hub

    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=32,
        image_size=16,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
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


def tiny_gemma_causal_lm():
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=32,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=64,
        head_dim=8,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def tiny_mistral_causal_lm():
    import keras_hub

    backbone = keras_hub.models.MistralBackbone(
        vocabulary_size=32,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        sliding_window=16,
    )
    return keras_hub.models.MistralCausalLM(backbone=backbone, preprocessor=None)


def tiny_llama_causal_lm():
    import keras_hub

    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=32,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
    )
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


TINY_CAUSAL_LMS = {
    "gemma": tiny_gemma_causal_lm,
    "gemma3": tiny_gemma3_causal_lm,
    "mistral": tiny_mistral_causal_lm,
    "llama": tiny_llama_causal_lm,
}


def token_batch(batch=2, length=8, vocabulary=32, seed=0):
    """Random token inputs, next-token targets and an all-ones mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocabulary, size=(batch, length + 1)).astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((batch, length), dtype="int32"),
    }
    return x, tokens[:, 1:], np.ones((batch, length), dtype="float32")


@pytest.fixture
def gemma3_lm():
    import keras

    keras.utils.set_random_seed(0)
    return tiny_gemma3_causal_lm()


def backend_gradient(function, value):
    """Gradient of the scalar `function(value)` w.r.t. `value`, as numpy.

    Written once per backend so that gradient tests run on all three.
    """
    import keras

    backend = keras.backend.backend()
    value = np.asarray(value, dtype="float32")
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(function)(jax.numpy.asarray(value)))
    if backend == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(value)
        with tf.GradientTape() as tape:
            result = function(variable)
        return tape.gradient(result, variable).numpy()
    if backend == "torch":
        import torch

        tensor = torch.tensor(value, requires_grad=True)
        function(tensor).backward()
        return tensor.grad.detach().cpu().numpy()
    raise ValueError(f"No gradient helper for backend {backend!r}.")
