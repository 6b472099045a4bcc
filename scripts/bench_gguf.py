"""Decode speed and memory on GGUF files: this project next to llama.cpp's llama-bench, in one run.

    python scripts/bench_gguf.py model-Q4_0.gguf model-Q8_0.gguf --llama-bench path/to/llama-bench --threads 2

Every configuration runs in a fresh process, one after the other, with the same thread count (and
the niceness this script was started with):

    ours-quantized   llama.load(file, dtype=bfloat16, quantize=...) + kernels.optimize: a Q4_0 file
                     as int4 (its blocks kept: Int4Linear, group 32), a Q8_0 file as int8 (its blocks
                     kept: Int8BlockLinear); other files take --quantize
    ours-bf16        the file dequantized to bfloat16 + kernels.optimize (with --dequantized)
    llama.cpp        llama-bench -m file -t THREADS -p PROMPT -n NEW -r REPETITIONS

Ours: a --prompt-len prompt of random ids, then --new-tokens greedy tokens, --repetitions times after a
warm-up; prefill = prompt tokens / time to the first token, decode = tokens after the first / their
time, averaged over the repetitions. llama-bench's pp and tg tests are the same two numbers (its tg
starts from an empty context; ours follows the prompt: at 128 positions attention is a small part of
a 1B model's step). Peak memory: the process's peak resident set (VmHWM), which for llama.cpp includes
the pages of the memory-mapped file it touched.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="GGUF files to run")
    p.add_argument("--llama-bench", help="path of llama.cpp's llama-bench (omit to run this project only)")
    p.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to decode (default 32)")
    p.add_argument("--repetitions", type=int, default=3, help="measured runs of each configuration (default 3)")
    p.add_argument("--quantize", choices=["auto", "int8", "int4"], default="auto",
                   help="ours-quantized mode: auto (int4 for Q4_0 files, int8 for Q8_0, else int8), or one mode "
                        "for every file")
    p.add_argument("--dequantized", action="store_true", help="also run each file dequantized to bfloat16")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration and print JSON
    return p


FILE_TYPE_MODES = {2: "int4", 7: "int8"}  # llama_ftype MOSTLY_Q4_0, MOSTLY_Q8_0


def peak_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_ours(args, path: str, quantize: str | None) -> dict:
    import torch

    import kernels
    import llama
    from llama.core.generation import stream

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = llama.load(path, dtype="bfloat16", quantize=quantize, group_size=32)
    kernels.optimize(model, fuse_qkv=quantize is None, fuse_gate_up=quantize is None)
    load = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 30000, (1, args.prompt_len), generator=generator).tolist()
    for _ in stream(model, [p[:8] for p in prompt], 3, temperature=0, stop_tokens=[]):
        pass  # warm-up
    prefill, decode = [], []
    for _ in range(args.repetitions):
        start = time.perf_counter()
        times = []
        for _ in stream(model, prompt, args.new_tokens, temperature=0, stop_tokens=[]):
            times.append(time.perf_counter())
        prefill.append(args.prompt_len / (times[0] - start))
        decode.append((len(times) - 1) / (times[-1] - times[0]))
    return {"load_s": load, "prefill": statistics.mean(prefill), "decode": statistics.mean(decode),
            "decode_sd": statistics.stdev(decode) if len(decode) > 1 else 0.0, "peak_gb": peak_gb()}  # fmt: skip


def run_llama_bench(args, path: str) -> dict:
    command = [args.llama_bench, "-m", path, "-t", str(args.threads), "-p", str(args.prompt_len),
               "-n", str(args.new_tokens), "-r", str(args.repetitions), "-o", "json"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"llama-bench failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    tests = json.loads(proc.stdout)
    pp = next(t for t in tests if t["n_prompt"] and not t["n_gen"])
    tg = next(t for t in tests if t["n_gen"] and not t["n_prompt"])
    # This worker did nothing but wait for llama-bench: its children's peak is llama-bench's.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    return {"load_s": None, "prefill": pp["avg_ts"], "decode": tg["avg_ts"], "decode_sd": tg["stddev_ts"],
            "peak_gb": children, "wall_s": time.perf_counter() - start}  # fmt: skip


def worker(args) -> None:
    kind, _, rest = args.worker.partition(":")
    mode, _, path = rest.partition(":")
    result = run_llama_bench(args, path) if kind == "llama.cpp" else run_ours(args, path, mode or None)
    print("RESULT " + json.dumps(result))


def file_mode(path: str, choice: str) -> str:
    if choice != "auto":
        return choice
    from weights.gguf import GGUFFile

    with GGUFFile(path) as f:
        return FILE_TYPE_MODES.get(f.metadata.get("general.file_type"), "int8")


def run_config(args, spec: str) -> dict:
    command = [sys.executable, __file__, "--worker", spec, "--threads", str(args.threads), "--prompt-len",
               str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repetitions", str(args.repetitions),
               *(["--llama-bench", args.llama_bench] if args.llama_bench else [])]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not args.files:
        parser.error("give at least one GGUF file")
    from weights import CheckpointError

    try:
        modes = {path: file_mode(path, args.quantize) for path in args.files}
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.llama_bench and not os.access(args.llama_bench, os.X_OK):
        print(f"error: {args.llama_bench}: not an executable", file=sys.stderr)
        return 2
    print(f"threads {args.threads}, niceness {os.nice(0)}, {os.cpu_count()} CPUs; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)  # fmt: skip
    rows = []
    for path in args.files:
        specs = [(f"ours-{modes[path]}", f"ours:{modes[path]}:{path}")]
        if args.dequantized:
            specs.append(("ours-bf16", f"ours::{path}"))
        if args.llama_bench:
            specs.append(("llama.cpp", f"llama.cpp::{path}"))
        for name, spec in specs:
            started = time.perf_counter()
            result = {"file": Path(path).name, "config": name} | run_config(args, spec)
            rows.append(result)
            summary = result.get("error") or f"decode {result['decode']:.2f} tok/s"
            print(f"  {Path(path).name} {name}: {time.perf_counter() - started:.0f} s, {summary}", file=sys.stderr)
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.repetitions} repetitions, "
          f"{args.threads} threads\n")  # fmt: skip
    print("| file | config | load s | prefill tok/s | decode tok/s | peak GB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['file']} | {r['config']} | failed: {r['error'][:80]} |||")
            continue
        load = f"{r['load_s']:.1f}" if r["load_s"] is not None else "-"
        print(f"| {r['file']} | {r['config']} | {load} | {r['prefill']:.1f} | {r['decode']:.2f} ± {r['decode_sd']:.2f} "
              f"| {r['peak_gb']:.2f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
