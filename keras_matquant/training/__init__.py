"""MatQuant training: the multi-precision trainer, its losses and recipes."""

from keras_matquant.training.co_distillation import CoDistillation
from keras_matquant.training.co_distillation import DistillationPair
from keras_matquant.training.co_distillation import parse_co_distillation
from keras_matquant.training.loss_weights import DEFAULT_LOSS_WEIGHTS
from keras_matquant.training.loss_weights import LOSS_WEIGHT_PRESETS
from keras_matquant.training.loss_weights import resolve_loss_weights
from keras_matquant.training.loss_weights import validate_loss_weights
from keras_matquant.training.losses import masked_cross_entropy
from keras_matquant.training.losses import masked_distillation_loss
from keras_matquant.training.losses import summed_cross_entropy
from keras_matquant.training.matquant_model import MatQuantModel
from keras_matquant.training.recipes import RECIPES
from keras_matquant.training.recipes import QATRecipe
from keras_matquant.training.recipes import build_qat_trainer
from keras_matquant.training.recipes import qat_recipe
from keras_matquant.training.schedules import WarmupCosineDecay
from keras_matquant.training.trainable import train_only_matquant_layers
