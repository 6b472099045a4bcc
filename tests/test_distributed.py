"""Tensor parallelism and multi-process training on torch.distributed: CPU, gloo, processes started
by the test itself with torchrun (tests/distributed_worker.py), against one process's results.

float32 throughout: a split matmul sums in another order, so logits agree to ~1e-6 relative; the
tolerance is 1e-5 (the issue's), far below what a wrong head, slice or missing all_reduce changes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from llama import ModelConfig

WORKER = Path(__file__).with_name("distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import random_model, tokens  # noqa: E402  (the same models, built here)

from llama.core.generation import generate  # noqa: E402

pytestmark = pytest.mark.slow  # each case starts torchrun and its processes
RTOL = 1e-5

BASE = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=99, ffn_dim=96, max_seq_len=64)
LAYOUTS = {
    "GQA": BASE,
    "MHA": BASE.replace(n_kv_heads=4),
    "MQA tied": BASE.replace(n_kv_heads=1, tie_word_embeddings=True),  # one kv head, replicated on both ranks
    "variants": BASE.replace(qk_norm=True, sliding_window=5, nope_layers=(1,), mlp="gelu"),
}


def run(case: str, args: dict, nproc: int = 2) -> list[dict]:
    """What each rank reported, ordered by rank."""
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                str(free_port()), str(WORKER), case, json.dumps(args), out]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return [json.loads((Path(out) / f"rank_{r}.json").read_text()) for r in range(nproc)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_model_equals_one_process(layout):
    config = LAYOUTS[layout]
    results = run("shard_logits", {"config": config.to_dict()})
    model = random_model(config)
    t = tokens(config)
    with torch.no_grad():
        expected = model(t)
    greedy = generate(model, [[1, 2, 3], [4, 5]], 8, temperature=0, stop_tokens=[])
    for r in results:
        assert rel(r["full"], expected) < RTOL
        assert rel(r["decoded"], expected) < RTOL  # each rank's KV cache holds only its heads
        assert r["greedy"] == greedy
        assert r["heads"][0] == [config.n_heads // 2, max(1, config.n_kv_heads // 2)]


def test_kernels_optimize_a_sharded_model():
    """kernels.optimize fuses a rank's column-parallel projections and keeps the row- and vocabulary-
    parallel modules (with their collectives): the same logits as one plain process."""
    results = run("shard_logits", {"config": BASE.to_dict(), "kernels": True})
    model = random_model(BASE)
    with torch.no_grad():
        expected = model(tokens(BASE))
    for r in results:
        assert "error" not in r, r
        assert rel(r["full"], expected) < RTOL and rel(r["decoded"], expected) < RTOL


def test_kernels_refuse_an_unknown_parallel_module():
    """A subclass of a parallel module (say a researcher's) is not one kernels was written for: refused by name."""
    import kernels
    from llama.distributed import RowParallelLinear
    from llama.core.support import UnsupportedModelError

    class OverlappedRowParallel(RowParallelLinear):
        pass

    model = random_model(BASE)
    model.layers[0].attention.wo = OverlappedRowParallel(BASE.dim, BASE.dim)
    with pytest.raises(UnsupportedModelError, match="OverlappedRowParallel"):
        kernels.optimize(model)
    assert type(model.layers[1].attention).__name__ == "Attention"  # refused before changing anything


# ---- loading per rank ---------------------------------------------------------------------------------------

import llama  # noqa: E402

# 8 query and 4 kv heads: Meta's format splits kv heads across shards, so 4 shards need 4 of them.
SHARDED = BASE.replace(n_heads=8, n_kv_heads=4, head_dim=8, vocab_size=96)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random model as Meta files of 1, 2 and 4 shards (the embedding split on its width, as in
    Llama 2) and as HF safetensors in several shard files."""
    model = random_model(SHARDED)
    root = tmp_path_factory.mktemp("tp")
    for n in (1, 2, 4):
        llama.save(model, root / f"meta-{n}", format="meta", n_shards=n)
    llama.save(model, root / "hf-sharded", format="hf", max_shard_bytes=30_000)
    with torch.no_grad():
        expected = model(tokens(SHARDED))
    return root, expected


@pytest.mark.parametrize("layout, nproc", [("meta-1", 2), ("meta-2", 2), ("meta-4", 2), ("hf-sharded", 2), ("meta-2", 4)])
def test_each_rank_loads_its_part(checkpoints, layout, nproc):
    root, expected = checkpoints
    assert layout != "hf-sharded" or len(list((root / layout).glob("*.safetensors"))) > 2
    results = run("load_logits", {"path": str(root / layout)}, nproc=nproc)
    full_bytes = sum(p.numel() * 4 for p in random_model(SHARDED).parameters())
    for r in results:
        assert rel(r["full"], expected) < RTOL
        # Each rank holds about 1/nproc of the model: the norms are replicated (and tiny).
        assert r["bytes"] < full_bytes / nproc * 1.1


# ---- a server: rank 0 drives, the others follow -------------------------------------------------------------


def test_engine_on_rank_0_drives_the_followers():
    """The continuous-batching engine on rank 0, over a Leader; rank 1 mirrors every call. Outputs equal
    one process's engine (the bundled tokenizer's vocabulary: 4096)."""
    import threading  # noqa: F401

    import weights
    from distributed_worker import run_requests
    from llama.serving.engine import Engine

    config = BASE.replace(vocab_size=4096)
    prompts = [[1, 5, 9, 200], [1, 7], [1, 3000, 4, 4, 4, 9], [1, 2, 3]]
    results = run("engine_outputs", {"config": config.to_dict(), "prompts": prompts})
    engine = Engine(random_model(config), llama.load_tokenizer(weights.BUNDLED_MODEL), max_batch_size=4, max_seq_len=32)
    engine.start()
    try:
        expected = run_requests(engine, prompts)
    finally:
        engine.stop()
    assert "error" not in results[0] and "error" not in results[1], results
    assert results[0]["outputs"] == expected
    assert results[1]["followed"] > len(prompts)  # setup_cache, prefills and decode steps


# ---- the scripts under torchrun -----------------------------------------------------------------------------

SCRIPTS = Path(__file__).parents[1] / "scripts"
FLOAT = ["--dtype", "float32", "--threads", "1"]


@pytest.fixture(scope="module")
def script_checkpoint(tmp_path_factory) -> Path:
    """A small random model with the bundled model's tokenizer (4096 tokens)."""
    import shutil

    import weights

    path = tmp_path_factory.mktemp("tp-script")
    llama.save(random_model(BASE.replace(vocab_size=4096)), path)
    shutil.copy(weights.BUNDLED_MODEL / "tokenizer.model", path)
    return path


