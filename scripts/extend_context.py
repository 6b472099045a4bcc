"""Context extension end to end: fine-tune a checkpoint to a longer context, plot perplexity by position.

    python scripts/prepare_kjv.py --out data/kjv-runs --layout runs
    python scripts/extend_context.py --data data/kjv-runs/train.txt --valid data/kjv-runs/valid.txt \\
        --documents paragraph --factor 4 --out runs/extend-kjv

For a checkpoint trained on C tokens (default: the bundled model, C = 256) and --factor F:
1. fine-tunes it at F x C tokens, for each --finetune kind (default: linear = position
   interpolation; "linear,yarn" does both): scripts/train.py --init-from CHECKPOINT --rope-scaling
   KIND:F, into --out/KIND (a finished run there is reused, a paused one resumed);
2. scores --valid cut into windows of F x C tokens (scripts/position_perplexity.py) with the
   checkpoint as it is (no scaling: plain RoPE past its trained context), with position
   interpolation and YaRN applied without training, and each fine-tuned model; prints perplexity
   by block of positions and writes --out/context.png (perplexity by position, one curve each) and
   --out/context.json.
Every step is an ordinary command, printed before it runs (rerun one by hand to change it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

# The steps are the sibling scripts, run as subprocesses: this file imports neither torch nor the
# project (--help is instant), and each step is a command a reader can copy.
HERE = Path(__file__).resolve().parent
LABELS = {"linear": "PI", "yarn": "YaRN"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="the checkpoint to extend, HF layout with its tokenizer (default: the bundled model weights/kjv)")
    p.add_argument("--data", required=True, help="fine-tuning text: a file, or a directory of *.txt files")
    p.add_argument("--valid", required=True, help="the text perplexity by position is measured on")
    p.add_argument("--documents", choices=["line", "paragraph", "file"], default="line",
                   help="what one BOS ... EOS document of the texts is (default line, as scripts/train.py)")
    p.add_argument("--factor", type=float, default=4.0, help="how many times the trained context to reach (default 4)")
    p.add_argument("--finetune", default="linear",
                   help="comma-separated scalings to fine-tune with: linear (position interpolation), yarn; "
                        "'' for none (default linear)")
    p.add_argument("--out", required=True, help="output folder: one fine-tuned checkpoint per kind, context.png, context.json")
    p.add_argument("--max-steps", type=int, default=80, help="fine-tuning steps per kind (default 80)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of the fine-tuning (default 2e-4)")
    p.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up steps (default 5)")
    p.add_argument("--time-limit", type=float,
                   help="pause each fine-tuning after this many seconds (rerun the command to continue; default none)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows of --valid (default all)")
    p.add_argument("--threads", type=int, help="CPU threads for torch in every step (default: torch's choice)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="where the fine-tuning runs (default auto); scoring runs on the CPU")
    return p


def run(argv: list[str]) -> None:
    """Run one step, printing it first; SystemExit with its status when it fails."""
    print("$ " + shlex.join(["python", *argv[1:]]), file=sys.stderr, flush=True)
    status = subprocess.run(argv, env=os.environ.copy()).returncode
    if status != 0:
        raise SystemExit(status)


def finished(out: Path) -> bool:
    try:
        return json.loads((out / "train_summary.json").read_text(encoding="utf-8"))["completed"] is True
    except (OSError, ValueError, KeyError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.finetune.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in LABELS]
    if unknown:
        p.error(f"--finetune: unknown scalings {unknown}; expected linear, yarn")
    if args.factor <= 1:
        p.error(f"--factor must be above 1, got {args.factor}")
    for path in (args.data, args.valid):
        if not Path(path).exists():
            print(f"error: {path}: no such file or directory", file=sys.stderr)
            return 2
    import llama  # after the checks: reading a config needs the project (and torch)
    import weights
    from llama.core.checkpoint import config_from_checkpoint

    checkpoint = Path(args.checkpoint) if args.checkpoint else weights.BUNDLED_MODEL
    try:
        config = config_from_checkpoint(weights.open_checkpoint(checkpoint))
    except (llama.CheckpointError, llama.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trained = config.trained_context
    length = int(args.factor * trained)
    factor = f"{args.factor:g}"
    out = Path(args.out)
    threads = ["--threads", str(args.threads)] if args.threads else []
    print(f"[{checkpoint}: trained on {trained} positions; extending to {length} (x{factor})]", file=sys.stderr)

    for kind in kinds:
        target = out / kind
        if finished(target):
            print(f"[{target}: fine-tuned already, reused]", file=sys.stderr)
            continue
        resume = ["--resume"] if (target / "train_state.pt").exists() else []
        run([sys.executable, str(HERE / "train.py"), "--data", args.data, "--valid", args.valid, "--documents",
             args.documents, "--init-from", str(checkpoint), "--rope-scaling", f"{kind}:{factor}", "--context",
             str(length), "--out", str(target), "--max-steps", str(args.max_steps), "--batch-size",
             str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", str(min(args.warmup_steps, args.max_steps)), "--eval-every",
             str(max(1, args.max_steps // 2)), "--eval-batches", "2", "--save-every", str(max(1, args.max_steps // 4)),
             "--device", args.device, "--no-progress", *threads, *resume,
             *(["--time-limit", str(args.time_limit)] if args.time_limit else [])])  # fmt: skip
        if not finished(target):
            print(f"[{target}: paused by --time-limit; run the same command again to continue]", file=sys.stderr)
            return 0

    models = [f"no scaling={checkpoint}", f"PI x{factor}={checkpoint}@linear:{factor}",
              f"YaRN x{factor}={checkpoint}@yarn:{factor}"]  # fmt: skip
    models += [f"{LABELS[kind]} x{factor}, fine-tuned={out / kind}" for kind in kinds]
    run([sys.executable, str(HERE / "position_perplexity.py"), "--text-file", args.valid, "--documents",
         args.documents, "--length", str(length), *(a for m in models for a in ("--model", m)), "--plot",
         str(out / "context.png"), "--json", str(out / "context.json"), *threads,
         "--title", f"{checkpoint.name}: trained on {trained} tokens, read at {length}",
         *(["--max-windows", str(args.max_windows)] if args.max_windows else [])])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
