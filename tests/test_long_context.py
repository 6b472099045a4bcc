"""Long prompts and context extension: chunked prefill (same result, memory bounded by the chunk),
another RoPE scaling on a loaded model, and the loss-by-position measurements."""

from __future__ import annotations

import re
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import llama
from llama import ConfigError, ModelConfig, RopeScaling, Transformer
from llama.core.generation import GenerationError, generate, prefill, stream
from llama.training.long_context import cached_forward, position_nll, windows
from random_models import random_model

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=128, max_seq_len=256)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ---- chunked prefill ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_prefill_equals_one_forward(chunk):
    """Rows of different lengths, their last tokens in different chunks: each row's logits after its
    prompt equal those of one plain forward over that prompt."""
    model = random_model(CONFIG, std=0.2)
    lengths = torch.tensor([50, 13, 33])
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 50), generator=torch.Generator().manual_seed(1))
    done = []
    model.setup_cache(3, 50)
    with torch.no_grad():
        got = prefill(model, tokens, lengths, chunk=chunk, progress=lambda n, total: done.append((n, total)))
        expected = torch.stack([plain_last_logits(model, tokens[b, : lengths[b]]) for b in range(3)])
    assert rel_err(got, expected) <= 1e-5
    step = chunk or 50
    assert done == [(min(n + step, 50), 50) for n in range(0, 50, step)]


def test_forward_keep_computes_only_the_kept_positions_logits():
    """forward(keep=) gives each row's logits at its kept position, (B, 1, V), equal to the full
    forward's there; the output projection then sees B rows, not B x T (prefill's saving)."""
    model = random_model(CONFIG, std=0.2)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([19, 0, 7])
    seen = []
    hook = model.output.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        full = model(tokens)
        got = model(tokens, keep=keep)
    hook.remove()
    assert got.shape == (3, 1, CONFIG.vocab_size)
    assert rel_err(got[:, 0], full[torch.arange(3), keep]) <= 1e-5
    assert seen == [(3, 20, CONFIG.dim), (3, 1, CONFIG.dim)]


def test_prefill_projects_only_the_last_positions_unless_chunk_logits_are_asked_for():
    model = random_model(CONFIG, std=0.2)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([30, 11])
    seen = []
    hook = model.output.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
    model.setup_cache(2, 30)
    chunks = []
    with torch.no_grad():
        fast = prefill(model, tokens, lengths, chunk=16)
        assert seen == [(2, 1), (2, 1)]
        seen.clear()
        slow = prefill(model, tokens, lengths, chunk=16, on_logits=lambda begin, logits: chunks.append(logits))
    hook.remove()
    assert seen == [(2, 16), (2, 14)] and [c.shape[1] for c in chunks] == [16, 14]
    assert rel_err(fast, slow) <= 1e-5


def plain_last_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    cache, model.cache = model.cache, None
    try:
        return model(ids[None])[0, -1]
    finally:
        model.cache = cache


def test_generation_does_not_depend_on_the_chunk():
    model = random_model(CONFIG, std=0.3)
    prompts = [list(range(1, 40)), [5, 6, 7], list(range(20, 45))]
    expected = generate(model, prompts, 10, temperature=0, stop_tokens=[], prefill_chunk=None)
    assert generate(model, prompts, 10, temperature=0, stop_tokens=[], prefill_chunk=8) == expected
    with pytest.raises(GenerationError, match="prefill_chunk must be a positive integer or None, got 0"):
        generate(model, prompts, 10, prefill_chunk=0)


class LiveBytes(TorchDispatchMode):
    """Within `with LiveBytes() as m:`, m.peak is the most bytes that tensors allocated by the ops run
    inside were holding at once: every op's outputs are seen here; a storage counts from the op that
    allocated it until the last tensor viewing it is gone. (Views and in-place results of storages
    that existed before, such as the KV cache's, are not allocations.)"""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}  # storage address -> live tensors viewing it
        self.size: dict[int, int] = {}
        self.now = self.peak = 0

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.now -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.refs:
                if key in inputs or key == 0:  # a view or in-place result of an older storage; or empty
                    continue
                self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
                self.now += self.size[key]
                self.peak = max(self.peak, self.now)
            self.refs[key] += 1
            weakref.finalize(t, self._drop, key)
        return out


def prefill_peak(model: Transformer, T: int, chunk: int | None) -> int:
    """Peak bytes of the tensors a prefill of T tokens allocates (the cache is set up before)."""
    tokens = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    model.setup_cache(1, T)
    with torch.inference_mode(), LiveBytes() as live:
        prefill(model, tokens, torch.tensor([T]), chunk=chunk)
    model.clear_cache()
    assert live.now == 0  # everything allocated was freed: the count is consistent
    return live.peak


