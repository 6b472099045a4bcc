"""Command-line pieces shared by scripts/train.py and scripts/finetune.py: the TrainConfig their
loop flags make (the flags themselves: scripts/loop_flags.py, which --help reads without importing
torch), and the files a run leaves in --out (train_summary.json, loss.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .loop import STATE_FILE, TrainConfig, TrainResult, plot_losses


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the loop's flags (scripts/loop_flags.py) and --context."""
    return TrainConfig(
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, context=args.context,
        lr=args.lr, min_lr=args.lr / 10 if args.min_lr is None else args.min_lr,
        warmup_steps=min(100, args.max_steps // 10) if args.warmup_steps is None else args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every, seed=args.seed, precision=args.precision,
        loss_chunk=args.loss_chunk,
    )  # fmt: skip


def check_out_dir(out: Path, resume: bool) -> None:
    """A new run needs an --out without a state; --resume needs one."""
    if not resume and (out / STATE_FILE).exists():
        raise FileExistsError(f"{out / STATE_FILE} exists: pass --resume to continue that run, or choose another --out")
    if resume and not (out / STATE_FILE).is_file():
        raise FileNotFoundError(f"nothing to resume: {out / STATE_FILE} does not exist")


def interrupted(out: Path, save_every: int) -> int:
    print(f"\ninterrupted; the state saved last (every {save_every} steps) is in {out / STATE_FILE}: "
          "continue with --resume", file=sys.stderr)  # fmt: skip
    return 130


def summary(result: TrainResult, config: TrainConfig, device: torch.device, **extra: Any) -> dict[str, Any]:
    """train_summary.json's common part: what the run did and how; `extra` adds the script's own."""
    return {
        "completed": result.completed,
        "steps": result.step,
        "max_steps": config.max_steps,
        "tokens_seen": result.tokens_seen,  # targets trained on
        "wall_time_s": round(result.wall_time, 1),
        "tokens_per_s": round(result.tokens_per_second, 1),
        "seconds_per_step": round(result.seconds_per_step, 3),
        "final_train_loss": result.final_train_loss,  # mean of the last 10 steps
        "final_valid_loss": result.final_valid_loss,
        "valid_losses": {str(step): round(loss, 4) for step, loss in result.valid_losses},
        **extra,
        "training": dataclasses.asdict(config),
        "precision": result.precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
    }


def finish(out: Path, result: TrainResult, config: TrainConfig, summary: dict, *, title: str, wrote: str) -> None:
    """Write train_summary.json and loss.png into `out` and report the run on stderr."""
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if plot_losses(result, out / "loss.png", title=title):
        plotted = f", {out / 'loss.png'}"
    else:
        plotted = " (no loss.png: pip install matplotlib, or the project's [plot] extra)"
    losses = [f"{name} loss {loss:.4f}" for name, loss in (("train", result.final_train_loss), ("valid", result.final_valid_loss))
              if loss is not None]  # fmt: skip
    status = "done" if result.completed else f"paused at step {result.step} of {config.max_steps} (continue with --resume)"
    print(f"{status}: {', '.join(losses) or 'no steps run'}; trained on {result.tokens_seen:,} target tokens in "
          f"{result.wall_time:.0f} s ({result.tokens_per_second:,.0f} tok/s)", file=sys.stderr)  # fmt: skip
    print(f"wrote {wrote}, {out / 'train_summary.json'}{plotted}", file=sys.stderr)
