"""GGUF files as models: llama.cpp's metadata <-> ModelConfig, its tokenizer, loading and saving.

weights/gguf.py reads and writes the file format; this module gives the contents their meaning:

    model = load("model.gguf", dtype="bfloat16")      # what llama.load() calls for a GGUF file
    tokenizer = load_tokenizer("model.gguf")           # from the tokenizer.ggml.* metadata
    convert("path/to/checkpoint", "out.gguf", outtype="q8_0")   # Meta, HF or GGUF -> GGUF

Only llama.cpp's architecture "llama" maps onto this project's model (Llama 1-3.2, and files of other
architectures that use it, e.g. Mistral 7B): its keys are `llama.*` (CONFIG_KEYS) and its tensors
TENSOR_NAMES. Whatever else the file's llama.* keys say (experts, a partial rotary dimension, a RoPE
scaling this model lacks) is refused by name; when writing, a ModelConfig that GGUF cannot express
(architecture variants such as qk_norm, dynamic RoPE scaling) is refused by name too.

Row order: GGUF's attn_q / attn_k rows are in Meta's interleaved order, the order of this model (see
weights/gguf.py), so tensors cross this boundary without a permutation.

Llama 3.1's RoPE scaling is not a metadata key in GGUF: llama.cpp's converter writes the per-frequency
divisors it implies as the tensor rope_freqs.weight, (hd/2,) float32, which llama.cpp divides the
frequencies by. Reading recovers the RopeScaling that gives those divisors (and refuses a tensor no
llama3 scaling gives); writing computes them the converter's way.

Tokenizers: "llama" (sentencepiece-style pieces with scores and types) becomes a sentencepiece model
built from the metadata (so sentencepiece itself encodes, as for the original file), "gpt2" with the
pre-tokenizer "llama-bpe" (Llama 3) becomes the tiktoken tokenizer whose ranks are the token ids.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import sentencepiece
import torch

import weights
from weights import CheckpointError
from weights.gguf import READABLE, GGMLType, GGUFFile, dequantize, is_gguf, write_gguf

from .checkpoint import (assign_weights, config_from_checkpoint, check_tensors, meta_model, parse_dtype,
                         release_freed_memory)  # fmt: skip
from .config import ConfigError, ModelConfig, RopeScaling
from .model import Transformer, rope_frequencies
from .tokenizer import (TOKENIZER_FILES, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, TokenizerFormatError,
                        _byte_level_alphabet)  # fmt: skip
from .tokenizer import load_tokenizer as load_checkpoint_tokenizer

ARCHITECTURE = "llama"

# ---- tensor names -------------------------------------------------------------------------------------

# One table maps the names; {i} is the layer number.
TENSOR_NAMES = [
    ("token_embd.weight", "tok_embeddings.weight"),
    ("output_norm.weight", "norm.weight"),
    ("output.weight", "output.weight"),
    ("blk.{i}.attn_norm.weight", "layers.{i}.attention_norm.weight"),
    ("blk.{i}.attn_q.weight", "layers.{i}.attention.wq.weight"),
    ("blk.{i}.attn_k.weight", "layers.{i}.attention.wk.weight"),
    ("blk.{i}.attn_v.weight", "layers.{i}.attention.wv.weight"),
    ("blk.{i}.attn_output.weight", "layers.{i}.attention.wo.weight"),
    ("blk.{i}.ffn_norm.weight", "layers.{i}.ffn_norm.weight"),
    ("blk.{i}.ffn_gate.weight", "layers.{i}.feed_forward.w1.weight"),
    ("blk.{i}.ffn_up.weight", "layers.{i}.feed_forward.w3.weight"),
    ("blk.{i}.ffn_down.weight", "layers.{i}.feed_forward.w2.weight"),
]
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's RoPE scaling (see the module docstring)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_TO_META = [(_pattern(g), m) for g, m in TENSOR_NAMES]
_TO_GGUF = [(_pattern(m), g) for g, m in TENSOR_NAMES]


def _rename(name: str, table) -> str | None:
    for pattern, template in table:
        match = pattern.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


def gguf_to_meta_name(name: str) -> str | None:
    return _rename(name, _TO_META)


def meta_to_gguf_name(name: str) -> str:
    renamed = _rename(name, _TO_GGUF)
    if renamed is None:
        raise CheckpointError(f"tensor {name!r} has no GGUF name")
    return renamed


# ---- metadata <-> ModelConfig ---------------------------------------------------------------------------

# The llama.* keys this mapping understands (without the "llama." prefix). Any other llama.* key
# would change what llama.cpp computes, so it is refused; other namespaces (general.*, quantize.*,
# a tool's own) do not enter llama.cpp's model and are ignored.
CONFIG_KEYS = (
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned",
    "expert_count", "expert_used_count", "tensor_data_layout",
)  # fmt: skip


def _float32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-05, not
    9.99999974738e-06), so that a config survives being written as float32 and read back."""
    return float(str(np.float32(value)))


