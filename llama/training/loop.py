"""The training loop shared by pretraining (pretrain.py) and fine-tuning (finetune.py).

    data = TokenWindows(train_tokens, valid_tokens, config)        # or finetune's InstructionBatches
    result = train(model, data, TrainConfig(max_steps=1000), out_dir="run")

Shape glossary: B batch size, T tokens per row, V vocabulary size.

What the loop does, whatever the data and whichever parameters are trainable: AdamW on the
parameters that require gradients (weight decay on matrices only), linear warm-up then cosine decay,
gradient accumulation over micro-batches, global-norm clipping, bf16 autocast where the hardware
has it, a progress bar, periodic validation, and a resumable state.

The data. The loop asks a `Batches` object for the micro-batch (x, y) of (step, micro): inputs and
targets, both (B, T) int64, targets equal to IGNORE where no loss is taken (the prompt of an
instruction, padding). The loss is the mean over the targets that are not IGNORE, taken over all the
micro-batches of a step together, so a step with accumulation equals one step over their union
whatever the number of trained tokens in each.

Resuming. A Batches object returns the same micro-batch for the same (step, micro), so the data
position *is* the step counter. The saved state holds the trainable parameters, AdamW's moments,
the step, the random generators (LoRA's dropout draws from them) and a description of the run; a
run stopped at step k and resumed computes exactly what an uninterrupted run computes (on the same
hardware and threads). A run whose settings, data or description differ refuses to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.device import bf16_supported
from .qlora import reads_rows, weight_rows

STATE_FILE = "train_state.pt"  # inside out_dir: everything needed to resume
SLICE_WEIGHTS = 1 << 23  # most weights of a frozen output projection read at a time by the loss (Llama 3.2 1B: 4096 rows)
IGNORE = -100  # the target of a position that takes no loss (F.cross_entropy's default ignore_index)


class Batches(Protocol):
    """What the loop reads its data from."""

    max_token_id: int  # the largest token id in the data (checked against the vocabulary)

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `micro` of optimiser step `step`: (x, y), (B, T) int64 each; always the same
        tensors for the same arguments."""

    def valid_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]] | None:
        """The validation batches, the same at every evaluation; None without validation data."""

    def fingerprint(self) -> dict[str, str | None]:
        """Short hashes of the data ({"train": ..., "valid": ...}): resuming on other data is an error."""


