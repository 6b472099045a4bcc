"""The first ten minutes, as a newcomer meets them: the install (console commands, a --help that
does not wait for torch), defaults that fit the model's context (the Llama API, generate.py,
--interactive, --draft, the server), the --interactive loop (dropped turns said, room for an
answer, a seed per turn, line editing), --threads, conversion and saving (tokenizer files, file
modes) and honest output (the base-model note, "n/a" rates, serve.py's port check).

Script runs are real subprocesses on a tiny random checkpoint (context 64) with the real Llama 3
tokenizer; expected outputs come from the library in this process.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import llama
import weights
from llama import ModelConfig
from llama.core.checkpoint import TOKENIZER_FILES, convert
from llama.core.device import idle_threads, in_passing_thread
from llama.core.generation import default_new_tokens
from random_models import random_model

ROOT = Path(__file__).parents[1]
SCRIPTS = ROOT / "scripts"
LLAMA3_TOKENIZER = Path(str(importlib.resources.files("llama_models.llama3") / "tokenizer.model"))
CONTEXT, DRAFT_CONTEXT = 64, 32
BASE = ["--dtype", "float32", "--device", "cpu", "--threads", "1"]
SUMMARY = re.compile(r"\[(\d+) prompt tokens, (\d+) generated \|")


def tiny_model(context: int, seed: int = 0) -> llama.Transformer:
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=64,
                         max_seq_len=context, tie_word_embeddings=True)  # fmt: skip
    return random_model(config, seed=seed, std=0.5)  # large weights: greedy choices are not near-ties


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    llama.save(tiny_model(CONTEXT), path)
    shutil.copy(LLAMA3_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def draft(tmp_path_factory) -> Path:
    """A draft with a shorter context than the target's."""
    path = tmp_path_factory.mktemp("draft")
    llama.save(tiny_model(DRAFT_CONTEXT, seed=1), path)
    shutil.copy(LLAMA3_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def ref(checkpoint) -> llama.Llama:
    return llama.Llama.load(checkpoint)


def run(*args, stdin: str | None = None, script: str = "generate.py", timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(SCRIPTS / script), *map(str, args)]
    result = subprocess.run(argv, input=None if stdin is None else stdin.encode(), capture_output=True, timeout=timeout,
                            env=dict(os.environ, PYTHONIOENCODING="utf-8"))  # fmt: skip
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def summaries(stderr: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in SUMMARY.finditer(stderr)]


def greedy(ref: llama.Llama, prompt_ids: list[int], n: int, **sampling) -> list[int]:
    sampling.setdefault("temperature", 0)
    return llama.generate(ref.model, [prompt_ids], n, stop_tokens=ref.tokenizer.stop_tokens, **sampling)[0]


# ---- defaults that fit the context ------------------------------------------------------------------


def test_default_new_tokens_is_the_cap_or_what_the_context_leaves():
    assert default_new_tokens(4096, 10) == 256
    assert default_new_tokens(256, 20, cap=512) == 236
    assert default_new_tokens(64, 64) == 1  # no room: stream's error names the lengths


def test_the_llama_api_defaults_fit_a_short_context(ref):
    """The README's API example on a model whose context is shorter than the default 256 / 512."""
    messages = [{"role": "user", "content": "Hello!"}]
    prompt_ids = ref.tokenizer.encode_dialog(messages)
    ids = llama.generate(ref.model, [prompt_ids], CONTEXT - len(prompt_ids), temperature=0, stop_tokens=[])[0]
    assert ref.chat(messages, temperature=0, stop_tokens=[]) == ref.tokenizer.decode(ids)
    prompt_ids = ref.tokenizer.encode("Once upon a time", bos=True, eos=False)
    ids = llama.generate(ref.model, [prompt_ids], CONTEXT - len(prompt_ids), temperature=0, stop_tokens=[])[0]
    assert "".join(ref.stream("Once upon a time", temperature=0, stop_tokens=[])) == ref.tokenizer.decode(ids)
    assert ref.generate("Once upon a time", temperature=0, stop_tokens=[]) == ref.tokenizer.decode(ids)


def test_the_servers_default_max_tokens_fits_the_context(checkpoint):
    from llama.serving.app import create_app
    from llama.serving.engine import Engine
    from test_serve import Server

    engine = Engine(llama.load(checkpoint), llama.load_tokenizer(checkpoint), max_batch_size=2)
    with Server(create_app(engine, model_name="tiny")) as server:
        body = {"prompt": list(range(1000, 1000 + CONTEXT - 5)), "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["usage"]["completion_tokens"] == 5 and result["choices"][0]["finish_reason"] == "length"
        body["prompt"] = [1000, 1001]  # room to spare: OpenAI's default of 16
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["usage"]["completion_tokens"] == 16


# ---- generate.py ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(checkpoint, draft, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The generate.py runs of the tests below, run concurrently (each imports torch)."""
    templated = tmp_path_factory.mktemp("templated")
    for f in checkpoint.iterdir():
        shutil.copy(f, templated / f.name)
    (templated / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    good = ["--checkpoint", checkpoint, *BASE]
    cases = {
        "draft-default": [*good, "--prompt", "Hello", "--temperature", 0, "--draft", draft],
        "draft-too-long": [*good, "--prompt", "Hello", "--temperature", 0, "--draft", draft, "--max-new-tokens", 40],
        "one-token": [*good, "--prompt", "Hello", "--max-new-tokens", 1],
        "chat-base": [*good, "--chat", "--prompt", "Hi", "--max-new-tokens", 2],
        "chat-template": ["--checkpoint", templated, *BASE, "--chat", "--prompt", "Hi", "--max-new-tokens", 2],
        "chat-bundled": [*BASE, "--chat", "--prompt", "Hi", "--max-new-tokens", 2],
        "threads-zero": [*good, "--threads", 0],
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, *args) for name, args in cases.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.slow
def test_draft_default_fits_the_shorter_context(runs, ref):
    result = runs["draft-default"]
    assert result.returncode == 0, result.stderr
    prompt_ids = ref.tokenizer.encode("Hello", bos=True, eos=False)
    ids = greedy(ref, prompt_ids, DRAFT_CONTEXT - len(prompt_ids))  # speculative greedy = the target's greedy
    assert result.stdout == "Hello" + ref.tokenizer.decode(ids) + "\n"
    assert summaries(result.stderr) == [(len(prompt_ids), len(ids))]


@pytest.mark.slow
def test_a_request_that_does_not_fit_the_draft_fails_before_printing(runs):
    result = runs["draft-too-long"]
    assert result.returncode == 2 and result.stdout == ""
    assert f"exceeds the draft's context of {DRAFT_CONTEXT} tokens" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_undefined_rates_read_n_a(runs):
    result = runs["one-token"]
    assert result.returncode == 0, result.stderr
    assert "| decode n/a | weights n/a |" in result.stderr and "0.00 tok/s" not in result.stderr


@pytest.mark.slow
def test_chat_on_a_base_model_gets_a_note(runs):
    assert "has no chat template" in runs["chat-base"].stderr
    assert "note:" not in runs["chat-template"].stderr
    assert "note: the bundled model is a base model" in runs["chat-bundled"].stderr
    for name in ("chat-base", "chat-template", "chat-bundled"):
        assert runs[name].returncode == 0, runs[name].stderr


@pytest.mark.slow
def test_threads(runs):
    assert ", 1 thread]" in runs["one-token"].stderr  # the loaded line says how many
    result = runs["threads-zero"]
    assert result.returncode == 2 and "--threads" in result.stderr and "Traceback" not in result.stderr
    assert idle_threads(cores=2, load=0.5) == 2  # a core busy for part of the minute counts as free
    assert idle_threads(cores=2, load=1.2) == 1
    assert idle_threads(cores=2, load=7.0) == 1  # at least one
    assert idle_threads(cores=8, load=3.0) == 5


@pytest.mark.slow
def test_interactive_drops_old_turns_with_a_note_and_varies_the_seed(checkpoint, ref):
    """Room for an answer: min(256, context / 2) = 32 tokens are kept free; older exchanges go, with a
    note. With --seed 5, turn i samples with seed 5 + i: the same question twice gets two answers."""
    turns = ["Tell me about llamas", "Tell me about llamas"]
    result = run("--checkpoint", checkpoint, *BASE, "--interactive", "--seed", 5, "--temperature", 1.0,
                 stdin="".join(t + "\n" for t in turns))  # fmt: skip
    assert result.returncode == 0, result.stderr
    history, expected, answers = [], [], []
    for i, turn in enumerate(turns):
        history.append({"role": "user", "content": turn})
        while len(ref.tokenizer.encode_dialog(history)) + CONTEXT // 2 > CONTEXT and len(history) > 1:
            history = history[2:]
        prompt_ids = ref.tokenizer.encode_dialog(history)
        ids = greedy(ref, prompt_ids, CONTEXT - len(prompt_ids), temperature=1.0, top_p=0.9, seed=5 + i)
        expected.append((len(prompt_ids), len(ids)))
        answers.append(ref.tokenizer.decode(ids))
        history.append({"role": "assistant", "content": answers[-1]})
    assert summaries(result.stderr) == expected
    assert expected[0][0] == expected[1][0] and answers[0] != answers[1]  # the same prompt, another seed
    assert result.stdout == "".join(a + "\n" for a in answers)
    assert "[dropped the oldest 1 exchange to leave 32 tokens for the answer in the context of 64]" in result.stderr


@pytest.mark.slow
def test_interactive_has_line_editing_and_history_on_a_terminal(checkpoint, ref):
    """On a terminal, Up recalls the previous line (readline), rather than sending "^[[A"."""
    pytest.importorskip("readline")
    import pty

    master, slave = pty.openpty()
    argv = [sys.executable, str(SCRIPTS / "generate.py"), "--checkpoint", str(checkpoint), *map(str, BASE),
            "--interactive", "--temperature", "0", "--max-new-tokens", "4"]  # fmt: skip
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=dict(os.environ, TERM="xterm"))
    os.close(slave)
    screen = b""

    def wait_for_prompt(count: int) -> None:
        nonlocal screen
        deadline = time.monotonic() + 60
        while screen.count(b"> ") < count:
            assert time.monotonic() < deadline and process.poll() is None, screen
            if select.select([master], [], [], 0.1)[0]:
                screen += os.read(master, 4096)

    try:
        wait_for_prompt(1)
        os.write(master, b"Hello\r")
        wait_for_prompt(2)
        os.write(master, b"\x1b[A\r")  # Up, Enter: "Hello" again
        wait_for_prompt(3)
        os.write(master, b"\r")  # an empty line quits
        stderr = process.communicate(timeout=60)[1].decode()
    finally:
        process.kill()
        os.close(master)
    assert process.returncode == 0, stderr
    assert b"^[[A" not in screen
    history = [{"role": "user", "content": "Hello"}]
    first = greedy(ref, ref.tokenizer.encode_dialog(history), 4)
    history += [{"role": "assistant", "content": ref.tokenizer.decode(first)}, {"role": "user", "content": "Hello"}]
    assert [p for p, _ in summaries(stderr)] == [len(ref.tokenizer.encode_dialog(history[:1])), len(ref.tokenizer.encode_dialog(history))]


# ---- serve.py ---------------------------------------------------------------------------------------


def test_serve_checks_its_port_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run("--port", busy.getsockname()[1], script="serve.py", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot listen on 127.0.0.1:") and "loaded" not in result.stderr


# ---- install: fast --help, console commands --------------------------------------------------------


@pytest.mark.parametrize("script", ["generate.py", "serve.py", "convert.py", "random_checkpoint.py", "train_tokenizer.py",
                                    "prepare_kjv.py", "evaluate.py", "make_kjv_tasks.py", "kjv_scores.py",
                                    "bench_prefill.py", "kv_cache_quality.py", "position_perplexity.py",
                                    "extend_context.py"])  # fmt: skip
def test_help_does_not_import_torch(script):
    # sys.path[0] = the script's folder, as `python scripts/NAME.py` sets it (runpy does not)
    code = ("import os, runpy, sys\nsys.argv = [sys.argv[1], '--help']\nsys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('torch imported' if 'torch' in sys.modules else 'no torch')")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, str(SCRIPTS / script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and result.stdout.rstrip().endswith("no torch")


def test_every_script_is_a_console_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    scripts = sorted(p.stem for p in SCRIPTS.glob("*.py") if "\ndef main(" in p.read_text())
    expected = {f"llama-{name.replace('_', '-')}": f"llama_cli.{name}:main" for name in scripts}
    assert project["scripts"] == expected
    assert 'package_dir={"llama_cli": "scripts"}' in (ROOT / "setup.py").read_text()


@pytest.mark.slow
def test_console_command_runs_when_installed(checkpoint):
    command = shutil.which("llama-generate", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip("the project is not installed here with `pip install -e .` (no llama-generate next to python)")
    result = subprocess.run([command, "--checkpoint", str(checkpoint), *map(str, BASE), "--max-new-tokens", "3",
                             "--prompt", "Hello"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and summaries(result.stderr)[0][1] >= 1


# ---- converting and saving: tokenizer files, file modes ---------------------------------------------


def modes(directory: Path) -> dict[str, int]:
    return {f.name: stat.S_IMODE(f.stat().st_mode) for f in [directory, *directory.iterdir()]}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("to", ["hf", "meta"])
def test_convert_copies_the_tokenizer_files_and_writes_readable_files(checkpoint, tmp_path, umask_022, to):
    src = tmp_path / "src"
    shutil.copytree(checkpoint, src)
    extras = {"tokenizer_config.json": '{"chat_template": "x"}', "generation_config.json": '{"eos_token_id": [128001, 128009]}'}
    for name, text in extras.items():
        (src / name).write_text(text)
        (src / name).chmod(0o600)  # a private source file still gives a readable copy
    dst = tmp_path / "out"
    written = convert(src, dst, format=to)
    for name in ("tokenizer.model", *extras):
        assert (dst / name).read_bytes() == (src / name).read_bytes() and dst / name in written
    assert modes(dst) == {f.name: 0o755 if f == dst else 0o644 for f in [dst, *dst.iterdir()]}
    llm = llama.Llama.load(dst)  # runs as it is: "generate.py --checkpoint out" needs the tokenizer
    assert llm.generate("Hello", max_new_tokens=2, temperature=0)


def test_save_copies_the_tokenizer_files(checkpoint, tmp_path, umask_022):
    model = llama.load(checkpoint)
    written = llama.save(model, tmp_path / "out", tokenizer_from=checkpoint)
    assert tmp_path / "out" / "tokenizer.model" in written
    assert modes(tmp_path / "out") == {"out": 0o755, "config.json": 0o644, "model.safetensors": 0o644, "tokenizer.model": 0o644}
    assert llama.load_tokenizer(tmp_path / "out").vocab_size == llama.load_tokenizer(checkpoint).vocab_size
    assert set(TOKENIZER_FILES) >= {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}



def test_ci_runs_the_readmes_install_and_test_commands():
    """CI installs the CPU torch first, then exactly the README's test install, then its test command."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") : readme.index("\n## ", readme.index("## Quick start") + 1)]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in quick_start
    assert "pip install -e .   " in quick_start and "python scripts/generate.py" in quick_start
    assert 'pip install -e ".[test]"\npython -m pytest -q\n' in quick_start
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    torch_line = next(i for i, line in enumerate(ci) if "pip install" in line and "torch==" in line)
    test_line = ci.index('python -m pip install -q -e ".[test]"')
    assert torch_line < test_line and ci[-1] == "python -m pytest -q"


@pytest.mark.parametrize("script", ["generate.py", "serve.py"])
def test_int8_activations_need_the_kernels(script):
    """--int8-activations chooses the native kernels' arithmetic: with --no-kernels it would do nothing, so it
    is refused rather than ignored."""
    result = run("--no-kernels", "--int8-activations", script=script, timeout=60)
    assert result.returncode == 2 and "--int8-activations" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flag, expected", [([], None), (["--int8-activations"], True),
                                            (["--no-int8-activations"], False)])  # fmt: skip
def test_int8_activations_reach_kernels_optimize(monkeypatch, capsys, checkpoint, flag, expected):
    """generate.py hands --[no-]int8-activations to kernels.optimize (None: the kernels decide by the CPU)."""
    import importlib.util

    import kernels

    seen = []
    real = kernels.optimize
    monkeypatch.setattr(kernels, "optimize", lambda model, **kw: seen.append(kw.get("int8_activations")) or real(model, **kw))
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPTS / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        code = script.main(["--checkpoint", str(checkpoint), *BASE, "--max-new-tokens", "1", "--prompt", "Hi", *flag])
    finally:
        torch.set_num_threads(threads)
    assert code in (0, None) and seen == [expected]


def test_in_passing_thread_returns_the_result_or_raises_the_error_of_another_thread():
    import threading

    main = threading.get_ident()
    assert in_passing_thread(lambda: threading.get_ident()) != main
    assert in_passing_thread(lambda: [1, 2]) == [1, 2]

    def fails():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        in_passing_thread(fails)
