"""Text generation: prefill the prompt into the KV cache, then decode one token at a time.

    tokens = generate(model, [prompt_ids], max_new_tokens=64, temperature=0)   # greedy

Batching prompts of different lengths. The prompts are padded on the right to a common length T
and prefilled together; row b's first new token comes from the logits at its own last prompt
position, len_b - 1. From then on every row decodes at its own position (a (B,) start_pos tensor),
so a row never sees another row's padding, and the padding slots in its own cache, which lie
beyond its position, are masked until its own tokens overwrite them. Each row therefore computes
what it would compute alone.

Sampling turns one row of logits into a token, in the order transformers applies the same knobs:
repetition penalty, then temperature, top-k, top-p (nucleus) and min-p; temperature 0 is greedy.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .cache import check_kv_cache_dtype
from .device import model_device, model_dtype
from .model import Transformer


class GenerationError(ValueError):
    """A generation request is invalid: bad sampling values, or a prompt that does not fit."""


@dataclass(frozen=True)
class SamplingParams:
    """What sampling does with one row of logits; each value is checked on construction.

    Every value that passes is numerically safe: temperature may be any finite number >= 0 (a tiny
    one behaves as greedy), top_p any number in (0, 1] (a tiny one keeps only the top token), the
    repetition penalty any finite number > 0.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        real = {name: _real(name, getattr(self, name)) for name in ("temperature", "top_p", "repetition_penalty")}
        if self.min_p is not None:
            real["min_p"] = _real("min_p", self.min_p)
        for name, value in real.items():
            object.__setattr__(self, name, value)
        if not math.isfinite(self.temperature):
            raise GenerationError(f"temperature must be a finite number, got {self.temperature}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise GenerationError(f"top_k must be a positive integer, got {self.top_k}")
        if self.min_p is not None and not (0 <= self.min_p <= 1):
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (0 < self.repetition_penalty < math.inf):
            raise GenerationError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GenerationError(f"{name} must be a number, got {value!r:.80}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        raise GenerationError(f"{name} must be a finite number, got {value}") from None


def check_seed(seed) -> int | None:
    """A seed as torch.Generator.manual_seed takes it: any integer, reduced modulo 2**64 (torch itself
    maps -1 to 2**64 - 1, so every seed it accepted keeps its stream), or None for a random one."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise GenerationError(f"seed must be an integer, got {seed!r:.80}")
    return int(seed) % 2**64


# float32's range: a penalty or temperature of 1e-300 or 1e300 is a float64 that float32 arithmetic
# would turn into 0 or inf, and then inf * 0 or inf - inf into NaN. Clamping it to the largest and
# smallest normal float32 values keeps every result finite (or -inf where it should be).
_F32 = torch.finfo(torch.float32)


def _float32_range(x: float) -> float:
    return min(max(x, _F32.tiny), _F32.max)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019): make every token already in the sequence less likely,
    dividing positive logits by `penalty` and multiplying negative ones. logits: (B, V); seen: (B, V) bool.
    Finite logits stay finite (a tiny penalty sends positive ones to the largest float, not to inf)."""
    if penalty == 1.0:
        return logits
    p = _float32_range(penalty)
    penalised = torch.where(logits > 0, logits / p, logits * p).clamp(-_F32.max, _F32.max)
    penalised = torch.where(torch.isinf(logits), logits, penalised)  # -inf (a masked token) stays -inf
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: filtered-out tokens get -inf. logits: (B, V) float32.

    The temperature divides the logits minus their maximum (softmax does not change): the top token
    gets 0 and every other one a number <= 0, so a tiny temperature sends the others to -inf
    (greedy) rather than the top one to inf (and the softmax to NaN).
    """
    logits = logits.clamp(max=_F32.max)  # an overflowed +inf logit would make inf - inf = NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / _float32_range(params.temperature)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probabilities sum to at least top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # mass before this token already enough
        drop_sorted[..., 0] = False  # the top token always stays (a top_p below float32's precision rounds to 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p is not None and params.min_p > 0:
        # Keep tokens at least min_p times as likely as the most likely one (Nguyen et al., 2024).
        probs = logits.softmax(-1)
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row. logits: (B, V) float32 (after any penalty) -> (B,) int64."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- prefill ------------------------------------------------------------------------------------------
#
# One forward over a whole prompt of T tokens computes a (B, H, T, T) float32 score matrix in every
# layer and returns (B, T, V) logits: for a 4K-token prompt of a Llama 3.2 1B shape, 2.1 GB each,
# growing with T^2 and T. Feeding the prompt through the KV cache C positions at a time computes the
# same thing (each chunk attends to the cache holding everything before it) with (B, H, C, S) scores
# and (B, C, V) logits: memory bounded by the chunk and the cache, not by the prompt.

PREFILL_CHUNK = 512


def prefill(model: Transformer, tokens: torch.Tensor, lengths: torch.Tensor, *, chunk: int | None = PREFILL_CHUNK,
            start_pos: int | torch.Tensor = 0, cache_rows: torch.Tensor | None = None,
            progress: Callable[[int, int], None] | None = None,
            on_logits: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:  # fmt: skip
    """Write right-padded prompts into the model's KV cache and return the logits after each one.

    tokens: (B, T) int64, row b's prompt its first lengths[b] tokens, placed at positions start_pos..
    (an int, or (B,) per row; cache_rows: the cache row of each, as for Transformer.forward). `chunk`
    positions per forward (None: all T at once); progress(done, T) after each; on_logits(begin,
    (B, C, V) logits) gets each chunk's logits (e.g. for prompt logprobs). Returns (B, V) float32:
    the logits at each row's last prompt token, i.e. the distribution of its first new token.
    """
    steps = ChunkedPrefill(model, tokens, lengths, chunk=chunk, start_pos=start_pos, cache_rows=cache_rows,
                           on_logits=on_logits)  # fmt: skip
    while not steps.done:
        done = steps.step()
        if progress is not None:
            progress(done, steps.length)
    return steps.logits


class ChunkedPrefill:
    """prefill() one chunk at a time, for a caller that runs other forwards between the chunks (a
    server decoding its running sequences: llama/serving/engine.py). step() runs the next chunk and
    returns the positions done; once `done`, `logits` is prefill()'s result. Between two steps the
    cache rows of this prefill must not be written by anything else; other rows may be.
    """

    def __init__(self, model: Transformer, tokens: torch.Tensor, lengths: torch.Tensor, *, chunk: int | None,
                 start_pos: int | torch.Tensor = 0, cache_rows: torch.Tensor | None = None,
                 on_logits: Callable[[int, torch.Tensor], None] | None = None):  # fmt: skip
        self.model, self.tokens, self.start_pos, self.cache_rows, self.on_logits = model, tokens, start_pos, cache_rows, on_logits
        self.length = tokens.shape[1]  # T
        self.chunk = chunk or self.length
        self.last = lengths.to(tokens.device) - 1  # (B,) each row's last prompt position
        self.begin = 0
        self.logits: torch.Tensor | None = None  # (B, V), filled row by row as each prompt ends

    @property
    def done(self) -> bool:
        return self.begin >= self.length

    def step(self, chunk: int | None = None) -> int:
        """Run the next `chunk` positions (default: the chunk given at construction)."""
        begin = self.begin
        tokens = self.tokens[:, begin : begin + (chunk or self.chunk)]  # (B, C)
        end = begin + tokens.shape[1]
        here = ((self.last >= begin) & (self.last < end)).nonzero().flatten()  # rows whose prompt ends in this chunk
        # Without on_logits only each row's last prompt position is needed: keep one position per row
        # (any, for rows whose prompt does not end here) instead of C positions x V logits.
        keep = None if self.on_logits is not None else (self.last - begin).clamp(0, tokens.shape[1] - 1)
        logits = self.model(tokens, self.start_pos + begin, cache_rows=self.cache_rows, keep=keep)  # (B, C or 1, V)
        if self.logits is None:
            self.logits = logits.new_empty(self.tokens.shape[0], logits.shape[-1])
        self.logits[here] = logits[here, 0] if keep is not None else logits[here, self.last[here] - begin]
        if self.on_logits is not None:
            self.on_logits(begin, logits)
        self.begin = end
        return end


@dataclass
class Token:
    """One generated token of one row, as the streaming iterator yields it."""

    row: int
    id: int
    logprob: float  # log-probability under the model's own distribution (before sampling filters)


def stream(
    model: Transformer,
    prompt_tokens: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_tokens: Iterable[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    compile: bool = False,
    kv_cache_dtype: str | None = None,
    prefill_chunk: int | None = PREFILL_CHUNK,
    prefill_progress: Callable[[int, int], None] | None = None,
) -> Iterator[list[Token]]:
    """Generate step by step: yields, after each forward pass, the new tokens of the rows still
    running. A row stops at one of `stop_tokens` (not yielded), after `max_new_tokens`, or once its
    text contains one of `stop_strings` (needs `tokenizer`; the completing token is yielded).

    The KV cache is set up for this call and removed at the end. With compile=True the decode step
    runs through torch.compile (see compiled_decode_step) and the cache is kept for the next call.
    kv_cache_dtype: how the cache stores keys and values ("bfloat16", "int8", "fp8" ...; see
    llama/core/cache.py; default: model.kv_cache_dtype, else the weights' dtype). The prompts are
    prefilled `prefill_chunk` positions per forward (None: all at once; see prefill), calling
    prefill_progress(positions done, positions in all) after each.
    """
    params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty)
    seed = check_seed(seed)
    prompts = [check_prompt(p, i, model.config.vocab_size) for i, p in enumerate(prompt_tokens)]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    longest = max((len(p) for p in prompts), default=0)
    limit = model.config.max_seq_len
    if longest + max_new_tokens > limit:
        raise GenerationError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of {limit} tokens"
        )
    if stop_strings:
        if tokenizer is None:
            raise GenerationError("stop_strings need a tokenizer to decode the output")
        if not all(isinstance(s, str) and s for s in stop_strings):
            raise GenerationError(f"stop strings must be non-empty strings, got {list(stop_strings)!r}")
    if stop_tokens is None:
        stop_tokens = getattr(model, "stop_tokens", ())
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long)
    # Checked now, run lazily: a bad request fails at the call, not at the first next().
    if compile and model.config.rope_scaling is not None and model.config.rope_scaling.kind == "dynamic":
        raise GenerationError("compile=True does not support dynamic NTK RoPE scaling (its frequencies change with the length)")
    try:
        check_kv_cache_dtype(kv_cache_dtype)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise GenerationError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
    cache = dict(kv_cache_dtype=kv_cache_dtype, prefill_chunk=prefill_chunk, prefill_progress=prefill_progress)
    return _decode_loop(model, prompts, max_new_tokens, params, seed, stop, stop_strings, tokenizer, compile, **cache)


def default_new_tokens(context: int, prompt_len: int, cap: int = 256) -> int:
    """The number of new tokens to ask for when the caller gave none: `cap`, or what the context
    leaves after the prompt when that is less (at least 1, so that a prompt that fills the context
    still gets stream's error, which names the lengths)."""
    return max(1, min(cap, context - prompt_len))


def check_prompt(prompt, index: int, vocab: int) -> list[int]:
    """A prompt as a list of Python ints in [0, vocab), or a GenerationError naming what is wrong."""
    try:
        ids = [operator.index(t) for t in prompt if not isinstance(t, bool)]
    except TypeError:
        raise GenerationError(f"prompt {index} must be a sequence of integer token ids") from None
    if len(ids) != len(prompt):
        raise GenerationError(f"prompt {index} holds booleans, not token ids")
    if not ids:
        raise GenerationError(f"prompt {index} is empty; it needs at least one token (e.g. BOS)")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise GenerationError(f"prompt {index} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    return ids


def _decode_loop(model, prompts, max_new_tokens, params, seed, stop, stop_strings, tokenizer, compile=False, *,
                 kv_cache_dtype=None, prefill_chunk=PREFILL_CHUNK, prefill_progress=None) -> Iterator[list[Token]]:  # fmt: skip
    if not prompts or max_new_tokens == 0:
        return
    longest = max(len(p) for p in prompts)
    vocab = model.config.vocab_size
    device = model_device(model)
    B = len(prompts)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    padded = torch.zeros(B, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
    seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
    if params.repetition_penalty != 1.0:
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=device)] = True
    stop = stop.to(device)
    texts = [[] for _ in range(B)] if stop_strings else None
    running = torch.ones(B, dtype=torch.bool, device=device)

    if compile:
        kv_len = static_cache(model, B, longest + max_new_tokens, kv_cache_dtype)
        step_fn = compiled_decode_step(model)
    else:
        model.setup_cache(B, longest + max_new_tokens, kv_cache_dtype=kv_cache_dtype)
    try:
        with torch.inference_mode():
            logits = prefill(model, padded, lengths, chunk=prefill_chunk, progress=prefill_progress)  # (B, V)
            positions = lengths.clone()
            for step in range(max_new_tokens):
                logprobs = torch.log_softmax(logits, dim=-1)  # the model's own, before the penalty
                logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
                token = sample(logits, params, generator)  # (B,)
                logprob = logprobs.gather(-1, token[:, None]).squeeze(-1)
                is_stop = torch.isin(token, stop)
                out = []
                for row in running.nonzero().flatten().tolist():
                    if is_stop[row]:
                        running[row] = False
                        continue
                    out.append(Token(row, int(token[row]), float(logprob[row])))
                    if texts is not None:
                        texts[row].append(int(token[row]))
                        text = tokenizer.decode(texts[row])
                        if any(s in text for s in stop_strings):
                            running[row] = False
                if out:
                    yield out
                if step == max_new_tokens - 1 or not running.any():
                    break
                seen[torch.arange(B, device=device), token] = True
                if compile:
                    logits = step_fn(model, token, positions, kv_len).clone()  # (B, V); see compiled_decode_step
                else:
                    logits = model(token[:, None], positions)[:, -1]  # (B, V)
                positions += 1
    finally:
        if not compile:
            model.clear_cache()


# ---- the compiled decode step ---------------------------------------------------------------------
#
# Decoding one token runs the whole model for a (B, 1) input. In eager mode each of its few hundred
# small ops costs Python and dispatch time; torch.compile traces the step once into one graph, fuses
# the elementwise work (norms, RoPE, SwiGLU) and calls the matmuls directly. Two things make the step
# traceable without graph breaks or recompiles:
# - a static cache: preallocated once, at a length rounded up to CACHE_BUCKET positions, and kept
#   between calls (a new cache would be a new module to guard on, so a new compilation);
# - kv_len: the step attends to all kv_len cache positions, masked, instead of 0..max(position), so
#   no shape depends on the positions' values.


CACHE_BUCKET = 256


def decode_step(model: Transformer, token: torch.Tensor, positions: torch.Tensor, kv_len: int,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """token: (B,) int64 at positions: (B,) (in cache rows `rows`, (B,); None: rows 0..B-1) -> next-token
    logits (B, V) float32."""
    return model(token[:, None], positions, kv_len=kv_len, cache_rows=rows)[:, -1]


def compiled_decode_step(model: Transformer, **options):
    """decode_step compiled with torch.compile(fullgraph=True) for this model, made once and kept on
    the model. The first call compiles (tens of seconds for a 1B model on a CPU); a call with another
    batch size or kv_len compiles once more, then dynamo treats the changed sizes as symbolic.
    options go to torch.compile (e.g. mode="reduce-overhead" for CUDA graphs, whose outputs are
    overwritten by the next call: callers clone what they keep)."""
    fn = getattr(model, "_compiled_decode_step", None)
    if fn is None:
        fn = torch.compile(decode_step, fullgraph=True, **options)
        model._compiled_decode_step = fn
    return fn


def static_cache(model: Transformer, batch_size: int, length: int, kv_cache_dtype: str | None = None) -> int:
    """Make sure the model has a KV cache of batch_size rows and at least `length` positions, storing
    kv_cache_dtype (default: the model's choice), reusing the present one if it fits; returns its
    length (the kv_len to decode with). A new cache of another kind means one more compilation."""
    length = min(-(-length // CACHE_BUCKET) * CACHE_BUCKET, model.config.max_seq_len)
    wanted = kv_cache_dtype or model.kv_cache_dtype or str(model_dtype(model)).removeprefix("torch.")
    if (model.cache_size is None or model.cache_size[0] != batch_size or model.cache_size[1] < length
            or model.cache.kv_cache_dtype != wanted):  # fmt: skip
        model.setup_cache(batch_size, length, kv_cache_dtype=kv_cache_dtype)
    return model.cache_size[1]


def warm_up(model: Transformer, batch_size: int, length: int, kv_cache_dtype: str | None = None) -> None:
    """Compile the decode step for this batch size and cache length now (by running it once), so that
    the first generated tokens do not pay for it. Writes only cache slots a prefill overwrites."""
    kv_len = static_cache(model, batch_size, length, kv_cache_dtype)
    device = model_device(model)
    # Inputs made as _decode_loop makes them (inference tensors, not aliased): anything else is a
    # different guard, so a second compilation.
    with torch.inference_mode():
        token = torch.zeros(batch_size, dtype=torch.long, device=device)
        positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        compiled_decode_step(model)(model, token, positions, kv_len)


def generate(
    model: Transformer,
    prompt_tokens: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_tokens: Iterable[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    logprobs: bool = False,
    compile: bool = False,
    kv_cache_dtype: str | None = None,
    prefill_chunk: int | None = PREFILL_CHUNK,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """New tokens for each prompt (a list of token-id lists), without the stop token.

    temperature 0 is greedy. stop_tokens=None means the checkpoint's stop tokens (model.stop_tokens,
    set by llama.load); [] disables stopping. With logprobs=True, also returns each token's
    log-probability under the model. kv_cache_dtype, prefill_chunk: as for stream.
    """
    tokens: list[list[int]] = [[] for _ in prompt_tokens]
    probs: list[list[float]] = [[] for _ in prompt_tokens]
    for step in stream(
        model, prompt_tokens, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop_tokens=stop_tokens, stop_strings=stop_strings,
        tokenizer=tokenizer, compile=compile, kv_cache_dtype=kv_cache_dtype, prefill_chunk=prefill_chunk,
    ):  # fmt: skip
        for t in step:
            tokens[t.row].append(t.id)
            probs[t.row].append(t.logprob)
    return (tokens, probs) if logprobs else tokens
