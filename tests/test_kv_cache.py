"""The quantized KV cache (llama/core/cache.py): what it stores, what decoding with it computes, and
every part of the project that meets it (load, generate, the server's pool, the compiled decode step,
kernels.optimize, the recorder).

Tolerances (float32 model, random weights normal(0, 0.1), 64 positions): decoding through the cache
against one full forward, max |ours - ref| / max |ref| over all logits. Measured 1.0e-2 (int8), 4.6e-2
(fp8), 2.9e-3 (bfloat16), 6.3e-4 (float16), 7e-7 (float32); the bounds below leave 2-3x.
"""

from __future__ import annotations

import importlib.resources
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import kernels
import llama
import weights
from llama import ModelConfig, Transformer
from llama.core.cache import KV_CACHE_DTYPES, LayerCache, QuantizedLayerCache, consecutive_rows
from llama.core.generation import GenerationError, compiled_decode_step, generate
from llama.core.recording import Recorder
from llama.serving.engine import Engine, Request
from llama.training.long_context import cached_forward
from random_models import random_model

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=128, max_seq_len=256)
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3, "int8": 3e-2, "fp8": 1.2e-1}
QUANTIZED = [d for d in ("int8", "fp8") if d in KV_CACHE_DTYPES]
LLAMA3_TOKENIZER = Path(str(importlib.resources.files("llama_models.llama3") / "tokenizer.model"))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def model_and_tokens(seed: int = 0):
    model = random_model(CONFIG, seed, std=0.1)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 64), generator=torch.Generator().manual_seed(seed))
    return model, tokens


@torch.no_grad()
def decoded_logits(model: Transformer, tokens: torch.Tensor, kv_cache_dtype: str, prefill: int = 20, pool: int = 0,
                   rows: list[int] | None = None, **kwargs):  # fmt: skip
    """Prefill `prefill` tokens, then decode the rest one by one, through a cache of kv_cache_dtype
    (pool > 0: a pool of that many rows, the batch in `rows`, by default pool-1, 1, ...); all the
    logits (B, T, V)."""
    model.setup_cache(pool or tokens.shape[0], tokens.shape[1], kv_cache_dtype=kv_cache_dtype)
    if pool:
        kwargs["cache_rows"] = torch.tensor(rows or [pool - 1, 1][: tokens.shape[0]])
    steps = [model(tokens[:, :prefill], 0, **kwargs)]
    steps += [model(tokens[:, p : p + 1], p, **kwargs) for p in range(prefill, tokens.shape[1])]
    model.clear_cache()
    return torch.cat(steps, dim=1)


# ---- what is stored -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", QUANTIZED)
def test_quantization_error_is_bounded_per_vector(kind):
    """Each (head, position) vector keeps its own scale: an outlier vector does not coarsen the
    others. int8 rounds to the nearest of 255 steps of absmax / 127 (error <= half a step); float8
    e4m3 keeps 3 mantissa bits (relative error <= 2^-4, plus its subnormal spacing near zero)."""
    cache = QuantizedLayerCache(1, 8, 3, 64, storage=getattr(torch, {"int8": "int8", "fp8": "float8_e4m3fn"}[kind]))
    x = torch.randn(1, 3, 8, 64, generator=torch.Generator().manual_seed(0))
    x[0, 1, 3] *= 1000.0  # one outlier vector
    x[0, 2, 5] = 0.0  # an all-zero vector
    q, scale = cache.quantize(x)
    back = cache.dequantize(q, scale, torch.float32)
    absmax = x.abs().amax(-1, keepdim=True)
    if kind == "int8":
        assert q.dtype == torch.int8 and int(q.abs().max()) == 127
        bound = absmax / 127 / 2 * (1 + 1e-6)
    else:
        bound = x.abs() * 2.0**-4 + absmax / 448 * 2.0**-9 * (1 + 1e-6)
    assert bool(((back - x).abs() <= bound).all()), ((back - x).abs() - bound).max()
    assert torch.equal(back[0, 2, 5], torch.zeros(64)) and float(scale[0, 2, 5]) == 0.0
    # The outlier's own vector is exact to its own precision, its neighbours to theirs.
    assert rel_err(back[0, 1, 2], x[0, 1, 2]) < 2**-4


