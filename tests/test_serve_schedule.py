"""The server engine's schedule (llama/serving/engine.py): chunked prefill interleaved with decode
steps, the prefix cache (llama/serving/prefix_cache.py), and the compiled decode step.

Expected tokens come from llama.generate on a second copy of the model, run alone with the whole
prompt prefilled in one forward. The model is a tiny random float32 one with large weights (peaked
logits: greedy and seeded sampling do not hinge on rounding) and the bundled tokenizer. The order of
prefill chunks and decode steps is read from a forward hook on the engine's model and the sink, both
called on the engine thread, never from clocks.
"""

from __future__ import annotations

import copy
import shutil
import threading
from pathlib import Path

import pytest
import torch
from random_models import random_model

import llama
from llama import ModelConfig
from llama.core.generation import SamplingParams, compiled_decode_step, generate, stream
from llama.serving.engine import Engine, Request
from llama.serving.prefix_cache import PrefixCache
from llama.training import lora

torch.set_num_threads(1)

KJV = Path(__file__).parents[1] / "weights" / "kjv"
CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, ffn_dim=64, max_seq_len=512)
NO_STOP = frozenset()


@pytest.fixture(scope="module")
def tokenizer():
    return llama.load_tokenizer(KJV)


@pytest.fixture(scope="module")
def ref():
    return random_model(CONFIG)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = [1] + ids(200, 0)  # a shared "system prompt" of 201 tokens


def alone(model, prompt, n, **sampling) -> list[int]:
    sampling.setdefault("temperature", 0)
    return generate(model, [prompt], n, stop_tokens=[], prefill_chunk=None, **sampling)[0]


def alone_logprobs(model, prompt, n, **sampling) -> list[float]:
    """The model's log-probability of each token llama.generate picks (as the engine reports them)."""
    sampling.setdefault("temperature", 0)
    return [t.logprob for step in stream(model, [prompt], n, stop_tokens=[], prefill_chunk=None, **sampling) for t in step]


def run(engine: Engine, requests: list[Request]) -> tuple[list[list[int]], list, list[list[float]]]:
    """Token ids, final Stats and reported logprobs (if asked for) of each request, submitted together to
    a started engine."""
    out, stats, done = [[] for _ in requests], [None] * len(requests), threading.Event()
    logprobs = [[] for _ in requests]

    def sink(i, delta):
        assert delta.error is None, delta.error
        out[i] += delta.tokens
        logprobs[i] += [t.logprob for t in delta.logprobs or ()]
        if delta.finish_reason is not None:
            stats[i] = delta.stats
            if all(s is not None for s in stats):
                done.set()

    engine.submit(requests, sink)
    assert done.wait(300)
    return out, stats, logprobs


@pytest.fixture
def started():
    engines = []

    def start(model=None, **options):
        engine = Engine(model if model is not None else random_model(CONFIG), llama.load_tokenizer(KJV), **options)
        engine.start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop()


# ---- chunked prefill ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_chunked_prefill_gives_the_tokens_of_one_shot_prefill(started, ref, chunk):
    prompts = [SYSTEM + ids(n, n) for n in (3, 40, 5)] + [[1] + ids(90, 9)]
    engine = started(max_batch_size=4, prefill_chunk=chunk, max_prefill_tokens=48)
    got, _, _ = run(engine, [Request(p, 10, stop_tokens=NO_STOP) for p in prompts])
    assert got == [alone(ref, p, 10) for p in prompts]
    # 201-token prompts in rows of <= 48 positions per forward (chunk 7: 1 to 7 positions a step)
    assert engine.stats()["prefill_chunks"] >= 5


def test_prompt_logprobs_survive_chunking(started, ref):
    prompt = [1] + ids(50, 3)
    with torch.no_grad():
        logits = ref(torch.tensor([prompt]))[0, :-1]  # (T-1, V): the whole prompt in one forward, no cache
    wanted = torch.log_softmax(logits, -1).gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    deltas = []
    engine = started(max_batch_size=1, prefill_chunk=8)
    done = threading.Event()
    engine.submit([Request(prompt, 1, prompt_logprobs=0)], lambda i, d: (deltas.append(d), d.finish_reason and done.set()))
    assert done.wait(60)
    got = torch.tensor([p.logprob for p in deltas[0].prompt_logprobs[1:]])
    torch.testing.assert_close(got, wanted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [16, None])
