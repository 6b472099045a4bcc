"""Checks for the exercises of docs/EXERCISES.md that no other test covers.

Each passes on the unmodified code; an exercise asks the learner to change the code (or to write a
function) and see which of these still pass. The expected values come from formulas written here,
not from the project's code: they may read as the exercises' answers, which is why the exercises
point here only as checks.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from random_models import random_model

from llama import ModelConfig, RopeScaling
from llama.core.model import RMSNorm, apply_rope, rope_frequencies
from weights.hf import permute_to_hf, permute_to_meta

# ---- exercise 3: RMSNorm in float16 ---------------------------------------------------------------


def test_rmsnorm_in_float16_survives_values_whose_square_overflows():
    """float16's largest value is 65504 < 256^2: squaring 256 in float16 overflows. The module upcasts to
    float32 first, so a vector of 256s (or 3000s) still normalises to ones."""
    assert torch.tensor(255.0, dtype=torch.float16).pow(2).isfinite()
    assert torch.tensor(256.0, dtype=torch.float16).pow(2).isinf()
    norm = RMSNorm(16, eps=1e-5).half()
    for value in (1.0, 255.0, 256.0, 3000.0):
        out = norm(torch.full((2, 16), value, dtype=torch.float16))
        assert out.dtype == torch.float16
        torch.testing.assert_close(out, torch.ones(2, 16, dtype=torch.float16), rtol=1e-3, atol=0)


def test_rmsnorm_in_float16_is_as_close_to_float32_as_float16_rounding_allows():
    """On ordinary inputs the float16 module differs from float32 arithmetic only by float16 roundings
    (of the input, the normed value, the weight and the product): at most about 4 steps of 2^-11."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g) * 30
    weight = 1 + 0.1 * torch.randn(512, generator=g)
    reference = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight  # float32 throughout
    norm = RMSNorm(512, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
    out = norm.half()(x.half()).float()
    torch.testing.assert_close(out, reference, rtol=4 * 2**-11, atol=1e-3)


# ---- exercise 4: rotate-half RoPE ------------------------------------------------------------------


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's layout: dimension i is paired with i + hd/2. x: (B, T, n, hd); cos, sin: (B, T, hd/2).
    (Replace this function with your own to check it.)"""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


@pytest.mark.parametrize("hd, n_heads, n_kv_heads", [(4, 1, 1), (8, 4, 2), (64, 8, 2)])
def test_rotate_half_rope_equals_interleaved_after_permutation(hd, n_heads, n_kv_heads):
    """With wq, wk permuted to HF's row order, rotating halves gives the permuted Meta rotation, and
    every attention score q.k is the same."""
    g = torch.Generator().manual_seed(hd)
    D, T = 16, 7
    wq, wk = torch.randn(n_heads * hd, D, generator=g), torch.randn(n_kv_heads * hd, D, generator=g)
    x = torch.randn(1, T, D, generator=g)
    angles = torch.arange(T, dtype=torch.float32)[None, :, None] * rope_frequencies(hd, 10000.0, None)  # (1, T, hd/2)
    cos, sin = angles.cos(), angles.sin()

    q_meta = apply_rope((x @ wq.T).view(1, T, n_heads, hd), cos, sin)
    k_meta = apply_rope((x @ wk.T).view(1, T, n_kv_heads, hd), cos, sin)
    q_hf = rotate_half_rope((x @ permute_to_hf(wq, n_heads).T).view(1, T, n_heads, hd), cos, sin)
    k_hf = rotate_half_rope((x @ permute_to_hf(wk, n_kv_heads).T).view(1, T, n_kv_heads, hd), cos, sin)

    # Same vectors up to the order of each head's dimensions ...
    unpermute = permute_to_meta(torch.eye(hd), 1)  # row r: the one-hot of the HF dimension holding Meta's r
    torch.testing.assert_close(q_hf @ unpermute.T, q_meta, rtol=1e-5, atol=1e-5)
    # ... so the same scores (query head h reads kv head h // (n_heads / n_kv_heads)).
    n_rep = n_heads // n_kv_heads
    scores_meta = torch.einsum("bthd,bshd->bhts", q_meta, k_meta.repeat_interleave(n_rep, dim=2))
    scores_hf = torch.einsum("bthd,bshd->bhts", q_hf, k_hf.repeat_interleave(n_rep, dim=2))
    torch.testing.assert_close(scores_hf, scores_meta, rtol=1e-5, atol=1e-4)


# ---- exercise 6: Llama 3.1's RoPE bands ------------------------------------------------------------


@pytest.mark.parametrize("hd, factor, bands", [(128, 8.0, (29, 6, 29)), (64, 32.0, (15, 3, 14))])
def test_llama3_rope_bands(hd, factor, bands):
    """Pair i has wavelength 2 pi theta^(2i/hd). It is kept below original/high_freq_factor = 2048 tokens,
    divided by `factor` above original/low_freq_factor = 8192, blended in between (theta = 500000)."""
    theta = 500000.0
    wavelength = [2 * math.pi * theta ** (2 * i / hd) for i in range(hd // 2)]
    counts = (sum(w < 2048 for w in wavelength), sum(2048 <= w <= 8192 for w in wavelength),
              sum(w > 8192 for w in wavelength))  # fmt: skip
    assert counts == bands
    base = rope_frequencies(hd, theta, None).double()
    ratio = base / rope_frequencies(hd, theta, RopeScaling("llama3", factor, 1.0, 4.0, 8192)).double()
    kept, blended, divided = bands
    torch.testing.assert_close(ratio[:kept], torch.ones(kept, dtype=torch.float64))
    torch.testing.assert_close(ratio[kept + blended :], torch.full((divided,), factor, dtype=torch.float64))
    middle = ratio[kept : kept + blended]
    assert ((middle > 1) & (middle < factor)).all() and (middle.diff() > 0).all()  # rising from 1 towards factor


# ---- exercise 5: the model sees only relative positions ---------------------------------------------


@pytest.mark.parametrize("scaling", [None, RopeScaling("linear", 4.0), RopeScaling("llama3", 8.0, 1.0, 4.0, 16)])
@pytest.mark.parametrize("shift", [1, 37])
@torch.no_grad()
def test_the_model_sees_only_relative_positions(scaling, shift):
    """Run the blocks with the rotation angles the model computes for positions shift..shift+T-1 (a
    cache's context) but the causal mask of positions 0..T-1: every score sees the same differences
    m - n, so the logits equal the plain forward's."""
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=48, max_seq_len=64,
                         rope_scaling=scaling)  # fmt: skip
    model = random_model(config, seed=shift)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = model.context(tokens, 0, None, None)
    model.setup_cache(2, 64)
    later = model.context(tokens, shift, None, None)  # angles of positions shift.. (and a mask over cache slots)
    model.clear_cache()
    moved = dataclasses.replace(plain, cos=later.cos, sin=later.sin)
    h = model.tok_embeddings(tokens)
    for block in model.layers:
        h = block(h, moved)
    torch.testing.assert_close(model.output(model.norm(h)), model(tokens), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(later.cos, plain.cos)  # the angles did move
