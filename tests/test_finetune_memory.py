"""What fine-tuning does to save memory, checked against the plain computation: QLoRA's quantized
embedding and tied output (llama/training/qlora.py), the loss over slices of the vocabulary
(loop.sliced_cross_entropy), and a QLoRA model loaded with every frozen matrix quantized."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from random_models import random_model
from torch import nn

from llama import ModelConfig
from llama.core.checkpoint import save
from llama.quantization import Int4Linear, Int8Linear, quantize_model
from llama.training import lora
from llama.training.finetune import FinetuneSpec, load_for_finetuning, parameter_counts
from llama.training.loop import IGNORE, sliced_cross_entropy, token_loss
from llama.quantization import QuantizedEmbedding
from llama.training import qlora
from llama.training.qlora import LoadedQuantizedEmbedding, TiedOutput, weight_rows

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_dim=128, max_seq_len=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def quantized(mode: str, V: int = 100, D: int = 64, seed: int = 0) -> nn.Module:
    w = torch.randn(V, D, generator=torch.Generator().manual_seed(seed))
    linear = nn.Linear(D, V, bias=False)
    linear.weight.data = w
    return Int8Linear.from_float(linear) if mode == "int8" else Int4Linear.from_float(linear, group_size=32)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_weight_rows_are_the_dequantized_rows_exactly(mode):
    module = quantized(mode)
    full = module.dequantize(torch.float32)
    assert torch.equal(weight_rows(module, slice(30, 77), torch.float32), full[30:77])
    assert torch.equal(weight_rows(module, slice(0, 100), torch.bfloat16), module.dequantize(torch.bfloat16))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_embedding_looks_up_dequantized_rows_and_ties_the_output(mode, monkeypatch):
    monkeypatch.setattr(qlora, "CHUNK_ROWS", 7)  # the table quantized 7 rows at a time
    embedding = LoadedQuantizedEmbedding(100, 64, mode, 32, torch.float32)
    w = torch.randn(100, 64, generator=torch.Generator().manual_seed(1))
    embedding.load_weight(w)
    tokens = torch.tensor([[3, 7, 99], [0, 3, 50]])
    table = embedding.table.dequantize(torch.float32)
    assert torch.equal(embedding(tokens), table[tokens])  # (2, 3, 64)
    output = TiedOutput(embedding)
    assert list(output.state_dict()) == [] and output.out_features == 100  # the table is held once
    h = torch.randn(2, 3, 64)
    torch.testing.assert_close(output(h), h @ table.T, rtol=1e-5, atol=1e-5)
    whole = quantized(mode, seed=1)  # the table quantized whole by Int8Linear / Int4Linear.load_weight
    assert all(torch.equal(a, b) for a, b in zip(embedding.table.state_dict().values(), whole.state_dict().values()))
    with pytest.raises(ValueError, match=r"embedding table of shape \(100, 32\), expected \(100, 64\)"):
        embedding.load_weight(torch.zeros(100, 32))


@pytest.mark.parametrize("kind", ["float", "int8", "int4", "tied-int4"])
@pytest.mark.parametrize("slice_size", [7, 33, 100, 1000])
def test_sliced_cross_entropy_equals_the_whole_logits(kind, slice_size):
    """Loss and input gradient of the slice-at-a-time loss equal F.cross_entropy over the whole
    logits of the same (dequantized) weight, float32."""
    g = torch.Generator().manual_seed(2)
    if kind == "float":
        output = nn.Linear(64, 100, bias=False).requires_grad_(False)
        w = output.weight
    elif kind == "tied-int4":
        embedding = LoadedQuantizedEmbedding(100, 64, "int4", 32, torch.float32)
        embedding.load_weight(torch.randn(100, 64, generator=g))
        output, w = TiedOutput(embedding), embedding.table.dequantize(torch.float32)
    else:
        output = quantized(kind)
        w = output.dequantize(torch.float32)
    h = torch.randn(23, 64, generator=g, requires_grad=True)
    targets = torch.randint(0, 100, (23,), generator=g)
    targets[:3] = torch.tensor([0, 99, 32])  # the first and last rows, a slice boundary
    loss = sliced_cross_entropy(h, targets, output, slice_size)
    (grad,) = torch.autograd.grad(loss * 0.5, h)
    h_ref = h.detach().clone().requires_grad_()
    expected = F.cross_entropy(F.linear(h_ref, w.detach()), targets, reduction="sum")
    (expected * 0.5).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    # float32 sums in another order (a slice's part at a time): ~1e-7 of the largest entry
    torch.testing.assert_close(grad, h_ref.grad, rtol=0, atol=1e-5 * h_ref.grad.abs().max().item())


def test_sliced_cross_entropy_under_bf16_autocast_matches_the_plain_path():
    """Under autocast the matmuls run in bf16 as output(h) would; logits and softmax stay float32.
    The gradient adds bf16 products of the slices (the plain path: one bf16 matmul), so it agrees to
    bf16 rounding."""
    g = torch.Generator().manual_seed(3)
    output = nn.Linear(64, 100, bias=False).to(torch.bfloat16).requires_grad_(False)
    h = torch.randn(40, 64, generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 100, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sliced_cross_entropy(h, targets, output, 30)
        h_ref = h.detach().clone().requires_grad_()
        expected = F.cross_entropy(output(h_ref).float(), targets, reduction="sum")
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    assert h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.grad.float(), h_ref.grad.float(), rtol=0, atol=0.02 * h_ref.grad.abs().max().item())


@pytest.mark.parametrize("tied", [False, True])
def test_token_loss_with_a_frozen_output_equals_the_whole_logits(tied):
    """LoRA on the blocks only: the output projection is frozen, so a chunked token_loss takes the
    slice-at-a-time path; loss and the adapters' gradients equal the plain path's."""

    def run(chunk):
        model = random_model(CONFIG.replace(tie_word_embeddings=tied), std=0.1)
        lora.apply_lora(model, ["wq", "w2"])
        for _, module in lora.lora_modules(model):
            nn.init.normal_(module.lora_B["default"], std=0.05, generator=torch.Generator().manual_seed(4))
        x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))
        y = torch.roll(x, -1, 1)
        y[0, :7] = IGNORE  # a prompt
        loss = token_loss(model, x, y, chunk)
        loss.backward()
        assert type(model.output) is nn.Linear  # put back
        return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    whole, grads = run(0)
    for chunk in (1, 5, 64):  # 1: slices of 100 * 1 / 17 = 5 rows of the vocabulary
        loss, chunk_grads = run(chunk)
        torch.testing.assert_close(loss, whole, rtol=1e-6, atol=0)
        for name in grads:
            scale = grads[name].abs().max().item()
            torch.testing.assert_close(chunk_grads[name], grads[name], rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_loads_every_frozen_matrix_quantized(tmp_path, tied, mode):
    """load_for_finetuning(qlora) quantizes the embedding and the output too (tied: one table for
    both); the model computes what the float model with those dequantized weights computes, and the
    chunked loss gives the plain path's loss and gradients."""
    config = CONFIG.replace(tie_word_embeddings=tied)
    float_model = random_model(config, std=0.1)
    save(float_model, tmp_path / "base")
    spec = FinetuneSpec(method="qlora", quantize=mode, group_size=32)
    model = load_for_finetuning(tmp_path / "base", spec, dtype="float32")
    assert isinstance(model.tok_embeddings, QuantizedEmbedding)
    table = model.tok_embeddings.table
    if tied:
        assert isinstance(model.output, TiedOutput) and model.output.embedding is model.tok_embeddings
        assert not any(name.startswith("output.") for name in model.state_dict())
    else:
        assert isinstance(model.output, Int8Linear if mode == "int8" else Int4Linear)
    assert parameter_counts(model)[1] == parameter_counts(float_model)[0] + parameter_counts(model)[0]

    reference = random_model(config, std=0.1)  # the float model, with the same quantized weights
    quantize_model(reference, mode, group_size=32, include_output=False)
    with torch.no_grad():
        reference.tok_embeddings.weight.copy_(table.dequantize(torch.float32))
        if not tied:
            reference.output.weight.copy_(model.output.dequantize(torch.float32))
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=1e-5, atol=1e-5)

    model.train()
    for _, module in lora.lora_modules(model):
        nn.init.normal_(module.lora_B["default"], std=0.05, generator=torch.Generator().manual_seed(7))
    y = torch.roll(x, -1, 1)
    results = []
    for chunk in (0, 3):
        model.zero_grad()
        loss = token_loss(model, x, y, chunk)
        loss.backward()
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (whole, grads), (chunked, chunk_grads) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(chunk_grads[name], grads[name], rtol=0, atol=1e-4 * grads[name].abs().max().item())