def test_a_running_stream_keeps_receiving_tokens_while_a_long_prompt_prefills(started, ref, chunk):
    short, long = [1] + ids(4, 1), [1] + ids(300, 2)
    engine = started(max_batch_size=2, prefill_chunk=chunk, max_prefill_tokens=64)
    # Each forward as (rows, positions, tokens generated so far by the engine): a forward hook runs on the
    # engine thread, so these are in the engine's own order.
    forwards = []
    engine.model.register_forward_hook(
        lambda module, args, out: forwards.append((*args[0].shape, engine.stats()["generated_tokens"])))
    outs, long_sent, finished = {0: [], 1: []}, threading.Event(), threading.Event()
    short_started = threading.Event()

    def sink(name):
        def receive(i, delta):
            outs[name] += delta.tokens
            if name == 0 and not long_sent.is_set():
                short_started.set()
                assert long_sent.wait(30)  # the short stream has begun: hold the engine until the long prompt is queued
            if delta.finish_reason is not None and name == 1:
                finished.set()
        return receive

    engine.submit([Request(short, 60, stop_tokens=NO_STOP)], sink(0))
    # The long prompt goes in only once the engine is held in the short stream's first token: submitted
    # earlier, it could be admitted together with the short one, in one prefill.
    assert short_started.wait(30)
    engine.submit([Request(long, 3, stop_tokens=NO_STOP)], sink(1))
    long_sent.set()
    assert finished.wait(120)
    engine.stop()
    assert outs[1] == alone(ref, long, 3) and outs[0] == alone(ref, short, 60)[: len(outs[0])]
    chunks = [i for i, (B, T, _) in enumerate(forwards) if T > 1][1:]  # the long prompt's (the first: the short one's)
    generated = [forwards[i][2] for i in chunks]
    if chunk is None:  # not interleaved: the whole prompt, 64 positions a forward, with no decode step between
        assert [forwards[i][1] for i in chunks] == [64, 64, 64, 64, 45]
        assert chunks == list(range(chunks[0], chunks[0] + 5)) and len(set(generated)) == 1
    else:  # a chunk of 16 positions, then a decode step of the short stream, which gets one more token
        assert [forwards[i][1] for i in chunks] == [16] * 18 + [13]
        assert all(forwards[i + 1][:2] == (1, 1) for i in chunks[:-1])
        assert generated == list(range(generated[0], generated[0] + 19))


def test_a_prompt_cancelled_mid_prefill_keeps_its_slot_until_its_group_stops_writing_it(started, ref):
    """Two long prompts prefilled together; one is cancelled after 3 chunks. Its slot is taken back only
    when the group's prefill ends: a request given it earlier would have its keys and values
    overwritten by the group's next chunks."""
    # late: shorter than what the group has left when it arrives, so it is prefilled first, and longer
    # than where the group's chunks then write: in the cancelled row's slot, those would overwrite it.
    short, late = [1] + ids(4, 1), [1] + ids(119, 3)
    longs = [[1] + ids(200, 2), [1] + ids(200, 4)]
    engine = started(max_batch_size=3, prefill_chunk=32)  # two rows: 16 positions a chunk
    chunks, tickets, outs, done = [], {}, {0: [], 2: [], 3: []}, {2: threading.Event(), 3: threading.Event()}
    long_sent, short_started = threading.Event(), threading.Event()

    def hook(module, args, out):  # the engine thread
        if args[0].shape[0] == 2 and args[0].shape[1] > 1:  # a chunk of the two long prompts (not a decode step)
            chunks.append(args[0].shape[1])
            if len(chunks) == 3:
                tickets[1].cancel()
                tickets[2] = engine.submit([Request(late, 5, stop_tokens=NO_STOP)], sink(2))

    def sink(name):
        def receive(i, delta):
            outs[name] += delta.tokens
            if name == 0 and not long_sent.is_set():
                short_started.set()
                assert long_sent.wait(30)  # the short stream runs: hold the engine until both long prompts are queued
            if delta.finish_reason is not None and name in done:
                assert delta.error is None, delta.error
                done[name].set()
        return receive

    engine.model.register_forward_hook(hook)
    tickets[0] = engine.submit([Request(short, 60, stop_tokens=NO_STOP)], sink(0))
    assert short_started.wait(30)  # the engine is held: both long prompts are queued before its next step
    tickets[1] = engine.submit([Request(longs[0], 5, stop_tokens=NO_STOP)], lambda i, d: pytest.fail(f"cancelled, got {d}"))
    tickets[3] = engine.submit([Request(longs[1], 5, stop_tokens=NO_STOP)], sink(3))
    long_sent.set()
    assert done[2].wait(120) and done[3].wait(120)
    assert chunks == [16] * 12 + [9]  # 201 positions: the group went on with both rows to its end
    assert outs[3] == alone(ref, longs[1], 5) and outs[2] == alone(ref, late, 5)
    assert outs[0] == alone(ref, short, 60)[: len(outs[0])]
    assert engine.stats()["cancelled"] == 1 and engine.stats()["errors"] == 0


