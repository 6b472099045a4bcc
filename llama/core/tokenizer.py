"""Tokenizers and chat formats for Llama 1, 2 and 3.

Two tokenizer families, one interface (`Tokenizer`):

- Llama 3 (`TiktokenTokenizer`): byte-level BPE run by tiktoken, 128000 merge ranks plus 256 special
  tokens (128000-128255). Read from Meta's `tokenizer.model` (text lines `base64-token rank`) or from a
  Hugging Face `tokenizer.json`. Chat format: `<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`.
- Llama 1/2 (`SentencePieceTokenizer`): sentencepiece, 32000 pieces, bos 1, eos 2, no pad id.
  Chat format (Llama 2): `[INST] ... [/INST]` turns with the system prompt inside `<<SYS>>` tags.

`load_tokenizer(path)` picks the right one for a checkpoint directory or a tokenizer file, and
`Tokenizer.stream_decoder()` turns generated ids into printable text one id at a time.
"""

from __future__ import annotations

import base64
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path

import sentencepiece
import tiktoken

from weights.files import describe, open_regular, read_bytes

Message = Mapping[str, str]  # {"role": ..., "content": ...}


class TokenizerNotFoundError(FileNotFoundError):
    """A checkpoint directory holds no tokenizer file we can read."""


class TokenizerFormatError(ValueError):
    """A tokenizer file exists but cannot be read (permissions, not a regular file) or is not in a
    format we understand. The message names the file."""


class TokenizerMismatchError(ValueError):
    """A tokenizer has ids the model has no embedding for: they belong to different checkpoints."""


class InvalidTextError(ValueError):
    """Text that is not valid Unicode: a lone surrogate, which is what invalid UTF-8 becomes when it is
    decoded with errors="surrogateescape" (command-line arguments, some stdin) and what a JSON
    "\\ud800" escape gives. Every entry point refuses it; no tokenizer can encode it faithfully."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, what: str = "text") -> str:
    """`text` itself, or InvalidTextError naming `what` and where the first lone surrogate is."""
    bad = _SURROGATE.search(text)
    if bad:
        raise InvalidTextError(
            f"{what} is not valid Unicode: a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()} "
            "(invalid UTF-8 bytes, or a \\ud800-style escape without its pair)"
        )
    return text


def check_vocabulary(tokenizer: "Tokenizer", model_vocab_size: int) -> None:
    """TokenizerMismatchError unless every id of `tokenizer` has a row in an embedding of
    `model_vocab_size` (a model may have more rows than the tokenizer has ids: padding)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerMismatchError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only {model_vocab_size} rows: "
            "they come from different checkpoints (pass the tokenizer of this model)"
        )


class ChatFormatError(ValueError):
    """A dialog cannot be encoded: a malformed message or roles in an order the format forbids."""


