"""kernels/csrc/elementwise.cpp: RMSNorm, RoPE and SwiGLU's gating in one C++ pass each, against the
PyTorch code of llama/core/model.py and kernels/fused.py that they replace.

rope_ computes operation for operation what rope_ / apply_rope compute (the build does not fuse a
multiply and an add), so the tests ask for equal bits. rms_norm sums the squares in another order
than torch's mean, and silu_mul's exp is a polynomial, not torch's: either may move an output by
one bf16 step, so those tests allow one step and no more, and check that almost every value is equal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import native
from kernels.fused import rope_
from llama import ModelConfig
from llama.core.model import FeedForward, RMSNorm, apply_rope

from random_models import random_model as shared_random_model

torch.set_num_threads(2)

needs_kernels = pytest.mark.skipif(not native.available(),
                                   reason=f"C++ kernels not built: {str(native.build_error())[:300]}")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_gating(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """FeedForward.activate as llama/core/model.py has it (it uses no module state)."""
    return FeedForward.activate(None, gate, up)


def reference_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps).to(torch.bfloat16)
    norm.weight.data = weight
    with torch.no_grad():
        return norm(x)


def assert_within_one_step(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal, or one bf16 step apart (adjacent bit patterns of the same sign), in at most 2% of the values."""
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == ref.shape
    a, b = out.view(torch.int16).int(), ref.view(torch.int16).int()
    steps = (a - b).abs()
    assert int(steps.max()) <= 1, f"{int((steps > 1).sum())} values more than one bf16 step apart"
    assert int((steps == 1).sum()) <= max(2, ref.numel() // 50)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), D=st.one_of(st.integers(1, 300), st.sampled_from([2048, 4096])),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]), eps=st.sampled_from([1e-5, 1e-6]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_rms_norm_matches_rmsnorm(rows, D, scale, eps, seed):
    x = (torch.randn(rows, D, generator=generator(seed)) * scale).bfloat16()
    weight = torch.randn(D, generator=generator(seed + 1)).bfloat16()
    assert_within_one_step(native.rms_norm(x, weight, eps), reference_norm(x, weight, eps))


@needs_kernels
def test_rms_norm_shapes_and_special_values():
    x = torch.randn(2, 3, 5, 64, generator=generator(0)).bfloat16()
    weight = torch.randn(64, generator=generator(1)).bfloat16()
    assert_within_one_step(native.rms_norm(x, weight, 1e-5), reference_norm(x, weight, 1e-5))  # any leading dims
    view = x.transpose(1, 2)  # not contiguous: copied first
    assert_within_one_step(native.rms_norm(view, weight, 1e-5), reference_norm(view, weight, 1e-5))
    x[0, 0, 0, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    out = native.rms_norm(x, weight, 1e-5)
    ref = reference_norm(x, weight, 1e-5)
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, 0, 0].isnan().all()
    assert native.rms_norm(x[:0], weight, 1e-5).shape == (0, 3, 5, 64)
    zeros = torch.zeros(3, 64, dtype=torch.bfloat16)
    assert torch.equal(native.rms_norm(zeros, weight, 1e-5), reference_norm(zeros, weight, 1e-5))


@needs_kernels
def test_rms_norm_refuses_other_inputs():
    x, weight = torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x must be a bfloat16"):
        native.rms_norm(x.float(), weight, 1e-5)
    with pytest.raises(ValueError, match=r"weight must be a \(8,\) bfloat16"):
        native.rms_norm(x, weight.float(), 1e-5)
    with pytest.raises(ValueError, match=r"weight must be a \(8,\)"):
        native.rms_norm(x, weight[:4], 1e-5)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 5), n=st.integers(1, 6), half=st.integers(1, 80),
       angle=st.sampled_from([1.0, 100.0, 1e5]), seed=st.integers(0, 2**16))  # fmt: skip
