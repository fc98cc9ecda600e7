"""Export MatQuant models with packed codes, and load them at any precision.

`export` writes a copy of a model whose MatQuant layers store packed r-bit
codes with a float32 scale and zero point per channel, and no float master
kernel. Exported at the parent width (int8 by default), the file is one
Matryoshka artifact: `load(path, bits=r)` or `load(path, plan=...)`
derives the codes of any lower precision when it loads, so one file serves
every precision.

The carry rule: codes are sliced with round-half-up, so an r-bit code is
derived from the int8 code (`S(q, r)`), not read as its top r bits. For
int8 code 96 and r = 2, the top two bits are `01` but the int2 code is 2.
"""

import json
import os
import shutil
import tempfile
import zipfile

import keras

from keras_matquant.layers.tree import matquant_layers
from keras_matquant.quantizers import validate_bits

_LAYER_CLASSES = ("keras_matquant>MatQuantDense", "keras_matquant>MatQuantEinsumDense")
_CONFIG_KEY = "matquant_layers"


def check_bits_or_plan(bits, plan):
    """Reject `bits` and `plan` given together, or a plan that is not a dict.

    Example:

    >>> check_bits_or_plan(4, None)  # no error
    """
    if bits is not None and plan is not None:
        raise ValueError(
            f"Pass either `bits` or `plan`, not both. Received: bits={bits!r} "
            "and a plan."
        )
    if plan is not None and not isinstance(plan, dict):
        raise ValueError(
            "`plan` must be a dict {layer_path: bits}. Received: plan of type "
            f"{type(plan).__name__}."
        )


def _planned_bits(options_by_path, bits, plan, keep_unnamed):
    """Return `{path: stored_bits}` for the layers whose storage changes."""
    if plan is not None:
        unknown = [path for path in plan if path not in options_by_path]
        if unknown:
            raise ValueError(
                f"Plan paths {unknown} are not MatQuant layers of the model. "
                f"Valid layer paths: {list(options_by_path)}."
            )
    result = {}
    for path, options in options_by_path.items():
        if plan is not None and path in plan:
            value = plan[path]
        elif bits is not None:
            value = bits
        elif keep_unnamed:
            continue
        else:
            value = options["bits"]
        result[path] = validate_bits(
            value,
            name=f"plan['{path}']" if plan is not None else "bits",
            max_bits=options["bits"],
        )
    return result


def _stored_options(options, stored_bits):
    options = dict(options)
    options.update(
        {"stored_bits": stored_bits, "learnable_clipping": False, "clipping_init": None}
    )
    return options


def _layer_entries(config, found=None):
    """Find the MatQuant layer options in a serialized model config.

    Returns a list of `(path, options_dict)` where the dict is the one in
    `config` to edit: the entries of a KerasHub backbone's
    `"matquant_layers"`, or the config of a MatQuant layer in a plain Keras
    model (path: its name).
    """
    found = [] if found is None else found
    if isinstance(config, dict):
        if isinstance(config.get(_CONFIG_KEY), dict):
            for path, options in config[_CONFIG_KEY].items():
                found.append((path, options))
        if config.get("registered_name") in _LAYER_CLASSES and "config" in config:
            found.append((config["config"]["name"], config["config"]))
        for key, value in config.items():
            if key != _CONFIG_KEY:
                _layer_entries(value, found)
    elif isinstance(config, list):
        for value in config:
            _layer_entries(value, found)
    return found


def _rewrite_config(config, bits, plan, keep_unnamed):
    entries = _layer_entries(config)
    if not entries:
        raise ValueError(
            "The model has no MatQuant layers to export or load at a "
            "precision. Matquantize it first (`keras_matquant.matquantize`)."
        )
    options_by_path = {path: options for path, options in entries}
    planned = _planned_bits(options_by_path, bits, plan, keep_unnamed)
    for path, options in entries:
        if path in planned:
            options.update(_stored_options(options, planned[path]))
    return planned


