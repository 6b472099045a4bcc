"""Peak memory, seconds per step and trainable parameters of each fine-tuning method, each in its own process.

    python scripts/random_checkpoint.py llama-3.2-1b /tmp/rand-1b --dtype bfloat16
    python scripts/finetune_memory.py --checkpoint /tmp/rand-1b --context 512 --batch-size 1 --steps 3

Configurations: full fine-tuning in bf16, LoRA on a bf16 base, QLoRA on an int8 and an int4 base
(LoRA rank 8 on the seven projections of every block, adapters in float32), each with and without
activation checkpointing. Every configuration runs in a fresh process: load the checkpoint, build the
method (finetune.load_for_finetuning), then --steps optimiser steps of llama.training.loop.train on
random tokens (every position trained, bf16 autocast, AdamW). Peak memory is the process's peak
resident set (getrusage), which includes loading and the Python/torch runtime. As finetune.py does, each
process fixes glibc's mmap threshold (--malloc-mmap-threshold) and QLoRA quantizes the embedding and
the output projection too (unless --float-embedding). The resident set after
importing (the runtime: ~0.25 GB) and after loading are reported too, as is the peak while loading
(reading and quantizing the checkpoint), and "peak above the runtime" is what the model and training
added (comparable with GPU tables, which count tensor memory only).
Seconds per step: the mean over the steps after the first (the first pays one-off allocations), as
wall-clock time and as the CPU time the process used (on a shared machine the wall-clock time
depends on what else runs; the CPU time much less).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {  # name: (method, quantize, checkpointing)
    "full-bf16": ("full", None, False),
    "full-bf16-ckpt": ("full", None, True),
    "lora-bf16": ("lora", None, False),
    "lora-bf16-ckpt": ("lora", None, True),
    "qlora-int8": ("qlora", "int8", False),
    "qlora-int8-ckpt": ("qlora", "int8", True),
    "qlora-int4": ("qlora", "int4", False),
    "qlora-int4-ckpt": ("qlora", "int4", True),
}


def rss_gb() -> float:
    """The current resident set, GB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def measure(args, name: str) -> dict:
    """Run one configuration in this process; returns its row."""
    import torch

    from llama.training.data import Example, InstructionBatches
    from llama.training.finetune import FinetuneSpec, load_for_finetuning, parameter_counts, set_mmap_threshold
    from llama.training.loop import IGNORE, TrainConfig, train

    torch.set_num_threads(args.threads)
    set_mmap_threshold(args.malloc_mmap_threshold)
    load_before = os.getloadavg()[0]
    runtime = rss_gb()  # python, torch and this project imported, nothing loaded
    method, quantize, ckpt = CONFIGS[name]
    spec = FinetuneSpec(method=method, quantize=quantize, group_size=args.group_size, lora_rank=args.rank,
                        lora_alpha=2.0 * args.rank, gradient_checkpointing=ckpt,
                        quantize_embedding=not args.float_embedding)  # fmt: skip
    t0 = time.perf_counter()
    model = load_for_finetuning(args.checkpoint, spec, dtype="bfloat16")
    load_s, after_load = time.perf_counter() - t0, rss_gb()
    peak_loading = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # the peak so far: loading's
    rng = random.Random(0)
    vocab = model.config.vocab_size
    examples = [Example(ids, [IGNORE] + ids[1:]) for ids in
                ([rng.randrange(vocab) for _ in range(args.context + 1)] for _ in range(args.batch_size * args.steps))]  # fmt: skip
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, context=args.context, lr=1e-5, min_lr=1e-5,
                         warmup_steps=0, weight_decay=0.0, precision="bf16", eval_every=10**6,
                         loss_chunk=args.loss_chunk)  # fmt: skip
    step_times, cpu_times = [], []

    class Timed(InstructionBatches):  # the time between two requests for a batch is one step
        def train_batch(self, step, micro):
            step_times.append(time.perf_counter())
            cpu_times.append(time.process_time())
            return super().train_batch(step, micro)

    train(model, Timed(examples, None, config), config, progress=False)
    step_times.append(time.perf_counter())
    cpu_times.append(time.process_time())
    steps = [b - a for a, b in zip(step_times, step_times[1:])]
    cpu = [b - a for a, b in zip(cpu_times, cpu_times[1:])]
    trainable, total = parameter_counts(model)
    return {
        "config": name, "method": method, "quantize": quantize, "checkpointing": ckpt,
        "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),  # ru_maxrss: KiB
        "runtime_gb": round(runtime, 3), "after_load_gb": round(after_load, 3),
        "peak_loading_gb": round(peak_loading, 3), "load_s": round(load_s, 1),
        "s_per_step": round(sum(steps[1:]) / max(1, len(steps) - 1), 2), "first_step_s": round(steps[0], 2),
        # CPU seconds the process used per step (all its threads): what a step costs whatever share of
        # the machine the process got
        "cpu_s_per_step": round(sum(cpu[1:]) / max(1, len(cpu) - 1), 2),
        "trainable": trainable, "parameters": total,
        "context": args.context, "batch_size": args.batch_size, "threads": args.threads, "loss_chunk": args.loss_chunk,
        "malloc_mmap_threshold": args.malloc_mmap_threshold, "float_embedding": args.float_embedding,
        # the machine's 1-minute load average before and after: what else competed for the CPU
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the checkpoint to fine-tune (e.g. a random llama-3.2-1b)")
    p.add_argument("--context", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per step (default 1)")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps per configuration, the first not timed (default 3)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (default 64)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--loss-chunk", type=int, default=64, help="positions per chunk of the output layer and loss; 0: whole logits (default 64, finetune.py's)")
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), help="run only these configurations")
    p.add_argument("--malloc-mmap-threshold", type=int, default=4 << 20, metavar="BYTES",
                   help="glibc's mmap threshold, as finetune.py sets it: buffers of at least BYTES are mapped and handed "
                        "back to the OS when freed, instead of kept in the heap (default 4194304, finetune.py's; 0: "
                        "glibc's own, a threshold that grows up to 32 MB as large buffers are freed)")
    p.add_argument("--float-embedding", action="store_true",
                   help="qlora: keep the embedding and the output projection in float (finetune.py's --float-embedding)")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # internal: measure in this process
    args = p.parse_args(argv)
    if args.steps < 2:
        print("error: --steps must be at least 2 (the first step is not timed)", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return 0
    if not Path(args.checkpoint).is_dir():
        print(f"error: {args.checkpoint}: no such checkpoint directory", file=sys.stderr)
        return 2
    rows = []
    for name in args.only or CONFIGS:
        argv_child = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--context", str(args.context),
                      "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--rank", str(args.rank),
                      "--group-size", str(args.group_size), "--threads", str(args.threads), "--loss-chunk", str(args.loss_chunk),
                      "--malloc-mmap-threshold", str(args.malloc_mmap_threshold), "--one", name]  # fmt: skip
        if args.float_embedding:
            argv_child.append("--float-embedding")
        done = subprocess.run(argv_child, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed (exit {done.returncode}):\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    print("| method | activation checkpointing | peak RSS GB | peak above the runtime GB | peak while loading GB "
          "| after loading GB | s / step | CPU s / step | trainable parameters | load average |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = {"full": "full, bf16", "lora": "LoRA, bf16 base", "qlora": f"QLoRA, {r['quantize']} base"}[r["method"]]
        print(f"| {label} | {'yes' if r['checkpointing'] else 'no'} | {r['peak_gb']:.2f} | {r['peak_gb'] - r['runtime_gb']:.2f} | "
              f"{r['peak_loading_gb']:.2f} | {r['after_load_gb']:.2f} | {r['s_per_step']:.1f} | {r['cpu_s_per_step']:.1f} | "
              f"{r['trainable']:,} ({100 * r['trainable'] / r['parameters']:.2f}%) | {r['load_average'][0]:.1f} to {r['load_average'][1]:.1f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
