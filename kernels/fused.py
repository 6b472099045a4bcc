"""Fused drop-in replacements for the plain modules of llama/core/model.py, in plain PyTorch.

Each replacement subclasses the module it replaces and overrides only the named step it makes
faster (Attention.project_qkv / rotate / attend, FeedForward.gate_up); it takes over (shares) that
module's weights and computes the same function. kernels.optimize() swaps them into a loaded model.
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
  SDPA never forms the probabilities, so a forward that asks to record them
  (llama/core/recording.py) is refused; with sdpa=False the plain attend records them.
  Speed depends on the backend: on a CPU without native bf16 matmul, SDPA's bf16 kernel was 4x
  slower than the plain path for one decoding query against 1024 keys (float32: 2x faster), while
  prefill of 1024 tokens got 1.3-1.5x faster in both dtypes. Measure on the target device.
- Fused gate/up (FusedFeedForward): one matmul against [w1; w3] instead of two, then
  w2(silu(gate) * up).

(An earlier "residual add + RMSNorm in one function" swap is gone: the plain block's add_and_norm
step is already that function, which torch.compile fuses the same way.)

The swaps target inference but stay differentiable: under autograd the rotation falls back to the
out-of-place apply_rope.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama.core.model import Attention, Context, FeedForward, apply_rope
from llama.core.support import UnsupportedModelError

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


class FastAttention(Attention):
    """Attention with any of: fused q/k/v projection, in-place RoPE, SDPA.

    A subclass of the plain Attention that overrides only the steps it makes faster (project_qkv,
    rotate, attend) and inherits forward and every other step, so a variant written in
    llama/core/model.py (per-head norms, NoPE layers, sliding windows ...) reaches it unchanged.
    Built from a plain Attention, whose submodules and settings it takes over.
    """

    def __init__(self, attention: Attention, *, fuse_qkv: bool, sdpa: bool, inplace_rope: bool):
        nn.Module.__init__(self)
        for name, value in vars(attention).items():  # settings: layer, heads, use_rope, window, ...
            if not name.startswith("_"):
                setattr(self, name, value)
        for name, module in attention._modules.items():  # wq, wk, wv, wo, and q_norm/k_norm (maybe None)
            setattr(self, name, module)
        self.fused_qkv, self.sdpa = fuse_qkv, sdpa
        self.rope = rope_ if inplace_rope else apply_rope
        if fuse_qkv:
            self.wqkv = fuse_linears(attention.wq, attention.wk, attention.wv)
            del self.wq, self.wk, self.wv
            self.split_sizes = [self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.fused_qkv:
            return super().project_qkv(x)
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(self.split_sizes, dim=-1)  # (B, T, H*hd), (B, T, Hkv*hd) x 2: views
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        return q, k, v

    def rotate(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.rope(x, ctx.cos, ctx.sin)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        """q: (B, H, T, hd), k, v: (B, Hkv, S, hd) -> (B, H, T, hd)."""
        if not self.sdpa:
            return super().attend(q, k, v, ctx)
        if ctx.recorder is not None and ctx.recorder.wants("attention", self.layer):
            raise UnsupportedModelError(
                f"layer {self.layer}: attention probabilities cannot be recorded through SDPA, which never "
                "forms them; record on the plain model (without kernels.optimize) or optimize with sdpa=False"
            )
        # Never is_causal: with a cache the T queries sit at positions start_pos.., not 0.., and
        # rows may have different start positions; the mask encodes both (and any sliding window).
        mask = ctx.mask(self.window)
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FusedFeedForward(FeedForward):
    """SwiGLU with the gate (w1) and up (w3) projections in one matmul: overrides FeedForward.gate_up."""

    def __init__(self, ffn: FeedForward):
        nn.Module.__init__(self)
        self.hidden_dim = ffn.w1.out_features
        self.w13 = fuse_linears(ffn.w1, ffn.w3)
        self.w2 = ffn.w2

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)  # (B, T, F) each, views
        return gate, up
