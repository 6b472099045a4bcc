"""Speculative decoding: a small draft model guesses, the target model checks several guesses at once.

    new = speculative_generate(target, draft, prompt_ids, 64, draft_tokens=4, temperature=0)

Leviathan, Kalman & Matias, 2023 ("Fast Inference from Transformers via Speculative Decoding") and
Chen et al., 2023 ("Accelerating Large Language Model Decoding with Speculative Sampling"). Decoding
one token costs a whole forward pass of the target, and at batch size 1 that pass is bound by reading
the weights (or, for tiny models, by per-op overhead), not by arithmetic: scoring k + 1 positions
costs little more than scoring one. So each round

1. the draft (same tokenizer, much cheaper) proposes k tokens d_1..d_k one at a time;
2. the target runs ONE forward over [pending tokens, d_1..d_k], which gives its distributions
   p_0..p_k for the positions after the last known token, after d_1, ..., after d_k;
3. d_1, d_2, ... are accepted while the target agrees; at the first disagreement the target supplies
   the token instead, and if all k are accepted p_k gives one more (the "bonus" token).

A round therefore yields between 1 and k + 1 tokens for one target forward.

Agreement. Greedy (temperature 0): d_i is accepted iff it is the argmax of p_{i-1}, and the
replacement is that argmax, so the output is exactly the target's greedy output. Sampling: d_i ~ q_{i-1}
(the draft's distribution) is accepted with probability min(1, p(d_i) / q(d_i)); on rejection the
token is drawn from norm(max(0, p - q)). Then every emitted token is distributed exactly as the
target alone would have sampled it (Leviathan et al., Appendix A.1): P(x) = q(x) min(1, p(x)/q(x)) +
(1 - sum_y min(p(y), q(y))) max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y)) = min(p, q) + max(0, p - q)
= p(x). p and q are both the *filtered* distributions (temperature, top-k, top-p, min-p via
generation.filter_logits), so the output follows the same filtered distribution as generation.stream.

The two KV caches. Each model keeps its own cache; `target_cached` and `draft_cached` count the
positions each holds that agree with the accepted sequence. Rejected tokens are never rolled back:
their cache slots lie beyond that count, where the mask of the next forward hides them until that
forward overwrites them (see Transformer.forward). The target always holds every accepted token
except the last one it produced (that token has not been fed to it yet). The draft may lag one more:
it never feeds its own last proposal d_k, so after a fully accepted round it is missing d_k and the
bonus token, and its next forward feeds both (a 2-token chunk). The first round feeds the whole
prompt to both the same way, so prefill is not a special case.

In floating point the target's logits for a chunk of k + 1 positions can differ from one-token
decoding by a few ulps. In float32 that flipped no argmax in any run we made; in bfloat16 a near-tie
(two logits within one bf16 step) can go the other way, so bf16 greedy output may differ from plain
bf16 greedy in rare places.

Scope: one prompt at a time (batch size 1); no repetition penalty (it changes with every accepted
token, so each verified position would need its own set of seen tokens) and no stop strings.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from .device import model_device
from .generation import GenerationError, SamplingParams, Token, check_prompt, filter_logits
from .model import Transformer


@dataclass
class SpeculativeStats:
    """Counters of one or more speculative runs; pass one as `stats=` and read it afterwards."""

    proposed: int = 0  # draft tokens put to the target
    accepted: int = 0  # of those, the ones the target accepted
    target_forwards: int = 0  # target forward passes (the prompt's included)
    draft_forwards: int = 0  # draft forward passes (the prompt's included)
    new_tokens: int = 0  # tokens yielded

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (nan before anything was proposed)."""
        return self.accepted / self.proposed if self.proposed else math.nan

    @property
    def tokens_per_target_forward(self) -> float:
        """new_tokens / target_forwards: 1.0 for plain decoding, up to draft_tokens + 1 here."""
        return self.new_tokens / self.target_forwards if self.target_forwards else math.nan


