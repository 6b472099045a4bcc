"""Invariants of the model, checked with hypothesis on tiny random float32 models.

Each property is something the math guarantees, independent of any reference implementation:
cached decoding equals the full forward, RoPE sees only relative positions, GQA is MHA with shared
heads, RMSNorm ignores scale, and rows of a batch never see each other. The configs cover every
architecture-variant field of ModelConfig (per-head q/k norms, sliding windows, NoPE layers, the
GELU MLP) as well as plain Llama.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama import ModelConfig, RopeScaling, Transformer
from llama.core.model import RMSNorm, apply_rope, rope_frequencies

# Tolerances for float32: the same math done in a different order (one long matmul vs. many short
# ones, masked slots vs. absent ones) differs by a few ulps; 1e-5 relative is far above that and far
# below any real bug (a wrong position or a leaked key changes logits by O(1e-2) or more).
RTOL, ATOL = 1e-5, 1e-5

PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- strategies ------------------------------------------------------------------------------------


@st.composite
def rope_scalings(draw):
    kind = draw(st.sampled_from(["none", "linear", "llama3"]))
    if kind == "none":
        return None
    factor = draw(st.sampled_from([2.0, 8.0, 32.0]))
    if kind == "linear":
        return RopeScaling("linear", factor)
    # A short "original context" puts the smooth band of the llama3 scaling across the few
    # frequencies a tiny head has, so all three branches (kept, stretched, blended) are used.
    return RopeScaling("llama3", factor, 1.0, 4.0, draw(st.sampled_from([16, 64, 8192])))


@st.composite
def variants(draw, n_layers: int) -> dict:
    """The architecture-variant fields of ModelConfig (every one: a new field belongs here too)."""
    layer_sets = st.lists(st.integers(0, n_layers - 1), unique=True, max_size=n_layers).map(tuple)
    window = draw(st.one_of(st.none(), st.integers(1, 6)))
    return dict(
        qk_norm=draw(st.booleans()),
        sliding_window=window,
        window_layers=None if window is None else draw(st.one_of(st.none(), layer_sets)),
        nope_layers=draw(layer_sets),
        mlp=draw(st.sampled_from(["swiglu", "gelu"])),
    )


@st.composite
def configs(draw, n_layers=None):
    n_kv_heads = draw(st.sampled_from([1, 2, 4]))
    n_rep = draw(st.sampled_from([1, 2, 4]))  # 1: MHA; n_kv_heads == 1: MQA; otherwise GQA
    n_heads = n_kv_heads * n_rep
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    # dim is usually n_heads * head_dim, but head_dim may also be set independently (as HF allows).
    dim = draw(st.sampled_from([n_heads * head_dim, 24, 32]))
    n_layers = n_layers or draw(st.integers(1, 2))
    # Half the examples are plain Llama, half draw every variant field.
    extra = draw(st.one_of(st.just({}), variants(n_layers)))
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=draw(st.sampled_from([17, 64])),
        ffn_dim=draw(st.sampled_from([16, 40])),
        head_dim=head_dim,
        rope_theta=draw(st.sampled_from([10000.0, 500000.0, 100.0])),
        rope_scaling=draw(rope_scalings()),
        max_seq_len=64,
        **extra,
    )


def random_model(config: ModelConfig, seed: int) -> Transformer:
    """A float32 model with every weight random (norm weights too, so they are not all ones)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def chunk_sizes(draw, total: int, first: int) -> list[int]:
    """Split `total` tokens into a prefill of `first` and then chunks of random sizes."""
    sizes = [first] if first else []
    left = total - first
    while left:
        size = draw(st.integers(1, left))
        sizes.append(size)
        left -= size
    return sizes


# ---- KV-cache decode equals the full forward --------------------------------------------------------


@PROPERTY
@given(config=configs(), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_cached_decode_equals_full_forward(config, seed, data):
    model = random_model(config, seed)
    B = data.draw(st.integers(1, 3), label="batch")
    T = data.draw(st.integers(2, 20), label="tokens")
    tokens = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    full = model(tokens)  # (B, T, V)

    sizes = chunk_sizes(data.draw, T, data.draw(st.integers(0, T), label="prefill"))
    as_tensor = data.draw(st.booleans(), label="start_pos as a (B,) tensor")
    model.setup_cache(B, data.draw(st.integers(T, 40), label="cache length"))
    pieces, pos = [], 0
    for size in sizes:
        start = torch.full((B,), pos) if as_tensor else pos
        pieces.append(model(tokens[:, pos : pos + size], start_pos=start))
        pos += size
    model.clear_cache()
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=RTOL, atol=ATOL)


