"""Measuring a model at long context: loss by position, and logits read back through a KV cache.

    windows = long_windows(tokens_of_documents, length=1024)       # (N, 1024) from documents >= 1024 tokens
    nll = position_nll(model, windows)                             # (1023,) mean NLL of the token at each position
    nll_int8 = position_nll(model, windows, kv_cache_dtype="int8") # the same, every key and value read from an int8 cache

Perplexity by position is how context extension is judged: a model trained on 256 tokens predicts
the tokens past position 256 well only if it can use what it reads there. Plain RoPE beyond the
trained context sees rotation angles it never saw and the loss rises; position interpolation and
YaRN map the new positions onto angles it knows (docs: README's "Long context" section).

A forward through the KV cache, chunk by chunk, reads every key and value back as the cache stores
them (quantized, for kv_cache_dtype "int8" / "fp8"), which is what decoding with that cache sees.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

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
    device = model.tok_embeddings.weight.device
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


def long_windows(documents: Sequence[Sequence[int]], length: int, *, max_windows: int | None = None) -> torch.Tensor:
    """(N, length) int64: the first `length` tokens of each document that has at least that many
    (at most max_windows of them, in order). ValueError when none is long enough."""
    rows = [list(doc[:length]) for doc in documents if len(doc) >= length][:max_windows]
    if not rows:
        longest = max((len(d) for d in documents), default=0)
        raise ValueError(f"no document has {length} tokens (the longest has {longest}); use longer documents")
    return torch.tensor(rows, dtype=torch.long)


def kv_cache_greedy_agreement(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                              kv_cache_dtype: str, reference: str | None = None) -> list[int]:  # fmt: skip
    """For each prompt, how many greedy tokens generated with a kv_cache_dtype cache equal those of
    a `reference` cache (None: the model's dtype) before the first difference (max_new_tokens if none)."""
    ref = generate(model, prompts, max_new_tokens, temperature=0, stop_tokens=[], kv_cache_dtype=reference)
    out = generate(model, prompts, max_new_tokens, temperature=0, stop_tokens=[], kv_cache_dtype=kv_cache_dtype)
    return [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ref, out)]

