"""The training loop's flags (llama.training.loop.train: optimisation, validation, resume), shared by
train.py and finetune.py. argparse only: --help shows them without importing torch; the TrainConfig
they make is llama.training.cli.train_config.

The scripts import this file as a sibling: `from .loop_flags import ...` where they are installed as
the package llama_cli, `from loop_flags import ...` where they run as `python scripts/NAME.py` (the
script's folder is then the first entry of sys.path).
"""

from __future__ import annotations

import argparse


def add_loop_arguments(p: argparse.ArgumentParser, *, lr: float | None, batch_size: int, max_steps: int,
                       weight_decay: float, lr_help: str | None = None, loss_chunk: int = 0) -> None:
    """The optimisation and run flags of loop.train, with the script's defaults (lr None: the script
    picks one; lr_help says how)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=max_steps, help=f"optimiser steps (default {max_steps})")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"rows per micro-batch (default {batch_size})")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (default 1)")
    g.add_argument("--lr", type=float, default=lr, help=lr_help or f"peak learning rate (default {lr:g})")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay (default --lr / 10)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: --max-steps / 10, at most 100)")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help=f"AdamW weight decay on matrices (default {weight_decay:g})")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this; 0: off (default 1.0)")
    g.add_argument("--precision", choices=["auto", "float32", "bf16"], default="auto",
                   help="bf16 autocast or plain float32; auto: bf16 where the hardware runs it natively (default auto)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order (default 0)")
    g.add_argument("--loss-chunk", type=int, default=loss_chunk,
                   help="compute the output layer and the loss this many positions at a time, recomputing them in the "
                        f"backward pass, so the logits never exist whole (saves memory for large vocabularies); 0: off (default {loss_chunk})")

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="output directory (results, summary, loss curve, resumable state)")
    g.add_argument("--resume", action="store_true", help="continue the run whose state is in --out")
    g.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (default 100)")
    g.add_argument("--eval-batches", type=int, default=10, help="batches per validation (default 10)")
    g.add_argument("--save-every", type=int, default=100, help="save the resumable state every N steps (default 100)")
    g.add_argument("--stop-at", type=int, help="pause after this step (state and results saved; finish later with --resume)")
    g.add_argument("--time-limit", type=float, help="pause after the step that passes this many seconds")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu (default auto)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
