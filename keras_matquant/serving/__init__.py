"""Serving: packed integer codes (export and Mix'n'Match build on these)."""

from keras_matquant.serving.packing import PackedCodes
from keras_matquant.serving.packing import pack_codes
from keras_matquant.serving.packing import unpack_codes
