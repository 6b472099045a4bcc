"""Serve a Llama checkpoint over an OpenAI-compatible HTTP API, with continuous batching.

    pip install -e ".[serve]"
    python scripts/serve.py                                   # the bundled model on 127.0.0.1:8000
    LLAMA_API_KEY=KEY python scripts/serve.py --checkpoint path/to/Llama-3.2-1B-Instruct --max-batch-size 16
    curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\
        -d '{"prompt": "And God said", "max_tokens": 20, "temperature": 0}'
    python scripts/serve.py --lora kjv-words=weights/kjv-lora      # the base as "kjv", the adapter as "kjv-words"
    torchrun --nproc-per-node 8 scripts/serve.py --checkpoint path/to/Llama-3.1-70B-Instruct --tp 8

Under torchrun (--tp N), rank 0 runs the HTTP server and the engine; the engine's every model call is
broadcast to the other ranks, which run it in step on their parts (llama/distributed/lockstep.py).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health.
See llama/serving/app.py for the fields and errors, llama/serving/engine.py for the batching.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

# torch and the project's packages are imported in main(), after the arguments are parsed and the
# port is checked: importing torch takes seconds, and --help or a usage error should not wait for it.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint directory (Meta or Hugging Face layout, with its tokenizer) or GGUF file; "
                        "default: the small model bundled with the project (weights/kjv)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the checkpoint directory's name)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="sequences decoded together, = rows of the KV-cache pool (default 8)")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="positions per KV-cache row: the most prompt + completion tokens of one request; "
                        "capped at the model's context (default 2048)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait for a free row; beyond that requests get 429 (default 64)")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="prompt tokens to compute (a cached prefix not counted) per prefill group of similar "
                        "lengths, and with --prefill-chunk 0 per step's admissions; a longer prompt goes alone, this "
                        "many positions per forward (default 512)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="while sequences decode, prefill at most this many prompt tokens (rows x positions) per step, "
                        "then run the decode step, so running streams keep their pace while a long prompt is read; "
                        "0: prefill every admitted prompt whole before the next decode step (default 256)")
    p.add_argument("--prefill-patience", type=int, default=16,
                   help="prompts are prefilled shortest first, but one passed over this many chunks of others goes "
                        "first, so a stream of short prompts cannot postpone a long one forever; 0: arrival order "
                        "(default 16)")
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="keep the keys and values of this many tokens of earlier prompts and answers (blocks of 16) for "
                        "later requests that begin with the same tokens and adapter, e.g. a shared system prompt or "
                        "a chat's earlier turns; least recently used blocks are evicted; 0: off (default 2048; 0 "
                        "under --tp, which does not support it)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (dynamic batch size and cache length: two graphs, "
                        "compiled at startup, tens of seconds to minutes); not with --lora or --tp")
    p.add_argument("--rope-scaling", metavar="SPEC",
                   help="serve the checkpoint with this RoPE scaling and the context it gives, without editing its "
                        "config: KIND:FACTOR (linear:4, yarn:4, dynamic:2, llama3:8), a JSON object of RopeScaling "
                        "fields, or none (default: the checkpoint's)")
    p.add_argument("--kv-cache-dtype", choices=["float32", "bfloat16", "float16", "int8", "fp8"], default=None,
                   help="how the KV-cache pool stores keys and values: a float dtype, or int8 / fp8 with one float32 "
                        "scale per head and position, about half a bfloat16 pool (default: the weights' dtype)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request; better: set the LLAMA_API_KEY "
                        "environment variable, which keeps the key out of the process list (default: that "
                        "variable; neither: no key, anyone who can reach the port may use it)")
    p.add_argument("--max-body-size", type=int, default=4 * 2**20,
                   help="largest request body in bytes; larger ones get 413 (default 4 MiB)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weight dtype; auto: bfloat16 where the device runs it well, else float32 (default auto)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="where to run; auto picks cuda, then mps, then cpu (default auto)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantization of the transformer blocks' linears while loading (default none)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 or 256 (default 128)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter (peft layout, e.g. from scripts/finetune.py) as model NAME beside the base "
                        "model; repeatable. Requests for different adapters and the base share each batch")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="swap in the faster modules of kernels/ (fused projections, SDPA, native matrix-vector "
                        "kernels); --no-kernels serves the plain model of llama/core/model.py (default on)")
    p.add_argument("--int8-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="with the native kernels, int8 / int4 (and GGUF Q8_0) weights multiply activations quantized to int8 "
                        "per block of 32 with integer dot products, as llama.cpp does (default: where the CPU has "
                        "AVX512-VNNI); --no-int8-activations keeps the activations exact (README: Quantized activations)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: one per core, less the cores other processes kept busy "
                        "over the last minute, at least 1; as for generate.py)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C, seconds to let the requests in flight finish (new ones get 503); "
                        "those still running then end with an error (default 30)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="logging level; info logs one line per request (default info)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor parallelism over this many processes started by torchrun (--nproc-per-node N): "
                        "rank 0 serves, every rank holds 1/N of each matrix (default: torchrun's number of "
                        "processes, 1 without torchrun)")
    return p


def lora_modules(items: list[str]) -> list[tuple[str, str]]:
    """--lora NAME=DIR values as (name, directory); ValueError for a malformed or repeated one."""
    pairs = []
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name.strip() or not directory.strip():
            raise ValueError(f"--lora {item!r}: expected NAME=DIR")
        if name in (n for n, _ in pairs):
            raise ValueError(f"--lora {name}: given twice")
        pairs.append((name.strip(), directory.strip()))
    return pairs


def check_port(host: str, port: int) -> None:
    """Raise OSError, with a message naming the address, if (host, port) cannot be bound now: checked
    before the model loads, so that a busy port fails in a second rather than after the load."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT leftovers do not count
        try:
            s.bind(address)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror} (is another server running there? "
                          "choose another --port)") from None  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # under torchrun only rank 0 speaks: its log, its errors
        sys.stdout = sys.stderr = open(os.devnull, "w")
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, low in (("--port", args.port, 0), ("--max-batch-size", args.max_batch_size, 1),
                             ("--max-seq-len", args.max_seq_len, 2), ("--max-queue", args.max_queue, 0),
                             ("--max-body-size", args.max_body_size, 1),
                             ("--max-prefill-tokens", args.max_prefill_tokens, 1),
                             ("--prefill-chunk", args.prefill_chunk, 0),
                             ("--prefill-patience", args.prefill_patience, 0),
                             ("--prefix-cache-tokens", args.prefix_cache_tokens or 0, 0),
                             ("--threads", args.threads if args.threads is not None else 1, 1)):  # fmt: skip
        if value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")
    if not 0 <= args.shutdown_timeout < float("inf"):
        parser.error(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    api_key, key_source = args.api_key, "--api-key"
    if api_key is None and "LLAMA_API_KEY" in os.environ:
        api_key, key_source = os.environ["LLAMA_API_KEY"], "LLAMA_API_KEY"
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        parser.error(f"{key_source} is empty or has surrounding whitespace; give a real key, or unset it to serve "
                     "without one")  # fmt: skip
    if args.port > 65535:
        parser.error(f"--port must be at most 65535, got {args.port}")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun: checked below, once the ranks can agree
    try:
        adapters = lora_modules(args.lora)
    except ValueError as e:
        parser.error(str(e))
    if args.int8_activations is not None and not args.kernels:
        parser.error("--int8-activations / --no-int8-activations choose how the native kernels multiply; "
                     "they have no effect with --no-kernels")
    if args.compile and args.lora:
        parser.error("--compile does not support --lora: each batch's mix of adapters would be another graph")
    if 0 < (args.prefix_cache_tokens or 0) < 16:
        parser.error(f"--prefix-cache-tokens must be 0 or at least one block of 16 tokens, got {args.prefix_cache_tokens}")
    try:
        if not several:
            check_port(args.host, args.port)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    import kernels
    import llama
    import weights
    from llama.core.device import DeviceError, idle_threads, in_passing_thread, pick_device, pick_dtype, set_threads
    from llama.core.tokenizer import TokenizerFormatError, TokenizerMismatchError, TokenizerNotFoundError
    from llama.serving.engine import Engine
    from llama.training import lora

    user_errors = (llama.CheckpointError, llama.ConfigError, DeviceError, TokenizerNotFoundError, TokenizerFormatError,
                   TokenizerMismatchError, llama.distributed.TensorParallelError, kernels.UnsupportedModelError, OSError)  # fmt: skip
    if args.quantize != "none":
        try:
            llama.quantization.check_mode(args.quantize, args.group_size)
        except ValueError as e:
            parser.error(str(e))
    try:
        import llama.serving.app  # noqa: F401  (serve() uses it: FastAPI and uvicorn are an extra)
    except ImportError as e:
        print(f"error: the server needs FastAPI and uvicorn: pip install -e '.[serve]' ({e})", file=sys.stderr)
        return 2

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tp = llama.distributed.start(args.tp)
        single = [flag for flag, given in (("--quantize", args.quantize != "none"), ("--lora", args.lora),
                                           ("--rope-scaling", args.rope_scaling is not None),
                                           ("--kv-cache-dtype", args.kv_cache_dtype is not None),
                                           ("--prefix-cache-tokens", args.prefix_cache_tokens),
                                           ("--compile", args.compile)) if given]  # fmt: skip
        if tp > 1 and single:
            raise llama.distributed.TensorParallelError(f"{single[0]} runs in one process only, not with --tp / under "
                                                        "torchrun")  # fmt: skip
        device = llama.distributed.device() if tp > 1 else pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        if device.type == "cpu":
            set_threads(args.threads or idle_threads())
        checkpoint = args.checkpoint or weights.BUNDLED_MODEL
        started = time.perf_counter()
        quantize = None if args.quantize == "none" else args.quantize

        def setup():
            with llama.distributed.together():  # a rank that fails (a busy port, a missing file) stops them all
                if tp > 1 and rank == 0:
                    check_port(args.host, args.port)
                if tp > 1:
                    model = llama.distributed.load(checkpoint, dtype=dtype, device=device)
                else:
                    model = llama.load(checkpoint, dtype=dtype, device=device, quantize=quantize,
                                       group_size=args.group_size, kv_cache_dtype=args.kv_cache_dtype,
                                       rope_scaling=args.rope_scaling)  # fmt: skip
                for name, directory in adapters:
                    lora.load_adapter(model, directory, name)
                if args.kernels:  # quantized projections fuse too (kernels.fusable); those under adapters do not
                    fuse = {"fuse_qkv": False, "fuse_gate_up": False} if args.lora else kernels.fusable(model)
                    kernels.optimize(model, **fuse, int8_activations=args.int8_activations)
                return model, llama.load_tokenizer(checkpoint)

        # The model's work runs on the engine's thread; this one only serves HTTP. Setup runs on a thread
        # that ends, and this one keeps to one torch thread, so that the engine's CPU threads are the
        # only ones (in_passing_thread says why that matters).
        model, tokenizer = in_passing_thread(setup)
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        llama.distributed.follow(model)  # until rank 0's server stops
        return 0
    # Under tp the engine drives a Leader: each model call is first sent to the other ranks, which run it too.
    driver = llama.distributed.Leader(model) if tp > 1 else model
    engine = None
    try:
        try:
            prefix_cache_tokens = 0 if tp > 1 else 2048 if args.prefix_cache_tokens is None else args.prefix_cache_tokens
            engine = in_passing_thread(lambda: Engine(
                driver, tokenizer, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                max_queue=args.max_queue, max_prefill_tokens=args.max_prefill_tokens,
                prefill_chunk=args.prefill_chunk or None, prefill_patience=args.prefill_patience,
                prefix_cache_tokens=prefix_cache_tokens, compile=args.compile))  # fmt: skip
        except (*user_errors, ValueError) as e:  # ValueError: a combination the engine does not support, named
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.compile:
            print("[compiling the decode step with torch.compile: tens of seconds to minutes ...]", file=sys.stderr,
                  flush=True)  # fmt: skip
            print(f"[compiled the decode step in {in_passing_thread(engine.warm_up):.1f} s]", file=sys.stderr,
                  flush=True)  # fmt: skip
        torch.set_num_threads(1)  # (the engine thread sets its own: engine.threads)
        if tp > 1:
            # uvicorn handles SIGTERM (a graceful shutdown), then raises it again once it has shut down; the
            # default action would end this process there, before the followers are released below.
            signal.signal(signal.SIGTERM, lambda *_: None)
        status = serve(args, engine, model, checkpoint, api_key, key_source, started, dtype, device)
    finally:
        if tp > 1:
            if engine is not None:
                engine.stop()  # (the app has stopped it already: no model call may follow the stop below)
            driver.stop()  # release the followers
    return status


def serve(args, engine, model, checkpoint, api_key, key_source, started, dtype, device) -> int:
    """Log what is served and run the HTTP server until SIGTERM or Ctrl-C; returns the exit status."""
    from llama.serving.app import create_app, run_server

    name = args.served_model_name or Path(checkpoint).resolve().name
    if name in engine.adapters:
        print(f"error: --lora {name}: the base model is served under that name; choose another "
              "(or --served-model-name)", file=sys.stderr)  # fmt: skip
        return 2
    log = logging.getLogger("llama.serving.app")
    log.info(
        "loaded %s in %.1f s: %s parameters, %s, %s%s%s; %d slots x %d positions, KV cache %.1f MB %s; serving as %r "
        "on http://%s:%d",
        checkpoint, time.perf_counter() - started, f"{model.config.n_params / 1e6:.1f} M",
        str(dtype).removeprefix("torch."), device, f", {engine.threads} threads" if device.type == "cpu" else "",
        "" if model.config.rope_scaling is None else f", {model.config.rope_scaling.kind} RoPE scaling "
        f"x{model.config.rope_scaling.factor:g} (context {model.config.max_seq_len})",
        engine.max_batch_size, engine.context_len, model.cache.nbytes / 1e6, model.cache.kv_cache_dtype, name, args.host,
        args.port,
    )  # fmt: skip
    log.info("schedule: %s; prefix cache %s; decode step %s",
             f"prefill {engine.prefill_chunk} tokens per step between decode steps" if engine.prefill_chunk
             else "whole prompts before the next decode step",
             f"{engine.prefixes.n_blocks * engine.prefixes.block} tokens, {engine.prefixes.nbytes / 1e6:.1f} MB"
             if engine.prefixes else "off", "compiled" if args.compile else "eager")  # fmt: skip
    if api_key is not None:
        log.info("API key required (from %s): requests need 'Authorization: Bearer <key>'", key_source)
    else:
        log.log(logging.INFO if args.host in ("127.0.0.1", "localhost", "::1") else logging.WARNING,
                "no API key: anyone who can reach %s:%d may use the server (set LLAMA_API_KEY to require one)",
                args.host, args.port)  # fmt: skip
    app = create_app(engine, model_name=name, api_key=api_key, max_body_bytes=args.max_body_size)
    run_server(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    status = main()
    if "llama.distributed" in sys.modules:  # under torchrun: end without torch's C++ teardown (see there)
        sys.modules["llama.distributed"].exit(status)
    sys.exit(status)
