"""Pretraining a Llama from scratch: tokenizer, data, initialisation (the loop is loop.py's).

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
drawn from a generator seeded with (seed, s, micro-batch): the data position *is* the step counter,
which is what lets loop.train resume exactly (see loop.py).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..core.model import Transformer
from ..core.tokenizer import Tokenizer
from . import loop
# The loop's names, for the code that imports them from here.
from .loop import (STATE_FILE, TrainConfig, TrainResult, autocast_dtype, evaluate, lr_at, make_optimizer,  # noqa: F401
                   plot_losses, train_step)  # fmt: skip

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


# ---- the model ------------------------------------------------------------------------------------


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


# ---- the training loop (llama/training/loop.py, shared with fine-tuning) ------------------------------


class TokenWindows:
    """Pretraining data for the loop: random windows of a flat token array (see get_batch), and the
    fixed validation windows of eval_batches."""

    def __init__(self, train_data: np.ndarray, valid_data: np.ndarray | None, config: TrainConfig):
        for name, data in (("training", train_data), ("validation", valid_data)):
            if data is not None and len(data) < config.context + 1:
                raise ValueError(f"the {name} data has {len(data)} tokens, fewer than context + 1 = {config.context + 1}")
        self.train_data, self.valid_data, self.config = train_data, valid_data, config
        self.max_token_id = max(int(train_data.max()), int(valid_data.max()) if valid_data is not None else 0)

    def train_batch(self, step: int, micro: int):
        return get_batch(self.train_data, self.config.batch_size, self.config.context, self.config.seed, step, micro)

    def valid_batches(self):
        if self.valid_data is None:
            return None
        return eval_batches(self.valid_data, self.config.batch_size, self.config.context, self.config.eval_batches)

    def fingerprint(self) -> dict[str, str | None]:
        return {"train": fingerprint(self.train_data), "valid": None if self.valid_data is None else fingerprint(self.valid_data)}


def train(model: Transformer, train_data: np.ndarray, valid_data: np.ndarray | None, config: TrainConfig,
          **options) -> TrainResult:
    """Train `model` (already initialised, on its device) on windows of `train_data`; the options are
    loop.train's (out_dir, resume, stop_at, time_limit, progress, forward)."""
    return loop.train(model, TokenWindows(train_data, valid_data, config), config, **options)
