"""scripts/finetune.py end to end on the bundled model (weights/kjv): LoRA, QLoRA and full runs, what
they write, pausing and resuming, --merge, the adapter in llama.load / generate.py / perplexity.py /
exact_match.py, and user errors (exit 2 with error: ..., before any training).

Scripts are not a package: main(argv) is called in-process after loading the file by path.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import llama
import weights
from llama.training import lora

SCRIPTS = Path(__file__).parents[1] / "scripts"
BUNDLED = str(weights.BUNDLED_MODEL)
WORDS = "light water king land city house river mountain garden child people bread".split()


def load_script(name: str):
    """scripts/NAME.py imported as the installed package llama_cli imports it (train.py and finetune.py
    import their sibling loop_flags.py relatively), from this checkout's scripts/ whatever is installed."""
    if getattr(sys.modules.get("llama_cli"), "__path__", None) != [str(SCRIPTS)]:
        spec = importlib.util.spec_from_file_location("llama_cli", SCRIPTS / "__init__.py",
                                                      submodule_search_locations=[str(SCRIPTS)])  # fmt: skip
        package = importlib.util.module_from_spec(spec)
        sys.modules["llama_cli"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"llama_cli.{name}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    records = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in WORDS]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:10]))
    (directory / "valid.json").write_text(json.dumps(records[10:], indent=1))
    return directory


def run(argv, capsys):
    code = load_script("finetune").main(argv)
    return code, capsys.readouterr().err


def base_args(data, out, *extra):
    return ["--checkpoint", BUNDLED, "--data", str(data / "train.jsonl"), "--valid", str(data / "valid.json"),
            "--out", str(out), "--batch-size", "4", "--max-steps", "4", "--eval-every", "2", "--no-progress",
            "--precision", "float32",
            # 0: leave glibc's heap as it is: the script's mallopt would stay set for the test process
            "--malloc-mmap-threshold", "0", *extra]  # fmt: skip


def test_lora_run_writes_a_peft_adapter_that_loads_everywhere(data, tmp_path, capsys):
    out = tmp_path / "lora"
    code, err = run(base_args(data, out, "--lr", "1e-2", "--merge"), capsys)
    assert code == 0, err
    assert "lora: 316,416 trainable" in err and "done: train loss" in err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 4 and summary["trainable_parameters"] == 316_416
    assert summary["data"]["examples"] == 10 and summary["data"]["valid_examples"] == 2
    assert list(summary["valid_losses"]) == ["2", "4"] and summary["method"]["lora_rank"] == 8
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == sorted(lora.DEFAULT_TARGETS)
    assert (out / "adapter_model.safetensors").stat().st_size < 2_000_000

    base = llama.load(BUNDLED, dtype="float32")
    adapted = llama.load(BUNDLED, dtype="float32", adapter=out)
    merged = llama.load(out / "merged", dtype="float32")  # written in bfloat16
    x = torch.randint(0, 4096, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, m = base(x), adapted(x), merged(x)
    assert (a - b).abs().max() > 1e-3  # the adapter trained
    assert ((m - b).abs().max() / b.abs().max()).item() < 2e-2  # bf16 rounding of the merged weights
    assert llama.load_tokenizer(out / "merged").vocab_size == 4096

    for script, argv, expected in [
        ("generate", ["--adapter", str(out), "--prompt", "In the beginning", "--max-new-tokens", "3", "--temperature", "0"], None),
        ("perplexity", ["--checkpoint", BUNDLED, "--adapter", str(out), "--text-file", str(data / "train.jsonl"), "--no-progress"], "perplexity "),
        ("exact_match", ["--adapter", str(out), "--data", str(data / "valid.json")], "exact match "),
    ]:  # fmt: skip
        assert load_script(script).main(argv) == 0, script
        captured = capsys.readouterr()
        assert expected is None or expected in captured.out, captured


def test_paused_and_resumed_lora_run_equals_an_uninterrupted_one(data, tmp_path, capsys):
    args = ["--lora-dropout", "0.1", "--packing", "--context", "128"]
    assert run(base_args(data, tmp_path / "a", *args), capsys)[0] == 0
    code, err = run(base_args(data, tmp_path / "b", *args, "--stop-at", "2"), capsys)
    assert code == 0 and "paused at step 2 of 4" in err
    code, err = run(base_args(data, tmp_path / "b", *args), capsys)
    assert code == 2 and "pass --resume" in err
    code, err = run(base_args(data, tmp_path / "b", *args, "--lora-rank", "4", "--resume"), capsys)
    assert code == 2 and "lora_rank: saved 8, now 4" in err
    assert run(base_args(data, tmp_path / "b", *args, "--resume"), capsys)[0] == 0
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_qlora_and_full_runs(data, tmp_path, capsys):
    out = tmp_path / "qlora"
    code, err = run(base_args(data, out, "--method", "qlora", "--quantize", "int8", "--gradient-checkpointing",
                              "--dtype", "bfloat16", "--precision", "bf16", "--max-steps", "2", "--lr", "1e-2",
                              "--merge", "--to", "meta"), capsys)  # fmt: skip
    assert code == 0, err
    assert "base in int8" in err
    model = llama.load(BUNDLED, quantize="int8", adapter=out)  # stays an unmerged adapter on the int8 base
    assert isinstance(model.layers[0].attention.wq, lora.LoRALinear)
    merged = llama.load(out / "merged", dtype="float32")  # Meta layout: the float base with the adapter merged
    assert (out / "merged" / "params.json").is_file()
    adapted = llama.load(BUNDLED, dtype="float32", adapter=out)
    x = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert ((merged(x) - adapted(x)).abs().max() / adapted(x).abs().max()).item() < 2e-2  # bf16 rounding
    argv = ["--adapter", str(out), "--quantize", "int8", "--dtype", "bfloat16", "--max-new-tokens", "3", "--temperature", "0"]
    assert load_script("generate").main(argv) == 0  # the kernels take the adapter's int8 base

    out = tmp_path / "full"
    code, err = run(base_args(data, out, "--method", "full", "--layers", "5", "--save-dtype", "float32"), capsys)
    assert code == 0, err
    tuned, base = llama.load(out).state_dict(), llama.load(BUNDLED, dtype="float32").state_dict()
    changed = {name for name in base if not torch.equal(tuned[name], base[name])}
    assert changed and all(name.startswith("layers.5.") for name in changed)
    assert llama.load_tokenizer(out).vocab_size == 4096


def test_rope_scaling_fine_tunes_to_a_longer_context(data, tmp_path, capsys):
    """--rope-scaling linear:2 on the bundled model (context 256): rows of 512 tokens are allowed and the
    fine-tuned checkpoint carries the scaling and its context, as llama.load(rope_scaling=) gives them."""
    out = tmp_path / "long"
    code, err = run(base_args(data, out, "--method", "full", "--layers", "5", "--rope-scaling", "linear:2",
                              "--context", "512", "--max-steps", "2"), capsys)  # fmt: skip
    assert code == 0, err
    tuned = llama.load(out).config
    expected = llama.load(BUNDLED, rope_scaling="linear:2").config
    assert (tuned.rope_scaling, tuned.max_seq_len) == (expected.rope_scaling, expected.max_seq_len)
    assert tuned.max_seq_len == 512 and tuned.rope_scaling.kind == "linear" and tuned.rope_scaling.factor == 2
    code, err = run(base_args(data, tmp_path / "bad", "--rope-scaling", "sideways:2"), capsys)
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and "sideways" in err, err


def test_user_errors_exit_2_before_training(data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "outptu": "b"}\n')
    cases = [
        (["--data", str(bad)], f"error: {bad}:2: unknown field 'outptu'"),
        (["--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--method", "qlora", "--quantize", "int4", "--group-size", "48"], "int4 group_size must be one of 32, 64, 128, 256"),
        (["--lora-targets", "q_proj,attn"], "unknown LoRA target 'attn'"),
        (["--set", "n_layers=4"], "--set n_layers: a loaded checkpoint keeps its architecture"),
        (["--set", "rope_scaling=linear"], "rope_scaling"),
        (["--context", "512"], "context 512 exceeds the model's max_seq_len 256"),
        (["--method", "full", "--layers", "6"], "layers [6] do not exist; the model has layers 0..5"),
        (["--method", "lora", "--layers", "6"], "layers [6] do not exist; the model has layers 0..5"),
        (["--method", "lora", "--quantize", "int8"], "quantize='int8' is for method qlora"),
        (["--malloc-mmap-threshold", "-1"], "the mmap threshold must be >= 0 bytes, got -1"),
        (["--checkpoint", str(tmp_path)], "error: "),
    ]  # fmt: skip
    for extra, message in cases:
        argv = base_args(data, tmp_path / "out")
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        code, err = run(argv, capsys)
        assert code == 2 and message in err and err.splitlines()[-1].startswith("error: "), (extra, err)
        assert not (tmp_path / "out" / "train_state.pt").exists()


@pytest.mark.slow
def test_memory_script_measures_each_configuration_in_its_own_process(tmp_path, capsys):
    """scripts/finetune_memory.py on a tiny random checkpoint: one row per configuration, from a child process."""
    from random_models import random_model

    config = llama.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=128, max_seq_len=64)
    llama.save(random_model(config, std=0.05), tmp_path / "tiny")
    argv = ["--checkpoint", str(tmp_path / "tiny"), "--context", "32", "--steps", "2", "--threads", "1",
            "--only", "lora-bf16-ckpt", "qlora-int8", "--json", str(tmp_path / "rows.json")]  # fmt: skip
    assert load_script("finetune_memory").main(argv) == 0
    table = capsys.readouterr().out
    assert "| LoRA, bf16 base | yes |" in table and "| QLoRA, int8 base | no |" in table
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["config"] for r in rows] == ["lora-bf16-ckpt", "qlora-int8"]
    assert all(r["peak_gb"] >= r["after_load_gb"] > r["runtime_gb"] > 0 for r in rows)
    assert rows[0]["trainable"] == 2 * (8 * (64 + 64) * 2 + 8 * (64 + 32) * 2 + 8 * (64 + 128) * 3)  # r (in + out) per projection


