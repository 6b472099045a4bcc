"""The Llama transformer, written out in full.

Shape glossary (used in the comments after every reshape):
    B   batch size
    T   tokens in this forward call (the whole prompt, or 1 while decoding)
    S   key/value positions attended to (cache positions 0..S-1)
    D   model width, config.dim
    H   query heads            Hkv  key/value heads (GQA: H is a multiple of Hkv)
    hd  head dimension, config.head_dim
    F   feed-forward width, config.ffn_dim
    V   vocabulary size

One block, pre-norm (Llama 1 through 3.2 share it):
    h   = x + Attention(RMSNorm(x))
    out = h + FeedForward(RMSNorm(h))

Parameter names are Meta's (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...), so a
Meta checkpoint loads without renaming; weights/hf.py maps Hugging Face names onto them. Rotary
embeddings use Meta's layout too (rotating interleaved pairs); HF checkpoints are converted to it
when loaded.

Numerics follow the reference implementations: RMSNorm and softmax run in float32 whatever the
weights' dtype, rotations are computed in float32, and logits are returned in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, LayerCache, check_kv_cache_dtype, consecutive_rows  # noqa: F401 (LayerCache re-exported)
from .config import ModelConfig, RopeScaling
from .device import model_device, model_dtype
from .recording import Recorder


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019). Like LayerNorm without the
    mean subtraction and bias. Computed in float32, then cast back before the weight multiplies."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ---- rotary position embeddings (Su et al., 2021, "RoFormer") ------------------------------------
#
# Each head's vector is cut into hd/2 pairs (x[2i], x[2i+1]); pair i at position m is rotated by the
# angle m * f_i, with f_i = theta^(-2i/hd). The dot product of a query rotated by m*f and a key
# rotated by n*f depends only on (m - n)*f, so attention sees relative positions. Low i spin fast
# (short wavelengths: local order), high i slowly (long wavelengths: distant context).
#
# Scaling stretches the slow frequencies so that a model trained on short contexts keeps working on
# longer ones; see RopeScaling in config.py for the four kinds.


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None, seq_len: int = 0) -> torch.Tensor:
    """Inverse frequencies f_i, shape (hd/2,), float32, with scaling applied.

    `seq_len` matters only for dynamic NTK scaling, whose base grows with the sequence length.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    if scaling is not None and scaling.kind == "dynamic" and seq_len > scaling.original_max_seq_len:
        # NTK-aware: raise the base so the slowest frequency stretches by about `factor`.
        ratio = scaling.factor * seq_len / scaling.original_max_seq_len - (scaling.factor - 1)
        theta = theta * ratio ** (head_dim / (head_dim - 2))
    freqs = 1.0 / (theta**exponents)
    if scaling is None:
        return freqs
    if scaling.kind == "linear":
        return freqs / scaling.factor
    if scaling.kind == "llama3":
        # Wavelengths shorter than high_wavelen (local detail) are kept, those longer than
        # low_wavelen are stretched by `factor`, and the band between is blended linearly in
        # (original context / wavelength).
        wavelen = 2 * math.pi / freqs
        low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
        high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
        smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
        freqs = torch.where(wavelen < high_wavelen, freqs, torch.where(wavelen > low_wavelen, freqs / scaling.factor, blended))
    if scaling.kind == "yarn":
        # YaRN's "NTK-by-parts": pair i turns L * f_i / 2pi times within the original context L.
        # Pairs that turn more than beta_fast times keep their frequency (training showed them every
        # angle), those that turn fewer than beta_slow times are divided by `factor` (interpolated),
        # and between the two pair indices a linear ramp blends. The index where a pair turns r times
        # solves L * theta^(-2i/hd) = 2pi r. Edges as transformers computes them (floor/ceil with
        # truncate, clamped to [0, hd - 1]).
        def turns_to_pair(r: float) -> float:
            return head_dim * math.log(scaling.original_max_seq_len / (r * 2 * math.pi)) / (2 * math.log(theta))

        low, high = turns_to_pair(scaling.beta_fast), turns_to_pair(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # no band: a step instead of a ramp
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)  # 0: kept, 1: divided
        freqs = freqs / scaling.factor * ramp + freqs * (1 - ramp)
    return freqs


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x: (B, T, n, hd) by angles with cos, sin: (B, T, hd/2).

    (a, b) -> (a cos - b sin, a sin + b cos), the complex product (a + ib) * e^(i angle).
    """
    B, T, n, hd = x.shape
    pairs = x.float().view(B, T, n, hd // 2, 2)  # (B, T, n, hd/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]  # (B, T, n, hd/2) each
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, hd/2): shared by all heads
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)  # (B, T, n, hd/2, 2)
    return rotated.flatten(3).type_as(x)  # (B, T, n, hd)


@dataclass
class Context:
    """What every layer needs for one forward call, computed once by Transformer.forward."""

    positions: torch.Tensor  # (B, T) int64: each token's position in its own sequence
    cos: torch.Tensor  # (B, T, hd/2) float32: the rotation angles of those positions
    sin: torch.Tensor
    masks: dict[int | None, torch.Tensor]  # sliding window (None: plain causal) -> (B, 1, T, S) bool, True = attend
    cache: KVCache | None = None
    rows: torch.Tensor | slice | None = None  # each batch row's cache row: (B,), or consecutive rows (None: 0..B-1)
    recorder: Recorder | None = None  # collects attention probabilities and hidden states (recording.py)
    # The keys are this call's T tokens at positions 0..T-1 of every row (S == T: a prompt from its
    # start), so every mask without a window is the plain causal triangle, which a fused kernel can
    # be told instead (and skip the blocks above it).
    causal: bool = False
    # Values derived from the above that several layers need, computed by the first that asks (the
    # cache's write positions: cache.write_index).
    memo: dict = field(default_factory=dict)

    @property
    def kv_len(self) -> int:
        """S: the key positions attended to (cache slots 0..S-1, or the T new tokens without a cache)."""
        return next(iter(self.masks.values())).shape[-1]

    def mask(self, window: int | None) -> torch.Tensor:
        return self.masks[window]

    def record(self, kind: str, layer: int, x: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.add(kind, layer, x)


def attention_mask(positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """(B, 1, T, S) bool, True = attend: query i of row b, at position p = positions[b, i], sees keys at
    positions j <= p (causal), and with a sliding window W only the last W of them, p - W < j <= p.

    Without a cache the keys are the T new tokens (a plain causal triangle); with one they are cache
    slots 0..S-1, where slots beyond a row's current position hold stale or unwritten entries that
    must stay hidden. A kernel's `is_causal` flag would assume the queries start at position 0,
    which is wrong once start_pos > 0.
    """
    keys = torch.arange(kv_len, device=positions.device)[None, None, None, :]  # (1, 1, 1, S)
    query = positions[:, None, :, None]  # (B, 1, T, 1)
    mask = keys <= query
    if window is not None:
        mask = mask & (keys > query - window)
    return mask


class Attention(nn.Module):
    """Multi-head self-attention with grouped key/value heads (GQA, Ainslie et al., 2023).

    GQA: Hkv < H key/value heads, each shared by n_rep = H / Hkv consecutive query heads. It shrinks
    the KV cache by n_rep; with Hkv = H it is ordinary multi-head attention, with Hkv = 1 multi-query.

    forward() is four named steps. A fast path (kernels/fused.py) overrides only the step it makes
    faster and inherits the rest, so a change to any step here reaches it too:
        project_qkv   x -> q, k, v
        transform_qk  per-head norms (qk_norm) and rotary embeddings (skipped on NoPE layers)
        attend        softmax(q k^T / sqrt(hd) + mask) v, over the cache when there is one
        project_out   heads -> model width
    """

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # Qwen3's QK-norm: RMSNorm over each head's vector of q and k (one weight of hd shared by the
        # heads), before the rotation; it keeps attention logits from growing without bound.
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.use_rope = config.uses_rope(layer)
        self.window = config.window(layer)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        q, k, v = self.project_qkv(x)  # (B, T, H, hd), (B, T, Hkv, hd) x 2
        q, k = self.transform_qk(q, k, ctx)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, hd)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v, ctx)  # (B, Hkv, S, hd)
        out = self.attend(q, k, v, ctx)  # (B, H, T, hd)
        return self.project_out(out)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        return q, k, v

    def transform_qk(self, q: torch.Tensor, k: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = self.rotate(q, ctx), self.rotate(k, ctx)
        return q, k

    def rotate(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        return apply_rope(x, ctx.cos, ctx.sin)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        """q: (B, H, T, hd), k, v: (B, Hkv, S, hd) -> (B, H, T, hd)."""
        n_rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd): query head h reads kv head h // n_rep
        v = v.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
        scores = (q @ k.transpose(2, 3)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        scores = scores.float().masked_fill(~ctx.mask(self.window), float("-inf"))
        probs = F.softmax(scores, dim=-1).type_as(q)  # (B, H, T, S)
        ctx.record("attention", self.layer, probs)
        return probs @ v  # (B, H, T, hd)

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        B, H, T, hd = out.shape
        return self.wo(out.transpose(1, 2).reshape(B, T, H * hd))  # (B, T, H*hd) -> (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up projection, w2 down."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)  # (B, T, F) each
        return self.w2(self.activate(gate, up))

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w1(x), self.w3(x)

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The gating: silu(gate) = gate * sigmoid(gate) decides, per hidden unit, how much of up passes."""
        return F.silu(gate) * up


