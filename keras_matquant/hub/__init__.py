"""KerasHub integration: layer surgery, serialization and checkpoint import."""

from keras_matquant.hub.serialization import install_backbone_extension
from keras_matquant.hub.serialization import matquant_layer_options
from keras_matquant.hub.serialization import restore_matquant_layers
from keras_matquant.hub.loading import load_causal_lm
from keras_matquant.hub.surgery import iter_layers
from keras_matquant.hub.surgery import matquant_layers
from keras_matquant.hub.surgery import matquantize

install_backbone_extension()
