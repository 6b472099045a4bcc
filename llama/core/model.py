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

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, RopeScaling


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
# longer ones; see RopeScaling in config.py for the three kinds.


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


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer: (B, Hkv, S_max, hd) each.

    Row b holds its own sequence; a forward call writes the new keys/values of row b at positions
    pos[b] .. pos[b] + T - 1. Stale entries beyond a row's current position are harmless: the mask
    hides them and the next write overwrites them.
    """

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, Hkv, T, hd) at positions: (B, T) of cache rows `rows` (B,) (default: rows
        0..B-1); return keys and values of positions 0..length-1 of those rows: (B, Hkv, length, hd)."""
        if rows is None:
            B = k.shape[0]
            index = positions[:, None, :, None].expand_as(k)  # (B, Hkv, T, hd)
            self.k[:B].scatter_(2, index, k.to(self.k.dtype))
            self.v[:B].scatter_(2, index, v.to(self.v.dtype))
            return self.k[:B, :, :length], self.v[:B, :, :length]  # views, no copy
        # Rows picked out of a larger pool (a server's slots): index_put_ writes in place; reading
        # them back gathers a copy, of just the positions attended to.
        self.k[rows[:, None], :, positions] = k.transpose(1, 2).to(self.k.dtype)  # target (B, T, Hkv, hd)
        self.v[rows[:, None], :, positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[rows, :, :length], self.v[rows, :, :length]


class Attention(nn.Module):
    """Multi-head self-attention with grouped key/value heads (GQA, Ainslie et al., 2023).

    GQA: Hkv < H key/value heads, each shared by n_rep = H / Hkv consecutive query heads. It shrinks
    the KV cache by n_rep; with Hkv = H it is ordinary multi-head attention, with Hkv = 1 multi-query.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, positions, mask, rows=None) -> torch.Tensor:
        """x: (B, T, D); cos, sin: (B, T, hd/2); positions: (B, T); mask: (B, 1, T, S) bool, True = attend;
        rows: (B,) cache rows of the batch rows, None for rows 0..B-1."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, hd)

        if self.cache is not None:
            k, v = self.cache.update(positions, k, v, mask.shape[-1], rows)  # (B, Hkv, S, hd)

        n_rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd): query head h reads kv head h // n_rep
        v = v.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)

        scores = (q @ k.transpose(2, 3)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        scores = scores.float().masked_fill(~mask, float("-inf"))
        probs = F.softmax(scores, dim=-1).type_as(q)  # (B, H, T, S)
        out = probs @ v  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up projection, w2 down."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)

    def forward(self, x, cos, sin, positions, mask, rows=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, mask, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.changed_fields():  # temporary, until the variants are written below
            raise NotImplementedError(f"architecture variants not implemented yet: {config.changed_fields()}")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not a parameter, and rebuilt here rather than loaded: always float32, made on the CPU
        # even when the model is built on the meta device, moved along by .to().
        freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_freqs", freqs, persistent=False)

    # ---- the KV cache ------------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        """Preallocate a KV cache for `batch_size` rows of up to `max_seq_len` positions.

        Afterwards forward() takes `start_pos` and appends to the cache, so decoding token by token
        gives the logits of one full forward over the same tokens.
        """
        max_seq_len = max_seq_len or self.config.max_seq_len
        param = self.tok_embeddings.weight
        dtype = dtype or param.dtype
        device = device or param.device
        for layer in self.layers:
            cfg = self.config
            layer.attention.cache = KVCache(batch_size, max_seq_len, cfg.n_kv_heads, cfg.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def cache_size(self) -> tuple[int, int] | None:
        """(batch_size, max_seq_len) of the cache, or None without one."""
        cache = self.layers[0].attention.cache if len(self.layers) else None
        return None if cache is None else (cache.k.shape[0], cache.k.shape[2])

    # ---- the forward pass --------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, *,
                cache_rows: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """tokens: (B, T) int64 -> logits: (B, T, V) float32.

        Without a cache this is the plain causal forward over the T tokens (start_pos must be 0).
        With a cache (setup_cache), the tokens of row b sit at positions start_pos[b] .. + T - 1
        (start_pos: an int shared by all rows, or a (B,) tensor), and attend to everything the cache
        holds before them. Two options for callers that drive the cache themselves:

        cache_rows: (B,) int64, the cache row of each batch row (default: rows 0..B-1). A server
            keeps one request per cache row and runs any subset of them.
        kv_len: attend to cache positions 0..kv_len-1 instead of 0..max(position). The masked
            result is the same; what changes is that no shape depends on the values in start_pos,
            so torch.compile can capture the decode step as one graph (no check reads the
            positions either: the caller keeps them below kv_len).
        """
        B, T = tokens.shape
        cache = self.cache_size
        dynamic = self.config.rope_scaling is not None and self.config.rope_scaling.kind == "dynamic"
        starts = torch.as_tensor(start_pos, dtype=torch.long, device=tokens.device).expand(B)  # (B,)
        positions = starts[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
        if cache is None:
            if kv_len is not None or cache_rows is not None:
                raise ValueError("kv_len and cache_rows need a KV cache; call setup_cache() first")
            if bool((starts != 0).any()):
                raise ValueError(f"start_pos {start_pos} needs a KV cache; call setup_cache() first")
            seq_len = T
        elif kv_len is not None:
            if not 0 < kv_len <= cache[1]:
                raise ValueError(f"kv_len {kv_len} is outside the KV cache's 1..{cache[1]} positions")
            if dynamic:
                raise ValueError("kv_len cannot be used with dynamic NTK scaling, whose frequencies depend on the positions")
            seq_len = kv_len
        else:
            seq_len = int(positions.max()) + 1
            rows = B if cache_rows is None else int(cache_rows.max()) + 1
            if rows > cache[0] or seq_len > cache[1]:
                raise ValueError(
                    f"{B} rows (cache rows up to {rows - 1}) at positions up to {seq_len - 1} do not fit "
                    f"the KV cache of {cache[0]} rows x {cache[1]} positions"
                )

        # The mask. Query row i of sequence b sits at position positions[b, i] and may attend to key
        # positions j <= positions[b, i]. Without a cache the keys are the T new tokens (a plain
        # causal triangle); with one they are cache slots 0..S-1, where slots beyond a row's current
        # position hold stale or unwritten entries that must stay hidden. A kernel's `is_causal`
        # flag would assume the queries start at position 0, which is wrong once start_pos > 0.
        key_positions = torch.arange(seq_len, device=tokens.device)  # (S,)
        mask = key_positions[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, S)

        freqs = self.rope_freqs
        # model.to(torch.bfloat16) or .half() casts every floating buffer, rounding the frequencies
        # (bf16: 2^-9 relative, radians of angle error by position 10^4): rebuild them in float32.
        if dynamic or freqs.dtype != torch.float32:
            freqs = rope_frequencies(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling, seq_len)
        angles = positions[:, :, None].float() * freqs.to(tokens.device)  # (B, T, hd/2)
        cos, sin = angles.cos(), angles.sin()

        h = self.tok_embeddings(tokens)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, mask, cache_rows)
        h = self.norm(h)
        return self.output(h).float()  # (B, T, V)
