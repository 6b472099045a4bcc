"""Generate text, or chat, with a Llama checkpoint (Meta or Hugging Face layout).

    python scripts/generate.py                      # the small bundled model (King James Bible style)
    python scripts/generate.py --checkpoint path/to/Llama-3.2-1B --prompt "The capital of France is"
    python scripts/generate.py --checkpoint path/to/Llama-3.2-1B-Instruct --chat --prompt "Hi!"
    python scripts/generate.py --checkpoint path/to/Llama-3.2-1B-Instruct --interactive
    torchrun --nproc-per-node 8 scripts/generate.py --checkpoint path/to/Llama-3.1-70B --tp 8 --prompt "..."

Tokens stream to stdout as they are generated; a summary of speed and memory goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path

# torch, llama, kernels and weights are imported inside the functions, after the arguments are parsed:
# importing torch takes seconds, and --help or a usage error should not wait for it.

KV_CACHE_KINDS = ("float32", "bfloat16", "float16", "int8", "fp8")  # llama.core.cache.KV_CACHE_DTYPES


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
                   help="checkpoint directory (Meta or Hugging Face layout, with its tokenizer) or GGUF file; "
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
    p.add_argument("--threads", type=_ranged(int, 1), default=None,
                   help="CPU threads for torch (default: one per core, less the cores other processes kept busy "
                        "over the last minute, at least 1: on a busy machine fewer threads decode faster)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantization of the transformer blocks' linears while loading: int8 per "
                        "output channel, int4 in groups of --group-size (default none; see llama/quantization/)")
    p.add_argument("--group-size", type=int, default=128,
                   help="int4 group size: 32, 64, 128 or 256; layers whose input width it does not divide stay "
                        "unquantized (default 128)")
    p.add_argument("--quantize-output", action=argparse.BooleanOptionalAction, default=True,
                   help="with --quantize, quantize the output projection too (a tied one as a copy); "
                        "--no-quantize-output keeps it in float: better quality, more bytes read per token (default on)")
    p.add_argument("--adapter", metavar="DIR",
                   help="a LoRA adapter (peft layout, e.g. from scripts/finetune.py) applied to the checkpoint: merged "
                        "into float weights, kept beside quantized ones (default none)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="swap in the fused modules and native matrix-vector kernels of kernels/ "
                        "(--no-kernels runs the plain reference model of llama/core/model.py; default on)")
    p.add_argument("--int8-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="with the native kernels, int8 / int4 (and GGUF Q8_0) weights multiply activations quantized to int8 "
                        "per block of 32 with integer dot products, as llama.cpp does (default: where the CPU has "
                        "AVX512-VNNI); --no-int8-activations keeps the activations exact (README: Quantized activations)")
    p.add_argument("--draft", metavar="CHECKPOINT",
                   help="speculative decoding with this smaller draft model (same tokenizer): the target checks "
                        "--draft-tokens guesses per forward pass; greedy output is unchanged in float32 (bf16 may "
                        "differ where two logits tie within rounding) (default off)")
    p.add_argument("--draft-tokens", type=_ranged(int, 1), default=2,
                   help="tokens the draft proposes per round (default 2)")
    p.add_argument("--rope-scaling", metavar="SPEC",
                   help="run the checkpoint with this RoPE scaling and the context it gives, without editing its "
                        "config: KIND:FACTOR (linear:4 = position interpolation to 4x the trained context, yarn:4, "
                        "dynamic:2, llama3:8), a JSON object of RopeScaling fields, or none (default: the checkpoint's)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_KINDS, default=None,
                   help="how the KV cache stores keys and values: a float dtype, or int8 / fp8 with one float32 "
                        "scale per head and position, about half a bfloat16 cache (default: the weights' dtype)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (static KV cache; the first compilation "
                        "takes tens of seconds to minutes and is reported; default off)")
    p.add_argument("--tp", type=_ranged(int, 1), default=None,
                   help="tensor parallelism over this many processes started by torchrun (--nproc-per-node N, "
                        "times --nnodes): each holds 1/N of every matrix and reads only its part of the checkpoint; "
                        "only rank 0 prints. Each rank takes the GPU of its LOCAL_RANK, else the CPU (gloo) "
                        "(default: torchrun's number of processes, 1 without torchrun)")
    return p


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def peak_memory(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB on the GPU"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{rss / 1e9:.2f} GB resident"


def kv_cache_memory(model, positions: int) -> str:
    """"KV cache 12.6 MB int8": the size of the cache one sequence of `positions` positions holds."""
    from llama.core.device import model_dtype

    kind = model.kv_cache_dtype or str(model_dtype(model)).removeprefix("torch.")
    size = model.config.kv_cache_bytes_per_token(kind) * positions
    return f"KV cache {size / 1e6:.1f} MB {kind}" if size >= 1e5 else f"KV cache {size / 1e3:.1f} kB {kind}"


class PrefillBar:
    """A progress bar on stderr for the prefill of a long prompt (stream's prefill_progress)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="prefill", unit="tok", file=sys.stderr, leave=False)

    def __call__(self, done: int, total: int) -> None:
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def prefill_bar(prompt_len: int) -> PrefillBar | None:
    """A PrefillBar for prompts the prefill feeds in more than one chunk, else None."""
    from llama.core.generation import PREFILL_CHUNK

    return PrefillBar(prompt_len) if prompt_len > PREFILL_CHUNK else None


def max_new_tokens(args, prompt_ids: list[int], context: int) -> int:
    """--max-new-tokens, or by default 256 capped to what the context (with a draft: the smaller
    of the two) leaves after the prompt."""
    from llama.core.generation import default_new_tokens

    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return default_new_tokens(context, len(prompt_ids), 256)


def rate(count: int, seconds: float, unit: str, digits: int = 1) -> str:
    """"12.3 tok/s", or "n/a" where the rate is undefined (nothing counted, no time elapsed)."""
    return f"{count / seconds:.{digits}f} {unit}" if count > 0 and seconds > 0 else "n/a"


def run_once(llm, prompt_ids: list[int], n_new: int, args, seed, device, draft=None, echo: str = "") -> list[int]:
    """Stream one answer to stdout, after `echo` (the prompt, for plain continuations), and print its
    summary to stderr; returns the generated ids. The request is checked before anything is printed."""
    import torch

    from llama.core.generation import stream
    from llama.core.speculative import SpeculativeStats, speculative_stream
    from llama.core.device import weight_bytes_per_token as bytes_per_token

    decoder = llm.tokenizer.stream_decoder(prompt_ids)
    ids: list[int] = []
    start = time.perf_counter()
    first = None
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                    seed=seed, stop_tokens=llm.tokenizer.stop_tokens)
    stats = SpeculativeStats()
    bar = prefill_bar(len(prompt_ids)) if draft is None else None
    if draft is not None:
        steps = speculative_stream(llm.model, draft, prompt_ids, n_new, draft_tokens=args.draft_tokens,
                                   stats=stats, **sampling)  # fmt: skip
    else:
        steps = stream(llm.model, [prompt_ids], n_new, repetition_penalty=args.repetition_penalty,
                       compile=args.compile, prefill_progress=bar, **sampling)  # fmt: skip
    # The prompt is echoed once the prefill is done: both stream functions check the request when
    # called (nothing is printed for a refused one), and a long prompt's progress bar has gone by then.
    for step in steps:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if first is None:
            first = time.perf_counter()
            if bar is not None:
                bar.close()
            sys.stdout.write(echo)
        for token in step:
            ids.append(token.id)
            sys.stdout.write(decoder.push(token.id))
        sys.stdout.flush()
    if first is None:  # nothing generated (the first token was a stop token)
        if bar is not None:
            bar.close()
        sys.stdout.write(echo)
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    end = time.perf_counter()
    first = first or end
    ttft = first - start
    # The decode rate counts the tokens after the first (which the prefill produced); undefined for one token.
    decoded, decode_time = len(ids) - 1, end - first
    print(
        f"[{len(prompt_ids)} prompt tokens, {len(ids)} generated | time to first token {ttft:.2f} s | "
        f"prefill {rate(len(prompt_ids), ttft, 'tok/s')} | decode {rate(decoded, decode_time, 'tok/s', 2)} | "
        f"weights {rate(bytes_per_token(llm.model) * decoded / 1e9, decode_time, 'GB/s')} | "
        f"peak memory {peak_memory(device)} | {kv_cache_memory(llm.model, len(prompt_ids) + n_new)}"
        + (f" | draft acceptance {stats.acceptance_rate:.2f}, {stats.tokens_per_target_forward:.2f} tokens per "
           f"target forward" if draft is not None and stats.proposed else "") + "]",
        file=sys.stderr,
    )
    return ids


