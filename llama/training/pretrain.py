"""Pretraining a Llama from scratch: tokenizer, data, initialisation, optimiser, schedule, the loop.

    tokenizer = load_tokenizer(train_tokenizer(["corpus.txt"], "tok.model", vocab_size=8000))
    data = encode_documents(tokenizer, [Path("corpus.txt").read_text()])     # BOS doc EOS BOS doc EOS ...
    model = Transformer(config); init_weights(model, seed=0)
    result = train(model, data[:-n_valid], data[-n_valid:], TrainConfig(max_steps=1000), out_dir="run")

Shape glossary: B batch size, T context (tokens per training window), V vocabulary size.

The data. The corpus is tokenized once into one flat array of token ids. Each document (by default
a line: scripts/prepare_kjv.py writes one verse per line) becomes BOS + text + EOS, and documents
follow each other without padding. A training example is a random window of T + 1 consecutive
tokens (inputs are the first T, targets the last T), so a window may start mid-document and cross
document boundaries, as in Llama's pretraining; BOS at the start of every document teaches the
model what follows BOS, which is how `llama.Llama.generate` prompts it, and EOS teaches it to end.

Resuming. Nothing in a step is random except the choice of windows, and the windows of step s are
drawn from a generator seeded with (seed, s, micro-batch): the data position *is* the step counter.
The saved state holds the weights, AdamW's moments and the step, so a run stopped at step k and
resumed computes exactly what an uninterrupted run computes (given the same hardware and threads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.device import bf16_supported
from ..core.model import Transformer
from ..core.tokenizer import Tokenizer

STATE_FILE = "train_state.pt"  # inside out_dir: everything needed to resume

# ---- the tokenizer ---------------------------------------------------------------------------------

# Llama 2's sentencepiece recipe (its tokenizer.model records these in its trainer_spec): BPE with byte
# fallback (any UTF-8 byte has a piece <0xNN>, so there is no unknown text), digits split one by one,
# no Unicode normalisation, whitespace kept as it is, and a space added in front of the text so
# that a word is the same piece at the start of a text as in its middle.
LLAMA2_SENTENCEPIECE_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    max_sentence_length=4192,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


def text_files(path: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """`path` itself if it is a file, else every *.txt under it (sorted), without `exclude`."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    skip = {Path(p).resolve() for p in exclude}
    files = sorted(p for p in path.rglob("*.txt") if p.is_file() and p.resolve() not in skip)
    if not files:
        raise FileNotFoundError(f"{path}: no *.txt files in this directory")
    return files


def train_tokenizer(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, vocab_size: int, *,
                    character_coverage: float = 0.99995, max_sentences: int = 0, seed: int = 0,
                    threads: int = 1, verbose: bool = False) -> Path:
    """Train a sentencepiece BPE tokenizer the way Llama 2's was made; returns the .model path.

    inputs: text files or directories (all *.txt inside); sentencepiece reads one sentence per line.
    output: the model file to write (a `.vocab` listing is written beside it).
    max_sentences: train on a random sample of this many lines (0: all of them).
    The result is the same for the same inputs and seed.
    """
    import sentencepiece

    files = [f for p in inputs for f in text_files(p)]
    if not files:
        raise ValueError("no input files given")
    output = Path(output)
    if output.suffix != ".model":
        raise ValueError(f"{output}: the output file name must end in .model")
    if vocab_size < 3 + 256 + 1:
        raise ValueError(f"vocab_size must be at least 260 (3 specials + 256 byte pieces + 1), got {vocab_size}")
    output.parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.set_random_generator_seed(seed)
    sentencepiece.SentencePieceTrainer.train(
        input=",".join(str(f) for f in files),
        model_prefix=str(output.with_suffix("")),
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=max_sentences > 0,
        num_threads=threads,
        minloglevel=0 if verbose else 2,
        **LLAMA2_SENTENCEPIECE_OPTIONS,
    )
    return output


# ---- the data --------------------------------------------------------------------------------------

DOCUMENT_SPLITS = ("line", "paragraph", "file")


