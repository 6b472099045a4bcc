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


# ---- --llama-cpp, with fake llama.cpp programs ---------------------------------------------------------
# The fakes are small Python programs written by the test: the converter and llama-quantize write
# a file saying what they were asked for, llama-bench prints llama-bench-shaped JSON whose speeds
# depend on the file's type, and each appends its arguments to calls.jsonl.

FAKE_SPEED = {"BF16": (10.0, 100.0), "Q8_0": (20.0, 80.0), "Q4_0": (40.0, 50.0)}  # type: (tg tok/s, pp tok/s)

FAKE_CONVERTER = """
import json, pathlib, sys
args = sys.argv[1:]
log = pathlib.Path(__file__).parent / "calls.jsonl"
source = pathlib.Path(args[0])
with open(log, "a") as f:
    f.write(json.dumps({"program": "convert", "args": args, "files": sorted(p.name for p in source.iterdir())}) + "\\n")
if (pathlib.Path(__file__).parent / "FAIL").exists():
    sys.exit("converter: something went wrong")
pathlib.Path(args[args.index("--outfile") + 1]).write_text("fake gguf BF16")
"""

FAKE_QUANTIZE = """
import json, pathlib, sys
args = sys.argv[1:]
with open(pathlib.Path(__file__).parents[2] / "calls.jsonl", "a") as f:
    f.write(json.dumps({"program": "quantize", "args": args}) + "\\n")
source, out, kind = args[:3]
assert pathlib.Path(source).read_text() == "fake gguf BF16"
pathlib.Path(out).write_text(f"fake gguf {kind}")
"""

FAKE_BENCH = """
import json, pathlib, sys
args = sys.argv[1:]
root = pathlib.Path(__file__).parents[2]
with open(root / "calls.jsonl", "a") as f:
    f.write(json.dumps({"program": "bench", "args": args}) + "\\n")
if (root / "FAIL_BENCH").exists():
    sys.exit("llama-bench: cannot load the model")
if (root / "GARBLED").exists():
    print("not json")
    sys.exit(0)
value = lambda flag: args[args.index(flag) + 1]
kind = pathlib.Path(value("-m")).read_text().split()[-1]
tg, pp = SPEED[kind]
tests = []
for depth in map(int, value("-d").split(",")):
    tests.append({"n_prompt": int(value("-p")), "n_gen": 0, "n_depth": depth, "avg_ts": pp, "stddev_ts": 1.0})
    tests.append({"n_prompt": 0, "n_gen": int(value("-n")), "n_depth": depth, "avg_ts": tg, "stddev_ts": 0.5})
print(json.dumps(tests, indent=2))
"""


def fake_llama_cpp(root: Path) -> Path:
    """A llama.cpp checkout at root: convert_hf_to_gguf.py, build/bin/llama-bench and llama-quantize (fakes)."""
    bin_dir = root / "build" / "bin"
    bin_dir.mkdir(parents=True)
    (root / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    for name, text in (("llama-quantize", FAKE_QUANTIZE), ("llama-bench", FAKE_BENCH.replace("SPEED", repr(FAKE_SPEED)))):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{text}")
        (bin_dir / name).chmod(0o755)
    return root / "build"


def calls(root: Path) -> list[dict]:
    path = root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, ffn_dim=128,
                                    max_seq_len=128, tie_word_embeddings=True))  # fmt: skip
    llama.save(model.to(torch.bfloat16), path)
    return path


