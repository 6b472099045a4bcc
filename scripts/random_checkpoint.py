"""Write a randomly initialised checkpoint of a registry shape, for tests and benchmarks.

    python scripts/random_checkpoint.py llama-3.2-1b /tmp/llama-3.2-1b-random --dtype bfloat16
    python scripts/random_checkpoint.py llama-3.2-1b /tmp/meta-1b --format meta --layers 4

The weights are normal(0, 0.02) noise (norms are ones): the model produces gibberish, but it has the
real shapes, dtype and file layout, so loading, speed and memory can be measured without a download.
"""

from __future__ import annotations

import argparse
import sys

import torch

import llama
from llama.core.checkpoint import save_state_dict


def random_state_dict(config: llama.ModelConfig, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = llama.Transformer(config)
    state = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(param.shape, dtype=dtype)
        else:
            state[name] = (torch.randn(param.shape, generator=generator) * 0.02).to(dtype)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"registry shape: {', '.join(llama.REGISTRY)}")
    parser.add_argument("out", help="directory to write (must not exist)")
    parser.add_argument("--format", choices=["hf", "meta"], default="hf", help="file layout (default hf)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                        help="weight dtype (default bfloat16)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (smaller files)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, any integer (taken modulo 2**64; default 0)")
    args = parser.parse_args(argv)
    try:
        config = llama.ModelConfig.from_name(args.name)
        if args.layers is not None:
            config = config.replace(n_layers=args.layers)
    except (KeyError, llama.ConfigError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    from pathlib import Path

    if Path(args.out).exists():
        print(f"error: {args.out}: already exists", file=sys.stderr)
        return 2
    state = random_state_dict(config, getattr(torch, args.dtype), args.seed % 2**64)
    for path in save_state_dict(config, state, args.out, format=args.format):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
