"""The attention recorder (llama/core/recording.py): what it records is what the model computes.

Checked against formulas written here from the papers (RMSNorm, interleaved-pair RoPE as a complex
product, softmax of masked scores), not against the model's own attention code; and between cached
decoding and one full forward, which must record the same matrices.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from random_models import random_model

import kernels
import llama
import weights
from llama import ModelConfig
from llama.core.model import rope_frequencies
from llama.core.recording import Recorder
from llama.core.support import UnsupportedModelError

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 probabilities: the same math in a different order differs by a few ulps


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Hidden states and logits grow to O(10-100) through the blocks: tolerances relative to their scale."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)

CONFIGS = {
    "gqa": ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=50, ffn_dim=64, max_seq_len=32),
    "mha": ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=50, ffn_dim=48, max_seq_len=32),
    "mqa": ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=50, ffn_dim=48, max_seq_len=32),
    # variants: per-head norms, a sliding window on layer 1, no rotary on layer 0
    "variants": ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_dim=48, max_seq_len=32,
                            qk_norm=True, sliding_window=3, window_layers=(1,), nope_layers=(0,)),
}  # fmt: skip


def tokens_for(config: ModelConfig, B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """x: (B, T, n, hd): pair (x[2i], x[2i+1]) at position m times e^(i m f_i), as complex numbers."""
    B, T, n, hd = x.shape
    angles = torch.arange(T, dtype=torch.float64)[:, None] * rope_frequencies(hd, config.rope_theta, None).double()
    z = torch.view_as_complex(x.double().reshape(B, T, n, hd // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]).reshape(B, T, n, hd)


def attention_from_formula(model, layer: int, h: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal/window mask) of block `layer`, from its input h: (B, T, D)."""
    config, block = model.config, model.layers[layer]
    att = block.attention
    B, T, _ = h.shape
    H, Hkv, hd = config.n_heads, config.n_kv_heads, config.head_dim
    x = rms(h, block.attention_norm.weight, config.norm_eps)
    q = (x @ att.wq.weight.T).view(B, T, H, hd)
    k = (x @ att.wk.weight.T).view(B, T, Hkv, hd)
    if config.qk_norm:
        q, k = rms(q, att.q_norm.weight, config.norm_eps), rms(k, att.k_norm.weight, config.norm_eps)
    if config.uses_rope(layer):
        q, k = rotate(q, config), rotate(k, config)
    q, k = q.double(), k.double()
    scores = torch.empty(B, H, T, T, dtype=torch.float64)
    for head in range(H):  # query head h reads key head h // (H / Hkv)
        scores[:, head] = q[:, :, head] @ k[:, :, head // (H // Hkv)].transpose(1, 2) / math.sqrt(hd)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = j <= i
    if config.window(layer) is not None:
        allowed &= j > i - config.window(layer)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).float()


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_probabilities_sum_to_one_and_equal_the_formula(name):
    config = CONFIGS[name]
    model = random_model(config, seed=1, random_norms=True)
    tokens = tokens_for(config, 2, 9)
    rec = Recorder()
    model(tokens, record=rec)
    T = tokens.shape[1]
    future = torch.ones(T, T).triu(1).bool()
    for layer in range(config.n_layers):
        probs = rec.attention(layer)
        assert probs.shape == (2, config.n_heads, T, T)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, config.n_heads, T), **TOL)
        assert (probs[..., future] == 0).all()  # no query sees a later token
        torch.testing.assert_close(probs, attention_from_formula(model, layer, rec.hidden(layer)), **TOL)


@torch.no_grad()
def test_hidden_states_are_the_residual_stream_between_blocks():
    config = CONFIGS["gqa"]
    model = random_model(config, seed=2)
    tokens = tokens_for(config, 2, 7)
    rec = Recorder()
    logits = model(tokens, record=rec)
    torch.testing.assert_close(rec.hidden(0), model.tok_embeddings.weight[tokens], rtol=0, atol=0)
    ctx = model.context(tokens, 0, None, None)
    for i, block in enumerate(model.layers):
        torch.testing.assert_close(rec.hidden(i + 1), block(rec.hidden(i), ctx), rtol=0, atol=0)
    final = rms(rec.hidden(config.n_layers), model.norm.weight, config.norm_eps) @ model.output.weight.T
    assert_close_scaled(final, logits)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunks", [[1] * 10, [4, 1, 1, 3, 1], [6, 4]])
@torch.no_grad()
def test_cached_decoding_records_what_one_full_forward_records(name, chunks):
    config = CONFIGS[name]
    model = random_model(config, seed=3, random_norms=True)
    tokens = tokens_for(config, 2, sum(chunks))
    full = Recorder()
    logits = model(tokens, record=full)

    model.setup_cache(2, 20)  # more slots than tokens: stale/empty slots must get probability 0
    cached, pos, pieces = Recorder(), 0, []
    for size in chunks:
        pieces.append(model(tokens[:, pos : pos + size], start_pos=pos, record=cached))
        pos += size
    model.clear_cache()
    assert_close_scaled(torch.cat(pieces, 1), logits)  # recording changed nothing
    for layer in range(config.n_layers):
        torch.testing.assert_close(cached.attention(layer), full.attention(layer), **TOL)
        assert_close_scaled(cached.hidden(layer), full.hidden(layer))


