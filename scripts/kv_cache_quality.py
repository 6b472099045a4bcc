"""Memory and quality of each KV-cache kind: perplexity, greedy agreement, logit error by position.

    python scripts/kv_cache_quality.py --text-file data/kjv/valid.txt        # the bundled model
    python scripts/kv_cache_quality.py --checkpoint /tmp/rand1b --positions 2048 --new-tokens 0

For each cache kind (--caches) it reports the bytes per token of this model and of Llama 3.1 8B at
its full 128K context, and, compared with the --reference cache (bfloat16 by default):
- perplexity of --text-file, every key and value read back from the cache (the text cut into
  windows of --context tokens, prefilled 64 positions per forward), with --text-file;
- greedy agreement: how many of --new-tokens greedy tokens equal the reference cache's before the
  first difference, for each of --prompts;
- logit error at --positions positions of one random token sequence: per block of 512 positions,
  the largest max|logits - ref| / max|ref| of a position, and how often the top token agrees.
The weights run in --dtype (float32 by default), so only the cache differs between rows.
"""

from __future__ import annotations

import argparse
import math
import sys

# torch and the project are imported in main(), after the arguments are parsed: --help and usage
# errors do not wait for torch.

DOCUMENT_SPLITS = ("line", "paragraph", "file")  # llama.training.pretrain.DOCUMENT_SPLITS
PROMPTS = ["In the beginning", "And Jesus said unto them", "The LORD is my shepherd", "And it came to pass"]


