"""Train a sentencepiece BPE tokenizer the way Llama 2's was made.

    python scripts/train_tokenizer.py data/kjv/train.txt --vocab-size 8000 --output data/kjv/tokenizer.model

BPE with byte fallback (every UTF-8 byte has a piece, so nothing is unknown), digits split one by
one, no Unicode normalisation, whitespace kept as it is, a dummy space in front of each text; unk 0,
bos 1, eos 2, no pad id (see llama.training.pretrain.LLAMA2_SENTENCEPIECE_OPTIONS). sentencepiece reads one
sentence per line. The output loads with llama.load_tokenizer; the same inputs and seed give the
same tokenizer.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text files, or directories whose *.txt files are read")
    p.add_argument("--output", required=True, help="the tokenizer file to write, ending in .model (a .vocab listing goes beside it)")
    p.add_argument("--vocab-size", type=int, default=8000, help="number of pieces, specials and 256 byte pieces included (default 8000)")
    p.add_argument("--character-coverage", type=float, default=0.99995,
                   help="share of characters covered by pieces of their own; the rarest rest are spelled in bytes (default 0.99995, as Llama 2)")
    p.add_argument("--max-sentences", type=int, default=0, help="train on a random sample of this many lines (default 0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the sample (default 0)")
    p.add_argument("--threads", type=int, default=1, help="sentencepiece trainer threads (default 1)")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    args = p.parse_args(argv)  # before importing the project (and torch: seconds): --help is instant
    from llama.core.tokenizer import load_tokenizer
    from llama.training.pretrain import train_tokenizer

    try:
        path = train_tokenizer(args.inputs, args.output, args.vocab_size, character_coverage=args.character_coverage,
                               max_sentences=args.max_sentences, seed=args.seed, threads=args.threads,
                               verbose=args.verbose)  # fmt: skip
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # sentencepiece's own complaints, e.g. a vocabulary too large for the text
        print(f"error: sentencepiece: {str(e).strip()}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(path)
    print(f"wrote {path} ({tokenizer.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
