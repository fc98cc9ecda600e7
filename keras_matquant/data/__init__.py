"""Data: the bundled real text and packing into token sequences."""

from keras_matquant.data.text import LanguageModelingData
from keras_matquant.data.text import language_modeling_data
from keras_matquant.data.text import load_bundled_paragraphs
from keras_matquant.data.text import pack_token_sequences
from keras_matquant.data.text import tokenize_paragraphs
