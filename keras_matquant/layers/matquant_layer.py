"""Behaviour shared by `MatQuantDense` and `MatQuantEinsumDense`."""

import keras
import numpy as np
from keras import ops

from keras_matquant import quantizers
from keras_matquant.precision import active_precision

# Saved beside a layer's variables so that weights saved with one bit
# configuration are never loaded into a layer with another.
_RECORD_KEY = "matquant"
_RECORD_VERSION = 1
_CLIPPING_VARIABLES = ("clip_max_logit", "clip_min_logit")


def validate_options(bits, slicing, learnable_clipping, clipping_init):
    """Check the MatQuant options of a layer and return them as a dict.

    Args:
        bits: int in `1..8`, the width c of the parent codes.
        slicing: str, `"clamped"` or `"extra_precision"`.
        learnable_clipping: bool, whether the layer learns per-channel
            clipping factors (OmniQuant's LWC).
        clipping_init: None, or a float in `(0, 1]`: the initial clipping
            factor. None means OmniQuant's logit 4.0 (factor 0.982).

    Returns:
        A dict with the four options, validated.

    Raises:
        ValueError: if any option is invalid, or `clipping_init` is given
            without `learnable_clipping=True`.

    Example:

    >>> validate_options(8, "clamped", True, 0.9)["clipping_init"]
    0.9
    """
    bits = quantizers.validate_bits(bits)
    slicing = quantizers.validate_slicing(slicing)
    if not isinstance(learnable_clipping, bool):
        raise ValueError(
            "`learnable_clipping` must be True or False. Received: "
            f"learnable_clipping={learnable_clipping!r}."
        )
    if clipping_init is not None:
        clipping_init = quantizers.validate_clipping(clipping_init)
        if not learnable_clipping:
            raise ValueError(
                f"`clipping_init={clipping_init}` only applies to learnable "
                "clipping. Pass `learnable_clipping=True`, or drop "
                "`clipping_init`."
            )
    return {
        "bits": bits,
        "slicing": slicing,
        "learnable_clipping": learnable_clipping,
        "clipping_init": clipping_init,
    }


def check_finite_kernel(kernel, reduce_axes, name):
    """Raise if a kernel contains NaN or inf, naming the first bad channel.

    Args:
        kernel: the kernel tensor or variable.
        reduce_axes: tuple of int, the axes that make up one channel.
        name: str, the layer name or path used in the message.

    Raises:
        ValueError: if any entry is NaN or infinite.

    Example:

    >>> check_finite_kernel(np.ones((4, 3)), (0,), "dense")  # no error
    """
    kernel = np.asarray(ops.convert_to_numpy(ops.cast(kernel, "float32")))
    finite = np.all(np.isfinite(kernel), axis=tuple(reduce_axes))
    if not np.all(finite):
        channel = int(np.flatnonzero(~finite.reshape(-1))[0])
        raise ValueError(
            f"Layer '{name}' has NaN or inf in its kernel (first in output "
            f"channel {channel} of {finite.size}). Fix or retrain the weights "
            "before quantizing them."
        )


