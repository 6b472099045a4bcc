"""Perplexity by position in long windows of a text, for several models or RoPE scalings of one.

    python scripts/position_perplexity.py --text-file data/kjv/valid.txt --length 1024 \\
        --model "no scaling=weights/kjv" --model "PI x4=weights/kjv@linear:4" --model "YaRN x4=weights/kjv@yarn:4" \\
        --plot runs/context.png

The text is encoded as scripts/train.py encodes it (--documents: BOS + document + EOS, in one
stream) and cut into consecutive windows of --length tokens; every model reads the same windows.
--model LABEL=CHECKPOINT[@SCALING] (repeatable): SCALING as --rope-scaling takes it ("linear:4",
"yarn:4", a JSON object, or "none"); without it the checkpoint's own. Prints a table of perplexity
per block of --table-block positions and, with --plot, draws one curve per model (blocks of
--bucket positions, a dashed line at the first model's trained context). --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# torch and the project are imported in main(), after the arguments are parsed: --help and usage
# errors do not wait for torch.

DOCUMENT_SPLITS = ("line", "paragraph", "file")  # llama.training.pretrain.DOCUMENT_SPLITS


def parse_model(text: str) -> tuple[str, str, str | None]:
    label, sep, rest = text.partition("=")
    if not sep or not label.strip() or not rest.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=CHECKPOINT[@SCALING], got {text!r}")
    path, _, scaling = rest.partition("@")
    return label.strip(), path.strip(), scaling.strip() or None


def describe(config) -> str:
    s = config.rope_scaling
    if s is None:
        return f"no RoPE scaling, context {config.max_seq_len}"
    return f"{s.kind} RoPE scaling x{s.factor:g} of {config.trained_context} positions, context {config.max_seq_len}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-file", required=True, help="the text to score (UTF-8)")
    p.add_argument("--model", action="append", type=parse_model, required=True, metavar="LABEL=CHECKPOINT[@SCALING]",
                   help="a model to score, repeatable; @SCALING runs it with that RoPE scaling (e.g. @yarn:4)")
    p.add_argument("--documents", choices=DOCUMENT_SPLITS, default="line",
                   help="what one BOS ... EOS document of the text is (default line, as scripts/train.py)")
    p.add_argument("--length", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    p.add_argument("--bucket", type=int, default=32, help="positions per point of the plot (default 32)")
    p.add_argument("--table-block", type=int, default=256, help="positions per column of the table (default 256)")
    p.add_argument("--plot", help="write the perplexity-by-position plot to this PNG (needs matplotlib)")
    p.add_argument("--json", help="write the per-position losses and the table to this JSON file")
    p.add_argument("--title", default="", help="the plot's title")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.length < 2 or args.bucket < 1 or args.table_block < 1:
        p.error("--length must be at least 2, --bucket and --table-block at least 1")
    import llama
    from llama.core.device import set_threads
    from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError
    from llama.training.long_context import bucket_perplexity, plot_position_perplexity, position_nll, windows
    from llama.training.pretrain import encode_documents

    try:
        set_threads(args.threads)
        tokenizer = llama.load_tokenizer(args.model[0][1])
        with open(args.text_file, encoding="utf-8") as f:
            rows = windows(encode_documents(tokenizer, [f.read()], args.documents), args.length, args.max_windows)
        curves, trained = {}, None
        for label, path, scaling in args.model:
            start = time.perf_counter()
            model = llama.load(path, dtype="float32", rope_scaling=scaling)
            if llama.load_tokenizer(path).vocab_size != tokenizer.vocab_size:
                raise ValueError(f"{path}: its tokenizer differs from {args.model[0][1]}'s; all models must read the same tokens")
            trained = trained or model.config.trained_context
            curves[label] = position_nll(model, rows, batch_size=args.batch_size)
            print(f"[{label}: {path}, {describe(model.config)}, scored in {time.perf_counter() - start:.0f} s]",
                  file=sys.stderr)  # fmt: skip
    except (llama.CheckpointError, llama.ConfigError, TokenizerNotFoundError, TokenizerFormatError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = {label: bucket_perplexity(nll, args.table_block) for label, nll in curves.items()}
    blocks = next(iter(table.values()))
    print(f"Perplexity by position: {rows.shape[0]} windows of {args.length} tokens of {args.text_file}\n")
    print("| model | " + " | ".join(f"{a}-{b}" for a, b, _ in blocks) + " | all |")
    print("|---|" + "---|" * (len(blocks) + 1))
    for label, points in table.items():
        overall = float(curves[label].mean().exp())
        print(f"| {label} | " + " | ".join(f"{ppl:.2f}" for _, _, ppl in points) + f" | {overall:.2f} |")
    if args.plot:
        try:
            plot_position_perplexity(curves, args.plot, trained_context=trained, bucket=args.bucket, title=args.title)
        except ImportError:
            print("error: --plot needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
            return 2
        print(f"\n(plot: {args.plot})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"text_file": args.text_file, "windows": rows.shape[0], "length": args.length,
                       "table": table, "nll": {k: v.tolist() for k, v in curves.items()}}, f)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
