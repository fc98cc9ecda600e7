"""The compiled MatQuant train step on JAX: one compilation, no host transfers.

On TPUs and GPUs a train step must compile to one XLA program, because a
host callback stalls the device at every step. A Python branch on a tensor
value cannot be traced at all (JAX raises while tracing), so a step that
compiles under `jax.jit` has none. These tests count XLA compilations from
JAX's compile log and read the lowered program of the step.
"""

import contextlib
import logging
import re

import jax
import keras
import numpy as np
import pytest

import keras_matquant as kmq
from keras_matquant.data import load_bundled_paragraphs
from keras_matquant.data import packed_dataset
from tests.conftest import token_batch
from tests.test_cli import tiny_gemma3_with_tokenizer

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="counts jax.jit compilations and reads JAX's lowered program",
)

# Operations that move data between the device and the host inside an XLA
# program: Python callbacks (jax.debug.print, pure_callback, io_callback)
# lower to custom calls whose target names contain "callback".
HOST_TRANSFER_MARKERS = (
    "callback",
    "stablehlo.send",
    "stablehlo.recv",
    "stablehlo.infeed",
    "stablehlo.outfeed",
)


class CompileLog(logging.Handler):
    """Record the names of the functions that JAX compiles."""

    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        match = re.match(r"Compiling (jit\(\w+\))", record.getMessage())
        if match:
            self.names.append(match.group(1))


@contextlib.contextmanager
def logged_compilations():
    """Collect the names of the functions JAX compiles inside the block."""
    log = CompileLog()
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(log)
    jax.config.update("jax_log_compiles", True)
    try:
        yield log.names
    finally:
        jax.config.update("jax_log_compiles", False)
        jax_logger.removeHandler(log)


@pytest.fixture
def compile_log():
    with logged_compilations() as names:
        yield names


def lowered_train_step(trainer, x, y, sample_weight):
    """Return the StableHLO text of the trainer's jitted train step."""
    state = (
        [v.value for v in trainer.trainable_variables],
        [v.value for v in trainer.non_trainable_variables],
        [v.value for v in trainer.optimizer.variables],
        [v.value for v in trainer.metrics_variables],
    )
    lowered = jax.jit(trainer.train_step).lower(state, (x, y, sample_weight))
    return lowered.as_text()


def host_transfers(program_text):
    return [marker for marker in HOST_TRANSFER_MARKERS if marker in program_text]


@pytest.fixture(scope="module")
def pipeline_fit():
    """Fit a model with learnable clipping on a packed pipeline, 3 epochs."""
    causal_lm = tiny_gemma3_with_tokenizer()
    kmq.matquantize(causal_lm, learnable_clipping=True)
    trainer = kmq.MatQuantModel(causal_lm)
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-3))
    dataset = packed_dataset(
        load_bundled_paragraphs("heldout")[:40],
        causal_lm.preprocessor.tokenizer,
        sequence_length=16,
        batch_size=2,
    ).take(4)

    with logged_compilations() as compilations:
        history = trainer.fit(
            dataset.repeat(), steps_per_epoch=4, epochs=3, shuffle=False, verbose=0
        )
    batch = next(iter(dataset.as_numpy_iterator()))
    return trainer, history.history, compilations, batch


def test_fit_on_pipeline_compiles_once(pipeline_fit):
    trainer, history, compilations, _ = pipeline_fit
    assert len(history["loss"]) == 3
    assert int(keras.ops.convert_to_numpy(trainer.optimizer.iterations)) == 12
    assert compilations.count("jit(train_step)") == 1


def test_train_step_has_no_host_transfers(pipeline_fit):
    trainer, _, _, (x, y, weights) = pipeline_fit

    program = lowered_train_step(trainer, x, y, weights)

    assert host_transfers(program) == []
    # One forward pass per trained precision: 6 matquantized FFN
    # projections in each of 3 passes, each rounding its codes with
    # floor(x + 0.5).
    assert program.count("stablehlo.floor") >= 3 * 6


def test_each_input_shape_compiles_once(gemma3_lm, compile_log):
    # Five training sequences in batches of two end with a batch of one: a
    # second input shape, so XLA compiles the train step a second time
    # (`packed_dataset` drops such a batch). The four validation sequences
    # make two full batches, so the test step compiles once.
    x, y, weights = token_batch(batch=5, length=8)
    kmq.matquantize(gemma3_lm)
    trainer = kmq.MatQuantModel(gemma3_lm)
    trainer.compile(optimizer="sgd")
    validation = token_batch(batch=4, length=8, seed=1)

    trainer.fit(
        x, y, sample_weight=weights, batch_size=2, epochs=2,
        validation_data=validation, verbose=0,
    )

    assert compile_log.count("jit(train_step)") == 2
    assert compile_log.count("jit(test_step)") == 1


def test_host_transfer_check_detects_callback(gemma3_lm):
    x, y, weights = token_batch(batch=2, length=8)
    kmq.matquantize(gemma3_lm)

    class TrainerWithCallback(kmq.MatQuantModel):
        def call(self, inputs, training=None):
            outputs = super().call(inputs, training=training)
            jax.debug.callback(lambda value: None, outputs["int8"][0, 0, 0])
            return outputs

    trainer = TrainerWithCallback(gemma3_lm)
    trainer.compile(optimizer="sgd")
    trainer(x)  # Builds the trainer, so that it can be called statelessly.
    trainer.optimizer.build(trainer.trainable_variables)

    program = lowered_train_step(trainer, x, y, weights)

    assert "callback" in host_transfers(program)
