"""llama.cpp as the peer to measure against, shared by benchmark.py (--llama-cpp) and bench_gguf.py.

    tools = LlamaCpp.find("path/to/llama.cpp")                   # bin/llama-bench, bin/llama-quantize, converter
    files = gguf_files(tools, checkpoint, cache, ["BF16", "Q8_0", "Q4_0"], threads=2)   # converted once, cached
    theirs = llama_bench(tools.bench, files["Q8_0"], threads=2, prompt_len=128, new_tokens=32, depths=[0])
    ours = run_ours(checkpoint, "int8", group_size=32, threads=2, prompt_len=128, new_tokens=32, depths=[0])

Both sides measure the same two numbers, the way llama-bench defines them, at each depth d (tokens
already in the KV cache): pp, a prompt of prompt_len tokens prefilled after the d cached ones
(tok/s), and tg, new_tokens tokens decoded one at a time after them (tok/s, batch 1). Results:
{"depths": {"d": {"prefill": tok/s, "decode": tok/s, "decode_sd": tok/s}}} from both.

The GGUF files are made by llama.cpp itself (convert_hf_to_gguf.py --outtype bf16, then
llama-quantize), so llama.cpp runs its own conversion of the weights, and are kept in a cache
directory under a content hash of the checkpoint's files: a second run on the same checkpoint
converts nothing. llama-bench feeds random token ids, so a checkpoint without a tokenizer the
converter can read (scripts/random_checkpoint.py writes none) is converted with the bundled model's
tokenizer as a stand-in: the vocabulary's texts do not change the speed.

The scripts import this file as a sibling, like loop_flags.py: `from .llama_cpp_peer import ...`
where they are installed as the package llama_cli, `from llama_cpp_peer import ...` where they run
as `python scripts/NAME.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CONVERTER = "convert_hf_to_gguf.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class LlamaCppError(Exception):
    """A llama.cpp program is missing, fails, or says something this file cannot read."""


@dataclass(frozen=True)
class LlamaCpp:
    """The llama.cpp programs used here: llama-bench, llama-quantize and the converter script."""

    bench: Path
    quantize: Path
    converter: Path

    @classmethod
    def find(cls, directory: str | Path, converter: str | Path | None = None) -> LlamaCpp:
        """The programs of a llama.cpp build: `directory` is the build directory (holding bin/) or the
        source checkout holding build/bin/; the converter is convert_hf_to_gguf.py in the first of
        directory, its parent (a build directory inside the checkout) and its grandparent, unless given."""
        directory = Path(directory)
        bins = [directory / "bin", directory / "build" / "bin"]
        bin_dir = next((b for b in bins if (b / "llama-bench").is_file()), None)
        if bin_dir is None:
            raise LlamaCppError(f"{directory}: no llama-bench in {' or '.join(str(b) for b in bins)} "
                                f"(build llama.cpp first: see README, Speed)")  # fmt: skip
        for program in (bin_dir / "llama-bench", bin_dir / "llama-quantize"):
            if not os.access(program, os.X_OK):
                raise LlamaCppError(f"{program}: not an executable file")
        if converter is None:
            places = [directory / CONVERTER, directory.parent / CONVERTER, directory.parent.parent / CONVERTER]
            converter = next((p for p in places if p.is_file()), None)
            if converter is None:
                raise LlamaCppError(f"no {CONVERTER} in {', '.join(str(p.parent) for p in places)}: "
                                    "give its path with --llama-cpp-converter")  # fmt: skip
        elif not Path(converter).is_file():
            raise LlamaCppError(f"{converter}: no such file")
        return cls(bin_dir / "llama-bench", bin_dir / "llama-quantize", Path(converter))


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no output"])[-1]


# ---- llama-bench -------------------------------------------------------------------------------------


def llama_bench(program: str | Path, model: str | Path, *, threads: int, prompt_len: int, new_tokens: int,
                depths: list[int], repetitions: int) -> dict:  # fmt: skip
    """Run llama-bench on one GGUF file: pp (prompt_len) and tg (new_tokens) at each depth."""
    command = [str(program), "-m", str(model), "-t", str(threads), "-p", str(prompt_len), "-n", str(new_tokens),
               "-d", ",".join(map(str, depths)), "-r", str(repetitions), "-o", "json"]  # fmt: skip
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise LlamaCppError(f"{program}: {e.strerror}") from None
    if proc.returncode:
        raise LlamaCppError(f"llama-bench failed on {Path(model).name} (exit {proc.returncode}): "
                            f"{_last_line(proc.stderr)}")  # fmt: skip
    return {"depths": parse_llama_bench(proc.stdout, depths)}


def parse_llama_bench(text: str, depths: list[int]) -> dict:
    """llama-bench -o json's output (a list of tests) -> {"d": {"prefill", "decode", "decode_sd"}}: the pp
    test (n_prompt > 0, n_gen 0) and the tg test (n_gen > 0, n_prompt 0) at each depth (n_depth;
    absent in builds older than -d: depth 0)."""
    try:
        tests = json.loads(text)
        depth_of = {id(t): int(t.get("n_depth", 0)) for t in tests}
        found = {}
        for depth in depths:
            pp = [t for t in tests if t["n_prompt"] and not t["n_gen"] and depth_of[id(t)] == depth]
            tg = [t for t in tests if t["n_gen"] and not t["n_prompt"] and depth_of[id(t)] == depth]
            if not pp or not tg:
                raise LlamaCppError(f"llama-bench's output has no {'pp' if not pp else 'tg'} test at depth {depth}")
            found[str(depth)] = {"prefill": float(pp[0]["avg_ts"]), "decode": float(tg[0]["avg_ts"]),
                                 "decode_sd": float(tg[0]["stddev_ts"])}  # fmt: skip
        return found
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise LlamaCppError(f"llama-bench's JSON output is not what was expected ({type(e).__name__}: {e}): "
                            f"{text[:200]!r}") from None  # fmt: skip


# ---- this project, measured the same way ---------------------------------------------------------------


def peak_gb() -> float:
    """This process's peak resident memory (VmHWM), GB."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


