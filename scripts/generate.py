"""Generate text, or chat, with a Llama checkpoint (Meta or Hugging Face layout).

    python scripts/generate.py                      # the small bundled model (King James Bible style)
    python scripts/generate.py --checkpoint path/to/Llama-3.2-1B --prompt "The capital of France is"
    python scripts/generate.py --checkpoint path/to/Llama-3.2-1B-Instruct --chat --prompt "Hi!"
    python scripts/generate.py --checkpoint path/to/Llama-3.2-1B-Instruct --interactive

Tokens stream to stdout as they are generated; a summary of speed and memory goes to stderr.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

import kernels
import llama
import weights
from llama.training.evaluate import bytes_per_token
from llama.core.generation import GenerationError, SamplingParams, check_seed, stream, warm_up
from llama.core.speculative import SpeculativeStats, speculative_stream
from llama.core.tokenizer import (ChatFormatError, InvalidTextError, TokenizerFormatError, TokenizerMismatchError,
                                  TokenizerNotFoundError, check_text)  # fmt: skip
from llama.core.device import DeviceError, pick_device, pick_dtype

USER_ERRORS = (llama.CheckpointError, llama.ConfigError, GenerationError, ChatFormatError, DeviceError,
               TokenizerNotFoundError, TokenizerFormatError, TokenizerMismatchError, InvalidTextError)


def _ranged(kind, low=None, high=None, low_open=False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if low is not None and (value <= low if low_open else value < low) or high is not None and value > high:
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint directory (Meta or Hugging Face layout, with its tokenizer); "
                        "default: the small model bundled with the project (weights/kjv)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help='the prompt text (default: "In the beginning")')
    source.add_argument("--prompt-file", help="read the prompt from this file ('-' for stdin)")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message and apply the model's chat format")
    p.add_argument("--system", help="system message for --chat and --interactive")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat in the terminal, keeping the history (Ctrl-D to quit)")
    p.add_argument("--max-new-tokens", type=_ranged(int, 1), default=None,
                   help="most tokens to generate per answer (default: 256, or what is left of the model's context)")
    p.add_argument("--temperature", type=_ranged(float, 0), default=0.6, help="sampling temperature; 0 is greedy (default 0.6)")
    p.add_argument("--top-p", type=_ranged(float, 0, 1, low_open=True), default=0.9, help="nucleus sampling: keep the most likely tokens up to this probability mass (default 0.9)")
    p.add_argument("--top-k", type=_ranged(int, 1), default=None, help="keep only the k most likely tokens (default: off)")
    p.add_argument("--min-p", type=_ranged(float, 0, 1), default=None, help="drop tokens less likely than min-p times the most likely one (default: off)")
    p.add_argument("--repetition-penalty", type=_ranged(float, 0, low_open=True), default=1.0, help="penalise tokens already present; 1 is off (default 1.0)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed, any integer (taken modulo 2**64): the same seed gives the same samples")
    p.add_argument("--num-samples", type=_ranged(int, 1), default=1, help="how many samples to generate for the prompt (default 1)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weight dtype; auto: bfloat16 where the device runs it well, else float32 (default auto)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="where to run; auto picks cuda, then mps, then cpu (default auto)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantization of the transformer blocks' linears while loading: int8 per "
                        "output channel, int4 in groups of --group-size (default none; see llama/quantization/)")
    p.add_argument("--group-size", type=int, default=128,
                   help="int4 group size: 32, 64, 128 or 256; layers whose input width it does not divide stay "
                        "unquantized (default 128)")
    p.add_argument("--quantize-output", action=argparse.BooleanOptionalAction, default=True,
                   help="with --quantize, quantize the output projection too (a tied one as a copy); "
                        "--no-quantize-output keeps it in float: better quality, more bytes read per token (default on)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="swap in the fused modules and native matrix-vector kernels of kernels/ "
                        "(--no-kernels runs the plain reference model of llama/core/model.py; default on)")
    p.add_argument("--draft", metavar="CHECKPOINT",
                   help="speculative decoding with this smaller draft model (same tokenizer): the target checks "
                        "--draft-tokens guesses per forward pass; greedy output is unchanged in float32 (bf16 may "
                        "differ where two logits tie within rounding) (default off)")
    p.add_argument("--draft-tokens", type=_ranged(int, 1), default=2,
                   help="tokens the draft proposes per round (default 2)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (static KV cache; the first compilation "
                        "takes tens of seconds to minutes and is reported; default off)")
    return p


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB on the GPU"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{rss / 1e9:.2f} GB resident"


def max_new_tokens(args, prompt_ids: list[int], llm: llama.Llama | None = None) -> int:
    """--max-new-tokens, or by default 256 capped to the context the prompt leaves free."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    if llm is None:
        return 1
    return max(1, min(256, llm.model.config.max_seq_len - len(prompt_ids)))


