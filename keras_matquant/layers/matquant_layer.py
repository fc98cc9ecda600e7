"""Behaviour shared by `MatQuantDense` and `MatQuantEinsumDense`."""

import math

import keras
import numpy as np
from keras import ops

from keras_matquant import packing
from keras_matquant import quantizers
from keras_matquant.precision import active_precision

# Saved beside a layer's variables so that weights saved with one bit
# configuration are never loaded into a layer with another.
_RECORD_KEY = "matquant"
_RECORD_VERSION = 2
_CLIPPING_VARIABLES = ("clip_max_logit", "clip_min_logit")
_STORED_VARIABLES = ("packed_codes", "kernel_scale", "kernel_zero_point")


def validate_options(
    bits, slicing, learnable_clipping, clipping_init, stored_bits=None
):
    """Check the MatQuant options of a layer and return them as a dict.

    Args:
        bits: int in `1..8`, the width c of the parent codes.
        slicing: str, `"clamped"` or `"extra_precision"`.
        learnable_clipping: bool, whether the layer learns per-channel
            clipping factors (OmniQuant's LWC).
        clipping_init: None, or a float in `(0, 1]`: the initial clipping
            factor. None means OmniQuant's logit 4.0 (factor 0.982).
        stored_bits: None for a float master kernel, or an int in
            `1..bits`: the precision of the packed codes the layer stores.

    Returns:
        A dict with the five options, validated.

    Raises:
        ValueError: if any option is invalid, `clipping_init` is given
            without `learnable_clipping=True`, or learnable clipping is
            combined with stored codes.

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
    if stored_bits is not None:
        stored_bits = quantizers.validate_bits(
            stored_bits, name="stored_bits", max_bits=bits
        )
        if learnable_clipping:
            raise ValueError(
                "A layer that stores packed codes has its clipping baked into "
                "its scales; `learnable_clipping=True` cannot be combined with "
                f"`stored_bits={stored_bits}`."
            )
    return {
        "bits": bits,
        "slicing": slicing,
        "learnable_clipping": learnable_clipping,
        "clipping_init": clipping_init,
        "stored_bits": stored_bits,
    }


def storage_width(bits, stored_bits, slicing):
    """Return the bits per stored code of a layer.

    Codes sliced with `"extra_precision"` to fewer bits than the parent can
    reach the extra level `2**r`, so they take one more bit.

    Args:
        bits: int, the parent code width c.
        stored_bits: int, the stored precision r.
        slicing: str, the slicing mode.

    Returns:
        An int in `1..8`.

    Example:

    >>> storage_width(8, 2, "extra_precision")
    3
    """
    if slicing == "extra_precision" and stored_bits < bits:
        return stored_bits + 1
    return stored_bits


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
        self.stored_bits = options["stored_bits"]

    @property
    def channel_reduce_axes(self):
        """Kernel axes contracted with the input, reduced per channel."""
        raise NotImplementedError

    def apply_kernel(self, inputs, kernel):
        """Contract `inputs` with `kernel` (matmul or einsum)."""
        raise NotImplementedError

    def add_weight(self, *args, **kwargs):
        if kwargs.get("name") == "kernel":
            if self.stored_bits is not None:
                # Stored codes replace the float kernel that Keras's build
                # creates.
                self._build_stored_codes(tuple(kwargs["shape"]))
                return None
            # The float master kernel is read in its own dtype (float32
            # under mixed policies) so that large weights survive.
            kwargs["autocast"] = False
        return super().add_weight(*args, **kwargs)

    def _channel_shape(self, kernel_shape):
        return tuple(
            1 if axis in self.channel_reduce_axes else size
            for axis, size in enumerate(kernel_shape)
        )

    def _build_stored_codes(self, kernel_shape):
        self._stored_kernel_shape = kernel_shape
        width = storage_width(self.bits, self.stored_bits, self.slicing)
        self.packed_codes = super().add_weight(
            name="packed_codes",
            shape=(packing.packed_size(math.prod(kernel_shape), width),),
            initializer="zeros",
            dtype="uint8",
            trainable=False,
        )
        for name, initializer in (("kernel_scale", "ones"), ("kernel_zero_point", "zeros")):
            variable = super().add_weight(
                name=name,
                shape=self._channel_shape(kernel_shape),
                initializer=initializer,
                dtype="float32",
                trainable=False,
                autocast=False,
            )
            setattr(self, name, variable)

    @property
    def kernel_shape(self):
        """The shape of the kernel, stored as codes or as a float master."""
        if self.stored_bits is not None:
            return self._stored_kernel_shape
        return tuple(self._kernel.shape)

    @property
    def kernel(self):
        """The float master kernel, or for stored codes their dequantization.

        A layer that stores packed codes has no float kernel; this returns
        the float32 weights its codes stand for at `stored_bits`.
        """
        if self.stored_bits is None:
            return super().kernel
        codes = self._stored_codes_on_parent_grid()
        return quantizers.dequantize(codes, self.kernel_scale, self.kernel_zero_point)

    def build(self, input_shape):
        super().build(input_shape)
        if self.learnable_clipping:
            self._build_clipping()

    def _build_clipping(self):
        shape = self._channel_shape(self._kernel.shape)
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
        default = self.bits if self.stored_bits is None else self.stored_bits
        bits = active_precision(default=default, layer=self)
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
            A layer with stored codes dequantizes those.

        Raises:
            ValueError: if the active precision exceeds `bits`, or a layer
                with stored codes cannot serve it.
        """
        bits = self.resolve_precision()
        if self.stored_bits is not None:
            codes = self._stored_codes_on_parent_grid(self._check_stored_precision(bits))
            w_hat = quantizers.dequantize(codes, self.kernel_scale, self.kernel_zero_point)
            return ops.cast(w_hat, self.compute_dtype)
        kernel = self.kernel
        if bits is None:
            return ops.cast(kernel, self.compute_dtype)
        w_hat = quantizers.fake_quantize(
            ops.cast(kernel, "float32"),
            target_bits=bits,
            slicing=self.slicing,
            **self._quantizer_arguments(),
        )
        return ops.cast(w_hat, self.compute_dtype)

    def _check_stored_precision(self, bits):
        if bits is None:
            raise ValueError(
                f"Layer '{self.name}' stores {self.stored_bits}-bit codes and "
                "no float master kernel, so it cannot run under "
                "precision(None). Use a precision in "
                f"{self._servable_precisions()}."
            )
        if bits != self.stored_bits and self.stored_bits != self.bits:
            raise ValueError(
                f"Layer '{self.name}' stores {self.stored_bits}-bit codes and "
                f"cannot run at precision({bits}): slicing already sliced "
                "codes again is not Matryoshka slicing. Use precision("
                f"{self.stored_bits}), or export at {self.bits} bits to serve "
                "any precision from one file."
            )
        return bits

    def _servable_precisions(self):
        if self.stored_bits == self.bits:
            return f"1..{self.bits}"
        return f"{{{self.stored_bits}}}"

    def _stored_codes_on_parent_grid(self, target_bits=None):
        """Unpack the stored codes and place them on the parent code grid."""
        width = storage_width(self.bits, self.stored_bits, self.slicing)
        codes = packing.unpack_codes_tensor(self.packed_codes, width, self.kernel_shape)
        codes = ops.multiply(codes, float(2 ** (self.bits - self.stored_bits)))
        if target_bits is not None and target_bits < self.stored_bits:
            codes = quantizers.slice_codes(codes, self.bits, target_bits, slicing=self.slicing)
        return codes

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
        if self.stored_bits is not None:
            return quantizers.QuantizationParameters(
                scale=ops.convert_to_tensor(self.kernel_scale),
                zero_point=ops.convert_to_tensor(self.kernel_zero_point),
            )
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
            precision: int in `1..bits`, or None for the layer's `bits` (for
                a layer with stored codes: its `stored_bits`).

        Returns:
            An int32 tensor of the kernel's shape with r-bit codes in
            `0..2**r - 1` (up to `2**r` with `"extra_precision"` slicing).
            The weight they stand for is
            `scale * (code * 2**(bits - r) - zero_point)`.

        Raises:
            ValueError: if the precision is invalid for this layer.

        Example:

        ```python
        int4_codes = layer.quantized_codes(4)
        ```
        """
        target_bits = self._check_precision_argument(precision)
        if self.stored_bits is not None:
            self._check_stored_precision(target_bits)
            codes = self._stored_codes_on_parent_grid(target_bits)
        else:
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
            precision: int in `1..bits`, or None for the layer's `bits` (for
                a layer with stored codes: its `stored_bits`).

        Returns:
            A Python float.

        Example:

        ```python
        layer.effective_bits(2)  # 2.0, or e.g. 2.05 with extra precision
        ```
        """
        target_bits = self._check_precision_argument(precision)
        if self.slicing == "clamped" or target_bits == self.bits:
            if self.stored_bits is not None:
                self._check_stored_precision(target_bits)
            return float(target_bits)
        codes = self.quantized_codes(target_bits)
        in_extra_level = ops.equal(codes, 2**target_bits)
        fraction = ops.mean(ops.cast(in_extra_level, "float32"))
        return target_bits + float(ops.convert_to_numpy(fraction))

    def _check_precision_argument(self, precision):
        if precision is None:
            return self.bits if self.stored_bits is None else self.stored_bits
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
                "stored_bits": self.stored_bits,
            }
        )
        return config

    def matquant_options(self):
        """Return the layer's MatQuant options as a dict.

        Returns:
            `{"bits", "slicing", "learnable_clipping", "clipping_init",
            "stored_bits"}`.
        """
        return {
            "bits": self.bits,
            "slicing": self.slicing,
            "learnable_clipping": self.learnable_clipping,
            "clipping_init": self.clipping_init,
            "stored_bits": self.stored_bits,
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
        if new_layer.stored_bits is None:
            new_layer._copy_weights_from(layer)
        else:
            new_layer._store_float_kernel(layer.kernel)
            if layer.bias is not None:
                new_layer.bias.assign(layer.bias)
        return new_layer

    def _store_float_kernel(self, kernel, clip_max=None, clip_min=None):
        """Quantize a float kernel to `stored_bits` codes and store them."""
        kernel = ops.cast(ops.convert_to_tensor(kernel), "float32")
        params = quantizers.compute_quantization_parameters(
            kernel,
            bits=self.bits,
            reduce_axes=self.channel_reduce_axes,
            clip_max=clip_max,
            clip_min=clip_min,
        )
        codes = quantizers.quantize(kernel, *params, bits=self.bits)
        codes = quantizers.slice_codes(
            codes, self.bits, self.stored_bits, slicing=self.slicing
        )
        codes = ops.divide(codes, float(2 ** (self.bits - self.stored_bits)))
        self._assign_stored(ops.convert_to_numpy(codes), *params)

    def _assign_stored(self, codes, scale, zero_point):
        width = storage_width(self.bits, self.stored_bits, self.slicing)
        packed = packing.pack_codes(np.rint(np.asarray(codes)).astype(np.int64), width)
        self.packed_codes.assign(packed.data)
        self.kernel_scale.assign(scale)
        self.kernel_zero_point.assign(zero_point)

    def store_codes_from(self, source):
        """Store the codes of a float-master MatQuant layer at `stored_bits`.

        Used by export: `source` is the trained layer, `self` the layer of
        the exported model. Learned clipping is baked into the scale and
        zero point.

        Args:
            source: a MatQuant layer of the same class, kernel shape, `bits`
                and `slicing`, with a float master kernel.

        Raises:
            ValueError: if this layer stores no codes, or `source` does not
                match it.

        Example:

        ```python
        exported_layer.store_codes_from(trained_layer)
        ```
        """
        if self.stored_bits is None:
            raise ValueError(
                f"Layer '{self.name}' keeps a float master kernel; create it "
                "with `stored_bits` to store codes."
            )
        if (
            type(source) is not type(self)
            or source.stored_bits is not None
            or (source.bits, source.slicing) != (self.bits, self.slicing)
            or tuple(source.kernel_shape) != tuple(self.kernel_shape)
        ):
            raise ValueError(
                f"Layer '{source.name}' ({type(source).__name__}, "
                f"bits={source.bits}, slicing={source.slicing!r}, stored_bits="
                f"{source.stored_bits}) cannot give codes to layer "
                f"'{self.name}' ({type(self).__name__}, bits={self.bits}, "
                f"slicing={self.slicing!r}); they must match and the source "
                "must have a float master kernel."
            )
        self._store_float_kernel(source.kernel, *source.clipping_factors())
        if self.bias is not None:
            self.bias.assign(source.bias)

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
        if self.stored_bits is not None:
            variables = [getattr(self, name) for name in _STORED_VARIABLES]
        else:
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
                self.stored_bits or 0,
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
        keys = set(store.keys())
        saved = None
        if _RECORD_KEY in keys:
            saved = self._parse_record(np.asarray(store[_RECORD_KEY]))
            keys.discard(_RECORD_KEY)
        elif self.learnable_clipping or self.stored_bits is not None:
            raise ValueError(
                f"Layer '{self.name}' {self._variables_description()}, but "
                "the weights being loaded come from a float layer. Load them "
                "into a layer created without `learnable_clipping` and "
                "`stored_bits`."
            )
        saved_stored_bits = None if saved is None else saved["stored_bits"]
        if saved_stored_bits is None and self.stored_bits is not None:
            return self._load_stored_from_master(store, keys, saved)
        if saved_stored_bits != self.stored_bits:
            return self._load_sliced_codes(store, keys, saved)
        if saved is not None:
            self._check_saved_options(saved)
        self._assign_all(store, keys, self._saved_variables())

    def _variables_description(self):
        if self.stored_bits is not None:
            return f"stores {self.stored_bits}-bit codes"
        return "learns clipping factors"

    def _assign_all(self, store, keys, variables):
        """Check every saved value against `variables`, then assign them."""
        expected = {str(index) for index in range(len(variables))}
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

    def _load_stored_from_master(self, store, keys, saved):
        """Quantize saved float-master weights into this layer's codes."""
        if saved is not None:
            self._check_saved_options(saved, keys=("bits", "slicing"))
        clipping = saved is not None and saved["learnable_clipping"]
        count = 1 + (self.bias is not None) + 2 * clipping
        expected = {str(index) for index in range(count)}
        if keys != expected:
            raise ValueError(
                f"Layer '{self.name}' expected {count} saved variables (float "
                f"kernel{', bias' if self.bias is not None else ''}"
                f"{', clipping logits' if clipping else ''}) but received "
                f"{sorted(keys)}. Nothing was loaded into this layer."
            )
        kernel = np.asarray(store["0"], dtype="float32")
        if tuple(kernel.shape) != tuple(self.kernel_shape):
            raise ValueError(
                f"Layer '{self.name}': the saved kernel has shape "
                f"{tuple(kernel.shape)}, but the layer's is "
                f"{tuple(self.kernel_shape)}. Nothing was loaded."
            )
        bias = np.asarray(store["1"]) if self.bias is not None else None
        clip_max = clip_min = None
        if clipping:
            first = 1 + (self.bias is not None)
            clip_max = ops.sigmoid(np.asarray(store[str(first)], dtype="float32"))
            clip_min = ops.sigmoid(np.asarray(store[str(first + 1)], dtype="float32"))
        self._store_float_kernel(kernel, clip_max, clip_min)
        if bias is not None:
            self.bias.assign(bias)

    def _load_sliced_codes(self, store, keys, saved):
        """Derive this layer's codes from saved codes of the parent width."""
        self._check_saved_options(saved, keys=("bits", "slicing", "learnable_clipping"))
        if self.stored_bits is None or saved["stored_bits"] != self.bits:
            raise ValueError(
                f"Layer '{self.name}' has stored_bits={self.stored_bits}, but "
                f"its weights were saved with stored_bits={saved['stored_bits']}. "
                "Lower precisions can be derived only from codes stored at the "
                f"parent width ({self.bits} bits). Nothing was loaded into "
                "this layer."
            )
        variables = [getattr(self, name) for name in _STORED_VARIABLES]
        if self.bias is not None:
            variables.append(self.bias)
        expected = {str(index) for index in range(len(variables))}
        if keys != expected:
            raise ValueError(
                f"Layer '{self.name}' expected {len(expected)} saved variables "
                f"but received {sorted(keys)}. Nothing was loaded."
            )

        width = storage_width(self.bits, self.bits, self.slicing)
        parent = packing.unpack_codes(
            packing.PackedCodes(np.asarray(store["0"]), width, tuple(self.kernel_shape))
        )
        codes = quantizers.slice_codes(
            parent.astype("float32"), self.bits, self.stored_bits, slicing=self.slicing
        )
        codes = ops.convert_to_numpy(codes) / 2 ** (self.bits - self.stored_bits)

        scale = np.asarray(store["1"])
        zero_point = np.asarray(store["2"])
        if tuple(scale.shape) != tuple(self.kernel_scale.shape):
            raise ValueError(
                f"Layer '{self.name}': saved scales have shape {scale.shape}, "
                f"expected {tuple(self.kernel_scale.shape)}. Nothing was loaded."
            )
        bias = np.asarray(store["3"]) if self.bias is not None else None

        self._assign_stored(codes, scale, zero_point)
        if bias is not None:
            self.bias.assign(bias)

    def _parse_record(self, record):
        versions = {1: (4,), 2: (5,)}
        version = int(record[0]) if record.ndim == 1 and record.size else None
        if version not in versions or record.shape != versions[version]:
            raise ValueError(
                f"Layer '{self.name}': the saved MatQuant record {record.tolist()} "
                "was written by another version of keras-matquant."
            )
        slicing_index = int(record[2])
        if not 0 <= slicing_index < len(quantizers.SLICING_MODES):
            raise ValueError(
                f"Layer '{self.name}': the saved slicing index {slicing_index} "
                "is unknown to this version of keras-matquant."
            )
        stored_bits = int(record[4]) if version >= 2 else 0
        return {
            "bits": int(record[1]),
            "slicing": quantizers.SLICING_MODES[slicing_index],
            "learnable_clipping": bool(record[3]),
            "stored_bits": stored_bits or None,
        }

    def _check_saved_options(self, saved, keys=None):
        keys = keys or tuple(saved)
        saved = {key: saved[key] for key in keys}
        current = {key: self.matquant_options()[key] for key in keys}
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
