"""Convert a Llama checkpoint between Meta's layout and Hugging Face's, losslessly, or into a GGUF
file that llama.cpp runs.

    python scripts/convert.py path/to/Llama-3.2-1B path/to/Llama-3.2-1B-hf --to hf
    python scripts/convert.py path/to/hf-model path/to/meta-model --to meta --shards 2
    python scripts/convert.py path/to/hf-model model-q8_0.gguf --to gguf --outtype q8_0

The tokenizer, generation config and chat template files of the source are copied with the weights
(a GGUF file carries its tokenizer inside).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__:  # installed as the package llama_cli
    from .arg_types import positive_int
else:  # python scripts/NAME.py: scripts/ is sys.path[0]
    from arg_types import positive_int

GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # llama.core.gguf.OUTTYPES, spelled out so --help needs no torch


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit):
            number = upper[: -len(unit)].strip()
            break
    else:
        number, scale = upper, 1
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB or 500MB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return int(value * scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to read: a directory (Meta or Hugging Face layout, detected from its "
                                    "files), or a GGUF file")  # fmt: skip
    parser.add_argument("dst", help="directory (hf, meta) or file (gguf) to write; must not exist yet")
    parser.add_argument("--to", required=True, choices=["hf", "meta", "gguf"], help="layout to write")
    parser.add_argument("--outtype", choices=["auto", *GGUF_OUTTYPES], default=None,
                        help="GGUF output: type of the matrices (vectors stay f32); auto (the default) keeps the "
                             "source's float type, q8_0 quantizes as llama.cpp does")  # fmt: skip
    parser.add_argument("--shards", type=positive_int, default=1,
                        help="Meta output: number of model-parallel consolidated.NN.pth files (default 1)")
    parser.add_argument("--max-shard-size", type=parse_size, default=None,
                        help="HF output: split model.safetensors into files of at most this size, e.g. 5GB")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast the weights (default: keep the stored dtype, bit for bit)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: one for checkpoints over 1 GB when stderr is a terminal)")
    args = parser.parse_args(argv)  # before importing torch (seconds): --help and usage errors are instant
    if args.to == "hf" and args.shards != 1:
        parser.error("--shards applies to --to meta; use --max-shard-size for HF output")
    if args.to == "meta" and args.max_shard_size is not None:
        parser.error("--max-shard-size applies to --to hf; use --shards for Meta output")
    if args.to == "gguf" and (args.shards != 1 or args.max_shard_size is not None or args.dtype is not None):
        parser.error("--to gguf writes one file: use --outtype, not --shards, --max-shard-size or --dtype")
    if args.to != "gguf" and args.outtype is not None:
        parser.error("--outtype applies to --to gguf; use --dtype for hf and meta output")
    import llama
    from llama.core import gguf
    from llama.core.checkpoint import convert
    from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError

    try:
        source = Path(args.src)
        files = [source] if source.is_file() else source.glob("*")
        size = sum(f.stat().st_size for f in files if f.suffix in (".safetensors", ".pth", ".gguf"))
        if size > 2**30:
            print(f"[converting {args.src} ({size / 1e9:.1f} GB) to {args.to} ...]", file=sys.stderr, flush=True)
        if args.to == "gguf":
            written = [gguf.convert(args.src, args.dst, outtype=args.outtype or "auto")]
        else:
            written = convert(args.src, args.dst, format=args.to, n_shards=args.shards,
                              max_shard_bytes=args.max_shard_size, dtype=args.dtype,
                              progress=False if args.no_progress else None)  # fmt: skip
    except (llama.CheckpointError, llama.ConfigError, TokenizerNotFoundError, TokenizerFormatError, FileExistsError,
            OSError, ValueError) as e:  # fmt: skip
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
