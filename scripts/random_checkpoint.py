"""Write a randomly initialised checkpoint of a registry shape, for tests and benchmarks.

    python scripts/random_checkpoint.py llama-3.2-1b /tmp/llama-3.2-1b-random --dtype bfloat16
    python scripts/random_checkpoint.py llama-3.2-1b /tmp/meta-1b --format meta --layers 4

The weights are normal(0, 0.02) noise (norms are ones): the model produces gibberish, but it has the
real shapes, dtype and file layout, so loading, speed and memory can be measured without a download.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def random_state_dict(config, dtype, seed: int, progress: bool = False) -> dict:
    """normal(0, 0.02) weights and unit norms for every parameter of `config`'s model, in `dtype`."""
    import torch
    from tqdm import tqdm

    import llama

    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = llama.Transformer(config)
    params = list(model.named_parameters())
    state = {}
    with tqdm(total=sum(p.numel() * dtype.itemsize for _, p in params), unit="B", unit_scale=True,
              desc="random weights", file=sys.stderr, disable=not progress) as bar:  # fmt: skip
        for name, param in params:
            if name.endswith("norm.weight"):
                state[name] = torch.ones(param.shape, dtype=dtype)
            else:
                state[name] = (torch.randn(param.shape, generator=generator) * 0.02).to(dtype)
            bar.update(state[name].nbytes)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="registry shape, e.g. llama-3.2-1b (an unknown name lists them all)")
    parser.add_argument("out", help="directory to write (must not exist)")
    parser.add_argument("--format", choices=["hf", "meta"], default="hf", help="file layout (default hf)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                        help="weight dtype (default bfloat16)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (smaller files)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, any integer (taken modulo 2**64; default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: one on a terminal)")
    args = parser.parse_args(argv)  # before importing torch (seconds): --help and usage errors are instant
    import torch

    import llama
    from llama.core.checkpoint import save_state_dict

    try:
        config = llama.ModelConfig.from_name(args.name)
        if args.layers is not None:
            config = config.replace(n_layers=args.layers)
    except (KeyError, llama.ConfigError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if Path(args.out).exists():
        print(f"error: {args.out}: already exists", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    progress = not args.no_progress and sys.stderr.isatty()
    state = random_state_dict(config, dtype, args.seed % 2**64, progress=progress)
    print(f"[writing {args.out}: {sum(t.nbytes for t in state.values()) / 1e9:.2f} GB]", file=sys.stderr, flush=True)
    for path in save_state_dict(config, state, args.out, format=args.format):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
