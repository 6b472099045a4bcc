"""The context-extension walkthrough's scripts on small settings: train.py --init-from/--rope-scaling
(fine-tuning a checkpoint to a longer context), position_perplexity.py and extend_context.py (the
whole walkthrough), and --rope-scaling / --kv-cache-dtype where generate.py loads a model.

A tiny random checkpoint (context 32) with the bundled model's tokenizer, a corpus written here;
expected losses come from plain forwards in this process, not from the code under test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llama
import weights
from llama import ModelConfig
from llama.core.generation import generate
from llama.training.pretrain import encode_documents
from random_models import random_model

ROOT = Path(__file__).parents[1]
SCRIPTS = ROOT / "scripts"
CONTEXT = 32
WORDS = "in the beginning god created heaven and earth light darkness water land seed fruit day night".split()


def load_script(name: str):
    """scripts/NAME.py imported as the installed package llama_cli imports it (train.py imports its
    sibling loop_flags.py relatively), from this checkout's scripts/ whatever is installed."""
    if getattr(sys.modules.get("llama_cli"), "__path__", None) != [str(SCRIPTS)]:
        spec = importlib.util.spec_from_file_location("llama_cli", SCRIPTS / "__init__.py",
                                                      submodule_search_locations=[str(SCRIPTS)])  # fmt: skip
        package = importlib.util.module_from_spec(spec)
        sys.modules["llama_cli"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"llama_cli.{name}")


def script(name: str, *args, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_file() -> Path:
    return weights.BUNDLED_MODEL / "tokenizer.model"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_file) -> Path:
    vocab = llama.load_tokenizer(tokenizer_file).vocab_size
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_dim=64, max_seq_len=CONTEXT)
    path = tmp_path_factory.mktemp("ckpt")
    llama.save(random_model(config, seed=0, std=0.2), path)
    shutil.copy(tokenizer_file, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist()) for _ in range(260)]
    path = tmp_path_factory.mktemp("corpus")
    (path / "train.txt").write_text("\n".join(lines[:200]) + "\n")
    (path / "valid.txt").write_text("\n".join(lines[200:]) + "\n")
    return path


def expected_nll(model: llama.Transformer, rows: torch.Tensor) -> torch.Tensor:
    """Mean NLL at each position of rows (N, L), from one plain forward."""
    with torch.no_grad():
        logits = model(rows)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), rows[:, 1:], reduction="none").double().mean(0)