# ---- optimiser, schedule, precision ------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires a gradient; a tied one appears once."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on the matrices (embedding,
    projections, output, LoRA's A and B) and none on the vectors (norm gains)."""
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of step `step` (0-based): linear warm-up to `lr` over warmup_steps, then a cosine
    decay to `min_lr` at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --precision auto|float32|bf16 (None: no autocast)."""
    if precision not in ("auto", "float32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; expected auto, float32 or bf16")
    if precision == "bf16" or precision == "auto" and bf16_supported(device):
        return torch.bfloat16
    return None


# ---- the loop --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    context: int = 256  # T: tokens per row
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int = 100
    seed: int = 0
    precision: str = "auto"  # auto | float32 | bf16
    loss_chunk: int = 0  # 0: the loss over whole logits; N: N positions at a time (see token_loss)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "context", "eval_every", "eval_batches", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be an integer >= 0, got {self.loss_chunk!r}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr {self.min_lr} and lr {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay} and {self.grad_clip}")
        if self.precision not in ("auto", "float32", "bf16"):
            raise ValueError(f"precision must be auto, float32 or bf16, got {self.precision!r}")


# Fields that do not change the weights a run computes: they may differ when resuming.
_BOOKKEEPING = ("eval_every", "eval_batches", "save_every")


@dataclass
class TrainResult:
    step: int  # optimiser steps done
    tokens_seen: int  # targets trained on (positions with a loss), over all sessions
    wall_time: float  # seconds, over all sessions of a resumed run
    completed: bool  # reached max_steps (not paused by stop_at / time_limit)
    precision: str  # what autocast actually used: "bf16" or "float32"
    tokens_per_second: float  # trained targets per second of this session's steps
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for every step
    valid_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) at each evaluation
    seconds_per_step: float = 0.0  # this session's mean

    @property
    def final_train_loss(self) -> float | None:
        """Mean of the last 10 steps' losses (one step's loss is one noisy batch)."""
        last = [loss for _, loss in self.train_losses[-10:]]
        return sum(last) / len(last) if last else None

    @property
    def final_valid_loss(self) -> float | None:
        return self.valid_losses[-1][1] if self.valid_losses else None


def token_loss(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 0, base: nn.Module | None = None) -> torch.Tensor:
    """The cross-entropy of the targets y (IGNORE: none) after inputs x, both (B, T), summed: a
    float32 scalar.

    chunk 0: from the model's whole logits, (B, T, V) float32. chunk N: the output projection and
    the loss are taken N positions at a time, only at positions that have a target, and each chunk
    is recomputed during the backward pass (torch.utils.checkpoint) instead of keeping its logits;
    the logits then never exist whole. That is most of a step's activation memory when V is large
    (Llama 3: 128256 float32 logits per position, 0.5 MB: 1.3 GB for 512 positions with their
    softmax and gradient). The model runs with its output projection swapped for nn.Identity
    for the call, so it returns the final norm's output instead of logits. A frozen output
    projection (LoRA, QLoRA: no gradient for its weight) goes further: sliced_cross_entropy takes
    every position at once and the vocabulary a slice at a time, at most chunk x V logits in all,
    and never holds the whole weight in float (QLoRA's quantized table is dequantized a slice at a
    time).
    model: what computes (e.g. a compiled module); base: the Transformer itself, if different.
    """
    if chunk == 0:
        logits = model(x)  # (B, T, V) float32
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
    base = model if base is None else base
    output = base.output
    base.output = nn.Identity()
    try:
        h = model(x)  # (B, T, D): the model's .float() of the normed hidden state
    finally:
        base.output = output
    h = h.to(_stream_dtype(base))  # back to the stream's dtype: exactly what output would have seen
    keep = y.flatten() != IGNORE
    h, targets = h.flatten(0, 1)[keep], y.flatten()[keep]  # (n, D), (n,)
    if len(targets) and reads_rows(output) and not any(p.requires_grad for p in output.parameters()):
        # At most chunk x V logits at a time, and at most SLICE_WEIGHTS weights: a quantized slice is
        # dequantized through temporaries of several bytes per weight.
        rows = min(chunk * base.config.vocab_size // len(targets), SLICE_WEIGHTS // base.config.dim)
        return sliced_cross_entropy(h, targets, output, max(1, rows))
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, output, h[part], targets[part], use_reentrant=False)
        else:
            total = total + _chunk_loss(output, h[part], targets[part])
    return total


def _chunk_loss(output: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output(h).float(), targets, reduction="sum")  # (n, V) logits, then a scalar


def _stream_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the residual stream: the embedding's (a float table's, or a quantized one's rows)."""
    embedding = model.tok_embeddings
    return embedding.weight.dtype if isinstance(embedding, nn.Embedding) else embedding.dtype


def sliced_cross_entropy(h: torch.Tensor, targets: torch.Tensor, output: nn.Module, slice_size: int) -> torch.Tensor:
    """sum_i cross_entropy(output(h_i), targets_i) for a frozen output projection, computed a slice
    of the vocabulary at a time: h (n, D), targets (n,) int64 (no IGNORE) -> a float32 scalar.

    The loss of position i is logsumexp_v(z_iv) - z_i,t with logits z = h W^T. Each slice s of
    `slice_size` rows of W gives logits (n, S), their logsumexp per position and the target logits
    that fall in it; the logsumexps of the slices combine into the whole one. The backward pass
    computes each slice's logits again and adds its part of the gradient,
    dL/dh = sum_s (softmax(z)_s - onehot_s) W_s, so at most n x S logits and S rows of W (read by
    qlora.weight_rows, dequantized if need be) exist at a time. Autocast's dtype (or
    h's) is the dtype of the matmuls, as output(h) would use; logits and softmax are float32.
    """
    return _SlicedCrossEntropy.apply(h, targets, output, slice_size)


