"""Data: the bundled real text and questions, tfds text, packing and windows."""

from keras_matquant.data.benchmark_formats import BENCHMARK_FORMATS
from keras_matquant.data.benchmark_formats import convert_benchmark_row
from keras_matquant.data.benchmark_formats import convert_benchmark_rows
from keras_matquant.data.benchmark_formats import read_benchmark_jsonl
from keras_matquant.data.multiple_choice import BUNDLED_SETS
from keras_matquant.data.multiple_choice import MultipleChoiceExample
from keras_matquant.data.multiple_choice import load_bundled_multiple_choice
from keras_matquant.data.multiple_choice import parse_example
from keras_matquant.data.multiple_choice import read_multiple_choice_jsonl
from keras_matquant.data.pipeline import iter_token_windows
from keras_matquant.data.pipeline import packed_dataset
from keras_matquant.data.text import LanguageModelingData
from keras_matquant.data.text import bundled_text_paths
from keras_matquant.data.text import join_token_lists
from keras_matquant.data.text import language_modeling_data
from keras_matquant.data.text import load_bundled_paragraphs
from keras_matquant.data.text import pack_token_sequences
from keras_matquant.data.text import split_paragraphs
from keras_matquant.data.text import tokenize_paragraphs
from keras_matquant.data.tfds_text import load_text_dataset
from keras_matquant.data.tfds_text import text_files_builder
from keras_matquant.data.windows import sliding_window_data