def test_train_init_from_refuses_shape_flags_and_scaling_without_a_checkpoint(checkpoint, corpus, tmp_path, capsys):
    train = load_script("train")
    base = ["--data", str(corpus / "train.txt"), "--out", str(tmp_path / "out"), "--max-steps", "1"]
    assert train.main([*base, "--init-from", str(checkpoint), "--dim", "64", "--n-layers", "2"]) == 2
    assert "error: --init-from gives the model's shape; drop --dim, --n-layers" in capsys.readouterr().err
    assert train.main([*base, "--tokenizer", str(checkpoint / "tokenizer.model"), "--dim", "32", "--n-layers", "1",
                       "--n-heads", "4", "--rope-scaling", "linear:2"]) == 2  # fmt: skip
    assert "error: --rope-scaling extends the context of a trained model: give it --init-from" in capsys.readouterr().err
    assert train.main([*base, "--init-from", str(checkpoint), "--context", str(2 * CONTEXT)]) == 2
    assert f"error: --context {2 * CONTEXT} is beyond the model's context of {CONTEXT}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_extend_context_walkthrough(checkpoint, corpus, tmp_path):
    """extend_context.py: both fine-tunings start from the checkpoint and keep their scaling in the
    saved config; the plot and the per-position losses are written, and the losses of the models
    scored without training are those of plain forwards over the same windows."""
    out = tmp_path / "extend"
    result = script("extend_context", "--checkpoint", checkpoint, "--data", corpus / "train.txt", "--valid",
                    corpus / "valid.txt", "--factor", 2, "--finetune", "linear,yarn", "--out", out, "--max-steps", 2,
                    "--batch-size", 2, "--threads", 1, "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "$ python " in result.stderr and "train.py" in result.stderr and "--rope-scaling linear:2" in result.stderr

    for kind in ("linear", "yarn"):
        tuned = llama.load(out / kind)
        assert tuned.config.max_seq_len == 2 * CONTEXT and tuned.config.trained_context == CONTEXT
        assert tuned.config.rope_scaling.kind == kind and tuned.config.rope_scaling.factor == 2
        summary = json.loads((out / kind / "train_summary.json").read_text())
        assert summary["completed"] and summary["init_from"] == str(checkpoint) and summary["training"]["context"] == 64
        original = llama.load(checkpoint)
        assert not torch.equal(tuned.layers[0].attention.wq.weight, original.layers[0].attention.wq.weight)  # it trained

    assert (out / "context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "context.json").read_text())
    labels = ["no scaling", "PI x2", "YaRN x2", "PI x2, fine-tuned", "YaRN x2, fine-tuned"]
    assert list(data["nll"]) == labels and all(len(v) == 2 * CONTEXT - 1 for v in data["nll"].values())
    for label in labels:
        assert f"| {label} |" in result.stdout

    tokenizer = llama.load_tokenizer(checkpoint)
    stream = torch.as_tensor(encode_documents(tokenizer, [(corpus / "valid.txt").read_text()]), dtype=torch.long)
    n = len(stream) // (2 * CONTEXT)
    rows = stream[: n * 2 * CONTEXT].view(n, 2 * CONTEXT)
    assert data["windows"] == n
    model = llama.load(checkpoint, dtype=torch.float32)
    for label, spec in (("no scaling", None), ("PI x2", "linear:2"), ("YaRN x2", "yarn:2")):
        if spec is not None:
            model.set_rope_scaling(spec)
        assert torch.allclose(torch.tensor(data["nll"][label], dtype=torch.float64), expected_nll(model, rows),
                              rtol=1e-4, atol=1e-5), label  # fmt: skip
    # Reused when run again: no training, only the scoring.
    again = script("extend_context", "--checkpoint", checkpoint, "--data", corpus / "train.txt", "--valid",
                   corpus / "valid.txt", "--factor", 2, "--finetune", "linear", "--out", out, "--threads", 1)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "fine-tuned already, reused" in again.stderr and "train.py" not in again.stderr


def test_extend_context_usage_errors(tmp_path):
    result = script("extend_context", "--data", tmp_path / "missing.txt", "--valid", tmp_path / "missing.txt",
                    "--out", tmp_path / "out")  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "missing.txt" in result.stderr
    result = script("extend_context", "--data", "x", "--valid", "x", "--out", "y", "--finetune", "ntk")
    assert result.returncode == 2 and "unknown scalings ['ntk']" in result.stderr and "Traceback" not in result.stderr


def test_generate_with_rope_scaling_and_an_int8_cache(checkpoint):
    """generate.py --rope-scaling runs the checkpoint at the longer context (a prompt + answer beyond
    the trained one), --kv-cache-dtype int8 decodes through the quantized cache; the greedy tokens are
    those of the library with the same settings, and the summary reports the cache's size."""
    tokenizer = llama.load_tokenizer(checkpoint)
    prompt = " ".join(WORDS)
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    n_new = 2 * CONTEXT - len(ids)
    assert len(ids) < CONTEXT < len(ids) + n_new
    result = script("generate", "--checkpoint", checkpoint, "--prompt", prompt, "--rope-scaling", "yarn:2",
                    "--kv-cache-dtype", "int8", "--temperature", 0, "--max-new-tokens", n_new, "--dtype", "float32",
                    "--device", "cpu", "--threads", 1, "--no-kernels")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"yarn RoPE scaling x2 of {CONTEXT} positions: context {2 * CONTEXT}" in result.stderr
    model = llama.load(checkpoint, dtype=torch.float32, rope_scaling="yarn:2", kv_cache_dtype="int8")
    expected = generate(model, [ids], n_new, temperature=0, stop_tokens=list(tokenizer.stop_tokens))[0]
    assert tokenizer.decode(ids) == prompt
    assert result.stdout == tokenizer.decode(ids + expected) + "\n"  # the prompt, then its continuation
    size = model.config.kv_cache_bytes_per_token("int8") * (len(ids) + n_new)
    assert f"KV cache {size / 1e3:.1f} kB int8" in result.stderr
    refused = script("generate", "--checkpoint", checkpoint, "--rope-scaling", "ntk:2", "--threads", 1)
    assert refused.returncode == 2 and "error: unknown RoPE scaling type 'ntk'" in refused.stderr