@pytest.mark.parametrize("script", ["finetune.py", "exact_match.py", "finetune_memory.py", "make_kjv_instructions.py"])
def test_help_does_not_import_torch(script):
    """As a user runs it (the script's folder first on sys.path, loop_flags.py its sibling)."""
    import subprocess

    result = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPTS / script), "--help"], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "llama" not in imported


def test_the_choices_spelled_out_for_help_are_the_librarys():
    from llama.loading import SETTABLE_FIELDS
    from llama.training.finetune import METHODS

    script = load_script("finetune")
    assert (script.METHODS, script.LORA_TARGETS, script.SETTABLE_FIELDS) == (METHODS, lora.DEFAULT_TARGETS, SETTABLE_FIELDS)


def test_the_shipped_adapter_belongs_to_the_bundled_model():
    """weights/kjv-lora (the README's walkthrough, made by scripts/kjv_lora_example.sh) was trained on
    the bundled weights as they are now: a retrained weights/kjv needs the example run again."""
    import hashlib

    shipped = Path(weights.BUNDLED_MODEL).parent / "kjv-lora"
    recorded = (shipped / "base_model.sha256").read_text().split()[0]
    actual = hashlib.sha256((Path(BUNDLED) / "model.safetensors").read_bytes()).hexdigest()
    assert actual == recorded, "weights/kjv changed since its adapter was trained: rerun bash scripts/kjv_lora_example.sh"
    assert (shipped / "adapter_model.safetensors").stat().st_size <= 2_000_000
    before = json.loads((shipped / "exact_match_before.json").read_text())
    after = json.loads((shipped / "exact_match_after.json").read_text())
    assert before["n"] == after["n"] and after["score"] > before["score"]
    config = json.loads((shipped / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    model = llama.load(BUNDLED, dtype="float32", adapter=shipped)  # merged into the base
    assert not list(lora.lora_modules(model))