def run_benchmark(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_llama_cpp_columns_convert_once_alternate_and_tabulate(tmp_path):
    build = fake_llama_cpp(tmp_path / "llama.cpp")
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    common = ["--checkpoint", checkpoint, "--llama-cpp", build, "--gguf-cache", tmp_path / "cache", "--threads", 1,
              "--prompt-len", 8, "--new-tokens", 4, "--repetitions", 1]  # fmt: skip
    out = run_benchmark(*common, "--precision", "bf16", "int4", "--rounds", 2, "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr

    # Converted once by the converter (with a stand-in tokenizer: the checkpoint has none), quantized
    # from its BF16 file to Q4_0 only; llama-bench run on each file per round with the flags asked for.
    log = calls(tmp_path / "llama.cpp")
    convert, quantize, *bench = log
    assert convert["program"] == "convert" and convert["args"][1:4] == ["--outtype", "bf16", "--outfile"]
    assert "tokenizer.model" in convert["files"] and "config.json" in convert["files"]
    assert quantize["program"] == "quantize" and quantize["args"][2:] == ["Q4_0", "1"]
    assert quantize["args"][0].endswith("-BF16.gguf")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and cached[0].endswith("-BF16.gguf") and cached[1].endswith("-Q4_0.gguf")
    assert cached[0].split("-")[0] == cached[1].split("-")[0]  # the checkpoint's content hash
    assert [b["program"] for b in bench] == ["bench"] * 4
    for b, kind in zip(bench, ["BF16", "Q4_0", "BF16", "Q4_0"]):
        assert b["args"][b["args"].index("-m") + 1] == str(tmp_path / "cache" / [c for c in cached if kind in c][0])
        assert " ".join(b["args"]).endswith("-t 1 -p 8 -n 4 -d 0 -r 1 -o json")

    # Rounds alternate who goes first: llama.cpp in round 1, ours in round 2.
    progress = [line.split(":")[0].strip() for line in out.stderr.splitlines() if line.strip().startswith("round ")]
    assert progress == ["round 1 BF16 llama.cpp", "round 1 bf16 ours", "round 1 Q4_0 llama.cpp", "round 1 int4 ours",
                        "round 2 bf16 ours", "round 2 BF16 llama.cpp", "round 2 int4 ours", "round 2 Q4_0 llama.cpp"]

    # The table: llama.cpp's numbers as the fake printed them, ours from the run, the ratios of the two.
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["round"], r["precision"], r["llama_cpp_type"]) for r in rows] == [
        (1, "bf16", "BF16"), (1, "int4", "Q4_0"), (2, "bf16", "BF16"), (2, "int4", "Q4_0")]
    for r in rows:
        ours = r["ours"]["depths"]["0"]
        tg, pp = FAKE_SPEED[r["llama_cpp_type"]]
        assert r["llama.cpp"]["depths"]["0"] == {"prefill": pp, "decode": tg, "decode_sd": 0.5}
        assert ours["decode"] > 0 and ours["prefill"] > 0
        line = (f"| {r['round']} | {r['precision']} / {r['llama_cpp_type']} | 0 | {ours['decode']:.2f} | {tg:.2f} | "
                f"{ours['decode'] / tg:.2f} | {ours['prefill']:.1f} | {pp:.1f} | {ours['prefill'] / pp:.2f} |")
        assert line in out.stdout.splitlines(), (line, out.stdout)
    # and over the rounds, per precision: the median ratio and the range
    for precision, kind in (("bf16", "BF16"), ("int4", "Q4_0")):
        tg, pp = FAKE_SPEED[kind]
        decode = sorted(r["ours"]["depths"]["0"]["decode"] / tg for r in rows if r["precision"] == precision)
        prefill = sorted(r["ours"]["depths"]["0"]["prefill"] / pp for r in rows if r["precision"] == precision)
        line = (f"| {precision} / {kind} | 0 | 2 | {(decode[0] + decode[1]) / 2:.2f} | {decode[0]:.2f}-{decode[1]:.2f} | "
                f"{(prefill[0] + prefill[1]) / 2:.2f} | {prefill[0]:.2f}-{prefill[1]:.2f} |")
        assert line in out.stdout.splitlines(), (line, out.stdout)

    # A second run on the same checkpoint converts nothing; a changed checkpoint is converted again.
    # (llama-bench, the first to run in round 1, fails from here on: the runs stop there, exit 2.)
    (tmp_path / "llama.cpp" / "FAIL_BENCH").touch()
    again = run_benchmark(*common, "--precision", "bf16", "int4")
    assert again.returncode == 2 and "error: llama-bench failed on" in again.stderr, again.stderr
    assert [c["program"] for c in calls(tmp_path / "llama.cpp")[len(log):]] == ["bench"]
    (checkpoint / "config.json").write_text((checkpoint / "config.json").read_text() + "\n")
    changed = run_benchmark(*common, "--precision", "bf16")
    assert changed.returncode == 2, changed.stderr
    assert [c["program"] for c in calls(tmp_path / "llama.cpp")[len(log) + 1:]] == ["convert", "bench"]
    assert len(list((tmp_path / "cache").iterdir())) == 3


@pytest.mark.parametrize("trouble", ["no build", "no converter", "converter fails", "bench fails", "bench garbled"])
def test_llama_cpp_trouble_is_an_error_not_a_traceback(tmp_path, trouble):
    build = fake_llama_cpp(tmp_path / "llama.cpp")
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    expected = {"no build": "no llama-bench in", "no converter": "no convert_hf_to_gguf.py in",
                "converter fails": "convert_hf_to_gguf.py failed (exit 1): converter: something went wrong",
                "bench fails": "llama-bench failed on", "bench garbled": "llama-bench's JSON output"}[trouble]
    if trouble == "no build":
        build = tmp_path / "nothing"
    elif trouble == "no converter":
        (tmp_path / "llama.cpp" / "convert_hf_to_gguf.py").unlink()
    else:
        (tmp_path / "llama.cpp" / {"converter fails": "FAIL", "bench fails": "FAIL_BENCH",
                                   "bench garbled": "GARBLED"}[trouble]).touch()  # fmt: skip
    out = run_benchmark("--checkpoint", checkpoint, "--llama-cpp", build, "--gguf-cache", tmp_path / "cache",
                        "--threads", 1, "--precision", "bf16", "--rounds", 1)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and expected in error[0], out.stderr
    if trouble == "converter fails":  # nothing half-written is left to be taken for a finished file
        assert list((tmp_path / "cache").iterdir()) == []


def test_ours_prefill_computes_the_last_tokens_logits_only():
    """llama-bench's pp asks for the logits of each batch's last token only; ours must do no more work
    than that (the output projection of every prompt token would be a fifth more than the rest)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from llama_cpp_peer import measure
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, ffn_dim=64,
                                    max_seq_len=64)).eval()  # fmt: skip
    outputs = []
    model.register_forward_hook(lambda module, args, output: outputs.append((args[0].shape[1], output.shape[1])))
    result = measure(model, prompt_len=8, new_tokens=3, depths=[0, 5], repetitions=1)
    assert set(result) == {"0", "5"} and all(r["prefill"] > 0 and r["decode"] > 0 for r in result.values())
    assert (8, 1) in outputs and (5, 5) in outputs  # the prompt: one position's logits; the untimed context: all
    assert all(n_logits == 1 for tokens, n_logits in outputs if tokens != 5)
