"""What quantizing the activations costs: perplexity and greedy agreement of int8 / int4 weights with
the native kernels' exact (bf16) activations and with int8 activations (the q8a kernels).

    python scripts/activation_quality.py --checkpoint weights/kjv --text-file data/kjv-paragraphs/valid.txt

Every row runs the model in bfloat16 with kernels.optimize, and sends every call of every swapped
linear to its kernel (max_rows unbounded), so the perplexity windows (prefill-sized) measure the same
arithmetic as decoding. Greedy agreement: for each prompt, how many of --new-tokens greedy tokens
(stop tokens off) equal the float32 model's before the first difference, and the fraction of
positions that agree overall. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import kernels
import llama
from kernels import native
from llama.core.device import set_threads
from llama.training.evaluate import perplexity
from llama.training.pretrain import DOCUMENT_SPLITS, encode_documents

PROMPTS = ["In the beginning", "And God said", "The LORD is my shepherd", "And it came to pass", "Blessed are"]
WEIGHTS = {"int8": ("int8", 128), "int4, group 32": ("int4", 32), "int4, group 128": ("int4", 128)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text-file", required=True)
    p.add_argument("--documents", choices=DOCUMENT_SPLITS, default="paragraph")
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        return measure(args)
    except (OSError, ValueError, llama.CheckpointError, llama.ConfigError) as e:  # a bad path or file
        print(f"error: {e}", file=sys.stderr)
        return 2


def measure(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if not native.available():
        raise ValueError(f"the native kernels are not built: {native.build_error()}")
    tokenizer = llama.load_tokenizer(args.checkpoint)
    try:
        text = Path(args.text_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.text_file} is not UTF-8 text: {e}") from None
    tokens = encode_documents(tokenizer, [text], args.documents)
    prompts = [tokenizer.encode(text, bos=True, eos=False) for text in PROMPTS]

    def greedy(model):
        return llama.generate(model, prompts, args.new_tokens, temperature=0, stop_tokens=[])

    reference = llama.load(args.checkpoint, dtype="float32")
    expected = greedy(reference)
    print(f"float32 model: perplexity {perplexity(reference, tokens, args.context_len, args.stride).ppl:.3f}")
    print(f"VNNI: {native.has_vnni()}; {len(tokens):,} tokens, {args.documents} documents, context "
          f"{args.context_len}, stride {args.stride}; agreement over {len(prompts)} x {args.new_tokens} greedy tokens\n")
    print("| weights | activations | perplexity | greedy agreement | first difference (per prompt) |")
    print("|---|---|---|---|---|")
    for name, (mode, group_size) in WEIGHTS.items():
        base = llama.load(args.checkpoint, dtype="bfloat16", quantize=mode, group_size=group_size)
        for int8_activations in (False, True):
            model = copy.deepcopy(base)
            kernels.optimize(model, native=False)
            native.swap_native_linears(model, max_rows=1 << 30, int8_activations=int8_activations)
            ppl = perplexity(model, tokens, args.context_len, args.stride).ppl
            got = greedy(model)
            same = sum(a == b for row, ref in zip(got, expected) for a, b in zip(row, ref))
            first = [next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b), None) for row, ref in zip(got, expected)]
            print(f"| {name} | {'int8 (q8a)' if int8_activations else 'bf16'} | {ppl:.3f} | "
                  f"{same / sum(len(r) for r in expected):.2f} | {', '.join('-' if f is None else str(f) for f in first)} |",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