class _Metadata:
    """Typed reads of llama.* keys, with errors naming the file and key."""

    def __init__(self, metadata: Mapping[str, Any], where: str):
        self.metadata, self.where = metadata, where

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        full = f"{ARCHITECTURE}.{key}"
        if full not in self.metadata:
            if default is ...:
                raise ConfigError(f"{self.where}: missing metadata key {full!r}")
            return default
        value = self.metadata[full]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else (
            isinstance(value, kind) and not (kind is int and isinstance(value, bool)))  # fmt: skip
        if not ok:
            raise ConfigError(f"{self.where}: metadata {full!r} must be {kind.__name__}, got {value!r:.80}")
        return _float32(value) if kind is float else value


def config_from_gguf(
    metadata: Mapping[str, Any],
    *,
    vocab_size: int,
    has_output: bool,
    rope_freqs: torch.Tensor | None = None,
    where: str = "GGUF",
) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata describes. vocab_size: the rows of token_embd;
    has_output: whether output.weight is present (else the output is tied to the embedding);
    rope_freqs: the rope_freqs.weight tensor, if present."""
    arch = metadata.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ConfigError(f"{where}: architecture {arch!r} is not supported; only {ARCHITECTURE!r} (Llama) is")
    if metadata.get("general.type", "model") != "model":
        raise ConfigError(f"{where}: general.type is {metadata['general.type']!r}; only models load (not adapters)")
    if metadata.get("split.count", 1) != 1:
        raise ConfigError(f"{where}: one part of a split GGUF ({metadata['split.count']} parts); merge them "
                          "with llama.cpp's `llama-gguf-split --merge` first")  # fmt: skip
    known = {f"{ARCHITECTURE}.{k}" for k in CONFIG_KEYS}
    unknown = sorted(k for k in metadata if k.startswith(f"{ARCHITECTURE}.") and k not in known)
    if unknown:
        raise ConfigError(f"{where}: metadata this model cannot honour: {', '.join(unknown)}")
    get = _Metadata(metadata, where)
    if get.get("expert_count", int, 0) or get.get("expert_used_count", int, 0):
        experts = metadata.get(f"{ARCHITECTURE}.expert_count")
        raise ConfigError(f"{where}: a mixture of experts ({ARCHITECTURE}.expert_count {experts}); "
                          "this model has one feed-forward per layer")  # fmt: skip
    layout = get.get("tensor_data_layout", str, "Meta AI original pth")
    if layout != "Meta AI original pth":
        raise ConfigError(f"{where}: {ARCHITECTURE}.tensor_data_layout {layout!r}; expected 'Meta AI original pth'")
    stated_vocab = get.get("vocab_size", int, vocab_size)
    if stated_vocab != vocab_size:
        raise ConfigError(f"{where}: {ARCHITECTURE}.vocab_size is {stated_vocab}, but token_embd has {vocab_size} rows")

    dim, n_heads = get.get("embedding_length", int), get.get("attention.head_count", int)
    head_dim = get.get("attention.key_length", int, dim // n_heads if n_heads else 0)
    value_dim = get.get("attention.value_length", int, head_dim)
    if value_dim != head_dim:
        raise ConfigError(f"{where}: attention.value_length {value_dim} differs from key_length {head_dim}")
    rope_dim = get.get("rope.dimension_count", int, head_dim)
    if rope_dim != head_dim:
        raise ConfigError(f"{where}: rope.dimension_count {rope_dim} rotates part of each head of {head_dim}; "
                          "this model rotates whole heads")  # fmt: skip
    theta = get.get("rope.freq_base", float, 10000.0)

    scaling = None
    kind = get.get("rope.scaling.type", str, "none")
    original = get.get("rope.scaling.original_context_length", int, None)
    if kind == "linear":
        scaling = RopeScaling("linear", get.get("rope.scaling.factor", float))
    elif kind != "none":
        raise ConfigError(f"{where}: RoPE scaling {kind!r} is not supported (only linear, and Llama 3.1's "
                          "through rope_freqs; a YaRN model loads from its HF checkpoint's config.json)")  # fmt: skip
    if rope_freqs is not None:
        if scaling is not None:
            raise ConfigError(f"{where}: both linear RoPE scaling and a rope_freqs tensor")
        scaling = _llama3_scaling(rope_freqs.float(), head_dim, theta, original, where)

    try:
        return ModelConfig(
            dim=dim,
            n_layers=get.get("block_count", int),
            n_heads=n_heads,
            n_kv_heads=get.get("attention.head_count_kv", int, n_heads),
            vocab_size=vocab_size,
            ffn_dim=get.get("feed_forward_length", int),
            head_dim=head_dim,
            norm_eps=get.get("attention.layer_norm_rms_epsilon", float),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=not has_output,
            max_seq_len=get.get("context_length", int),
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def llama3_rope_divisors(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """rope_freqs.weight as llama.cpp's converter computes it (convert_hf_to_gguf.py, LlamaModel.
    generate_extra_tensors): per frequency 1, `factor`, or the blend's 1 / ((1 - s) / factor + s)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    divisors = []
    for freq in freqs:  # 0-d float32 tensors, so the arithmetic is float32 as in the converter: the same bits
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            divisors.append(1)
        elif wavelen > low_wavelen:
            divisors.append(scaling.factor)
        else:
            s = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor)  # fmt: skip
            divisors.append(1 / ((1 - s) / scaling.factor + s))
    return torch.tensor(divisors, dtype=torch.float32)


