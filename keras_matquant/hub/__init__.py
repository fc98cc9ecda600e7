"""KerasHub integration: layer surgery and checkpoint import."""

from keras_matquant.hub.surgery import iter_layers
from keras_matquant.hub.surgery import matquant_layers
from keras_matquant.hub.surgery import matquantize
from keras_matquant.hub.loading import load_causal_lm
