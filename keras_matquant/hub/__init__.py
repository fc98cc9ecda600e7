"""KerasHub integration: layer surgery, serialization, layouts, checkpoint import."""

from keras_matquant.hub.serialization import install_backbone_extension
from keras_matquant.hub.serialization import matquant_layer_options
from keras_matquant.hub.serialization import restore_matquant_layers
from keras_matquant.hub.layout_map import check_layout_map
from keras_matquant.hub.layout_map import matquant_layout_map
from keras_matquant.hub.loading import load_causal_lm
from keras_matquant.hub.surgery import iter_layers
from keras_matquant.hub.surgery import matquant_layers
from keras_matquant.hub.surgery import matquantize

install_backbone_extension()