def _llama3_scaling(divisors: torch.Tensor, head_dim: int, theta: float, original: int | None,
                    where: str) -> RopeScaling:  # fmt: skip
    """The llama3 RopeScaling whose frequencies are rope_frequencies(...) / divisors.

    The divisors fix `factor` (the largest) and, in the blend band, s = (1/r - 1/factor) / (1 - 1/factor)
    = original / (2 pi (high - low)) * f - low / (high - low), a line in f. With original known
    (rope.scaling.original_context_length, else Meta's 8192) the line gives low and high. Meta's
    values (1, 4, 8192) are tried first: they are exact, where solving rounds."""
    if divisors.shape != (head_dim // 2,):
        raise ConfigError(f"{where}: {ROPE_FREQS} has shape {list(divisors.shape)}; expected [{head_dim // 2}]")
    factor = _float32(divisors.max().item())
    if not factor > 1:
        raise ConfigError(f"{where}: {ROPE_FREQS} holds no divisor above 1: {divisors.tolist()[:4]} ...")
    original = original or 8192
    candidates = [RopeScaling("llama3", factor, 1.0, 4.0, original)]
    freqs = rope_frequencies(head_dim, theta, None).double()
    blend = (divisors > 1) & (divisors < factor)
    if blend.sum() >= 2:
        r = divisors.double()[blend]
        s = (1 / r - 1 / factor) / (1 - 1 / factor)
        f = freqs[blend]
        slope = ((s[-1] - s[0]) / (f[-1] - f[0])).item()
        intercept = (s[0] - slope * f[0]).item()
        if slope > 0 and intercept < 0:
            width = original / (2 * math.pi * slope)  # high - low
            low = -intercept * width
            candidates.append(RopeScaling("llama3", factor, round(low, 6), round(low + width, 6), original))
    for candidate in candidates:
        expected = llama3_rope_divisors(head_dim, theta, candidate)
        if torch.allclose(expected, divisors, rtol=1e-5, atol=0):
            return candidate
    raise ConfigError(f"{where}: {ROPE_FREQS} is not the frequency scaling of Llama 3.1 for any "
                      f"factor / low / high: {[round(v, 4) for v in divisors.tolist()]}")  # fmt: skip


FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's llama_ftype of each --outtype


def config_metadata(config: ModelConfig, *, name: str, outtype: str) -> tuple[dict[str, Any], torch.Tensor | None]:
    """(llama.* and general.* metadata, rope_freqs tensor or None) for a ModelConfig, written as
    llama.cpp's converter writes them. A config whose fields GGUF cannot express is refused by name:
    the metadata is read back and every field that comes back different is named."""
    md: dict[str, Any] = {
        "general.architecture": ARCHITECTURE,
        "general.type": "model",
        "general.name": name,
        f"{ARCHITECTURE}.block_count": config.n_layers,
        f"{ARCHITECTURE}.context_length": config.max_seq_len,
        f"{ARCHITECTURE}.embedding_length": config.dim,
        f"{ARCHITECTURE}.feed_forward_length": config.ffn_dim,
        f"{ARCHITECTURE}.attention.head_count": config.n_heads,
        f"{ARCHITECTURE}.attention.head_count_kv": config.n_kv_heads,
        f"{ARCHITECTURE}.rope.freq_base": float(config.rope_theta),
        f"{ARCHITECTURE}.attention.layer_norm_rms_epsilon": float(config.norm_eps),
        f"{ARCHITECTURE}.attention.key_length": config.head_dim,
        f"{ARCHITECTURE}.attention.value_length": config.head_dim,
        "general.file_type": FILE_TYPES[outtype],
        f"{ARCHITECTURE}.vocab_size": config.vocab_size,
        f"{ARCHITECTURE}.rope.dimension_count": config.head_dim,
    }
    rope_freqs = None
    s = config.rope_scaling
    if s is not None and s.kind == "linear":
        md[f"{ARCHITECTURE}.rope.scaling.type"] = "linear"
        md[f"{ARCHITECTURE}.rope.scaling.factor"] = float(s.factor)
    elif s is not None and s.kind == "llama3":
        rope_freqs = llama3_rope_divisors(config.head_dim, config.rope_theta, s)
        if s.original_max_seq_len != 8192:
            md[f"{ARCHITECTURE}.rope.scaling.original_context_length"] = s.original_max_seq_len
    if outtype == "q8_0":
        md["general.quantization_version"] = 2
    try:
        back = config_from_gguf(md, vocab_size=config.vocab_size, has_output=not config.tie_word_embeddings,
                                rope_freqs=rope_freqs)  # fmt: skip
    except ConfigError:
        back = None  # e.g. a RoPE scaling GGUF has no key for: named below
    differ = [f for f in config.to_dict() if back is None or not _same(getattr(config, f), getattr(back, f))]
    if back is None and s is not None:
        differ = ["rope_scaling"]
    if differ:
        values = ", ".join(f"{f}={getattr(config, f)!r}" for f in differ)
        raise ConfigError(f"GGUF's {ARCHITECTURE!r} architecture cannot express {values}")
    return md, rope_freqs


def _same(a: Any, b: Any) -> bool:
    """Equal once floats are rounded to float32, as GGUF stores them."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and np.float32(a) == np.float32(b)
    if isinstance(a, RopeScaling) and isinstance(b, RopeScaling):
        return all(_same(getattr(a, k), getattr(b, k)) for k in a.__dataclass_fields__)
    return a == b


# ---- the tokenizer --------------------------------------------------------------------------------------

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type; sentencepiece's piece types use the
# same numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_from_gguf(metadata: Mapping[str, Any], where: str = "GGUF") -> Tokenizer:
    """The tokenizer a GGUF file's tokenizer.ggml.* metadata describes, with its stop tokens (eos,
    eot, eom), add_bos / add_eos and chat template."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerFormatError(f"{where}: no tokenizer in the metadata (tokenizer.ggml.model / tokens)")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerFormatError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
    ids = {key: metadata.get(f"tokenizer.ggml.{key}_token_id")
           for key in ("bos", "eos", "unknown", "padding", "eot", "eom")}  # fmt: skip
    stops = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    if kind == "llama":
        tokenizer = _sentencepiece_from_gguf(metadata, tokens, types, ids, stops, where)
    elif kind == "gpt2":
        tokenizer = _tiktoken_from_gguf(metadata, tokens, types, ids, stops, where)
    else:
        raise TokenizerFormatError(f"{where}: tokenizer.ggml.model {kind!r} is not supported; "
                                   "expected 'llama' (sentencepiece) or 'gpt2' (byte-level BPE)")  # fmt: skip
    tokenizer.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True))
    tokenizer.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    tokenizer.chat_template = metadata.get("tokenizer.chat_template")
    if tokenizer.chat_template is not None:
        marker = "<|start_header_id|>" if kind == "gpt2" else "[INST]"
        if marker not in tokenizer.chat_template:
            version = "3" if kind == "gpt2" else "2"
            warnings.warn(f"{where}: the chat template is not Llama's {version} format (no {marker}); "
                          "encode_dialog writes Llama's format, not this template's", stacklevel=2)
    return tokenizer