def torchrun(script: str, *args, nproc: int = 2) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), str(SCRIPTS / script), *map(str, args)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def one_process(script: str, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def ranks(script: str, *args, nproc: int = 2, env: dict | None = None) -> list[subprocess.Popen]:
    """The ranks started as torchrun starts them (its environment variables), so that the test sees each
    one's exit status and output."""
    import os

    port = str(free_port())
    return [subprocess.Popen([sys.executable, str(SCRIPTS / script), *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(env or {})))
            for r in range(nproc)]  # fmt: skip


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each rank."""
    outputs = [p.communicate(timeout=timeout) for p in processes]
    return [(p.returncode, *output) for p, output in zip(processes, outputs)]


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "0.8", "--seed", "7"]])
def test_generate_under_torchrun_prints_one_process_text(script_checkpoint, sampling):
    args = ["--checkpoint", script_checkpoint, "--max-new-tokens", "16", *FLOAT, *sampling]
    expected = one_process("generate.py", *args)
    done = torchrun("generate.py", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.stdout  # rank 0's text, once: the other rank prints nothing
    assert done.stderr.count("tensor-parallel over 2 processes") == 1


def test_perplexity_under_torchrun_equals_one_process(script_checkpoint, tmp_path):
    import re

    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth.\nAnd the earth was without form.\n" * 3)
    args = ["--checkpoint", script_checkpoint, "--text-file", text, "--context-len", "16", "--stride", "8",
            "--no-progress", *FLOAT]  # fmt: skip
    value = lambda out: float(re.search(r"perplexity (\S+)", out)[1])  # noqa: E731
    expected = value(one_process("perplexity.py", *args).stdout)
    done = torchrun("perplexity.py", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("perplexity ") == 1
    assert value(done.stdout) == pytest.approx(expected, rel=RTOL)


def test_serve_under_torchrun_answers_as_one_process(script_checkpoint):
    """Rank 0 serves, rank 1 follows; greedy completions equal the library's in this process; on SIGTERM
    rank 0 shuts down and releases rank 1: both exit 0."""
    import signal
    import time
    import urllib.request

    port = free_port()
    processes = ranks("serve.py", "--checkpoint", script_checkpoint, "--port", port, *FLOAT)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert all(p.poll() is None for p in processes), finish(processes)
                time.sleep(0.5)
        body = json.dumps({"prompt": "In the beginning", "max_tokens": 12, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})  # fmt: skip
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["choices"][0]["text"]
    finally:
        processes[0].send_signal(signal.SIGTERM)
        results = finish(processes, timeout=60)
    llm = llama.Llama.load(script_checkpoint, dtype="float32")
    ids = llm.tokenizer.encode("In the beginning", bos=True, eos=False)
    expected = llama.generate(llm.model, [ids], 12, temperature=0, stop_tokens=llm.tokenizer.stop_tokens)[0]
    assert answer == llm.tokenizer.decode(expected)
    assert [status for status, _, _ in results] == [0, 0], results
    assert results[1][1] == results[1][2] == ""  # the follower prints nothing


# ---- errors: one line, from rank 0; every rank exits 2 -------------------------------------------------------


def error_cases(checkpoint: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    odd = tmp / "odd-heads"  # 3 heads: not divisible by 2 ranks
    llama.save(random_model(BASE.replace(dim=48, n_heads=3, n_kv_heads=3, vocab_size=4096)), odd)
    (odd / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    return {
        "tp not the world size": (["generate.py", "--checkpoint", checkpoint, "--tp", "3"], "--tp 3 does not match the 2"),
        "heads not divisible": (["generate.py", "--checkpoint", odd], "n_heads 3 is not divisible by the world size 2"),
        "missing checkpoint": (["perplexity.py", "--checkpoint", tmp / "nothing", "--text-file", __file__], "nothing"),
        "interactive under tp": (["generate.py", "--checkpoint", checkpoint, "--interactive"], "--interactive runs in one"),
        "port taken": (["serve.py", "--checkpoint", checkpoint, "--port", "PORT"], "cannot listen on"),
        "usage": (["serve.py", "--max-batch-size", "0"], "--max-batch-size must be at least 1"),
    }


def test_user_errors_print_one_line_and_every_rank_exits_2(script_checkpoint, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = error_cases(script_checkpoint, tmp_path)
        started = {name: ranks(*[port if a == "PORT" else a for a in argv], *FLOAT[2:]) for name, (argv, _) in cases.items()}
        results = {name: finish(processes, timeout=120) for name, processes in started.items()}
    for name, (_, message) in cases.items():
        (status0, out0, err0), (status1, out1, err1) = results[name]
        assert (status0, status1) == (2, 2), (name, results[name])
        assert "Traceback" not in err0 + err1, (name, err0, err1)
        assert out1 == err1 == "", name  # only rank 0 speaks
        lines = [line for line in err0.splitlines() if "error:" in line]
        assert len(lines) == 1 and message in lines[0], (name, err0)


def test_tp_without_torchrun_is_refused(script_checkpoint):
    done = subprocess.run([sys.executable, str(SCRIPTS / "generate.py"), "--checkpoint", str(script_checkpoint), "--tp", "2"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --tp 2 needs 2 processes: start the script with torchrun")


def test_a_rank_that_fails_stops_them_all():
    """together(): rank 1 fails (a checkpoint missing on its machine), rank 0 does not -- rank 0 raises
    naming rank 1 instead of waiting for it in the next collective."""
    results = run("one_rank_fails", {})
    assert results[1]["error"] == "CheckpointError"
    assert results[0]["error"] == "TensorParallelError"
    assert results[0]["message"] == "rank 1 failed: no checkpoint on this machine"


# ---- data-parallel training with FSDP2 ----------------------------------------------------------------------

TRAIN = BASE.replace(vocab_size=128)


def train_one_process(out: Path, **options):
    from distributed_worker import training_setup

    from llama.training import loop

    model, data, config = training_setup({"config": TRAIN.to_dict()})
    result = loop.train(model, data, config, out_dir=out, progress=False, **options)
    return [loss for _, loss in result.train_losses], {name: t.detach() for name, t in model.state_dict().items()}


def check_same_run(results: list[dict], losses: list[float], weights: dict) -> None:
    for r in results:
        assert "error" not in r, r
        assert [loss for _, loss in r["losses"]] == pytest.approx(losses, rel=1e-4)
    trained = results[0]["weights"]
    assert set(trained) == set(weights)
    for name, expected in weights.items():
        assert rel(trained[name], expected) < 1e-4, name


def test_fsdp_training_equals_one_process_on_the_same_global_batch(tmp_path):
    """5 steps on 2 ranks (each 2 of the 4 rows of every micro-batch, 2 micro-batches a step) give one
    process's losses and final weights (float32)."""
    losses, weights = train_one_process(tmp_path / "one")
    assert losses[-1] < losses[0]  # it learns: a wrong scaling of the loss or the gradients would show
    results = run("fsdp_train", {"config": TRAIN.to_dict(), "out": str(tmp_path / "two")})
    check_same_run(results, losses, weights)


def test_a_state_saved_by_2_processes_resumes_in_1_and_back(tmp_path):
    """Paused at step 3 on 2 ranks, finished in 1 process; paused at 3 in 1 process, finished on 2 ranks:
    both equal the uninterrupted run."""
    losses, weights = train_one_process(tmp_path / "straight")
    run("fsdp_train", {"config": TRAIN.to_dict(), "out": str(tmp_path / "a"), "stop_at": 3})
    resumed_losses, resumed_weights = train_one_process(tmp_path / "a", resume=True)
    assert resumed_losses == pytest.approx(losses, rel=1e-4)
    for name, expected in weights.items():
        assert rel(resumed_weights[name].tolist(), expected) < 1e-4, name
    train_one_process(tmp_path / "b", stop_at=3)
    results = run("fsdp_train", {"config": TRAIN.to_dict(), "out": str(tmp_path / "b"), "resume": True})
    check_same_run(results, losses, weights)


def test_train_script_under_torchrun_writes_one_process_checkpoint(tmp_path):
    """scripts/train.py on 2 ranks (FSDP2, automatic under torchrun): the same losses, and rank 0 writes
    the whole checkpoint, which loads in one process with the one-process run's weights."""
    import weights

    lines = [" ".join(["in the beginning god created the heaven and the earth"][0].split()[i % 7 :]) for i in range(200)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    args = ["--data", tmp_path / "train.txt", "--tokenizer", weights.BUNDLED_MODEL / "tokenizer.model", "--dim", "64",
            "--n-layers", "2", "--n-heads", "4", "--context", "32", "--max-steps", "4", "--batch-size", "4",
            "--precision", "float32", "--save-dtype", "float32", "--no-progress", "--threads", "1"]  # fmt: skip
    one_process("train.py", *args, "--out", tmp_path / "one")
    done = torchrun("train.py", *args, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr
    summaries = [json.loads((tmp_path / run / "train_summary.json").read_text()) for run in ("one", "two")]
    assert summaries[1]["final_train_loss"] == pytest.approx(summaries[0]["final_train_loss"], rel=1e-4)
    one, two = (llama.load(tmp_path / run).state_dict() for run in ("one", "two"))
    for name, expected in one.items():
        assert rel(two[name], expected) < 1e-4, name


def test_fsdp_without_torchrun_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "train.py"), "--data", __file__, "--tokenizer", "x", "--out",
                           str(tmp_path / "o"), "--fsdp"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: --fsdp trains over several processes: start with torchrun" in done.stderr


@pytest.mark.parametrize("method", [["--method", "lora"], ["--method", "full", "--layers", "5"]])
def test_finetune_script_under_torchrun_equals_one_process(tmp_path, method):
    """scripts/finetune.py on 2 ranks (FSDP2 under torchrun, each rank half of every micro-batch): the
    losses of one process on the same global batch, and rank 0 writes the adapter / checkpoint, with
    one process's weights."""
    import weights
    from safetensors.torch import load_file

    words = "light darkness waters heaven earth seas grass herb tree fruit seed kind day night evening morning".split()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"instruction": f"Say word {i}", "output": w}) + "\n"
                                                  for i, w in enumerate(words)))  # fmt: skip
    args = ["--checkpoint", weights.BUNDLED_MODEL, "--data", tmp_path / "train.jsonl", "--batch-size", "4",
            "--max-steps", "3", "--lr", "1e-3", "--precision", "float32", "--dtype", "float32", "--save-dtype",
            "float32", "--no-progress", "--threads", "1", *method]  # fmt: skip
    one_process("finetune.py", *args, "--out", tmp_path / "one")
    done = torchrun("finetune.py", *args, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr
    assert "fsdp: 2 processes, 2 of the 4 rows" in done.stderr
    summaries = [json.loads((tmp_path / run / "train_summary.json").read_text()) for run in ("one", "two")]
    assert summaries[1]["final_train_loss"] == pytest.approx(summaries[0]["final_train_loss"], rel=1e-4)
    if method[1] == "lora":
        one, two = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("one", "two"))
    else:
        one, two = (llama.load(tmp_path / run).state_dict() for run in ("one", "two"))
    assert one.keys() == two.keys()
    for name, expected in one.items():
        assert rel(two[name], expected) < 1e-3, name
