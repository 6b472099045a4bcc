"""Exact match of a model's greedy answers to held-out Alpaca or chat records.

    python scripts/exact_match.py --data data/kjv-instruct/test.jsonl                      # the bundled model
    python scripts/exact_match.py --data data/kjv-instruct/test.jsonl --adapter weights/kjv-lora

Each record's prompt (the Alpaca template, or the dialog without its last message in the model's
chat format) is answered greedily; the answer counts when it equals the record's output (or last
assistant message) after stripping surrounding whitespace. Prints the score, per instruction when
there are several, and a few answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

# torch and the project are imported in main(), after the arguments are parsed: --help and a usage
# error should not wait seconds for torch.


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory (default: the bundled weights/kjv)")
    p.add_argument("--adapter", help="a LoRA adapter directory (peft layout) applied to the checkpoint")
    p.add_argument("--data", required=True, help="records with answers: a .json list or .jsonl file")
    p.add_argument("--max-new-tokens", type=int, default=16, help="most tokens per answer (default 16)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts answered together (default 16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype (default float32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu (default auto)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--show", type=int, default=5, help="answers to print (default 5)")
    p.add_argument("--json", help="also write the score and every answer to this JSON file")
    args = p.parse_args(argv)

    import llama
    import weights
    from llama.core.device import DeviceError, pick_device, set_threads
    from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError
    from llama.training.data import read_records
    from llama.training.evaluate import exact_match

    try:
        set_threads(args.threads)
        records = [record for _, record in read_records(args.data)]
        checkpoint = args.checkpoint or weights.BUNDLED_MODEL
        model = llama.load(checkpoint, dtype=args.dtype, device=pick_device(args.device), adapter=args.adapter)
        tokenizer = llama.load_tokenizer(checkpoint)
        result = exact_match(model, tokenizer, records, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    except (llama.CheckpointError, llama.ConfigError, TokenizerNotFoundError, TokenizerFormatError, DeviceError, OSError,
            ValueError) as e:  # fmt: skip
        print(f"error: {e}", file=sys.stderr)
        return 2
    by_instruction: dict[str, list[bool]] = defaultdict(list)
    for record, (answer, expected) in zip(records, result.answers):
        key = record.get("instruction", "chat")
        by_instruction[key if len(key) < 40 else key.split('"')[0] + '..."'].append(answer == expected)
    label = (args.checkpoint or "the bundled weights/kjv") + (f" + {args.adapter}" if args.adapter else "")
    print(f"exact match {result.score:.3f} ({round(result.score * result.n)}/{result.n}) on {args.data}: {label}")
    if len(by_instruction) > 1:
        for key, hits in by_instruction.items():
            print(f"  {sum(hits) / len(hits):.3f} ({sum(hits)}/{len(hits)})  {key}")
    for record, (answer, expected) in list(zip(records, result.answers))[: args.show]:
        prompt = record.get("input") or record.get("instruction") or record["messages"][-2]["content"]
        print(f"  {'ok  ' if answer == expected else 'MISS'} {prompt[:60]!r}: got {answer!r}, expected {expected!r}")
    if args.json:
        report = {"score": result.score, "n": result.n, "checkpoint": args.checkpoint or "weights/kjv", "adapter": args.adapter,
                  "data": args.data, "by_instruction": {k: sum(v) / len(v) for k, v in by_instruction.items()},
                  "answers": [{"answer": a, "expected": e} for a, e in result.answers]}  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