def split_documents(text: str, split: str = "line") -> list[str]:
    """Cut a text into documents: each non-blank line, each blank-line-separated paragraph
    (keeping its inner newlines), or the whole text."""
    if split == "line":
        docs = text.splitlines()
    elif split == "paragraph":
        docs = re.split(r"\n[ \t\r\f\v]*\n", text)
    elif split == "file":
        docs = [text]
    else:
        raise ValueError(f"unknown document split {split!r}; expected one of {', '.join(DOCUMENT_SPLITS)}")
    return [doc.strip("\r\n") for doc in docs if doc.strip()]


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str], split: str = "line") -> np.ndarray:
    """All documents of all texts as one flat int32 array: BOS doc EOS BOS doc EOS ..."""
    ids: list[int] = []
    for text in texts:
        for doc in split_documents(text, split):
            ids += tokenizer.encode(doc, bos=True, eos=True)
    return np.asarray(ids, dtype=np.int32)


def get_batch(data: np.ndarray, batch_size: int, context: int, seed: int, step: int, micro: int = 0):
    """A training batch: inputs x and targets y, both (B, T) int64, y being x shifted by one token.

    The windows are drawn from a generator seeded with (seed, step, micro): the same step always
    reads the same windows, which is what makes a resumed run continue exactly.
    """
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(data) - context, size=batch_size)  # a window is data[s : s + T + 1]
    windows = torch.from_numpy(np.stack([data[s : s + context + 1] for s in starts]).astype(np.int64))  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def eval_batches(data: np.ndarray, batch_size: int, context: int, n_batches: int):
    """The validation batches: n_batches * B windows spread evenly over `data`, the same at every evaluation."""
    starts = np.linspace(0, len(data) - context - 1, n_batches * batch_size).astype(np.int64)
    for i in range(n_batches):
        rows = starts[i * batch_size : (i + 1) * batch_size]
        windows = torch.from_numpy(np.stack([data[s : s + context + 1] for s in rows]).astype(np.int64))
        yield windows[:, :-1], windows[:, 1:]


def fingerprint(data: np.ndarray) -> str:
    """A short hash of a token array: resuming on different data is an error."""
    return hashlib.sha256(np.ascontiguousarray(data, dtype=np.int32).tobytes()).hexdigest()[:16]


# ---- the model and the optimiser -------------------------------------------------------------------


def default_ffn_dim(dim: int, multiple_of: int = 16) -> int:
    """SwiGLU width for a custom shape: 8/3 * dim (the parameters of a 4 * dim two-matrix MLP spread over
    three matrices), rounded up to a multiple of `multiple_of`. dim 256 -> 688."""
    return multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)


@torch.no_grad()
def init_weights(model: Transformer, *, std: float = 0.02, seed: int = 0) -> Transformer:
    """Initialise for training from scratch: every matrix normal(0, std), norms ones.

    The two projections that write into the residual stream, attention.wo and feed_forward.w2, get
    std / sqrt(2 * n_layers) (GPT-2, Radford et al. 2019, section 2.3): the stream is a sum of
    2 * n_layers such outputs, so its variance at the top stays near that of the embedding instead of
    growing with depth. A tied output matrix is the embedding and is initialised once.
    """
    generator = torch.Generator().manual_seed(seed)
    residual_std = std / math.sqrt(2 * model.config.n_layers)
    for name, param in model.named_parameters():
        if param.ndim == 1:  # RMSNorm gains
            param.fill_(1.0)
            continue
        scale = residual_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else std
        param.copy_(torch.randn(param.shape, generator=generator) * scale)  # drawn on the CPU: same on any device
    return model


