"""A GGUF file's quantized embedding kept quantized (llama/quantization/embedding.py, gguf.py): the
model gives the logits and greedy tokens of the same file loaded with the embedding dequantized,
tied and untied; a tied output is the embedding's own quantized table (one copy, also after
kernels.optimize); a type with no quantized matmul (Q6_K, as llama.cpp's Q4_0 files store the
embedding) is looked up row by row, bit for bit its reference dequantization; what cannot work with
a quantized embedding refuses by name."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")
from random_models import random_model  # noqa: E402
from test_gguf import CONFIG, TOKENS, llama_cpp_file  # noqa: E402

import kernels  # noqa: E402
import llama  # noqa: E402
from kernels import native  # noqa: E402
from llama.core.device import model_device, model_dtype  # noqa: E402
from llama.core.generation import generate  # noqa: E402
from llama.core.support import UnsupportedModelError  # noqa: E402
from llama.quantization import Int4Linear, Int8BlockLinear, QuantizedEmbedding, quantize_model  # noqa: E402
from llama.quantization.gguf import GGUFRows  # noqa: E402

T = gguf.GGMLQuantizationType
KEPT = [(T.Q8_0, "int8", Int8BlockLinear), (T.Q4_0, "int4", Int4Linear)]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request) -> llama.Transformer:
    return random_model(CONFIG.replace(tie_word_embeddings=request.param), std=0.05, random_norms=True)


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def greedy(model, n: int = 8) -> list[int]:
    return generate(model, TOKENS.tolist(), n, temperature=0.0, stop_tokens=[])[0]


def float_tensors_of_table_size(model) -> list[str]:
    """Names of float tensors as large as the (V, D) table: none when the embedding stays quantized."""
    V, D = CONFIG.vocab_size, CONFIG.dim
    return [n for n, t in model.state_dict().items() if t.is_floating_point() and t.numel() >= V * D]


@pytest.mark.parametrize("kind, mode, module", KEPT, ids=["Q8_0", "Q4_0"])
def test_kept_embedding_gives_the_dequantized_embeddings_logits(tmp_path, model, kind, mode, module):
    path, reference = llama_cpp_file(tmp_path, kind, model)
    tied = model.config.tie_word_embeddings
    quantized = llama.load(path, dtype="float32", quantize=mode)
    plain = llama.load(path, dtype="float32", quantize=mode, quantize_embedding=False)
    assert type(quantized.tok_embeddings) is QuantizedEmbedding and type(quantized.tok_embeddings.table) is module
    assert type(plain.tok_embeddings) is torch.nn.Embedding
    assert (quantized.output is quantized.tok_embeddings.table) == tied  # tied: one quantized matrix for both
    assert float_tensors_of_table_size(quantized) == []
    assert quantized.quantization["embedding"] == kind.name and quantized.quantization["gguf_kept"] == 15
    # float32 holds Q8_0's and Q4_0's values exactly: the rows looked up are the dequantized table's
    assert torch.equal(quantized.tok_embeddings(TOKENS), reference["tok_embeddings.weight"][TOKENS])
    assert torch.equal(quantized.tok_embeddings.dequantize(), reference["tok_embeddings.weight"])
    assert torch.equal(logits(quantized), logits(plain))
    assert greedy(quantized) == greedy(plain)
    # bfloat16: Int4Linear's scales are rounded to bfloat16 (as in every bfloat16 Int4Linear), Q8_0's rows
    # are rounded once from float32: to bfloat16 rounding of the logits (a random model's near-flat
    # logits make greedy tokens in bfloat16 a coin toss: they are compared in float32 above)
    quantized = llama.load(path, dtype="bfloat16", quantize=mode)
    plain = llama.load(path, dtype="bfloat16", quantize=mode, quantize_embedding=False)
    assert quantized.tok_embeddings(TOKENS).dtype == torch.bfloat16 and model_dtype(quantized) == torch.bfloat16
    expected = logits(plain)
    error = (logits(quantized) - expected).abs().max()
    assert error <= 4 * 2**-8 * expected.abs().max()  # a few bfloat16 roundings of the largest logit


def test_other_embedding_types_are_looked_up_as_stored(tmp_path, model):
    """llama-quantize's Q4_0 keeps the embedding (a tied output) in Q6_K: its rows are read as stored,
    and a tied output gets an int4 copy quantized from the dequantized values, as before."""
    path, reference = llama_cpp_file(tmp_path, T.Q6_K, model)
    quantized = llama.load(path, dtype="float32", quantize="int4", group_size=64)
    table = quantized.tok_embeddings.table
    assert type(table) is GGUFRows and table.kind == T.Q6_K and quantized.quantization["embedding"] == "Q6_K"
    assert torch.equal(quantized.tok_embeddings(TOKENS), reference["tok_embeddings.weight"][TOKENS])
    assert float_tensors_of_table_size(quantized) == []
    source = "tok_embeddings.weight" if model.config.tie_word_embeddings else "output.weight"
    expected = Int4Linear(CONFIG.dim, CONFIG.vocab_size, 64)
    expected.load_weight(reference[source])  # the whole matrix at once; the loader takes slices of rows
    assert type(quantized.output) is Int4Linear
    assert torch.equal(quantized.output.weight, expected.weight)
    assert torch.equal(quantized.output.scales_and_zeros, expected.scales_and_zeros)
    plain = llama.load(path, dtype="float32", quantize="int4", group_size=64, quantize_embedding=False)
    assert torch.equal(logits(quantized), logits(plain))


@pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.build_error()}")
def test_optimized_tied_model_holds_the_table_once(tmp_path):
    model = random_model(CONFIG.replace(tie_word_embeddings=True), std=0.05, random_norms=True)
    path, _ = llama_cpp_file(tmp_path, T.Q4_0, model)
    plain = llama.load(path, dtype="bfloat16", quantize="int4")
    fast = kernels.optimize(llama.load(path, dtype="bfloat16", quantize="int4"))
    table = fast.tok_embeddings.table
    assert type(table) is native.NativeInt4Linear and fast.output is table  # swapped once, under both names
    assert [n for n, _ in table.named_buffers()] == ["packed"]  # the kernel's packing is the only copy
    assert torch.equal(table.dequantize_rows(TOKENS), plain.tok_embeddings.table.dequantize_rows(TOKENS))
    assert torch.equal(fast.tok_embeddings(TOKENS), plain.tok_embeddings(TOKENS))
    expected = logits(plain)
    assert (logits(fast) - expected).abs().max() <= 0.05 * expected.abs().max()  # bf16 kernels and SDPA


def test_what_cannot_take_a_quantized_embedding_says_so(tmp_path):
    model = random_model(CONFIG.replace(tie_word_embeddings=True), std=0.05)
    path, _ = llama_cpp_file(tmp_path, T.Q8_0, model)
    quantized = llama.load(path, dtype="float32", quantize="int8")
    assert model_device(quantized) == torch.device("cpu") and model_dtype(quantized) == torch.float32
    with pytest.raises(AttributeError, match="has no float weight: use llama.core.device.model_device"):
        quantized.tok_embeddings.weight  # noqa: B018
    with pytest.raises(UnsupportedModelError, match="'tok_embeddings' of type QuantizedEmbedding"):
        quantize_model(quantized, "int8")
    with pytest.raises(UnsupportedModelError, match="'tok_embeddings' of type QuantizedEmbedding"):
        llama.distributed.tensor_parallel.split_modules(quantized, None, None)  # checks before it needs a plan
    with pytest.raises(ValueError, match="keeps GGUF's own blocks"):
        llama.quantization.save_quantized(quantized, tmp_path / "q")
    with pytest.raises(ValueError, match=r"the model is quantized \(int8\): save writes float checkpoints"):
        llama.save(quantized, tmp_path / "hf")
    # without quantize_embedding a float table, tied to no output copy when the output is not quantized
    plain = llama.load(path, dtype="float32", quantize="int8", quantize_output=False)
    assert type(plain.tok_embeddings) is torch.nn.Embedding and plain.output.weight is plain.tok_embeddings.weight


def test_quantized_embedding_from_float():
    embedding = torch.nn.Embedding(300, 64)
    for mode in ("int8", "int4"):
        quantized = QuantizedEmbedding.from_float(embedding, mode, group_size=32)
        full = quantized.table.dequantize()
        assert torch.equal(quantized(TOKENS % 300), full[TOKENS % 300]) and torch.equal(quantized.dequantize(), full)
        torch.testing.assert_close(quantized(TOKENS % 300), embedding(TOKENS % 300), rtol=0, atol=0.3)
    with pytest.raises(TypeError, match="dequantize_rows"):
        QuantizedEmbedding(torch.nn.Linear(64, 300), torch.float32)


def test_evaluation_runs_on_a_kept_embedding(tmp_path, model):
    """perplexity, the lm-eval adapter and position NLL find the device through model_device, not a
    float table's .weight: a GGUF model with its embedding kept quantized scores what the same file
    with a float embedding scores."""
    from llama.training.evaluate import perplexity
    from llama.training.long_context import position_nll

    path, _ = llama_cpp_file(tmp_path, T.Q8_0, model)
    quantized = llama.load(path, dtype="float32", quantize="int8")
    plain = llama.load(path, dtype="float32", quantize="int8", quantize_embedding=False)
    assert type(quantized.tok_embeddings) is QuantizedEmbedding
    tokens = TOKENS.flatten().tolist() * 3
    got, expected = (perplexity(m, tokens, context_len=16, stride=8) for m in (quantized, plain))
    assert got.n_tokens == expected.n_tokens and got.nll_sum == pytest.approx(expected.nll_sum, rel=1e-6)
    windows = torch.tensor([tokens[:12], tokens[12:24]])
    assert torch.allclose(position_nll(quantized, windows), position_nll(plain, windows), rtol=1e-6, atol=0)
