"""MatQuant training: the multi-precision trainer and its losses."""

from keras_matquant.training.losses import masked_cross_entropy
from keras_matquant.training.losses import summed_cross_entropy
from keras_matquant.training.matquant_model import DEFAULT_LOSS_WEIGHTS
from keras_matquant.training.matquant_model import MatQuantModel
from keras_matquant.training.matquant_model import validate_loss_weights
from keras_matquant.training.trainable import train_only_matquant_layers
