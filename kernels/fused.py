"""Fused drop-in replacements for the plain modules of llama/core/model.py, in plain PyTorch.

Each replacement keeps the forward signature of the module it replaces, takes over (shares) that
module's weights, and computes the same function; kernels.optimize() swaps them into a loaded model.
What each one saves:

- Fused q/k/v projection (FastAttention with fuse_qkv): one matmul against [wq; wk; wv] (the rows
  concatenated) instead of three. x is read once, and during decoding (T = 1) three small GEMVs with
  their launches/dispatches become one larger one. The output is split into q, k, v as views.
- In-place RoPE (rope_): writes the rotated pairs of q and k back into their own storage instead
  of stacking them into a new (B, T, n, hd/2, 2) tensor and casting that to a third one, as
  apply_rope does. bf16/fp16 inputs are still widened to float32 for the rotation (as the reference
  does) and rounded once on the way back.
- SDPA (FastAttention with sdpa): torch.nn.functional.scaled_dot_product_attention instead of
  matmul -> masked_fill -> softmax -> matmul, so PyTorch can pick a fused (flash / memory-efficient)
  kernel that never materialises the (B, H, T, S) score matrix in float32. Grouped key/value heads are
  passed as they are (enable_gqa, torch >= 2.5) instead of being repeated n_rep times.
  The boolean mask from Transformer.forward is always passed: `is_causal` would assume the queries
  start at position 0, which is false during cached decoding. Numerics: float32 matches the
  reference to ~1e-6 relative; in bf16 the reference rounds the probabilities to bf16 before the
  value matmul while SDPA's fused kernels keep them wider, so logits differ by up to a few percent
  of their range (see tests/test_kernels.py for the measured error and the bound).
  Speed depends on the backend: on a CPU without native bf16 matmul, SDPA's bf16 kernel was 4x
  slower than the plain path for one decoding query against 1024 keys (float32: 2x faster), while
  prefill of 1024 tokens got 1.3-1.5x faster in both dtypes. Measure on the target device.
- Fused gate/up (FusedFeedForward): one matmul against [w1; w3] instead of two, then
  w2(silu(gate) * up).
- Residual add + RMSNorm (FusedNormBlock, add_rms_norm): the attention residual and the ffn norm of
  its result are computed in one function. In eager mode this is the same sequence of kernels as
  the plain block (no speed-up, bitwise-equal output); the point is that the pair sits in one
  small, branch-free function that torch.compile turns into a single kernel (one read of x and the
  attention output, one write of h and of the normed h) instead of an add and a norm that each
  stream the residual through memory.

The swaps target inference but stay differentiable: under autograd the rotation falls back to the
out-of-place apply_rope.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama.core.model import Attention, FeedForward, RMSNorm, TransformerBlock, apply_rope

_SDPA_HAS_GQA = torch.__version__ >= "2.5"  # TorchVersion compares as a version, not a string


def check_fusable(*linears: nn.Module) -> None:
    """Raise ValueError unless every module is a bias-free nn.Linear (what fuse_linears can stack)."""
    for lin in linears:
        if type(lin) is not nn.Linear or lin.bias is not None:
            raise ValueError(
                f"can only fuse bias-free nn.Linear modules, got {lin!r}; on a quantized model pass "
                "fuse_qkv=False, fuse_gate_up=False (the other swaps work with any projection module)"
            )


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One bias-free Linear whose weight stacks the given ones' rows: y = [y_1, y_2, ...] on the last dim.

    The concatenation copies the weights once; the caller drops the originals so memory does not double.
    """
    check_fusable(*linears)
    weight = linears[0].weight
    fused = nn.Linear(weight.shape[1], sum(lin.out_features for lin in linears), bias=False, device="meta")
    with torch.no_grad():
        stacked = torch.cat([lin.weight for lin in linears], dim=0)  # (sum of out_features, in_features)
    fused.weight = nn.Parameter(stacked, requires_grad=weight.requires_grad)
    return fused


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope written into x itself: x (B, T, n, hd), cos, sin (B, T, hd/2); returns x.

    x may be a strided view (a slice of the fused qkv output); pairs are viewed, not copied. When
    autograd records x (training), returns apply_rope(x, ...) instead: autograd forbids writing into
    the views that split() returns, and backward would need the unrotated values anyway.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return apply_rope(x, cos, sin)
    B, T, n, hd = x.shape
    pairs = x.unflatten(-1, (hd // 2, 2))  # (B, T, n, hd/2, 2), a view of x
    a, b = pairs[..., 0], pairs[..., 1]  # (B, T, n, hd/2) each, views
    a32, b32 = a.float(), b.float()  # no copy for float32 inputs: a32 is a
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, hd/2): shared by all heads
    new_a = a32 * cos - b32 * sin  # computed before b changes; for float32 b32 aliases b
    b.copy_(a32 * sin + b32 * cos)
    a.copy_(new_a)
    return x


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual and RMSNorm(h), same numerics as RMSNorm (float32 statistics, cast back, weight)."""
    h = x + residual
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.eps)
    return h, normed.type_as(h) * norm.weight


class FastAttention(nn.Module):
    """Attention with any of: fused q/k/v projection, in-place RoPE, SDPA. Same forward as Attention.

    Built from a plain Attention, whose wo (and wq, wk, wv when not fused) and KV cache it takes over.
    """

    def __init__(self, attention: Attention, *, fuse_qkv: bool, sdpa: bool, inplace_rope: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        self.fused_qkv, self.sdpa = fuse_qkv, sdpa
        self.rope = rope_ if inplace_rope else apply_rope
        if fuse_qkv:
            self.wqkv = fuse_linears(attention.wq, attention.wk, attention.wv)
            self.split_sizes = [self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2
        else:
            self.wq, self.wk, self.wv = attention.wq, attention.wk, attention.wv
        self.wo = attention.wo
        self.cache = attention.cache

    def forward(self, x, cos, sin, positions, mask, rows=None) -> torch.Tensor:
        """x: (B, T, D); cos, sin: (B, T, hd/2); positions: (B, T); mask: (B, 1, T, S) bool, True = attend;
        rows: (B,) cache rows, None for 0..B-1."""
        B, T, _ = x.shape
        if self.fused_qkv:
            q, k, v = self.wqkv(x).split(self.split_sizes, dim=-1)  # (B, T, H*hd), (B, T, Hkv*hd) x 2: views
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, hd)

        if self.cache is not None:
            k, v = self.cache.update(positions, k, v, mask.shape[-1], rows)  # (B, Hkv, S, hd)

        if self.sdpa:
            out = self._sdpa(q, k, v, mask)  # (B, H, T, hd)
        else:
            out = self._plain_attention(q, k, v, mask)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.wo(out)

    def _sdpa(self, q, k, v, mask):
        # Never is_causal: with a cache the T queries sit at positions start_pos.., not 0.., and
        # rows may have different start positions; the mask encodes both.
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _plain_attention(self, q, k, v, mask):
        """Attention.forward's core, unchanged (float32 softmax)."""
        n_rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
        v = v.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
        scores = (q @ k.transpose(2, 3)) / self.head_dim**0.5  # (B, H, T, S)
        scores = scores.float().masked_fill(~mask, float("-inf"))
        probs = F.softmax(scores, dim=-1).type_as(q)  # (B, H, T, S)
        return probs @ v  # (B, H, T, hd)


class FusedFeedForward(nn.Module):
    """SwiGLU with the gate (w1) and up (w3) projections in one matmul. Same forward as FeedForward."""

    def __init__(self, ffn: FeedForward):
        super().__init__()
        self.hidden_dim = ffn.w1.out_features
        self.w13 = fuse_linears(ffn.w1, ffn.w3)
        self.w2 = ffn.w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)  # (B, T, F) each, views
        return self.w2(F.silu(gate) * up)


class FusedNormBlock(nn.Module):
    """TransformerBlock computing the attention residual and the ffn norm in one function.

    Takes over the block's four submodules (whatever they have been swapped for), so state-dict names
    stay `attention_norm`, `attention`, `ffn_norm`, `feed_forward`.
    """

    def __init__(self, block: TransformerBlock):
        super().__init__()
        self.attention_norm, self.attention = block.attention_norm, block.attention
        self.ffn_norm, self.feed_forward = block.ffn_norm, block.feed_forward

    def forward(self, x, cos, sin, positions, mask, rows=None) -> torch.Tensor:
        h, normed = add_rms_norm(x, self.attention(self.attention_norm(x), cos, sin, positions, mask, rows), self.ffn_norm)
        return h + self.feed_forward(normed)