class Tokenizer(ABC):
    """What every Llama tokenizer offers. `stop_tokens` are the ids that end generation."""

    bos_id: int
    eos_id: int
    pad_id: int  # -1 when the tokenizer has no padding token
    vocab_size: int
    stop_tokens: frozenset[int]
    special_ids: frozenset[int]  # control tokens (BOS, EOS, chat headers ...): their text is not what they mean
    # What a GGUF file says about its tokenizer (llama/core/gguf.py sets them; other files leave
    # these defaults): whether texts get bos / eos, and the chat template (a Jinja string).
    add_bos: bool = True
    add_eos: bool = False
    chat_template: str | None = None

    @abstractmethod
    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""

    @abstractmethod
    def encode_dialog(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids for a chat, ending where the assistant's answer starts."""

    @abstractmethod
    def encode_dialog_for_training(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """A finished dialog (ending with an assistant message) in the chat format, and which of its
        ids the assistant wrote (what fine-tuning trains on). Every prefix that ends where an
        assistant message starts is what encode_dialog gives for the messages before it."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, possibly part of a UTF-8 character (what OpenAI's
        logprobs report as `bytes`)."""

    def stream_decoder(self, prompt: Sequence[int] = ()) -> StreamDecoder:
        """A decoder for one stream of generated ids (see StreamDecoder). Given the `prompt` ids the
        stream continues, it prints what the new ids add to the prompt's text: sentencepiece drops
        the leading space of a text's first piece, so a continuation decoded on its own would lose
        the space between the prompt and its first new word."""
        decoder = StreamDecoder(self)
        for token_id in prompt[-8:]:  # a few ids suffice: a character spans at most 4 bytes
            decoder.push(token_id)
        return decoder

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return ids


class StreamDecoder:
    """Turns ids into text as they are generated, never printing half a character.

    `push(id)` returns the text that id completes (often "", e.g. for the first bytes of an emoji) and
    `flush()` returns whatever is held back at the end, so that for any ids
    `"".join(d.push(i) for i in ids) + d.flush() == tokenizer.decode(ids)`.

    Decoding each id alone is wrong in two ways: a character may span several tokens (byte tokens in
    Llama 3, `<0xNN>` byte pieces in Llama 2), and sentencepiece drops the leading space of the first
    piece it decodes. So we decode a `window` of the ids since the last emitted text together with a
    `context` of earlier ids, and emit what the window adds to the context's text. Text ending in
    U+FFFD may be a character whose remaining bytes are still to come, so it is held back. Once the
    window's text is final it becomes the next context. A context always contains a piece that is
    not a control token (it added text), so sentencepiece never takes the window's first piece for
    the start of the text, and it ends on a whole character, so no bytes join across the boundary.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._context: list[int] = []
        self._context_text = ""
        self._window: list[int] = []

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        text = self._tokenizer.decode(self._context + self._window)
        if text.endswith("\ufffd"):  # maybe a character cut short: wait for its next bytes
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD). Ends the text:
        the next push starts a new one."""
        new = self._advance(self._tokenizer.decode(self._context + self._window))
        self._context, self._context_text = [], ""
        return new

    def _advance(self, text: str) -> str:
        assert text.startswith(self._context_text), (text, self._context_text)
        new = text[len(self._context_text) :]
        if new:  # this window becomes the context of the next one
            self._context, self._context_text = self._window, self._tokenizer.decode(self._window)
        else:  # ids without text (bos, or a first piece that is only the dropped space) stay in the context
            self._context = self._context + self._window
        self._window = []
        return new


# --- Llama 3: tiktoken ------------------------------------------------------------------------------

# Meta's pre-tokenizer regex (the same string is in HF's tokenizer.json for Llama 3).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]  # fmt: skip
LLAMA3_ROLES = ("system", "user", "assistant", "ipython", "tool")

# tiktoken must not see very long inputs: Meta found it panics (pyo3 PanicException) beyond ~400k
# characters, and its BPE merge loop is quadratic in the length of one pre-tokenized piece, which a long
# run of 'a' or of spaces becomes (openai/tiktoken#195). Meta encodes in chunks of 400k characters and
# cuts every run of whitespace or of non-whitespace after 25k characters. The cuts change the ids (a cut
# may split a token), so we cut at exactly the same places to get Meta's ids.
MAX_CHUNK_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# A run long enough to cut. The lookbehinds make a match start only where a run starts, so the scan
# is linear in the text length.
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN_CHARS, MAX_RUN_CHARS))


def _pieces_for_tiktoken(text: str) -> Iterator[str]:
    """`text` cut where Meta cuts it: into 400k-char chunks, and runs cut every 25k chars within each."""
    for chunk_start in range(0, len(text), MAX_CHUNK_CHARS):
        chunk = text[chunk_start : chunk_start + MAX_CHUNK_CHARS]
        piece_start = 0
        for run in _LONG_RUN.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[piece_start:cut]
                piece_start = cut
        yield chunk[piece_start:]