@pytest.mark.parametrize("patience", [0, 4])
def test_a_long_prompt_is_not_starved_by_a_stream_of_short_ones(started, ref, patience):
    """Each prefill forward brings one more short prompt, which has fewer positions left than the long
    one. Shortest-first alone would run every one of them first; after `patience` of them the long
    prompt goes first, to its end."""
    long = [1] + ids(99, 7)  # 100 positions: 7 chunks of 16
    shorts = [[1] + ids(4, 100 + i) for i in range(40)]
    engine = started(max_batch_size=4, prefill_chunk=16, max_prefill_tokens=16, prefill_patience=patience)
    # All of these are touched on the engine thread only (the hook and the sinks run there).
    chunks, submitted, outs, finished, long_at = [], [], {}, [], []
    everything_done = threading.Event()

    def sink(name):
        def receive(i, delta):
            assert delta.error is None, delta.error
            if name == "long" and not outs.get(name):
                long_at.append(engine.stats()["prefill_chunks"])  # chunks run when its first token came
            outs.setdefault(name, []).extend(delta.tokens)
            if delta.finish_reason is not None:
                finished.append(name)
                if "long" in finished and len(finished) == 1 + len(submitted):
                    everything_done.set()
        return receive

    def hook(module, args, out):
        if args[0].shape[1] > 1:  # a prefill chunk, not a decode step
            chunks.append(tuple(args[0].shape))
            if "long" not in finished and len(submitted) < len(shorts):  # one more short prompt arrives
                n = len(submitted)
                submitted.append(engine.submit([Request(shorts[n], 1, stop_tokens=NO_STOP)], sink(n)))

    engine.model.register_forward_hook(hook)
    engine.submit([Request(long, 3, stop_tokens=NO_STOP)], sink("long"))
    assert everything_done.wait(120)
    assert outs["long"] == alone(ref, long, 3)
    assert len(submitted) < len(shorts)  # the stream of short prompts was still going when it finished
    # Its first chunk, `patience` short prompts (each alone: they arrive one a step), then its other 6.
    assert long_at == [1 + patience + 6]
    assert chunks[: 7 + patience] == [(1, 16)] + [(1, 5)] * patience + [(1, 16)] * 5 + [(1, 4)]
    assert [outs[n] for n in range(len(submitted))] == [alone(ref, shorts[n], 1) for n in range(len(submitted))]


# ---- admission -----------------------------------------------------------------------------------------


def test_a_long_prompt_at_the_head_leaves_the_free_slots_to_the_prompts_behind_it(started, ref):
    """Chunked, admitting computes nothing: the short prompts queued behind a long one are admitted
    in the same step (not one step later, as when whole prompts were counted against
    max_prefill_tokens) and, having fewer positions left, prefilled first."""
    long, shorts = [1] + ids(299, 1), [[1] + ids(4, 10 + i) for i in range(3)]
    engine = started(max_batch_size=4, prefill_chunk=64, max_prefill_tokens=64)
    forwards = []
    engine.model.register_forward_hook(lambda module, args, out: forwards.append(tuple(args[0].shape)))
    prompts = [long] + shorts
    got, _, _ = run(engine, [Request(p, 4, stop_tokens=NO_STOP) for p in prompts])  # one submit: queued together
    assert got == [alone(ref, p, 4) for p in prompts]
    assert forwards[0] == (3, 5)  # the three short prompts in one forward, before any of the long one
    assert forwards[1:3] == [(3, 1), (1, 64)]  # their first decode step, then the long prompt's first chunk


