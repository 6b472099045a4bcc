"""GGUF files as models (llama/core/gguf.py, llama/quantization/gguf.py): files written by the `gguf`
package (llama.cpp's own writer) load and give the logits of their reference dequantization, for
every tensor type; files written here read back with the package's reader and load as the checkpoint
they came from; the tokenizer in the metadata encodes like the original; every refusal names what
it refuses."""

from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402
from random_models import random_model  # noqa: E402

import llama  # noqa: E402
from llama.core import gguf as core_gguf  # noqa: E402
from llama.core.config import ConfigError  # noqa: E402
from llama.core.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, TokenizerFormatError  # noqa: E402
from llama.quantization import Int4Linear, Int8BlockLinear, Int8Linear  # noqa: E402
from weights import BUNDLED_MODEL, CheckpointError  # noqa: E402
from weights.gguf import GGMLType, GGUFFile, quantize_q8_0  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_TOKENIZER = Path(str(importlib.resources.files("llama_models.llama3") / "tokenizer.model"))
LLAMA2_TOKENIZER = ROOT.parent / "shared/fixtures/llama2-tokenizer.model"
KJV_TOKENIZER = BUNDLED_MODEL / "tokenizer.model"  # sentencepiece BPE, trained here; always present
T = gguf.GGMLQuantizationType

# Rows of 256 values: every K-quant's super-block fits.
CONFIG = llama.ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, ffn_dim=512,
                           rope_theta=500000.0, rope_scaling=llama.RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
                           tie_word_embeddings=False, max_seq_len=512)  # fmt: skip
TOKENS = torch.tensor([[1, 400, 77, 3000, 12, 9, 4095, 250, 31, 2]])


# ---- files the way llama.cpp writes them ------------------------------------------------------------------


