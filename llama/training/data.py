"""Fine-tuning data: instruction, chat and text records -> token ids with the loss on the answers only.

    records = read_records("train.jsonl")                           # [(line, record), ...], checked
    examples = encode_records(records, tokenizer, "train.jsonl")    # [Example(ids, labels), ...]
    data = InstructionBatches(examples, valid_examples, config, packing=False)   # what loop.train reads

Shape glossary: B rows per batch, T tokens per row (at most the context).

Records, one JSON object each, in a JSON file (a list of objects) or a JSONL file (one per line):

    {"instruction": ..., "input": ..., "output": ...}   Alpaca ("input" optional): the Alpaca prompt
                                                        template, then the output; loss on the output
    {"messages": [{"role": ..., "content": ...}, ...]}  a dialog in the checkpoint's own chat format
                                                        (Llama 3 headers or Llama 2 [INST]); loss on
                                                        the assistant messages
    {"text": ...}                                       plain text (continued pretraining); loss on all

Every answer ends with the end-of-answer token the format uses at inference (EOS, or Llama 3's
<|eot_id|> in chat), so the model learns to stop. `labels` holds, for each position, the id the
model should predict there or IGNORE: prompt tokens are inputs but never targets, so they add
nothing to the loss or its gradient.

Batching, two ways:
- length-bucketed padding (default): one example per row; each epoch's examples are shuffled,
  sorted by length within groups of BUCKET_BATCHES batches and cut into batches, so the rows of a
  batch have similar lengths and little padding. Rows are padded to the longest in their batch
  (inputs with pad ids, targets with IGNORE). Right padding leaves the real tokens' results
  unchanged: a causal model never looks right.
- packing: each epoch's shuffled examples are concatenated into one stream cut into rows of exactly
  T tokens, no padding. Examples then share rows, and a token attends to the earlier examples in
  its row (the model has no per-example mask), as in GPT-style pretraining; it is faster for
  many short examples.
An example longer than the context is cut to its first T + 1 tokens (and dropped if no answer token
is left); the counts are reported.

Batch b of the run is a function of (seed, b) alone (epoch e = b // batches per epoch is built from
a generator seeded with (seed, e)), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.tokenizer import ChatFormatError, Tokenizer
from .loop import IGNORE, TrainConfig

# The Alpaca prompt (Taori et al., 2023, stanford_alpaca/train.py), with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
KINDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",), "text": ("text",)}
BUCKET_BATCHES = 16  # batches whose examples are sorted together by length


class DataError(ValueError):
    """A data file or record cannot be used; the message starts with FILE:LINE."""


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction (and its input): what the model sees before the answer."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


# ---- reading records ------------------------------------------------------------------------------


def read_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """The records of a JSON or JSONL file as (line number, object), each checked for its kind.

    A file whose first non-blank character is "[" is one JSON list; anything else is JSONL (one
    object per non-blank line). Errors are DataErrors starting with FILE:LINE.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    records = _json_list(text, path) if text.lstrip().startswith("[") else _jsonl(text, path)
    if not records:
        raise DataError(f"{path}: no records")
    for line, record in records:
        record_kind(record, f"{path}:{line}")
    return records


def _jsonl(text: str, path: Path) -> list[tuple[int, Any]]:
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: malformed JSON: {e.msg} (column {e.colno})") from None
    return records


def _json_list(text: str, path: Path) -> list[tuple[int, Any]]:
    """The items of a JSON list with the line each starts on (json.loads would lose the positions)."""
    decoder = json.JSONDecoder()
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    records, pos = [], text.index("[") + 1
    try:
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) and text[pos] == "]" and not records:
                pos += 1
                break
            item, end = decoder.raw_decode(text, pos)
            records.append((line_of(pos), item))
            pos = end
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) and text[pos] == ",":
                pos += 1
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise DataError(f"{path}:{line_of(pos)}: malformed JSON: expected ',' or ']' after a record")
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if text[pos:].strip():
        raise DataError(f"{path}:{line_of(pos)}: malformed JSON: extra data after the list")
    return records


