"""kernels/: every fused module, alone and together, against the plain model of llama/core/model.py.

Tolerances, relative to the largest |logit| (weights normal(0, 0.3), so logits reach ~10):
- float32: 1e-5. Only SDPA changes the order of operations (~1e-6 seen); the other swaps run the
  same float32 arithmetic split differently and agree to rounding.
- bfloat16: 1e-1 with SDPA on. The reference rounds the softmax probabilities to bf16 before the
  value matmul and SDPA's fused kernel does not; with these large weights the rounding compounds
  through the layers: up to 3.8e-2 seen over 60 shapes, while the plain bf16 model itself is up to
  1.2e-1 away from its float32 original. 1e-2 for the swaps without SDPA (they agree exactly in
  bf16 in practice).
Sizes are tiny and hypothesis examples few, to keep the file well under a minute on one thread.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
import llama
from kernels import FastAttention, FusedFeedForward, fuse_linears, rope_
from llama.quantization import Int4Linear, Int8BlockLinear, Int8Linear, quantize_model
from llama import ModelConfig, Transformer
from llama.core.model import Attention, FeedForward, RMSNorm, TransformerBlock, apply_rope

from random_models import random_model as shared_random_model

torch.set_num_threads(1)

SWITCHES = ("fuse_qkv", "fuse_gate_up", "sdpa", "inplace_rope")
ALL_OFF = dict.fromkeys(SWITCHES, False)
ONLY = {name: {**ALL_OFF, name: True} for name in SWITCHES} | {"all": {}}

SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=128, max_seq_len=64)


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.3, dtype=torch.float32) -> Transformer:
    """Matrices normal(0, std) (peaked logits); norms random around 1 so their weights matter."""
    return shared_random_model(config, seed, std, random_norms=True, dtype=dtype)


def tolerance(dtype, switches: dict) -> float:
    if dtype == torch.float32:
        return 1e-5
    return 1e-1 if switches.get("sdpa", True) else 1e-2


def assert_close(actual, expected, rel):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x max |expected| {scale:.3g}"


def decode_logits(model: Transformer, tokens: torch.Tensor, prefill: int, starts=None) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the rest one at a time; logits of every step, (B, T, V).

    With `starts` (B,), the decode steps run at per-row positions starts + i (a tensor start_pos).
    """
    B, T = tokens.shape
    model.setup_cache(B, 32)
    try:
        out = [model(tokens[:, :prefill], 0)]
        for i in range(prefill, T):
            pos = i if starts is None else starts + (i - prefill)
            out.append(model(tokens[:, i : i + 1], pos))
        return torch.cat(out, dim=1)
    finally:
        model.clear_cache()


@pytest.fixture(scope="module")
def small():
    return random_model(SMALL)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, SMALL.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))


# ---- the pieces against their plain counterparts -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_equals_apply_rope_on_a_strided_view(dtype):
    g = torch.Generator().manual_seed(0)
    B, T, H, hd = 2, 5, 3, 8
    qkv = torch.randn(B, T, 2 * H * hd, generator=g).to(dtype)  # q then another head block, like wqkv's output
    angles = torch.randn(B, T, hd // 2, generator=g) * 10
    cos, sin = angles.cos(), angles.sin()
    q = qkv[..., : H * hd].view(B, T, H, hd)  # (B, T, H, hd), not contiguous
    rest = qkv[..., H * hd :].clone()
    expected = apply_rope(q.clone(), cos, sin)
    assert rope_(q, cos, sin) is q
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    torch.testing.assert_close(qkv[..., H * hd :], rest, rtol=0, atol=0)  # the neighbours are untouched


def test_fuse_linears_rejects_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="bias-free nn.Linear"):
        kernels.fuse_linears(torch.nn.Linear(4, 4, bias=True), torch.nn.Linear(4, 4, bias=False))
    with pytest.raises(ValueError, match="takes a llama Transformer"):
        kernels.optimize(torch.nn.Linear(4, 4))


