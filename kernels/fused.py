"""Fused drop-in replacements for the plain modules of llama/core/model.py, in plain PyTorch.

Each replacement subclasses the module it replaces and overrides only the named step it makes
faster (Attention.project_qkv / rotate / attend, FeedForward.gate_up); it takes over (shares) that
module's weights and computes the same function. kernels.optimize() swaps them into a loaded model.
What each one saves:

- Fused q/k/v projection (FastAttention with fuse_qkv): one matmul against [wq; wk; wv] (the rows
  concatenated; for int8 / int4 / Q8_0 projections their scales too) instead of three. x is read once, and during decoding (T = 1) three small GEMVs with
  their launches/dispatches become one larger one. The output is split into q, k, v as views.
- In-place RoPE (rope_): writes the rotated pairs of q and k back into their own storage instead
  of stacking them into a new (B, T, n, hd/2, 2) tensor and casting that to a third one, as
  apply_rope does. bf16/fp16 inputs are still widened to float32 for the rotation (as the reference
  does) and rounded once on the way back.
- SDPA (FastAttention with sdpa): torch.nn.functional.scaled_dot_product_attention instead of
  matmul -> masked_fill -> softmax -> matmul, so PyTorch can pick a fused (flash / memory-efficient)
  kernel that never materialises the (B, H, T, S) score matrix in float32. Grouped key/value heads are
  passed as they are (enable_gqa, torch >= 2.5) instead of being repeated n_rep times.
  The boolean mask from Transformer.forward is passed unless it is the plain causal triangle (a prompt
  from position 0, no sliding window: then `is_causal`, which lets the kernel skip the masked blocks);
  `is_causal` alone would assume the queries start at position 0, false during cached decoding.
  Numerics: float32 matches the
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
from llama.quantization import Int4Linear, Int8BlockLinear, Int8Linear

_SDPA_HAS_GQA = torch.__version__ >= "2.5"  # TorchVersion compares as a version, not a string


# What fuse_linears stacks, and for each type the buffers that hold one entry per output row with the
# dimension they run along (Int4Linear keeps its scales and zero points as (K/G, N, 2)).
FUSABLE = {
    nn.Linear: {"weight": 0},
    Int8Linear: {"weight": 0, "scales": 0},
    Int4Linear: {"weight": 0, "scales_and_zeros": 1},
    Int8BlockLinear: {"weight": 0, "scales": 0},
}


def check_fusable(*linears: nn.Module) -> None:
    """Raise ValueError unless the modules can be stacked by fuse_linears: all bias-free nn.Linear, or
    all Int8Linear / Int4Linear / Int8BlockLinear of the same settings (scales dtype, group size),
    with the same in_features."""
    first = linears[0]
    for lin in linears:
        if type(lin) not in FUSABLE or getattr(lin, "bias", None) is not None:
            raise ValueError(f"can only fuse bias-free nn.Linear, Int8Linear, Int4Linear or Int8BlockLinear "
                             f"modules, got {lin!r}")  # fmt: skip
        if type(lin) is not type(first) or lin.in_features != first.in_features:
            raise ValueError(f"can only fuse modules of one type and in_features, got {first!r} and {lin!r}")
        for name in FUSABLE[type(lin)]:
            a, b = getattr(lin, name), getattr(first, name)
            if a.dtype != b.dtype or a.device != b.device:
                raise ValueError(f"can only fuse modules whose {name} share dtype and device, got {a.dtype} on "
                                 f"{a.device} and {b.dtype} on {b.device}")  # fmt: skip
        if getattr(lin, "group_size", None) != getattr(first, "group_size", None):
            raise ValueError(f"can only fuse Int4Linear of one group size, got {first.group_size} and {lin.group_size}")


def fuse_linears(*linears: nn.Module) -> nn.Module:
    """One module of the same type whose output stacks the given ones': y = [y_1, y_2, ...] on the last
    dim. Its weights (and a quantized module's scales) are the originals' concatenated along the
    output rows, which copies them once; the caller drops the originals so memory does not double."""
    check_fusable(*linears)
    first, N = linears[0], sum(lin.out_features for lin in linears)
    K = first.in_features
    if type(first) is nn.Linear:
        fused = nn.Linear(K, N, bias=False, device="meta")
        with torch.no_grad():
            stacked = torch.cat([lin.weight for lin in linears], dim=0)  # (sum of out_features, in_features)
        fused.weight = nn.Parameter(stacked, requires_grad=first.weight.requires_grad)
        return fused
    if type(first) is Int8Linear:
        fused = Int8Linear(K, N, first.scales.dtype, device="meta")
    elif type(first) is Int4Linear:
        fused = Int4Linear(K, N, first.group_size, first.scales_and_zeros.dtype, device="meta")
    else:
        fused = Int8BlockLinear(K, N, device="meta")
    for name, dim in FUSABLE[type(first)].items():
        setattr(fused, name, torch.cat([getattr(lin, name) for lin in linears], dim=dim))
    if hasattr(first, "use_kernel"):
        fused.use_kernel = first.use_kernel
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
        # is_causal only when the mask is the plain causal triangle (ctx.causal: the keys are the T
        # queries themselves, at positions 0..T-1; no sliding window): the fused kernel then skips the
        # blocks above the diagonal, about half the work of a long prompt (1,024 tokens of Llama 3.2
        # 1B: a fifth of the prefill's time went to attention with the mask). Otherwise the mask: with
        # a cache the T queries sit at positions start_pos.., not 0.., and rows may start at different
        # positions, which is_causal (queries and keys aligned at position 0) would get wrong.
        mask = ctx.mask(self.window)
        if ctx.causal and self.window is None and _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
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
