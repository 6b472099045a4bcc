"""EleutherAI's lm-evaluation-harness (lm-eval >= 0.4) on this project's models, in-process.

    python scripts/evaluate.py --checkpoint weights/kjv --tasks kjv          # the shipped tasks
    python scripts/evaluate.py --checkpoint DIR --tasks hellaswag,arc_easy   # any lm-eval task

    from llama.training.harness import LlamaLM, evaluate
    lm = LlamaLM.load("weights/kjv", batch_size=16)      # or LlamaLM(model, tokenizer)
    results = evaluate(lm, ["kjv"], limit=50)            # lm-eval's results: {"results": {task: {metric: value}}, ...}

lm-eval is an optional extra (pip install -e ".[eval]"): this module imports it, and nothing else in
the package imports this module. The model is registered with lm-eval as "llama-from-scratch"
(model_args: checkpoint=DIR, plus LlamaLM's keyword arguments).

What lm-eval asks of a model, and how it is answered here:

- loglikelihood(context, continuation): lm-eval's TemplateLM tokenizes the pair exactly as its
  `hf` backend does (the whole text, then the context; the continuation is the difference, and
  trailing spaces of the context move to the continuation). The log-probability of the
  continuation's tokens and whether each is the greedy choice come from one forward pass. Requests
  that share a context (the choices of a multiple-choice question) share its prefill: the context
  fills one KV-cache row, which is copied to a row per continuation (KVCache.copy_prefix), and the
  continuations run together from there. Contexts of several questions are prefilled together,
  right-padded (as the serving engine does).
- loglikelihood_rolling(text): the text, without BOS, in windows of the model's context, each
  token predicted once (lm-eval's get_rolling_token_windows), the first conditioned on BOS (the
  prefix token), scored as loglikelihood requests. lm-eval's `hf` backend on a Llama tokenizer
  encodes the text with BOS and then conditions on BOS as well, so it scores the text after two
  BOS, the second one included (lm-eval issue #3333): on short documents such as the shipped
  verses its perplexities are much higher. Here each token of the text is scored once, after one
  BOS: the result is the same with and without add_bos_token, and equals lm-eval's API models
  over scripts/serve.py with its remote tokenizer (which adds no BOS).
- generate_until(context, until, max_gen_toks): batched llama.generate, greedy unless the task
  asks to sample; the text is cut at the first stop string.

BOS. As lm-eval's `hf` backend with a Llama tokenizer: tok_encode puts BOS in front unless told
not to (add_bos_token=True). lm-eval's API models (local-completions over a server) never add
BOS; add_bos_token=False evaluates in-process the way they do.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..core.device import model_device
from ..core.generation import generate
from ..core.tokenizer import check_vocabulary

SHIPPED_TASKS = Path(__file__).parent / "tasks"  # lm-eval task YAMLs that ship with the package (the kjv group)
GENERATION_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}


class HarnessError(ValueError):
    """A request lm-eval made that this adapter cannot answer faithfully (e.g. a generation
    keyword it does not implement); the message names it."""


@register_model("llama-from-scratch")
class LlamaLM(TemplateLM):
    """An lm-eval model over a llama.Transformer and its tokenizer.

    checkpoint: a checkpoint directory or GGUF file, loaded with dtype, device, quantize, group_size
    and adapter (a LoRA adapter directory) as llama.load takes them.
    batch_size: sequences per forward pass. add_bos_token: put BOS in front of encoded text (see
    the module docstring). max_length: the longest input (default: the model's context).
    max_gen_toks: the default generation length when a task gives none (256, as lm-eval's; at most
    half of max_length).
    """

    def __init__(self, model=None, tokenizer=None, *, checkpoint: str | os.PathLike | None = None, batch_size: int = 8,
                 add_bos_token: bool = True, max_length: int | None = None, max_gen_toks: int = 256,
                 dtype: str | None = None, device: str = "cpu", quantize: str | None = None, group_size: int = 128,
                 adapter: str | os.PathLike | None = None):  # fmt: skip
        super().__init__()
        if checkpoint is not None:
            if model is not None or tokenizer is not None:
                raise HarnessError("pass either a checkpoint or a model and its tokenizer, not both")
            from .. import loading
            from ..core.tokenizer import load_tokenizer

            model = loading.load(checkpoint, dtype=dtype, device=device, quantize=quantize, group_size=group_size,
                                 adapter=adapter)  # fmt: skip
            tokenizer = load_tokenizer(checkpoint)
        if model is None or tokenizer is None:
            raise HarnessError("LlamaLM needs a model and its tokenizer, or checkpoint=DIR")
        for name, value in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HarnessError(f"{name} must be a positive integer, got {value!r}")
        check_vocabulary(tokenizer, model.config.vocab_size)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.add_bos_token = bool(add_bos_token)
        self.max_length = max_length or model.config.max_seq_len
        if not 2 <= self.max_length <= model.config.max_seq_len:
            raise HarnessError(f"max_length must be in [2, {model.config.max_seq_len}], got {self.max_length}")
        self.max_gen_toks = max_gen_toks
        self.stop_tokens = sorted(getattr(model, "stop_tokens", None) or tokenizer.stop_tokens)
        self._device = model_device(model)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, **kwargs) -> "LlamaLM":
        return cls(checkpoint=checkpoint, **kwargs)

    # ---- what TemplateLM needs --------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS (lm-eval's hf backend does the same)."""
        return self.tokenizer.bos_id

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, bos=bos, eos=False)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- loglikelihood ---------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) as TemplateLM makes them.
        Returns (log-probability of the continuation, whether it is the greedy continuation)."""
        pairs = [self._fit(list(ctx), list(cont)) for _, ctx, cont in requests]
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, _) in enumerate(pairs):
            by_context[tuple(ctx)].append(i)
        groups = sorted(by_context.items(), key=lambda item: -len(item[0]))  # similar lengths pad less
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Room for the longest continuation after any context: a short row in a batch with a long
        # continuation feeds padding at positions beyond its own end (never attended to).
        self.model.setup_cache(self.batch_size, self.max_length + max(len(cont) for _, cont in pairs))
        try:
            with torch.inference_mode():
                for chunk in _row_chunks(groups, self.batch_size):
                    for i, answer in self._score_chunk(chunk, pairs):
                        results[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        finally:
            self.model.clear_cache()
        return results

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Cut the context from the left so that context + continuation - 1 tokens fit max_length (as
        the hf backend does; the last continuation token is predicted, never fed)."""
        if not cont or not ctx:
            raise HarnessError("a loglikelihood request needs a non-empty context and continuation (lm-eval gives both)")
        if len(cont) > self.max_length:
            raise HarnessError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
        return ctx[-(self.max_length + 1 - len(cont)) :], cont

    def _score_chunk(self, chunk: list[tuple[tuple[int, ...], list[int]]], pairs) -> list[tuple[int, tuple[float, bool]]]:
        """One chunk: contexts prefilled together, each into the first row of its continuations,
        copied to the others, then every continuation (but its last token) in one forward."""
        device = model_device(self.model)
        rows, first_rows = [], []  # rows[r]: request index; first_rows[g]: the row group g's context fills
        for _, members in chunk:
            first_rows.append(len(rows))
            rows.extend(members)
        contexts = [list(ctx) for ctx, _ in chunk]
        lengths = torch.tensor([len(c) for c in contexts], device=device)  # (G,)
        ids = torch.zeros(len(contexts), int(lengths.max()), dtype=torch.long, device=device)  # (G, Tc)
        for g, c in enumerate(contexts):
            ids[g, : len(c)] = torch.tensor(c, device=device)
        logits = self.model(ids, 0, cache_rows=torch.tensor(first_rows, device=device))  # (G, Tc, V)
        first = torch.log_softmax(logits[torch.arange(len(contexts), device=device), lengths - 1], dim=-1)  # (G, V)
        for g, (_, members) in enumerate(chunk):
            others = torch.arange(first_rows[g] + 1, first_rows[g] + len(members), device=device)
            if len(others):
                self.model.cache.copy_prefix(first_rows[g], others, len(contexts[g]))

        conts = [pairs[i][1] for i in rows]
        longest = max(len(c) for c in conts)
        later = None  # (R, longest - 1, V): log-probabilities of continuation tokens 1.. (fed: tokens 0..)
        if longest > 1:
            fed = torch.zeros(len(rows), longest - 1, dtype=torch.long, device=device)
            for r, c in enumerate(conts):
                fed[r, : len(c) - 1] = torch.tensor(c[:-1], device=device)
            starts = torch.tensor([len(pairs[i][0]) for i in rows], device=device)
            later = torch.log_softmax(self.model(fed, starts, cache_rows=torch.arange(len(rows), device=device)), dim=-1)

        answers = []
        group_of_row = [g for g, (_, members) in enumerate(chunk) for _ in members]
        for r, i in enumerate(rows):
            cont = conts[r]
            steps = first[group_of_row[r]][None]  # (1, V): predicts cont[0]
            if len(cont) > 1:
                steps = torch.cat([steps, later[r, : len(cont) - 1]])  # (len(cont), V)
            target = torch.tensor(cont, device=device)
            logprob = float(steps.gather(-1, target[:, None]).sum())
            greedy = bool((steps.argmax(dim=-1) == target).all())
            answers.append((i, (logprob, greedy)))
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, prediction in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):  # fmt: skip
                windows.append((None, context, prediction))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_kwargs[repr(sorted(req.args[1].items()))].append(i)
        for members in by_kwargs.values():
            options = self._generation_options(requests[members[0]].args[1])
            for batch in _chunks(members, self.batch_size):
                contexts = [requests[i].args[0] for i in batch]
                for i, text in zip(batch, self._generate(contexts, **options)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generation_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - GENERATION_KWARGS)
        if unknown:
            raise HarnessError(f"generation keywords {unknown} are not implemented (known: {sorted(GENERATION_KWARGS)})")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tokenizer.decode([self.eot_token_id])
        if eos_text and eos_text not in until:  # lm-eval adds the EOS text to the stop strings, as hf does
            until.append(eos_text)
        sampling = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
        # a task without max_gen_toks gets the default, capped to half the context (else a short
        # context, such as the bundled model's 256, would leave no room for the prompt)
        max_gen_toks = int(kwargs["max_gen_toks"]) if "max_gen_toks" in kwargs else min(self.max_gen_toks, self.max_length // 2)
        return {"until": until, "max_gen_toks": max_gen_toks,
                "temperature": float(kwargs.get("temperature", 1.0)) if sampling else 0.0,
                "top_p": float(kwargs.get("top_p", 1.0)), "top_k": kwargs.get("top_k")}  # fmt: skip

    def _generate(self, contexts: list[str], until: list[str], max_gen_toks: int, temperature: float, top_p: float,
                  top_k: int | None) -> list[str]:  # fmt: skip
        room = self.max_length - max_gen_toks
        if room < 1:
            raise HarnessError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in max_length {self.max_length}")
        prompts = [self.tok_encode(c)[-room:] for c in contexts]  # cut from the left, as the hf backend does
        outputs = generate(self.model, prompts, max_gen_toks, temperature=temperature, top_p=top_p, top_k=top_k,
                           stop_tokens=self.stop_tokens, stop_strings=until or None, tokenizer=self.tokenizer)  # fmt: skip
        texts = []
        for ids in outputs:
            text = self.tokenizer.decode(ids)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _row_chunks(groups: list[tuple[tuple[int, ...], list[int]]], rows: int) -> list[list[tuple[tuple[int, ...], list[int]]]]:
    """(context, request indices) groups packed into chunks of at most `rows` continuations; a group
    with more is split (each part prefills its context again)."""
    chunks, current, used = [], [], 0
    for context, members in groups:
        for part in _chunks(members, rows):
            if used + len(part) > rows:
                chunks.append(current)
                current, used = [], 0
            current.append((context, part))
            used += len(part)
    return chunks + [current] if current else chunks


def task_manager(tasks: Sequence[str] = (), include_path: Sequence[str | os.PathLike] = (), include_defaults: bool | None = None):
    """lm-eval's TaskManager over the shipped tasks, `include_path`, and lm-eval's own tasks: with
    include_defaults None, only if one of `tasks` is not found without them (indexing lm-eval's
    14,000 task files takes tens of seconds)."""
    from lm_eval.tasks import TaskManager

    paths = [str(SHIPPED_TASKS), *map(str, include_path)]
    if include_defaults is None:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
        include_defaults = True
    manager = TaskManager(include_path=paths, include_defaults=include_defaults)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise HarnessError(f"no lm-eval task or group named {missing} (looked in lm-eval's tasks, {SHIPPED_TASKS}"
                           + "".join(f", {p}" for p in include_path) + ")")  # fmt: skip
    return manager


def evaluate(lm, tasks: Sequence[str], *, include_path: Sequence[str | os.PathLike] = (), limit: int | float | None = None,
             num_fewshot: int | None = None, include_defaults: bool | None = None, seed: int = 1234,
             log_samples: bool = False) -> dict:  # fmt: skip
    """Run lm-eval's `tasks` on `lm` (a LlamaLM, or any lm-eval model); lm-eval's results dict.
    Stderr is not bootstrapped (lm-eval's table shows N/A)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                           task_manager=task_manager(tasks, include_path, include_defaults), log_samples=log_samples,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed, bootstrap_iters=0)  # fmt: skip


def table(results: dict) -> str:
    """lm-eval's own table of a results dict (what its CLI prints)."""
    return lm_utils.make_table(results)