def speculative_stream(
    target: Transformer,
    draft: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    draft_tokens: int = 4,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop_tokens: Iterable[int] | None = None,
    stats: SpeculativeStats | None = None,
) -> Iterator[list[Token]]:
    """Generate from `target` with `draft` proposing `draft_tokens` tokens per round; yields, after
    each target forward, the tokens it settled (1 .. draft_tokens + 1 Token objects, row 0, logprob =
    the target's log-probability before the sampling filters).

    Stops like generation.stream: at one of `stop_tokens` (not yielded; None means target.stop_tokens)
    or after `max_new_tokens`. Greedy output equals generation.generate(target, [prompt_ids], ...,
    temperature=0); sampled output has the target's distribution. Both models get a KV cache for
    this call, removed at the end. `stats`, if given, is updated in place.
    """
    params = SamplingParams(temperature, top_p, top_k, min_p)
    if draft is target:
        raise GenerationError(
            "the draft must be a separate model object (each keeps its own KV cache); use copy.deepcopy(target)"
        )
    vocab, draft_vocab = target.config.vocab_size, draft.config.vocab_size
    if vocab != draft_vocab:
        raise GenerationError(
            f"the draft's vocabulary ({draft_vocab} tokens) differs from the target's ({vocab}); "
            "speculative decoding needs both models to share one tokenizer"
        )
    device, draft_device = model_device(target), model_device(draft)
    if device != draft_device:
        raise GenerationError(f"the target is on {device} and the draft on {draft_device}; put both on one device")
    prompt = check_prompt(prompt_ids, 0, vocab)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise GenerationError(f"draft_tokens must be a positive integer, got {draft_tokens!r}")
    for name, model in (("target", target), ("draft", draft)):
        limit = model.config.max_seq_len
        if len(prompt) + max_new_tokens > limit:
            raise GenerationError(
                f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the {name} model's "
                f"context of {limit} tokens"
            )
    if stop_tokens is None:
        stop_tokens = getattr(target, "stop_tokens", ())
    stop = set(operator.index(t) for t in stop_tokens)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stats = stats if stats is not None else SpeculativeStats()
    # Checked now, run lazily: a bad request fails at the call, not at the first next().
    return _rounds(target, draft, prompt, max_new_tokens, draft_tokens, params, generator, stop, stats)


def speculative_generate(
    target: Transformer, draft: Transformer, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs
) -> list[int]:
    """The new token ids (without the stop token); keyword arguments as speculative_stream."""
    return [t.id for step in speculative_stream(target, draft, prompt_ids, max_new_tokens, **kwargs) for t in step]


# ---- one round at a time -------------------------------------------------------------------------------


def _rounds(target, draft, prompt, max_new_tokens, k, params, generator, stop, stats) -> Iterator[list[Token]]:
    if max_new_tokens == 0:
        return
    greedy = params.temperature == 0
    device = model_device(target)
    seq = list(prompt)  # prompt + every token settled so far
    target_cached = draft_cached = 0  # positions of each cache that agree with seq
    produced = 0
    # A round writes at most positions len(seq) - 1 + n_draft <= len(prompt) + max_new_tokens - 2.
    target.setup_cache(1, len(prompt) + max_new_tokens)
    draft.setup_cache(1, len(prompt) + max_new_tokens)
    try:
        with torch.inference_mode():
            while True:
                # Never propose past max_new_tokens: a round settles up to n_draft + 1 tokens.
                n_draft = min(k, max_new_tokens - produced - 1)
                proposal, q, draft_end = _propose(draft, seq, draft_cached, n_draft, params, generator, device)
                stats.draft_forwards += n_draft

                chunk = torch.tensor([seq[target_cached:] + proposal], device=device)  # (1, T)
                logits = target(chunk, target_cached)[0, -(n_draft + 1) :]  # (n_draft + 1, V): p_0 .. p_n
                stats.target_forwards += 1
                if greedy:
                    n_accepted, new = _verify_greedy(logits, proposal, device)
                else:
                    n_accepted, new = _verify_sampled(logits, proposal, q, params, generator, device)
                stats.proposed += n_draft
                stats.accepted += n_accepted

                # The target has now cached seq and the accepted proposals; the draft cached seq and
                # proposals up to its last fed one (it never feeds its final proposal).
                target_cached = len(seq) + n_accepted
                draft_cached = min(draft_end, len(seq) + n_accepted)
                seq.extend(new)

                logprobs = torch.log_softmax(logits[: len(new)], dim=-1)  # (n_new, V): the target's own
                out, finished = [], False
                for i, token in enumerate(new):
                    if token in stop:
                        finished = True
                        break
                    out.append(Token(0, token, float(logprobs[i, token])))
                    produced += 1
                stats.new_tokens += len(out)
                if out:
                    yield out
                if finished or produced == max_new_tokens:
                    return
    finally:
        target.clear_cache()
        draft.clear_cache()