def compile_now(model, length: int) -> None:
    """Compile the decode step for a cache of `length` positions before generating, saying so before
    (it takes tens of seconds to minutes) and how long it took after."""
    from llama.core.generation import warm_up

    print("[compiling the decode step with torch.compile: tens of seconds to minutes ...]", file=sys.stderr, flush=True)
    started = time.perf_counter()
    warm_up(model, 1, length)
    print(f"[compiled the decode step in {time.perf_counter() - started:.1f} s]", file=sys.stderr)


def chat_note(checkpoint: Path, bundled: bool) -> str | None:
    """A one-line note for --chat / --interactive when nothing says the checkpoint was trained for
    chat: the bundled model, or an HF checkpoint without a chat template. (A Meta checkpoint carries
    no such sign either way: no note.)"""
    if bundled:
        return ("note: the bundled model is a base model, trained to continue King James Bible text and not "
                "to chat: its answers in the chat format will be poor (without --chat it continues the prompt)")  # fmt: skip
    if not (checkpoint / "config.json").is_file() or any((checkpoint / f).is_file() for f in ("chat_template.jinja", "chat_template.json")):
        return None
    try:
        tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        tokenizer_config = {}
    if isinstance(tokenizer_config, dict) and tokenizer_config.get("chat_template"):
        return None
    return (f"note: {checkpoint} has no chat template (tokenizer_config.json): if it is a base model, it was not "
            "trained for chat and its answers in the chat format may be poor")  # fmt: skip