def test_prefill_memory_does_not_grow_with_the_square_of_the_prompt():
    """The attention of one forward over T tokens holds (H, T, T) float32 scores: 4x the memory for
    2x the prompt. Prefilled in chunks of 256 through the cache, each forward holds (H, 256, S): the
    peak grows linearly with T (measured: 18 MB at 1024 tokens, 72 MB at 4096; one forward: 71 MB at
    1024, 280 MB at 2048)."""
    config = CONFIG.replace(n_heads=8, n_kv_heads=2, max_seq_len=4096)
    model = random_model(config, std=0.1)
    small, large = prefill_peak(model, 1024, 256), prefill_peak(model, 4096, 256)
    one_score_matrix = config.n_heads * 4096 * 4096 * 4  # 537 MB
    print(f"chunked prefill peak: {small / 1e6:.1f} MB at 1024 tokens, {large / 1e6:.1f} MB at 4096 "
          f"(one 4096^2 score matrix: {one_score_matrix / 1e6:.0f} MB)")  # fmt: skip
    assert large < 4.5 * small  # linear: 4x for 4x the tokens (T^2: 16x)
    assert large < one_score_matrix / 4
    # The same measure sees the T^2 of one forward (so the bounds above can fail).
    whole_small, whole_large = prefill_peak(model, 1024, None), prefill_peak(model, 2048, None)
    print(f"one-forward prefill peak: {whole_small / 1e6:.1f} MB at 1024 tokens, {whole_large / 1e6:.1f} MB at 2048")
    assert whole_large > 3.5 * whole_small and whole_small > small


# ---- another RoPE scaling on a loaded model ------------------------------------------------------------


@pytest.mark.parametrize("spec, kind, original, context", [
    ("linear:4", "linear", None, 1024),
    ("yarn:4", "yarn", 256, 1024),
    ('{"kind": "yarn", "factor": 2, "beta_fast": 8, "original_max_seq_len": 128}', "yarn", 128, 256),
    ("dynamic:2", "dynamic", 256, 512),
])  # fmt: skip
def test_set_rope_scaling_equals_a_model_built_with_it(spec, kind, original, context):
    model = random_model(CONFIG, std=0.2)
    model.setup_cache(1, 8)
    model.set_rope_scaling(spec)
    scaling = model.config.rope_scaling
    assert (scaling.kind, model.config.max_seq_len, model.cache) == (kind, context, None)
    if original is not None:
        assert scaling.original_max_seq_len == original
    built = Transformer(CONFIG.replace(rope_scaling=scaling, max_seq_len=context))
    built.load_state_dict(model.state_dict())
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), built.eval()(tokens))
    model.set_rope_scaling("none")  # back to the trained context (the spec's original, if it gave one), unscaled
    assert model.config == CONFIG.replace(max_seq_len=original or 256)


def test_load_with_rope_scaling(tmp_path):
    llama.save(random_model(CONFIG), tmp_path)
    model = llama.load(tmp_path, rope_scaling="yarn:4")
    assert model.config.rope_scaling == RopeScaling("yarn", 4.0, original_max_seq_len=256)
    assert model.config.max_seq_len == 1024
    out = generate(model, [[1] * 900], 4, temperature=0)  # a prompt beyond the trained context
    assert len(out[0]) == 4
    for bad, message in [("yarn", "expected KIND:FACTOR"), ("ntk:2", "unknown RoPE scaling type 'ntk'"),
                         ('{"kind": "linear", "factor": 2, "alpha": 1}', "unknown fields ['alpha']")]:  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(message)):
            llama.load(tmp_path, rope_scaling=bad)


def test_trained_context_of_scaled_configs():
    assert CONFIG.trained_context == 256
    assert CONFIG.with_rope_scaling("linear:4").trained_context == 256
    assert ModelConfig.from_name("llama-3.1-8b").trained_context == 8192
    assert ModelConfig.from_name("llama-3.1-8b").with_rope_scaling("none").max_seq_len == 8192


# ---- loss by position ----------------------------------------------------------------------------------


def test_position_nll_is_the_mean_loss_at_each_position():
    model = random_model(CONFIG, std=0.2)
    windows = torch.randint(0, CONFIG.vocab_size, (5, 40), generator=torch.Generator().manual_seed(2))
    got = position_nll(model, windows, batch_size=2)
    with torch.no_grad():
        logprobs = F.log_softmax(model(windows).double(), dim=-1)  # (5, 40, V)
    expected = -logprobs[:, :-1].gather(-1, windows[:, 1:, None])[..., 0].mean(0)  # (39,)
    assert got.shape == (39,) and torch.allclose(got, expected, rtol=1e-6, atol=1e-9)
    # Through a float32 cache, chunk by chunk: the same numbers; through int8: close.
    assert torch.allclose(position_nll(model, windows, kv_cache_dtype="float32", chunk=16), expected, rtol=1e-5)
    int8 = position_nll(model, windows, kv_cache_dtype="int8", chunk=16)
    assert 0 < (int8 - expected).abs().max() < 0.05
    assert model.cache is None  # cached_forward removes its cache


def test_cached_forward_removes_its_cache_when_stopped_early():
    model = random_model(CONFIG)
    chunks = cached_forward(model, torch.zeros(1, 64, dtype=torch.long), chunk=16)
    assert next(chunks).shape == (1, 16, CONFIG.vocab_size) and model.cache is not None
    chunks.close()
    assert model.cache is None


def test_windows():
    stream = list(range(10))
    assert windows(stream, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(stream, 3, max_windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="need at least 11 tokens for one window, got 10"):
        windows(stream, 11)


def test_stream_reports_prefill_progress():
    model = random_model(CONFIG)
    seen = []
    list(stream(model, [list(range(1, 96))], 2, temperature=0, prefill_chunk=32,
                prefill_progress=lambda n, total: seen.append((n, total))))  # fmt: skip
    assert seen == [(32, 95), (64, 95), (95, 95)]