def test_plain_admission_counts_the_tokens_to_compute(started, ref):
    """Plain schedule: a step admits prompts up to max_prefill_tokens tokens to compute (at least one),
    where a cached prefix costs nothing; whole prompts after their first stay bounded."""
    engine = started(max_batch_size=4, prefill_chunk=None, max_prefill_tokens=64, prefix_cache_tokens=512)
    ask(engine, [SYSTEM + [7]], 1)  # stores SYSTEM's 12 whole blocks
    forwards = []
    engine.model.register_forward_hook(lambda module, args, out: forwards.append(tuple(args[0].shape)))
    # 211 and 213 tokens, of which 19 and 21 to compute: both in one step, in one forward
    cached = [SYSTEM + ids(10, 1), SYSTEM + ids(12, 2)]
    outs, stats, lps = ask(engine, cached, 3)
    for prompt, out, lp in zip(cached, outs, lps):
        assert_alone(ref, prompt, 3, out, lp)
    assert [s.cached_tokens for s in stats] == [192, 192] and forwards[0] == (2, 21)
    # 100 tokens to compute (no cached prefix) then two of 5: the long one alone (64 + 36 positions
    # before its first decode step), the short ones at the next step.
    forwards.clear()
    prompts = [[1] + ids(99, 3), [1] + ids(4, 4), [1] + ids(4, 5)]
    outs, stats, lps = ask(engine, prompts, 4)
    for prompt, out, lp in zip(prompts, outs, lps):
        assert_alone(ref, prompt, 4, out, lp)
    assert forwards[:5] == [(1, 64), (1, 36), (1, 1), (2, 5), (3, 1)]


# ---- the prefix cache ---------------------------------------------------------------------------------


def ask(engine: Engine, prompts: list[list[int]], n: int, **fields) -> tuple[list[list[int]], list, list[list[float]]]:
    """Run one request per prompt, together, with their logprobs reported."""
    return run(engine, [Request(p, n, stop_tokens=NO_STOP, logprobs=0, **fields) for p in prompts])


def assert_alone(model, prompt, n, tokens, logprobs, **sampling) -> None:
    """`tokens` are what llama.generate gives for `prompt` alone, and `logprobs` the model's own for them:
    a wrong cached key or value that leaves the argmax alone still moves these."""
    assert tokens == alone(model, prompt, n, **sampling)
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(alone_logprobs(model, prompt, n, **sampling)),
                               rtol=0, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("temperature, top_p, seed", [(0, 1.0, None), (0.9, 0.95, 5)], ids=["greedy", "seeded"])
def test_a_prefix_cache_hit_gives_the_tokens_of_a_miss(started, ref, temperature, top_p, seed):
    engine = started(max_batch_size=2, prefix_cache_tokens=512, prefix_block=16)
    first, second = SYSTEM + ids(9, 1), SYSTEM + ids(23, 2)
    sampling = dict(temperature=temperature, top_p=top_p, seed=seed)
    # A miss, a hit on the 12 whole blocks of the 201 shared tokens, then first's own 13 blocks.
    for prompt, cached in ((first, 0), (second, 192), (first, 208)):
        (out,), (stats,), (lp,) = ask(engine, [prompt], 12, sampling=SamplingParams(temperature, top_p), seed=seed)
        assert_alone(ref, prompt, 12, out, lp, **sampling)
        assert stats.cached_tokens == cached
    counters = engine.stats()
    assert (counters["prefix_cache_hits"], counters["prefix_cache_hit_tokens"]) == (2, 400)
    assert counters["prefill_tokens"] == len(first) + (len(second) - 192) + (len(first) - 208)


def test_a_partial_prefix_hit_and_a_hit_after_eviction(started, ref):
    engine = started(max_batch_size=1, prefix_cache_tokens=64, prefix_block=16)  # four blocks
    a = [1] + ids(70, 1)
    branch = a[:40] + ids(30, 2)  # shares 2 whole blocks and 8 tokens of the third
    other = [1] + ids(80, 3)
    steps = [(a, 0), (branch, 32),  # a's 4 blocks fill the cache; branch's 2 new ones evict a's last 2 (LRU leaves)
             (other, 0),  # its 4 blocks evict everything else
             (a, 0), (a, 64)]  # evicted: computed again; then found  # fmt: skip
    for i, (prompt, cached) in enumerate(steps):
        (out,), (stats,), (lp,) = ask(engine, [prompt], 6)
        assert_alone(ref, prompt, 6, out, lp)
        assert stats.cached_tokens == cached, i
        if i == 1:
            assert engine.prefixes.tokens == 64 and engine.prefixes.stats.evicted_blocks == 2
    assert engine.prefixes.stats.evicted_blocks == 2 + 4 + 4


