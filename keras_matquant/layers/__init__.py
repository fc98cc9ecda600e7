"""MatQuant layers."""

from keras_matquant.layers.dense import MatQuantDense
from keras_matquant.layers.einsum_dense import MatQuantEinsumDense
from keras_matquant.layers.einsum_dense import contracted_kernel_axes
from keras_matquant.layers.matquant_layer import MatQuantLayerMixin
from keras_matquant.layers.tree import iter_layers
from keras_matquant.layers.tree import matquant_layers
