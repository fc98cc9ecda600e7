"""Memory of the compiled JAX training step, from XLA's buffer assignment.

The figure comes from `jax.jit(...).lower(...).compile()`, so tests/run_all.sh
runs this file on JAX only. The other backends check the accumulated
gradient in test_training.py.
"""

import jax
import keras
import keras_hub

import keras_matquant as kmq
from tests.conftest import token_batch

VOCABULARY = 2048


def activation_heavy_lm():
    """A small Gemma 3 whose activations, not weights, fill the step's memory."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=VOCABULARY,
        image_size=16,
        num_layers=3,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=64,
        intermediate_dim=256,
        head_dim=32,
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


def step_temp_bytes(loss_weights, accumulate_gradients):
    """XLA's temporary buffer size for one compiled training step."""
    x, y, weights = token_batch(batch=2, length=128, vocabulary=VOCABULARY)
    causal_lm = activation_heavy_lm()
    kmq.matquantize(causal_lm)
    kmq.train_only_matquant_layers(causal_lm)
    trainer = kmq.MatQuantModel(
        causal_lm, loss_weights=loss_weights, accumulate_gradients=accumulate_gradients
    )
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-3))
    trainer(x)
    trainer.optimizer.build(trainer.trainable_variables)
    state = (
        [v.value for v in trainer.trainable_variables],
        [v.value for v in trainer.non_trainable_variables],
        [v.value for v in trainer.optimizer.variables],
        [v.value for v in trainer.metrics_variables],
    )
    compiled = jax.jit(trainer.train_step).lower(state, (x, y, weights)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_accumulation_holds_one_pass_of_activations():
    one_precision = step_temp_bytes({8: 1.0}, accumulate_gradients=False)
    plain = step_temp_bytes("gemma", accumulate_gradients=False)
    accumulated = step_temp_bytes("gemma", accumulate_gradients=True)

    # Three precisions hold about three passes of activations without
    # accumulation, and about one with it.
    assert plain > 2.5 * one_precision
    assert accumulated < 1.3 * one_precision