@pytest.mark.parametrize("kind", KV_CACHE_DTYPES)
def test_cache_bytes(kind):
    model = random_model(CONFIG)
    model.setup_cache(3, 100, kv_cache_dtype=kind)
    elements = 2 * CONFIG.n_layers * 3 * CONFIG.n_kv_heads * 100 * CONFIG.head_dim  # keys and values
    if kind in QUANTIZED:
        expected = elements * 1 + 2 * CONFIG.n_layers * 3 * CONFIG.n_kv_heads * 100 * 4  # one float32 scale per vector
        assert all(type(layer) is QuantizedLayerCache for layer in model.cache.layers)
    else:
        expected = elements * {"float32": 4, "bfloat16": 2, "float16": 2}[kind]
        assert all(type(layer) is LayerCache and layer.k.dtype == getattr(torch, kind) for layer in model.cache.layers)
    assert model.cache.nbytes == expected and model.cache.kv_cache_dtype == kind
    assert expected == 3 * 100 * CONFIG.kv_cache_bytes_per_token(kind)


# ---- what decoding with it computes ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KV_CACHE_DTYPES)
def test_cached_decoding_is_close_to_the_full_forward(kind):
    model, tokens = model_and_tokens()
    with torch.no_grad():
        full = model(tokens)
    err = rel_err(decoded_logits(model, tokens, kind), full)
    print(f"{kind} cache: max|decoded - full| / max|full| = {err:.2e} (bound {TOLERANCE[kind]:.0e})")
    assert err <= TOLERANCE[kind]
    if kind in QUANTIZED:
        assert err > 1e-4  # the case tests something: quantization does change the logits


@pytest.mark.parametrize("kind", ["float32", *QUANTIZED])
def test_consecutive_pool_rows_are_read_in_place(kind):
    """Neighbouring rows of a pool (a server's slots r0, r0+1, ..) are read as a view of the cache, not
    gathered, and compute what rows 0..B-1 and scattered rows compute."""
    assert consecutive_rows(torch.tensor([2, 3, 4])) == slice(2, 5)
    assert consecutive_rows(torch.tensor([4])) == slice(4, 5)
    for scattered in ([3, 2], [0, 2]):
        assert torch.equal(consecutive_rows(torch.tensor(scattered)), torch.tensor(scattered))
    model, tokens = model_and_tokens()
    in_place = decoded_logits(model, tokens, kind, pool=5, rows=[2, 3])
    assert torch.equal(in_place, decoded_logits(model, tokens, kind))
    assert torch.equal(in_place, decoded_logits(model, tokens, kind, pool=5))  # rows 4, 1: gathered
    model.setup_cache(5, 32, kv_cache_dtype=kind)
    ctx = model.context(tokens[:, :3], 0, torch.tensor([2, 3]), None)
    layer = model.cache.layers[0]
    k = torch.randn(2, CONFIG.n_kv_heads, 3, CONFIG.head_dim)
    keys, _ = layer.update(k, k, ctx)
    if kind == "float32":  # stored as it is: the keys returned are the cache's own rows 2 and 3
        assert keys.data_ptr() == layer.k[2].data_ptr() and torch.equal(keys, k)
    ctx = model.context(tokens[:, :3], 0, torch.tensor([3, 2]), None)
    gathered, _ = layer.update(k, k, ctx)  # rows in another order: a copy, in the batch's order
    if kind == "float32":
        assert gathered.data_ptr() != layer.k.data_ptr() and torch.equal(gathered, k)
    model.clear_cache()


@pytest.mark.parametrize("kind", QUANTIZED)
def test_pool_rows_compute_what_rows_in_order_compute(kind):
    """The server's path (cache rows picked out of a larger pool: index_put_ and a gather) stores and
    reads exactly what the plain path (rows 0..B-1: scatter_ and a view) does."""
    model, tokens = model_and_tokens()
    assert torch.equal(decoded_logits(model, tokens, kind, pool=5), decoded_logits(model, tokens, kind))