def _propose(draft, seq, cached, n, params, generator, device):
    """Run the draft n steps past seq. Returns the proposed ids, their distributions q: (n, V) float32
    (None when greedy) and the number of draft cache positions written so far."""
    proposal, qs = [], []
    pending, pos = seq[cached:], cached
    for _ in range(n):
        logits = draft(torch.tensor([pending], device=device), pos)[:, -1]  # (1, V)
        pos += len(pending)
        if params.temperature == 0:
            token = int(logits.argmax())
        else:
            q = filter_logits(logits, params).softmax(dim=-1)  # (1, V)
            token = int(torch.multinomial(q, 1, generator=generator))
            qs.append(q)
        proposal.append(token)
        pending = [token]
    q = torch.cat(qs) if qs else None  # (n, V)
    return proposal, q, pos


def _verify_greedy(logits: torch.Tensor, proposal: list[int], device) -> tuple[int, list[int]]:
    """logits: (n + 1, V). Accept the proposals that equal the target's argmax; the target's argmax
    after the last accepted one is the extra token. Returns (accepted count, settled tokens)."""
    choice = logits.argmax(dim=-1)  # (n + 1,)
    agrees = choice[: len(proposal)] == torch.tensor(proposal, dtype=torch.long, device=device)
    n_accepted = int(agrees.cumprod(0).sum())  # length of the agreeing prefix
    return n_accepted, choice[: n_accepted + 1].tolist()


def _verify_sampled(logits, proposal, q, params, generator, device) -> tuple[int, list[int]]:
    """logits: (n + 1, V), q: (n, V). Rejection sampling (Leviathan et al., Algorithm 1)."""
    n = len(proposal)
    p = filter_logits(logits, params).softmax(dim=-1)  # (n + 1, V), the filtered target distributions
    if n:
        ids = torch.tensor(proposal, dtype=torch.long, device=device)
        rows = torch.arange(n, device=device)
        ratio = p[rows, ids] / q[rows, ids]  # q > 0: each d_i was drawn from q
        u = torch.rand(n, generator=generator, device=device)  # one uniform per proposal, used or not
        n_accepted = int((u < ratio).cumprod(0).sum())  # P(u < ratio) = min(1, ratio)
    else:
        n_accepted = 0
    if n_accepted < n:
        # Rejected: draw from the part of p that q under-covers. It has mass unless p == q (in which
        # case nothing is rejected); the fallback only guards against rounding.
        residual = (p[n_accepted] - q[n_accepted]).clamp_min(0)
        dist = residual if float(residual.sum()) > 0 else p[n_accepted]
    else:
        dist = p[n]  # all accepted: the bonus token comes from the target's last distribution
    extra = int(torch.multinomial(dist, 1, generator=generator))
    return n_accepted, proposal[:n_accepted] + [extra]