@PROPERTY
@given(config=configs(), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_ragged_rows_match_each_row_decoded_alone(config, seed, data):
    """Rows at different positions (a (B,) start_pos) advance together but stay independent."""
    model = random_model(config, seed)
    B = data.draw(st.integers(2, 3), label="batch")
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = [data.draw(st.integers(1, 12), label=f"prompt {b}") for b in range(B)]
    n_steps = data.draw(st.integers(1, 6), label="decode steps")
    step_len = data.draw(st.integers(1, 3), label="tokens per step")
    sequences = [torch.randint(0, config.vocab_size, (n + n_steps * step_len,), generator=gen) for n in prompt_lens]

    # Alone: each row's full forward over its own tokens.
    alone = [model(seq[None])[0] for seq in sequences]  # (len_b, V) each

    # Together: prefill the prompts token by token, each row at its own position, then decode all
    # rows in lockstep in chunks of `step_len`, each from its own start position.
    model.setup_cache(B, 64)
    max_len = max(prompt_lens)
    for t in range(max_len):
        # Rows whose prompt is done re-feed their last prompt token at its own position: it rewrites
        # the same cache slot with the same key/value, so the cache is unchanged.
        pos = torch.tensor([min(t, n - 1) for n in prompt_lens])
        tok = torch.stack([seq[p] for seq, p in zip(sequences, pos.tolist())])[:, None]
        out = model(tok, start_pos=pos)
        for b, n in enumerate(prompt_lens):
            if t < n:
                torch.testing.assert_close(out[b, 0], alone[b][t], rtol=RTOL, atol=ATOL)
    starts = torch.tensor(prompt_lens)
    for _ in range(n_steps):
        chunk = torch.stack([seq[s : s + step_len] for seq, s in zip(sequences, starts.tolist())])
        out = model(chunk, start_pos=starts)  # (B, step_len, V)
        for b, s in enumerate(starts.tolist()):
            torch.testing.assert_close(out[b], alone[b][s : s + step_len], rtol=RTOL, atol=ATOL)
        starts = starts + step_len
    model.clear_cache()


@PROPERTY
@given(config=configs(), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_cache_rows_and_kv_len_give_the_same_logits(config, seed, data):
    """Sequences kept in arbitrary rows of a larger cache (a server's slots), prefilled one at a time
    and decoded together, attending to a fixed kv_len (compiled decoding): the full forward's logits."""
    model = random_model(config, seed)
    B = data.draw(st.integers(1, 3), label="batch")
    pool = data.draw(st.integers(B, 5), label="cache rows")
    rows = torch.tensor(data.draw(st.permutations(range(pool)), label="row order")[:B])
    T = data.draw(st.integers(2, 16), label="tokens")
    prompt = data.draw(st.integers(1, T - 1), label="prompt length")
    kv_len = data.draw(st.integers(T, 24), label="kv_len")
    tokens = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    full = model(tokens)  # (B, T, V)

    model.setup_cache(pool, 24)
    fill_all_with_garbage(model)
    pieces = [torch.cat([model(tokens[b : b + 1, :prompt], 0, cache_rows=rows[b : b + 1]) for b in range(B)])]
    for pos in range(prompt, T):
        pieces.append(model(tokens[:, pos : pos + 1], torch.full((B,), pos), cache_rows=rows, kv_len=kv_len))
    model.clear_cache()
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=RTOL, atol=ATOL)


def fill_all_with_garbage(model: Transformer) -> None:
    for cache in model.cache.layers:
        cache.k.normal_(0, 1e3)
        cache.v.normal_(0, 1e3)


def fill_with_garbage(model: Transformer, row: int, start: int) -> None:
    """Huge random keys and values in cache slots start.. of one row: a single leaked slot would
    dominate its softmax."""
    for cache in model.cache.layers:
        cache.k[row, :, start:] = 1e3 * torch.randn_like(cache.k[row, :, start:])
        cache.v[row, :, start:] = 1e3 * torch.randn_like(cache.v[row, :, start:])


@PROPERTY
@given(config=configs(), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_stale_cache_slots_are_masked(config, seed, data):
    """Rows at different positions share one key range 0..S-1, so a row behind the others has cache
    slots beyond its position inside that range: stale entries of an earlier, longer sequence (here
    also overwritten with garbage). The mask must hide them from that row's queries."""
    model = random_model(config, seed)
    gen = torch.Generator().manual_seed(seed)
    L = data.draw(st.integers(2, 16), label="prefill length")
    back = data.draw(st.integers(1, L - 1), label="position the second row rewinds to")
    C = data.draw(st.integers(1, 4), label="chunk length")
    tokens = torch.randint(0, config.vocab_size, (2, L), generator=gen)
    chunk = torch.randint(0, config.vocab_size, (2, C), generator=gen)

    model.setup_cache(2, 32)
    model(tokens)  # both rows fill slots 0..L-1
    fill_with_garbage(model, 0, L)  # row 0: never written beyond L
    fill_with_garbage(model, 1, back)  # row 1: slots back..L-1 are stale, the rest never written
    got = model(chunk, start_pos=torch.tensor([L, back]))  # keys 0..L+C-1 for both rows
    model.clear_cache()

    row0 = model(torch.cat([tokens[0], chunk[0]])[None])[0, L:]
    row1 = model(torch.cat([tokens[1, :back], chunk[1]])[None])[0, back:]
    torch.testing.assert_close(got[0], row0, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[1], row1, rtol=RTOL, atol=ATOL)


@PROPERTY
@given(config=configs(), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_chunk_overwrites_garbage_in_its_own_slots(config, seed, data):
    """A chunk at start_pos P > 0 writes its keys/values before attending: garbage already in slots
    P.. must not reach the output (a one-row batch has no slots beyond P + T - 1 in range)."""
    model = random_model(config, seed)
    T = data.draw(st.integers(2, 16), label="tokens")
    prefix = data.draw(st.integers(1, T - 1), label="prefix")
    tokens = torch.randint(0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
    expected = model(tokens)[:, prefix:]

    model.setup_cache(1, 32)
    model(tokens[:, :prefix])
    fill_with_garbage(model, 0, prefix)
    got = model(tokens[:, prefix:], start_pos=prefix)
    model.clear_cache()
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_stale_cache_slots_are_masked_one_token_at_a_time():
    """Decoding single tokens (T = 1, where a kernel's causal flag would mask nothing) for two rows
    that are 6 positions apart, with garbage in every slot at or after each row's position."""
    config = ModelConfig(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_dim=32, max_seq_len=32)
    model = random_model(config, 0)
    tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)
        model.setup_cache(2, 32)
        for step in range(10):
            pos = torch.tensor([step + 6, step])
            for row in range(2):
                fill_with_garbage(model, row, int(pos[row]))
            if step == 0:  # row 0 starts 6 tokens ahead: give it its real prefix
                model(tokens[:1, :6])
            got = model(tokens[torch.arange(2), pos][:, None], start_pos=pos)  # (2, 1, V)
            torch.testing.assert_close(got[:, 0], expected[torch.arange(2), pos], rtol=RTOL, atol=ATOL)


# ---- RoPE: attention scores depend only on relative position ----------------------------------------


@PROPERTY
@given(
    head_dim=st.sampled_from([2, 4, 8, 16, 64]),
    theta=st.sampled_from([10000.0, 500000.0, 100.0]),
    m=st.integers(0, 200),
    n=st.integers(0, 200),
    shift=st.integers(0, 200),
    seed=st.integers(0, 2**16),
)
def test_rope_scores_depend_only_on_relative_position(head_dim, theta, m, n, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 1, head_dim, generator=gen)  # (B, T, n, hd) with B = T = n = 1
    k = torch.randn(1, 1, 1, head_dim, generator=gen)
    freqs = rope_frequencies(head_dim, theta, None).double()

    def score(qpos: int, kpos: int) -> float:
        def rotate(x, pos):
            angles = (pos * freqs).float()[None, None]  # (1, 1, hd/2), exact angles rounded once
            return apply_rope(x, angles.cos(), angles.sin())

        return float((rotate(q, qpos) * rotate(k, kpos)).double().sum())

    # apply_rope works in float32: allow a few ulps of |q| |k| for the rotated components.
    tol = 1e-5 * float(q.norm() * k.norm())
    assert abs(score(m + shift, n + shift) - score(m, n)) <= tol
    # at equal positions the rotations cancel: the score is the unrotated q . k
    assert abs(score(m, m) - float((q.double() * k.double()).sum())) <= tol


def test_rope_rotation_matches_complex_multiplication():
    """apply_rope on interleaved pairs is Meta's complex product x * e^(i m f)."""
    head_dim, T = 8, 5
    x = torch.randn(1, T, 2, head_dim)
    freqs = rope_frequencies(head_dim, 10000.0, None)
    angles = torch.arange(T).float()[:, None] * freqs  # (T, hd/2)
    got = apply_rope(x, angles.cos()[None], angles.sin()[None])
    xc = torch.view_as_complex(x.view(1, T, 2, head_dim // 2, 2))
    want = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- GQA is MHA with each key/value head repeated ---------------------------------------------------


@PROPERTY
@given(config=configs(), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_gqa_equals_mha_with_repeated_kv_heads(config, seed):
    gqa = random_model(config, seed)
    mha = Transformer(config.replace(n_kv_heads=config.n_heads)).eval()
    state = gqa.state_dict()
    hd, n_rep = config.head_dim, config.n_rep
    for i in range(config.n_layers):
        for w in ("wk", "wv"):
            name = f"layers.{i}.attention.{w}.weight"
            per_head = state[name].view(config.n_kv_heads, hd, config.dim)  # (Hkv, hd, D)
            # Query head h reads kv head h // n_rep: repeat each kv head n_rep times in a row.
            state[name] = per_head.repeat_interleave(n_rep, dim=0).reshape(config.n_heads * hd, config.dim)
    mha.load_state_dict(state, strict=True)
    tokens = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(mha(tokens), gqa(tokens), rtol=RTOL, atol=ATOL)


# ---- RMSNorm ignores the scale of its input ---------------------------------------------------------


@PROPERTY
@given(
    dim=st.integers(1, 64),
    scale=st.floats(1e-2, 1e3),
    seed=st.integers(0, 2**16),
)
def test_rmsnorm_is_scale_invariant(dim, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, eps=1e-12)  # eps far below mean(x^2), which is ~1 here and >= 1e-4 scaled
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=gen) + 0.5)
    x = torch.randn(3, dim, generator=gen, dtype=torch.float64).float()
    x = x + torch.sign(x) * 0.1  # keep every row's RMS away from 0
    torch.testing.assert_close(norm(scale * x), norm(x), rtol=1e-5, atol=1e-6)
    # and its output has unit RMS before the weight
    unweighted = norm(x) / norm.weight
    torch.testing.assert_close(unweighted.pow(2).mean(-1), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_rmsnorm_keeps_bfloat16_and_computes_in_float32():
    x = (torch.randn(4, 32) * 100).bfloat16()
    norm = RMSNorm(32, eps=1e-5).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    want = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(out, want)


# ---- rows of a batch are independent ----------------------------------------------------------------


@PROPERTY
@given(config=configs(), seed=st.integers(0, 2**16), data=st.data())
@torch.no_grad()
def test_batch_rows_are_independent(config, seed, data):
    model = random_model(config, seed)
    B = data.draw(st.integers(2, 4), label="batch")
    T = data.draw(st.integers(1, 12), label="tokens")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (B, T), generator=gen)
    batched = model(tokens)
    for b in range(B):
        torch.testing.assert_close(batched[b], model(tokens[b : b + 1])[0], rtol=RTOL, atol=ATOL)

    # Changing every other row leaves row i's logits as they were.
    i = data.draw(st.integers(0, B - 1), label="row kept")
    changed = torch.randint(0, config.vocab_size, (B, T), generator=gen)
    changed[i] = tokens[i]
    torch.testing.assert_close(model(changed)[i], batched[i], rtol=RTOL, atol=ATOL)


# ---- misuse of the cache arguments --------------------------------------------------------------------


def test_cache_arguments_are_checked():
    import pytest

    config = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=17, ffn_dim=16, max_seq_len=64)
    model = random_model(config, 0)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="start_pos 4 needs a KV cache"):
        model(tokens, 4)
    with pytest.raises(ValueError, match="kv_len and cache_rows need a KV cache"):
        model(tokens, kv_len=8)
    model.setup_cache(2, 8)
    with pytest.raises(ValueError, match="kv_len 9 is outside the KV cache's 1..8 positions"):
        model(tokens, kv_len=9)
    with pytest.raises(ValueError, match=r"positions up to 8 do not fit the KV cache of 2 rows x 8 positions"):
        model(tokens, 6)
    with pytest.raises(ValueError, match=r"cache rows up to 2\)"):
        model(tokens, 0, cache_rows=torch.tensor([0, 2]))
    dynamic = random_model(dataclasses.replace(config, rope_scaling=RopeScaling("dynamic", 2.0, original_max_seq_len=32)), 0)
    dynamic.setup_cache(1, 8)
    with pytest.raises(ValueError, match="dynamic NTK"):
        dynamic(tokens[:1], kv_len=8)