def test_rope_is_bit_for_bit_apply_rope(B, T, n, half, angle, seed):
    hd = 2 * half
    x = torch.randn(B, T, n, hd, generator=generator(seed)).bfloat16()
    angles = torch.rand(B, T, half, generator=generator(seed + 1)) * angle
    cos, sin = angles.cos(), angles.sin()
    expected = apply_rope(x, cos, sin)
    # as FastAttention hands it over: a view of a wider (fused q/k/v) output, rotated in place
    wide = torch.randn(B, T, n + 3, hd, generator=generator(seed + 2)).bfloat16()
    untouched = wide.clone()
    view = wide[:, :, 1 : n + 1]
    view.copy_(x)
    assert native.rope(view, cos, sin) is view
    assert torch.equal(view, expected)
    assert torch.equal(wide[:, :, 0], untouched[:, :, 0]) and torch.equal(wide[:, :, n + 1 :], untouched[:, :, n + 1 :])
    assert torch.equal(rope_(x.clone(), cos, sin), expected)  # and what it replaces agrees


@needs_kernels
def test_rope_refuses_other_inputs():
    x, cs = torch.ones(1, 2, 3, 8, dtype=torch.bfloat16), torch.ones(1, 2, 4)
    with pytest.raises(ValueError, match="hd even and contiguous"):
        native.rope(x.transpose(2, 3), cs[..., :1].expand(1, 2, 1), cs[..., :1].expand(1, 2, 1))
    with pytest.raises(ValueError, match="bfloat16"):
        native.rope(x.float(), cs, cs)
    with pytest.raises(ValueError, match=r"cos and sin must be \(1, 2, 4\) float32"):
        native.rope(x, cs.bfloat16(), cs)
    with pytest.raises(ValueError, match=r"cos and sin must be \(1, 2, 4\)"):
        native.rope(x, cs[:, :1], cs)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), hidden=st.one_of(st.integers(1, 100), st.sampled_from([8192])),
       scale=st.sampled_from([1e-3, 1.0, 10.0, 100.0]), seed=st.integers(0, 2**16))  # fmt: skip
def test_silu_mul_matches_silu_times_up(rows, hidden, scale, seed):
    fused = (torch.randn(rows, 1, 2 * hidden, generator=generator(seed)) * scale).bfloat16()
    gate, up = fused.split(hidden, dim=-1)  # views with rows 2 * hidden apart, as FusedFeedForward's
    out = native.silu_mul(gate, up)
    assert out.is_contiguous()
    assert_within_one_step(out, reference_gating(gate, up))
    assert_within_one_step(native.silu_mul(gate.contiguous(), up.transpose(0, 1).contiguous().transpose(0, 1)),
                           reference_gating(gate, up))  # fmt: skip


@needs_kernels
def test_silu_mul_special_values_and_refusals():
    x = torch.tensor([-1e30, -100.0, -89.0, -20.0, -0.0, 0.0, 20.0, 89.0, 1e30, float("inf"), float("-inf"),
                      float("nan")]).bfloat16()  # fmt: skip
    out, ref = native.silu_mul(x, x), reference_gating(x, x)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out[~ref.isnan()], ref[~ref.isnan()])
    with pytest.raises(ValueError, match="bfloat16"):
        native.silu_mul(x.float(), x.float())
    with pytest.raises(ValueError, match="one shape"):
        native.silu_mul(x, x[:5])


@needs_kernels
def test_generic_build_gives_the_same_bits():
    """The plain-loop build (other CPUs) against the AVX-512 one and the references."""
    native._compile(generic=True)
    generic = torch.ops.llama_kernels_generic
    for D in (2048, 67):
        x = torch.randn(4, D, generator=generator(D)).bfloat16()
        weight = torch.randn(D, generator=generator(D + 1)).bfloat16()
        assert_within_one_step(generic.rms_norm(x, weight, 1e-5), reference_norm(x, weight, 1e-5))
    x = torch.randn(2, 3, 4, 64, generator=generator(5)).bfloat16()
    angles = torch.rand(2, 3, 32, generator=generator(6)) * 50
    y = x.clone()
    generic.rope_(y, angles.cos(), angles.sin())
    assert torch.equal(y, apply_rope(x, angles.cos(), angles.sin()))
    gate, up = (torch.randn(3, 2, 200, generator=generator(7)) * 4).bfloat16().split(100, dim=-1)
    assert_within_one_step(generic.silu_mul(gate, up), reference_gating(gate, up))


