"""Benchmark one checkpoint: this project at each precision, with and without compile, batch 1 and 8,
side by side with transformers' eager generate, all in one run on one machine.

    python scripts/benchmark.py --checkpoint /tmp/llama-3.2-1b-random
    python scripts/benchmark.py --checkpoint ... --only ours-bf16 hf-bf16 --batch 1 --plot bench.png

Each configuration runs in a fresh Python process (so its load time and peak memory are its own):
load the checkpoint, generate a few tokens to warm up (and compile, when asked; the compile time
is reported), then prefill a --prompt-len token prompt (random ids, the same for every run) and
decode --new-tokens tokens greedily with stopping turned off. Reported per run:

    load      seconds from nothing to a model ready to run (reading, converting, quantizing)
    prefill   prompt tokens per second (batch x prompt length / time to the first new token)
    decode    generated tokens per second after the first (all rows of the batch together)
    ms/step   milliseconds per decoding step (one new token for every row): batch / decode
    GB/s      weight bytes read per decoding step x steps per second: every weight is read once per
              step, so this is the memory bandwidth decoding achieves, and `% bw` compares it with
              the read bandwidth measured at the start of the run (a multi-threaded sum over 1 GiB)
    peak      the process's peak resident memory (CPU) or peak allocated memory (CUDA)
    vs hf     decode speed over transformers' bf16 eager decode at the same batch size

The ceiling for batch-1 decoding is bandwidth / weight bytes: faster needs fewer bytes (quantization).

Next to llama.cpp (--llama-cpp DIR, a llama.cpp build: bin/llama-bench, bin/llama-quantize, and its
convert_hf_to_gguf.py beside it or given with --llama-cpp-converter):

    python scripts/benchmark.py --checkpoint DIR --llama-cpp path/to/llama.cpp --threads 2 --rounds 2

converts the checkpoint with llama.cpp's own converter to a BF16 GGUF file and quantizes that with
llama-quantize to Q8_0 and Q4_0 (once: the files are cached under a content hash of the checkpoint,
see --gguf-cache), then, for each round and precision, runs this project (bf16, int8, int4: the
checkpoint loaded and quantized as generate.py does, kernels.optimize) and llama-bench on the
matching file (BF16, Q8_0, Q4_0), one after the other, the first of the two alternating between
rounds. Both measure what llama-bench does, batch 1: pp, --prompt-len prompt tokens prefilled (after
--depth cached tokens), and tg, --new-tokens tokens decoded one at a time (tok/s, the mean of
--repetitions runs). The table gives, per round, ours and llama.cpp's decode and prefill and ours /
llama.cpp (> 1: ours faster).
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

import torch

if __package__:  # installed as the package llama_cli
    from . import llama_cpp_peer as peer
else:  # python scripts/benchmark.py
    import llama_cpp_peer as peer

LLAMA_CPP_TYPES = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}  # this project's precision: llama.cpp's type
CONFIGS = {  # name: (implementation, dtype, quantization, compile)
    "hf-float32": ("hf", "float32", None, False),
    "hf-bf16": ("hf", "bfloat16", None, False),
    "ours-float32": ("ours", "float32", None, False),
    "ours-bf16": ("ours", "bfloat16", None, False),
    "ours-int8": ("ours", "bfloat16", "int8", False),
    "ours-int4": ("ours", "bfloat16", "int4", False),
    "ours-float32-compile": ("ours", "float32", None, True),
    "ours-bf16-compile": ("ours", "bfloat16", None, True),
    "ours-int8-compile": ("ours", "bfloat16", "int8", True),
    "ours-int4-compile": ("ours", "bfloat16", "int4", True),
    "ours-bf16-plain": ("plain", "bfloat16", None, False),  # llama/core/model.py as written, no kernels/
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory (transformers reads it too)")
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), metavar="CONFIG",
                   help=f"run only these configurations (default: all): {', '.join(CONFIGS)}")
    p.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: 1 8; not with --llama-cpp, which is batch 1)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to decode per row (default 32)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--plot", help="also write a bar chart of decode speed to this PNG file (needs matplotlib)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="instead of the table: profile the decode steps of each chosen configuration of this "
                        "project with torch.profiler and print where the time goes, by operator and input shapes "
                        "(so each projection's matrix product has its own line)")
    g = p.add_argument_group("next to llama.cpp")
    g.add_argument("--llama-cpp", metavar="DIR",
                   help="a llama.cpp build directory (holding bin/llama-bench, or build/bin/llama-bench in a checkout): "
                        "instead of the table above, this project side by side with llama-bench on the same weights")
    g.add_argument("--llama-cpp-converter", metavar="PATH",
                   help="llama.cpp's convert_hf_to_gguf.py (default: found in DIR or the folders above it)")
    g.add_argument("--gguf-cache", metavar="DIR", default=str(Path.home() / ".cache" / "llama-from-scratch" / "gguf"),
                   help="where the converted GGUF files are kept, named by the checkpoint's content hash "
                        "(default ~/.cache/llama-from-scratch/gguf)")
    g.add_argument("--precision", nargs="+", choices=list(LLAMA_CPP_TYPES), default=list(LLAMA_CPP_TYPES),
                   help="this project's precisions to compare, each with its llama.cpp type: bf16 with BF16, int8 "
                        "with Q8_0, int4 with Q4_0 (default: all three)")
    g.add_argument("--rounds", type=int, default=2, help="times the whole sequence runs, interleaved (default 2)")
    g.add_argument("--repetitions", type=int, default=3, help="timed runs of each measurement, averaged (default 3)")
    g.add_argument("--depth", type=int, nargs="+", default=[0],
                   help="tokens already in the KV cache when pp and tg are measured, one or more (default 0)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration and print JSON
    return p


# ---- one configuration, in its own process ---------------------------------------------------------


class _Clock:
    """Time of each new token, for transformers' generate (which calls put() with the prompt first)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    status = Path("/proc/self/status")
    if status.is_file():  # Linux: this program's own high-water mark (ru_maxrss also counts the parent's before exec)
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


