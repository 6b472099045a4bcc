"""Model arithmetic (ModelConfig.param_counts, kv_cache_bytes_per_token, flops_per_token) and
scripts/model_stats.py, checked against what the model actually holds and computes: parameters of a
model built on the meta device, the bytes of the KV cache's buffers, and the FLOPs torch counts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llama import REGISTRY, ModelConfig, Transformer
from llama.core.config import dtype_bytes

ROOT = Path(__file__).resolve().parents[1]

TINY = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=40, ffn_dim=48, max_seq_len=64)
VARIANTS = {
    "llama": TINY,
    "tied": TINY.replace(tie_word_embeddings=True),
    "qk_norm": TINY.replace(qk_norm=True),
    "gelu": TINY.replace(mlp="gelu"),
    "head_dim": TINY.replace(head_dim=12),
    "window": TINY.replace(sliding_window=4, window_layers=(0, 2), nope_layers=(1,)),
}


def counts_by_name(model: Transformer) -> dict[str, int]:
    """Parameters grouped by the part their name says (a tied output appears once, as the embedding)."""
    parts = dict.fromkeys(["embedding", "attention", "feed_forward", "norms", "output"], 0)
    for name, p in model.named_parameters():
        part = ("norms" if "norm" in name else "attention" if ".attention." in name else
                "feed_forward" if ".feed_forward." in name else "embedding" if name.startswith("tok_embeddings")
                else "output")  # fmt: skip
        parts[part] += p.numel()
    return parts


def meta_model(config: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)


@pytest.mark.parametrize("config", [*REGISTRY.values(), *VARIANTS.values()], ids=[*REGISTRY, *VARIANTS])
def test_parameter_counts_by_part_equal_the_models_own(config):
    model = meta_model(config)
    assert config.param_counts() == counts_by_name(model)
    assert config.n_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config", [*REGISTRY.values(), *VARIANTS.values()], ids=[*REGISTRY, *VARIANTS])
def test_kv_cache_bytes_equal_the_caches_buffers(config, dtype):
    model = meta_model(config)
    model.setup_cache(batch_size=3, max_seq_len=32, dtype=dtype, device="meta")
    held = sum(b.numel() * b.element_size() for b in model.cache.buffers())
    assert held == 3 * 32 * config.kv_cache_bytes_per_token(dtype)
    assert config.kv_cache_bytes_per_token(str(dtype).removeprefix("torch.")) == config.kv_cache_bytes_per_token(dtype)


def test_kv_cache_bytes_of_released_models():
    # 2 (k and v) x layers x kv heads x head_dim x 2 bytes, from the model cards' shapes
    assert REGISTRY["llama-3.2-1b"].kv_cache_bytes_per_token("bfloat16") == 2 * 16 * 8 * 64 * 2 == 32_768
    assert REGISTRY["llama-3.1-8b"].kv_cache_bytes_per_token("bfloat16") == 2 * 32 * 8 * 128 * 2 == 131_072
    assert REGISTRY["llama-2-7b"].kv_cache_bytes_per_token("float16") == 2 * 32 * 32 * 128 * 2 == 524_288
    # the 70B model keeps less per token than the 13B one: 8 KV heads against 40
    assert REGISTRY["llama-2-13b"].kv_cache_bytes_per_token("float16") == 2 * 40 * 40 * 128 * 2 == 819_200
    assert REGISTRY["llama-2-70b"].kv_cache_bytes_per_token("float16") == 2 * 80 * 8 * 128 * 2 == 327_680


@pytest.mark.parametrize("name", ["llama", "tied", "qk_norm", "gelu", "head_dim"])
@pytest.mark.parametrize("position", [0, 5, 17])
@torch.no_grad()
def test_flops_per_token_equal_what_torch_counts_for_one_decode_step(name, position):
    """One token decoded at `position` attends to position + 1 cache slots; FlopCounterMode counts
    every matmul's 2 x multiply-adds (the embedding lookup and element-wise work are not matmuls)."""
    config = VARIANTS[name]
    model = Transformer(config).eval()
    model.setup_cache(1, 32)
    if position:
        model(torch.zeros(1, position, dtype=torch.long))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, dtype=torch.long), start_pos=position)
    assert counter.get_total_flops() == config.flops_per_token(position + 1)


def test_flops_formula_and_sliding_window():
    c = VARIANTS["window"]  # layers 0 and 2 attend to at most 4 positions
    per_position = 4 * c.n_heads * c.head_dim  # q.k and p.v: 2 multiply-adds per head dimension
    matmuls = 2 * (c.param_counts()["attention"] + c.param_counts()["feed_forward"] + c.vocab_size * c.dim)
    assert c.flops_per_token(3) == matmuls + per_position * 3 * 3
    assert c.flops_per_token(10) == matmuls + per_position * (4 + 10 + 4)
    with pytest.raises(ValueError, match="context must be a positive number of positions, got 0"):
        c.flops_per_token(0)


def test_dtype_bytes():
    assert [dtype_bytes(d) for d in ("float32", "torch.bfloat16", torch.float16, torch.int8)] == [4, 2, 2, 1]
    with pytest.raises(ValueError, match="unknown dtype 'float12'"):
        dtype_bytes("float12")


# ---- scripts/model_stats.py ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def script():
    """The script as a module, so most cases run main() here instead of a process importing torch."""
    spec = importlib.util.spec_from_file_location("_script_model_stats", ROOT / "scripts" / "model_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_prints_the_parts_the_total_and_kv_bytes():
    out = subprocess.run([sys.executable, "scripts/model_stats.py", "llama-3.2-1b", "--context", "8192"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "total            1,235,814,400" in text  # the model card's 1.24B
    assert "embedding          262,668,288" in text  # 128256 x 2048
    assert "(tied: the embedding's matrix)" in text
    assert "32,768 bytes per token" in text and "256.0 MiB per sequence of 8,192 tokens" in text
    assert "131,072 bytes per token; GQA stores 4x less" in text


def test_script_reads_a_checkpoints_config_and_lists_the_registry(script, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert script.main(["weights/kjv", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "dim 384, 6 layers, 6 query heads, 2 key/value heads" in out
    assert "2 (k, v) x 6 layers x 2 KV heads x 64 x 4 bytes" in out
    assert script.main(["--all"]) == 0
    table = capsys.readouterr().out
    for name, config in REGISTRY.items():
        assert f"{config.n_params:,}" in next(line for line in table.splitlines() if line.startswith(name + " "))


@pytest.mark.parametrize(
    "args, message",
    [
        (["llama-4"], "error: 'llama-4' is neither a registry model"),
        (["llama-3.2-1b", "--context", "0"], "error: --context must be at least 1, got 0"),
        ([], "error: give a model"),
        (["tests"], "error: tests: not a checkpoint"),
    ],
)
def test_script_user_errors(script, capsys, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)
    assert script.main(args) == 2
    assert capsys.readouterr().err.startswith(message)