def measure(model, *, prompt_len: int, new_tokens: int, depths: list[int], repetitions: int) -> dict:
    """pp and tg of a loaded model at each depth, as llama-bench measures them: random token ids,
    the depth's tokens prefilled untimed first, logits of the prompt's last token only, greedy
    tokens, the mean of `repetitions` timed runs after a warm-up."""
    import torch

    generator = torch.Generator().manual_seed(0)
    P, n = prompt_len, new_tokens
    device = next(model.parameters()).device
    results = {}
    model.setup_cache(1, max(depths) + max(P, n) + 1)
    with torch.inference_mode():
        for depth in depths:
            context = torch.randint(1000, 30000, (1, depth), generator=generator).remainder_(model.config.vocab_size)
            prompt = torch.randint(1000, 30000, (1, P), generator=generator).remainder_(model.config.vocab_size)
            if depth:
                model(context.to(device), 0)  # the cached tokens, untimed
            prefill, decode = [], []
            last = torch.tensor([P - 1], device=device)
            for repetition in range(repetitions + 1):  # the first is the warm-up
                start = time.perf_counter()
                # Only the last token's logits, as generate.py's prefill and llama-bench's pp compute them
                # (the output projection of all P tokens would be a fifth more work than the rest).
                logits = model(prompt.to(device), depth, keep=last)
                pp = P / (time.perf_counter() - start)
                token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
                start = time.perf_counter()
                for i in range(n):  # decoded right after the cached tokens (overwriting the prompt's slots)
                    token = model(token, depth + i)[:, -1].argmax(-1, keepdim=True)
                token.item()  # waits for the last step (CUDA)
                tg = n / (time.perf_counter() - start)
                if repetition:
                    prefill.append(pp)
                    decode.append(tg)
            results[str(depth)] = {"prefill": statistics.mean(prefill), "decode": statistics.mean(decode),
                                   "decode_sd": statistics.stdev(decode) if len(decode) > 1 else 0.0}  # fmt: skip
    return results


def run_ours(path: str | Path, quantize: str | None, *, group_size: int, threads: int, prompt_len: int,
             new_tokens: int, depths: list[int], repetitions: int) -> dict:  # fmt: skip
    """Load `path` (a checkpoint directory or a GGUF file) the way generate.py does on a CPU: bfloat16,
    quantized on load when asked, kernels.optimize; then measure(). Adds load_s and peak_gb."""
    import torch

    import kernels
    import llama

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = llama.load(path, dtype="bfloat16", quantize=quantize, group_size=group_size)
    kernels.optimize(model, **kernels.fusable(model))  # quantized projections fuse too, unless mixed
    load = time.perf_counter() - start
    depths_result = measure(model, prompt_len=prompt_len, new_tokens=new_tokens, depths=depths,
                            repetitions=repetitions)  # fmt: skip
    return {"load_s": load, "depths": depths_result, "peak_gb": peak_gb()}