def test_engine_with_a_quantized_pool_and_chunked_prefill(tmp_path):
    """The engine's pool in int8, a prompt longer than max_prefill_tokens (prefilled in chunks through
    the pool's rows): the same greedy tokens as llama.generate with an int8 cache."""
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=64, max_seq_len=96,
                         tie_word_embeddings=True)  # fmt: skip
    llama.save(random_model(config, std=0.5), tmp_path)
    shutil.copy(LLAMA3_TOKENIZER, tmp_path / "tokenizer.model")
    tokenizer = llama.load_tokenizer(tmp_path)
    prompts = [tokenizer.encode("word " * n, bos=True, eos=False) for n in (40, 7)]
    ref = llama.load(tmp_path)
    wanted = [generate(ref, [p], 12, temperature=0, stop_tokens=[], kv_cache_dtype="int8")[0] for p in prompts]
    engine = Engine(llama.load(tmp_path), tokenizer, max_batch_size=3, max_prefill_tokens=16, kv_cache_dtype="int8")
    assert engine.model.cache.kv_cache_dtype == "int8"
    got, done = {0: [], 1: []}, threading.Event()

    def sink(i, delta):
        got[i].extend(delta.tokens)
        if delta.finish_reason and all(len(v) == 12 for v in got.values()):
            done.set()

    engine.start()
    try:
        engine.submit([Request(p, max_tokens=12, stop_tokens=frozenset()) for p in prompts], sink)
        assert done.wait(60)
    finally:
        engine.stop()
    assert [got[0], got[1]] == wanted


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", QUANTIZED)
def test_compiled_decoding_with_a_quantized_cache(kind, fresh_dynamo):
    """One graph, no graph breaks, and the tokens of eager decoding with the same cache."""
    model = random_model(CONFIG, std=0.3)
    prompts = [[1, 5, 9, 2, 33, 4], [7, 8]]
    expected = generate(model, prompts, 12, temperature=0, stop_tokens=[], kv_cache_dtype=kind)
    compiled_decode_step(model, backend="aot_eager")
    got = generate(model, prompts, 12, temperature=0, stop_tokens=[], compile=True, kv_cache_dtype=kind)
    assert got == expected
    assert model.cache.kv_cache_dtype == kind
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["graph_break"].values()) == 0
    # Another cache kind is another cache: the static cache is rebuilt, not reused with the wrong kind.
    generate(model, prompts, 4, temperature=0, stop_tokens=[], compile=True)
    assert model.cache.kv_cache_dtype == "float32"


@pytest.mark.parametrize("kind", QUANTIZED)
def test_kernels_optimize_reads_the_quantized_cache(kind):
    """FastAttention (fused q/k/v, in-place RoPE, SDPA) receives dequantized keys and values like the
    plain attention: the same logits, with a quantized cache already set up when optimizing."""
    model, tokens = model_and_tokens()
    plain = decoded_logits(model, tokens, kind)
    model.setup_cache(2, 64, kv_cache_dtype=kind)
    kernels.optimize(model, native=False)  # the check meets QuantizedLayerCache and accepts it
    assert rel_err(decoded_logits(model, tokens, kind), plain) <= 1e-5


def test_the_recorder_sees_the_quantized_keys():
    model, tokens = model_and_tokens()
    recorders = {}
    for kind in ("float32", "int8"):
        recorders[kind] = Recorder(attention=True, hidden=False)
        decoded_logits(model, tokens, kind, record=recorders[kind])
    ref, ours = recorders["float32"].attention(1), recorders["int8"].attention(1)
    assert ours.shape == ref.shape == (2, CONFIG.n_heads, 64, 64)
    assert 0 < (ours - ref).abs().max() < 1e-2  # probabilities from int8 keys: close, not equal
    assert torch.allclose(ours.sum(-1), torch.ones(2, CONFIG.n_heads, 64), atol=1e-5)


# ---- choosing it --------------------------------------------------------------------------------------


