"""A model's arithmetic: parameters by part, KV-cache bytes per token (and GQA's saving), FLOPs per token.

    python scripts/model_stats.py llama-3.2-1b
    python scripts/model_stats.py llama-3.1-8b --dtype float32 --context 8192
    python scripts/model_stats.py weights/kjv          # any checkpoint directory (reads only its config)
    python scripts/model_stats.py --all                # every registry model, one line each

Every number comes from ModelConfig (param_counts, kv_cache_bytes_per_token, flops_per_token in
llama/core/config.py); docs/MATH.md derives them.
"""

from __future__ import annotations

import argparse
import os
import sys

import llama
import weights
from llama.core.checkpoint import config_from_checkpoint
from llama.core.config import DTYPE_BYTES


def read_config(model: str) -> llama.ModelConfig:
    """A registry name, or a checkpoint directory's config (no tensor is read)."""
    if model in llama.REGISTRY:
        return llama.ModelConfig.from_name(model)
    if os.path.isdir(model):
        return config_from_checkpoint(weights.open_checkpoint(model))
    raise ValueError(f"{model!r} is neither a registry model ({', '.join(llama.REGISTRY)}) nor a checkpoint directory")


def count(n: float) -> str:
    return f"{n / 1e9:.3g} billion" if n >= 1e9 else f"{n / 1e6:.3g} million"


def size(n: float, unit: str = "B") -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if n < 1024 or prefix == "Ti":
            return f"{n:,.0f} {unit}" if prefix == "" else f"{n:,.1f} {prefix}{unit}"
        n /= 1024
    raise AssertionError


def describe(name: str, c: llama.ModelConfig, dtype: str, context: int) -> str:
    mlp = {"swiglu": "SwiGLU", "gelu": "GELU"}[c.mlp]
    lines = [
        f"{name}: dim {c.dim}, {c.n_layers} layers, {c.n_heads} query heads, {c.n_kv_heads} key/value heads "
        f"({c.n_rep} query heads per KV head), head_dim {c.head_dim}, FFN {c.ffn_dim} ({mlp}), vocabulary "
        f"{c.vocab_size:,}, output {'tied to the embedding' if c.tie_word_embeddings else 'untied'}, context {c.max_seq_len:,}",
        "",
        f"{'part':<14}{'parameters':>16}{'share':>8}",
    ]
    counts = c.param_counts()
    for part, n in counts.items():
        note = "  (tied: the embedding's matrix)" if part == "output" and c.tie_word_embeddings else ""
        lines.append(f"{part:<14}{n:>16,}{n / c.n_params:>8.1%}{note}")
    lines.append(f"{'total':<14}{c.n_params:>16,}  ({count(c.n_params)}; {size(c.n_params * DTYPE_BYTES[dtype])} "
                 f"in {dtype})")  # fmt: skip
    width = DTYPE_BYTES[dtype]
    kv = c.kv_cache_bytes_per_token(dtype)
    mha = c.replace(n_kv_heads=c.n_heads).kv_cache_bytes_per_token(dtype)
    lines += [
        "",
        f"KV cache in {dtype}: {kv:,} bytes per token = 2 (k, v) x {c.n_layers} layers x {c.n_kv_heads} KV heads x "
        f"{c.head_dim} x {width} bytes; {size(kv * context)} per sequence of {context:,} tokens",
        f"  with one KV head per query head (multi-head attention, {c.n_heads} KV heads): {mha:,} bytes per token; "
        f"GQA stores {mha / kv:g}x less",
        "",
        f"FLOPs per token, forward: {count(c.flops_per_token(1))} attending to 1 position, "
        f"{count(c.flops_per_token(context))} attending to {context:,} (training: about 3x)",
    ]
    return "\n".join(lines)


def registry_table(dtype: str) -> str:
    rows = [f"{'model':<16}{'parameters':>18}{'KV bytes/token':>16}{'GQA saving':>12}{'GFLOP/token':>13}"]
    for name, c in llama.REGISTRY.items():
        kv = c.kv_cache_bytes_per_token(dtype)
        saving = c.n_heads / c.n_kv_heads
        rows.append(f"{name:<16}{c.n_params:>18,}{kv:>16,}{saving:>11g}x{c.flops_per_token(1) / 1e9:>13,.2f}")
    return "\n".join(rows) + f"\n(KV cache in {dtype}; FLOPs: forward, one token attending to one position)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="a registry name (e.g. llama-3.2-1b) or a checkpoint directory")
    p.add_argument("--all", action="store_true", help="one line for every registry model instead")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the weights and the KV cache (default bfloat16)")
    p.add_argument("--context", type=int, help="positions attended to / cached per sequence (default: the model's context)")
    args = p.parse_args(argv)
    try:
        if args.all:
            print(registry_table(args.dtype))
            return 0
        if args.model is None:
            raise ValueError("give a model (a registry name or a checkpoint directory) or --all")
        config = read_config(args.model)
        context = config.max_seq_len if args.context is None else args.context
        if context < 1:
            raise ValueError(f"--context must be at least 1, got {context}")
        print(describe(args.model, config, args.dtype, context))
    except (llama.CheckpointError, llama.ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