def _exported_copy(model, bits, plan):
    import keras_hub

    is_task = isinstance(model, keras_hub.models.Task)
    root = model.backbone if is_task else model
    config = keras.saving.serialize_keras_object(root)
    planned = _rewrite_config(config, bits, plan, keep_unnamed=False)
    copy = keras.saving.deserialize_keras_object(config)
    _copy_weights(root, copy)
    if is_task:
        copy = type(model)(backbone=copy, preprocessor=model.preprocessor)
    return copy, planned


def _copy_weights(source, target):
    source_layers = matquant_layers(source)
    target_layers = matquant_layers(target)
    if list(source_layers) != list(target_layers):
        raise ValueError(
            "The exported copy does not have the MatQuant layers of the model "
            f"({list(target_layers)} instead of {list(source_layers)})."
        )
    skip = set()
    for path, layer in target_layers.items():
        skip.update(id(variable) for variable in layer.weights)
        source_layer = source_layers[path]
        if source_layer.stored_bits is not None:
            raise ValueError(
                f"Layer '{path}' of the model already stores "
                f"{source_layer.stored_bits}-bit codes. Export from the model "
                "with float master weights, or load the exported file with "
                "`keras_matquant.serving.load(path, bits=...)`."
            )
        layer.store_codes_from(source_layer)

    source_variables = {variable.path: variable for variable in source.weights}
    for variable in target.weights:
        if id(variable) in skip:
            continue
        if variable.path not in source_variables:
            raise ValueError(
                f"The exported copy has a variable '{variable.path}' that the "
                "model does not have; the model cannot be exported this way."
            )
        variable.assign(source_variables[variable.path])


def export(model, path, bits=None, plan=None):
    """Write a copy of a model with packed codes in its MatQuant layers.

    Every MatQuant layer of the copy stores its codes at the requested
    precision, packed into bytes, with a float32 scale and zero point per
    channel and no float master kernel. Four int2 or two int4 codes fill a
    byte; 3-, 5-, 6- and 7-bit codes form a bit stream. Learned clipping is
    baked into the scales. The model itself is not changed.

    Args:
        model: a Keras model, or a KerasHub `CausalLM` or `Backbone`, with
            MatQuant layers that keep float master kernels.
        path: str, a `.keras` file, or a directory for a KerasHub preset
            (`save_to_preset`).
        bits: int, the precision of every MatQuant layer. With neither
            `bits` nor `plan`, each layer is stored at its own `bits` (int8
            by default): the artifact from which `load` derives any
            precision.
        plan: dict `{layer_path: bits}` (Mix'n'Match); layers it does not
            name are stored at their own `bits`.

    Returns:
        The exported model (in memory), as it was written.

    Raises:
        ValueError: if both `bits` and `plan` are given, or the model has
            no MatQuant layers. Also if the plan names an unknown layer path
            (the message lists valid paths) or a precision is outside
            `1..layer.bits`, or `path` is neither a `.keras` file nor a
            directory path for a KerasHub model.

    Example:

    ```python
    keras_matquant.serving.export(causal_lm, "gemma3-int8.keras")
    int4_lm = keras_matquant.serving.load("gemma3-int8.keras", bits=4)
    ```
    """
    check_bits_or_plan(bits, plan)
    path = os.fspath(path)
    copy, _ = _exported_copy(model, bits, plan)
    if path.endswith(".keras"):
        copy.save(path)
    elif hasattr(copy, "save_to_preset"):
        copy.save_to_preset(path)
    else:
        raise ValueError(
            f"Cannot write {path!r}: use a path ending in '.keras', or a "
            "directory for a KerasHub model preset."
        )
    return copy


def _rewrite_keras_file(path, directory, bits, plan):
    rewritten = os.path.join(directory, os.path.basename(path))
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(rewritten, "w") as target:
        config = json.loads(source.read("config.json"))
        _rewrite_config(config, bits, plan, keep_unnamed=True)
        for item in source.infolist():
            if item.filename == "config.json":
                target.writestr(item, json.dumps(config))
            else:
                with source.open(item) as reader, target.open(item, "w") as writer:
                    shutil.copyfileobj(reader, writer)
    return rewritten