class MatQuantLayerMixin:
    """Fake-quantizes a layer's float kernel at the active precision.

    A subclass keeps Keras's float `kernel` variable as the trainable master
    weight, and its forward pass uses `fake_quantized_kernel()`: the kernel
    quantized per output channel to `bits`-bit codes, sliced to the active
    precision (see `keras_matquant.precision`) and dequantized, with a
    straight-through gradient. The subclass defines `channel_reduce_axes`
    and `apply_kernel`.

    The quantization arithmetic runs in float32 under every dtype policy:
    the kernel is read without autocasting, clipping logits are float32
    variables, and only the dequantized kernel is cast to the compute dtype.
    """

    def _init_matquant(self, options):
        if self.quantization_mode is not None:
            raise ValueError(
                f"Layer '{self.name}' got the quantized dtype policy "
                f"{self.dtype_policy.name!r}. A MatQuant layer quantizes its "
                "float kernel itself; pass a float policy such as "
                "'float32', 'bfloat16' or 'mixed_bfloat16'."
            )
        if self.lora_rank:
            raise ValueError(
                f"Layer '{self.name}' got lora_rank={self.lora_rank}; LoRA is "
                "not supported on MatQuant layers. Create it without "
                "`lora_rank`."
            )
        self.bits = options["bits"]
        self.slicing = options["slicing"]
        self.learnable_clipping = options["learnable_clipping"]
        self.clipping_init = options["clipping_init"]

    @property
    def channel_reduce_axes(self):
        """Kernel axes contracted with the input, reduced per channel."""
        raise NotImplementedError

    def apply_kernel(self, inputs, kernel):
        """Contract `inputs` with `kernel` (matmul or einsum)."""
        raise NotImplementedError

    def add_weight(self, *args, **kwargs):
        # The float master kernel is read in its own dtype (float32 under
        # mixed policies) so that large weights survive quantization.
        if kwargs.get("name") == "kernel":
            kwargs["autocast"] = False
        return super().add_weight(*args, **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        if self.learnable_clipping:
            self._build_clipping()

    def _build_clipping(self):
        shape = tuple(
            1 if axis in self.channel_reduce_axes else size
            for axis, size in enumerate(self._kernel.shape)
        )
        if self.clipping_init is None:
            logit = quantizers.DEFAULT_CLIPPING_LOGIT
        else:
            logit = quantizers.clipping_logit(self.clipping_init)
        for name in _CLIPPING_VARIABLES:
            variable = self.add_weight(
                name=name,
                shape=shape,
                initializer=keras.initializers.Constant(logit),
                dtype="float32",
                autocast=False,
            )
            setattr(self, name, variable)

    def enable_lora(self, *args, **kwargs):
        raise ValueError(
            f"Layer '{self.name}' is a MatQuant layer; LoRA is not supported "
            "on it. Train the float master kernel with `MatQuantModel`."
        )

    def resolve_precision(self):
        """Return the precision this layer runs at in the current scope.

        Returns:
            An int in `1..bits`, or None for the float master kernel.

        Raises:
            ValueError: if the active precision exceeds the layer's `bits`.
        """
        bits = active_precision(default=self.bits)
        if bits is not None and bits > self.bits:
            raise ValueError(
                f"Layer '{self.name}' stores {self.bits}-bit codes and cannot "
                f"run at precision({bits}). Use a precision in 1..{self.bits}, "
                "or None for the float kernel."
            )
        return bits

    def clipping_factors(self):
        """Return the per-channel clipping factors, or `(None, None)`.

        Returns:
            `(clip_max, clip_min)`: the sigmoids of the clipping logits as
            float32 tensors shaped like the kernel with size 1 on the
            contracted axes, or `(None, None)` without learnable clipping.
        """
        if not self.learnable_clipping:
            return None, None
        return (
            ops.sigmoid(ops.cast(self.clip_max_logit, "float32")),
            ops.sigmoid(ops.cast(self.clip_min_logit, "float32")),
        )

    def _quantizer_arguments(self):
        clip_max, clip_min = self.clipping_factors()
        return {
            "bits": self.bits,
            "reduce_axes": self.channel_reduce_axes,
            "clip_max": clip_max,
            "clip_min": clip_min,
        }

    def fake_quantized_kernel(self):
        """Return the kernel used by the forward pass at the active precision.

        Returns:
            A tensor in the compute dtype: the float kernel under
            `precision(None)`; otherwise the kernel quantized to `bits`-bit
            codes, sliced to the active precision and dequantized. Its
            gradient reaches the kernel by the straight-through estimator
            (and the clipping logits, when learned, through the scale).
        """
        kernel = self.kernel
        bits = self.resolve_precision()
        if bits is None:
            return ops.cast(kernel, self.compute_dtype)
        w_hat = quantizers.fake_quantize(
            ops.cast(kernel, "float32"),
            target_bits=bits,
            slicing=self.slicing,
            **self._quantizer_arguments(),
        )
        return ops.cast(w_hat, self.compute_dtype)

    def quantization_parameters(self):
        """Return the float32 per-channel scale and zero point of the codes.

        Returns:
            A `QuantizationParameters(scale, zero_point)` for the layer's
            `bits`-bit codes, float32 under every dtype policy, shaped like
            the kernel with size 1 on the contracted axes.

        Example:

        ```python
        scale, zero_point = layer.quantization_parameters()
        ```
        """
        arguments = self._quantizer_arguments()
        return quantizers.compute_quantization_parameters(
            ops.cast(self.kernel, "float32"),
            bits=arguments["bits"],
            reduce_axes=arguments["reduce_axes"],
            clip_max=arguments["clip_max"],
            clip_min=arguments["clip_min"],
        )

    def quantized_codes(self, precision=None):
        """Return the integer codes of the kernel at a precision.

        Args:
            precision: int in `1..bits`, or None for the layer's `bits`.

        Returns:
            An int32 tensor of the kernel's shape with r-bit codes in
            `0..2**r - 1` (up to `2**r` with `"extra_precision"` slicing).
            The weight they stand for is
            `scale * (code * 2**(bits - r) - zero_point)`.

        Example:

        ```python
        int4_codes = layer.quantized_codes(4)
        ```
        """
        target_bits = self._check_precision_argument(precision)
        params = self.quantization_parameters()
        codes = quantizers.quantize(
            ops.cast(self.kernel, "float32"), *params, bits=self.bits
        )
        codes = quantizers.slice_codes(
            codes, self.bits, target_bits, slicing=self.slicing
        )
        codes = ops.divide(codes, float(2 ** (self.bits - target_bits)))
        return ops.cast(codes, "int32")

    def effective_bits(self, precision=None):
        """Return the average storage bits per kernel weight at a precision.

        `r` with clamped slicing; `r` plus the fraction of weights in the
        extra level `2**r` with extra-precision slicing.

        Args:
            precision: int in `1..bits`, or None for the layer's `bits`.

        Returns:
            A Python float.

        Example:

        ```python
        layer.effective_bits(2)  # 2.0, or e.g. 2.05 with extra precision
        ```
        """
        target_bits = self._check_precision_argument(precision)
        if self.slicing == "clamped" or target_bits == self.bits:
            return float(target_bits)
        params = self.quantization_parameters()
        codes = quantizers.quantize(
            ops.cast(self.kernel, "float32"), *params, bits=self.bits
        )
        bits = quantizers.effective_bits(
            codes, self.bits, target_bits, slicing=self.slicing
        )
        return float(ops.convert_to_numpy(bits))

    def _check_precision_argument(self, precision):
        if precision is None:
            return self.bits
        return quantizers.validate_bits(
            precision, name="precision", max_bits=self.bits
        )

    def call(self, inputs, training=None):
        x = self.apply_kernel(inputs, self.fake_quantized_kernel())
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "bits": self.bits,
                "slicing": self.slicing,
                "learnable_clipping": self.learnable_clipping,
                "clipping_init": self.clipping_init,
            }
        )
        return config

    def matquant_options(self):
        """Return the layer's MatQuant options as a dict.

        Returns:
            `{"bits", "slicing", "learnable_clipping", "clipping_init"}`.
        """
        return {
            "bits": self.bits,
            "slicing": self.slicing,
            "learnable_clipping": self.learnable_clipping,
            "clipping_init": self.clipping_init,
        }

    @classmethod
    def _from_float_layer(cls, layer, float_class, options):
        options = validate_options(**options)
        check_source_layer(layer, float_class)
        check_finite_kernel(layer.kernel, cls._reduce_axes_for(layer), layer.name)
        config = layer.get_config()
        config.update(options)
        new_layer = cls.from_config(config)
        new_layer.build_from_config(layer.get_build_config())
        new_layer._copy_weights_from(layer)
        return new_layer

    @classmethod
    def _reduce_axes_for(cls, layer):
        raise NotImplementedError

    def quantize(self, mode=None, **kwargs):
        raise ValueError(
            f"Layer '{self.name}' is a MatQuant layer, which quantizes its "
            f"kernel itself; Keras's `quantize(mode={mode!r})` cannot be "
            "applied on top. Use `keras_matquant.precision(bits)` to choose "
            "the precision."
        )

    def _copy_weights_from(self, source):
        """Assign every variable of `source` to the same-named variable."""
        source_weights = {v.name: v for v in source.weights}
        target_weights = {
            v.name: v for v in self.weights if v.name not in _CLIPPING_VARIABLES
        }
        if set(source_weights) != set(target_weights):
            raise ValueError(
                f"Cannot copy the weights of layer '{source.name}': it has "
                f"variables {sorted(source_weights)} but the MatQuant layer "
                f"has {sorted(target_weights)}."
            )
        for name, variable in target_weights.items():
            value = source_weights[name]
            if tuple(variable.shape) != tuple(value.shape):
                raise ValueError(
                    f"Cannot copy variable '{name}' of layer '{source.name}': "
                    f"shape {tuple(value.shape)} does not match "
                    f"{tuple(variable.shape)}."
                )
            variable.assign(value)

    # Saving: the variables in a fixed order, plus a record of the options.

    def _saved_variables(self):
        variables = [self._kernel]
        if self.bias is not None:
            variables.append(self.bias)
        if self.learnable_clipping:
            variables.extend(getattr(self, name) for name in _CLIPPING_VARIABLES)
        return variables

    def _options_record(self):
        return np.array(
            [
                _RECORD_VERSION,
                self.bits,
                quantizers.SLICING_MODES.index(self.slicing),
                int(self.learnable_clipping),
            ],
            dtype="int32",
        )

    def save_own_variables(self, store):
        if not self.built:
            return
        for index, variable in enumerate(self._saved_variables()):
            store[str(index)] = variable
        store[_RECORD_KEY] = self._options_record()

    def load_own_variables(self, store):
        variables = self._saved_variables() if self.built else []
        keys = set(store.keys())
        expected = {str(index) for index in range(len(variables))}
        if _RECORD_KEY in keys:
            self._check_saved_options(np.asarray(store[_RECORD_KEY]))
            keys.discard(_RECORD_KEY)
        elif self.learnable_clipping:
            raise ValueError(
                f"Layer '{self.name}' learns clipping factors, but the weights "
                "being loaded come from a float layer without them. Load them "
                "into a layer created with `learnable_clipping=False`."
            )
        if keys != expected:
            raise ValueError(
                f"Layer '{self.name}' expected {len(expected)} saved variables "
                f"but received {len(keys)} ({sorted(keys)}). The weights were "
                "saved from a layer with other variables; rebuild the layer "
                "like the saved one before loading."
            )

        values = [np.asarray(store[str(index)]) for index in range(len(variables))]
        for variable, value in zip(variables, values):
            if tuple(variable.shape) != tuple(value.shape):
                raise ValueError(
                    f"Layer '{self.name}': saved variable for "
                    f"'{variable.name}' has shape {tuple(value.shape)}, but "
                    f"the layer's has {tuple(variable.shape)}. Nothing was "
                    "loaded into this layer."
                )
        for variable, value in zip(variables, values):
            variable.assign(value)

    def _check_saved_options(self, record):
        if record.shape != (4,) or int(record[0]) != _RECORD_VERSION:
            raise ValueError(
                f"Layer '{self.name}': the saved MatQuant record {record.tolist()} "
                f"is not of version {_RECORD_VERSION}; it was written by another "
                "version of keras-matquant."
            )
        _, bits, slicing_index, clipping = (int(value) for value in record)
        if not 0 <= slicing_index < len(quantizers.SLICING_MODES):
            raise ValueError(
                f"Layer '{self.name}': the saved slicing index {slicing_index} "
                "is unknown to this version of keras-matquant."
            )
        saved = {
            "bits": bits,
            "slicing": quantizers.SLICING_MODES[slicing_index],
            "learnable_clipping": bool(clipping),
        }
        current = {key: self.matquant_options()[key] for key in saved}
        if saved != current:
            raise ValueError(
                f"Layer '{self.name}' has options {current}, but its weights "
                f"were saved with {saved}. Nothing was loaded into this layer. "
                "Create (or matquantize) the layer with the saved options "
                "before loading the weights."
            )


def check_source_layer(layer, expected_class):
    """Reject a layer that cannot be converted to a MatQuant layer."""
    if not isinstance(layer, expected_class):
        raise ValueError(
            f"Layer '{getattr(layer, 'name', layer)}' is a "
            f"{type(layer).__name__}, expected a {expected_class.__name__}."
        )
    if isinstance(layer, MatQuantLayerMixin):
        raise ValueError(
            f"Layer '{layer.name}' is already a {type(layer).__name__} with "
            f"bits={layer.bits}. Matquantize each layer once; to add other "
            "layers, select only those (for example targets='attention' "
            "after 'ffn')."
        )
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' is not built yet. Build the model (call "
            "it once, or build it from its config) before matquantizing it."
        )
    if layer.quantization_mode is not None:
        raise ValueError(
            f"Layer '{layer.name}' is already quantized by Keras "
            f"(mode {layer.quantization_mode!r}). Matquantize the float model."
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.name}' has LoRA enabled. Merge or drop the LoRA "
            "weights before matquantizing it."
        )
