"""Behaviour shared by `MatQuantDense` and `MatQuantEinsumDense`."""

from keras import ops

from keras_matquant import quantizers
from keras_matquant.precision import active_precision


class MatQuantLayerMixin:
    """Fake-quantizes a layer's float kernel at the active precision.

    A subclass keeps Keras's float `kernel` variable as the trainable master
    weight, and its forward pass uses `fake_quantized_kernel()`: the kernel
    quantized per output channel to `bits`-bit codes, sliced to the active
    precision (see `keras_matquant.precision`) and dequantized, with a
    straight-through gradient. The subclass defines `channel_reduce_axes`.
    """

    def _init_matquant(self, bits, slicing):
        self.bits = quantizers.validate_bits(bits)
        self.slicing = quantizers.validate_slicing(slicing)

    @property
    def channel_reduce_axes(self):
        """Kernel axes contracted with the input, reduced per channel."""
        raise NotImplementedError

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

    def fake_quantized_kernel(self):
        """Return the kernel used by the forward pass at the active precision.

        Returns:
            The float kernel under `precision(None)`. Otherwise the kernel
            quantized to `bits`-bit codes, sliced to the active precision and
            dequantized. Its gradient reaches the kernel unchanged
            (straight-through estimator).
        """
        kernel = self.kernel
        bits = self.resolve_precision()
        if bits is None:
            return kernel
        w_hat = quantizers.fake_quantize(
            ops.cast(kernel, "float32"),
            bits=self.bits,
            target_bits=bits,
            reduce_axes=self.channel_reduce_axes,
            slicing=self.slicing,
        )
        return ops.cast(w_hat, self.compute_dtype)

    def call(self, inputs, training=None):
        x = self.apply_kernel(inputs, self.fake_quantized_kernel())
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def apply_kernel(self, inputs, kernel):
        """Contract `inputs` with `kernel` (matmul or einsum)."""
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config.update({"bits": self.bits, "slicing": self.slicing})
        return config

    @classmethod
    def _from_float_layer(cls, layer, float_class, bits, slicing):
        check_source_layer(layer, float_class)
        config = layer.get_config()
        config.update({"bits": bits, "slicing": slicing})
        new_layer = cls.from_config(config)
        new_layer.build_from_config(layer.get_build_config())
        new_layer._copy_weights_from(layer)
        return new_layer

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
        target_weights = {v.name: v for v in self.weights}
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
