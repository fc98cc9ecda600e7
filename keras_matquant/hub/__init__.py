"""KerasHub integration: layer surgery and checkpoint import."""

from keras_matquant.hub.surgery import iter_layers
from keras_matquant.hub.surgery import matquant_layers
from keras_matquant.hub.surgery import matquantize