class Wrapped(torch.nn.Module):
    """A projection module kernels.optimize was not written for (a researcher's experiment)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return 2 * self.linear(x)


def test_unknown_modules_are_refused_by_name(small):
    """A module optimize does not know could be skipped or bypassed by a fast path: refused, naming
    it, before anything is swapped."""
    wrapped = copy.deepcopy(small)
    wrapped.layers[1].feed_forward.w2 = Wrapped(wrapped.layers[1].feed_forward.w2)
    before = dict(wrapped.named_modules())
    with pytest.raises(kernels.UnsupportedModelError, match=r"'layers.1.feed_forward.w2' of type Wrapped"):
        kernels.optimize(wrapped, native=False)
    assert all(module is before[name] for name, module in wrapped.named_modules())


def test_quantized_projections_take_every_swap(small, tokens):
    """Quantized projections of one kind fuse (rows and scales stacked); mixed kinds are refused before
    anything changes, and kernels.fusable says which fusions a model allows."""
    quantized = quantize_model(copy.deepcopy(small), "int8", include_output=False)
    reference = copy.deepcopy(quantized)
    mixed = copy.deepcopy(quantized)
    mixed.layers[1].feed_forward.w3 = copy.deepcopy(small.layers[1].feed_forward.w3)  # nn.Linear beside Int8Linear
    before = dict(mixed.named_modules())
    with pytest.raises(ValueError, match="one type"):
        kernels.optimize(mixed, native=False)  # the feed-forward fails: nothing swapped
    assert all(module is before[name] for name, module in mixed.named_modules())
    assert kernels.fusable(mixed) == {"fuse_qkv": True, "fuse_gate_up": False}
    assert kernels.fusable(quantized) == {"fuse_qkv": True, "fuse_gate_up": True}
    fast = kernels.optimize(quantized, native=False)
    attention, ffn = fast.layers[0].attention, fast.layers[0].feed_forward
    assert type(attention) is FastAttention and type(attention.wqkv) is Int8Linear
    assert type(ffn) is FusedFeedForward and type(ffn.w13) is Int8Linear
    with torch.no_grad():
        assert_close(fast(tokens), reference(tokens), 1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4", "q8_0"])
def test_fused_quantized_linear_is_the_stacked_outputs(kind):
    """fuse_linears on quantized modules: the fused output is the separate outputs side by side."""
    g = torch.Generator().manual_seed(0)
    linears = [nn.Linear(64, n, bias=False) for n in (32, 16, 48)]
    for lin in linears:
        nn.init.normal_(lin.weight, generator=g)
    if kind == "int8":
        modules = [Int8Linear.from_float(lin) for lin in linears]
    elif kind == "int4":
        modules = [Int4Linear.from_float(lin, group_size=32) for lin in linears]
    else:
        modules = [Int8BlockLinear.from_float(lin) for lin in linears]
    fused = fuse_linears(*modules)
    assert type(fused) is type(modules[0]) and fused.out_features == 96
    x = torch.randn(3, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat([m(x) for m in modules], dim=-1), rtol=1e-6, atol=1e-6)
    if kind == "int4":
        with pytest.raises(ValueError, match="group size"):
            fuse_linears(modules[0], Int4Linear.from_float(linears[1], group_size=64))


# ---- which modules each switch touches -------------------------------------------------------------


def test_all_switches_off_leaves_the_model_untouched(small, tokens):
    model = copy.deepcopy(small)
    before = dict(model.named_modules())
    assert kernels.optimize(model, **ALL_OFF) is model
    after = dict(model.named_modules())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), small(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("name", SWITCHES)
def test_each_switch_swaps_only_its_module(small, name):
    model = kernels.optimize(copy.deepcopy(small), **ONLY[name])
    for block in model.layers:
        attention_switch = name in ("fuse_qkv", "sdpa", "inplace_rope")
        assert type(block.attention) is (FastAttention if attention_switch else Attention)
        assert type(block.feed_forward) is (FusedFeedForward if name == "fuse_gate_up" else FeedForward)
        assert type(block) is TransformerBlock
        if attention_switch:
            assert block.attention.fused_qkv == (name == "fuse_qkv") and block.attention.sdpa == (name == "sdpa")
            assert block.attention.rope is (rope_ if name == "inplace_rope" else apply_rope)
    assert model.config == small.config


def test_fused_weights_replace_the_separate_ones(small):
    model = copy.deepcopy(small)
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.nbytes for p in model.parameters())
    separate = [weakref.ref(model.layers[0].attention.wq.weight), weakref.ref(model.layers[1].feed_forward.w3.weight)]
    kernels.optimize(model)
    gc.collect()
    assert all(ref() is None for ref in separate), "the separate weights are still alive: memory doubled"
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sum(p.nbytes for p in model.parameters()) == n_bytes
    names = set(model.state_dict())
    assert "layers.0.attention.wqkv.weight" in names and "layers.0.feed_forward.w13.weight" in names
    assert not any(n.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) for n in names)
    plain = small.layers[1]
    wqkv = model.layers[1].attention.wqkv.weight
    torch.testing.assert_close(wqkv, torch.cat([plain.attention.wq.weight, plain.attention.wk.weight, plain.attention.wv.weight]))
    w13 = model.layers[1].feed_forward.w13.weight
    torch.testing.assert_close(w13, torch.cat([plain.feed_forward.w1.weight, plain.feed_forward.w3.weight]))


def test_optimizing_twice_is_harmless_and_a_cache_set_up_before_is_kept(small, tokens):
    model = copy.deepcopy(small)
    model.setup_cache(3, 32)
    kernels.optimize(model, sdpa=False)
    assert model.cache_size == (3, 32)
    swapped = model.layers[0].attention
    kernels.optimize(model)
    assert model.layers[0].attention is swapped and not swapped.sdpa
    model.clear_cache()
    assert model.cache_size is None


# ---- the whole model --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("switches", list(ONLY), ids=list(ONLY))
def test_forward_and_cached_decoding_match_the_plain_model(switches, dtype, small, tokens):
    plain = copy.deepcopy(small).to(dtype)
    fast = kernels.optimize(copy.deepcopy(plain), **ONLY[switches])
    rel = tolerance(dtype, ONLY[switches])
    with torch.no_grad():
        expected = plain(tokens)
        assert_close(fast(tokens), expected, rel)
        assert_close(decode_logits(fast, tokens, prefill=5), decode_logits(plain, tokens, prefill=5), rel)
        if dtype == torch.float32:  # and cached decoding of the fast model equals its full forward
            assert_close(decode_logits(fast, tokens, prefill=5), expected, rel)


@pytest.mark.parametrize("switches", ["sdpa", "all"])
def test_per_row_start_positions(switches, small, tokens):
    """Rows decoding at different positions (a tensor start_pos): row 1 rewinds and overwrites its
    cache from position 2 on, so its stale slots 3..4 must be masked off."""
    plain = copy.deepcopy(small)
    fast = kernels.optimize(copy.deepcopy(small), **ONLY[switches])
    starts = torch.tensor([5, 2, 4])
    with torch.no_grad():
        expected = decode_logits(plain, tokens, prefill=5, starts=starts)
        assert_close(decode_logits(fast, tokens, prefill=5, starts=starts), expected, 1e-5)
        # Row 1's decoded logits equal a full forward over its own tokens 0..1 followed by 5..11.
        row = torch.cat([tokens[1:2, :2], tokens[1:2, 5:]], dim=1)
        assert_close(expected[1:2, 5:], plain(row)[:, 2:], 1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    n_kv_heads=st.sampled_from([1, 2, 4]),
    n_rep=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([4, 8, 16]),
    batch=st.integers(1, 3),
    seq=st.integers(1, 9),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_matches_the_plain_model(n_kv_heads, n_rep, head_dim, batch, seq, bf16, seed):
    """MHA (n_rep 1), GQA and MQA (n_kv_heads 1); head_dim independent of dim."""
    n_heads = n_kv_heads * n_rep
    config = ModelConfig(
        dim=8 * n_heads, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        vocab_size=50, ffn_dim=24, max_seq_len=32,
    )  # fmt: skip
    dtype = torch.bfloat16 if bf16 else torch.float32
    plain = random_model(config, seed, dtype=dtype)
    fast = kernels.optimize(copy.deepcopy(plain))
    tokens = torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(seed))
    rel = tolerance(dtype, {})
    with torch.no_grad():
        assert_close(fast(tokens), plain(tokens), rel)
        prefill = (seq + 1) // 2
        assert_close(decode_logits(fast, tokens, prefill), decode_logits(plain, tokens, prefill), rel)


def test_an_optimized_block_compiles_as_one_graph(small):
    """The fused block (with cache, decoding at per-row positions) traces without a graph break, and
    the in-place rotation survives functionalization. aot_eager keeps this fast; inductor on this
    CPU gave the same output to 1.2e-7 when checked by hand."""
    model = kernels.optimize(copy.deepcopy(small))
    model.setup_cache(2, 16)
    block = model.layers[0]
    tokens = torch.tensor([[4, 5, 6], [2, 3, 4]])
    ctx = model.context(tokens, torch.tensor([4, 2]), None, None)  # positions (B, T) = [[4, 5, 6], [2, 3, 4]]
    x = torch.randn(2, 3, SMALL.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = block(x, ctx)
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x, ctx)
    torch.testing.assert_close(compiled, expected, rtol=1e-6, atol=1e-6)


def test_gradients_flow_through_the_optimized_model(small, tokens):
    """Not the target use, but it must not break: under autograd the rotation is out of place."""
    plain, fast = copy.deepcopy(small), kernels.optimize(copy.deepcopy(small))
    plain(tokens).square().mean().backward()
    fast(tokens).square().mean().backward()
    attention = plain.layers[0].attention
    expected = torch.cat([attention.wq.weight.grad, attention.wk.weight.grad, attention.wv.weight.grad])
    assert_close(fast.layers[0].attention.wqkv.weight.grad, expected, 1e-5)


def test_greedy_generation_is_unchanged(small):
    fast = kernels.optimize(copy.deepcopy(small))
    prompts = [[1, 2, 3, 4, 5], [7, 8], [30, 31, 32, 33]]
    expected = llama.generate(small, prompts, 12, temperature=0, stop_tokens=[])
    assert llama.generate(fast, prompts, 12, temperature=0, stop_tokens=[]) == expected
    assert all(len(row) == 12 for row in expected)


def test_optimizing_a_loaded_checkpoint(small, tokens, tmp_path):
    llama.save(small, tmp_path)
    loaded = llama.load(tmp_path)
    fast = kernels.optimize(llama.load(tmp_path))
    assert fast.config == loaded.config
    with torch.no_grad():
        assert_close(fast(tokens), loaded(tokens), 1e-5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert llama.generate(fast, prompts, 8, temperature=0, stop_tokens=[]) == llama.generate(
        loaded, prompts, 8, temperature=0, stop_tokens=[]
    )


def test_a_prompt_from_position_zero_attends_with_is_causal_and_anything_else_with_the_mask(small, tokens, monkeypatch):
    """SDPA gets is_causal (and skips the blocks above the diagonal) exactly when the mask is the plain
    causal triangle: a prompt from position 0, with or without a cache, on layers without a sliding
    window. A second chunk, a decoding step and a windowed layer pass the mask. Logits equal the plain model's."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((q.shape[2], k.shape[2], is_causal, attn_mask is not None))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    plain = copy.deepcopy(small)
    fast = kernels.optimize(copy.deepcopy(small), native=False)
    with torch.no_grad():
        assert_close(fast(tokens), plain(tokens), 1e-5)  # no cache
        assert calls == [(12, 12, True, False)] * 2
        calls.clear()
        fast.setup_cache(3, 32)
        plain.setup_cache(3, 32)
        for start, end in ((0, 5), (5, 9), (9, 10)):  # a prompt in two chunks, then a decoding step
            assert_close(fast(tokens[:, start:end], start), plain(tokens[:, start:end], start), 1e-5)
        assert calls == [(5, 5, True, False)] * 2 + [(4, 9, False, True)] * 2 + [(1, 10, False, True)] * 2
    windowed = random_model(SMALL.replace(sliding_window=4, window_layers=[1]))
    fast = kernels.optimize(copy.deepcopy(windowed), native=False)
    calls.clear()
    with torch.no_grad():
        assert_close(fast(tokens), windowed(tokens), 1e-5)
    assert calls == [(12, 12, True, False), (12, 12, False, True)]
