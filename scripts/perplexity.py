"""Perplexity of a text file under a checkpoint, with a sliding window.

    python scripts/perplexity.py --checkpoint runs/kjv --text-file data/kjv/valid.txt --context-len 256 --stride 128
    python scripts/perplexity.py --checkpoint path/to/Llama-2-7b --text-file wiki.test.raw \\
        --documents file --window-bos --context-len 4096 --stride 512
    torchrun --nproc-per-node 8 scripts/perplexity.py --checkpoint path/to/Llama-3.1-70B --tp 8 --text-file wiki.test.raw

Tokens: the text is cut into documents (--documents: each line by default, as scripts/train.py cuts
its data) and each is encoded as BOS + text + EOS, all in one stream; so on a model trained by
scripts/train.py the perplexity at --context-len = its context is close to exp(its validation
loss). Windows of --context-len tokens advance by --stride; each scores only the tokens the
previous window did not score (see llama/training/evaluate.py). --window-bos also puts BOS in front of
every window (the usual setting for a real Llama on a long document: --documents file).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

import llama
from llama.core.device import idle_threads, pick_device, set_threads
from llama.training.evaluate import perplexity
from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError, check_vocabulary
from llama.training.pretrain import DOCUMENT_SPLITS, encode_documents


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 speaks: the result, the errors
        sys.stdout = sys.stderr = open(os.devnull, "w")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (Meta or HF layout) with its tokenizer, or a GGUF file")
    p.add_argument("--text-file", required=True, help="the text to score (UTF-8)")
    p.add_argument("--context-len", type=int, help="tokens per window, BOS included (default: the model's max_seq_len)")
    p.add_argument("--stride", type=int, help="how far each window advances (default: half the window)")
    p.add_argument("--documents", choices=DOCUMENT_SPLITS, default="line",
                   help="what one BOS ... EOS document is: each line (as scripts/train.py), each blank-line-separated paragraph, or the whole file (default line)")
    p.add_argument("--window-bos", action="store_true", help="also start every window with BOS")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weight dtype (default float32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu (default auto)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none", help="weight-only quantization while loading (default none)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 or 256 (default 128)")
    p.add_argument("--quantize-output", action=argparse.BooleanOptionalAction, default=True,
                   help="with --quantize, quantize the output projection too (a tied one as a copy); "
                        "--no-quantize-output keeps it in float: better quality, more bytes read per token (default on)")
    p.add_argument("--rope-scaling", metavar="SPEC",
                   help="score the checkpoint with this RoPE scaling and the context it gives, without editing its "
                        "config: KIND:FACTOR (linear:4, yarn:4, dynamic:2, llama3:8), a JSON object of RopeScaling "
                        "fields, or none (default: the checkpoint's)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (peft layout, e.g. from scripts/finetune.py) applied to the checkpoint")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core, less the cores other "
                                               "processes kept busy over the last minute, at least 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor parallelism over this many processes started by torchrun (--nproc-per-node N): "
                        "each holds 1/N of every matrix, only rank 0 prints (default: torchrun's number of "
                        "processes, 1 without torchrun)")
    args = p.parse_args(argv)
    try:
        set_threads(args.threads or idle_threads())
        tp = llama.distributed.start(args.tp)
        single = [flag for flag, given in (("--quantize", args.quantize != "none"), ("--adapter", args.adapter),
                                           ("--rope-scaling", args.rope_scaling is not None)) if given]  # fmt: skip
        if tp > 1 and single:
            raise llama.distributed.TensorParallelError(f"{single[0]} runs in one process only, not with --tp / under "
                                                        "torchrun")  # fmt: skip
        device = llama.distributed.device() if tp > 1 else pick_device(args.device)
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.text_file} is not UTF-8 text: {e}") from None
        with llama.distributed.together():  # a rank that fails to load stops them all
            tokenizer = llama.load_tokenizer(args.checkpoint)
            if tp > 1:
                model = llama.distributed.load(args.checkpoint, dtype=args.dtype, device=device)
            else:
                model = llama.load(args.checkpoint, dtype=args.dtype, device=device,
                                   quantize=None if args.quantize == "none" else args.quantize,
                                   group_size=args.group_size, quantize_output=args.quantize_output,
                                   adapter=args.adapter, rope_scaling=args.rope_scaling)  # fmt: skip
        check_vocabulary(tokenizer, model.config.vocab_size)  # TokenizerMismatchError, a ValueError
        context_len = args.context_len or model.config.max_seq_len
        stride = args.stride or max(1, context_len // 2)
        tokens = encode_documents(tokenizer, [text], args.documents)
        if args.max_tokens is not None:
            if args.max_tokens < 2:
                raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
            tokens = tokens[: args.max_tokens]
        if len(tokens) == 0:
            raise ValueError(f"{args.text_file}: no text to score")
        start = time.perf_counter()
        result = perplexity(model, tokens, context_len, stride, bos_id=tokenizer.bos_id if args.window_bos else None,
                            progress=not args.no_progress)  # fmt: skip
    except (llama.CheckpointError, llama.ConfigError, TokenizerNotFoundError, TokenizerFormatError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    doc = {"line": "each line", "paragraph": "each paragraph", "file": "the whole file"}[args.documents]
    print(f"perplexity {result.ppl:.4f} (mean NLL {result.nll_mean:.4f} nats/token = {result.nll_mean / math.log(2):.4f} "
          f"bits/token) over {result.n_tokens:,} tokens of {args.text_file}")  # fmt: skip
    print(f"  context {result.context_len} tokens per window, stride {result.stride}, {result.n_windows} windows; "
          f"tokens: {doc} encoded as BOS + text + EOS; "
          f"{'every window starts with an extra BOS' if result.bos else 'no BOS added to windows'}; "
          f"{args.dtype} on {device.type}{f', tensor-parallel over {tp} processes' if tp > 1 else ''}, {seconds:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    status = main()
    if "llama.distributed" in sys.modules:  # under torchrun: end without torch's C++ teardown (see there)
        sys.modules["llama.distributed"].exit(status)
    sys.exit(status)
