"""How far a GGUF file's logits are from its float checkpoint's: one row per file.

    python scripts/gguf_logit_error.py --checkpoint path/to/hf-checkpoint model-Q4_0.gguf model-Q8_0.gguf ...

Every model runs in float32 (a GGUF file dequantized exactly), on the same input: --text encoded by
the checkpoint's tokenizer, or --tokens random ids; one model is in memory at a time. Reported per
file: the tensor types its matrices hold (count of each), the largest |logit difference|, the RMS of
the difference over the RMS of the checkpoint's logits, and how often the two agree on the most
likely next token.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections import Counter
from pathlib import Path

import torch

import llama
from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError
from weights.gguf import GGUFFile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="GGUF files of the checkpoint")
    p.add_argument("--checkpoint", required=True, help="the float checkpoint (directory, or a GGUF file) they came from")
    p.add_argument("--tokens", type=int, default=64, help="without --text: this many random ids (default 64)")
    p.add_argument("--text", help="the input text (encoded with bos by the checkpoint's tokenizer)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = llama.load(args.checkpoint, dtype="float32")
        if args.text is not None:
            tokens = torch.tensor([llama.load_tokenizer(args.checkpoint).encode(args.text, bos=True, eos=False)])
        else:
            generator = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=generator)
        with torch.no_grad():
            reference = model(tokens)[0]  # (T, V)
        del model
        gc.collect()
        print("| file | matrices | max abs error | relative RMS error | top-1 agreement |")
        print("|---|---|---:|---:|---:|")
        for path in args.files:
            with GGUFFile(path) as f:
                types = Counter(t.type.name for t in f.tensors.values() if len(t.shape) == 2)
            model = llama.load(path, dtype="float32")
            with torch.no_grad():
                logits = model(tokens)[0]
            del model
            gc.collect()
            diff = logits - reference
            rel = diff.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
            agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
            kinds = ", ".join(f"{n} {k}" for k, n in types.most_common())
            print(f"| {Path(path).name} | {kinds} | {diff.abs().max():.4g} | {rel:.3e} | {agree:.3f} |", flush=True)
    except (llama.CheckpointError, llama.ConfigError, TokenizerFormatError, TokenizerNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
