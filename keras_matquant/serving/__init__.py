"""Serving: packed integer export, one-artifact loading, Mix'n'Match."""

from keras_matquant.packing import PackedCodes
from keras_matquant.packing import pack_codes
from keras_matquant.packing import unpack_codes
from keras_matquant.serving.export import export
from keras_matquant.serving.export import load
from keras_matquant.serving.export import saved_precisions
from keras_matquant.serving.export import stored_precisions
from keras_matquant.serving.generation import generate
