"""scripts/benchmark.py end to end on a tiny random checkpoint: every row it runs is measured and
tabulated (speed values are not checked, only that the runs happened and the numbers are sane)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama
from llama import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_runs_hf_and_ours(tmp_path):
    torch.manual_seed(0)
    llama.save(Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, ffn_dim=128,
                                       max_seq_len=128, tie_word_embeddings=True)), tmp_path / "ckpt")  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--checkpoint", str(tmp_path / "ckpt"),
         "--only", "hf-bf16", "ours-bf16", "ours-int8", "--batch", "1", "2", "--prompt-len", "8",
         "--new-tokens", "4", "--threads", "1", "--json", str(tmp_path / "b.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [(r["config"], r["batch"]) for r in results] == [
        (c, b) for b in (1, 2) for c in ("hf-bf16", "ours-bf16", "ours-int8")
    ]
    for r in results:
        assert "error" not in r, r
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_gb"] > 0
    table = out.stdout
    assert "| ours-int8 | 2 |" in table and "1.00x" in table  # hf-bf16 is its own baseline


def test_benchmark_rejects_a_missing_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--checkpoint", str(tmp_path)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "no config.json" in out.stderr