def run_once(llm: llama.Llama, prompt_ids: list[int], n_new: int, args, seed, device, draft=None) -> list[int]:
    """Stream one answer to stdout and print its summary to stderr; returns the generated ids."""
    decoder = llm.tokenizer.stream_decoder(prompt_ids)
    ids: list[int] = []
    start = time.perf_counter()
    first = None
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                    seed=seed, stop_tokens=llm.tokenizer.stop_tokens)
    stats = SpeculativeStats()
    if draft is not None:
        steps = speculative_stream(llm.model, draft, prompt_ids, n_new, draft_tokens=args.draft_tokens,
                                   stats=stats, **sampling)  # fmt: skip
    else:
        steps = stream(llm.model, [prompt_ids], n_new, repetition_penalty=args.repetition_penalty,
                       compile=args.compile, **sampling)  # fmt: skip
    for step in steps:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if first is None:
            first = time.perf_counter()
        for token in step:
            ids.append(token.id)
            sys.stdout.write(decoder.push(token.id))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    end = time.perf_counter()
    first = first or end
    ttft = first - start
    decode_rate = (len(ids) - 1) / (end - first) if len(ids) > 1 and end > first else 0.0
    print(
        f"[{len(prompt_ids)} prompt tokens, {len(ids)} generated | time to first token {ttft:.2f} s | "
        f"prefill {len(prompt_ids) / ttft:.1f} tok/s | decode {decode_rate:.2f} tok/s | "
        f"weights {bytes_per_token(llm.model) * decode_rate / 1e9:.1f} GB/s | peak memory {peak_memory(device)}"
        + (f" | draft acceptance {stats.acceptance_rate:.2f}, {stats.tokens_per_target_forward:.2f} tokens per "
           f"target forward" if draft is not None and stats.proposed else "") + "]",
        file=sys.stderr,
    )
    return ids


def compile_now(model: llama.Transformer, length: int) -> None:
    """Compile the decode step for a cache of `length` positions before generating, and say how long it took."""
    started = time.perf_counter()
    warm_up(model, 1, length)
    print(f"[compiled the decode step in {time.perf_counter() - started:.1f} s]", file=sys.stderr)


def interactive(llm: llama.Llama, args, device) -> None:
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            print("> ", end="", file=sys.stderr, flush=True)  # stderr: stdout holds only the answers
            line = input()
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            return
        history.append({"role": "user", "content": line})
        prompt_ids = llm.tokenizer.encode_dialog(history)
        # Forget the oldest exchanges once the conversation outgrows the context.
        while len(prompt_ids) + max_new_tokens(args, []) > llm.model.config.max_seq_len and len(history) > 2 - (not args.system):
            drop = 1 if args.system else 0
            del history[drop : drop + 2]
            prompt_ids = llm.tokenizer.encode_dialog(history)
        try:
            ids = run_once(llm, prompt_ids, max_new_tokens(args, prompt_ids, llm), args, check_seed(args.seed), device)
        except GenerationError as e:  # e.g. one message longer than the context: say so, keep chatting
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": llm.tokenizer.decode(ids)})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.interactive and (args.prompt or args.prompt_file):
        parser.error("--interactive reads its prompts from the terminal; drop --prompt/--prompt-file")
    if args.system and not (args.chat or args.interactive):
        parser.error("--system needs --chat or --interactive")
    if args.draft and (args.compile or args.repetition_penalty != 1.0 or args.interactive):
        parser.error("--draft does not combine with --compile, --repetition-penalty or --interactive")
    if args.quantize != "none":
        try:
            llama.quantization.check_mode(args.quantize, args.group_size)
        except ValueError as e:
            parser.error(str(e))
    try:
        SamplingParams(args.temperature, args.top_p, args.top_k, args.min_p, args.repetition_penalty)
        if args.prompt_file is not None:
            try:
                prompt = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise GenerationError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
            check_text(prompt, f"--prompt-file {args.prompt_file}")  # stdin may decode invalid UTF-8 as surrogates
        else:
            prompt = check_text(args.prompt, "--prompt") if args.prompt is not None else "In the beginning"
        if args.system is not None:
            check_text(args.system, "--system")
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        started = time.perf_counter()
        checkpoint = args.checkpoint or weights.BUNDLED_MODEL
        quantize = None if args.quantize == "none" else args.quantize
        model = llama.load(checkpoint, dtype=dtype, device=device, quantize=quantize, group_size=args.group_size,
                           quantize_output=args.quantize_output)
        llm = llama.Llama(model, llama.load_tokenizer(checkpoint))
        mode = getattr(model, "quantization", None)
        print(f"[loaded {checkpoint} in {time.perf_counter() - started:.1f} s: "
              f"{_count(llm.model.config.n_params)} parameters, {str(dtype).removeprefix('torch.')}, {device}"
              f"{', ' + mode['mode'] + ' weights' if mode else ''}]",
              file=sys.stderr)
        draft = None
        if args.draft:
            started = time.perf_counter()
            draft = llama.load(args.draft, dtype=dtype, device=device)
            print(f"[loaded the draft {args.draft} in {time.perf_counter() - started:.1f} s: "
                  f"{_count(draft.config.n_params)} parameters]", file=sys.stderr)  # fmt: skip
        if args.kernels:
            quantized = mode is not None  # fusing stacks nn.Linear weights; quantized layers keep theirs
            kernels.optimize(model, fuse_qkv=not quantized, fuse_gate_up=not quantized)
            if draft is not None:
                kernels.optimize(draft)
        if args.interactive:
            if args.compile:
                compile_now(model, 1)
            interactive(llm, args, device)
            return 0
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
            prompt_ids = llm.tokenizer.encode_dialog(messages)
        else:
            prompt_ids = llm.tokenizer.encode(prompt, bos=True, eos=False)
        context = llm.model.config.max_seq_len
        n_new = max_new_tokens(args, prompt_ids, llm)
        if len(prompt_ids) + n_new > context:
            raise GenerationError(f"the prompt ({len(prompt_ids)} tokens) plus {n_new} new tokens "
                                  f"exceeds the model's context of {context} tokens")
        if args.compile:
            compile_now(model, len(prompt_ids) + n_new)
        if not args.chat:
            sys.stdout.write(prompt)
        for i in range(args.num_samples):
            if i and not args.chat:
                sys.stdout.write(prompt)
            run_once(llm, prompt_ids, n_new, args, None if args.seed is None else check_seed(args.seed + i), device, draft)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
