"""keras-matquant: Matryoshka Quantization for Keras 3 and KerasHub.

One set of int8 codes whose most significant bits are also a good int4 and
int2 model: train it with `MatQuantModel`, then serve any precision with
`precision(r)`.
"""

from keras_matquant.effective_bits import effective_bits
from keras_matquant.effective_bits import effective_bits_by_layer
from keras_matquant.hub.layout_map import check_layout_map
from keras_matquant.hub.layout_map import matquant_layout_map
from keras_matquant.hub.surgery import matquantize
from keras_matquant.layers import iter_layers
from keras_matquant.layers import matquant_layers
from keras_matquant.layers import MatQuantDense
from keras_matquant.layers import MatQuantEinsumDense
from keras_matquant.precision import active_precision
from keras_matquant.precision import precision
from keras_matquant.precision import precision_plan
from keras_matquant.training import MatQuantModel
from keras_matquant.training import WarmupCosineDecay
from keras_matquant.training import build_qat_trainer
from keras_matquant.training import masked_cross_entropy
from keras_matquant.training import parse_co_distillation
from keras_matquant.training import qat_recipe
from keras_matquant.training import train_only_matquant_layers

__version__ = "0.1.0"
