"""Continuous batching: one model and one KV-cache pool serve many generation requests at once.

    engine = Engine(model, tokenizer, max_batch_size=8, max_seq_len=2048)
    engine.start()
    ticket = engine.submit([Request(prompt_ids, max_tokens=64, sampling=SamplingParams(0.8))], sink)
    # sink(index, delta) is called from the engine thread each time request `index` has new text;
    # the last Delta of a request carries its finish_reason and Stats.
    ticket.cancel()   # a client went away: its slot is freed at the next step
    engine.stop()

The KV cache is set up once, as a pool of `max_batch_size` rows ("slots") of `max_seq_len`
positions: that is all the memory keys and values will ever take. A running sequence owns one slot.
One engine thread loops:

  1. admit: give waiting sequences free slots (and their cached prefixes, see below) and queue
     their prompts for prefill, several of similar length together, right-padded to the longest
     (model(prompts, start, cache_rows=slots)); each samples its first token from its own last
     prompt position once its prompt is in. The padding writes junk beyond a row's prompt, which the
     model never attends to (it lies past the row's position) and generation overwrites;
  2. prefill: one chunk of the queued prompts (see the prefill policy below);
  3. decode: one forward for all running sequences whose prompts are in: row b feeds its last token
     at its own position into its own slot (start_pos and cache_rows are (B,) tensors); each row is
     sampled with its own parameters and its own random generator;
  4. retire: a sequence that produced a stop token, completed a stop string, reached max_tokens or
     was cancelled frees its slot for the next admit. Its stale keys and values need no clearing: the
     model never attends past a row's current position, and the next prefill overwrites them.

A request that arrives while others decode joins at the next step instead of waiting for the batch to
drain, and leaves as soon as it is done (iteration-level scheduling, Yu et al., 2022, "Orca"). A step
costs about the same for 1 or 16 rows while decoding is bound by reading the weights, so throughput
grows with the number of rows. Sequences beyond max_batch_size wait in a FIFO queue (their queue
time is reported); beyond max_queue more, submit() refuses them with EngineFullError.

Exactness. Prefilled alone and decoded alone, a sequence computes exactly what llama.generate
computes for it (same forward calls, same sampling, the same seeded generator). In a busy batch each
row still attends only to its own slot, so the logits differ only by floating-point rounding: a
matmul over B rows may sum in another order than over 1, and attention runs over the batch's longest
row with the extra positions masked (float32: about 1e-6 relative). Greedy tokens are therefore the
same unless two logits tie to that precision.

LoRA adapters. A model holding several adapters (llama.training.lora) serves each request with
the adapter it names (Request.adapter; None: the base model). Rows of different adapters share the
same prefill and decode forwards: the base weights are read once per step for every row, and each
adapter adds its low-rank product s * B (A x) to its own rows only (lora.per_row_adapters). A
request computes what the model with only its adapter active computes, up to the same rounding as
any batch.

Prefill policy. Prefilling together pays where a forward is bound by reading the weights (a
prompt of 10 tokens costs about one decode step, so 16 short prompts alone cost 16 steps and
together about one). Where it is bound by compute (long prompts, CPUs), padding tokens cost as much
as real ones, so prompts are grouped by length: a group's real tokens are at least 2/3 of its padded
size, and it has at most max_prefill_tokens tokens to compute (or a single row). A group is
prefilled in chunks through the cache (llama.core.generation.ChunkedPrefill), so a prompt as long as
the pool's rows takes memory bounded by the chunk and the pool, not by its length. While sequences
decode, a step runs one chunk of at most prefill_chunk tokens (rows x positions) of one group, then
the decode step: a long prompt costs each running stream about one chunk's time per token instead of
stalling it for the whole prompt, and the prompt's own first token comes later by the decode steps
between its chunks. With nothing decoding there is nothing to interleave: a chunk is then up to
max(max_prefill_tokens, prefill_chunk) tokens. prefill_chunk=None restores the plain schedule:
every admitted prompt whole (max_prefill_tokens positions per forward) before the next decode step.
A row cancelled mid-prefill keeps its slot until its group's prefill ends (the forward still
writes it). Where the chunks fall changes only rounding (each chunk attends to the cache holding
everything before it), so chunked and one-shot prefill give the same greedy tokens up to ties.
(Chunked prefills interleaved with decodes: Agrawal et al., 2023, "SARATHI".)

Which group's chunk runs: the one with the fewest positions left (the first of those), so a short
prompt arriving behind a long one gets its first token without waiting for the long one, unless a
group has been passed over prefill_patience times (chunks of other groups run since it was
queued): such an overdue group goes first, the oldest overdue first, until it is done.
Shortest-first alone would let a steady stream of short prompts postpone a long one forever; with
the bound, a group's prefill ends at most prefill_patience chunks of others, plus those of the
groups that became overdue before it, after its own chunks (prefill_patience=0: arrival order).

Admission counts the tokens to compute, not whole prompts. Chunked, admitting computes nothing (the
chunks do, at their bounded pace), so each step admits waiting sequences in arrival order into every
free slot. Plain, what a step admits is prefilled before its decode step, so admission stops at
max_prefill_tokens tokens to compute (at least one sequence), a prompt's cached prefix (looked up
at admission) not counted. Stats.queue_time ends when a sequence's first prefill chunk runs.

Prefix caching (prefix_cache_tokens > 0; llama/serving/prefix_cache.py). When a prompt is in, its
whole blocks of prefix_block tokens are copied from its slot into a store of their own, keyed by
their tokens, everything before them and the request's adapter. An admitted prompt that begins with
stored blocks gets them copied into its slot and prefills only the rest, from that position (rows of
one forward may start at different positions). The last prompt token is always computed (it gives
the first new token); a request asking for prompt_logprobs is computed whole (those need every
position's logits). A stored block holds the bytes the first request computed, so a hit computes
what a miss computes up to the rounding of a different chunking. Stats.cached_tokens reports the
tokens taken from the store. When a sequence finishes (a stop or its length; not an error or a
cancel), the whole blocks of its prompt and generated tokens whose keys and values are in its slot
are stored too: the prompt and every token sampled but the last, which was never fed to the model
(when a stop token ended it, that token is the last one). The next turn of a chat repeats the
answer after the earlier prompt, and so finds the answer's blocks as well; decode steps computed
their keys and values one position at a time, which again differs from a miss only by rounding.

Compiled decode step (compile=True). The decode forward runs through torch.compile
(llama.core.generation.compiled_decode_step with dynamic=True): the batch size and the cache length
attended to are symbolic, so one graph serves a batch of 1 and one every larger batch, at any
length; warm_up() compiles both before start(). The step attends to the same positions as eager
(0 .. the longest row's). Not with per-request LoRA adapters (each batch's mix of adapters would be a
new graph) or dynamic NTK RoPE scaling (frequencies that change with the length); prefill stays
eager (its shapes change with every prompt).

Sampling a row. Each request's logits go through, in order: its logit_bias (added), OpenAI's
presence and frequency penalties (for token j generated c_j times so far, the logit drops by
c_j * frequency_penalty + (c_j > 0) * presence_penalty), the CTRL repetition penalty, the
constraint of a JSON response format (tokens that would break it are masked: see below), then
temperature, top-k, top-p and min-p. Reported log-probabilities are the model's own, before all of
these. max_tokens may be 0: the prompt is prefilled (for its prompt_logprobs) and nothing generated.

Constrained requests (Request.constraint, llama/serving/constrained.py). The token the request's
sampling picks from its unmasked row is checked first (a few bytes through the parser); only when
it breaks the grammar is the row masked to the allowed tokens and sampled again. For greedy
decoding and for temperature sampling this is exactly sampling from the masked distribution (a
rejected draw is followed by a draw from the rest, renormalised); with top-k, top-p or min-p, whose
cut depends on the mask, the row is always masked first. A constrained sequence ends as soon as
its value is complete and nothing can follow it.

Text. Each sequence has its own tokenizer.stream_decoder, so text never splits a UTF-8 character,
and text that might be the start of a stop string is held back until it is known not to be one
(llama/core/stops.py: linear in the text, whatever the stop strings' lengths).

Failures. Whatever goes wrong with one request (its sampling, decoding its text, checking its stop
strings, its receiver) ends that request alone with an "error" Delta, in one place (_fail); a failed
forward ends the requests that were in it. The engine thread goes on serving the others. Only a bug
in the scheduling itself ends the thread; then every request still in flight gets its "error"
Delta, submit() refuses new ones, and `state` says "failed".

Shutdown. drain(grace) stops admitting (submit() raises EngineStoppedError) and lets what was
already accepted run for up to `grace` seconds; whatever is left then ends with an "error" Delta
of kind "shutdown". stop() ends the thread.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..core.cache import KVCache
from ..core.device import model_device
from ..core.generation import (ChunkedPrefill, GenerationError, SamplingParams, apply_repetition_penalty, check_seed,
                               compiled_decode_step, sample)  # fmt: skip
from ..core.stops import StopMatcher
from ..core.tokenizer import check_vocabulary
from ..training import lora
from .prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


class EngineFullError(RuntimeError):
    """Every slot is busy and the waiting queue is full: try again later (HTTP 429)."""


class EngineStoppedError(RuntimeError):
    """The engine takes no requests: not started, draining for a shutdown, stopped, or its thread died."""


class ConstraintError(RuntimeError):
    """No token can continue a constrained output (the vocabulary cannot spell what it needs)."""


class ContextLengthError(GenerationError):
    """A prompt plus its max_tokens does not fit a slot of the KV-cache pool."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int):
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context
        super().__init__(
            f"this model's maximum context length is {context} tokens, but {prompt_tokens + max_tokens} were "
            f"requested ({prompt_tokens} in the prompt, {max_tokens} for the completion)"
        )


