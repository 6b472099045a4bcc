"""Measure speculative decoding against plain greedy decoding; prints a markdown table.

    python scripts/speculative_bench.py --draft /tmp/kjv-draft                  # target: weights/kjv
    python scripts/speculative_bench.py --draft weights/kjv --draft-tokens 4    # draft = target: acceptance 1

For each dtype, both models are loaded in it, and every prompt is decoded greedily by the target
alone (llama.generate) and by speculative decoding with each --draft-tokens k. The methods take turns
on each prompt, --repeats rounds, and each method's fastest run per prompt counts: on a shared machine
the minimum is the least disturbed run, and taking turns exposes every method to the same load.
Stop tokens are off by default so that every run makes --max-new-tokens tokens. "same" counts the
prompts whose speculative output equals the plain greedy output token for token.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import llama
from llama.core.device import pick_device, set_threads
from llama.core.speculative import SpeculativeStats, speculative_generate
from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError, check_vocabulary

PROMPTS = [
    "In the beginning",
    "And the LORD said unto Moses",
    "Blessed are the",
    "And it came to pass, when",
    "The LORD is my shepherd",
    "Then Jesus answered and said unto them",
]
COUNTERS = ("proposed", "accepted", "target_forwards", "draft_forwards", "new_tokens")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="weights/kjv", help="target checkpoint directory (default weights/kjv)")
    p.add_argument("--draft", required=True, help="draft checkpoint directory; must share the target's tokenizer")
    p.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4, 6],
                   help="draft tokens per round to try (default 2 4 6)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens per prompt (default 100)")
    p.add_argument("--prompts", nargs="+", default=PROMPTS, help="prompts (default: six KJV-style openings)")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32", "bfloat16"],
                   help="weight dtypes to measure (default float32 bfloat16)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the fastest counts (default 3)")
    p.add_argument("--stop", action="store_true", help="stop at the target's stop tokens (default: off, fixed length)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu", help="device (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    args = p.parse_args(argv)
    try:
        set_threads(args.threads)
        device = pick_device(args.device)
        tokenizer = llama.load_tokenizer(args.target)
        prompts = [tokenizer.encode(text, bos=True, eos=False) for text in args.prompts]
        stop = None if args.stop else []
        n = args.max_new_tokens
        print(f"target {args.target}, draft {args.draft}; {len(prompts)} prompts x {n} new tokens, greedy, "
              f"{device}, {torch.get_num_threads()} thread(s), best of {args.repeats}\n")  # fmt: skip
        print("| dtype | method | tok/s | speed-up | acceptance | tokens / target forward | target forwards "
              "| draft forwards | same |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
        for dtype in args.dtypes:
            target = llama.load(args.target, dtype=dtype, device=device)
            draft = llama.load(args.draft, dtype=dtype, device=device)
            for model in (target, draft):  # TokenizerMismatchError (a ValueError) if the tokenizer is not theirs
                check_vocabulary(tokenizer, model.config.vocab_size)
            methods = {"greedy": None, **{f"speculative k={k}": k for k in args.draft_tokens}}
            # Warm-up (first-call allocations), not timed.
            llama.generate(target, [prompts[0]], 8, temperature=0, stop_tokens=stop)
            speculative_generate(target, draft, prompts[0], 8, temperature=0, stop_tokens=stop)

            seconds = {m: 0.0 for m in methods}
            stats = {m: SpeculativeStats() for m in methods}
            same = {m: 0 for m in methods}
            for ids in prompts:
                best, outputs, counts = {m: float("inf") for m in methods}, {}, {}
                for _ in range(args.repeats):
                    for name, k in methods.items():
                        run_stats = SpeculativeStats()
                        if k is None:
                            out, t = timed(lambda: llama.generate(target, [ids], n, temperature=0, stop_tokens=stop)[0])
                            run_stats.new_tokens = len(out)
                            run_stats.target_forwards = len(out) + (len(out) < n)  # a stop token took one too
                        else:
                            out, t = timed(lambda: speculative_generate(target, draft, ids, n, draft_tokens=k,
                                                                        temperature=0, stop_tokens=stop,
                                                                        stats=run_stats))  # fmt: skip
                        best[name] = min(best[name], t)
                        outputs[name], counts[name] = out, run_stats
                for name in methods:
                    seconds[name] += best[name]
                    same[name] += outputs[name] == outputs["greedy"]
                    for field in COUNTERS:
                        setattr(stats[name], field, getattr(stats[name], field) + getattr(counts[name], field))

            plain_rate = stats["greedy"].new_tokens / seconds["greedy"]
            for name, k in methods.items():
                s = stats[name]
                rate = s.new_tokens / seconds[name]
                acceptance = "" if k is None else f"{s.acceptance_rate:.3f}"
                print(f"| {dtype} | {name} | {rate:.1f} | {rate / plain_rate:.2f} | {acceptance} | "
                      f"{s.tokens_per_target_forward:.2f} | {s.target_forwards} | {s.draft_forwards or ''} | "
                      f"{'' if k is None else f'{same[name]}/{len(prompts)}'} |")  # fmt: skip
        return 0
    except (ValueError, OSError, TokenizerNotFoundError, TokenizerFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