def run_ours(args, kind: str, dtype: str, quant: str | None, compile: bool, batch: int) -> dict:
    import kernels
    import llama
    from llama.core.device import weight_bytes_per_token as bytes_per_token
    from llama.core.generation import stream, warm_up

    device = torch.device(args.device)
    start = time.perf_counter()
    model = llama.load(args.checkpoint, dtype=dtype, device=device, quantize=quant, group_size=args.group_size)
    if kind == "ours":
        kernels.optimize(model, **kernels.fusable(model))  # quantized projections fuse too, unless mixed
    load = time.perf_counter() - start
    prompts = _prompts(model.config.vocab_size, batch, args.prompt_len)
    compile_time = None
    if compile:
        start = time.perf_counter()
        warm_up(model, batch, args.prompt_len + args.new_tokens)
        compile_time = time.perf_counter() - start
    for _ in stream(model, [p[:8] for p in prompts], 3, temperature=0, stop_tokens=[], compile=compile):
        pass  # warm-up: first calls allocate and pick kernels

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        steps = stream(model, prompts, args.new_tokens, temperature=0, stop_tokens=[], compile=compile)
        next(steps)  # the prefill, not profiled
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in steps:
                pass
        # by operator and input shapes: each projection's matrix-vector product on its own line
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20)
        print(table, file=sys.stderr)
    _sync(device)
    times = []
    start = time.perf_counter()
    for _ in stream(model, prompts, args.new_tokens, temperature=0, stop_tokens=[], compile=compile):
        _sync(device)
        times.append(time.perf_counter())
    return _result(times, start, batch, args, load, compile_time, bytes_per_token(model), device)


