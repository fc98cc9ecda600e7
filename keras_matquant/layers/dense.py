"""`MatQuantDense`: a Keras `Dense` layer trained and served by MatQuant."""

import keras
from keras import ops

from keras_matquant.layers.matquant_layer import MatQuantLayerMixin
from keras_matquant.quantizers import DEFAULT_SLICING


@keras.saving.register_keras_serializable(package="keras_matquant")
class MatQuantDense(MatQuantLayerMixin, keras.layers.Dense):
    """Densely connected layer with Matryoshka-quantized weights.

    Keeps Keras's float `kernel` as the trainable master weight. The forward
    pass computes `activation(inputs @ w_hat + bias)` where `w_hat` is the
    kernel quantized per output unit (min-max, asymmetric) to `bits`-bit
    codes, sliced to the active `keras_matquant.precision` and dequantized:
    `w_hat = scale * (S(q, r) - zero_point)`. Gradients reach the kernel by
    the straight-through estimator. Outside any precision scope the layer
    runs at `bits` bits.

    Args:
        units: int, dimensionality of the output space.
        bits: int in `1..8`, the width c of the parent codes. Defaults to 8.
        slicing: str, how codes are sliced to fewer bits. Defaults to
            `"clamped"`.
        **kwargs: every other argument of `keras.layers.Dense`.

    References:
        Nair et al., "Matryoshka Quantization", arXiv:2502.06786 (2025).

    Example:

    ```python
    layer = MatQuantDense(32, bits=8)
    y8 = layer(x)
    with keras_matquant.precision(2):
        y2 = layer(x)
    ```
    """

    def __init__(self, units, bits=8, slicing=DEFAULT_SLICING, **kwargs):
        super().__init__(units, **kwargs)
        self._init_matquant(bits, slicing)

    @property
    def channel_reduce_axes(self):
        return (0,)

    def apply_kernel(self, inputs, kernel):
        return ops.matmul(inputs, kernel)

    @classmethod
    def from_dense(cls, layer, bits=8, slicing=DEFAULT_SLICING):
        """Create a built `MatQuantDense` with `layer`'s config and weights.

        Args:
            layer: a built `keras.layers.Dense`.
            bits: int in `1..8`, the width of the parent codes.
            slicing: str, the slicing mode.

        Returns:
            A new built `MatQuantDense` with the same name, config and
            bit-identical float weights. `layer` is left unchanged.

        Raises:
            ValueError: if `layer` is not a built float `Dense` layer, or
                `bits` / `slicing` are invalid.

        Example:

        ```python
        dense = keras.layers.Dense(8)
        dense.build((None, 4))
        mq = MatQuantDense.from_dense(dense, bits=8)
        ```
        """
        return cls._from_float_layer(layer, keras.layers.Dense, bits, slicing)
