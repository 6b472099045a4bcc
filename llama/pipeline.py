"""`Llama`: a model and its tokenizer, loaded once, for generating and chatting many times.

    llm = Llama.load("path/to/Llama-3.2-1B-Instruct", dtype="bfloat16")
    print(llm.generate("The capital of France is", max_new_tokens=20, temperature=0))
    print(llm.chat([{"role": "user", "content": "Hello!"}]))
    for text in llm.stream("Once upon a time"):
        print(text, end="", flush=True)

Without max_new_tokens, generate and stream write up to 256 tokens and chat up to 512, fewer when
the prompt leaves less room in the model's context.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch

from .core.generation import GenerationError, default_new_tokens, stream
from .core.model import Transformer
from .core.stops import StopMatcher
from .core.tokenizer import Message, Tokenizer, check_vocabulary
from .loading import load, load_tokenizer


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        check_vocabulary(tokenizer, model.config.vocab_size)  # TokenizerMismatchError: not this model's tokenizer
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device="cpu",
             tokenizer: str | os.PathLike | None = None) -> "Llama":
        """Load the checkpoint at `path` and its tokenizer (from `tokenizer`, default: `path`)."""
        return cls(load(path, dtype=dtype, device=device), load_tokenizer(tokenizer or path))

    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int | None = None, *, stop: Sequence[str] = (),
                   **sampling) -> Iterator[str]:  # fmt: skip
        """Text pieces as they are generated from prompt ids; never half a character, never any part of
        a stop string (the text ends before it). max_new_tokens None: 256, or what the context leaves."""
        if max_new_tokens is None:
            max_new_tokens = default_new_tokens(self.model.config.max_seq_len, len(prompt_ids), 256)
        decoder = self.tokenizer.stream_decoder(prompt_ids)
        stop = [stop] if isinstance(stop, str) else list(stop)
        try:
            matcher = StopMatcher(stop)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        sampling.setdefault("stop_tokens", self.tokenizer.stop_tokens)
        # The stop strings are matched here, incrementally; generation ends when this generator returns.
        for step in stream(self.model, [prompt_ids], max_new_tokens, **sampling):
            text, done = matcher.push(decoder.push(step[0].id))
            if text:
                yield text
            if done:
                return
        text, _ = matcher.push(decoder.flush(), final=True)
        if text:
            yield text

    def stream(self, prompt: str, max_new_tokens: int | None = None, **kwargs) -> Iterator[str]:
        """Continue `prompt` (BOS is added), yielding text as it is generated."""
        return self.stream_ids(self.tokenizer.encode(prompt, bos=True, eos=False), max_new_tokens, **kwargs)

    def generate(self, prompt: str, max_new_tokens: int | None = None, **kwargs) -> str:
        """The continuation of `prompt`. Keyword arguments: temperature, top_p, top_k, min_p,
        repetition_penalty, seed, stop (strings), stop_tokens."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs))

    def chat_stream(self, messages: Sequence[Message], max_new_tokens: int | None = None, **kwargs) -> Iterator[str]:
        prompt_ids = self.tokenizer.encode_dialog(messages)
        if max_new_tokens is None:
            max_new_tokens = default_new_tokens(self.model.config.max_seq_len, len(prompt_ids), 512)
        return self.stream_ids(prompt_ids, max_new_tokens, **kwargs)

    def chat(self, messages: Sequence[Message], max_new_tokens: int | None = None, **kwargs) -> str:
        """The assistant's reply to a dialog of {"role", "content"} messages, in the model's chat format."""
        return "".join(self.chat_stream(messages, max_new_tokens, **kwargs))