def test_batched_prompts_with_different_cached_prefixes(started, ref):
    """Rows of one prefill forward starting at different positions (start_pos per row)."""
    engine = started(max_batch_size=4, prefix_cache_tokens=512, prefill_chunk=None, max_prefill_tokens=1024)
    ask(engine, [SYSTEM + [7]], 1)
    prompts = [SYSTEM + ids(20, 1), [1] + ids(20, 2), SYSTEM[:40] + ids(25, 3), SYSTEM + ids(22, 4)]
    outs, stats, lps = ask(engine, prompts, 8)
    for prompt, out, lp in zip(prompts, outs, lps):
        assert_alone(ref, prompt, 8, out, lp)
    assert [s.cached_tokens for s in stats] == [192, 0, 32, 192]
    assert engine.stats()["prefill_batches"] == 2  # the four in one forward


def test_prompt_logprobs_requests_are_computed_whole(started):
    engine = started(max_batch_size=1, prefix_cache_tokens=512)
    ask(engine, [SYSTEM + [5]], 1)
    _, (stats,), _ = ask(engine, [SYSTEM + [6]], 1, prompt_logprobs=0)
    assert stats.cached_tokens == 0


def two_adapters():
    """A model holding random LoRA adapters "a" and "b" (large enough to change its tokens), and for each
    adapter (and None) a copy of it with only that one active, to compute what a request expects."""
    model = random_model(CONFIG)
    for name, seed in (("a", 1), ("b", 2)):
        lora.apply_lora(model, ["q_proj", "k_proj", "v_proj"], rank=4, name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, module in lora.lora_modules(model):
                module.lora_B[name].copy_(torch.randn(module.lora_B[name].shape, generator=g) * 0.5)
    lora.set_adapter(model, None)
    model.requires_grad_(False)
    alone_with = {}
    for adapter in ("a", "b", None):
        alone_with[adapter] = copy.deepcopy(model)
        lora.set_adapter(alone_with[adapter], adapter)
    return model, alone_with


def test_cached_prefixes_stay_with_their_adapter(started):
    model, alone_with = two_adapters()
    engine = started(model, max_batch_size=3, prefix_cache_tokens=1024)
    p1, p2 = SYSTEM + ids(5, 1), SYSTEM + ids(6, 2)
    for adapter in ("a", "b", None):  # the same system prompt under each adapter: a miss each time
        (out,), (stats,), (lp,) = ask(engine, [p1], 8, adapter=adapter)
        assert_alone(alone_with[adapter], p1, 8, out, lp)
        assert stats.cached_tokens == 0, adapter
    order = ("b", None, "a")
    outs, stats, lps = run(engine, [Request(p2, 8, stop_tokens=NO_STOP, logprobs=0, adapter=a) for a in order])
    for adapter, out, lp in zip(order, outs, lps):
        assert_alone(alone_with[adapter], p2, 8, out, lp)
    assert [s.cached_tokens for s in stats] == [192] * 3  # each found its own adapter's blocks
    assert len({tuple(o) for o in outs}) == 3  # the adapters make a difference


@pytest.mark.parametrize("finish, budget, cached", [("length", 512, 48), ("stop", 512, 64), ("length", 32, 32)])
def test_a_finished_answer_is_cached_for_the_next_turn(started, ref, finish, budget, cached):
    """The next turn repeats the first prompt and its answer. The slot holds keys and values for every
    token fed to the model: the 40 prompt tokens and each sampled token but the last. length: 24
    sampled, 23 fed, 63 positions: 3 whole blocks (a 4th would hold a position never written). stop:
    the stop token is the 25th sampled, the 24 before it were fed: 64 positions, 4 blocks. A budget of
    2 blocks keeps the prompt's 2 (the answer's would evict its own parent)."""
    first = [1] + ids(39, 100)
    greedy = alone(ref, first, 25)
    if finish == "stop":
        assert greedy[24] not in greedy[:24]  # it ends the answer there, not earlier
        request = Request(first, 40, stop_tokens=frozenset({greedy[24]}))
    else:
        request = Request(first, 24, stop_tokens=NO_STOP)
    engine = started(max_batch_size=2, prefix_cache_tokens=budget)
    (answer,), (stats,), _ = run(engine, [request])
    assert answer == greedy[:24] and stats.cached_tokens == 0
    turn = first + answer + ([greedy[24]] if finish == "stop" else []) + ids(10, 101)
    (out,), (stats,), (lp,) = ask(engine, [turn], 8)
    assert stats.cached_tokens == cached
    assert_alone(ref, turn, 8, out, lp)
    assert engine.prefixes.tokens <= budget


def test_a_finished_answer_is_cached_under_its_adapter(started):
    model, alone_with = two_adapters()
    engine = started(model, max_batch_size=2, prefix_cache_tokens=512)
    first = [1] + ids(39, 100)
    (answer,), _, _ = ask(engine, [first], 24, adapter="a")
    turn = first + answer + ids(10, 101)
    for adapter, cached in (("b", 0), ("a", 48)):  # b: nothing stored under it; a: the prompt and the answer
        (out,), (stats,), (lp,) = ask(engine, [turn], 8, adapter=adapter)
        assert_alone(alone_with[adapter], turn, 8, out, lp)
        assert stats.cached_tokens == cached, adapter


def test_a_cancelled_sequence_stores_only_its_prompt(started):
    """Only a sequence that finished stores its answer: a cancelled one's slot is given back as is."""
    engine = started(max_batch_size=1, prefix_cache_tokens=512)
    first, ticket, sent = [1] + ids(39, 100), {}, threading.Event()
    tokens = []

    def sink(i, delta):
        tokens.extend(delta.tokens)
        if len(tokens) >= 30 and not sent.is_set():
            ticket[0].cancel()
            sent.set()

    ticket[0] = engine.submit([Request(first, 100, stop_tokens=NO_STOP)], sink)
    assert sent.wait(60)
    (out,), (stats,), _ = ask(engine, [first + tokens + [5]], 2)
    assert stats.cached_tokens == 32  # the prompt's 2 blocks only


def test_the_prefix_cache_refuses_a_budget_below_one_block(ref):
    ref.setup_cache(1, 64)
    with pytest.raises(ValueError, match="at least one block of 16 tokens, got 8"):
        PrefixCache(ref.cache, tokens=8, block=16)
    ref.clear_cache()


def test_a_quantized_pool_caches_its_bytes_and_scales(started, ref):
    engine = started(max_batch_size=1, prefix_cache_tokens=256, kv_cache_dtype="int8")
    plain = started(max_batch_size=1, kv_cache_dtype="int8")
    prompt = SYSTEM + ids(5, 5)
    ask(engine, [SYSTEM + [3]], 1)
    (hit,), (stats,), (hit_lp,) = ask(engine, [prompt], 8)
    (fresh,), _, (fresh_lp,) = ask(plain, [prompt], 8)
    assert stats.cached_tokens == 192 and hit == fresh
    torch.testing.assert_close(torch.tensor(hit_lp), torch.tensor(fresh_lp), rtol=0, atol=1e-3)


# ---- the compiled decode step -------------------------------------------------------------------------


def compiled_engine_matches_eager(started, ref, backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = random_model(CONFIG)
    compiled_decode_step(model, backend=backend, dynamic=True)  # the engine's step, made with this backend
    engine = Engine(model, llama.load_tokenizer(KJV), max_batch_size=4, compile=True)
    assert engine.warm_up() > 0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2 and not counters["graph_break"]  # a batch of 1, and every larger one
    engine.start()
    try:
        prompts = [[1] + ids(n, n) for n in (3, 30, 9, 60)]
        (one,), _, _ = run(engine, [Request(prompts[0], 12, stop_tokens=NO_STOP)])
        several, _, _ = run(engine, [Request(p, 12 + i, stop_tokens=NO_STOP) for i, p in enumerate(prompts)])
    finally:
        engine.stop()
    assert one == alone(ref, prompts[0], 12)
    assert several == [alone(ref, p, 12 + i) for i, p in enumerate(prompts)]
    assert counters["stats"]["unique_graphs"] == graphs  # batch sizes 1..4 and every cache length: no recompilation
    torch._dynamo.reset()


needs_compile = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile needs torch >= 2.0")


@pytest.mark.slow  # two graphs captured: about 40 s on a contended CPU
@needs_compile
def test_the_compiled_decode_step_gives_the_eager_tokens(started, ref):
    compiled_engine_matches_eager(started, ref, "aot_eager")


@pytest.mark.slow
@needs_compile
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor on CPU needs a C++ compiler")
def test_the_inductor_compiled_decode_step_gives_the_eager_tokens(started, ref):
    compiled_engine_matches_eager(started, ref, "inductor")


def test_compile_refuses_per_request_adapters():
    model = random_model(CONFIG)
    lora.apply_lora(model, ["q_proj"], rank=2, name="a")
    with pytest.raises(ValueError, match=r"compile does not support per-request LoRA adapters \(a\)"):
        Engine(model, llama.load_tokenizer(KJV), compile=True)


# ---- the server ---------------------------------------------------------------------------------------


def test_usage_reports_the_cached_prompt_tokens():
    import httpx
    from test_serve import Server

    from llama.serving.app import create_app

    engine = Engine(random_model(CONFIG), llama.load_tokenizer(KJV), max_batch_size=2, prefix_cache_tokens=512)
    with Server(create_app(engine, model_name="tiny")) as server:
        usage = []
        for prompt in (SYSTEM + [7, 8], SYSTEM + [9]):
            response = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60)
            assert response.status_code == 200, response.text
            usage.append(response.json()["usage"])
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usage] == [0, 192]
    assert [u["prompt_tokens"] for u in usage] == [203, 202]