class TiktokenTokenizer(Tokenizer):
    """Llama 3 tokenizer: byte-level BPE with `mergeable_ranks` (token bytes -> id) and named specials."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        extra_stop_tokens: Sequence[int] = (),
        name: str = "llama3",
    ):
        for required in ("<|begin_of_text|>", "<|end_of_text|>"):
            if required not in special_tokens:
                raise TokenizerFormatError(f"{name}: special token {required} is missing")
        _check_ranks(mergeable_ranks, special_tokens, name)
        self._model = tiktoken.Encoding(
            name=name, pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.special_tokens = dict(special_tokens)
        self.bos_id = special_tokens["<|begin_of_text|>"]
        self.eos_id = special_tokens["<|end_of_text|>"]
        self.pad_id = special_tokens.get("<|finetune_right_pad_id|>", -1)
        self.vocab_size = self._model.n_vocab
        self.special_ids = frozenset(special_tokens.values())
        # eom ends a message with a tool call, eot a turn; Llama 3.0 files name 128008 a reserved token.
        stops = {special_tokens[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>") if t in special_tokens}
        self.stop_tokens = frozenset(stops | set(extra_stop_tokens))

    @classmethod
    def from_tiktoken_file(cls, path: Path, extra_stop_tokens: Sequence[int] = ()) -> TiktokenTokenizer:
        """Meta's `tokenizer.model`; the specials follow the regular tokens under Meta's names."""
        ranks = {}
        for line_no, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError as e:  # also raised by b64decode
                    msg = f"{path}:{line_no}: expected 'base64-token rank', got {line[:80]!r}"
                    raise TokenizerFormatError(msg) from e
        specials = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        return cls(ranks, specials, extra_stop_tokens, name=str(path))

    @classmethod
    def from_hf_json(cls, path: Path, extra_stop_tokens: Sequence[int] = ()) -> TiktokenTokenizer:
        """A Hugging Face `tokenizer.json` of a Llama 3 checkpoint.

        Its BPE vocabulary maps tokens to ids with every byte written as one printable character
        (GPT-2's byte-level alphabet, see `_byte_level_alphabet`); mapping the characters back gives
        the token bytes, and the ids are tiktoken's ranks. `added_tokens` hold the specials. The BPE
        merges are not needed (tiktoken derives them from the ranks), and the split pattern is Meta's,
        which Llama 3's tokenizer.json holds too.
        """
        text = _read_text(path)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # ValueError: a number of 5000 digits, too
            raise TokenizerFormatError(f"{path}: malformed JSON: {e}") from None
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            got = model.get("type") if isinstance(model, dict) else type(data.get("model") if isinstance(data, dict) else data).__name__
            raise TokenizerFormatError(f"{path}: expected a JSON object with a BPE 'model' and its 'vocab', got {got!r:.60}")
        added = data.get("added_tokens", [])
        if not isinstance(added, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                  and _is_id(t.get("id")) for t in added):  # fmt: skip
            raise TokenizerFormatError(f"{path}: 'added_tokens' must be a list of objects with a 'content' string and "
                                       "an integer 'id'")  # fmt: skip
        specials = {t["content"]: t["id"] for t in added}
        to_byte = {char: byte for byte, char in _byte_level_alphabet().items()}
        special_ids = set(specials.values())
        ranks = {}
        for token, token_id in model["vocab"].items():
            if not _is_id(token_id):
                raise TokenizerFormatError(f"{path}: token {token!r:.60} has id {token_id!r:.40}; ids are integers in [0, 2**31)")
            if token_id in special_ids:
                continue
            if any(c not in to_byte for c in token):
                raise TokenizerFormatError(
                    f"{path}: token {token!r} is not byte-level BPE (a Llama 3 tokenizer.json); "
                    "Llama 1/2 checkpoints need their sentencepiece tokenizer.model"
                )
            ranks[bytes(to_byte[c] for c in token)] = token_id
        return cls(ranks, specials, extra_stop_tokens, name=str(path))

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_text(text)
        ids = [self.bos_id] if bos else []
        for piece in _pieces_for_tiktoken(text):
            # Special-token text typed by a user ("<|eot_id|>") is encoded as ordinary text: the
            # specials are only ever inserted by id, so no input can forge a turn boundary.
            ids += self._model.encode(piece, allowed_special=set(), disallowed_special=())
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._model.decode(self._check_ids(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._model.decode_single_token_bytes(self._check_ids([token_id])[0])

    def encode_dialog(self, messages: Sequence[Message]) -> list[int]:
        """Meta's Llama 3 chat format; content is stripped of surrounding whitespace, as in
        meta-llama/llama3's ChatFormat and HF's chat template. The `tool` role is written `ipython`."""
        _check_messages(messages, LLAMA3_ROLES)
        ids = [self.bos_id]
        for message in messages:
            ids += self.header(message["role"])
            ids += self.encode(message["content"].strip(), bos=False, eos=False)
            ids.append(self.special_tokens["<|eot_id|>"])
        return ids + self.header("assistant")

    def encode_dialog_for_training(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """encode_dialog's format for a finished dialog: an assistant message's content and its
        <|eot_id|> are trained on (the model learns to end its turn); headers and other roles are not."""
        _check_messages(messages, LLAMA3_ROLES)
        _check_finished(messages)
        ids, trained = [self.bos_id], [False]
        for message in messages:
            header = self.header(message["role"])
            body = self.encode(message["content"].strip(), bos=False, eos=False) + [self.special_tokens["<|eot_id|>"]]
            ids += header + body
            trained += [False] * len(header) + [message["role"] == "assistant"] * len(body)
        return ids, trained

    def header(self, role: str) -> list[int]:
        """The ids that open a message of `role`: <|start_header_id|>role<|end_header_id|>\\n\\n."""
        role = "ipython" if role == "tool" else role
        return [
            self.special_tokens["<|start_header_id|>"],
            *self.encode(role, bos=False, eos=False),
            self.special_tokens["<|end_header_id|>"],
            *self.encode("\n\n", bos=False, eos=False),
        ]


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def _check_ranks(ranks: dict[bytes, int], specials: dict[str, int], name: str) -> None:
    """What tiktoken assumes without checking (it panics, or decodes garbage, otherwise): ids are
    integers, each used once, together 0..n-1 without gaps, and every single byte is a token (so
    byte-level BPE can encode any text)."""
    bad = [(t, i) for t, i in [*ranks.items(), *specials.items()] if not _is_id(i)]
    if bad:
        raise TokenizerFormatError(f"{name}: token {bad[0][0]!r:.60} has id {bad[0][1]!r:.40}; ids are integers in [0, 2**31)")
    ids = sorted([*ranks.values(), *specials.values()])
    repeated = next((a for a, b in zip(ids, ids[1:]) if a == b), None)
    if repeated is not None:
        raise TokenizerFormatError(f"{name}: id {repeated} is given to two tokens")
    if ids and ids[-1] != len(ids) - 1:
        missing = next(i for i, got in enumerate(ids) if got != i)
        raise TokenizerFormatError(f"{name}: ids are not 0..{len(ids) - 1} without gaps (none has id {missing})")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise TokenizerFormatError(f"{name}: no token for the single byte(s) {missing_bytes[:8]}; byte-level BPE "
                                   "needs all 256 to encode any text")  # fmt: skip


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table used by byte-level BPE vocabularies in tokenizer.json.

    Bytes that are printable in Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other
    68 (control characters, space, NBSP, soft hyphen) are given the characters U+0100, U+0101, ... in
    byte order, so that a space is written 'Ġ' and a newline 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


# --- Llama 1/2: sentencepiece -----------------------------------------------------------------------

LLAMA2_ROLES = ("system", "user", "assistant")


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 tokenizer: a sentencepiece model file (bos 1, eos 2, unk 0, no pad id), or the
    model's serialized bytes as `model_proto` (path None)."""

    def __init__(self, path: str | PathLike | None, extra_stop_tokens: Sequence[int] = (), *,
                 model_proto: bytes | None = None):  # fmt: skip
        # not model_file=path: sentencepiece's own open would block on a FIFO
        proto = model_proto if model_proto is not None else _read_bytes(path)
        where = path if model_proto is None else "sentencepiece model"
        try:
            self._model = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            raise TokenizerFormatError(f"{where} is neither a tiktoken nor a sentencepiece model: {e}") from None
        n = self._model.vocab_size()
        if n < 1 or not all(0 <= i < n for i in (self._model.bos_id(), self._model.eos_id())):
            raise TokenizerFormatError(f"{where}: a sentencepiece model without a vocabulary, or without bos and eos pieces")
        try:  # every piece must be text, or decoding it fails later, in the middle of a generation
            for i in range(n):
                self._model.id_to_piece(i)
        except UnicodeDecodeError:
            raise TokenizerFormatError(f"{where}: piece {i} of the sentencepiece model is not UTF-8 text") from None
        self.bos_id = self._model.bos_id()
        self.eos_id = self._model.eos_id()
        self.pad_id = self._model.pad_id()
        self.vocab_size = self._model.vocab_size()
        self.special_ids = frozenset(i for i in range(n) if self._model.is_control(i) or self._model.is_unknown(i))
        self.stop_tokens = frozenset([self.eos_id, *extra_stop_tokens])

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._model.encode(check_text(text))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self._model.decode(self._check_ids(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The piece's bytes: a `<0xNN>` byte-fallback piece is that byte, '▁' is a space."""
        piece = self._model.id_to_piece(self._check_ids([token_id])[0])
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode_dialog(self, messages: Sequence[Message]) -> list[int]:
        """Meta's Llama 2 chat format (llama/generation.py, chat_completion).

        An optional system message is folded into the first user message inside <<SYS>> tags. Then
        each (user, assistant) pair is its own bos ... eos sequence, and the last user message is left
        open for the answer. Roles must go system?, user, assistant, user, ..., user.
        """
        turns = self._turns(messages)
        if turns[-1]["role"] != "user":
            raise ChatFormatError(f"message {len(messages) - 1}: the last message must come from the user")
        ids = []
        for user, answer in zip(turns[::2], turns[1::2]):
            text = f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} "
            ids += self.encode(text, bos=True, eos=True)
        return ids + self.encode(f"[INST] {turns[-1]['content'].strip()} [/INST]", bos=True, eos=False)

    def encode_dialog_for_training(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """encode_dialog's format for a finished dialog: in each bos [INST] user [/INST] answer eos
        sequence, the ids after the ones that encode "[INST] user [/INST]" alone are trained on (the
        answer and eos). The two encodings share their first ids up to the answer; where sentencepiece
        joins the last of them differently, the shared prefix ends earlier and the join is trained."""
        _check_finished(messages)
        turns = self._turns(messages)
        ids, trained = [], []
        for user, answer in zip(turns[::2], turns[1::2]):
            prompt = self.encode(f"[INST] {user['content'].strip()} [/INST]", bos=True, eos=False)
            turn = self.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ", bos=True, eos=True)
            shared = next((i for i, (a, b) in enumerate(zip(prompt, turn)) if a != b), len(prompt))
            ids += turn
            trained += [False] * shared + [True] * (len(turn) - shared)
        return ids, trained

    def _turns(self, messages: Sequence[Message]) -> list[dict]:
        """The messages checked for Llama 2's order (system?, user, assistant, user, ...), the system
        message folded into the first user message."""
        _check_messages(messages, LLAMA2_ROLES)
        turns = [dict(m) for m in messages]
        if turns and turns[0]["role"] == "system":
            if len(turns) < 2 or turns[1]["role"] != "user":
                raise ChatFormatError("message 1: a system message must be followed by a user message")
            system = turns.pop(0)["content"]
            turns[0]["content"] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0]['content']}"
        offset = len(messages) - len(turns)  # to report indices of the caller's list
        for i, turn in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if turn["role"] != expected:
                raise ChatFormatError(
                    f"message {i + offset}: role {turn['role']!r} where {expected!r} was expected; "
                    "Llama 2 needs an optional system message, then user and assistant turns in turn"
                )
        if not turns:
            raise ChatFormatError("no messages: Llama 2 needs at least one user message")
        return turns


def _check_messages(messages: Sequence[Message], roles: Sequence[str]) -> None:
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        kind = type(messages).__name__
        raise ChatFormatError(f"messages must be a list of {{'role', 'content'}} dicts, got {kind}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatFormatError(f"message {i}: expected a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in roles:
            raise ChatFormatError(f"message {i}: unknown role {message['role']!r}; expected one of {list(roles)}")
        if not isinstance(message["content"], str):
            raise ChatFormatError(f"message {i}: content must be a str, got {type(message['content']).__name__}")


def _check_finished(messages: Sequence[Message]) -> None:
    if not messages or not isinstance(messages[-1], Mapping) or messages[-1].get("role") != "assistant":
        raise ChatFormatError(f"message {len(messages) - 1 if messages else 0}: a dialog to train on must end with "
                              "an assistant message (the answer)")  # fmt: skip


# --- Finding the tokenizer of a checkpoint ----------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json")


def load_tokenizer(path: str | PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint directory, or of one tokenizer file.

    A directory is searched for TOKENIZER_FILES in that order (Meta layout, HF layout with Meta's
    files under original/, HF layout alone). `eos_token_id`s in the directory's generation_config.json
    and config.json are added to the stop tokens (instruct models stop on <|eot_id|>). A file path
    gets only the tokenizer's own stop tokens.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise TokenizerNotFoundError(f"{path} does not exist")
        found = path if not path.is_dir() else next((path / n for n in TOKENIZER_FILES if (path / n).exists()), None)
    except OSError as e:  # a directory we may not read
        if isinstance(e, TokenizerNotFoundError):
            raise
        raise TokenizerFormatError(f"{path}: cannot read: {describe(e)}") from e
    if found == path:
        return _load_file(path, extra_stop_tokens=())
    if found is not None:
        return _load_file(found, extra_stop_tokens=eos_ids_from_configs(path))
    raise TokenizerNotFoundError(f"no tokenizer in {path}: looked for {', '.join(TOKENIZER_FILES)}")


def _read_bytes(path: Path) -> bytes:
    try:
        return read_bytes(path)
    except OSError as e:
        raise TokenizerFormatError(f"{path}: cannot read: {describe(e)}") from e


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFormatError(f"{path}: not UTF-8 text: {e}") from None


def _load_file(path: Path, extra_stop_tokens: Sequence[int]) -> Tokenizer:
    if path.suffix == ".json":
        return TiktokenTokenizer.from_hf_json(path, extra_stop_tokens)
    if _is_tiktoken_file(path):
        return TiktokenTokenizer.from_tiktoken_file(path, extra_stop_tokens)
    return SentencePieceTokenizer(path, extra_stop_tokens)


def _is_tiktoken_file(path: Path) -> bool:
    """tiktoken files are text lines 'base64-token rank'; sentencepiece files are protobuf binaries
    (they start with byte 0x0a, which cannot start such a line)."""
    try:
        with open_regular(path) as f:
            first_line = f.readline(1024)
    except OSError as e:
        raise TokenizerFormatError(f"{path}: cannot read: {describe(e)}") from e
    return re.fullmatch(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n?", first_line) is not None


def eos_ids_from_configs(directory: Path) -> list[int]:
    """The `eos_token_id`s (an int or a list) of a checkpoint's generation_config.json and config.json."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        file = directory / name
        if not file.exists():
            continue
        text = _read_text(file)
        try:
            config = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise TokenizerFormatError(f"{file}: malformed JSON: {e}") from None
        eos = config.get("eos_token_id") if isinstance(config, dict) else None
        eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
        if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
            raise TokenizerFormatError(f"{file}: eos_token_id must be an integer or a list of integers, got {eos!r}")
        ids += eos
    return ids