# ---- converting a checkpoint with llama.cpp's own tools ---------------------------------------------------


def checkpoint_digest(directory: str | Path) -> str:
    """A content hash (sha256, 16 hex digits) of every file in a checkpoint directory, names included."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _readable_tokenizer(directory: Path) -> bool:
    """Whether the converter can read a tokenizer here: tokenizer.json, or a sentencepiece tokenizer.model
    (Meta's Llama 3 tokenizer.model is a tiktoken file, which it cannot)."""
    if (directory / "tokenizer.json").is_file():
        return True
    if not (directory / "tokenizer.model").is_file():
        return False
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        return True
    except (RuntimeError, OSError):
        return False


def _run(command: list[str], what: str) -> None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise LlamaCppError(f"{command[0]}: {e.strerror}") from None
    if proc.returncode:
        raise LlamaCppError(f"{what} failed (exit {proc.returncode}): {_last_line(proc.stderr or proc.stdout)}")


def gguf_files(tools: LlamaCpp, checkpoint: str | Path, cache: str | Path, types: list[str], *,
               threads: int, log=print) -> dict[str, Path]:  # fmt: skip
    """{type: GGUF file} for BF16 and llama-quantize types (Q8_0, Q4_0, ...) of a Hugging Face checkpoint,
    made by llama.cpp's converter (BF16) and llama-quantize (the others, from the BF16 file), each once:
    a file is named <content hash of the checkpoint>-<type>.gguf in `cache` and reused when there.
    Files are written under a temporary name and renamed when complete."""
    checkpoint, cache = Path(checkpoint), Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    digest = checkpoint_digest(checkpoint)
    log(f"checkpoint {checkpoint}: content hash {digest} ({time.perf_counter() - started:.0f} s)")
    files = {t: cache / f"{digest}-{t}.gguf" for t in dict.fromkeys(["BF16", *types])}
    if not files["BF16"].is_file():
        with tempfile.TemporaryDirectory(dir=cache) as staging:
            source = checkpoint
            if not _readable_tokenizer(checkpoint):
                from weights import BUNDLED_MODEL

                source = Path(staging) / "checkpoint"  # the checkpoint's files, linked, and a stand-in tokenizer
                source.mkdir()
                for path in checkpoint.iterdir():
                    if path.name not in TOKENIZER_FILES:
                        (source / path.name).symlink_to(path.resolve())
                (source / "tokenizer.model").symlink_to((BUNDLED_MODEL / "tokenizer.model").resolve())
                log(f"{checkpoint} has no tokenizer llama.cpp's converter reads: converting with the bundled "
                    f"model's as a stand-in (llama-bench feeds random token ids)")  # fmt: skip
            partial = Path(staging) / "BF16.gguf"
            log(f"converting with {tools.converter} --outtype bf16 -> {files['BF16']}")
            started = time.perf_counter()
            _run([sys.executable, str(tools.converter), str(source), "--outtype", "bf16", "--outfile", str(partial)],
                 f"{tools.converter.name}")  # fmt: skip
            if not partial.is_file():
                raise LlamaCppError(f"{tools.converter.name} exited without writing {partial.name}")
            partial.replace(files["BF16"])
            log(f"  {time.perf_counter() - started:.0f} s")
    for kind, path in files.items():
        if kind == "BF16" or path.is_file():
            continue
        partial = path.with_name(path.name + ".partial")
        log(f"quantizing with llama-quantize {kind} -> {path}")
        started = time.perf_counter()
        _run([str(tools.quantize), str(files["BF16"]), str(partial), kind, str(threads)], f"llama-quantize {kind}")
        if not partial.is_file():
            raise LlamaCppError(f"llama-quantize {kind} exited without writing {partial.name}")
        partial.replace(path)
        log(f"  {time.perf_counter() - started:.0f} s")
    return {t: files[t] for t in types}