@pytest.mark.parametrize("flags, message", [
    (["--compile", "--lora", "x=dir"], "--compile does not support --lora"),
    (["--prefix-cache-tokens", "8"], "--prefix-cache-tokens must be 0 or at least one block of 16 tokens, got 8"),
    (["--prefill-chunk", "-1"], "--prefill-chunk must be at least 0, got -1"),
    (["--prefill-patience", "-1"], "--prefill-patience must be at least 0, got -1"),
])  # fmt: skip
def test_serve_script_refuses_schedule_flags_it_cannot_honour(flags, message):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "serve.py"), *flags],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_compile_refuses_dynamic_ntk_scaling():
    model = random_model(CONFIG.with_rope_scaling("dynamic:2"))
    with pytest.raises(ValueError, match="compile does not support dynamic NTK RoPE scaling"):
        Engine(model, llama.load_tokenizer(KJV), compile=True)


def test_decode_rows_go_in_slot_order(started, ref):
    """A request admitted into a slot freed by an earlier one joins the decode batch in slot order, so
    a full batch's cache rows are consecutive (read in place, not gathered: llama.core.cache.consecutive_rows)."""
    prompts = [[1] + ids(5, 20 + i) for i in range(4)]
    max_tokens = [2, 10, 10, 6]  # the first ends early; the fourth, waiting, takes its slot 0
    engine = started(max_batch_size=3)
    rows = []

    def hook(module, args, kwargs, out):
        if args[0].shape[1] == 1 and kwargs.get("cache_rows") is not None:  # a decode step
            rows.append(kwargs["cache_rows"].tolist())

    engine.model.register_forward_hook(hook, with_kwargs=True)
    got, _, _ = run(engine, [Request(p, n, stop_tokens=NO_STOP) for p, n in zip(prompts, max_tokens)])
    assert got == [alone(ref, p, n) for p, n in zip(prompts, max_tokens)]
    assert [0, 1, 2] in rows  # the fourth request (slot 0) decoding with the second and third
    assert all(r == sorted(r) for r in rows)


# ---- threads -------------------------------------------------------------------------------------------


def test_the_engine_thread_runs_with_the_thread_count_it_was_built_with(ref):
    """The engine sets the torch thread count of the thread that built it on its own thread, so the caller
    may drop to one thread afterwards (scripts/serve.py does: see llama.core.device.in_passing_thread)
    without the engine's forwards losing theirs."""
    before = torch.get_num_threads()
    model = copy.deepcopy(ref)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((threading.current_thread().name,
                                                                      torch.get_num_threads())))  # fmt: skip
    try:
        torch.set_num_threads(2)
        engine = Engine(model, llama.load_tokenizer(KJV))
        assert engine.threads == 2
        torch.set_num_threads(1)
        engine.start()
        try:
            tokens, _, _ = run(engine, [Request(ids(10, 1), 3, stop_tokens=NO_STOP)])
        finally:
            engine.stop()
        assert tokens[0] == alone(ref, ids(10, 1), 3)
        assert seen and all(name == "llama-engine" and threads == 2 for name, threads in seen)
    finally:
        torch.set_num_threads(before)
