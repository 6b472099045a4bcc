"""Perplexity of a text under a model, with a sliding window; exact match of answers to instructions.

A model reads at most `context_len` tokens at once, so a long text is scored window by window. With
windows side by side (stride == context_len) the first tokens of every window are predicted from
almost no context, which overstates the perplexity. A sliding window (the method of Hugging Face's
"Perplexity of fixed-length models" guide) advances by `stride` < context_len and scores only the
tokens the previous window did not score: each scored token then sees at least
context_len - stride earlier tokens (with BOS: context_len - 1 - stride), at the price of
context_len / stride times more compute.

    window 1: [t0 ......................... t9]          scores t1..t9 (t0 has nothing before it)
    window 2:          [t4 ..... t9 t10 ....... t13]     scores t10..t13 given t4..t9
    context_len 10, stride 4

BOS: with `bos_id`, every window is fed as BOS followed by context_len - 1 text tokens, and the first
text token of the first window is scored too (predicted from BOS alone). Without it, the very first
token is never scored, nor, with stride == context_len, the first token of any window (nothing
precedes it inside its window). Perplexity is exp(total negative log-likelihood / tokens scored), in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.device import model_device
from ..core.generation import generate
from ..core.model import Transformer
from .data import alpaca_prompt, record_kind


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll_sum / n_tokens)
    nll_sum: float  # summed negative log-likelihood of the scored tokens, nats
    n_tokens: int  # tokens scored
    context_len: int  # tokens per window, BOS included
    stride: int
    bos: bool  # whether each window was prefixed with BOS
    n_windows: int

    @property
    def nll_mean(self) -> float:
        return self.nll_sum / self.n_tokens


@torch.no_grad()
def perplexity(
    model: Transformer,
    tokens: Sequence[int] | torch.Tensor,
    context_len: int,
    stride: int,
    *,
    bos_id: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Sliding-window perplexity of `tokens` (a flat sequence of ids) under `model`.

    context_len: tokens per forward pass, BOS included when bos_id is given.
    stride: how far each window advances; 1 <= stride <= text tokens per window.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    prefix = [] if bos_id is None else [bos_id]
    span = context_len - len(prefix)  # text tokens per window
    if span < 1:
        raise ValueError(f"context_len {context_len} leaves no room for text" + (" after BOS" if prefix else ""))
    if not 1 <= stride <= span:
        raise ValueError(f"stride must be in [1, {span}] for context_len {context_len}" +
                         (" with BOS" if prefix else "") + f", got {stride}")  # fmt: skip
    n = len(tokens)
    if n < 2 - len(prefix):
        raise ValueError(f"need at least {2 - len(prefix)} tokens to score, got {n}")
    device = model_device(model)
    prefix_t = torch.tensor(prefix, dtype=torch.long)

    n_windows = 1 + math.ceil(max(0, n - span) / stride)  # the last one reaches the end of the text
    starts = [i * stride for i in range(n_windows)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(starts), unit="window", desc="perplexity")
    model.eval()
    nll_sum, count, scored_until = 0.0, 0, 0  # tokens before scored_until are scored already
    for begin in starts:
        end = min(begin + span, n)
        window = torch.cat([prefix_t, tokens[begin:end]])  # (L,), L <= context_len
        logits = model(window[None].to(device))[0]  # (L, V) float32
        # Text token t sits at window index t - begin + len(prefix) and is predicted by the logits
        # one index earlier; without BOS the window's first token has no prediction.
        first = max(scored_until, begin + (0 if prefix else 1))
        rows = logits[first - begin + len(prefix) - 1 : end - begin + len(prefix) - 1]  # (end - first, V)
        nll = F.cross_entropy(rows, tokens[first:end].to(device), reduction="sum")
        nll_sum += float(nll)
        count += end - first
        scored_until = end
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return PerplexityResult(math.exp(nll_sum / count), nll_sum, count, context_len, stride, bos_id is not None, len(starts))


# ---- exact match on held-out instructions ------------------------------------------------------------


@dataclass(frozen=True)
class ExactMatchResult:
    score: float  # share of records whose greedy answer equals the expected one
    n: int
    answers: list[tuple[str, str]]  # (generated, expected) per record, in order


def exact_match(model: Transformer, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 16,
                batch_size: int = 16) -> ExactMatchResult:
    """Greedy answers to Alpaca or chat records (data.read_records), compared with the expected
    output (the last assistant message) after stripping surrounding whitespace.

    The prompt is what fine-tuning trained on before the answer: the Alpaca template, or the
    dialog without its last message in the checkpoint's chat format. Generation stops at the
    tokenizer's stop tokens or after max_new_tokens.
    """
    prompts, expected = [], []
    for i, record in enumerate(records):
        kind = record_kind(record, f"record {i}")
        if kind == "alpaca":
            prompts.append(tokenizer.encode(alpaca_prompt(record["instruction"], record.get("input", "")), bos=True, eos=False))
            expected.append(record["output"].strip())
        elif kind == "chat":
            prompts.append(tokenizer.encode_dialog(record["messages"][:-1]))
            expected.append(record["messages"][-1]["content"].strip())
        else:
            raise ValueError(f"record {i}: a text record has no answer to match")
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        new = generate(model, batch, max_new_tokens, temperature=0, stop_tokens=tokenizer.stop_tokens)
        answers += [tokenizer.decode(ids).strip() for ids in new]
    hits = sum(a == e for a, e in zip(answers, expected))
    return ExactMatchResult(hits / max(len(records), 1), len(records), list(zip(answers, expected)))