def _rewrite_preset(path, directory, bits, plan):
    rewritten = os.path.join(directory, "preset")
    os.makedirs(rewritten)
    for name in os.listdir(path):
        source = os.path.join(os.path.abspath(path), name)
        if name == "config.json":
            with open(source) as file:
                config = json.load(file)
            _rewrite_config(config, bits, plan, keep_unnamed=True)
            with open(os.path.join(rewritten, name), "w") as file:
                json.dump(config, file)
        else:
            os.symlink(source, os.path.join(rewritten, name))
    return rewritten


def load(path, bits=None, plan=None):
    """Load a saved MatQuant model, optionally at another stored precision.

    With `bits` or `plan`, the MatQuant layers named are rebuilt to store
    codes of that precision, derived when the weights load. They come from
    codes stored at the parent width (an `export` without `bits`), or from
    float master weights (a trained model saved with `save` or
    `save_to_preset`).
    Without either, this is `keras.saving.load_model` (or `from_preset`).

    Args:
        path: str, a `.keras` file or a KerasHub preset directory.
        bits: int, the stored precision of every MatQuant layer.
        plan: dict `{layer_path: bits}`; layers it does not name load as
            saved.

    Returns:
        The loaded model.

    Raises:
        ValueError: if both `bits` and `plan` are given, the plan names an
            unknown path, a precision is outside `1..layer.bits`, or the
            saved codes cannot give the precision (codes stored below the
            parent width serve only their own precision).

    Example:

    ```python
    int2_lm = keras_matquant.serving.load("gemma3-int8.keras", bits=2)
    ```
    """
    check_bits_or_plan(bits, plan)
    path = os.fspath(path)
    is_preset = os.path.isdir(path)
    if not is_preset and not os.path.isfile(path):
        raise FileNotFoundError(f"No saved model at {path!r}.")
    with tempfile.TemporaryDirectory() as directory:
        if is_preset:
            if bits is not None or plan is not None:
                path = _rewrite_preset(path, directory, bits, plan)
            return _load_preset(path)
        if bits is not None or plan is not None:
            path = _rewrite_keras_file(path, directory, bits, plan)
        return keras.saving.load_model(path)


def _load_preset(path):
    import keras_hub

    if os.path.exists(os.path.join(path, "task.json")):
        return keras_hub.models.CausalLM.from_preset(path)
    return keras_hub.models.Backbone.from_preset(path)


def stored_precisions(model):
    """Return how each MatQuant layer of a model keeps its weights.

    Args:
        model: a Keras model or KerasHub `CausalLM` / `Backbone`.

    Returns:
        A dict `{path: stored_bits}`; None means the layer still keeps its
        float master kernel.

    Example:

    ```python
    stored_precisions(keras_matquant.serving.load("gemma3-int8.keras"))
    ```
    """
    return {
        path: layer.stored_bits for path, layer in matquant_layers(model).items()
    }


def saved_precisions(path):
    """Return how each MatQuant layer of a saved `.keras` file keeps weights.

    Reads only the file's config, so it is cheap. A layer whose value is
    None still contains its float master kernel in the file (a trained model
    saved with `save`, not an export).

    Args:
        path: str, a `.keras` file or a KerasHub preset directory.

    Returns:
        A dict `{path: stored_bits or None}`.

    Raises:
        ValueError: if the file has no MatQuant layers.

    Example:

    ```python
    saved_precisions("gemma3-int4.keras")  # {'decoder_block_0/ffw_gating': 4, ...}
    ```
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json")) as file:
            config = json.load(file)
    else:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    entries = _layer_entries(config)
    if not entries:
        raise ValueError(f"The saved model at {path!r} has no MatQuant layers.")
    return {name: options.get("stored_bits") for name, options in entries}

