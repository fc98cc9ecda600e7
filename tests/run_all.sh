#!/usr/bin/env bash
# Set up a virtual environment and run the test suite on every backend.
#
# JAX runs every test. TensorFlow and PyTorch run the backend-neutral tests
# (quantizers, layers, serialization, serving, Mix'n'Match, surgery, training
# and its recipes, evaluation, the lm-eval adapter, data pipelines, command
# line). The GGUF import tests check numpy arrays read from the file, and the
# accumulation memory test reads XLA's buffer sizes, so they run on JAX only.
# So do the JAX-specific tests: sharded fit steps on 4 virtual CPU devices
# (tests/test_distribution.py starts them in a subprocess), XLA compilations
# of the train step, and the quickstart notebook, which
# tests/test_notebooks.py executes with nbclient.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"

backend_neutral_tests=(
    tests/test_quantizers.py
    tests/test_precision.py
    tests/test_layers.py
    tests/test_clipping.py
    tests/test_dtype_policies.py
    tests/test_serialization.py
    tests/test_packing.py
    tests/test_serving.py
    tests/test_mix_n_match.py
    tests/test_surgery.py
    tests/test_training.py
    tests/test_co_distillation.py
    tests/test_recipes.py
    tests/test_schedules.py
    tests/test_omniquant.py
    tests/test_evaluation.py
    tests/test_lm_eval.py
    tests/test_data.py
    tests/test_data_pipeline.py
    tests/test_cli.py
)

echo "== JAX: every test"
KERAS_BACKEND=jax .venv/bin/python -m pytest -q
for backend in tensorflow torch; do
    echo "== ${backend}: backend-neutral tests"
    KERAS_BACKEND="${backend}" .venv/bin/python -m pytest -q "${backend_neutral_tests[@]}"
done