@dataclass(frozen=True)
class Request:
    """One sequence to generate.

    prompt: token ids (with BOS, or the chat format's ids). max_tokens: the most tokens to generate
    (0: none; the prompt is only scored). seed: any integer (reduced modulo 2**64), or None for a
    random one. stop: strings that end the text (the text stops before them). stop_tokens: ids that
    end it (None: the engine's, i.e. the checkpoint's; () disables them). logprobs: None, or k >= 0
    to report each token's log-probability under the model (before temperature and filtering, as
    llama.generate reports it) and the k most likely tokens. prompt_logprobs: None, or k >= 0 to
    report the same for every prompt token after the first (in the first Delta). logit_bias: token
    id -> a number in [-100, 100] added to its logit. presence_penalty, frequency_penalty: in
    [-2, 2], OpenAI's definitions. constraint: a llama.serving.constrained.TokenConstraint the
    output must follow.
    """

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams(temperature=0)
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_tokens: frozenset[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: Mapping[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    constraint: Any = None
    adapter: str | None = None  # a LoRA adapter of the model (llama.training.lora), or None: the base model


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability, the `top` k (id, logprob) alternatives, and `offset`:
    how many characters of the completion's text precede it."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    offset: int


@dataclass(frozen=True)
class PromptLogprob:
    """A prompt token and, for every token but the first, its log-probability given the ones before,
    its `rank` among all tokens (1: the most likely) and the `top` k (id, logprob) alternatives."""

    id: int
    logprob: float | None
    rank: int | None
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Stats:
    """Times in seconds from submit(): queue_time until the prefill started, time_to_first_token until
    the first token was sampled, latency until the sequence finished."""

    prompt_tokens: int
    completion_tokens: int
    queue_time: float
    time_to_first_token: float
    latency: float
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass(frozen=True)
class Delta:
    """What one sequence produced since its previous Delta: `text` (whole characters only), the `tokens`
    behind it (and their `logprobs` if requested, then that of the stop token that ended it, if one
    did; the first Delta also carries `prompt_logprobs` if requested). The last Delta has finish_reason "stop" (a stop
    token or string) or "length" (max_tokens), or "error" with an `error` message and its
    `error_kind` ("internal": something failed while generating it; "shutdown": the server is
    shutting down), and `stats`."""

    text: str
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    stats: Stats | None = None
    error: str | None = None
    error_kind: str | None = None
    prompt_logprobs: tuple[PromptLogprob, ...] | None = None


Sink = Callable[[int, Delta], None]


class Ticket:
    """The handle of one submit() call: cancel() drops its sequences (waiting ones at once, running
    ones at the next step) without further Deltas."""

    def __init__(self, engine: "Engine"):
        self._engine = engine
        self.cancelled = False

    def cancel(self) -> None:
        self._engine._cancel(self)


class _Sequence:
    """The engine's state of one Request while it waits or runs."""

    def __init__(self, request: Request, index: int, ticket: Ticket, sink: Sink, engine: "Engine"):
        self.request, self.index, self.ticket, self.sink = request, index, ticket, sink
        self.prompt = list(request.prompt)
        self.stop_tokens = engine.stop_tokens if request.stop_tokens is None else frozenset(request.stop_tokens)
        self.stops = StopMatcher(list(request.stop))
        seed = check_seed(request.seed)
        self.generator = torch.Generator(device=engine.device).manual_seed(random.randrange(2**64) if seed is None else seed)
        self.seen = None  # (1, V) bool: tokens present so far, for the repetition penalty
        if request.sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, engine.vocab_size, dtype=torch.bool, device=engine.device)
            self.seen[0, torch.tensor(self.prompt, device=engine.device)] = True
        self.bias = None  # (1, V) float32: the logit_bias, dense
        if request.logit_bias:
            self.bias = torch.zeros(1, engine.vocab_size, device=engine.device)
            self.bias[0, torch.tensor(list(request.logit_bias), device=engine.device)] = torch.tensor(
                list(request.logit_bias.values()), device=engine.device)  # fmt: skip
        self.counts = None  # (1, V) float32: how often each token was generated, for presence/frequency penalties
        if request.presence_penalty or request.frequency_penalty:
            self.counts = torch.zeros(1, engine.vocab_size, device=engine.device)
        self.state = request.constraint.start() if request.constraint is not None else None
        self.decoder = engine.tokenizer.stream_decoder(self.prompt)
        self.tokens: list[int] = []  # generated so far, without a stop token
        self.slot = -1
        self.prefilling = False  # its prompt is being written into its slot, chunk by chunk
        self.cached = 0  # leading prompt tokens taken from the prefix cache
        self.done = False  # its final Delta is decided (finished, failed or cancelled)
        self.position = 0  # where the next token fed to the model goes in the slot
        self.chars = 0  # characters decoded so far
        self.unsent_tokens: list[int] = []
        self.unsent_logprobs: list[TokenLogprob] = []
        self.unsent_prompt_logprobs: tuple[PromptLogprob, ...] | None = None
        self.submitted = time.perf_counter()
        self.started = self.first_token = None


class _Prefill:
    """The prompts of a group of sequences being written into their slots (llama.core.generation's
    ChunkedPrefill): each row's tokens after its cached prefix, right-padded, at positions from there.
    The rows that asked for prompt logprobs keep their chunks' logits, which those need whole."""

    def __init__(self, engine: "Engine", seqs: list[_Sequence]):
        self.seqs = seqs
        self.passed_over = 0  # chunks of other prefills run since it was queued (the prefill_patience bound)
        device = engine.device
        lengths = torch.tensor([len(s.prompt) - s.cached for s in seqs], device=device)  # (B,)
        ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long, device=device)  # (B, T)
        for b, seq in enumerate(seqs):
            ids[b, : len(seq.prompt) - seq.cached] = torch.tensor(seq.prompt[seq.cached :], device=device)
        rows = torch.tensor([s.slot for s in seqs], device=device)  # (B,)
        starts = [s.cached for s in seqs]
        start_pos = starts[0] if len(set(starts)) == 1 else torch.tensor(starts, device=device)  # (B,) if they differ
        self.pieces: dict[int, list[torch.Tensor]] = {b: [] for b, s in enumerate(seqs) if s.request.prompt_logprobs is not None}
        self.steps = ChunkedPrefill(engine.model, ids, lengths, chunk=engine.max_prefill_tokens, start_pos=start_pos,
                                    cache_rows=rows, on_logits=self._keep if self.pieces else None)  # fmt: skip

    def _keep(self, begin: int, chunk_logits: torch.Tensor) -> None:  # chunk_logits: (B, C, V)
        for b, kept in self.pieces.items():
            kept.append(chunk_logits[b])