class _SlicedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
        device = h.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype

    @staticmethod
    def _slices(vocab: int, size: int):
        return [slice(start, min(start + size, vocab)) for start in range(0, vocab, size)]

    @staticmethod
    def forward(ctx, h, targets, output, slice_size):
        dtype = _SlicedCrossEntropy._matmul_dtype(h)
        x = h.to(dtype)
        vocab = output.out_features
        lse_parts, target_logit = [], torch.zeros(len(targets), dtype=torch.float32, device=h.device)
        for part in _SlicedCrossEntropy._slices(vocab, slice_size):
            z = F.linear(x, weight_rows(output, part, dtype)).float()  # (n, S)
            lse_parts.append(torch.logsumexp(z, dim=-1))  # (n,)
            inside = (targets >= part.start) & (targets < part.stop)  # (n,)
            rows = inside.nonzero().squeeze(1)
            target_logit[rows] = z[rows, targets[rows] - part.start]
            del z
        lse = torch.logsumexp(torch.stack(lse_parts, dim=-1), dim=-1)  # (n,)
        ctx.save_for_backward(h, targets, lse)
        ctx.output, ctx.slice_size, ctx.dtype = output, slice_size, dtype
        return (lse - target_logit).sum()

    @staticmethod
    def backward(ctx, grad):
        h, targets, lse = ctx.saved_tensors
        x = h.to(ctx.dtype)
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)  # (n, D)
        positions = torch.arange(len(targets), device=h.device)
        for part in _SlicedCrossEntropy._slices(ctx.output.out_features, ctx.slice_size):
            w = weight_rows(ctx.output, part, ctx.dtype)  # (S, D)
            p = torch.exp(F.linear(x, w).float() - lse[:, None])  # (n, S): softmax over the whole vocabulary
            inside = (targets >= part.start) & (targets < part.stop)
            p[positions[inside], targets[inside] - part.start] -= 1  # softmax - onehot
            grad_h += ((p * grad).to(ctx.dtype) @ w).float()  # (n, S) @ (S, D)
            del p
        return grad_h.to(h.dtype), None, None, None


def train_step(model, optimizer, batches, *, grad_clip: float, autocast, params=None, loss_chunk: int = 0,
               base: nn.Module | None = None, total=None) -> tuple[float, float, int]:
    """One optimiser step over the micro-batches `batches` [(x, y), ...]; returns (loss, gradient
    norm, trained targets).

    Each micro-batch's summed loss is divided by the targets of all of them, so the gradients add up
    to those of one batch holding them all (gradient accumulation). params: what to clip (default:
    every parameter of `model`). loss_chunk, base: see token_loss. total: sums a number over the
    processes of a data-parallel run (llama.distributed.DataParallel.sum): the targets and the loss
    are those of every process's micro-batches together.
    """
    total_over_ranks = total or (lambda value: value)
    optimizer.zero_grad(set_to_none=True)
    n_targets = total_over_ranks(sum(int((y != IGNORE).sum()) for _, y in batches))
    loss_sum = 0.0
    for x, y in batches:
        with autocast():
            loss = token_loss(model, x, y, loss_chunk, base) / max(n_targets, 1)
        loss.backward()
        loss_sum += loss.item()
    params = list(model.parameters()) if params is None else params
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # sharded parameters (FSDP): a DTensor, whole on every rank
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    return total_over_ranks(loss_sum), float(grad_norm), n_targets


@torch.no_grad()
def evaluate(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], autocast, device, loss_chunk: int = 0,
             base: nn.Module | None = None) -> float:
    """Mean loss per target over the validation batches."""
    was_training = model.training
    model.eval()
    loss_sum, n_targets = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            loss_sum += token_loss(model, x, y, loss_chunk, base).item()
        n_targets += int((y != IGNORE).sum())
    model.train(was_training)
    return loss_sum / max(n_targets, 1)


