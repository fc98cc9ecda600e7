"""Serving: packed integer export, one-artifact loading, Mix'n'Match."""

from keras_matquant.packing import PackedCodes
from keras_matquant.packing import pack_codes
from keras_matquant.packing import unpack_codes