def _sentencepiece_from_gguf(metadata, tokens, types, ids, stops, where) -> SentencePieceTokenizer:
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise TokenizerFormatError(f"{where}: {len(tokens)} tokens but {len(scores)} scores")
    unk = ids["unknown"]
    if unk is None:
        unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    special = {"unk": unk, "bos": ids["bos"], "eos": ids["eos"], "pad": ids["padding"]}
    proto = sentencepiece_model_proto(
        tokens, scores, types, special,
        add_dummy_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
        remove_extra_whitespaces=bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces", False)),
    )  # fmt: skip
    try:
        return SentencePieceTokenizer(None, stops, model_proto=proto)
    except (RuntimeError, TokenizerFormatError) as e:  # sentencepiece's own checks (e.g. no unknown piece)
        raise TokenizerFormatError(f"{where}: the tokenizer metadata is not a valid sentencepiece model: {e}") from e


def _tiktoken_from_gguf(metadata, tokens, types, ids, stops, where) -> TiktokenTokenizer:
    pre = metadata.get("tokenizer.ggml.pre")
    if pre != "llama-bpe":
        raise TokenizerFormatError(f"{where}: byte-level BPE with pre-tokenizer {pre!r} is not supported; "
                                   "only Llama 3's 'llama-bpe'")  # fmt: skip
    to_byte = {char: byte for byte, char in _byte_level_alphabet().items()}
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, UNUSED):
            specials[token] = i
        elif kind == NORMAL:
            try:
                ranks[bytes(to_byte[c] for c in token)] = i
            except KeyError:
                raise TokenizerFormatError(f"{where}: token {i} {token!r} is not byte-level BPE") from None
        else:
            raise TokenizerFormatError(f"{where}: token {i} {token!r} has type {kind}; only normal, control and "
                                       "unused tokens are supported in a byte-level BPE vocabulary")  # fmt: skip
    # tiktoken merges the adjacent pair whose merged token has the lowest id; the file's BPE merges
    # in the order of its merges list. The two agree when that list is ordered by merged id.
    merges = metadata.get("tokenizer.ggml.merges") or []
    last = -1
    for n, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        merged = ranks.get(bytes(to_byte.get(c, 0) for c in left + right))
        if merged is None or merged < last:
            raise TokenizerFormatError(f"{where}: merge {n} {merge!r} is out of the order of the token ids, so "
                                       "this BPE cannot be run as tiktoken's ranks")  # fmt: skip
        last = merged
    try:
        tokenizer = TiktokenTokenizer(ranks, specials, stops, name=where)
    except ValueError as e:  # tiktoken's own checks
        raise TokenizerFormatError(f"{where}: {e}") from e
    if ids["bos"] is not None and ids["bos"] != tokenizer.bos_id:
        raise TokenizerFormatError(f"{where}: bos_token_id {ids['bos']} is not <|begin_of_text|> ({tokenizer.bos_id})")
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a GGUF file."""
    with GGUFFile(path) as f:
        return tokenizer_from_gguf(f.metadata, str(path))


# -- sentencepiece's model file, written by hand (sentencepiece_model.proto; no protobuf dependency) --


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32s are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | float | bytes | str) -> bytes:
    if isinstance(value, (bytes, str)):
        raw = value.encode("utf-8", errors="surrogateescape") if isinstance(value, str) else value
        return _varint(number << 3 | 2) + _varint(len(raw)) + raw
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3 | 0) + _varint(int(value))


def _fields(message: bytes) -> dict[int, list]:
    """The fields of a serialized protobuf message: number -> values (ints, floats, or bytes)."""
    out: dict[int, list] = {}
    pos = 0

    def varint():
        nonlocal pos
        value = shift = 0
        while True:
            byte = message[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(message):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, pos = message[pos : pos + 8], pos + 8
        elif wire == 2:
            n = varint()
            value, pos = message[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = struct.unpack_from("<f", message, pos)[0], pos + 4
        else:
            raise TokenizerFormatError(f"unexpected protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


# Field numbers of sentencepiece_model.proto.
PIECES, TRAINER_SPEC, NORMALIZER_SPEC = 1, 2, 3
PIECE, SCORE, TYPE = 1, 2, 3
MODEL_TYPE, VOCAB_SIZE, BYTE_FALLBACK = 3, 4, 35
UNK_ID, BOS_ID, EOS_ID, PAD_ID, UNK_PIECE, BOS_PIECE, EOS_PIECE, PAD_PIECE = 40, 41, 42, 43, 45, 46, 47, 48
NAME, ADD_DUMMY_PREFIX, REMOVE_EXTRA_WHITESPACES, ESCAPE_WHITESPACES = 1, 3, 4, 5
BPE = 2


def sentencepiece_model_proto(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
                              special: Mapping[str, int | None], *, add_dummy_prefix: bool,
                              remove_extra_whitespaces: bool) -> bytes:  # fmt: skip
    """A serialized sentencepiece BPE model with these pieces: what llama.cpp's "llama" tokenizer runs
    (merge by score, byte fallback, no normalization beyond spaces to U+2581). special: unk, bos, eos,
    pad ids (None or -1: absent)."""
    out = bytearray()
    for token, score, kind in zip(tokens, scores, types):
        out += _field(PIECES, _field(PIECE, token) + _field(SCORE, float(score)) + _field(TYPE, int(kind)))
    trainer = _field(MODEL_TYPE, BPE) + _field(VOCAB_SIZE, len(tokens))
    trainer += _field(BYTE_FALLBACK, int(BYTE in types))
    for key, id_field, piece_field in (("unk", UNK_ID, UNK_PIECE), ("bos", BOS_ID, BOS_PIECE),
                                       ("eos", EOS_ID, EOS_PIECE), ("pad", PAD_ID, PAD_PIECE)):  # fmt: skip
        i = special.get(key)
        i = -1 if i is None or not 0 <= i < len(tokens) else i
        trainer += _field(id_field, i)
        if i >= 0:
            trainer += _field(piece_field, tokens[i])
    out += _field(TRAINER_SPEC, trainer)
    normalizer = _field(NAME, "identity") + _field(ADD_DUMMY_PREFIX, int(add_dummy_prefix))
    normalizer += _field(REMOVE_EXTRA_WHITESPACES, int(remove_extra_whitespaces)) + _field(ESCAPE_WHITESPACES, 1)
    out += _field(NORMALIZER_SPEC, normalizer)
    return bytes(out)


# -- writing a tokenizer as metadata --

# Chat templates (Jinja, as in HF's tokenizer_config.json) that render what encode_dialog encodes;
# llama.cpp recognises them by their markers (<|start_header_id|>, [INST]).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}{%- if message['role'] == 'user' %}"
    "{{- bos_token + '[INST] ' + ((system if loop.first else '') + message['content']) | trim + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif %}{%- endfor %}"
)


def tiktoken_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's ranks, as transformers' TikTokenConverter derives them:
    every split of every token into two tokens, ordered by the merged token's rank, then by the
    ranks of the two halves."""
    merges = []
    for token, rank in ranks.items():
        local = [(ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                 for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]  # fmt: skip
        merges += [(rank, left_rank, right_rank, left, right) for left_rank, right_rank, left, right in local]
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def tokenizer_metadata(checkpoint: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """tokenizer.* metadata for the tokenizer of a checkpoint directory (Meta's tokenizer.model,
    sentencepiece or tiktoken, or HF's tokenizer.json), padded to the model's vocab_size with
    unused [PADn] tokens as llama.cpp's converter does. The chat template is the directory's
    tokenizer_config.json's, else the one of the format encode_dialog writes."""
    directory = Path(checkpoint)
    tokenizer = load_checkpoint_tokenizer(directory)
    file = next(directory / n for n in TOKENIZER_FILES if (directory / n).is_file())
    md: dict[str, Any] = {}
    if isinstance(tokenizer, TiktokenTokenizer):
        alphabet = _byte_level_alphabet()
        specials = {i: name for name, i in tokenizer.special_tokens.items()}
        tokens, types, ranks = [], [], {}
        for i in range(tokenizer.vocab_size):
            if i in specials:
                tokens.append(specials[i])
                types.append(CONTROL)
            else:
                raw = tokenizer.token_bytes(i)
                ranks[raw] = i
                tokens.append("".join(alphabet[b] for b in raw))
                types.append(NORMAL)
        md["tokenizer.ggml.model"] = "gpt2"
        md["tokenizer.ggml.pre"] = "llama-bpe"
        md["tokenizer.ggml.tokens"] = tokens
        md["tokenizer.ggml.token_type"] = types
        md["tokenizer.ggml.merges"] = ["".join(alphabet[b] for b in left) + " " + "".join(alphabet[b] for b in right)
                                       for left, right in tiktoken_merges(ranks)]  # fmt: skip
        template = LLAMA3_CHAT_TEMPLATE
        extra = {"eot": "<|eot_id|>", "eom": "<|eom_id|>"}
        extra = {key: tokenizer.special_tokens[name] for key, name in extra.items() if name in tokenizer.special_tokens}
    else:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(file))
        spec = _fields(processor.serialized_model_proto())
        trainer = _fields(spec.get(TRAINER_SPEC, [b""])[0])
        normalizer = _fields(spec.get(NORMALIZER_SPEC, [b""])[0])
        if trainer.get(MODEL_TYPE, [1])[0] != BPE:  # sentencepiece's default is unigram
            raise TokenizerFormatError(f"{file}: a sentencepiece unigram model; GGUF's 'llama' tokenizer is BPE "
                                       "(llama.cpp merges by score), so its ids would differ")  # fmt: skip
        name = normalizer.get(NAME, [b"nmt_nfkc"])[0]
        name = name.decode() if isinstance(name, bytes) else name
        if name != "identity":
            raise TokenizerFormatError(f"{file}: sentencepiece normalization {name!r}; llama.cpp's 'llama' "
                                       "tokenizer does not normalize, so its ids would differ")  # fmt: skip
        tokens, scores, types = [], [], []
        for i in range(processor.vocab_size()):
            tokens.append(processor.id_to_piece(i))
            scores.append(processor.get_score(i))
            types.append(UNKNOWN if processor.is_unknown(i) else CONTROL if processor.is_control(i) else
                         UNUSED if processor.is_unused(i) else BYTE if processor.is_byte(i) else NORMAL)  # fmt: skip
        md["tokenizer.ggml.model"] = "llama"
        md["tokenizer.ggml.pre"] = "default"
        md["tokenizer.ggml.tokens"] = tokens
        md["tokenizer.ggml.scores"] = scores
        md["tokenizer.ggml.token_type"] = types
        md["tokenizer.ggml.add_space_prefix"] = bool(normalizer.get(ADD_DUMMY_PREFIX, [1])[0])
        md["tokenizer.ggml.remove_extra_whitespaces"] = bool(normalizer.get(REMOVE_EXTRA_WHITESPACES, [1])[0])
        if processor.unk_id() >= 0:
            md["tokenizer.ggml.unknown_token_id"] = processor.unk_id()
        template = LLAMA2_CHAT_TEMPLATE
        extra = {}
    if len(tokens) > vocab_size:
        raise TokenizerFormatError(f"{file}: {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
        if "tokenizer.ggml.scores" in md:
            md["tokenizer.ggml.scores"].append(-10000.0)
    md["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
    md["tokenizer.ggml.eos_token_id"] = tokenizer.eos_id
    md.update({f"tokenizer.ggml.{key}_token_id": i for key, i in extra.items()})
    if tokenizer.pad_id >= 0:
        md["tokenizer.ggml.padding_token_id"] = tokenizer.pad_id
    md["tokenizer.ggml.add_bos_token"] = True
    md["tokenizer.ggml.add_eos_token"] = False
    md["tokenizer.chat_template"] = _chat_template(directory) or template
    return md


def _chat_template(directory: Path) -> str | None:
    """The chat template of an HF checkpoint's tokenizer_config.json (a string, or the "default" of
    a list of named templates), if any."""
    file = directory / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise TokenizerFormatError(f"{file}: malformed JSON: {e}") from e
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


# ---- loading ----------------------------------------------------------------------------------------------

class StoredWeight:
    """One weight as the file stores it: `data` (its bytes, 1-D uint8), `type` and `shape`, and
    dequantized(dtype), computed once (a tied output and the embedding share it)."""

    def __init__(self, data: torch.Tensor, kind: GGMLType, shape: tuple[int, ...]):
        self.data, self.type, self.shape = data, kind, shape
        self._float: torch.Tensor | None = None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self._float is None or self._float.dtype != dtype:
            self._float = dequantize(self.data, self.type, dtype).view(self.shape)
        return self._float


# A way to fill a swapped module from a weight as stored.
Fill = Callable[[StoredWeight], None]
Swap = Callable[[Transformer, torch.dtype, dict[str, GGMLType]], dict[str, Fill]]


class GGUFModelFile:
    """A GGUF file opened as a model: its ModelConfig and its tensors under Meta's names. Presents the
    interface llama.core.checkpoint's checks use (path, shapes, file_of, dtype)."""

    format = "gguf"

    def __init__(self, path: str | os.PathLike):
        self.file = GGUFFile(path)
        self.path = self.file.path
        try:
            self._names: dict[str, str] = {}  # Meta name -> GGUF name
            unknown = []
            for name in self.file.tensors:
                meta = gguf_to_meta_name(name)
                if meta is not None:
                    self._names[meta] = name
                elif name != ROPE_FREQS:
                    unknown.append(name)
            if unknown:
                raise CheckpointError(f"{self.path}: tensors this model has no place for: {', '.join(unknown[:6])}"
                                      + (" ..." if len(unknown) > 6 else ""))  # fmt: skip
            if "tok_embeddings.weight" not in self._names:
                raise CheckpointError(f"{self.path}: no token_embd.weight tensor")
            rope_freqs = self.file.read(ROPE_FREQS, torch.float32) if ROPE_FREQS in self.file.tensors else None
            vocab_size = self.file.tensors["token_embd.weight"].shape[0]
            has_output = "output.weight" in self._names
            self.config = config_from_gguf(self.file.metadata, vocab_size=vocab_size, has_output=has_output,
                                           rope_freqs=rope_freqs, where=str(self.path))  # fmt: skip
        except BaseException:
            self.file.close()
            raise

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {meta: self.file.tensors[name].shape for meta, name in self._names.items()}

    def file_of(self, name: str) -> str:
        return f"{self.path} ({self._names[name]})"

    def type(self, name: str) -> GGMLType:
        return self.file.tensors[self._names[name]].type

    def dtype(self, name: str) -> torch.dtype:
        """The dtype a tensor reads as by default: its own for F32 / F16 / BF16, else float32."""
        kind = self.type(name)
        if kind not in READABLE:
            raise CheckpointError(f"{self.file_of(name)}: tensor type {kind.name} cannot be read; readable: "
                                  f"{', '.join(t.name for t in READABLE)}")  # fmt: skip
        return {GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}.get(kind, torch.float32)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.file.read(self._names[name], dtype)

    def raw(self, name: str) -> torch.Tensor:
        return self.file.raw(self._names[name])

    def close(self) -> None:
        self.file.close()


def load(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    swap: Swap | None = None,
) -> Transformer:
    """Load a GGUF file; returns the model in eval mode, its stop tokens from the file's tokenizer.

    dtype: float32, bfloat16 or float16 (default: the embedding's own type for F32 / F16 / BF16
        files, else float32, which holds every quantized type's values exactly).
    swap: called with the model on the meta device, the dtype and the stored type of each weight
        (Meta names; a tied output gets the embedding's); it may replace modules and returns
        {module name: fill}, each fill given that weight as stored (a StoredWeight) instead of a
        float tensor (llama/quantization/gguf.py keeps Q8_0 and Q4_0 weights quantized this way). A
        tied output among them gets the embedding's, dequantized once for both. The embedding
        ("tok_embeddings") may be replaced too; a tied output it shares a module with needs no fill
        of its own (its tensors are taken under both names).
    """
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    ckpt = GGUFModelFile(path)
    try:
        config = ckpt.config
        model = meta_model(config)
        names = check_tensors(ckpt, model)
        dtype = dtype or ckpt.dtype("tok_embeddings.weight")
        types = {name: ckpt.type(name) for name in names}
        if config.tie_word_embeddings:
            types["output.weight"] = types["tok_embeddings.weight"]
        fills = swap(model, dtype, types) if swap is not None else {}
        copy_output = config.tie_word_embeddings and "output" in fills
        total = sum(ckpt.file.tensors[ckpt._names[n]].nbytes for n in names)
        if progress is None:
            progress = total > 2**30 and sys.stderr.isatty()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {Path(path).name}", file=sys.stderr)
        shapes = ckpt.shapes()
        state = {}

        def fill(module: str, weight: StoredWeight) -> None:
            fills[module](weight)
            model.get_submodule(module).to(device)

        for name in names:
            module = name.removesuffix(".weight")
            if module in fills or (copy_output and name == "tok_embeddings.weight"):
                weight = StoredWeight(ckpt.raw(name), types[name], shapes[name])
                if copy_output and name == "tok_embeddings.weight":
                    fill("output", weight)
                if module in fills:
                    fill(module, weight)
                    del weight
                    release_freed_memory()
                    if bar is not None:
                        bar.update(ckpt.file.tensors[ckpt._names[name]].nbytes)
                    continue
                tensor = weight.dequantized(dtype)
                del weight
            else:
                tensor = ckpt.read(name, dtype)
            if bar is not None:
                bar.update(ckpt.file.tensors[ckpt._names[name]].nbytes)
            state[name] = tensor.to(device) if device.type != "cpu" else tensor
        if bar is not None:
            bar.close()
        stop_tokens = _stop_tokens(ckpt.file.metadata, str(ckpt.path))
    finally:
        ckpt.close()
    # The filled modules' tensors, under every name a module has (a tied output may be the
    # embedding's quantized table itself: llama/quantization/embedding.py).
    filled = {id(sub) for name in fills for sub in model.get_submodule(name).modules()}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in filled:
            state.update({f"{name}.{n}": t for n, t in module.state_dict().items()})
    tied_float = config.tie_word_embeddings and "output" not in fills and "tok_embeddings" not in fills
    assign_weights(model, state, tied_float, device)
    model.stop_tokens = stop_tokens
    return model.eval()


def _stop_tokens(metadata: Mapping[str, Any], where: str) -> frozenset[int]:
    """The tokenizer's stop tokens, or without a tokenizer in the file its eos / eot / eom ids."""
    if "tokenizer.ggml.model" not in metadata:
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        return frozenset(metadata[k] for k in keys if k in metadata)
    with warnings.catch_warnings():  # load_tokenizer warns about the chat template
        warnings.simplefilter("ignore")
        return tokenizer_from_gguf(metadata, where).stop_tokens


# ---- saving -----------------------------------------------------------------------------------------------

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_GGUF_TYPE_OF = {torch.float32: GGMLType.F32, torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16}


def tensor_type(name: str, shape: Sequence[int], outtype: str) -> GGMLType:
    """The type llama.cpp's converter gives a tensor: vectors (norms, rope_freqs) stay F32; matrices
    take the outtype, Q8_0 falling back to F16 where a row is not a whole number of blocks."""
    if len(shape) < 2 or outtype == "f32":
        return GGMLType.F32
    if outtype == "q8_0":
        return GGMLType.Q8_0 if shape[-1] % 32 == 0 else GGMLType.F16
    return {"f16": GGMLType.F16, "bf16": GGMLType.BF16}[outtype]


def save(
    path: str | os.PathLike,
    config: ModelConfig,
    state: Mapping[str, torch.Tensor],
    tokenizer: Mapping[str, Any],
    *,
    outtype: str = "f16",
    name: str = "llama",
) -> Path:
    """Write a GGUF file llama.cpp runs: config and tokenizer metadata (tokenizer: tokenizer.* keys, as
    tokenizer_metadata gives them), then the tensors in GGUF's names, the output left out when tied.
    Refuses (ConfigError) a config GGUF cannot express, naming the fields."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF outtype {outtype!r}; expected one of {', '.join(OUTTYPES)}")
    metadata, rope_freqs = config_metadata(config, name=name, outtype=outtype)
    metadata.update(tokenizer)
    tensors = []
    if rope_freqs is not None:
        tensors.append((ROPE_FREQS, rope_freqs, GGMLType.F32))
    for meta_name, tensor in state.items():
        if meta_name == "output.weight" and config.tie_word_embeddings:
            continue
        tensors.append((meta_to_gguf_name(meta_name), tensor, tensor_type(meta_name, tensor.shape, outtype)))
    return write_gguf(path, metadata, tensors)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, outtype: str = "auto") -> Path:
    """Convert a checkpoint (Meta or HF directory, or a GGUF file) into one GGUF file `dst`.

    outtype: f32, f16, bf16 or q8_0 for the matrices (vectors stay f32), or "auto": the source's own
    float type, so that nothing is rounded (a quantized GGUF source has none: give one).
    Like llama.core.checkpoint.convert: the source is checked completely before anything is written,
    the file is written beside `dst` under a temporary name and renamed when complete, and `dst` must
    not exist yet. A Meta file's copy of a tied output (Llama 3.2) is written tied. The tokenizer of a
    GGUF source is copied as it is; a directory's is converted (tokenizer_metadata)."""
    if outtype not in (*OUTTYPES, "auto"):
        raise ValueError(f"unknown GGUF outtype {outtype!r}; expected auto or one of {', '.join(OUTTYPES)}")
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists; choose a new output file")
    src = Path(src)
    if is_gguf(src):
        ckpt = GGUFModelFile(src)
        try:
            config = ckpt.config
            names = check_tensors(ckpt, meta_model(config))
            stored = {ckpt.type(n) for n in names if len(ckpt.shapes()[n]) == 2}  # vectors are F32 in any GGUF
            state = {name: ckpt.read(name, torch.float32) for name in names}
            tokenizer = {k: v for k, v in ckpt.file.metadata.items() if k.startswith("tokenizer.")}
            name = ckpt.file.metadata.get("general.name", src.stem)
        finally:
            ckpt.close()
    else:
        ckpt = weights.open_checkpoint(src)
        try:
            config = config_from_checkpoint(ckpt)
            names = check_tensors(ckpt, meta_model(config))
            state = {n: ckpt.read(n) for n in names}
            stored = {_GGUF_TYPE_OF[ckpt.dtype(n)] for n in names if state[n].ndim == 2}
        finally:
            ckpt.close()
        tokenizer = tokenizer_metadata(src, config.vocab_size)
        name = src.name
        if not config.tie_word_embeddings and torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
            config = config.replace(tie_word_embeddings=True)
    if config.tie_word_embeddings:
        state.pop("output.weight", None)
    if outtype == "auto":
        if len(stored) != 1 or not stored <= set(_GGUF_TYPE_OF.values()):
            kinds = ", ".join(sorted(t.name for t in stored))
            raise ValueError(f"{src}: matrices stored as {kinds}; no one GGUF type holds them without rounding: "
                             f"choose an outtype ({', '.join(OUTTYPES)})")  # fmt: skip
        outtype = stored.pop().name.lower()
    config_metadata(config, name=name, outtype=outtype)  # refuses before any file exists
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the output is an ordinary file
    try:
        save(tmp, config, state, tokenizer, outtype=outtype, name=name)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst
