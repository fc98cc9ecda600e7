"""Execute notebooks/quickstart.ipynb with nbclient and read its results."""

import json
import math
from pathlib import Path

import keras
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the notebook runs its kernel on the JAX backend once per suite",
)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart notebook after a run in a fresh kernel."""
    notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path_factory.mktemp("run"))}},
    )
    client.execute()
    return notebook


def outputs_of(notebook):
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    ]


def test_quickstart_plots_a_figure(quickstart):
    images = [
        output
        for output in outputs_of(quickstart)
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 1


def test_quickstart_reports_every_precision(quickstart):
    last_output = quickstart.cells[-1].outputs[-1]
    results = json.loads(last_output.text)

    precisions = ["8", "6", "4", "3", "2"]
    assert sorted(results["sliced"]) == sorted(precisions)
    assert sorted(results["matquant"]) == sorted(precisions)
    for name in ("sliced", "matquant"):
        for bits in precisions:
            assert math.isfinite(results[name][bits]), (name, bits)
    # int8 codes of a float model reproduce it closely before any training,
    # and MatQuant training lowers the int2 loss.
    assert abs(results["sliced"]["8"] - results["float"]) < 0.02
    assert results["matquant"]["2"] < results["sliced"]["2"]
