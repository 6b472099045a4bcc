"""Peak memory and time of prefilling one long prompt, whole or in chunks through the KV cache.

    python scripts/random_checkpoint.py llama-3.2-1b /tmp/rand1b --dtype bfloat16
    python scripts/bench_prefill.py --checkpoint /tmp/rand1b --tokens 4096 --chunk 0     # one forward (before)
    python scripts/bench_prefill.py --checkpoint /tmp/rand1b --tokens 4096 --chunk 512   # chunked (generate's default)

Measures, for one prefill of --tokens random token ids after the model is loaded and its KV cache set
up: how much the process's resident memory grew at its peak during the prefill (Linux: the
high-water mark is reset just before it; elsewhere the whole process's peak is reported), the
process's peak resident memory overall, the KV cache's own size, and the time. Run one setting per
process (the peak is the process's), and note what else runs on the machine.
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
import time
from pathlib import Path

# torch and the project are imported in main(), after the arguments are parsed: --help and usage
# errors do not wait for torch.

STATUS = Path("/proc/self/status")


def resident() -> tuple[int, int]:
    """(current, peak) resident bytes of this process; peak since the last reset_peak()."""
    if STATUS.exists():
        text = STATUS.read_text()
        now, peak = (int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))
        return now, peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return 0, peak


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the high-water mark from now
        return True
    except OSError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (Meta or HF layout)")
    p.add_argument("--tokens", type=int, help="prompt length in tokens (default 4096, or what the model's context leaves)")
    p.add_argument("--chunk", type=int, default=512,
                   help="positions per forward; 0: the whole prompt in one forward, as before chunked prefill (default 512)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16", help="weight dtype (default bfloat16)")
    p.add_argument("--kv-cache-dtype", default=None, help="KV cache storage: int8, fp8, or a float dtype (default: the weights')")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=False,
                   help="swap in kernels.optimize's modules (SDPA attention ...); default off: the plain model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.tokens is not None and args.tokens < 1) or args.chunk < 0:
        p.error("--tokens must be positive and --chunk at least 0")
    import torch

    import kernels
    import llama
    from llama.core.device import pick_device, set_threads
    from llama.core.generation import prefill

    try:
        set_threads(args.threads)
        device = pick_device(args.device)
        model = llama.load(args.checkpoint, dtype=args.dtype, device=device, kv_cache_dtype=args.kv_cache_dtype)
        if args.kernels:
            kernels.optimize(model, native=False)
        if args.tokens is None:
            args.tokens = min(4096, model.config.max_seq_len - 1)
        if args.tokens + 1 > model.config.max_seq_len:
            raise ValueError(f"--tokens {args.tokens} does not fit the model's context of {model.config.max_seq_len}")
    except (llama.CheckpointError, llama.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    model.setup_cache(1, args.tokens + 1)
    tokens = tokens.to(device)
    with torch.inference_mode():
        prefill(model, tokens[:, :16], torch.tensor([16]), chunk=None)  # one-time allocations out of the way
        before, _ = resident()
        exact = reset_peak()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        prefill(model, tokens, torch.tensor([args.tokens]), chunk=args.chunk or None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    _, peak = resident()
    chunk = f"chunks of {args.chunk}" if args.chunk else "one forward"
    print(f"prefill of {args.tokens} tokens, {chunk}, {args.dtype} weights, {model.cache.kv_cache_dtype} KV cache "
          f"({model.cache.nbytes / 1e6:.0f} MB), {'kernels' if args.kernels else 'plain model'}, {device.type}: "
          f"{seconds:.1f} s ({args.tokens / seconds:.0f} tok/s)")  # fmt: skip
    if device.type == "cuda":
        print(f"  GPU peak allocated during the prefill: {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB")
    if exact:
        print(f"  resident memory peaked {(peak - before) / 1e9:.2f} GB above the {before / 1e9:.2f} GB before the "
              f"prefill ({peak / 1e9:.2f} GB)")  # fmt: skip
    else:
        print(f"  the process's peak resident memory (loading included): {peak / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
