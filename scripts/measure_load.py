"""Measure how long loading a checkpoint takes and its peak resident memory against the file size.

    python scripts/random_checkpoint.py llama-3.2-1b /tmp/rand-1b        # 2.5 GB of bf16 weights
    python scripts/measure_load.py /tmp/rand-1b

Peak memory is the process's maximum resident set size (it includes Python and torch themselves,
printed separately); the goal is to stay near one copy of the weights.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

_RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory (Meta or HF layout)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="load in this dtype (default: as stored)")
    args = parser.parse_args(argv)

    import llama  # imported here so that its own memory is measured as the baseline

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT
    start = time.perf_counter()
    try:
        model = llama.load(args.checkpoint, dtype=args.dtype)
    except (llama.CheckpointError, llama.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT
    size = sum(f.stat().st_size for f in Path(args.checkpoint).rglob("*") if f.is_file())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.checkpoint}: files {size / 1e9:.3f} GB, weights in memory {weights / 1e9:.3f} GB, "
          f"loaded in {seconds:.1f} s; peak RSS {peak / 1e9:.3f} GB = {peak / size:.2f}x the files "
          f"(Python + torch alone: {baseline / 1e9:.3f} GB; the load added {(peak - baseline) / size:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
