"""Plot where one layer's attention heads look, for a prompt: query tokens down, key tokens across.

    python scripts/attention_map.py --layer 1 --head 2                 # the bundled model, attention.png
    python scripts/attention_map.py --prompt "And God said" --layer 0 --out layer0.png   # every head of layer 0
    python scripts/attention_map.py --layer 3 --head 0 --print --no-plot   # the numbers, no matplotlib needed
    python scripts/attention_map.py --checkpoint path/to/Llama-3.2-1B --prompt "..." --layer 7 --head 5

The probabilities are the ones the plain model computes (llama.core.recording.Recorder records them
inside Attention.attend): row i is query token i's distribution over tokens 0..i. Plotting needs
matplotlib (pip install -e ".[plot]").
"""

from __future__ import annotations

import argparse
import sys

import torch

import llama
import weights
from llama.core.device import model_device, pick_device
from llama.core.recording import Recorder, plot_attention
from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError


def label(tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace").replace("\n", "\\n")


def table(probs: torch.Tensor, labels: list[str]) -> str:
    """probs (T, T) as text: one row per query token, a column per key token."""
    width = max(6, *(len(t) for t in labels))
    lines = [" " * width + "".join(f"{t:>{width + 1}}" for t in labels)]
    for i, row in enumerate(probs.tolist()):
        lines.append(f"{labels[i]:>{width}}" + "".join(f"{p:>{width + 1}.2f}" if j <= i else " " * (width + 1)
                                                      for j, p in enumerate(row)))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(weights.BUNDLED_MODEL), help="checkpoint directory with its tokenizer (default: the bundled model)")
    p.add_argument("--prompt", default="In the beginning God created the heaven and the earth.", help="the text to look at")
    p.add_argument("--no-bos", action="store_true", help="do not start the prompt with the BOS token")
    p.add_argument("--layer", type=int, default=0, help="layer index, 0-based (default 0)")
    p.add_argument("--head", type=int, help="query head index, 0-based (default: every head of the layer)")
    p.add_argument("--out", default="attention.png", help="PNG file to write (default attention.png)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--print", action="store_true", help="print the probabilities as a table")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weight dtype (default float32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu", help="device (default cpu)")
    args = p.parse_args(argv)
    try:
        tokenizer = llama.load_tokenizer(args.checkpoint)
        model = llama.load(args.checkpoint, dtype=args.dtype, device=pick_device(args.device))
        n_layers, n_heads = model.config.n_layers, model.config.n_heads
        if not 0 <= args.layer < n_layers:
            raise ValueError(f"--layer {args.layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        if args.head is not None and not 0 <= args.head < n_heads:
            raise ValueError(f"--head {args.head} is out of range: the model has {n_heads} query heads (0..{n_heads - 1})")
        ids = tokenizer.encode(args.prompt, bos=not args.no_bos, eos=False)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > model.config.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {model.config.max_seq_len}")
        rec = Recorder(layers=[args.layer], hidden=False)
        with torch.no_grad():
            model(torch.tensor([ids], device=model_device(model)), record=rec)
        probs = rec.attention(args.layer)[0].float().cpu()  # (H, T, T)
        heads = range(n_heads) if args.head is None else [args.head]
        labels = [label(tokenizer, i) for i in ids]
        if args.print:
            for h in heads:
                print(f"layer {args.layer}, head {h} (rows: queries, columns: keys)\n{table(probs[h], labels)}\n")
        if not args.no_plot:
            title = f"layer {args.layer}" + ("" if args.head is None else f", head {args.head}")
            try:
                plot_attention(probs[list(heads)], labels, args.out, title)
            except ImportError:
                raise ValueError('plotting needs matplotlib: pip install -e ".[plot]" (or use --print --no-plot)') from None
            print(f"wrote {args.out}: {title}, {len(ids)} tokens")
    except (llama.CheckpointError, llama.ConfigError, TokenizerNotFoundError, TokenizerFormatError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