def make_optimizer(model: Transformer, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (embedding, projections, output) and none on the norm gains."""
    params = list(model.parameters())  # a tied output matrix appears once
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
    """The autocast dtype for --precision auto|float32|bf16 (None: plain float32)."""
    if precision not in ("auto", "float32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; expected auto, float32 or bf16")
    if precision == "bf16" or precision == "auto" and bf16_supported(device):
        return torch.bfloat16
    return None


# ---- the training loop -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    context: int = 256  # T: tokens per window
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

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "context", "eval_every", "eval_batches", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr {self.min_lr} and lr {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay} and {self.grad_clip}")
        if self.precision not in ("auto", "float32", "bf16"):
            raise ValueError(f"precision must be auto, float32 or bf16, got {self.precision!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.context


# Fields that do not change the weights a run computes: they may differ when resuming.
_BOOKKEEPING = ("eval_every", "eval_batches", "save_every")


@dataclass
class TrainResult:
    step: int  # optimiser steps done
    tokens_seen: int
    wall_time: float  # seconds, over all sessions of a resumed run
    completed: bool  # reached max_steps (not paused by stop_at / time_limit)
    precision: str  # what autocast actually used: "bf16" or "float32"
    tokens_per_second: float  # training throughput of this session
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for every step
    valid_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) at each evaluation

    @property
    def final_train_loss(self) -> float | None:
        """Mean of the last 10 steps' losses (one step's loss is one noisy batch)."""
        last = [loss for _, loss in self.train_losses[-10:]]
        return sum(last) / len(last) if last else None

    @property
    def final_valid_loss(self) -> float | None:
        return self.valid_losses[-1][1] if self.valid_losses else None


def train_step(model, optimizer, batches, *, grad_clip: float, autocast) -> tuple[float, float]:
    """One optimiser step over the micro-batches `batches` [(x, y), ...]; returns (loss, gradient norm).

    The gradients of the micro-batches add up, each loss scaled by 1 / len(batches), so that the step
    equals one over their concatenation (gradient accumulation).
    """
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in batches:
        with autocast():
            logits = model(x)  # (B, T, V) float32
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) / len(batches)
        loss.backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    return total, float(grad_norm)


@torch.no_grad()
def evaluate(model, data: np.ndarray, config: TrainConfig, autocast, device) -> float:
    """Mean loss over the fixed validation windows."""
    model.eval()
    losses = []
    for x, y in eval_batches(data, config.batch_size, config.context, config.eval_batches):
        with autocast():
            logits = model(x.to(device))
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def train(
    model: Transformer,
    train_data: np.ndarray,
    valid_data: np.ndarray | None,
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    time_limit: float | None = None,
    progress: bool = True,
    forward=None,
) -> TrainResult:
    """Train `model` (already initialised, on its device) on windows of `train_data`.

    out_dir: where the resumable state (STATE_FILE) is saved every config.save_every steps and at the
        end; with resume=True training continues from the state found there.
    stop_at: pause after this step (the state is saved; resume later to finish the schedule).
    time_limit: pause after the first step that ends later than this many seconds from the start.
    forward: what computes the logits (default: the model itself; e.g. a torch.compile'd model).
    """
    device = model.tok_embeddings.weight.device
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"stop_at must be a step >= 1, got {stop_at}")
    if config.context > model.config.max_seq_len:
        raise ValueError(f"context {config.context} exceeds the model's max_seq_len {model.config.max_seq_len}")
    for name, data in (("training", train_data), ("validation", valid_data)):
        if data is not None and len(data) < config.context + 1:
            raise ValueError(f"the {name} data has {len(data)} tokens, fewer than context + 1 = {config.context + 1}")
    if max(int(train_data.max()), int(valid_data.max()) if valid_data is not None else 0) >= model.config.vocab_size:
        raise ValueError(f"the data holds token ids >= the model's vocab_size {model.config.vocab_size}")
    dtype = autocast_dtype(config.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    forward = model if forward is None else forward  # (a compiled module has no truth value)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, config.betas)
    state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None
    data_id = {"train": fingerprint(train_data), "valid": None if valid_data is None else fingerprint(valid_data)}

    result = TrainResult(0, 0, 0.0, False, "bf16" if dtype else "float32", 0.0)
    if resume:
        if state_path is None or not state_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
        result = _load_state(state_path, model, optimizer, config, data_id, result)
    elif state_path is not None and state_path.exists():
        raise FileExistsError(f"{state_path} exists: resume that run, or choose another output directory")

    def save():
        if state_path is not None:
            _save_state(state_path, model, optimizer, config, data_id, result)

    model.train()
    start_step, start_time = result.step, time.perf_counter()
    prior_wall, train_time = result.wall_time, 0.0
    last = min(config.max_steps, stop_at) if stop_at is not None else config.max_steps
    from tqdm import tqdm

    bar = tqdm(total=config.max_steps, initial=start_step, disable=not progress, unit="step", file=sys.stderr,
               dynamic_ncols=True)  # fmt: skip
    for step in range(start_step, last):
        lr = lr_at(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps, max_steps=config.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [get_batch(train_data, config.batch_size, config.context, config.seed, step, micro)
                   for micro in range(config.grad_accum)]  # fmt: skip
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        t0 = time.perf_counter()
        loss, grad_norm = train_step(forward, optimizer, batches, grad_clip=config.grad_clip, autocast=autocast)
        train_time += time.perf_counter() - t0

        result.step = step + 1
        result.tokens_seen = result.step * config.tokens_per_step
        result.train_losses.append((result.step, loss))
        result.tokens_per_second = (result.step - start_step) * config.tokens_per_step / train_time
        result.wall_time = prior_wall + time.perf_counter() - start_time
        postfix = {"loss": f"{loss:.3f}", "grad norm": f"{grad_norm:.2f}", "lr": f"{lr:.2e}",
                   "tok/s": f"{result.tokens_per_second:,.0f}"}  # fmt: skip
        if valid_data is not None and (result.step % config.eval_every == 0 or result.step == config.max_steps):
            result.valid_losses.append((result.step, evaluate(forward, valid_data, config, autocast, device)))
            bar.write(f"step {result.step}: train loss {result.final_train_loss:.4f} (last 10 steps), "
                      f"valid loss {result.valid_losses[-1][1]:.4f}")  # fmt: skip
        if result.valid_losses:
            postfix["valid"] = f"{result.valid_losses[-1][1]:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        out_of_time = time_limit is not None and time.perf_counter() - start_time > time_limit
        if result.step % config.save_every == 0 or result.step == last or out_of_time:
            result.completed = result.step == config.max_steps
            save()
        if out_of_time:
            bar.write(f"time limit of {time_limit:.0f} s reached after step {result.step}")
            break
    bar.close()
    result.completed = result.step == config.max_steps
    return result


def _save_state(path: Path, model, optimizer, config: TrainConfig, data_id: dict, result: TrainResult) -> None:
    state = {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_config": _plain(dataclasses.asdict(model.config)),
        "train_config": _plain(dataclasses.asdict(config)),
        "data": data_id,
        "result": _plain(dataclasses.asdict(result)),
        # Nothing in training draws from these generators (the data has its own), but a model change
        # that does (dropout, say) then resumes exactly too.
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while saving leaves the previous state intact


def _load_state(path: Path, model, optimizer, config: TrainConfig, data_id: dict, result: TrainResult) -> TrainResult:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != 1:
        raise ValueError(f"{path}: not a training state of this version (format {state.get('format')!r})")
    problems = []
    saved_model, now_model = state["model_config"], _plain(dataclasses.asdict(model.config))
    problems += [f"model {k}: saved {saved_model.get(k)!r}, now {v!r}" for k, v in now_model.items() if saved_model.get(k) != v]
    saved_train, now_train = state["train_config"], _plain(dataclasses.asdict(config))
    problems += [f"{k}: saved {saved_train.get(k)!r}, now {v!r}" for k, v in now_train.items()
                 if k not in _BOOKKEEPING and saved_train.get(k) != v]  # fmt: skip
    problems += [f"{k} data: saved fingerprint {state['data'].get(k)}, now {v}" for k, v in data_id.items()
                 if state["data"].get(k) != v]  # fmt: skip
    if problems:
        raise ValueError(f"{path}: cannot resume, the run differs from the saved one: " + "; ".join(problems))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
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