def line_reader():
    """A function returning the next line typed, or None at end of input. On a terminal, input()
    gets line editing and history (Up recalls earlier lines) from readline; the "> " prompt goes to
    stdout only when that is the terminal too, else to stderr, so that stdout holds only the answers."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 -- loading it is what gives input() editing and history
        except ImportError:  # not on Windows
            pass
    to_stdout = sys.stdin.isatty() and sys.stdout.isatty()

    def read() -> str | None:
        try:
            if to_stdout:
                return input("> ")
            print("> ", end="", file=sys.stderr, flush=True)
            return input()
        except EOFError:
            print(file=sys.stderr)
            return None

    return read


def interactive(llm, args, device, context: int) -> None:
    """Chat in the terminal, keeping the conversation. Each answer gets room in the context
    (--max-new-tokens, by default 256 or half the context, whichever is less): the oldest exchanges
    are dropped to make it, with a note. With --seed S, turn i samples with seed S + i."""
    from llama.core.generation import GenerationError, check_seed, default_new_tokens

    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict] = []  # user and assistant messages, oldest first
    room = args.max_new_tokens or min(256, context // 2)
    read = line_reader()
    print("Chatting; an empty line or Ctrl-D quits.", file=sys.stderr)
    for turn in itertools.count():
        line = read()
        if line is None or not line.strip():
            return
        turns.append({"role": "user", "content": line})
        prompt_ids = llm.tokenizer.encode_dialog(system + turns)
        dropped = 0
        while len(prompt_ids) + room > context and len(turns) > 1:
            del turns[:2]  # the oldest user message and its answer
            dropped += 1
            prompt_ids = llm.tokenizer.encode_dialog(system + turns)
        if dropped:
            print(f"[dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''} to leave {room} tokens for the "
                  f"answer in the context of {context}]", file=sys.stderr)  # fmt: skip
        n_new = args.max_new_tokens or default_new_tokens(context, len(prompt_ids), 256)
        seed = None if args.seed is None else check_seed(args.seed + turn)
        try:
            ids = run_once(llm, prompt_ids, n_new, args, seed, device)
        except GenerationError as e:  # e.g. one message longer than the context: say so, keep chatting
            print(f"error: {e}", file=sys.stderr)
            turns.pop()
            continue
        turns.append({"role": "assistant", "content": llm.tokenizer.decode(ids)})


def scaling_note(config, spec: str | None) -> str:
    """", yarn RoPE scaling x4 of 256 positions: context 1024" when --rope-scaling was given."""
    if spec is None:
        return ""
    s = config.rope_scaling
    if s is None:
        return f", no RoPE scaling: context {config.max_seq_len}"
    return f", {s.kind} RoPE scaling x{s.factor:g} of {config.trained_context} positions: context {config.max_seq_len}"


def check_tensor_parallel(args) -> None:
    """Refuse what generate.py does not run under tensor parallelism (raises TensorParallelError)."""
    from llama.distributed import TensorParallelError

    alone = [flag for flag, on in (("--interactive", args.interactive), ("--draft", args.draft), ("--compile", args.compile),
                                   ("--quantize", args.quantize != "none"), ("--prompt-file -", args.prompt_file == "-"),
                                   ("--adapter", args.adapter),
                                   ("--rope-scaling", args.rope_scaling is not None),
                                   ("--kv-cache-dtype", args.kv_cache_dtype is not None))
             if on]  # fmt: skip
    if alone:
        raise TensorParallelError(f"{', '.join(alone)} run{'s' if len(alone) == 1 else ''} in one process only, not "
                                  "with --tp / under torchrun")  # fmt: skip


def checkpoint_bytes(path: Path) -> int:
    """The size of a checkpoint directory's weight files (0 if there are none)."""
    return sum(f.stat().st_size for f in path.glob("*") if f.suffix in (".safetensors", ".pth", ".bin") and f.is_file())


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 speaks: the text, the notes, the errors
        sys.stdout = sys.stderr = open(os.devnull, "w")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.interactive and (args.prompt or args.prompt_file):
        parser.error("--interactive reads its prompts from the terminal; drop --prompt/--prompt-file")
    if args.system and not (args.chat or args.interactive):
        parser.error("--system needs --chat or --interactive")
    if args.int8_activations is not None and not args.kernels:
        parser.error("--int8-activations / --no-int8-activations choose how the native kernels multiply; "
                     "they have no effect with --no-kernels")
    if args.draft and (args.compile or args.repetition_penalty != 1.0 or args.interactive):
        parser.error("--draft does not combine with --compile, --repetition-penalty or --interactive")

    import torch

    import kernels
    import llama
    import weights
    from llama.core.device import DeviceError, idle_threads, pick_device, pick_dtype, set_threads
    from llama.core.generation import GenerationError, SamplingParams, check_seed
    from llama.core.tokenizer import (ChatFormatError, InvalidTextError, TokenizerFormatError, TokenizerMismatchError,
                                      TokenizerNotFoundError, check_text)  # fmt: skip

    user_errors = (llama.CheckpointError, llama.ConfigError, GenerationError, ChatFormatError, DeviceError,
                   TokenizerNotFoundError, TokenizerFormatError, TokenizerMismatchError, InvalidTextError,
                   llama.distributed.TensorParallelError, kernels.UnsupportedModelError)  # fmt: skip
    if args.quantize != "none":
        try:
            llama.quantization.check_mode(args.quantize, args.group_size)
        except ValueError as e:
            parser.error(str(e))
    try:
        SamplingParams(args.temperature, args.top_p, args.top_k, args.min_p, args.repetition_penalty)
        tp = llama.distributed.start(args.tp)
        if tp > 1:
            check_tensor_parallel(args)
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
        device = llama.distributed.device() if tp > 1 else pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        if device.type == "cpu":
            set_threads(args.threads or idle_threads())
        checkpoint = Path(args.checkpoint) if args.checkpoint else weights.BUNDLED_MODEL
        size = checkpoint_bytes(checkpoint) if checkpoint.is_dir() else 0
        if size > 2**30:
            print(f"[loading {checkpoint}: {size / 1e9:.1f} GB ...]", file=sys.stderr, flush=True)
        started = time.perf_counter()
        quantize = None if args.quantize == "none" else args.quantize
        with llama.distributed.together():  # a rank that fails to load stops them all
            if tp > 1:
                model = llama.distributed.load(checkpoint, dtype=dtype, device=device)
            else:
                model = llama.load(checkpoint, dtype=dtype, device=device, quantize=quantize,
                                   group_size=args.group_size, quantize_output=args.quantize_output,
                                   adapter=args.adapter, kv_cache_dtype=args.kv_cache_dtype,
                                   rope_scaling=args.rope_scaling)  # fmt: skip
            llm = llama.Llama(model, llama.load_tokenizer(checkpoint))
        args.seed = llama.distributed.shared_seed(args.seed)  # under tp: every rank samples the same tokens
        mode = getattr(model, "quantization", None)
        threads = f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}" if device.type == "cpu" else ""
        print(f"[loaded {checkpoint} in {time.perf_counter() - started:.1f} s: "
              f"{_count(llm.model.config.n_params)} parameters, {str(dtype).removeprefix('torch.')}, {device}{threads}"
              f"{f', tensor-parallel over {tp} processes' if tp > 1 else ''}"
              f"{', ' + mode['mode'] + ' weights' if mode else ''}{scaling_note(model.config, args.rope_scaling)}]",
              file=sys.stderr)
        context = llm.model.config.max_seq_len
        draft = None
        if args.draft:
            started = time.perf_counter()
            draft = llama.load(args.draft, dtype=dtype, device=device)
            print(f"[loaded the draft {args.draft} in {time.perf_counter() - started:.1f} s: "
                  f"{_count(draft.config.n_params)} parameters]", file=sys.stderr)  # fmt: skip
            context = min(context, draft.config.max_seq_len)  # both models hold the whole sequence
        if args.kernels:
            kernels.optimize(model, **kernels.fusable(model), int8_activations=args.int8_activations)
            if draft is not None:
                kernels.optimize(draft)
        if args.chat or args.interactive:
            note = chat_note(checkpoint, bundled=checkpoint.resolve() == weights.BUNDLED_MODEL.resolve())
            if note:
                print(note, file=sys.stderr)
        if args.interactive:
            if args.compile:
                compile_now(model, 1)
            interactive(llm, args, device, context)
            return 0
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
            prompt_ids = llm.tokenizer.encode_dialog(messages)
        else:
            prompt_ids = llm.tokenizer.encode(prompt, bos=True, eos=False)
        n_new = max_new_tokens(args, prompt_ids, context)
        if len(prompt_ids) + n_new > context:
            whose = "the draft's" if draft is not None and draft.config.max_seq_len < llm.model.config.max_seq_len else "the model's"
            raise GenerationError(f"the prompt ({len(prompt_ids)} tokens) plus {n_new} new tokens "
                                  f"exceeds {whose} context of {context} tokens")  # fmt: skip
        if args.compile:
            compile_now(model, len(prompt_ids) + n_new)
        for i in range(args.num_samples):
            run_once(llm, prompt_ids, n_new, args, None if args.seed is None else check_seed(args.seed + i), device, draft,
                     echo="" if args.chat else prompt)  # fmt: skip
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    status = main()
    if "llama.distributed" in sys.modules:  # under torchrun: end without torch's C++ teardown (see there)
        sys.modules["llama.distributed"].exit(status)
    sys.exit(status)