def sentencepiece_vocab(model_file: Path) -> dict:
    """tokenizer.* metadata from a sentencepiece model, as llama.cpp's converter reads it
    (_create_vocab_sentencepiece: pieces, scores, and the types sentencepiece reports)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1)
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types,
            "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}  # fmt: skip


def write_like_llama_cpp(path: Path, config: llama.ModelConfig, tensors: dict[str, tuple[np.ndarray, int]], vocab: dict,
                         *, chat_template: str | None = None, extra: dict | None = None) -> Path:  # fmt: skip
    """A GGUF file through the gguf package's GGUFWriter, with the calls convert_hf_to_gguf.py makes.
    tensors: GGUF name -> (array, type); a float array for F32 / F16, else the stored blocks."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_file_type(1)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(config.head_dim)
    for key, value in (extra or {}).items():
        w.add_key_value(key, value[1], value[0])
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab.get("pre", "default"))
    w.add_token_list(vocab["tokens"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if "unk" in vocab:
        w.add_unk_token_id(vocab["unk"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for name, (data, kind) in tensors.items():
        if kind in (T.F32, T.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=T(kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


FP16_FIELDS = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def encode_like_llama_cpp(w: np.ndarray, kind: T, rng: np.random.Generator) -> np.ndarray:
    """A weight stored as `kind`: quantized by the gguf package where it can (F16, BF16, Q4_0 ... Q8_0);
    the K-quants, which it only dequantizes, as random blocks with scales of the weight's size."""
    if kind == T.F32:
        return w
    if kind == T.F16:
        return w.astype(np.float16)
    if kind not in FP16_FIELDS:
        return quants.quantize(w, kind)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    n = w.size // block_values
    blocks = rng.integers(0, 256, (n, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[kind]:
        blocks[:, offset : offset + 2] = (rng.uniform(0.001, 0.02, n).astype(np.float16)).view(np.uint8).reshape(n, 2)
    return blocks.reshape(w.shape[0], -1)


def llama_cpp_file(tmp_path: Path, kind: T, model: llama.Transformer, *, output_kind: T | None = None) -> tuple[Path, dict]:
    """The model as a GGUF file whose matrices are all `kind` (the output `output_kind`), and the float
    state dict (Meta names) the gguf package's dequantization gives for it: the reference."""
    rng = np.random.default_rng(int(kind))
    tensors, reference = {}, {}
    for name, param in model.state_dict().items():
        if name == "output.weight" and model.config.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for a tied model
        w = param.float().numpy()
        t = (output_kind or kind) if name == "output.weight" else kind if w.ndim == 2 else T.F32
        stored = encode_like_llama_cpp(w, t, rng)
        tensors[core_gguf.meta_to_gguf_name(name)] = (stored, t)
        reference[name] = torch.from_numpy(quants.dequantize(stored, t).reshape(w.shape).astype(np.float32))
    tensors["rope_freqs.weight"] = (core_gguf.llama3_rope_divisors(CONFIG.head_dim, CONFIG.rope_theta,
                                                                   CONFIG.rope_scaling).numpy(), T.F32)  # fmt: skip
    path = write_like_llama_cpp(tmp_path / f"model-{kind.name}.gguf", model.config, tensors, kjv_vocab())
    return path, reference


_KJV_VOCAB = None


def kjv_vocab() -> dict:
    global _KJV_VOCAB
    if _KJV_VOCAB is None:
        _KJV_VOCAB = sentencepiece_vocab(KJV_TOKENIZER)
    return _KJV_VOCAB


@pytest.fixture(scope="module")
def model() -> llama.Transformer:
    return random_model(CONFIG, std=0.05, random_norms=True)


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


# ---- every tensor type: the file's logits are its reference dequantization's --------------------------

ALL_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("kind", ALL_TYPES, ids=lambda k: k.name)
def test_llama_cpp_file_of_every_type_gives_its_reference_logits(tmp_path, model, kind):
    path, reference = llama_cpp_file(tmp_path, kind, model)
    loaded = llama.load(path, dtype="float32")
    assert loaded.config == CONFIG
    expected = llama.Transformer(CONFIG)
    expected.load_state_dict(reference)
    assert torch.equal(logits(loaded), logits(expected.eval()))  # the same float32 weights: the same logits
    assert loaded.stop_tokens == frozenset({2})


def test_default_dtypes(tmp_path, model):
    path, _ = llama_cpp_file(tmp_path, T.F16, model)
    assert llama.load(path).tok_embeddings.weight.dtype == torch.float16  # as stored
    path, _ = llama_cpp_file(tmp_path, T.Q4_K, model)
    assert llama.load(path).tok_embeddings.weight.dtype == torch.float32  # holds every quantized value
    assert llama.load(path, dtype="bfloat16").layers[0].attention.wq.weight.dtype == torch.bfloat16


def test_tied_output_and_an_ollama_blob_without_suffix(tmp_path):
    config = CONFIG.replace(tie_word_embeddings=True)
    tied = random_model(config, std=0.05)
    hf = tmp_path / "hf"
    llama.save(tied, hf, format="hf")
    shutil.copy(KJV_TOKENIZER, hf / "tokenizer.model")
    blob = tmp_path / "blobs" / "sha256-0123abcd"
    core_gguf.convert(hf, blob, outtype="f32")
    with GGUFFile(blob) as f:
        assert "output.weight" not in f.tensors
    loaded = llama.load(blob)
    assert loaded.config.tie_word_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    assert torch.equal(logits(loaded), logits(tied))
    assert isinstance(llama.load_tokenizer(blob), SentencePieceTokenizer)


# ---- writing: HF -> GGUF -> load is the HF load -----------------------------------------------------------


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    llama.save(model, path, format="hf")
    shutil.copy(KJV_TOKENIZER, path / "tokenizer.model")
    return path


def test_hf_to_gguf_f32_loads_as_the_hf_checkpoint(tmp_path, hf_checkpoint):
    out = core_gguf.convert(hf_checkpoint, tmp_path / "m.gguf", outtype="f32")
    from_hf, from_gguf = llama.load(hf_checkpoint), llama.load(out)
    assert from_gguf.config == from_hf.config
    for name, tensor in from_hf.state_dict().items():
        assert torch.equal(from_gguf.state_dict()[name], tensor), name  # q/k rows arrive in the same order
    assert torch.equal(logits(from_gguf), logits(from_hf))
    assert from_gguf.stop_tokens == from_hf.stop_tokens


def test_meta_to_gguf_ties_a_stored_copy_of_the_embedding(tmp_path):
    config = CONFIG.replace(tie_word_embeddings=True, rope_scaling=None, rope_theta=10000.0)
    tied = random_model(config, std=0.05)
    meta = tmp_path / "meta"
    llama.save(tied, meta, format="meta")  # Meta's format stores the output as a copy
    shutil.copy(KJV_TOKENIZER, meta / "tokenizer.model")
    out = core_gguf.convert(meta, tmp_path / "m.gguf")
    loaded = llama.load(out)
    assert loaded.config.tie_word_embeddings
    assert torch.equal(logits(loaded), logits(tied))


def test_written_file_reads_back_with_the_gguf_package(tmp_path, hf_checkpoint, model):
    out = core_gguf.convert(hf_checkpoint, tmp_path / "m.gguf", outtype="q8_0")
    reader = gguf.GGUFReader(str(out))
    fields = reader.fields
    V = gguf.GGUFValueType

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama" and value("general.file_type") == 7
    expected = {"llama.block_count": 2, "llama.context_length": 512, "llama.embedding_length": 256,
                "llama.feed_forward_length": 512, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.attention.key_length": 64, "llama.rope.dimension_count": 64, "llama.vocab_size": 4096}  # fmt: skip
    for key, number in expected.items():
        assert fields[key].types == [V.UINT32] and value(key) == number, key
    assert fields["llama.rope.freq_base"].types == [V.FLOAT32] and value("llama.rope.freq_base") == 500000.0
    assert np.float32(value("llama.attention.layer_norm_rms_epsilon")) == np.float32(1e-5)
    assert value("tokenizer.ggml.model") == "llama"
    sp = kjv_vocab()
    assert value("tokenizer.ggml.tokens") == sp["tokens"]
    assert fields["tokenizer.ggml.token_type"].types == [V.ARRAY, V.INT32] and value("tokenizer.ggml.token_type") == sp["types"]
    assert np.array_equal(np.float32(value("tokenizer.ggml.scores")), np.float32(sp["scores"]))
    assert value("tokenizer.ggml.bos_token_id") == 1 and value("tokenizer.ggml.eos_token_id") == 2
    assert value("tokenizer.ggml.add_bos_token") is True
    assert "[INST]" in value("tokenizer.chat_template")

    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors and "rope_freqs.weight" in tensors
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32  # vectors stay F32
    state = model.state_dict()
    for meta_name, tensor in state.items():
        stored = tensors[core_gguf.meta_to_gguf_name(meta_name)]
        if tensor.ndim == 2:  # Q8_0, byte for byte what the gguf package (= ggml) makes of the weights
            assert stored.tensor_type == T.Q8_0
            assert np.array_equal(stored.data.reshape(-1), quants.quantize(tensor.numpy(), T.Q8_0).reshape(-1)), meta_name
    divisors = tensors["rope_freqs.weight"].data
    assert np.allclose(divisors, core_gguf.llama3_rope_divisors(64, 500000.0, CONFIG.rope_scaling).numpy())


def test_rope_freqs_are_the_models_own_scaling():
    """llama.cpp divides the base frequencies by rope_freqs; that must be this model's llama3 scaling."""
    from llama.core.model import rope_frequencies

    for scaling in (llama.RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), llama.RopeScaling("llama3", 8.0, 2.0, 6.0, 16384)):
        divisors = core_gguf.llama3_rope_divisors(128, 500000.0, scaling)
        base, scaled = rope_frequencies(128, 500000.0, None), rope_frequencies(128, 500000.0, scaling)
        torch.testing.assert_close(base / divisors, scaled, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-3.1-8b", "llama-3.1-405b", "llama-3.2-1b"])
def test_registry_configs_round_trip_through_gguf_metadata(name):
    config = llama.ModelConfig.from_name(name)
    metadata, rope_freqs = core_gguf.config_metadata(config, name=name, outtype="f16")
    back = core_gguf.config_from_gguf(metadata, vocab_size=config.vocab_size, has_output=not config.tie_word_embeddings,
                                      rope_freqs=rope_freqs)  # fmt: skip
    assert back == config


@pytest.mark.parametrize("scaling", [llama.RopeScaling("llama3", 8.0, 2.0, 6.0, 16384),
                                     llama.RopeScaling("llama3", 16.0, 1.0, 4.0, 4096),
                                     llama.RopeScaling("linear", 4.0)])  # fmt: skip
def test_other_rope_scalings_round_trip(scaling):
    config = CONFIG.replace(rope_scaling=scaling)
    metadata, rope_freqs = core_gguf.config_metadata(config, name="x", outtype="f16")
    back = core_gguf.config_from_gguf(metadata, vocab_size=4096, has_output=True, rope_freqs=rope_freqs)
    assert back == config


@pytest.mark.parametrize("change, named", [
    ({"qk_norm": True}, "qk_norm=True"),
    ({"mlp": "gelu"}, "mlp='gelu'"),
    ({"sliding_window": 128}, "sliding_window=128"),
    ({"nope_layers": (1,)}, "nope_layers=(1,)"),
    ({"rope_scaling": llama.RopeScaling("dynamic", 2.0)}, "rope_scaling=RopeScaling(kind='dynamic'"),
    ({"rope_scaling": llama.RopeScaling("yarn", 4.0, original_max_seq_len=2048)}, "rope_scaling=RopeScaling(kind='yarn'"),
])  # fmt: skip
def test_configs_gguf_cannot_express_are_refused_by_name(tmp_path, change, named):
    config = CONFIG.replace(**change)
    with pytest.raises(ConfigError, match=r"GGUF's 'llama' architecture cannot express " + re_escape(named)):
        core_gguf.config_metadata(config, name="x", outtype="f16")
    with pytest.raises(ConfigError, match=re_escape(named)):
        core_gguf.save(tmp_path / "x.gguf", config, {}, {}, outtype="f16")
    assert not (tmp_path / "x.gguf").exists()


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# ---- reading refuses what this model cannot be ------------------------------------------------------------


def small_file(tmp_path, model, *, extra=None, drop=(), add=None, arch="llama") -> Path:
    """The model as an F32 file by the gguf package, with extra metadata / tensors dropped or added."""
    tensors = {core_gguf.meta_to_gguf_name(n): (t.float().numpy(), T.F32) for n, t in model.state_dict().items()}
    tensors = {n: t for n, t in tensors.items() if n not in drop} | (add or {})
    path = write_like_llama_cpp(tmp_path / "m.gguf", model.config, tensors, kjv_vocab(), extra=extra)
    if arch != "llama":  # rewrite the architecture string in place (same length keeps offsets)
        data = path.read_bytes().replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", len(arch).to_bytes(8, "little") + arch.encode(), 1)
        path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def small_model() -> llama.Transformer:
    config = CONFIG.replace(dim=64, head_dim=-1, ffn_dim=128, rope_scaling=None, n_layers=1)
    return random_model(config, std=0.05)


S = gguf.GGUFValueType


@pytest.mark.parametrize("extra, message", [
    ({"llama.attention.sliding_window": (S.UINT32, 4096)}, "metadata this model cannot honour: llama.attention.sliding_window"),
    ({"llama.expert_count": (S.UINT32, 8)}, "a mixture of experts"),
    ({"llama.rope.scaling.type": (S.STRING, "yarn")}, "RoPE scaling 'yarn' is not supported"),
    ({"llama.vocab_size": (S.UINT32, 5000)}, "llama.vocab_size is 5000, but token_embd has 4096 rows"),
    ({"split.count": (S.UINT16, 3)}, "one part of a split GGUF"),
])  # fmt: skip
def test_metadata_this_model_cannot_honour_is_refused(tmp_path, small_model, extra, message):
    path = small_file(tmp_path, small_model, extra=extra)
    with pytest.raises(ConfigError, match=f"{re_escape(str(path))}: .*{re_escape(message)}"):
        llama.load(path)


def test_another_architecture_is_refused(tmp_path, small_model):
    path = small_file(tmp_path, small_model, arch="qwen2")
    with pytest.raises(ConfigError, match=r"architecture 'qwen2' is not supported; only 'llama'"):
        llama.load(path)


def test_partial_rotary_is_refused(tmp_path, small_model):
    path = small_file(tmp_path, small_model)
    data = path.read_bytes()
    key = b"llama.rope.dimension_count"
    at = data.index(key) + len(key) + 4  # then the uint32 value
    path.write_bytes(data[:at] + (8).to_bytes(4, "little") + data[at + 4 :])
    with pytest.raises(ConfigError, match="rope.dimension_count 8 rotates part of each head of 16"):
        llama.load(path)


def test_tensors_missing_unknown_or_misshapen_are_named(tmp_path, small_model):
    path = small_file(tmp_path, small_model, drop=["blk.0.ffn_up.weight"])
    with pytest.raises(CheckpointError, match=r"missing tensors: layers\.0\.feed_forward\.w3\.weight"):
        llama.load(path)
    path = small_file(tmp_path, small_model, add={"blk.0.attn_q_norm.weight": (np.ones(16, np.float32), T.F32)})
    with pytest.raises(CheckpointError, match=r"tensors this model has no place for: blk\.0\.attn_q_norm\.weight"):
        llama.load(path)
    path = small_file(tmp_path, small_model, add={"blk.0.ffn_up.weight": (np.ones((64, 64), np.float32), T.F32)})
    with pytest.raises(CheckpointError, match=r"m\.gguf \(blk\.0\.ffn_up\.weight\): tensor 'layers\.0\.feed_forward\.w3\.weight' has shape \[64, 64\]"):
        llama.load(path)


def test_rope_freqs_no_llama3_scaling_gives_is_refused(tmp_path, small_model):
    divisors = np.linspace(1, 5, 8, dtype=np.float32) ** 2
    path = small_file(tmp_path, small_model, add={"rope_freqs.weight": (divisors, T.F32)})
    with pytest.raises(ConfigError, match="rope_freqs.weight is not the frequency scaling of Llama 3.1"):
        llama.load(path)


def test_unreadable_type_is_named_with_file_and_tensor(tmp_path, small_model):
    path = small_file(tmp_path, small_model)
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(struct_string(name)) + 8 + len(name) + 4 + 2 * 8
    data[at : at + 4] = int(T.IQ4_NL).to_bytes(4, "little")  # 32 values in 18 bytes: fits where F32 was
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"m\.gguf \(blk\.0\.attn_q\.weight\): tensor type IQ4_NL cannot be read"):
        llama.load(path)


def struct_string(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b


# ---- quantized: Q8_0 and Q4_0 stay as stored ----------------------------------------------------------------


@pytest.mark.parametrize("kind, mode, module", [(T.Q8_0, "int8", Int8BlockLinear), (T.Q4_0, "int4", Int4Linear)])
def test_q8_0_and_q4_0_load_quantized_without_loss(tmp_path, model, kind, mode, module):
    path, reference = llama_cpp_file(tmp_path, kind, model)
    quantized = llama.load(path, dtype="float32", quantize=mode)
    assert type(quantized.layers[0].attention.wq) is module and type(quantized.output) is module
    assert quantized.quantization["gguf_kept"] == 15 and quantized.quantization["gguf_requantized"] == 0
    expected = llama.Transformer(CONFIG)
    expected.load_state_dict(reference)
    torch.testing.assert_close(logits(quantized), logits(expected.eval()), rtol=0, atol=2e-5)  # matmul order only
    # About the file's own size: Q8_0 exactly (int8 + an fp16 scale per 32); Q4_0 in bfloat16 with
    # Int4Linear's zero points (0 here) beside the scales: 0.625 bytes a weight against 0.5625.
    with GGUFFile(path) as f:
        stored = sum(t.nbytes for n, t in f.tensors.items() if n != "token_embd.weight" and len(t.shape) == 2)
    small = llama.load(path, dtype="bfloat16", quantize=mode)
    held = sum(b.nbytes for n, b in small.named_buffers() if n.startswith(("layers.", "output.")) and b.ndim >= 2)
    assert held <= (1.0 if kind == T.Q8_0 else 1.12) * stored


def test_other_types_are_quantized_by_the_requested_mode(tmp_path, model):
    path, _ = llama_cpp_file(tmp_path, T.Q4_0, model, output_kind=T.Q6_K)  # llama-quantize's Q4_0 keeps the output in Q6_K
    quantized = llama.load(path, quantize="int4", group_size=64)
    assert type(quantized.output) is Int4Linear and quantized.output.group_size == 64
    assert quantized.layers[0].feed_forward.w2.group_size == 32  # Q4_0: its own blocks
    assert quantized.quantization["gguf_requantized"] == 1
    path, _ = llama_cpp_file(tmp_path, T.Q4_K, model)
    assert type(llama.load(path, quantize="int8").layers[1].attention.wo) is Int8Linear


def test_saving_a_model_that_kept_gguf_blocks_is_refused(tmp_path, model):
    path, _ = llama_cpp_file(tmp_path, T.Q8_0, model)
    with pytest.raises(ValueError, match="keeps GGUF's own blocks"):
        llama.quantization.save_quantized(llama.load(path, quantize="int8"), tmp_path / "q")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 96), (3, 5, 96), (40, 96)])
def test_int8_block_linear_forward_is_the_dequantized_matmul(dtype, shape):
    torch.manual_seed(0)
    weight = torch.randn(48, 96)
    module = Int8BlockLinear.from_float(torch.nn.Linear(96, 48, bias=False).requires_grad_(False))
    module.load_weight(weight)
    stored = quantize_q8_0(weight).view(48, 3, 34)
    reference = quants.dequantize(stored.numpy().reshape(48, -1), T.Q8_0).reshape(48, 96)  # what Q8_0 stands for
    assert torch.equal(module.dequantize(), torch.from_numpy(reference))
    x = torch.randn(shape).to(dtype)
    expected = F.linear(x.float(), torch.from_numpy(reference).to(dtype).float()).to(dtype)
    torch.testing.assert_close(module(x), expected, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2 if dtype != torch.float32 else 1e-5)
    assert module(x).dtype == dtype and module(x).shape == (*shape[:-1], 48)


# ---- tokenizers -----------------------------------------------------------------------------------------

TEXTS = ["", "This is a test sentence.", "  leading and trailing  ", "tabs\t\tand\nnewlines\n\n\nhere\r\n",
         "我们在北京的大学学习汉语。", "emoji 😀👍🏽 family 👩‍👩‍👧‍👦", "<|eot_id|> <s> </s> [INST] x [/INST]",
         "3.14159 1234567890 -42", "naïve café — “quotes” …", "\x00\x01 control\x7f \ufeff"]  # fmt: skip


SENTENCEPIECE_FILES = [
    pytest.param(KJV_TOKENIZER, id="kjv"),
    pytest.param(LLAMA2_TOKENIZER, id="llama2", marks=pytest.mark.skipif(
        not LLAMA2_TOKENIZER.is_file(), reason=f"Llama 2 tokenizer not found at {LLAMA2_TOKENIZER}")),
]  # fmt: skip


@pytest.mark.parametrize("model_file", SENTENCEPIECE_FILES)
def test_sentencepiece_vocabulary_encodes_like_the_original(model_file):
    vocab = sentencepiece_vocab(model_file)
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": vocab["tokens"],
                "tokenizer.ggml.scores": vocab["scores"], "tokenizer.ggml.token_type": vocab["types"],
                "tokenizer.ggml.bos_token_id": vocab["bos"], "tokenizer.ggml.eos_token_id": vocab["eos"],
                "tokenizer.ggml.unknown_token_id": vocab["unk"]}  # fmt: skip
    ours, original = core_gguf.tokenizer_from_gguf(metadata), SentencePieceTokenizer(model_file)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (original.bos_id, original.eos_id, original.pad_id, original.vocab_size)
    for text in TEXTS:
        for bos, eos in ((True, False), (False, True)):
            assert ours.encode(text, bos=bos, eos=eos) == original.encode(text, bos=bos, eos=eos), text
    ids = original.encode(TEXTS[5] + TEXTS[4], bos=False, eos=False)
    assert ours.decode(ids) == original.decode(ids)


@pytest.fixture(scope="module")
def llama3_hf_json(tmp_path_factory) -> Path:
    """Llama 3's tokenizer.json as transformers' converter writes it from Meta's file (HF's Llama 3
    checkpoints were made this way): what llama.cpp's converter reads."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = MetaTokenizer(LLAMA3_TOKENIZER)
    specials = sorted(meta.special_tokens, key=meta.special_tokens.get)
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.json"
    TikTokenConverter(vocab_file=str(LLAMA3_TOKENIZER), extra_special_tokens=specials).converted().save(str(path))
    return path


@pytest.fixture(scope="module")
def meta_llama3():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(LLAMA3_TOKENIZER)


def llama_cpp_gpt2_vocab(tokenizer_json: Path) -> dict:
    """tokenizer.* as llama.cpp's converter writes them for Llama 3 (_set_vocab_gpt2): the vocabulary
    by id, added tokens as control tokens, the merges of tokenizer.json, pre-tokenizer llama-bpe."""
    data = json.loads(tokenizer_json.read_text())
    added = {t["id"]: t["content"] for t in data["added_tokens"]}
    by_id = {i: token for token, i in data["model"]["vocab"].items()} | added
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": [by_id[i] for i in range(len(by_id))],
            "types": [3 if i in added else 1 for i in range(len(by_id))], "merges": merges,
            "bos": 128000, "eos": 128009}  # fmt: skip


@pytest.mark.slow
def test_llama3_vocabulary_as_llama_cpp_writes_it_encodes_like_meta(llama3_hf_json, meta_llama3):
    vocab = llama_cpp_gpt2_vocab(llama3_hf_json)
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                "tokenizer.ggml.tokens": vocab["tokens"], "tokenizer.ggml.token_type": vocab["types"],
                "tokenizer.ggml.merges": vocab["merges"], "tokenizer.ggml.bos_token_id": 128000,
                "tokenizer.ggml.eos_token_id": 128009}  # an instruct model's eos: end of turn
    ours = core_gguf.tokenizer_from_gguf(metadata)
    assert isinstance(ours, TiktokenTokenizer) and ours.vocab_size == 128256
    assert ours.stop_tokens == {128001, 128008, 128009}
    for text in TEXTS:
        assert ours.encode(text, bos=True, eos=True) == meta_llama3.encode(text, bos=True, eos=True), text
    assert ours.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]


@pytest.mark.slow
def test_llama3_vocabulary_written_here_is_llama_cpps(tmp_path, llama3_hf_json, meta_llama3):
    """Written from Meta's tokenizer.model: the same tokens, types and merges (in the same order) that
    llama.cpp's converter takes from HF's tokenizer.json, and it reads back as Meta's tokenizer."""
    (tmp_path / "tokenizer.model").symlink_to(LLAMA3_TOKENIZER)
    ours = core_gguf.tokenizer_metadata(tmp_path, 128256)
    vocab = llama_cpp_gpt2_vocab(llama3_hf_json)
    assert ours["tokenizer.ggml.model"] == "gpt2" and ours["tokenizer.ggml.pre"] == "llama-bpe"
    assert ours["tokenizer.ggml.tokens"] == vocab["tokens"]
    assert ours["tokenizer.ggml.token_type"] == vocab["types"]
    assert ours["tokenizer.ggml.merges"] == vocab["merges"]
    assert (ours["tokenizer.ggml.bos_token_id"], ours["tokenizer.ggml.eos_token_id"]) == (128000, 128001)
    assert (ours["tokenizer.ggml.eot_token_id"], ours["tokenizer.ggml.eom_token_id"]) == (128009, 128008)
    back = core_gguf.tokenizer_from_gguf(ours)
    for text in TEXTS:
        assert back.encode(text, bos=True, eos=False) == meta_llama3.encode(text, bos=True, eos=False)


def test_tokenizer_metadata_pads_to_the_models_vocabulary(tmp_path):
    shutil.copy(KJV_TOKENIZER, tmp_path / "tokenizer.model")
    md = core_gguf.tokenizer_metadata(tmp_path, 4100)
    assert md["tokenizer.ggml.tokens"][-4:] == ["[PAD4096]", "[PAD4097]", "[PAD4098]", "[PAD4099]"]
    assert md["tokenizer.ggml.token_type"][-1] == core_gguf.UNUSED and md["tokenizer.ggml.scores"][-1] == -10000.0
    with pytest.raises(TokenizerFormatError, match="4096 tokens, more than the model's vocab_size 4000"):
        core_gguf.tokenizer_metadata(tmp_path, 4000)


def test_tokenizer_kinds_this_project_cannot_run_are_refused():
    base = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1, 1]}
    with pytest.raises(TokenizerFormatError, match="tokenizer.ggml.model 'bert' is not supported"):
        core_gguf.tokenizer_from_gguf(base | {"tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerFormatError, match="pre-tokenizer 'qwen2' is not supported; only Llama 3's 'llama-bpe'"):
        core_gguf.tokenizer_from_gguf(base | {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"})
    merges = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": ["a", "b", "ab", "ba"],
              "tokenizer.ggml.token_type": [1, 1, 1, 1], "tokenizer.ggml.merges": ["b a", "a b"]}  # fmt: skip
    with pytest.raises(TokenizerFormatError, match="merge 1 'a b' is out of the order of the token ids"):
        core_gguf.tokenizer_from_gguf(merges)


def test_chat_template_and_flags_are_kept(tmp_path, model):
    path, _ = llama_cpp_file(tmp_path, T.F32, model)
    tokenizer = llama.load_tokenizer(path)
    assert tokenizer.add_bos is True and tokenizer.add_eos is False and tokenizer.chat_template is None
    with pytest.warns(UserWarning, match="not Llama's 2 format"):
        core_gguf.tokenizer_from_gguf(
            {"tokenizer.ggml.model": "llama", "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{% endfor %}",
             **{f"tokenizer.ggml.{k}": v for k, v in (("tokens", kjv_vocab()["tokens"]), ("token_type", kjv_vocab()["types"]),
                                                      ("scores", kjv_vocab()["scores"]))}})  # fmt: skip


DIALOG = [{"role": "system", "content": "You are terse. "}, {"role": "user", "content": " Hi there"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a river.\n"}]  # fmt: skip


def test_llama3_chat_template_renders_what_encode_dialog_encodes(meta_llama3):
    jinja2 = pytest.importorskip("jinja2")
    tokenizer = TiktokenTokenizer.from_tiktoken_file(LLAMA3_TOKENIZER)
    text = jinja2.Template(core_gguf.LLAMA3_CHAT_TEMPLATE).render(messages=DIALOG + [{"role": "tool", "content": "{}"}],
                                                                   bos_token="<|begin_of_text|>", add_generation_prompt=True)  # fmt: skip
    assert text == tokenizer.decode(tokenizer.encode_dialog(DIALOG + [{"role": "tool", "content": "{}"}]))


def test_llama2_chat_template_renders_meta_chat_completion():
    jinja2 = pytest.importorskip("jinja2")
    text = jinja2.Template(core_gguf.LLAMA2_CHAT_TEMPLATE).render(messages=DIALOG, bos_token="<s>", eos_token="</s>")
    # Meta's chat_completion: the system message inside the first user turn; each finished pair
    # bos + "[INST] user [/INST] answer " + eos; the last user turn left open.
    assert text == ("<s>[INST] <<SYS>>\nYou are terse. \n<</SYS>>\n\n Hi there [/INST] Hello. </s>"
                    "<s>[INST] Name a river. [/INST]")


# ---- scripts ----------------------------------------------------------------------------------------------


def script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_convert_script_and_generate_from_the_file(tmp_path, hf_checkpoint):
    out = tmp_path / "m.gguf"
    result = script("convert.py", hf_checkpoint, out, "--to", "gguf", "--outtype", "q8_0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    result = script("convert.py", hf_checkpoint, out, "--to", "gguf")
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    result = script("convert.py", hf_checkpoint, tmp_path / "x.gguf", "--to", "gguf", "--dtype", "float16")
    assert result.returncode == 2 and "use --outtype" in result.stderr
    result = script("convert.py", hf_checkpoint, tmp_path / "x", "--to", "hf", "--outtype", "f16")
    assert result.returncode == 2 and "--outtype applies to --to gguf" in result.stderr

    result = script("generate.py", "--checkpoint", out, "--prompt", "And God said", "--max-new-tokens", "5",
                    "--temperature", "0", "--dtype", "float32", "--quantize", "int8")  # fmt: skip
    assert result.returncode == 0, result.stderr
    reference = llama.Llama(llama.load(out, dtype="float32"), llama.load_tokenizer(out))
    assert result.stdout == "And God said" + reference.generate("And God said", max_new_tokens=5, temperature=0) + "\n"

    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n" * 4)
    result = script("perplexity.py", "--checkpoint", out, "--text-file", text, "--dtype", "float32", "--no-progress")
    assert result.returncode == 0 and result.stdout.startswith("perplexity "), result.stderr

    variant = tmp_path / "qk_norm"
    llama.save(random_model(CONFIG.replace(qk_norm=True, n_layers=1)), variant, format="hf")
    shutil.copy(KJV_TOKENIZER, variant / "tokenizer.model")
    result = script("convert.py", variant, tmp_path / "v.gguf", "--to", "gguf")
    assert result.returncode == 2 and not (tmp_path / "v.gguf").exists()
    assert result.stderr == "error: GGUF's 'llama' architecture cannot express qk_norm=True\n"

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(out.read_bytes()[:5000])
    for name, args in (("generate.py", ["--checkpoint", broken]), ("perplexity.py", ["--checkpoint", broken, "--text-file", text]),
                       ("serve.py", ["--checkpoint", broken])):  # fmt: skip
        result = script(name, *args)
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.startswith(f"error: {broken}: truncated GGUF file") and "Traceback" not in result.stderr


# ---- the native Q8_0 kernel (kernels/csrc/gemv_int8.cpp, gemv_q8_0) ----------------------------------------


def native_kernels():
    from kernels import native

    if not native.available():
        pytest.skip(f"C++ kernels not built: {str(native.build_error())[:300]}")
    return native


def q8_0_case(M: int, N: int, K: int, seed: int):
    """x (M, K) bf16, a Q8_0 module (N, K), and the float32 weight its blocks stand for."""
    generator = torch.Generator().manual_seed(seed)
    module = Int8BlockLinear(K, N)
    module.load_weight(torch.randn(N, K, generator=generator) * torch.rand(N, 1, generator=generator))
    return torch.randn(M, K, generator=generator).bfloat16(), module, module.dequantize()


def assert_within_bf16(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y = x @ w.T summed in float32 and rounded once to bf16: within half a bf16 ulp of the exact
    value plus the float32 sums' rounding (K terms)."""
    ref, abs_ref = F.linear(x.float(), w), F.linear(x.float().abs(), w.abs())
    bound = 2**-8 * ref.abs() + 2 * x.shape[1] * 2**-24 * abs_ref
    assert ((y.float() - ref).abs() <= bound).all(), (y.float() - ref).abs().max()


@pytest.mark.parametrize("M", [1, 2, 5, 17, 40])
@pytest.mark.parametrize("N, K", [(1, 32), (7, 96), (100, 64), (33, 2048)])
def test_q8_0_kernel_is_the_exact_product_rounded_once(M, N, K):
    native = native_kernels()
    x, module, w = q8_0_case(M, N, K, seed=M * N + K)
    assert_within_bf16(native.gemv_q8_0(x, module.weight, module.scales), x, w)


def test_q8_0_kernel_refuses_what_it_cannot_take():
    native = native_kernels()
    x = torch.zeros(1, 48).bfloat16()
    with pytest.raises(ValueError, match="gemv_q8_0: in_features 48 is not a multiple of the block size 32"):
        native.gemv_q8_0(x, torch.zeros(4, 48, dtype=torch.int8), torch.zeros(4, 1, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"gemv_q8_0: scales must be a \(4, 2\) float16 CPU tensor"):
        native.gemv_q8_0(torch.zeros(1, 64).bfloat16(), torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 2))


@pytest.mark.slow
@pytest.mark.parametrize("int8_activations", [False, True], ids=["bf16-activations", "int8-activations"])
def test_native_swap_of_a_q8_0_model_keeps_its_logits(tmp_path, model, int8_activations):
    """Exact activations: within 2e-2 of the plain model. Activations quantized to int8 (the q8a
    kernel): no further from the float32 computation than 3x the plain bf16 model is (see
    tests/test_native_q8a.py)."""
    native = native_kernels()
    path, _ = llama_cpp_file(tmp_path, T.Q8_0, model)
    plain = llama.load(path, dtype="bfloat16", quantize="int8")
    swapped = llama.load(path, dtype="bfloat16", quantize="int8")
    exact = llama.load(path, dtype="float32", quantize="int8")
    names = native.swap_native_linears(swapped, int8_activations=int8_activations)
    assert "layers.0.attention.wq" in names and type(swapped.output) is native.NativeInt8BlockLinear
    assert swapped.output.weight is not None and swapped.layers[1].feed_forward.w2.scales.dtype == torch.float16
    assert swapped.output.int8_activations is int8_activations
    with torch.no_grad():  # one row at a time: the kernel's size
        for m in (plain, swapped, exact):
            m.setup_cache(1, 16)
        for i in range(TOKENS.shape[1]):
            a, b, f = (m(TOKENS[:, i : i + 1], i).float() for m in (plain, swapped, exact))
            if int8_activations:
                assert (b - f).abs().max() <= 3 * (a - f).abs().max() + 1e-3 * f.abs().max()
            else:
                assert (a - b).abs().max() <= 2e-2 * a.abs().max()


@pytest.mark.slow
def test_q8_0_kernel_generic_build():
    """The plain-loop build (CPUs without AVX-512 bf16) computes the same product."""
    native = native_kernels()
    native._compile(generic=True)
    for M, N, K in [(1, 5, 32), (6, 40, 160)]:
        x, module, w = q8_0_case(M, N, K, seed=K)
        assert_within_bf16(torch.ops.llama_kernels_generic.gemv_q8_0(x, module.weight, module.scales), x, w)