class GeluFeedForward(nn.Module):
    """The original transformer's MLP with GELU (Hendrycks & Gimpel, 2016): w2(gelu(w1 x)). Two
    matrices instead of SwiGLU's three (config.mlp = "gelu"; no HF Llama counterpart)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


FEED_FORWARDS = {"swiglu": FeedForward, "gelu": GeluFeedForward}  # config.mlp -> module


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FEED_FORWARDS[config.mlp](config.dim, config.ffn_dim)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        h, normed = self.add_and_norm(x, self.attention(self.attention_norm(x), ctx))
        return h + self.feed_forward(normed)

    def add_and_norm(self, x: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention residual h = x + update, and ffn_norm(h) for the feed-forward."""
        h = x + update
        return h, self.ffn_norm(h)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not a parameter, and rebuilt here rather than loaded: always float32, made on the CPU
        # even when the model is built on the meta device, moved along by .to().
        freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_freqs", freqs, persistent=False)
        self.cache: KVCache | None = None
        self.kv_cache_dtype: str | None = None  # what setup_cache uses by default (llama.load sets it)

    # ---- the KV cache (llama/core/cache.py) ---------------------------------------------------------

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None, *,
                    kv_cache_dtype: str | None = None) -> None:  # fmt: skip
        """Preallocate a KV cache for `batch_size` rows of up to `max_seq_len` positions.

        Afterwards forward() takes `start_pos` and appends to the cache, so decoding token by token
        gives the logits of one full forward over the same tokens. kv_cache_dtype: how the cache
        stores keys and values -- "float32", "bfloat16", "float16", or quantized "int8" / "fp8"
        (cache.py); default self.kv_cache_dtype, else `dtype`, else the weights' dtype.
        """
        shapes = [(layer.attention.n_kv_heads, layer.attention.head_dim) for layer in self.layers]
        self.cache = KVCache(shapes, batch_size, max_seq_len or self.config.max_seq_len, dtype or model_dtype(self),
                             device or model_device(self), check_kv_cache_dtype(kv_cache_dtype or self.kv_cache_dtype))  # fmt: skip

    def clear_cache(self) -> None:
        self.cache = None

    def set_rope_scaling(self, spec) -> None:
        """Run these weights with another RoPE scaling and context length: a context-extension
        experiment without editing the checkpoint (spec as ModelConfig.with_rope_scaling takes it,
        e.g. "yarn:4"). Drops the KV cache, which was sized for the old context."""
        self.config = self.config.with_rope_scaling(spec)
        freqs = rope_frequencies(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
        self.rope_freqs = freqs.to(self.rope_freqs.device)
        self.cache = None

    @property
    def cache_size(self) -> tuple[int, int] | None:
        """(batch_size, max_seq_len) of the cache, or None without one."""
        return None if self.cache is None else (self.cache.batch_size, self.cache.max_seq_len)

    # ---- the forward pass --------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, *, cache_rows: torch.Tensor | None = None,
                kv_len: int | None = None, record: Recorder | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, T) int64 -> logits: (B, T, V) float32.

        Without a cache this is the plain causal forward over the T tokens (start_pos must be 0).
        With a cache (setup_cache), the tokens of row b sit at positions start_pos[b] .. + T - 1
        (start_pos: an int shared by all rows, or a (B,) tensor), and attend to everything the cache
        holds before them. For callers that drive the cache themselves (see KVCache.locate):
        cache_rows, the cache row of each batch row (a server keeps one request per row); kv_len, a
        fixed number of cache positions to attend to (a compiled decode step). record: a Recorder
        that collects every layer's attention probabilities and hidden states (llama/core/recording.py).
        keep: (B,) int64, one position of this call per row (0 .. T-1): only those logits are
        computed, (B, 1, V). A prefill needs only the last prompt token's, and the output
        projection (V x D) is the largest matrix product of a step (a fifth of Llama 3.2 1B's).
        """
        ctx = self.context(tokens, start_pos, cache_rows, kv_len, record)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            ctx.record("hidden", i, h)  # the residual stream entering block i
            h = layer(h, ctx)
        ctx.record("hidden", len(self.layers), h)
        if keep is not None:
            h = h.gather(1, keep.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))  # (B, 1, D)
        h = self.norm(h)
        return self.output(h).float()  # (B, T, V), or (B, 1, V) with keep

    def context(self, tokens: torch.Tensor, start_pos, cache_rows, kv_len, record=None) -> Context:
        """Positions, rotation angles and masks of this call: computed once, shared by every layer."""
        B, T = tokens.shape
        starts = torch.as_tensor(start_pos, dtype=torch.long, device=tokens.device).expand(B)  # (B,)
        positions = starts[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
        scaling = self.config.rope_scaling
        dynamic = scaling is not None and scaling.kind == "dynamic"
        if self.cache is None:
            if kv_len is not None or cache_rows is not None:
                raise ValueError("kv_len and cache_rows need a KV cache; call setup_cache() first")
            if bool((starts != 0).any()):
                raise ValueError(f"start_pos {start_pos} needs a KV cache; call setup_cache() first")
            S = T
        else:
            if kv_len is not None and dynamic:
                raise ValueError("kv_len cannot be used with dynamic NTK scaling, whose frequencies depend on the positions")
            S = self.cache.locate(positions, cache_rows, kv_len)

        freqs = self.rope_freqs
        # model.to(torch.bfloat16) or .half() casts every floating buffer, rounding the frequencies
        # (bf16: 2^-9 relative, radians of angle error by position 10^4): rebuild them in float32.
        if dynamic or freqs.dtype != torch.float32:
            freqs = rope_frequencies(self.config.head_dim, self.config.rope_theta, scaling, S)
        angles = positions[:, :, None].float() * freqs.to(tokens.device)  # (B, T, hd/2)
        cos, sin = angles.cos(), angles.sin()
        if scaling is not None and scaling.attention_scale != 1.0:
            # YaRN's temperature: cos and sin times s rotate q and k and multiply both by s, so the
            # attention logits by s^2 (= 1/t in the paper), on every layer that rotates.
            cos, sin = cos * scaling.attention_scale, sin * scaling.attention_scale
        windows = {layer.attention.window for layer in self.layers} if self.layers else {None}
        masks = {w: attention_mask(positions, S, w) for w in windows}
        return Context(positions, cos, sin, masks, self.cache, consecutive_rows(cache_rows), record, causal=S == T)