@torch.no_grad()
def test_server_style_rows_and_fixed_kv_len_record_zeros_beyond_each_position():
    """cache_rows + kv_len (what the server and the compiled step use): each row's probabilities cover
    the kv_len slots, zero past its own position, and equal that row's own full forward."""
    config = CONFIGS["gqa"]
    model = random_model(config, seed=4)
    model.setup_cache(4, 16)
    a, b = tokens_for(config, 1, 5, seed=5), tokens_for(config, 1, 3, seed=6)
    rows = torch.tensor([3, 1])
    model(torch.cat([a[:, :3], b]), start_pos=0, cache_rows=rows, kv_len=16)  # prefill 3 tokens of each
    rec = Recorder(layers=[1])
    model(torch.cat([a[:, 3:4], a[:, 3:4]]), start_pos=torch.tensor([3, 3]), cache_rows=rows, kv_len=16, record=rec)
    probs = rec.attention(1)  # (2, H, 1, 16)
    assert probs.shape == (2, config.n_heads, 1, 16)
    assert (probs[..., 4:] == 0).all()
    model.clear_cache()
    alone = Recorder(layers=[1])
    model(a[:, :4], record=alone)
    torch.testing.assert_close(probs[0, :, 0, :4], alone.attention(1)[0, :, 3], **TOL)


@torch.no_grad()
def test_recording_leaves_the_logits_unchanged_and_keeps_only_what_was_asked():
    config = CONFIGS["gqa"]
    model = random_model(config, seed=5)
    tokens = tokens_for(config, 1, 6)
    rec = Recorder(layers=[1], hidden=False)
    torch.testing.assert_close(model(tokens, record=rec), model(tokens), rtol=0, atol=0)
    assert set(rec.calls) == {("attention", 1)}
    with pytest.raises(KeyError, match=r"no attention recorded for layer 0; recorded layers: \[1\]"):
        rec.attention(0)
    with pytest.raises(KeyError, match="no hidden recorded for layer 1; recorded layers: none"):
        rec.hidden(1)
    rec.clear()
    assert rec.calls == {}


@torch.no_grad()
def test_sdpa_attention_refuses_to_record_and_the_other_swaps_record_the_same():
    config = CONFIGS["gqa"]
    plain = random_model(config, seed=6)
    tokens = tokens_for(config, 1, 6)
    expected = Recorder()
    plain(tokens, record=expected)

    fast = kernels.optimize(random_model(config, seed=6), native=False)
    with pytest.raises(UnsupportedModelError, match=r"layer 0: attention probabilities cannot be recorded through SDPA.*sdpa=False"):
        fast(tokens, record=Recorder())
    hidden_only = Recorder(attention=False)
    fast(tokens, record=hidden_only)  # hidden states need no probabilities
    assert_close_scaled(hidden_only.hidden(2), expected.hidden(2))

    no_sdpa = kernels.optimize(random_model(config, seed=6), sdpa=False, native=False)
    rec = Recorder()
    no_sdpa(tokens, record=rec)
    for layer in range(config.n_layers):
        torch.testing.assert_close(rec.attention(layer), expected.attention(layer), **TOL)


# ---- scripts/attention_map.py --------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("_script_attention_map", ROOT / "scripts" / "attention_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_map_prints_the_recorded_probabilities_and_plots_them(script, capsys, tmp_path):
    out = tmp_path / "map.png"
    assert script.main(["--prompt", "And God said", "--layer", "1", "--head", "2", "--print", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    model, tokenizer = llama.load(weights.BUNDLED_MODEL, dtype="float32"), llama.load_tokenizer(weights.BUNDLED_MODEL)
    ids = tokenizer.encode("And God said", bos=True, eos=False)
    rec = Recorder(layers=[1])
    with torch.no_grad():
        model(torch.tensor([ids]), record=rec)
    rows = [line.split() for line in text.splitlines()[2 : 2 + len(ids)]]  # label, then the row's probabilities
    for i, row in enumerate(rows):
        assert [float(p) for p in row[1:]] == [round(p, 2) for p in rec.attention(1)[0, 2, i, : i + 1].tolist()]
    assert out.read_bytes().startswith(b"\x89PNG") and f"wrote {out}: layer 1, head 2, {len(ids)} tokens" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layer", "8"], "error: --layer 8 is out of range: the model has 6 layers (0..5)"),
        (["--head", "-1"], "error: --head -1 is out of range: the model has 6 query heads (0..5)"),
        (["--prompt", "", "--no-bos"], "error: the prompt is empty"),
        (["--checkpoint", "no/such/dir"], "error: "),
    ],
)
def test_attention_map_user_errors(script, capsys, tmp_path, args, message):
    assert script.main([*args, "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "x.png").exists()


def test_attention_map_without_matplotlib_says_what_to_install(script, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert script.main(["--out", str(tmp_path / "x.png")]) == 2
    assert 'plotting needs matplotlib: pip install -e ".[plot]"' in capsys.readouterr().err
