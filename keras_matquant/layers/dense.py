"""`MatQuantDense`: a Keras `Dense` layer trained and served by MatQuant."""

import keras
from keras import ops

from keras_matquant.layers.matquant_layer import MatQuantLayerMixin
from keras_matquant.layers.matquant_layer import validate_options
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
        slicing: str, how codes are sliced to fewer bits: `"clamped"`
            (default) or `"extra_precision"` (one extra top level, see
            `keras_matquant.quantizers.slice_codes`).
        learnable_clipping: bool, whether to learn per-unit clipping
            factors for the maximum and minimum (OmniQuant's learnable
            weight clipping), stored as float32 logits `clip_max_logit` and
            `clip_min_logit`. Defaults to False.
        clipping_init: None or float in `(0, 1]`, the initial clipping
            factor when `learnable_clipping=True`. None uses OmniQuant's
            logit 4.0 (factor 0.982).
        stored_bits: None (default) to keep the float master kernel, or an
            int in `1..bits`: the layer then stores packed integer codes of
            that precision, a float32 scale and zero point per channel, and
            no float kernel (see `keras_matquant.serving.export`).
        **kwargs: every other argument of `keras.layers.Dense` (a LoRA rank
            or a quantized dtype policy is rejected).

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

    def __init__(
        self,
        units,
        bits=8,
        slicing=DEFAULT_SLICING,
        learnable_clipping=False,
        clipping_init=None,
        stored_bits=None,
        **kwargs,
    ):
        options = validate_options(
            bits, slicing, learnable_clipping, clipping_init, stored_bits
        )
        super().__init__(units, **kwargs)
        self._init_matquant(options)

    @property
    def channel_reduce_axes(self):
        return (0,)

    @classmethod
    def _reduce_axes_for(cls, layer):
        return (0,)

    def apply_kernel(self, inputs, kernel):
        return ops.matmul(inputs, kernel)

    @classmethod
    def from_dense(
        cls,
        layer,
        bits=8,
        slicing=DEFAULT_SLICING,
        learnable_clipping=False,
        clipping_init=None,
        stored_bits=None,
    ):
        """Create a built `MatQuantDense` with `layer`'s config and weights.

        Args:
            layer: a built `keras.layers.Dense`.
            bits: int in `1..8`, the width of the parent codes.
            slicing: str, the slicing mode.
            learnable_clipping: bool, whether to learn clipping factors.
            clipping_init: None or float in `(0, 1]`, their initial value.
            stored_bits: None, or the precision of packed codes to store
                instead of the float kernel.

        Returns:
            A new built `MatQuantDense` with the same name, config and
            bit-identical float weights. `layer` is left unchanged.

        Raises:
            ValueError: if `layer` is not a built float `Dense` layer (a
                MatQuant layer included), its kernel contains NaN or inf, or an
                option is invalid.

        Example:

        ```python
        dense = keras.layers.Dense(8)
        dense.build((None, 4))
        mq = MatQuantDense.from_dense(dense, bits=8)
        ```
        """
        options = {
            "bits": bits,
            "slicing": slicing,
            "learnable_clipping": learnable_clipping,
            "clipping_init": clipping_init,
            "stored_bits": stored_bits,
        }
        return cls._from_float_layer(layer, keras.layers.Dense, options)