class Engine:
    """Runs `model` for many requests at once with continuous batching (see the module docstring).

    `model` is a llama.Transformer, or anything with its `config`, `tok_embeddings` (for the device),
    `setup_cache(rows, positions)` and `model(tokens, start_pos, cache_rows=rows, keep=None) -> logits`
    (keep: Transformer.forward's). The
    engine owns the model's KV cache (setup_cache is called here): do not run llama.generate on the
    same model object while the engine lives. max_seq_len (default: the model's) bounds prompt +
    max_tokens of every request, and with max_batch_size the pool's memory. stop_tokens default to
    the model's (set by llama.load), else the tokenizer's. A tokenizer with more ids than the model
    has embeddings is refused (TokenizerMismatchError): it belongs to another checkpoint.
    kv_cache_dtype: how the pool stores keys and values ("int8", "fp8", a float dtype; default the
    model's choice, see llama/core/cache.py). A prompt is prefilled max_prefill_tokens positions per
    forward, so its memory is bounded by that and the pool, not by its length. prefill_chunk: the
    most prompt tokens prefilled per step while sequences decode (None: whole prompts before the
    next decode step); prefill_patience: how many chunks of other prefills a queued prefill lets go
    first before it goes first itself (see the module docstring's prefill policy; 0: arrival order);
    prefix_cache_tokens: positions of the prefix cache, in blocks of prefix_block
    (0: none); compile: the decode step through torch.compile (see the module docstring; call
    warm_up() before start() to compile it up front).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 max_queue: int = 64, max_prefill_tokens: int = 512, stop_tokens: Sequence[int] | None = None,
                 kv_cache_dtype: str | None = None, prefill_chunk: int | None = 256, prefill_patience: int = 16,
                 prefix_cache_tokens: int = 0, prefix_block: int = 16, compile: bool = False):  # fmt: skip
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be a non-negative integer, got {max_queue!r}")
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        if isinstance(max_prefill_tokens, bool) or not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be a positive integer, got {max_prefill_tokens!r}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
        if isinstance(prefill_patience, bool) or not isinstance(prefill_patience, int) or prefill_patience < 0:
            raise ValueError(f"prefill_patience must be a non-negative integer, got {prefill_patience!r}")
        if isinstance(prefix_cache_tokens, bool) or not isinstance(prefix_cache_tokens, int) or prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be a non-negative integer, got {prefix_cache_tokens!r}")
        in_process = isinstance(model, torch.nn.Module)  # not a proxy driving other processes (tensor parallelism)
        if (prefix_cache_tokens or compile) and not in_process:
            raise ValueError(f"{'prefix caching' if prefix_cache_tokens else 'compile'} needs the model in this process "
                             f"(an nn.Module), not a {type(model).__name__}")  # fmt: skip
        check_vocabulary(tokenizer, model.config.vocab_size)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.max_prefill_tokens = max_batch_size, max_queue, max_prefill_tokens
        self.prefill_chunk, self.prefill_patience = prefill_chunk, prefill_patience
        self.context_len = min(model.config.max_seq_len, max_seq_len or model.config.max_seq_len)
        self.vocab_size = model.config.vocab_size
        if stop_tokens is None:
            stop_tokens = getattr(model, "stop_tokens", None) or tokenizer.stop_tokens
        self.stop_tokens = frozenset(stop_tokens)
        self.device = model_device(model)
        # The engine thread's torch CPU threads: the constructing thread's count, set again on the engine
        # thread, whose OpenMP team is its own (llama.core.device.in_passing_thread says why it matters).
        self.threads = torch.get_num_threads()
        # Several LoRA adapters on one base: each row of a forward uses its request's adapter (or none).
        self.adapters = tuple(lora.adapter_names(model))
        model.setup_cache(max_batch_size, self.context_len, kv_cache_dtype=kv_cache_dtype)
        self.prefixes = None
        if prefix_cache_tokens:
            if not isinstance(getattr(model, "cache", None), KVCache):
                raise ValueError(f"prefix caching needs a model that keeps its KVCache in .cache (a llama.Transformer), "
                                 f"not a {type(model).__name__}")  # fmt: skip
            self.prefixes = PrefixCache(model.cache, tokens=prefix_cache_tokens, block=prefix_block)
        self._step_fn = None  # the compiled decode step, or None: eager
        if compile:
            scaling = model.config.rope_scaling
            if scaling is not None and scaling.kind == "dynamic":
                raise ValueError("compile does not support dynamic NTK RoPE scaling (its frequencies change with the length)")
            if self.adapters:
                raise ValueError(f"compile does not support per-request LoRA adapters ({', '.join(self.adapters)}): each "
                                 "batch's mix of adapters would be a new graph")  # fmt: skip
            # dynamic=True: the batch size and the cache length attended to are symbolic from the start,
            # so the graphs are one for a batch of 1 (torch specialises size 1) and one for all others.
            self._step_fn = compiled_decode_step(model, dynamic=True)

        self._free = list(range(max_batch_size - 1, -1, -1))  # free slots; pop() gives the lowest
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # every sequence holding a slot; touched by the engine thread only
        self._prefills: list[_Prefill] = []  # prompts being written into their slots, chunk by chunk
        self._in_flight = 0  # waiting + running sequences
        self._wake = threading.Condition()  # guards _waiting, _in_flight, _stopping, _drain_deadline
        self._stopping = False
        self._drain_deadline: float | None = None  # time.monotonic() after which what is left is ended
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what killed the engine thread, if anything
        # prefills: sequences prefilled, in prefill_batches forwards; decode_rows: rows over all decode steps
        # prefill_tokens: computed (not taken from the prefix cache); prefill_chunks: prefill forwards
        self.counters = dict(prefills=0, prefill_batches=0, prefill_tokens=0, prefill_chunks=0, decode_steps=0,
                             decode_rows=0, generated_tokens=0, finished=0, cancelled=0, rejected=0, errors=0,
                             prefix_cache_hits=0, prefix_cache_hit_tokens=0)  # fmt: skip

    # ---- the caller's side (any thread) ------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
            self._thread.start()

    def warm_up(self) -> float:
        """With compile: compile the decode step's graphs now, before start(), so that the first requests
        do not wait for them: one for a batch of 1 and, with max_batch_size > 1, one for every larger
        batch (torch specialises size 1). Returns the seconds it took (0 without compile). Writes only
        cache positions that a prefill overwrites."""
        if self._step_fn is None:
            return 0.0
        if self._thread is not None:
            raise RuntimeError("warm_up() must run before start(): the engine thread owns the model")
        started = time.perf_counter()
        with torch.inference_mode():  # inputs made as _decode makes them: anything else is another guard
            for rows in sorted({1, min(2, self.max_batch_size)}):
                tokens = torch.tensor([[0]] * rows, device=self.device)  # (B, 1)
                positions = torch.tensor([1] * rows, device=self.device)  # (B,)
                slots = torch.tensor(list(range(rows)), device=self.device)  # (B,)
                self._step_fn(self.model, tokens[:, 0], positions, 2, slots)
        return time.perf_counter() - started

    def stop(self, timeout: float | None = 30) -> None:
        """End the engine thread; sequences still waiting or running get a final "error" Delta."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, grace: float) -> None:
        """Begin a graceful shutdown: admit nothing new, let what was accepted run for up to `grace`
        seconds, then end what is left with an "error" Delta of kind "shutdown"."""
        with self._wake:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + grace
            self._wake.notify()

    @property
    def alive(self) -> bool:
        """The thread runs and admits requests."""
        return self.state == "running"

    @property
    def state(self) -> str:
        """"running", "draining" (shutting down: finishing what it has), "stopped", "failed" (its thread
        died of a bug: see `error`) or "not started"."""
        if self.error is not None:
            return "failed"
        if self._thread is None:
            return "not started"
        if self._stopping or not self._thread.is_alive():
            return "stopped"
        return "draining" if self._drain_deadline is not None else "running"

    def submit(self, requests: Sequence[Request], sink: Sink) -> Ticket:
        """Queue `requests` (all or none); sink(i, delta) then receives the Deltas of requests[i],
        called from the engine thread (keep it short: hand the delta to another thread)."""
        for i, r in enumerate(requests):
            self._check(r, i)
        ticket = Ticket(self)
        sequences = [_Sequence(r, i, ticket, sink, self) for i, r in enumerate(requests)]
        with self._wake:
            if not self.alive:
                state = self.state
                reason = {"draining": "the server is shutting down", "failed": f"the engine failed: {self.error}"}
                raise EngineStoppedError(reason.get(state, f"the engine is {state}") + "; it accepts no new requests")
            capacity = self.max_batch_size + self.max_queue
            if self._in_flight + len(sequences) > capacity:
                self.counters["rejected"] += 1
                raise EngineFullError(
                    f"the server is at capacity ({self._in_flight} sequences running or waiting, at most "
                    f"{capacity}); {len(sequences)} more do not fit, retry later"
                )
            self._waiting.extend(sequences)
            self._in_flight += len(sequences)
            self._wake.notify()
        return ticket

    def stats(self) -> dict:
        with self._wake:
            waiting, in_flight = len(self._waiting), self._in_flight
        steps = self.counters["decode_steps"]
        return dict(
            alive=self.alive, state=self.state, max_batch_size=self.max_batch_size, max_queue=self.max_queue,
            context_len=self.context_len, running=in_flight - waiting, waiting=waiting, **self.counters,
            mean_batch=round(self.counters["decode_rows"] / steps, 2) if steps else 0.0,
        )  # fmt: skip

    def _check(self, r: Request, index: int) -> None:
        if not isinstance(r.sampling, SamplingParams):
            raise GenerationError(f"request {index}: sampling must be a SamplingParams, got {type(r.sampling).__name__}")
        if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, int) or r.max_tokens < 0:
            raise GenerationError(f"request {index}: max_tokens must be a non-negative integer, got {r.max_tokens!r}")
        if not r.prompt:
            raise GenerationError(f"request {index}: the prompt is empty; it needs at least one token (e.g. BOS)")
        vocab = self.tokenizer.vocab_size  # the ids that mean something (<= the model's rows)
        bad = [t for t in r.prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"request {index}: prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(r.prompt) + r.max_tokens > self.context_len:
            raise ContextLengthError(len(r.prompt), r.max_tokens, self.context_len)
        if isinstance(r.stop, str) or not all(isinstance(s, str) and s for s in r.stop):
            raise GenerationError(f"request {index}: stop must be a list of non-empty strings, got {r.stop!r:.200}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(r, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= vocab):
                raise GenerationError(f"request {index}: {name} must be None or an integer in [0, {vocab}], got {k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(r, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise GenerationError(f"request {index}: {name} must be a number in [-2, 2], got {value!r:.40}")
        bias = r.logit_bias or {}
        bad = [(t, b) for t, b in bias.items() if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
               or isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100]  # fmt: skip
        if bad:
            raise GenerationError(f"request {index}: logit_bias maps token ids in [0, {vocab}) to numbers in [-100, 100], "
                                  f"got {bad[0][0]!r:.40}: {bad[0][1]!r:.40}")  # fmt: skip
        if r.constraint is not None and r.constraint.minimum_tokens() > r.max_tokens:
            raise GenerationError(f"request {index}: max_tokens {r.max_tokens} is too small for the response format: "
                                  f"its shortest output may take {r.constraint.minimum_tokens()} tokens")  # fmt: skip
        try:
            check_seed(r.seed)
        except GenerationError as e:
            raise GenerationError(f"request {index}: {e}") from None
        if r.adapter is not None and r.adapter not in self.adapters:
            raise GenerationError(f"request {index}: no adapter named {r.adapter!r}; the model has {list(self.adapters)}")

    def _cancel(self, ticket: Ticket) -> None:
        with self._wake:
            if ticket.cancelled:
                return
            ticket.cancelled = True
            dropped = [s for s in self._waiting if s.ticket is ticket]
            for s in dropped:
                self._waiting.remove(s)
            self._in_flight -= len(dropped)
            self.counters["cancelled"] += len(dropped)
            self._wake.notify()  # running ones are retired by the engine thread

    # ---- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            torch.set_num_threads(self.threads)
            with torch.inference_mode():
                while (admitted := self._next_admissions()) is not None:
                    self._admit(admitted)
                    self._retire_cancelled()
                    self._prefill_step()
                    if any(not s.prefilling for s in self._running):
                        self._decode()
                    self._end_overdue()
        except BaseException as e:  # a bug in the scheduling itself: fail everyone rather than hang them
            logger.exception("engine thread failed")
            self.error = e
        finally:
            with self._wake:
                self._stopping = True
                left = self._running + list(self._waiting)
                self._waiting.clear()
            kind = "internal" if self.error else "shutdown"
            for seq in left:
                self._fail(seq, f"the engine stopped: {self.error or 'the server is shutting down'}", kind)

    def _next_admissions(self) -> list[_Sequence] | None:
        """Sleep until there is work; the waiting sequences to admit now, in arrival order, as many as
        there are free slots and, in the plain schedule, as max_prefill_tokens tokens to compute allow
        (at least one). None: stop."""
        with self._wake:
            while not self._stopping and not self._running and not self._waiting:
                self._wake.wait()
            if self._stopping:
                return None
            admitted, tokens = [], 0
            while self._waiting and len(admitted) < len(self._free):
                if self.prefill_chunk is None:  # prefilled whole before the next decode step: bounded
                    tokens += self._to_compute(self._waiting[0])
                    if admitted and tokens > self.max_prefill_tokens:
                        break
                admitted.append(self._waiting.popleft())
            return admitted

    def _to_compute(self, seq: _Sequence) -> int:
        """The prompt tokens `seq`'s prefill will compute: those after its cached prefix (as _admit will
        find it: nothing is stored between this look and that one, both on the engine thread)."""
        if self.prefixes is None or seq.request.prompt_logprobs is not None:
            return len(seq.prompt)
        return len(seq.prompt) - self.prefixes.peek(seq.prompt, seq.request.adapter, limit=len(seq.prompt) - 1)

    def _end_overdue(self) -> None:
        """Draining, past the grace period: end everything still waiting or running."""
        with self._wake:
            if self._drain_deadline is None or time.monotonic() < self._drain_deadline:
                return
            left = self._running + list(self._waiting)
            self._waiting.clear()
        for seq in left:
            self._fail(seq, "the server is shutting down; its grace period ended before this request finished",
                       "shutdown")  # fmt: skip

    def _admit(self, seqs: list[_Sequence]) -> None:
        """Give `seqs` slots, their cached prefixes, and a place in the prefill queue, in groups."""
        for seq in [s for s in seqs if s.ticket.cancelled]:  # cancelled between the queue and here
            self._release(seq, cancelled=True)
        seqs = [s for s in seqs if not s.ticket.cancelled]
        for seq in seqs:
            seq.slot, seq.prefilling = self._free.pop(), True
            self._running.append(seq)
        blocks = {}
        if self.prefixes is not None:
            for seq in seqs:
                # Prompt logprobs need every prompt position's logits: such a prompt is computed whole.
                if seq.request.prompt_logprobs is None:
                    blocks[seq] = self.prefixes.lookup(seq.prompt, seq.request.adapter, limit=len(seq.prompt) - 1)
                    seq.cached = len(blocks[seq]) * self.prefixes.block
        for group in self._prefill_groups(seqs):
            try:
                for seq in group:
                    if blocks.get(seq):
                        self.prefixes.load(blocks[seq], seq.slot)
                self._prefills.append(_Prefill(self, group))
            except Exception as e:  # e.g. out of memory for the padded prompts
                self._end_prefill(group, f"prefill failed: {type(e).__name__}: {e}")

    def _prefill_groups(self, seqs: list[_Sequence]) -> list[list[_Sequence]]:
        """`seqs` in groups of similar length still to compute (the prompt less its cached prefix):
        real tokens >= 2/3 of each group's padded size, at most max_prefill_tokens of them (or one
        row), and every row's padding inside its slot."""
        groups: list[list[_Sequence]] = []
        for seq in sorted(seqs, key=lambda s: len(s.prompt) - s.cached):
            n = len(seq.prompt) - seq.cached  # the longest of the group so far: its padded length
            group = groups[-1] if groups else None
            real = sum(len(s.prompt) - s.cached for s in group) + n if group else n
            if (group and 3 * real >= 2 * (len(group) + 1) * n and real <= self.max_prefill_tokens
                    and max(s.cached for s in group) + n <= self.context_len):  # fmt: skip
                group.append(seq)
            else:
                groups.append([seq])
        return groups

    def _prefill_step(self) -> None:
        """Prefill work of one step. Interleaved (prefill_chunk set): one forward of at most
        prefill_chunk tokens (rows x positions) while sequences decode, else of max_prefill_tokens,
        for the oldest prefill passed over prefill_patience times, else the one with the fewest
        positions left; the decode step follows. Not interleaved: every admitted prompt whole
        (max_prefill_tokens positions per forward) before the next decode step."""
        for job in [j for j in self._prefills if all(s.done for s in j.seqs)]:  # all cancelled or failed
            self._prefills.remove(job)
            self._end_prefill(job.seqs)
        if not self._prefills:
            return
        if self.prefill_chunk is None:
            while self._prefills:
                job = self._prefills[0]
                while job in self._prefills:
                    self._prefill_chunk(job, self.max_prefill_tokens)
            return
        overdue = [j for j in self._prefills if j.passed_over >= self.prefill_patience]  # in arrival order
        job = overdue[0] if overdue else min(self._prefills, key=lambda j: j.steps.length - j.steps.begin)
        for other in self._prefills:
            if other is not job:
                other.passed_over += 1
        decoding = any(not s.prefilling for s in self._running)
        budget = self.prefill_chunk if decoding else max(self.max_prefill_tokens, self.prefill_chunk)
        self._prefill_chunk(job, max(1, budget // len(job.seqs)))

    def _prefill_chunk(self, job: "_Prefill", positions: int) -> None:
        """Run the next `positions` of `job`; once its prompts are all in, their first tokens."""
        if job.steps.begin == 0:  # its queue time ends here
            now = time.perf_counter()
            for seq in job.seqs:
                seq.started = now
        try:
            with self._adapters(job.seqs):
                job.steps.step(positions)
        except Exception as e:  # e.g. out of memory for long prompts: these requests fail, others go on
            self._prefills.remove(job)
            self._end_prefill(job.seqs, f"prefill failed: {type(e).__name__}: {e}")
            return
        self.counters["prefill_chunks"] += 1
        if not job.steps.done:
            return
        self._prefills.remove(job)
        seqs = [s for s in job.seqs if not s.done]
        logits = job.steps.logits
        try:
            for b, seq in enumerate(job.seqs):
                if b in job.pieces and not seq.done:
                    seq.unsent_prompt_logprobs = self._prompt_logprobs(seq, torch.cat(job.pieces[b])[: len(seq.prompt) - 1])
            if self.prefixes is not None:
                for seq in seqs:
                    self.prefixes.store(seq.prompt, seq.request.adapter, seq.slot)
        except Exception as e:
            self._end_prefill(job.seqs, f"prefill failed: {type(e).__name__}: {e}")
            return
        self._end_prefill(job.seqs)
        self.counters["prefills"] += len(seqs)
        self.counters["prefill_batches"] += 1
        self.counters["prefill_tokens"] += sum(len(s.prompt) - s.cached for s in seqs)
        self.counters["prefix_cache_hits"] += sum(1 for s in seqs if s.cached)
        self.counters["prefix_cache_hit_tokens"] += sum(s.cached for s in seqs)
        for seq in seqs:
            seq.position = len(seq.prompt)
        for seq in seqs:
            if seq.request.max_tokens == 0:  # only the prompt was wanted
                self._finish(seq, "length", "")
            elif seq.unsent_prompt_logprobs is not None:  # sent now, before the first token (which may show no text)
                self._emit(seq, self._delta(seq, ""))
        generating = [b for b, s in enumerate(job.seqs) if not s.done]
        if generating:
            self._advance([job.seqs[b] for b in generating], logits[generating])

    def _end_prefill(self, seqs: list[_Sequence], error: str | None = None) -> None:
        """The prefill of `seqs` is over: those that finished (cancelled) meanwhile give their slots
        back now; with `error`, the others fail."""
        for seq in seqs:
            seq.prefilling = False
            if seq.done:
                self._free_slot(seq)
            elif error is not None:
                self._fail(seq, error)

    def _prompt_logprobs(self, seq: _Sequence, logits: torch.Tensor) -> tuple[PromptLogprob, ...]:
        """logits: (T - 1, V), the predictions for prompt tokens 1..T-1."""
        k = seq.request.prompt_logprobs
        logprobs = torch.log_softmax(logits[:, : self.tokenizer.vocab_size], dim=-1)  # (T-1, V)
        targets = torch.tensor(seq.prompt[1:], device=self.device)
        chosen = logprobs.gather(-1, targets[:, None])  # (T-1, 1)
        ranks = (logprobs > chosen).sum(-1) + 1  # (T-1,)
        top = torch.topk(logprobs, k) if k else None
        out = [PromptLogprob(seq.prompt[0], None, None, ())]
        for i, (token, lp, rank) in enumerate(zip(seq.prompt[1:], chosen[:, 0].tolist(), ranks.tolist())):
            alternatives = tuple(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else ()
            out.append(PromptLogprob(token, lp, rank, alternatives))
        return tuple(out)

    def _decode(self) -> None:
        # In slot order: free slots are handed out lowest first, so a full batch holds consecutive
        # cache rows, which the model reads in place instead of gathering them every layer
        # (llama.core.cache.consecutive_rows).
        seqs = sorted((s for s in self._running if not s.prefilling), key=lambda s: s.slot)
        try:
            tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)  # (B, 1)
            positions = torch.tensor([s.position for s in seqs], device=self.device)  # (B,)
            rows = torch.tensor([s.slot for s in seqs], device=self.device)  # (B,)
            if self._step_fn is not None:  # attends to the same positions as eager: 0 .. the longest row's
                kv_len = max(s.position for s in seqs) + 1
                logits = self._step_fn(self.model, tokens[:, 0], positions, kv_len, rows).clone()  # (B, V)
            else:
                with self._adapters(seqs):
                    logits = self.model(tokens, positions, cache_rows=rows)[:, -1]  # (B, V)
        except Exception as e:
            for s in seqs:
                self._fail(s, f"decode failed: {type(e).__name__}: {e}")
            return
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(seqs)
        for s in seqs:
            s.position += 1
        self._advance(seqs, logits)

    def _adapters(self, seqs: list[_Sequence]):
        """Row b of the next forward uses the adapter of seqs[b]'s request: the base projections run
        once for every row, each adapter adds its low-rank product to its own rows only."""
        if not self.adapters:
            return contextlib.nullcontext()
        return lora.per_row_adapters(self.model, [s.request.adapter for s in seqs])

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token for each of `seqs` from its row of logits: (B, V) float32, and act on it.
        Whatever fails for one row ends that row's request alone."""
        if self.tokenizer.vocab_size < logits.shape[-1]:  # ids the tokenizer could not decode
            logits[:, self.tokenizer.vocab_size :] = float("-inf")
        greedy = logits.argmax(dim=-1).tolist()  # (B,)
        for b, seq in enumerate(seqs):
            try:
                token, info = self._sample(seq, logits[b : b + 1], greedy[b])
                self._accept(seq, token, info)
            except Exception as e:  # a sampler or tokenizer failure, a broken model row
                self._fail(seq, f"{type(e).__name__}: {e}")

    def _sample(self, seq: _Sequence, row: torch.Tensor, greedy: int) -> tuple[int, TokenLogprob | None]:
        """The next token from `row`: (1, V) logits, and its logprob info if the request wants it."""
        request = seq.request
        params, k = request.sampling, request.logprobs
        logprobs = torch.log_softmax(row[0], dim=-1) if k is not None else None  # (V,), the model's own
        adjusted = seq.bias is not None or seq.counts is not None or seq.seen is not None
        if seq.bias is not None:
            row = row + seq.bias
        if seq.counts is not None:
            row = row - seq.counts * request.frequency_penalty - (seq.counts > 0).float() * request.presence_penalty
        if seq.seen is not None:
            row = apply_repetition_penalty(row, seq.seen, params.repetition_penalty)

        def pick(row: torch.Tensor) -> int:
            if params.temperature == 0:
                return greedy if not adjusted and row is original else int(row.argmax(dim=-1))
            return int(sample(row, params, seq.generator))

        original = row
        if request.constraint is None:
            token = pick(row)
        else:
            token = self._constrained(seq, row, pick)
        if seq.seen is not None:
            seq.seen[0, token] = True
        if logprobs is None:
            return token, None
        top = torch.topk(logprobs, k) if k else None
        alternatives = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        return token, TokenLogprob(token, float(logprobs[token]), alternatives, seq.chars)

    def _constrained(self, seq: _Sequence, row: torch.Tensor, pick: Callable[[torch.Tensor], int]) -> int:
        """A token the request's constraint allows (see the module docstring), its state advanced."""
        constraint, params = seq.request.constraint, seq.request.sampling
        budget = seq.request.max_tokens - len(seq.tokens) - 1  # tokens that may follow this one
        truncating = params.temperature != 0 and (params.top_k is not None or params.top_p < 1 or bool(params.min_p))
        token = None if truncating else pick(row)
        state = None if token is None else constraint.advance(seq.state, token, budget, seq.stop_tokens)
        if state is None:
            allowed = constraint.allowed(seq.state, budget, seq.stop_tokens).to(row.device)  # (V,)
            if not bool(allowed.any()):
                raise ConstraintError("no token can continue the response format's output")
            token = pick(row.masked_fill(~allowed, float("-inf")))
            state = constraint.advance(seq.state, token, budget, seq.stop_tokens)
            assert state is not None, "a token the mask allowed was refused"
        seq.state = state
        return token

    def _accept(self, seq: _Sequence, token: int, info: TokenLogprob | None) -> None:
        if seq.first_token is None:
            seq.first_token = time.perf_counter()
        if token in seq.stop_tokens:  # not part of the text, but of the logprobs (as OpenAI reports <|endoftext|>)
            if info is not None:
                seq.unsent_logprobs.append(info)
            self._finish(seq, "stop", "")
            return
        self.counters["generated_tokens"] += 1
        seq.tokens.append(token)
        seq.unsent_tokens.append(token)
        if info is not None:
            seq.unsent_logprobs.append(info)
        if seq.counts is not None:
            seq.counts[0, token] += 1
        new = seq.decoder.push(token)
        seq.chars += len(new)
        text, hit = seq.stops.push(new)
        if hit:
            self._finish(seq, "stop", text, flush=False)
        elif seq.state is not None and seq.request.constraint.finished(seq.state):  # nothing may follow the value
            self._finish(seq, "stop", text)
        elif len(seq.tokens) >= seq.request.max_tokens:
            self._finish(seq, "length", text)
        elif text:
            self._emit(seq, self._delta(seq, text))

    def _delta(self, seq: _Sequence, text: str, **final) -> Delta:
        logprobs = tuple(seq.unsent_logprobs) if seq.request.logprobs is not None else None
        delta = Delta(text, tuple(seq.unsent_tokens), logprobs, prompt_logprobs=seq.unsent_prompt_logprobs, **final)
        seq.unsent_tokens, seq.unsent_logprobs, seq.unsent_prompt_logprobs = [], [], None
        return delta

    def _finish(self, seq: _Sequence, reason: str, text: str, flush: bool = True) -> None:
        if flush:  # the end of the text: release what was held back (an unfinished character, a stop-string prefix)
            more, hit = seq.stops.push(seq.decoder.flush(), final=True)
            text += more
            reason = "stop" if hit else reason
        if self.prefixes is not None and seq.position > len(seq.prompt):
            self._store_generated(seq)
        self._release(seq)
        self.counters["finished"] += 1
        self._emit(seq, self._delta(seq, text, finish_reason=reason, stats=self._stats(seq)))

    def _store_generated(self, seq: _Sequence) -> None:
        """Keep the whole blocks of `seq`'s prompt and generated tokens for a later request that repeats
        them (the next turn of a chat). Its slot holds keys and values for positions 0 .. position - 1:
        the prompt and every generated token fed back, i.e. all but the last sampled (never fed)."""
        assert len(seq.prompt) < seq.position <= len(seq.prompt) + len(seq.tokens), "keys and values it never wrote"
        try:
            self.prefixes.store(seq.prompt + seq.tokens, seq.request.adapter, seq.slot, length=seq.position)
        except Exception:  # the request itself succeeded: only later ones lose this reuse
            logger.exception("storing a finished sequence's blocks in the prefix cache failed")

    def _fail(self, seq: _Sequence, message: str, kind: str = "internal") -> None:
        """End one request with an "error" Delta: the one place where a request fails. An internal
        failure is logged with its traceback (it is a bug or a broken device); a shutdown is not."""
        if kind == "internal":
            logger.error("request failed: %s", message, exc_info=sys.exc_info()[0] is not None)
        if seq.done:  # it already had its final Delta (it failed while being sent)
            return
        self.counters["errors"] += 1
        self._release(seq)
        self._emit(seq, self._delta(seq, "", finish_reason="error", stats=self._stats(seq), error=message,
                                    error_kind=kind))  # fmt: skip

    def _stats(self, seq: _Sequence) -> Stats:
        now = time.perf_counter()
        return Stats(len(seq.prompt), len(seq.tokens), (seq.started or now) - seq.submitted,
                     (seq.first_token or now) - seq.submitted, now - seq.submitted, seq.cached)  # fmt: skip

    def _release(self, seq: _Sequence, cancelled: bool = False) -> None:
        """Take `seq` out of the running set (or the queue's count) and give its slot back."""
        assert not seq.done, "a sequence released twice"
        seq.done = True
        if seq in self._running:
            self._running.remove(seq)
        if not seq.prefilling:  # else its prefill still writes the slot: freed when that ends (_end_prefill)
            self._free_slot(seq)
        with self._wake:
            self._in_flight -= 1
            if cancelled:
                self.counters["cancelled"] += 1

    def _free_slot(self, seq: _Sequence) -> None:
        if seq.slot >= 0:
            self._free.append(seq.slot)
            self._free.sort(reverse=True)
            seq.slot = -1

    def _retire_cancelled(self) -> None:
        for seq in [s for s in self._running if s.ticket.cancelled]:
            self._release(seq, cancelled=True)

    def _emit(self, seq: _Sequence, delta: Delta) -> None:
        if seq.ticket.cancelled:
            return
        try:
            seq.sink(seq.index, delta)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop generating for it
            logger.exception("a sink failed; cancelling its request")
            seq.ticket.cancelled = True


def token_text(tokenizer, token_id: int) -> str:
    """A token as text for logprobs: its characters, or `bytes:\\xNN...` when its bytes are not whole
    UTF-8 characters (OpenAI's convention)."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
