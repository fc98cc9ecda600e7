"""A bigram stub model and a character tokenizer whose scores are known by hand.

The stub's logits at each position are the log-probabilities of the next
token given the current one, taken from a table in which every probability
is a power of two. Their log-sum-exp is 0, so log-softmax returns the table
unchanged and every log-likelihood is a multiple of ln 2 that a test can
write down.
"""

import math

import keras
import numpy as np

PAD, EOS, BOS = 0, 1, 2
ALPHABET = "ab \né"
LN2 = math.log(2.0)


class CharTokenizer:
    """Map each character of `ALPHABET` to one id, after pad, end and start."""

    start_token_id = BOS
    end_token_id = EOS

    def __init__(self):
        self.ids = {char: index + 3 for index, char in enumerate(ALPHABET)}

    def vocabulary_size(self):
        return len(self.ids) + 3

    def __call__(self, texts):
        return [[self.ids[char] for char in text] for text in texts]


TOKEN = CharTokenizer().ids
A, B, SPACE, NEWLINE, E_ACUTE = (TOKEN[c] for c in ALPHABET)
VOCABULARY_SIZE = CharTokenizer().vocabulary_size()

# Next-token probabilities after each token, as powers of two:
# NEXT[previous] = {next: exponent}, meaning p(next | previous) = 2**-exponent.
# Tokens not listed share what is left, so each row sums to 1.
NEXT = {
    BOS: {A: 1, B: 2, SPACE: 3, E_ACUTE: 4},
    A: {SPACE: 1, B: 2, A: 3, E_ACUTE: 4},
    B: {A: 1, SPACE: 2, B: 3, NEWLINE: 4},
    SPACE: {A: 1, B: 2, E_ACUTE: 3, SPACE: 4},
    NEWLINE: {NEWLINE: 1, A: 2, B: 3, SPACE: 4},
    E_ACUTE: {SPACE: 1, A: 2, B: 3, E_ACUTE: 4},
}


def log_probability(previous, following):
    """Log of p(following | previous) under the stub, in nats."""
    return -NEXT[previous][following] * LN2


def _table():
    table = np.zeros((VOCABULARY_SIZE, VOCABULARY_SIZE), dtype="float64")
    for previous in range(VOCABULARY_SIZE):
        row = NEXT.get(previous, {A: 1})
        probabilities = np.zeros(VOCABULARY_SIZE)
        for following, exponent in row.items():
            probabilities[following] = 2.0**-exponent
        rest = [i for i in range(VOCABULARY_SIZE) if i not in row]
        probabilities[rest] = (1.0 - probabilities.sum()) / len(rest)
        table[previous] = np.log(probabilities)
    return table.astype("float32")


class BigramStub(keras.Model):
    """Logits at each position are `log p(next | current token)`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.Embedding(
            VOCABULARY_SIZE,
            VOCABULARY_SIZE,
            embeddings_initializer=keras.initializers.Constant(_table()),
        )

    def call(self, inputs, training=None):
        return self.embedding(inputs["token_ids"])


def bigram_stub():
    """Build the stub, with its variables created."""
    model = BigramStub()
    model(
        {
            "token_ids": np.zeros((1, 2), dtype="int32"),
            "padding_mask": np.ones((1, 2), dtype="int32"),
        }
    )
    return model
