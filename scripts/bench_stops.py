"""Time per generated token through the serving engine, with and without very long stop strings.

    python scripts/bench_stops.py                                  # the bundled model, 16 stops x 250,000 chars
    python scripts/bench_stops.py --checkpoint DIR --stops 16 --stop-length 250000 --max-tokens 64

Three requests, each alone in the engine, greedy, stop tokens off (so each runs --max-tokens tokens):
  none       no stop strings: a normal request;
  unrelated  --stops strings of --stop-length characters the text never starts (random letters);
  followed   --stops strings the generated text follows all the way (each is the request's own greedy
             text, padded to --stop-length with a character it never produces): every character is
             held back and every stop string's state advances on every character, the matcher's worst
             case.
The engine is called directly: the HTTP API refuses stop strings longer than MAX_STOP_LENGTH.
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import threading
import time

import llama
import weights
from llama.core.device import set_threads
from llama.core.tokenizer import TokenizerFormatError, TokenizerNotFoundError
from llama.serving.engine import Engine, Request


def run(engine: Engine, prompt: list[int], max_tokens: int, stop: list[str]) -> tuple[str, int, float]:
    """(text, tokens, seconds) of one request, from submit to its last Delta."""
    done, deltas = threading.Event(), []

    def sink(index, delta):
        deltas.append(delta)
        if delta.finish_reason is not None:
            done.set()

    started = time.perf_counter()
    engine.submit([Request(prompt, max_tokens, stop=stop, stop_tokens=frozenset())], sink)
    done.wait()
    seconds = time.perf_counter() - started
    if deltas[-1].error:
        raise RuntimeError(deltas[-1].error)
    return "".join(d.text for d in deltas), sum(len(d.tokens) for d in deltas), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled weights/kjv)")
    p.add_argument("--prompt", default="And God said", help="the prompt (default 'And God said')")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--stops", type=int, default=16, help="stop strings per request (default 16)")
    p.add_argument("--stop-length", type=int, default=250_000, help="characters per stop string (default 250000)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each request; the fastest counts (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = p.parse_args(argv)
    if min(args.max_tokens, args.stops, args.stop_length, args.repeats) < 1:
        p.error("--max-tokens, --stops, --stop-length and --repeats must be at least 1")
    try:
        set_threads(args.threads)
        checkpoint = args.checkpoint or weights.BUNDLED_MODEL
        model = llama.load(checkpoint, dtype="float32")
        tokenizer = llama.load_tokenizer(checkpoint)
        engine = Engine(model, tokenizer, max_batch_size=1)
    except (llama.CheckpointError, llama.ConfigError, TokenizerNotFoundError, TokenizerFormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine.start()
    try:
        prompt = tokenizer.encode(args.prompt, bos=True, eos=False)
        greedy, _, _ = run(engine, prompt, args.max_tokens, [])
        rng = random.Random(0)
        unrelated = ["".join(rng.choices(string.ascii_letters, k=args.stop_length)) for _ in range(args.stops)]
        pad = next(c for c in "\x00\x01\x02\uffff" if c not in greedy)
        followed = [(greedy + pad * args.stop_length)[: max(args.stop_length, len(greedy) + 1)]] * args.stops
        print(f"{checkpoint}: {args.max_tokens} tokens per request, greedy; stop strings: {args.stops} x "
              f"{args.stop_length:,} characters; best of {args.repeats}\n")  # fmt: skip
        print("| stop strings | tokens | ms per token | vs none |\n|---|---:|---:|---:|")
        base = None
        for name, stop in (("none", []), ("unrelated", unrelated), ("followed", followed)):
            best = min((run(engine, prompt, args.max_tokens, stop) for _ in range(args.repeats)), key=lambda r: r[2])
            text, tokens, seconds = best
            assert text == greedy, "the stop strings changed the text"
            per_token = seconds / tokens * 1e3
            base = base or per_token
            print(f"| {name} | {tokens} | {per_token:.2f} | {per_token / base:.2f}x |")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