def run_hf(args, dtype: str, batch: int) -> dict:
    from transformers import LlamaForCausalLM

    device = torch.device(args.device)
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, dtype)).to(device).eval()
    load = time.perf_counter() - start
    prompts = torch.tensor(_prompts(model.config.vocab_size, batch, args.prompt_len), device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompts))

    def generate(ids, n, clock=None):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=clock, **{**kwargs, "attention_mask": torch.ones_like(ids)})

    generate(prompts[:, :8], 3)  # warm-up
    clock = _Clock()
    _sync(device)
    start = time.perf_counter()
    generate(prompts, args.new_tokens, clock)
    times = clock.times[1:]  # the first put() is the prompt
    n_weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.config.tie_word_embeddings:
        n_weights += model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    return _result(times, start, batch, args, load, None, n_weights, device)


def _prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(vocab // 10, min(vocab, 30000), (batch, length), generator=generator).tolist()


def _result(times, start, batch, args, load, compile_time, weight_bytes, device) -> dict:
    ttft = times[0] - start
    steps = len(times) - 1
    step_rate = steps / (times[-1] - times[0]) if steps else 0.0
    return {
        "load_s": load,
        "compile_s": compile_time,
        "prefill_tok_s": batch * args.prompt_len / ttft,
        "decode_tok_s": batch * step_rate,
        "gb_s": weight_bytes * step_rate / 1e9,
        "weight_gb": weight_bytes / 1e9,
        "peak_gb": _peak_memory(device),
    }


def worker(args) -> None:
    if args.worker.startswith("pp-tg:"):  # --llama-cpp: this project, measured as llama-bench measures
        mode = args.worker.removeprefix("pp-tg:")
        result = peer.run_ours(args.checkpoint, None if mode == "bf16" else mode, group_size=args.group_size,
                               threads=args.threads, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                               depths=args.depth, repetitions=args.repetitions)  # fmt: skip
        print("RESULT " + json.dumps(result))
        return
    name, batch = args.worker.rsplit(":", 1)
    kind, dtype, quant, compile = CONFIGS[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    if kind == "hf":
        result = run_hf(args, dtype, int(batch))
    else:
        result = run_ours(args, kind, dtype, quant, compile, int(batch))
    print("RESULT " + json.dumps(result))


# ---- the driver ------------------------------------------------------------------------------------


def read_bandwidth(threads: int | None) -> float:
    """GB/s of a multi-threaded sum over 1 GiB of float32: what streaming weights can reach."""
    if threads:
        torch.set_num_threads(threads)
    x = torch.ones(2**28, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def run_config(args, name: str, batch: int | None) -> dict:
    """One configuration in a fresh process: `name` from CONFIGS at `batch`, or with batch None,
    "pp-tg:MODE" (--llama-cpp)."""
    command = [sys.executable, __file__, "--worker", name if batch is None else f"{name}:{batch}",
               "--checkpoint", args.checkpoint, "--prompt-len", str(args.prompt_len), "--new-tokens",
               str(args.new_tokens), "--group-size", str(args.group_size), "--device", args.device,
               "--repetitions", str(args.repetitions), "--depth", *map(str, args.depth)]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.profile:
        command += ["--profile"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if args.profile:
        print(f"\n== {name}, batch {batch}: decode steps, by self CPU time ==\n" + proc.stderr, file=sys.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail}


def table(results: list[dict], bandwidth: float) -> str:
    baseline = {r["batch"]: r["decode_tok_s"] for r in results if r["config"] == "hf-bf16" and "error" not in r}
    lines = ["| config | batch | load s | compile s | prefill tok/s | decode tok/s | ms/step | GB/s | % bw | peak GB | vs hf bf16 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['batch']} | failed: {r['error'][:80]} ||||||||||")
            continue
        ratio = f"{r['decode_tok_s'] / baseline[r['batch']]:.2f}x" if r["batch"] in baseline else "-"
        compile_s = f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-"
        step_ms = f"{1000 * r['batch'] / r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"  # one step: a token per row
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['load_s']:.1f} | {compile_s} | {r['prefill_tok_s']:.1f} | "
            f"{r['decode_tok_s']:.2f} | {step_ms} | {r['gb_s']:.1f} | {100 * r['gb_s'] / bandwidth:.0f} | "
            f"{r['peak_gb']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    batches = sorted({r["batch"] for r in ok})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in ok if r["batch"] == batch]
        colors = ["tab:gray" if r["config"].startswith("hf") else "tab:blue" for r in rows]
        ax.barh([r["config"] for r in rows], [r["decode_tok_s"] for r in rows], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s")
        ax.set_title(f"batch {batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- next to llama.cpp ----------------------------------------------------------------------------


def _load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def compare_with_llama_cpp(args) -> int:
    """--llama-cpp: convert (cached), then rounds of ours and llama-bench per precision; print the table."""
    unused = [flag for flag, value in (("--batch", args.batch), ("--only", args.only), ("--profile", args.profile),
                                       ("--plot", args.plot)) if value]  # fmt: skip
    if unused:
        print(f"error: {', '.join(unused)} cannot be used with --llama-cpp (llama-bench's runs are batch 1)", file=sys.stderr)
        return 2
    if args.device != "cpu":
        print(f"error: --llama-cpp compares CPU runs; --device {args.device} is not supported", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.repetitions < 1 or min(args.depth) < 0 or (args.threads is not None and args.threads < 1):
        print("error: --rounds, --repetitions and --threads must be >= 1, --depth >= 0", file=sys.stderr)
        return 2
    args.threads = args.threads or torch.get_num_threads()  # both sides get the same count

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        tools = peer.LlamaCpp.find(args.llama_cpp, args.llama_cpp_converter)
        files = peer.gguf_files(tools, args.checkpoint, args.gguf_cache, [LLAMA_CPP_TYPES[p] for p in args.precision],
                                threads=args.threads, log=log)  # fmt: skip
    except peer.LlamaCppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loads = [_load_average()]
    log(f"threads {args.threads}, niceness {os.nice(0)}, {os.cpu_count()} CPUs; load average {loads[0]}")
    rows = []
    for round_ in range(1, args.rounds + 1):
        for precision in args.precision:
            kind = LLAMA_CPP_TYPES[precision]
            row = {"round": round_, "precision": precision, "llama_cpp_type": kind, "gguf": str(files[kind])}
            for side in ("llama.cpp", "ours") if round_ % 2 else ("ours", "llama.cpp"):  # who goes first alternates
                started = time.perf_counter()
                if side == "ours":
                    row[side] = run_config(args, f"pp-tg:{precision}", None)
                else:
                    try:
                        row[side] = peer.llama_bench(tools.bench, files[kind], threads=args.threads,
                                                     prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                                     depths=args.depth, repetitions=args.repetitions)  # fmt: skip
                    except peer.LlamaCppError as e:
                        print(f"error: {e}", file=sys.stderr)
                        return 2
                result = row[side]
                summary = result.get("error") or ", ".join(
                    f"d{d}: tg {r['decode']:.2f} pp {r['prefill']:.1f}" for d, r in result["depths"].items())
                log(f"  round {round_} {precision if side == 'ours' else kind} {side}: "
                    f"{time.perf_counter() - started:.0f} s, {summary}")  # fmt: skip
            rows.append(row)
    loads.append(_load_average())
    print(f"\nCheckpoint {args.checkpoint}; llama.cpp {tools.bench.parent}; {args.threads} threads; pp{args.prompt_len}, "
          f"tg{args.new_tokens}, batch 1, mean of {args.repetitions} runs; int4 in groups of {args.group_size}; "
          f"load average (1, 5, 15 min) before {loads[0]}, after {loads[1]}\n")  # fmt: skip
    print(llama_cpp_table(rows, args.depth))
    if args.rounds > 1:
        print(f"\nOver the {args.rounds} rounds (this VM's speed moves between runs; the median and the range):\n")
        print(llama_cpp_summary(rows, args.depth))
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average": loads, "threads": args.threads, "rows": rows}, indent=2))
    return 0


def llama_cpp_table(rows: list[dict], depths: list[int]) -> str:
    """One line per round, precision and depth: decode and prefill of both and ours / llama.cpp."""
    lines = ["| round | precision | depth | ours decode tok/s | llama.cpp decode tok/s | decode ratio | "
             "ours prefill tok/s | llama.cpp prefill tok/s | prefill ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        name = f"{row['precision']} / {row['llama_cpp_type']}"
        ours, theirs = row["ours"], row["llama.cpp"]
        if "error" in ours:
            lines.append(f"| {row['round']} | {name} | | ours failed: {ours['error'][:80]} ||||||")
            continue
        for depth in map(str, depths):
            a, b = ours["depths"][depth], theirs["depths"][depth]
            lines.append(f"| {row['round']} | {name} | {depth} | {a['decode']:.2f} | {b['decode']:.2f} | "
                         f"{a['decode'] / b['decode']:.2f} | {a['prefill']:.1f} | {b['prefill']:.1f} | "
                         f"{a['prefill'] / b['prefill']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def llama_cpp_summary(rows: list[dict], depths: list[int]) -> str:
    """One line per precision and depth: the median ours / llama.cpp decode and prefill ratio over the
    rounds, and the lowest and highest."""
    lines = ["| precision | depth | rounds | decode ratio, median | decode ratio, range | prefill ratio, median | "
             "prefill ratio, range |", "|---|---:|---:|---:|---|---:|---|"]  # fmt: skip
    for precision in dict.fromkeys(row["precision"] for row in rows):
        done = [r for r in rows if r["precision"] == precision and "error" not in r["ours"]]
        if not done:
            continue
        for depth in map(str, depths):
            ratios = {key: sorted(r["ours"]["depths"][depth][key] / r["llama.cpp"]["depths"][depth][key] for r in done)
                      for key in ("decode", "prefill")}  # fmt: skip
            cells = [f"{statistics.median(v):.2f} | {v[0]:.2f}-{v[-1]:.2f}" for v in ratios.values()]
            lines.append(f"| {precision} / {done[0]['llama_cpp_type']} | {depth} | {len(done)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not (Path(args.checkpoint) / "config.json").is_file():
        print(f"error: {args.checkpoint} is not a Hugging Face checkpoint directory (no config.json)", file=sys.stderr)
        return 2
    if args.llama_cpp:
        return compare_with_llama_cpp(args)
    args.batch = args.batch or [1, 8]
    names = args.only or list(CONFIGS)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: skipping the hf-* rows", file=sys.stderr)
        names = [n for n in names if CONFIGS[n][0] != "hf"]
    bandwidth = read_bandwidth(args.threads)
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s; threads: {args.threads or torch.get_num_threads()}; "
          f"torch {torch.__version__}; {os.cpu_count()} CPUs", file=sys.stderr)  # fmt: skip
    results = []
    for batch in args.batch:
        for name in names:
            started = time.perf_counter()
            result = {"config": name, "batch": batch} | run_config(args, name, batch)
            results.append(result)
            summary = result["error"] if "error" in result else f"decode {result['decode_tok_s']:.2f} tok/s"
            print(f"  {name} batch {batch}: {time.perf_counter() - started:.0f} s, {summary}", file=sys.stderr)
    print(f"\nCheckpoint {args.checkpoint}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per row; "
          f"memory read bandwidth {bandwidth:.1f} GB/s\n")  # fmt: skip
    print(table(results, bandwidth))
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_gb_s": bandwidth, "results": results}, indent=2))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