def train(
    model: nn.Module,
    data: Batches,
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    time_limit: float | None = None,
    progress: bool = True,
    forward=None,
    run: dict[str, Any] | None = None,
    parallel=None,
) -> TrainResult:
    """Train the parameters of `model` (on its device) that require gradients, on `data`.

    out_dir: where the resumable state (STATE_FILE) is saved every config.save_every steps and at the
        end; with resume=True training continues from the state found there.
    stop_at: pause after this step (the state is saved; resume later to finish the schedule).
    time_limit: pause after the first step that ends later than this many seconds from the start.
    forward: what computes the logits (default: the model itself; e.g. a torch.compile'd model).
    run: a JSON-like description of the run beyond the two configs (the fine-tuning method, the
        base checkpoint...); resuming requires the same.
    parallel: a llama.distributed.DataParallel for a run over several processes (the model already
        sharded by it): each rank trains on its rows of every batch, the state is saved whole by rank 0.
    """
    if parallel is not None:
        data = parallel.batches(data)
    device = next(model.parameters()).device
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"stop_at must be a step >= 1, got {stop_at}")
    if config.context > model.config.max_seq_len:
        raise ValueError(f"context {config.context} exceeds the model's max_seq_len {model.config.max_seq_len}")
    if data.max_token_id >= model.config.vocab_size:
        raise ValueError(f"the data holds token ids >= the model's vocab_size {model.config.vocab_size} (up to {data.max_token_id})")
    dtype = autocast_dtype(config.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    forward = model if forward is None else forward  # (a compiled module has no truth value)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, config.betas)
    params = [p for _, p in trainable_parameters(model)]
    state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None
    identity = {"data": data.fingerprint(), "run": _plain(run or {})}

    result = TrainResult(0, 0, 0.0, False, "bf16" if dtype else "float32", 0.0)
    if resume:
        if state_path is None or not state_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
        result = _load_state(state_path, model, optimizer, config, identity, result, parallel)
    else:
        if state_path is not None and state_path.exists():
            raise FileExistsError(f"{state_path} exists: resume that run, or choose another output directory")
        # A new run draws its random numbers (dropout) from config.seed, not from whatever the
        # process did before; a resumed run restores the generator's state instead.
        torch.manual_seed(config.seed)

    def save():
        if state_path is not None:
            _save_state(state_path, model, optimizer, config, identity, result, parallel)

    model.train()
    start_step, start_tokens, start_time = result.step, result.tokens_seen, time.perf_counter()
    prior_wall, train_time = result.wall_time, 0.0
    last = min(config.max_steps, stop_at) if stop_at is not None else config.max_steps
    from tqdm import tqdm

    bar = tqdm(total=config.max_steps, initial=start_step, disable=not progress, unit="step", file=sys.stderr,
               dynamic_ncols=True)  # fmt: skip
    for step in range(start_step, last):
        lr = lr_at(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps, max_steps=config.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [data.train_batch(step, micro) for micro in range(config.grad_accum)]
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        t0 = time.perf_counter()
        loss, grad_norm, n_targets = train_step(forward, optimizer, batches, grad_clip=config.grad_clip, autocast=autocast,
                                                params=params, loss_chunk=config.loss_chunk, base=model,
                                                total=parallel.sum if parallel is not None else None)  # fmt: skip
        train_time += time.perf_counter() - t0

        result.step = step + 1
        result.tokens_seen += n_targets
        result.train_losses.append((result.step, loss))
        result.tokens_per_second = (result.tokens_seen - start_tokens) / train_time
        result.seconds_per_step = train_time / (result.step - start_step)
        result.wall_time = prior_wall + time.perf_counter() - start_time
        postfix = {"loss": f"{loss:.3f}", "grad norm": f"{grad_norm:.2f}", "lr": f"{lr:.2e}",
                   "tok/s": f"{result.tokens_per_second:,.0f}"}  # fmt: skip
        valid = data.valid_batches() if result.step % config.eval_every == 0 or result.step == config.max_steps else None
        if valid is not None:
            result.valid_losses.append((result.step, evaluate(forward, valid, autocast, device, config.loss_chunk, model)))
            bar.write(f"step {result.step}: train loss {result.final_train_loss:.4f} (last 10 steps), "
                      f"valid loss {result.valid_losses[-1][1]:.4f}")  # fmt: skip
        if result.valid_losses:
            postfix["valid"] = f"{result.valid_losses[-1][1]:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        out_of_time = time_limit is not None and time.perf_counter() - start_time > time_limit
        if parallel is not None:  # every rank stops after the same step, or the others would wait for it
            out_of_time = parallel.sum(int(out_of_time)) > 0
        if result.step % config.save_every == 0 or result.step == last or out_of_time:
            result.completed = result.step == config.max_steps
            save()
        if out_of_time:
            bar.write(f"time limit of {time_limit:.0f} s reached after step {result.step}")
            break
    bar.close()
    result.completed = result.step == config.max_steps
    return result


def _save_state(path: Path, model, optimizer, config: TrainConfig, identity: dict, result: TrainResult,
                parallel=None) -> None:
    if parallel is None:
        # Only what training changes: a LoRA run's state holds the adapters, not the frozen base.
        weights, moments = {name: p.detach() for name, p in trainable_parameters(model)}, optimizer.state_dict()
    else:  # gathered whole, in the same layout, on the one rank that writes
        gathered = parallel.full_state(model, optimizer)
        if gathered is None:
            return
        weights, moments = gathered
    state = {
        "format": 1,
        "model": weights,
        "optimizer": moments,
        "model_config": _plain(dataclasses.asdict(model.config)),
        "train_config": _plain(dataclasses.asdict(config)),
        "data": identity["data"],
        "run": identity["run"],
        "result": _plain(dataclasses.asdict(result)),
        # The data has its own generators; these serve whatever else draws random numbers (dropout).
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while saving leaves the previous state intact


def _load_state(path: Path, model, optimizer, config: TrainConfig, identity: dict, result: TrainResult,
                parallel=None) -> TrainResult:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != 1:
        raise ValueError(f"{path}: not a training state of this version (format {state.get('format')!r})")
    problems = []
    saved_model, now_model = state["model_config"], _plain(dataclasses.asdict(model.config))
    problems += [f"model {k}: saved {saved_model.get(k)!r}, now {v!r}" for k, v in now_model.items() if saved_model.get(k) != v]
    # A field missing from an older state had its default value then.
    saved_train = _plain({f.name: f.default for f in dataclasses.fields(TrainConfig)} | state["train_config"])
    now_train = _plain(dataclasses.asdict(config))
    problems += [f"{k}: saved {saved_train.get(k)!r}, now {v!r}" for k, v in now_train.items()
                 if k not in _BOOKKEEPING and saved_train.get(k) != v]  # fmt: skip
    problems += [f"{k} data: saved fingerprint {state['data'].get(k)}, now {v}" for k, v in identity["data"].items()
                 if state["data"].get(k) != v]  # fmt: skip
    saved_run = state.get("run", {})
    problems += [f"{k}: saved {saved_run.get(k)!r}, now {identity['run'].get(k)!r}"
                 for k in sorted(set(saved_run) | set(identity["run"])) if saved_run.get(k) != identity["run"].get(k)]  # fmt: skip
    trainable = dict(trainable_parameters(model))
    missing = [name for name in trainable if name not in state["model"]]
    if missing:
        problems.append(f"trainable parameters missing from the state: {', '.join(missing[:4])}")
    if problems:
        raise ValueError(f"{path}: cannot resume, the run differs from the saved one: " + "; ".join(problems))
    if parallel is None:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(state["model"][name])
        optimizer.load_state_dict(state["optimizer"])
    else:  # whatever the number of processes that saved it: each rank takes its shard
        weights = {name: state["model"][name] for name in trainable}
        parallel.load_full_state(model, optimizer, weights, state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    saved = state["result"]
    return dataclasses.replace(
        result,
        step=saved["step"],
        tokens_seen=saved["tokens_seen"],
        wall_time=saved["wall_time"],
        train_losses=[tuple(x) for x in saved["train_losses"]],
        valid_losses=[tuple(x) for x in saved["valid_losses"]],
    )


def _plain(value):
    """Tuples as lists, recursively: configs compare equal after a save/load round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- the loss curve --------------------------------------------------------------------------------


def plot_losses(result: TrainResult, path: str | os.PathLike, title: str = "") -> bool:
    """Draw the training and validation loss against the step into a PNG; False if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend
    except ImportError:
        return False
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.subplots()
    if result.train_losses:
        steps, losses = zip(*result.train_losses)
        ax.plot(steps, losses, lw=0.6, alpha=0.5, color="tab:blue", label="train (per step)")
        k = max(1, len(losses) // 50)  # a running mean shows the trend through the batch noise
        if k > 1:
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, color="tab:blue", label=f"train (mean of {k} steps)")
    if result.valid_losses:
        steps, losses = zip(*result.valid_losses)
        ax.plot(steps, losses, "o-", color="tab:orange", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return True
