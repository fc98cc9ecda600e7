"""Keep MatQuant layers in a KerasHub backbone's config.

A KerasHub backbone serializes only its constructor arguments, and
`from_config` rebuilds its original float layers. So that a matquantized
backbone (and any task holding it) survives `.keras` files and presets, this
module extends `keras_hub.models.Backbone`:

- `get_config()` adds a `"matquant_layers"` entry mapping each MatQuant
  layer path to its options, when the backbone has MatQuant layers;
- `from_config()` removes that entry, builds the float backbone, then swaps
  the same layers with `matquantize` before any weights are loaded;
- `load_weights()` on a backbone with MatQuant layers restores every
  variable when loading fails, so a file saved with other MatQuant options
  changes nothing (Keras would otherwise keep the layers it loaded before
  the failing one).

A backbone without MatQuant layers serializes exactly as before. Importing
`keras_matquant` installs the extension; it is needed anyway to deserialize
the MatQuant layer classes.
"""

import functools

CONFIG_KEY = "matquant_layers"
_INSTALLED_MARK = "_keras_matquant_extension"


def matquant_layer_options(model):
    """Map each MatQuant layer path of a model to its options.

    Args:
        model: a KerasHub `CausalLM` or `Backbone`.

    Returns:
        A dict `{path: options}` where `options` contains `bits`, `slicing`,
        `learnable_clipping`, `clipping_init` and `stored_bits`.

    Example:

    ```python
    matquantize(causal_lm, targets="ffn", bits=8)
    matquant_layer_options(causal_lm)
    # {'decoder_block_0/ffw_gating': {'bits': 8, 'slicing': 'clamped', ...}}
    ```
    """
    from keras_matquant.layers.tree import matquant_layers

    return {
        path: layer.matquant_options()
        for path, layer in matquant_layers(model).items()
    }


def restore_matquant_layers(model, options_by_path):
    """Swap the given layer paths for MatQuant layers with their options.

    Paths that already hold a MatQuant layer with the same options are left
    as they are, so restoring twice is harmless.

    Args:
        model: a built KerasHub `CausalLM` or `Backbone`.
        options_by_path: a dict `{path: options}` as returned by
            `matquant_layer_options`.

    Raises:
        ValueError: if a path is unknown, or contains a MatQuant layer with
            other options.

    Example:

    ```python
    options = matquant_layer_options(trained_lm)
    restore_matquant_layers(fresh_lm, options)
    ```
    """
    from keras_matquant.hub.surgery import matquantize
    from keras_matquant.layers.matquant_layer import validate_options
    from keras_matquant.layers.tree import matquant_layers

    present = matquant_layers(model)
    groups = {}
    for path, options in options_by_path.items():
        options = validate_options(
            int(options["bits"]),
            options["slicing"],
            bool(options.get("learnable_clipping", False)),
            options.get("clipping_init"),
            options.get("stored_bits"),
        )
        if path in present:
            if present[path].matquant_options() != options:
                raise ValueError(
                    f"Layer '{path}' is already a MatQuant layer with options "
                    f"{present[path].matquant_options()}, not {options}."
                )
            continue
        key = tuple(sorted(options.items()))
        groups.setdefault(key, []).append(path)
    for key, paths in groups.items():
        matquantize(model, layer_paths=paths, **dict(key))


def install_backbone_extension():
    """Extend `keras_hub.models.Backbone` to serialize MatQuant layers.

    Safe to call more than once. Called when `keras_matquant` is imported.

    Example:

    ```python
    install_backbone_extension()
    config = backbone.get_config()  # has "matquant_layers" when swapped
    ```
    """
    import keras_hub

    backbone_class = keras_hub.models.Backbone
    if getattr(backbone_class, _INSTALLED_MARK, False):
        return
    original_get_config = backbone_class.get_config
    original_from_config = backbone_class.from_config.__func__

    @functools.wraps(original_get_config)
    def get_config(self):
        config = original_get_config(self)
        options = matquant_layer_options(self)
        if options:
            config[CONFIG_KEY] = options
        return config

    @functools.wraps(original_from_config)
    def from_config(cls, config):
        config = dict(config)
        options = config.pop(CONFIG_KEY, None)
        backbone = original_from_config(cls, config)
        if options:
            restore_matquant_layers(backbone, options)
        return backbone

    original_load_weights = backbone_class.load_weights

    @functools.wraps(original_load_weights)
    def load_weights(self, *args, **kwargs):
        if not matquant_layer_options(self):
            return original_load_weights(self, *args, **kwargs)
        import keras

        saved = [keras.ops.convert_to_numpy(v) for v in self.weights]
        try:
            return original_load_weights(self, *args, **kwargs)
        except Exception:
            for variable, value in zip(self.weights, saved):
                variable.assign(value)
            raise

    backbone_class.get_config = get_config
    backbone_class.from_config = classmethod(from_config)
    backbone_class.load_weights = load_weights
    setattr(backbone_class, _INSTALLED_MARK, True)
