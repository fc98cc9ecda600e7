"""`MatQuantEinsumDense`: a Keras `EinsumDense` trained by MatQuant."""

import keras
from keras import ops

from keras_matquant.layers.matquant_layer import MatQuantLayerMixin
from keras_matquant.layers.matquant_layer import validate_options
from keras_matquant.quantizers import DEFAULT_SLICING


def contracted_kernel_axes(equation):
    """Return the kernel axes that an einsum equation contracts away.

    A kernel axis whose letter does not appear in the output is summed over,
    because it is contracted with the input. Every other kernel axis indexes
    an output channel. For Gemma's query projection `btd,ndh->btnh` the kernel axes
    are (n, d, h) and only d is contracted, so there are n * h channels.

    Args:
        equation: str, an `EinsumDense` equation `"inputs,kernel->output"`.

    Returns:
        A tuple of kernel axis indices.

    Raises:
        ValueError: if the equation is not of the form `"ab,bc->ac"` with
            explicit letters, or its kernel has no contracted axis.

    Example:

    >>> contracted_kernel_axes("btd,ndh->btnh")
    (1,)
    """
    if not isinstance(equation, str) or "->" not in equation or "..." in equation:
        raise ValueError(
            "MatQuantEinsumDense needs an equation with two explicit operands "
            f"such as 'btd,df->btf'. Received: equation={equation!r}."
        )
    operands, output_spec = equation.replace(" ", "").split("->")
    operands = operands.split(",")
    if len(operands) != 2:
        raise ValueError(
            "MatQuantEinsumDense needs an equation with two operands (input "
            f"and kernel). Received: equation={equation!r}."
        )
    kernel_spec = operands[1]
    axes = tuple(i for i, letter in enumerate(kernel_spec) if letter not in output_spec)
    if not axes:
        raise ValueError(
            f"The kernel '{kernel_spec}' of equation {equation!r} has no axis "
            "contracted with the input, so it has no per-channel range to "
            "quantize. Leave this layer in float."
        )
    return axes


@keras.saving.register_keras_serializable(package="keras_matquant")
class MatQuantEinsumDense(MatQuantLayerMixin, keras.layers.EinsumDense):
    """`EinsumDense` layer with Matryoshka-quantized weights.

    Keeps Keras's float `kernel` as the trainable master weight. Every kernel
    index that the equation does not contract with the input is one output
    channel with its own min-max scale and zero point. The forward pass runs
    the einsum with the kernel quantized to `bits`-bit codes, sliced to the
    active `keras_matquant.precision` and dequantized. Gradients reach the
    kernel by the straight-through estimator.

    Args:
        equation: str, the einsum equation, e.g. `"btd,df->btf"`.
        output_shape: int or tuple, the output shape without the batch axis,
            as for `keras.layers.EinsumDense`.
        bits: int in `1..8`, the width c of the parent codes. Defaults to 8.
        slicing: str, how codes are sliced to fewer bits: `"clamped"`
            (default) or `"extra_precision"`.
        learnable_clipping: bool, whether to learn per-channel clipping
            factors for the maximum and minimum (OmniQuant's learnable
            weight clipping), stored as float32 logits. Defaults to False.
        clipping_init: None or float in `(0, 1]`, the initial clipping
            factor when `learnable_clipping=True`. None uses OmniQuant's
            logit 4.0 (factor 0.982).
        stored_bits: None (default) to keep the float master kernel, or an
            int in `1..bits`: the layer then stores packed integer codes of
            that precision, a float32 scale and zero point per channel, and
            no float kernel (see `keras_matquant.serving.export`).
        **kwargs: every other argument of `keras.layers.EinsumDense` (a LoRA
            rank or a quantized dtype policy is rejected).

    References:
        Nair et al., "Matryoshka Quantization", arXiv:2502.06786 (2025).

    Example:

    ```python
    layer = MatQuantEinsumDense("btd,df->btf", output_shape=(None, 64))
    y8 = layer(x)  # x: (batch, time, d)
    with keras_matquant.precision(4):
        y4 = layer(x)
    ```
    """

    def __init__(
        self,
        equation,
        output_shape,
        bits=8,
        slicing=DEFAULT_SLICING,
        learnable_clipping=False,
        clipping_init=None,
        stored_bits=None,
        **kwargs,
    ):
        reduce_axes = contracted_kernel_axes(equation)
        options = validate_options(
            bits, slicing, learnable_clipping, clipping_init, stored_bits
        )
        super().__init__(equation, output_shape, **kwargs)
        self._channel_reduce_axes = reduce_axes
        self._init_matquant(options)

    @property
    def channel_reduce_axes(self):
        return self._channel_reduce_axes

    @classmethod
    def _reduce_axes_for(cls, layer):
        return contracted_kernel_axes(layer.equation)

    def apply_kernel(self, inputs, kernel):
        return ops.einsum(self.equation, inputs, kernel)

    @classmethod
    def from_einsum_dense(
        cls,
        layer,
        bits=8,
        slicing=DEFAULT_SLICING,
        learnable_clipping=False,
        clipping_init=None,
        stored_bits=None,
    ):
        """Create a built `MatQuantEinsumDense` from an `EinsumDense`.

        Args:
            layer: a built `keras.layers.EinsumDense`.
            bits: int in `1..8`, the width of the parent codes.
            slicing: str, the slicing mode.
            learnable_clipping: bool, whether to learn clipping factors.
            clipping_init: None or float in `(0, 1]`, their initial value.
            stored_bits: None, or the precision of packed codes to store
                instead of the float kernel.

        Returns:
            A new built layer with the same name, config and bit-identical
            float weights. `layer` is left unchanged.

        Raises:
            ValueError: if `layer` is not a built float `EinsumDense` (a
                MatQuant layer included), its equation has no contracted
                kernel axis, its kernel contains NaN or inf, or an option is
                invalid.

        Example:

        ```python
        dense = keras.layers.EinsumDense("ab,bc->ac", output_shape=8)
        dense.build((None, 4))
        mq = MatQuantEinsumDense.from_einsum_dense(dense)
        ```
        """
        options = {
            "bits": bits,
            "slicing": slicing,
            "learnable_clipping": learnable_clipping,
            "clipping_init": clipping_init,
            "stored_bits": stored_bits,
        }
        return cls._from_float_layer(layer, keras.layers.EinsumDense, options)
