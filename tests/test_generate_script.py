"""scripts/generate.py end to end: real subprocesses on a tiny random checkpoint with the real Llama 3
tokenizer. Expected outputs come from the library in this process (llama.load + llama.generate on the
same files), so the script is checked for what it prints, not just that it runs.

Each run imports torch (a couple of seconds), so the user-error cases run concurrently.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import llama
from llama import ModelConfig, Transformer

SCRIPT = Path(__file__).parents[1] / "scripts" / "generate.py"
LLAMA3_TOKENIZER = Path(str(importlib.resources.files("llama_models.llama3") / "tokenizer.model"))
CONTEXT = 64  # small, so that a long prompt overflows it
SUMMARY = re.compile(r"\[(\d+) prompt tokens, (\d+) generated \| time to first token .* s \| prefill .* tok/s \| "
                     r"decode (?:.* tok/s|n/a) \| weights (?:.* GB/s|n/a) \| peak memory .*\]")  # fmt: skip
BASE = ["--dtype", "float32", "--device", "cpu"]

pytestmark = pytest.mark.slow  # about 25 runs of the script, each importing torch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=64,
                         max_seq_len=CONTEXT, tie_word_embeddings=True)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("ckpt")
    llama.save(model, path)
    shutil.copy(LLAMA3_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def ref(checkpoint) -> llama.Llama:
    """The same checkpoint loaded in this process."""
    return llama.Llama.load(checkpoint)


def run(*args, stdin: str | None = None, checkpoint: Path | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(SCRIPT), *(["--checkpoint", str(checkpoint)] if checkpoint else []), *map(str, args)]
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    # Bytes, decoded here: text mode would turn a generated "\r" into "\n".
    data = None if stdin is None else stdin.encode()
    result = subprocess.run(argv, input=data, capture_output=True, env=env, timeout=120)
    result.stdout, result.stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    return result


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def summaries(stderr: str) -> list[tuple[int, int]]:
    """(prompt tokens, generated tokens) of each summary line."""
    return [(int(m[1]), int(m[2])) for m in SUMMARY.finditer(stderr)]


def expected_ids(ref: llama.Llama, prompt_ids: list[int], n: int, **sampling) -> list[int]:
    sampling.setdefault("temperature", 0)
    return llama.generate(ref.model, [prompt_ids], n, stop_tokens=ref.tokenizer.stop_tokens, **sampling)[0]


# ---- what it prints --------------------------------------------------------------------------------


def test_greedy_prompt_prints_prompt_then_the_libraries_output(checkpoint, ref):
    prompt = "The capital of France is"
    result = ok(run("--prompt", prompt, "--temperature", 0, "--max-new-tokens", 12, *BASE, checkpoint=checkpoint))
    prompt_ids = ref.tokenizer.encode(prompt, bos=True, eos=False)
    ids = expected_ids(ref, prompt_ids, 12)
    assert result.stdout == prompt + ref.tokenizer.decode(ids) + "\n"
    assert summaries(result.stderr) == [(len(prompt_ids), len(ids))]
    for part in ("prompt tokens", "time to first token", "prefill", "decode", "GB/s", "peak memory"):
        assert part in result.stderr


def test_speculative_with_a_draft_prints_the_same_greedy_text(checkpoint, ref):
    prompt = "The capital of France is"
    result = ok(run("--prompt", prompt, "--temperature", 0, "--max-new-tokens", 12, "--draft", checkpoint,
                    "--draft-tokens", 3, *BASE, checkpoint=checkpoint))  # fmt: skip
    ids = expected_ids(ref, ref.tokenizer.encode(prompt, bos=True, eos=False), 12)
    assert result.stdout == prompt + ref.tokenizer.decode(ids) + "\n"
    assert "draft acceptance 1.00" in result.stderr  # the checkpoint is its own draft


def test_chat_with_system_message(checkpoint, ref):
    result = ok(run("--chat", "--system", "Answer in French.", "--prompt", "Hello!", "--temperature", 0,
                    "--max-new-tokens", 10, *BASE, checkpoint=checkpoint))  # fmt: skip
    prompt_ids = ref.tokenizer.encode_dialog(
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!"}]
    )
    ids = expected_ids(ref, prompt_ids, 10)
    assert result.stdout == ref.tokenizer.decode(ids) + "\n"  # the chat prompt itself is not echoed
    assert summaries(result.stderr) == [(len(prompt_ids), len(ids))]


def test_prompt_file(checkpoint, ref, tmp_path):
    prompt = "Once there was a\nlittle llama"
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    n_prompt = len(ref.tokenizer.encode(prompt, bos=True, eos=False))
    result = ok(run("--prompt-file", path, "--temperature", 0, "--max-new-tokens", 5, *BASE, checkpoint=checkpoint))
    assert result.stdout.startswith(prompt)
    assert summaries(result.stderr)[0][0] == n_prompt
    from_stdin = ok(run("--prompt-file", "-", "--temperature", 0, "--max-new-tokens", 5, *BASE, stdin=prompt,
                        checkpoint=checkpoint))  # fmt: skip
    assert from_stdin.stdout == result.stdout


def test_samples_are_reproducible_with_a_seed(checkpoint, ref):
    prompt = "Tell me a story"
    args = ("--prompt", prompt, "--num-samples", 2, "--seed", 7, "--temperature", 1.0, "--max-new-tokens", 8, *BASE)
    first, second = ok(run(*args, checkpoint=checkpoint)), ok(run(*args, checkpoint=checkpoint))
    assert first.stdout == second.stdout
    # Sample i uses seed + i: the library gives the same tokens.
    prompt_ids = ref.tokenizer.encode(prompt, bos=True, eos=False)
    samples = [expected_ids(ref, prompt_ids, 8, temperature=1.0, top_p=0.9, seed=7 + i) for i in range(2)]
    texts = [ref.tokenizer.decode(ids) for ids in samples]
    assert texts[0] != texts[1]
    assert first.stdout == "".join(f"{prompt}{text}\n" for text in texts)
    assert len(summaries(first.stderr)) == 2


def test_interactive_keeps_the_history(checkpoint, ref):
    turns = ["Hello there", "What did I just say?"]
    result = ok(run("--interactive", "--system", "Be nice.", "--temperature", 0, "--max-new-tokens", 6, *BASE,
                    stdin="".join(t + "\n" for t in turns), checkpoint=checkpoint))  # fmt: skip
    history = [{"role": "system", "content": "Be nice."}]
    expected = []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        prompt_ids = ref.tokenizer.encode_dialog(history)
        ids = expected_ids(ref, prompt_ids, 6)
        expected.append((len(prompt_ids), len(ids)))
        history.append({"role": "assistant", "content": ref.tokenizer.decode(ids)})
        assert ref.tokenizer.decode(ids) in result.stdout
    assert summaries(result.stderr) == expected  # the second prompt holds the first exchange


def test_help_documents_every_flag():
    result = ok(run("--help"))
    flags = ["--checkpoint", "--prompt", "--prompt-file", "--chat", "--system", "--interactive", "--max-new-tokens",
             "--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--seed", "--num-samples",
             "--dtype", "--device", "--threads"]  # fmt: skip
    for flag in flags:
        assert re.search(rf"{flag}\b(?!-)", result.stdout), flag


# ---- user errors: exit code 2, "error:" and no traceback -------------------------------------------


def error_cases(checkpoint: Path, tmp: Path) -> dict[str, tuple[list, str | None, str]]:
    """name -> (arguments, stdin, a regex the error message must match)."""
    not_a_checkpoint = tmp / "not-a-checkpoint"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "notes.txt").write_text("hello")
    no_tokenizer = tmp / "no-tokenizer"
    shutil.copytree(checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    good = ["--checkpoint", checkpoint]
    n = ["--max-new-tokens", 4]
    return {
        "missing-path": (["--checkpoint", tmp / "nope", *BASE], None, "nope"),
        "not-a-checkpoint": (["--checkpoint", not_a_checkpoint, *BASE], None, "not a checkpoint"),
        "no-tokenizer": (["--checkpoint", no_tokenizer, *n, *BASE], None, "tokenizer"),
        "temperature-negative": ([*good, "--temperature", -1], None, "--temperature"),
        "top-p-zero": ([*good, "--top-p", 0], None, "--top-p"),
        "top-p-above-one": ([*good, "--top-p", 1.5], None, "--top-p"),
        "top-k-zero": ([*good, "--top-k", 0], None, "--top-k"),
        "min-p-above-one": ([*good, "--min-p", 2], None, "--min-p"),
        "max-new-tokens-zero": ([*good, "--max-new-tokens", 0], None, "--max-new-tokens"),
        "repetition-penalty-zero": ([*good, "--repetition-penalty", 0], None, "--repetition-penalty"),
        "dtype-unknown": ([*good, "--dtype", "foo"], None, "--dtype"),
        "device-unknown": ([*good, "--device", "tpu"], None, "--device"),
        "cuda-missing": ([*good, *n, "--dtype", "float32", "--device", "cuda"], None, "cuda"),
        "prompt-too-long": (
            [*good, "--prompt", "word " * 100, *n, *BASE], None, rf"prompt \(\d+ tokens\).* context of {CONTEXT} tokens"
        ),
        "system-without-chat": ([*good, "--system", "Hi", *BASE], None, "--system"),
        "prompt-file-missing": ([*good, "--prompt-file", tmp / "absent.txt", *BASE], None, "absent.txt"),
        "interactive-with-prompt": ([*good, "--interactive", "--prompt", "Hi", *BASE], None, "--interactive"),
        "draft-with-compile": ([*good, "--draft", checkpoint, "--compile", *BASE], None, "--draft does not combine"),
        "draft-missing": ([*good, "--draft", tmp / "no-draft", *n, *BASE], None, "no-draft"),
    }


ERROR_NAMES = [  # the keys of error_cases, to name the tests before the fixture runs
    "missing-path", "not-a-checkpoint", "no-tokenizer", "temperature-negative", "top-p-zero", "top-p-above-one",
    "top-k-zero", "min-p-above-one", "max-new-tokens-zero", "repetition-penalty-zero",
    "dtype-unknown", "device-unknown", "cuda-missing", "prompt-too-long", "system-without-chat",
    "prompt-file-missing", "interactive-with-prompt", "draft-with-compile", "draft-missing",
]  # fmt: skip


@pytest.fixture(scope="module")
def error_runs(checkpoint, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    cases = error_cases(checkpoint, tmp_path_factory.mktemp("errors"))
    assert sorted(cases) == sorted(ERROR_NAMES)
    if torch.cuda.is_available():
        del cases["cuda-missing"]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        futures = {name: pool.submit(run, *args, stdin=stdin) for name, (args, stdin, _) in cases.items()}
        return {name: (future.result(), cases[name][2]) for name, future in futures.items()}


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_user_errors_exit_2_without_traceback(error_runs, name):
    if name not in error_runs:
        pytest.skip("a CUDA device is available here")
    result, message = error_runs[name]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error_line = next((line for line in result.stderr.splitlines() if "error:" in line), None)
    assert error_line is not None, result.stderr
    assert re.search(message, result.stderr), result.stderr