def record_kind(record: Any, where: str) -> str:
    """"alpaca", "chat" or "text"; DataError naming what is wrong with the record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kinds = [kind for kind, fields in KINDS.items() if fields[0] in record]
    if len(kinds) != 1:
        found = ", ".join(repr(k) for k in record) or "none"
        raise DataError(f"{where}: expected one of {{instruction, input, output}} (Alpaca), {{messages}} (chat) or "
                        f"{{text}}; found fields {found}")  # fmt: skip
    kind = kinds[0]
    unknown = [k for k in record if k not in KINDS[kind]]
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r} in a{'n' if kind == 'alpaca' else ''} {kind} record "
                        f"(fields: {', '.join(KINDS[kind])})")  # fmt: skip
    if kind == "alpaca":
        for name in ("instruction", "output"):
            if name not in record:
                raise DataError(f"{where}: an Alpaca record needs {name!r}")
        for name in ("instruction", "input", "output"):
            if name in record and not isinstance(record[name], str):
                raise DataError(f"{where}: {name!r} must be a string, got {type(record[name]).__name__}")
        if not record["output"].strip():
            raise DataError(f"{where}: empty 'output': nothing to train on")
    elif kind == "text":
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
        if not record["text"].strip():
            raise DataError(f"{where}: empty 'text'")
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or set(message) != {"role", "content"}:
                raise DataError(f"{where}: message {i}: expected an object with exactly 'role' and 'content', got {message!r:.80}")
            if not isinstance(message["content"], str) or not isinstance(message["role"], str):
                raise DataError(f"{where}: message {i}: 'role' and 'content' must be strings")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must come from the assistant (the answer to train on)")
    return kind


# ---- tokens and labels -----------------------------------------------------------------------------


@dataclass
class Example:
    """ids: the tokens; labels: per position, the id to predict there (= ids[t]) or IGNORE.

    The model reads ids[:-1] and is scored against labels[1:]."""

    ids: list[int]
    labels: list[int]
    line: int = 0

    @property
    def n_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


def encode_record(record: dict, tokenizer: Tokenizer) -> Example:
    kind = record_kind(record, "record")
    if kind == "text":
        ids = tokenizer.encode(record["text"], bos=True, eos=True)
        return Example(ids, [IGNORE] + ids[1:])
    if kind == "alpaca":
        prompt = tokenizer.encode(alpaca_prompt(record["instruction"], record.get("input", "")), bos=True, eos=False)
        answer = tokenizer.encode(record["output"], bos=False, eos=True)
        return Example(prompt + answer, [IGNORE] * len(prompt) + answer)
    ids, trained = tokenizer.encode_dialog_for_training(record["messages"])
    return Example(ids, [i if t else IGNORE for i, t in zip(ids, trained)])


def encode_records(records: list[tuple[int, dict]], tokenizer: Tokenizer, path: str | os.PathLike) -> list[Example]:
    """Examples of checked records (read_records); DataError FILE:LINE where the chat format refuses one."""
    examples = []
    for line, record in records:
        try:
            example = encode_record(record, tokenizer)
        except ChatFormatError as e:
            raise DataError(f"{path}:{line}: {e}") from None
        example.line = line
        examples.append(example)
    return examples


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, valid): a random `fraction` of the examples held out (at least one), the same for the same seed."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(len(examples) * fraction))
    if n_valid >= len(examples):
        raise ValueError(f"{len(examples)} examples are too few to hold out a validation fraction of {fraction}")
    held = set(order[:n_valid])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


# ---- batches --------------------------------------------------------------------------------------


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0  # longer than the context: cut
    dropped: int = 0  # no answer token left after the cut
    tokens: int = 0  # input tokens of the rows kept (before padding)
    trained: int = 0  # targets with a loss
    lines_dropped: list[int] = field(default_factory=list)


def _rows(examples: list[Example], context: int, stats: DataStats | None = None) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) per example: ids[:-1] and labels[1:], at most `context` long."""
    rows = []
    for example in examples:
        x, y = example.ids[:-1][:context], example.labels[1:][:context]
        if stats is not None:
            stats.examples += 1
            if len(example.ids) - 1 > context:
                stats.truncated += 1
        if all(label == IGNORE for label in y):
            if stats is not None:
                stats.dropped += 1
                stats.lines_dropped.append(example.line)
            continue
        if stats is not None:
            stats.tokens += len(x)
            stats.trained += sum(label != IGNORE for label in y)
        rows.append((x, y))
    return rows


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-padded to the longest: x (B, T) with pad_id, y (B, T) with IGNORE."""
    T = max(len(x) for x, _ in rows)
    x = torch.tensor([r + [pad_id] * (T - len(r)) for r, _ in rows], dtype=torch.int64)
    y = torch.tensor([r + [IGNORE] * (T - len(r)) for _, r in rows], dtype=torch.int64)
    return x, y


class InstructionBatches:
    """Fine-tuning data for loop.train: length-bucketed padded batches, or packed rows (see the
    module docstring). Batch b = step * grad_accum + micro of the run depends on (seed, b) only."""

    def __init__(self, train: list[Example], valid: list[Example] | None, config: TrainConfig, *,
                 packing: bool = False, pad_id: int = 0):
        self.config, self.packing, self.pad_id = config, packing, pad_id
        self.stats = DataStats()
        self.rows = _rows(train, config.context, self.stats)
        if not self.rows:
            raise DataError("no training example has an answer token within the context")
        self.valid_rows = _rows(valid, config.context) if valid else None
        if valid is not None and not self.valid_rows:
            raise DataError("no validation example has an answer token within the context")
        self.max_token_id = max(max(max(x) for x, _ in rows) for rows in (self.rows, self.valid_rows or self.rows))
        self._epoch: tuple[int, list] | None = None
        self.batches_per_epoch = len(self._make_epoch(0))

    def _make_epoch(self, epoch: int) -> list[list[tuple[list[int], list[int]]]]:
        """The batches of one epoch, each a list of (x, y) rows."""
        B, T = self.config.batch_size, self.config.context
        order = list(range(len(self.rows)))
        random.Random(f"{self.config.seed}-{epoch}").shuffle(order)
        if self.packing:
            xs = [t for i in order for t in self.rows[i][0]]
            ys = [t for i in order for t in self.rows[i][1]]
            rows = [(xs[s : s + T], ys[s : s + T]) for s in range(0, len(xs), T)]
            return [rows[s : s + B] for s in range(0, len(rows), B)]
        batches = []
        group = B * BUCKET_BATCHES
        for s in range(0, len(order), group):
            chunk = sorted(order[s : s + group], key=lambda i: len(self.rows[i][0]))
            batches += [[self.rows[i] for i in chunk[k : k + B]] for k in range(0, len(chunk), B)]
        random.Random(f"{self.config.seed}-{epoch}-batches").shuffle(batches)
        return batches

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = step * self.config.grad_accum + micro
        epoch, i = divmod(index, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._make_epoch(epoch))
        return _pad(self._epoch[1][i], self.pad_id)

    def valid_batches(self):
        if self.valid_rows is None:
            return None
        B = self.config.batch_size
        rows = sorted(self.valid_rows[: B * self.config.eval_batches], key=lambda r: len(r[0]))
        return (_pad(rows[s : s + B], self.pad_id) for s in range(0, len(rows), B))

    def fingerprint(self) -> dict[str, str | None]:
        def digest(rows):
            h = hashlib.sha256()
            for x, y in rows:
                h.update(np.asarray(x + [-1] + y, dtype=np.int64).tobytes())
            return h.hexdigest()[:16]

        return {"train": digest(self.rows), "valid": None if self.valid_rows is None else digest(self.valid_rows)}
