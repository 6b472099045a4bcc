"""Decode and prefill speed on GGUF files: this project next to llama.cpp's llama-bench, same weights,
same threads, interleaved in one run, with the ratios.

    python scripts/bench_gguf.py 1b-BF16.gguf 1b-Q8_0.gguf 1b-Q4_0.gguf --llama-bench path/to/llama-bench \
        --threads 2 --depth 0 1024 --rounds 2

Every configuration runs in a fresh process, one after the other, with the same thread count (and
the niceness this script was started with); --rounds repeats the whole sequence, so that ours and
llama.cpp alternate and a change in the machine's load falls on both:

    ours             llama.load(file, dtype=bfloat16, quantize=...) + kernels.optimize, as generate.py
                     runs it: a BF16/F16/F32 file in bfloat16, a Q8_0 file as int8 (its blocks kept:
                     Int8BlockLinear), a Q4_0 file as int4 (its blocks kept: Int4Linear, group 32);
                     --quantize picks one mode for every file instead
    ours-bf16        the file dequantized to bfloat16 + kernels.optimize (with --dequantized)
    llama.cpp        llama-bench -m file -t THREADS -p PROMPT -n NEW -d DEPTHS -r REPETITIONS

At each --depth d (tokens already in the KV cache), both measure the same two numbers llama-bench
does: pp, --prompt-len prompt tokens prefilled after the d cached ones (tok/s), and tg, --new-tokens
tokens decoded one at a time after the d cached ones (tok/s, batch 1). Ours: d random tokens are
prefilled untimed first; greedy tokens; --repetitions timed runs after a warm-up, averaged.
Peak memory: the process's peak resident set (VmHWM), which for llama.cpp includes the pages of the
memory-mapped file it touched.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__:  # installed as the package llama_cli
    from .llama_cpp_peer import llama_bench, run_ours
else:  # python scripts/bench_gguf.py
    from llama_cpp_peer import llama_bench, run_ours


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="GGUF files to run")
    p.add_argument("--llama-bench", help="path of llama.cpp's llama-bench (omit to run this project only)")
    p.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to decode (default 32)")
    p.add_argument("--repetitions", type=int, default=3, help="measured runs of each configuration (default 3)")
    p.add_argument("--depth", type=int, nargs="+", default=[0],
                   help="tokens already in the KV cache when pp and tg are measured, one or more (default 0)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole sequence of configurations this many times, interleaved (default 1)")
    p.add_argument("--quantize", choices=["auto", "bf16", "int8", "int4"], default="auto",
                   help="ours' mode: auto (int4 for Q4_0 files, int8 for Q8_0, bf16 for the others), or one "
                        "mode for every file")
    p.add_argument("--dequantized", action="store_true", help="also run each file dequantized to bfloat16")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration and print JSON
    return p


FILE_TYPE_MODES = {2: "int4", 7: "int8"}  # llama_ftype MOSTLY_Q4_0, MOSTLY_Q8_0; others: bf16


def run_llama_bench(args, path: str) -> dict:
    result = llama_bench(args.llama_bench, path, threads=args.threads, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, depths=args.depth, repetitions=args.repetitions)  # fmt: skip
    # This worker did nothing but wait for llama-bench: its children's peak is llama-bench's.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    return {"load_s": None, **result, "peak_gb": children}


def worker(args) -> None:
    kind, _, rest = args.worker.partition(":")
    mode, _, path = rest.partition(":")
    quantize = None if mode in ("", "bf16") else mode
    if kind == "llama.cpp":
        result = run_llama_bench(args, path)
    else:
        result = run_ours(path, quantize, group_size=32, threads=args.threads, prompt_len=args.prompt_len,
                          new_tokens=args.new_tokens, depths=args.depth, repetitions=args.repetitions)  # fmt: skip
    print("RESULT " + json.dumps(result))


def file_mode(path: str, choice: str) -> str:
    if choice != "auto":
        return choice
    from weights.gguf import GGUFFile

    with GGUFFile(path) as f:
        return FILE_TYPE_MODES.get(f.metadata.get("general.file_type"), "bf16")


def run_config(args, spec: str) -> dict:
    command = [sys.executable, __file__, "--worker", spec, "--threads", str(args.threads), "--prompt-len",
               str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repetitions", str(args.repetitions),
               "--depth", *map(str, args.depth),
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
    if args.rounds < 1 or args.repetitions < 1 or min(args.depth) < 0:
        print("error: --rounds and --repetitions must be >= 1, --depth >= 0", file=sys.stderr)
        return 2
    print(f"threads {args.threads}, niceness {os.nice(0)}, {os.cpu_count()} CPUs; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)  # fmt: skip
    rows = []
    for round_ in range(1, args.rounds + 1):
        for path in args.files:
            specs = [(f"ours-{modes[path]}", f"ours:{modes[path]}:{path}")]
            if args.dequantized and modes[path] != "bf16":
                specs.append(("ours-bf16", f"ours:bf16:{path}"))
            if args.llama_bench:
                specs.append(("llama.cpp", f"llama.cpp::{path}"))
            for name, spec in specs:
                started = time.perf_counter()
                result = {"round": round_, "file": Path(path).name, "config": name} | run_config(args, spec)
                rows.append(result)
                summary = result.get("error") or ", ".join(
                    f"d{d}: tg {r['decode']:.2f} pp {r['prefill']:.1f}" for d, r in result["depths"].items())
                print(f"  round {round_} {Path(path).name} {name}: {time.perf_counter() - started:.0f} s, {summary}",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)
    print_tables(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def print_tables(args, rows: list[dict]) -> None:
    """The results, one line per configuration, round and depth; then ours / llama.cpp of each round."""
    print(f"\npp{args.prompt_len} and tg{args.new_tokens} at depths {', '.join(map(str, args.depth))}, "
          f"{args.repetitions} repetitions, {args.threads} threads, {args.rounds} round(s)\n")  # fmt: skip
    print("| round | file | config | depth | prefill tok/s | decode tok/s | peak GB |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['round']} | {r['file']} | {r['config']} | failed: {r['error'][:80]} ||||")
            continue
        for depth, d in r["depths"].items():
            print(f"| {r['round']} | {r['file']} | {r['config']} | {depth} | {d['prefill']:.1f} | "
                  f"{d['decode']:.2f} ± {d['decode_sd']:.2f} | {r['peak_gb']:.2f} |")  # fmt: skip
    ours = [r for r in rows if r["config"].startswith("ours-") and "error" not in r]
    base = {(r["round"], r["file"]): r for r in rows if r["config"] == "llama.cpp" and "error" not in r}
    if not ours or not base:
        return
    print("\nours / llama.cpp, same file, same round (> 1: ours faster)\n")
    print("| file | config | depth | decode ratio per round | prefill ratio per round |")
    print("|---|---|---:|---|---|")
    for file in dict.fromkeys(r["file"] for r in ours):
        for config in dict.fromkeys(r["config"] for r in ours if r["file"] == file):
            for depth in map(str, args.depth):
                pairs = [(r["depths"][depth], base[(r["round"], file)]["depths"][depth]) for r in ours
                         if r["file"] == file and r["config"] == config and (r["round"], file) in base]
                decode = " / ".join(f"{a['decode'] / b['decode']:.2f}" for a, b in pairs)
                prefill = " / ".join(f"{a['prefill'] / b['prefill']:.2f}" for a, b in pairs)
                print(f"| {file} | {config} | {depth} | {decode} | {prefill} |")


if __name__ == "__main__":
    sys.exit(main())