def test_chosen_at_load_and_per_call(tmp_path):
    llama.save(random_model(CONFIG), tmp_path)
    model = llama.load(tmp_path, kv_cache_dtype="int8")
    assert model.kv_cache_dtype == "int8"
    seen = []
    for kind in (None, "bfloat16"):
        for _ in generate_steps(model, kind):
            seen.append((kind, type(model.cache.layers[0]).__name__, model.cache.kv_cache_dtype))
            break
    assert seen == [(None, "QuantizedLayerCache", "int8"), ("bfloat16", "LayerCache", "bfloat16")]
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'int4'; expected one of float32, bfloat16, float16, int8"):
        llama.load(tmp_path, kv_cache_dtype="int4")
    with pytest.raises(GenerationError, match="unknown kv_cache_dtype 'q8'"):
        generate(model, [[1, 2]], 3, kv_cache_dtype="q8")


def generate_steps(model, kind):
    return llama.core.generation.stream(model, [[1, 2, 3]], 3, temperature=0, stop_tokens=[], kv_cache_dtype=kind)


# ---- quality on the bundled model --------------------------------------------------------------------

PROMPTS = ["In the beginning", "And Jesus said unto them", "The LORD is my shepherd", "And it came to pass"]
MARGIN = 0.05  # logits: a greedy choice clearer than this must not change with the int8 cache


def test_int8_cache_keeps_the_bundled_models_clear_greedy_choices():
    """On the bundled model (float32 weights), the int8 cache picks the bfloat16 cache's greedy token
    at every position where that choice is clear (its top two logits more than MARGIN apart), over
    the bfloat16 cache's own greedy continuation of each prompt to the end of the context (teacher-
    forced, so one near-tie does not end the comparison). Whatever the model's weights (it is
    retrained from time to time), nothing here is a number it produced. How many tokens free-running
    int8 decoding keeps equal is measured by scripts/kv_cache_quality.py (README)."""
    model = llama.load(weights.BUNDLED_MODEL, dtype="float32")
    tokenizer = llama.load_tokenizer(weights.BUNDLED_MODEL)
    prompts = [tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    n_new = model.config.max_seq_len - max(map(len, prompts))
    outputs = generate(model, prompts, n_new, temperature=0, stop_tokens=[], kv_cache_dtype="bfloat16")
    clear_total = same_total = 0
    for prompt, out in zip(prompts, outputs):
        seq = torch.tensor([prompt + out])
        ref, q = (torch.cat(list(cached_forward(model, seq, kv_cache_dtype=kind)), dim=1)[0, len(prompt) - 1 : -1]
                  for kind in ("bfloat16", "int8"))  # fmt: skip
        assert torch.equal(ref.argmax(-1), torch.tensor(out))  # teacher forcing reproduces the greedy run
        assert rel_err(q, ref) <= TOLERANCE["int8"]
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > MARGIN
        same = q.argmax(-1) == ref.argmax(-1)
        assert bool(same[clear].all()), f"int8 changed a clear greedy choice at positions {(~same & clear).nonzero().flatten().tolist()}"
        clear_total, same_total = clear_total + int(clear.sum()), same_total + int(same.sum())
    total = len(prompts) * n_new
    print(f"bundled model, int8 vs bfloat16 cache: {same_total}/{total} greedy choices equal; {clear_total} clear")
    assert clear_total > total // 2  # the comparison covers most positions


@pytest.mark.parametrize("kind", QUANTIZED)
def test_copy_prefix_copies_quantized_values_and_scales(kind):
    """KVCache.copy_prefix (the lm-eval adapter's shared prefill) on a quantized cache: rows given
    row 0's prefix decode exactly as row 0 does."""
    model, tokens = model_and_tokens()
    model.setup_cache(3, 64, kv_cache_dtype=kind)
    with torch.no_grad():
        model(tokens[:1, :20], 0, cache_rows=torch.tensor([0]))
        model.cache.copy_prefix(0, torch.tensor([1, 2]), 20)
        step = tokens[:1, 20:21].expand(3, 1)
        logits = model(step, 20, cache_rows=torch.tensor([0, 1, 2]))
    model.clear_cache()
    assert torch.equal(logits[1], logits[0]) and torch.equal(logits[2], logits[0])