CONFIG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=160, max_seq_len=64)


def decode(model, tokens, prefill):
    model.setup_cache(tokens.shape[0], 32)
    try:
        with torch.no_grad():
            out = [model(tokens[:, :prefill], 0)]
            out += [model(tokens[:, i : i + 1], i) for i in range(prefill, tokens.shape[1])]
        return torch.cat(out, dim=1)
    finally:
        model.clear_cache()


@needs_kernels
@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}])
def test_swapped_model_equals_the_one_without_these_swaps(variant):
    """kernels.optimize swaps NativeRMSNorm in for every norm, NativeAttention rotates in C++ and
    NativeFeedForward gates in C++; the logits of a prefill and decoding steps equal those of the same
    optimized model with the plain RMSNorm, FastAttention's rope_ and FeedForward's gating put back
    (per-head norms of qk_norm included)."""
    model = kernels.optimize(shared_random_model(CONFIG.replace(**variant), 0, 0.3, random_norms=True,
                                                 dtype=torch.bfloat16))  # fmt: skip
    norms = [name for name, m in model.named_modules() if type(m) is native.NativeRMSNorm]
    expected = 2 * CONFIG.n_layers + 1 + (2 * CONFIG.n_layers if variant else 0)
    assert len(norms) == expected
    plain = copy.deepcopy(model)
    for name in norms:
        parent, _, attr = name.rpartition(".")
        module = plain.get_submodule(parent) if parent else plain
        norm = getattr(module, attr)
        replacement = RMSNorm(norm.weight.shape[0], norm.eps).to(torch.bfloat16)
        replacement.weight = norm.weight
        setattr(module, attr, replacement)
    for layer in plain.layers:
        layer.attention.rotate = lambda x, ctx: rope_(x, ctx.cos, ctx.sin)  # FastAttention's own step
        assert type(layer.feed_forward) is native.NativeFeedForward
        layer.feed_forward.activate = reference_gating  # FeedForward's own step
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 12), generator=generator(1))
    fast, reference = decode(model, tokens, 5), decode(plain, tokens, 5)
    scale = reference.abs().max()
    assert (fast - reference).abs().max() <= 1e-2 * scale  # one-step norm differences, grown through the layers


@needs_kernels
def test_norm_swap_leaves_what_it_does_not_serve():
    """float32 models keep RMSNorm and FusedFeedForward; under autograd NativeRMSNorm and NativeFeedForward
    run the steps they replace, with gradients."""
    wide = kernels.optimize(shared_random_model(CONFIG, 0, 0.3, random_norms=True, dtype=torch.float32))
    assert not any(isinstance(m, (native.NativeRMSNorm, native.NativeFeedForward)) for m in wide.modules())
    ffn = kernels.optimize(shared_random_model(CONFIG, 0, 0.3, dtype=torch.bfloat16)).layers[0].feed_forward
    x = torch.randn(2, 3, CONFIG.dim, dtype=torch.bfloat16, requires_grad=True)
    ffn(x).float().sum().backward()  # autograd: FeedForward's own gating, with gradients
    assert x.grad is not None and x.grad.abs().sum() > 0
    norm = RMSNorm(16, 1e-5).to(torch.bfloat16)
    swapped = native.NativeRMSNorm(norm)
    assert swapped.weight is norm.weight
    x = torch.randn(2, 16, dtype=torch.bfloat16, requires_grad=True)
    swapped(x).float().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    assert torch.equal(swapped(x.float().detach()), norm(x.float().detach()))  # float32 input: RMSNorm's path
