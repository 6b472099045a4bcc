"""Measuring a model at long context: loss by position, and logits read back through a KV cache.

    rows = windows(encode_documents(tokenizer, [text]), 1024)   # (N, 1024): the token stream, cut
    nll = position_nll(model, rows)                             # (1023,) mean NLL of the token at each position
    nll_int8 = position_nll(model, rows, kv_cache_dtype="int8") # the same, every key and value read from an int8 cache

Perplexity by position is how context extension is judged: a model trained on 256 tokens predicts
the tokens past position 256 well only if it can use what it reads there. Plain RoPE beyond the
trained context sees rotation angles it never saw and the loss rises; position interpolation and
YaRN map the new positions onto angles it knows (docs: README's "Long context" section).

A forward through the KV cache, chunk by chunk, reads every key and value back as the cache stores
them (quantized, for kv_cache_dtype "int8" / "fp8"), which is what decoding with that cache sees.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..core.device import model_device
from ..core.generation import generate
from ..core.model import Transformer


@torch.no_grad()
def cached_forward(model: Transformer, tokens: torch.Tensor, *, kv_cache_dtype: str | None = None,
                   chunk: int = 256) -> Iterator[torch.Tensor]:  # fmt: skip
    """Logits of tokens (B, T), `chunk` positions per forward through a fresh KV cache that stores
    kv_cache_dtype (None: the model's choice): yields (B, C, V) float32 per chunk, in order. The
    cache is removed at the end (or when the caller stops early)."""
    B, T = tokens.shape
    model.setup_cache(B, T, kv_cache_dtype=kv_cache_dtype)
    try:
        for begin in range(0, T, chunk):
            yield model(tokens[:, begin : begin + chunk], begin)
    finally:
        model.clear_cache()


@torch.no_grad()
def position_nll(model: Transformer, windows: torch.Tensor, *, batch_size: int = 8, kv_cache_dtype: str | None = None,
                 chunk: int = 256) -> torch.Tensor:  # fmt: skip
    """Mean negative log-likelihood (nats) of the token at each position 1..L-1 of windows (N, L),
    averaged over the N windows: (L - 1,) float64; entry i is the loss of predicting token i + 1
    from tokens 0..i. Without kv_cache_dtype each batch is one plain forward; with it, a cached
    forward (cached_forward) through a cache of that kind."""
    device = model_device(model)
    N, L = windows.shape
    total = torch.zeros(L - 1, dtype=torch.float64)
    for start in range(0, N, batch_size):
        batch = windows[start : start + batch_size].to(device)  # (b, L)
        if kv_cache_dtype is None:
            logits = model(batch)  # (b, L, V)
        else:
            logits = torch.cat(list(cached_forward(model, batch, kv_cache_dtype=kv_cache_dtype, chunk=chunk)), dim=1)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")  # (b, L-1)
        total += nll.sum(0).double().cpu()
    return total / N


def windows(tokens: Sequence[int] | torch.Tensor, length: int, max_windows: int | None = None) -> torch.Tensor:
    """(N, length) int64: a token stream (e.g. encode_documents' BOS doc EOS BOS doc EOS ...) cut into
    consecutive windows of `length` tokens, the remainder dropped, at most max_windows of them.
    ValueError when the stream is shorter than one window."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    n = len(tokens) // length if max_windows is None else min(max_windows, len(tokens) // length)
    if n < 1:
        raise ValueError(f"need at least {length} tokens for one window, got {len(tokens)}")
    return tokens[: n * length].view(n, length)


def kv_cache_greedy_agreement(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                              kv_cache_dtype: str, reference: str | None = None) -> list[int]:  # fmt: skip
    """For each prompt, how many greedy tokens generated with a kv_cache_dtype cache equal those of
    a `reference` cache (None: the model's dtype) before the first difference (max_new_tokens if none)."""
    ref = generate(model, prompts, max_new_tokens, temperature=0, stop_tokens=[], kv_cache_dtype=reference)
    out = generate(model, prompts, max_new_tokens, temperature=0, stop_tokens=[], kv_cache_dtype=kv_cache_dtype)
    return [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ref, out)]



def bucket_perplexity(nll: torch.Tensor, bucket: int) -> list[tuple[int, int, float]]:
    """A position_nll result in blocks of `bucket` predicted tokens: [(first position, last position,
    perplexity = exp(mean NLL over the block))]; position p is the token predicted from 0..p-1."""
    out = []
    for start in range(0, len(nll), bucket):
        part = nll[start : start + bucket]
        out.append((start + 1, start + len(part), math.exp(float(part.mean()))))
    return out


def plot_position_perplexity(curves: dict[str, torch.Tensor], path, *, trained_context: int | None = None,
                             bucket: int = 32, title: str = "") -> None:  # fmt: skip
    """Perplexity by position into a PNG: one line per curve (label -> position_nll result), each point
    a block of `bucket` positions, a dashed line at the trained context. Needs matplotlib (the
    project's [plot] extra); ImportError otherwise."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, nll in curves.items():
        points = bucket_perplexity(nll, bucket)
        ax.plot([(a + b) / 2 for a, b, _ in points], [p for _, _, p in points], marker=".", label=label)
    if trained_context is not None:
        ax.axvline(trained_context, color="grey", linestyle="--", linewidth=1)
        ax.annotate("trained context", (trained_context, 1), xycoords=("data", "axes fraction"), xytext=(4, -14),
                    textcoords="offset points", fontsize=8, color="grey")  # fmt: skip
    ax.set_xlabel(f"position in the window (mean over blocks of {bucket})")
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