def logit_error(model, positions: int, caches: list[str], reference: str, chunk: int = 256, block: int = 512):
    """{cache: [(first position of the block, worst relative logit error, top-1 agreement)]}: every
    cache kind fed the same random tokens side by side, chunk by chunk."""
    import torch

    tokens = torch.randint(0, model.config.vocab_size, (1, positions), generator=torch.Generator().manual_seed(0))
    kinds = [reference] + [c for c in caches if c != reference]
    stores = {}
    for kind in kinds:
        model.setup_cache(1, positions, kv_cache_dtype=kind)
        stores[kind] = model.cache
    worst = {k: [0.0] * math.ceil(positions / block) for k in kinds}
    agree = {k: [0] * math.ceil(positions / block) for k in kinds}
    with torch.inference_mode():
        for begin in range(0, positions, chunk):
            logits = {}
            for kind in kinds:
                model.cache = stores[kind]
                logits[kind] = model(tokens[:, begin : begin + chunk], begin)[0].double()  # (C, V)
            ref = logits[reference]
            for kind in kinds:
                err = (logits[kind] - ref).abs().amax(-1) / ref.abs().amax(-1)  # (C,)
                same = logits[kind].argmax(-1) == ref.argmax(-1)
                for i in range(err.shape[0]):
                    b = (begin + i) // block
                    worst[kind][b] = max(worst[kind][b], float(err[i]))
                    agree[kind][b] += int(same[i])
    model.clear_cache()
    sizes = [min(block, positions - b * block) for b in range(len(worst[reference]))]
    return {k: [(b * block, worst[k][b], agree[k][b] / sizes[b]) for b in range(len(sizes))] for k in caches}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--caches", help="comma-separated cache kinds to compare: float32, bfloat16, float16, int8, fp8 "
                                     "(default: all this torch has)")
    p.add_argument("--reference", default="bfloat16", help="the cache kind the others are compared with (default bfloat16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype (default float32)")
    p.add_argument("--text-file", help="text for the perplexity column (default: no perplexity)")
    p.add_argument("--documents", choices=DOCUMENT_SPLITS, default="line", help="how --text-file is cut into BOS ... EOS documents (default line)")
    p.add_argument("--context", type=int, help="tokens per perplexity window (default: the model's max_seq_len)")
    p.add_argument("--max-windows", type=int, default=64, help="perplexity windows at most (default 64)")
    p.add_argument("--new-tokens", type=int,
                   help="greedy tokens per prompt for the agreement column; 0: none (default 200, or what the context leaves)")
    p.add_argument("--prompts", nargs="*", default=PROMPTS, help="prompts for the agreement column (default: four KJV openings)")
    p.add_argument("--positions", type=int, default=0, help="positions for the logit-error table; 0: none (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    import llama
    import weights
    from llama.core.cache import KV_CACHE_DTYPES
    from llama.core.device import set_threads
    from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError
    from llama.training.long_context import kv_cache_greedy_agreement, position_nll, windows
    from llama.training.pretrain import encode_documents

    caches = [c.strip() for c in (args.caches or ",".join(KV_CACHE_DTYPES)).split(",") if c.strip()]
    unknown = [c for c in caches + [args.reference] if c not in KV_CACHE_DTYPES]
    if unknown:
        p.error(f"unknown cache kinds {unknown}; this torch has {', '.join(KV_CACHE_DTYPES)}")
    try:
        set_threads(args.threads)
        checkpoint = args.checkpoint or weights.BUNDLED_MODEL
        model = llama.load(checkpoint, dtype=args.dtype)
        tokenizer = llama.load_tokenizer(checkpoint) if args.text_file or args.new_tokens != 0 else None
        if args.positions > model.config.max_seq_len:
            raise ValueError(f"--positions {args.positions} is beyond the model's context of {model.config.max_seq_len}")
        prompts = [tokenizer.encode(t, bos=True, eos=False) for t in args.prompts] if tokenizer else []
        room = model.config.max_seq_len - max(map(len, prompts), default=0)
        if args.new_tokens is None:
            args.new_tokens = max(0, min(200, room))
        elif args.new_tokens > room:
            raise ValueError(f"--new-tokens {args.new_tokens} after the longest prompt is beyond the model's context of "
                             f"{model.config.max_seq_len}")
        rows = None
        if args.text_file:
            with open(args.text_file, encoding="utf-8") as f:
                stream = encode_documents(tokenizer, [f.read()], args.documents)
            rows = windows(stream, args.context or model.config.max_seq_len, args.max_windows)
    except (llama.CheckpointError, llama.ConfigError, TokenizerNotFoundError, TokenizerFormatError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    big = llama.ModelConfig.from_name("llama-3.1-8b")
    print(f"KV cache kinds on {checkpoint} ({args.dtype} weights; compared with the {args.reference} cache)\n")
    head = "| cache | bytes/token | Llama 3.1 8B, 128K tokens |"
    rule = "|---|---|---|"
    if rows is not None:
        head += f" perplexity ({rows.numel():,} tokens) | vs {args.reference} |"
        rule += "---|---|"
    if args.new_tokens:
        head += f" greedy tokens equal to {args.reference}'s (of {args.new_tokens}, per prompt) |"
        rule += "---|"
    print(head + "\n" + rule)
    ref_ppl = None
    for kind in [args.reference] + [c for c in caches if c != args.reference]:
        row = f"| {kind} | {model.config.kv_cache_bytes_per_token(kind):,} | " \
              f"{big.kv_cache_bytes_per_token(kind) * big.max_seq_len / 2**30:.1f} GiB |"  # fmt: skip
        if rows is not None:
            ppl = math.exp(float(position_nll(model, rows, kv_cache_dtype=kind, chunk=64).mean()))
            ref_ppl = ref_ppl or ppl
            row += f" {ppl:.4f} | {100 * (ppl / ref_ppl - 1):+.2f}% |"
        if args.new_tokens:
            agreement = kv_cache_greedy_agreement(model, prompts, args.new_tokens, kind, reference=args.reference)
            row += f" {', '.join(map(str, agreement))} |"
        print(row, flush=True)
    if args.positions:
        print(f"\nLogit error by position ({args.positions:,} random tokens; max|logits - {args.reference}'s| / max|"
              f"{args.reference}'s| of the worst position in each block, and the share of positions whose top "
              "token agrees)\n")  # fmt: skip
        table = logit_error(model, args.positions, caches, args.reference)
        blocks = table[caches[0]]
        print("| cache | " + " | ".join(f"{b}-{min(b + 512, args.positions) - 1}" for b, _, _ in blocks) + " |")
        print("|---|" + "---|" * len(blocks))
        for kind, rows in table.items():
            print(f"| {kind} | " + " | ".join(f"{err:.1e}, top-1 {same:.1%}" for _, err, same in rows) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