def test_qlora_with_an_lm_head_adapter_keeps_the_output_in_float(tmp_path):
    save(random_model(CONFIG.replace(tie_word_embeddings=True), std=0.1), tmp_path / "base")
    spec = FinetuneSpec(method="qlora", quantize="int8", lora_targets=("q_proj", "lm_head"))
    model = load_for_finetuning(tmp_path / "base", spec, dtype="float32")
    assert type(model.tok_embeddings) is nn.Embedding and isinstance(model.output, lora.LoRALinear)
    off = load_for_finetuning(tmp_path / "base", FinetuneSpec(method="qlora", quantize="int8", quantize_embedding=False))
    assert type(off.tok_embeddings) is nn.Embedding and off.output.weight is off.tok_embeddings.weight


def test_lora_under_autocast_skips_the_float32_copy_with_the_same_result():
    """Under bf16 autocast the adapter takes the bf16 input as it is (autocast casts to bf16 anyway):
    output and gradients bit for bit those of casting it to float32 first."""
    base = nn.Linear(64, 48, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = lora.LoRALinear(base)
    layer.add_adapter("default", 8, 16.0, generator=torch.Generator().manual_seed(8))
    layer.active = "default"
    nn.init.normal_(layer.lora_B["default"], std=0.05, generator=torch.Generator().manual_seed(9))
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = base(x) + (F.linear(F.linear(x.float(), A), B) * layer.scaling["default"]).to(torch.bfloat16)
    grads = torch.autograd.grad(y.float().square().sum(), (A, B))
    expected_grads = torch.autograd.grad(expected.float().square().sum(), (A, B))
    assert torch.equal(y, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))


def test_rowwise_int4_linear_computes_what_int4_linear_computes(monkeypatch):
    monkeypatch.setattr(qlora, "DEQUANTIZE_ROWS", 7)  # 100 rows: 14 slices and a part
    module = quantized("int4")
    rowwise = qlora.RowwiseInt4Linear(module)
    assert rowwise.weight is module.weight and rowwise.state_dict().keys() == module.state_dict().keys()
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(rowwise.dequantize(dtype), module.dequantize(dtype))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    (grad,) = torch.autograd.grad(rowwise(x).square().sum(), x)  # QuantizedMatmul, both ways
    (expected,) = torch.autograd.grad(module(x).square().sum(), x)
    assert torch.equal(grad, expected)


def test_qlora_int4_bases_are_rowwise(tmp_path):
    save(random_model(CONFIG, std=0.1), tmp_path / "base")
    model = load_for_finetuning(tmp_path / "base", FinetuneSpec(method="qlora", quantize="int4", group_size=32))
    bases = [m.base for _, m in lora.lora_modules(model)]
    assert len(bases) == 14 and all(type(b) is qlora.RowwiseInt4Linear for b in bases)
