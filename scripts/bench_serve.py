"""Benchmark an OpenAI-compatible server under concurrent load: N clients on loopback, a fixed mix.

    python scripts/bench_serve.py --checkpoint path/to/checkpoint            # starts scripts/serve.py
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --api-key KEY  # a server already running

For each concurrency level (default 1, 4, 16), that many clients send streaming completions, each
taking the next request of the level as soon as its previous one is done, until the level's
requests are sent: --rounds per client, rounded up to whole passes over the fixed mix, so every
level sends the same mix. The mix: short, medium and long prompts, each with --max-tokens and
half as many output tokens, greedy, with `ignore_eos` so every request produces exactly that many.
Reported per level: requests/s, output tokens/s, time to first token (request sent -> first text)
and inter-token latency (gaps between streamed text chunks), p50 and p95, then the output
throughput of the highest concurrency over the lowest. The server needs --max-batch-size at least
the highest concurrency for the levels to be comparable; the server this script starts gets that.

Two more scenarios measure the server's schedule (llama/serving/engine.py), on token-id prompts
cut from /tokenize's output to exact lengths:

    python scripts/bench_serve.py --checkpoint DIR --scenario prefix       # the prefix cache
    python scripts/bench_serve.py --checkpoint DIR --scenario interleave --prefill-chunk 256 0

prefix: --rounds pairs of requests, one after the other, each a --system-tokens "system prompt"
plus a distinct 16-token question: a miss (the system prompt rotated by one more token each round,
so no stored block matches) then a hit (the same system prompt every round, stored by a first
request). Reports time to first token of each (p50, p95), their ratio and the cached tokens the
server reported in usage.

interleave: a stream decodes; once it has received 8 chunks, a second request with a
--long-tokens prompt arrives (max_tokens 1). Reported: the long request's time to first token,
the stream's inter-token gaps before it arrived and while it was prefilled (p50 and the largest),
each --rounds times, with one server per --prefill-chunk value (0: prompts prefilled whole before
the next decode step), started one after the other in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

SERVE = Path(__file__).parent / "serve.py"
WORDS = ("the quick brown fox jumps over the lazy dog while a patient llama watches from the hill and counts "
         "the clouds that drift across the evening sky ").split()  # fmt: skip
PROMPT_WORDS = (8, 32, 96)  # short, medium, long prompts


def request_mix(max_tokens: int) -> list[dict]:
    """The fixed mix: every prompt length with the full and the half output length."""
    mix = []
    for n_words in PROMPT_WORDS:
        prompt = " ".join(WORDS[i % len(WORDS)] for i in range(n_words))
        for out in (max_tokens, max(1, max_tokens // 2)):
            mix.append({"prompt": prompt, "max_tokens": out})
    return mix


@dataclass
class Result:
    ttft: float
    gaps: list[float]
    output_tokens: int


@dataclass
class Level:
    concurrency: int
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0

    def summary(self) -> dict:
        ttfts = [r.ttft for r in self.results]
        gaps = [g for r in self.results for g in r.gaps]
        tokens = sum(r.output_tokens for r in self.results)
        return {
            "concurrency": self.concurrency, "requests": len(self.results), "errors": self.errors,
            "wall_s": self.wall, "requests_per_s": len(self.results) / self.wall,
            "output_tokens_per_s": tokens / self.wall,
            "ttft_p50_ms": percentile(ttfts, 50) * 1e3, "ttft_p95_ms": percentile(ttfts, 95) * 1e3,
            "itl_p50_ms": percentile(gaps, 50) * 1e3, "itl_p95_ms": percentile(gaps, 95) * 1e3,
        }  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); nan for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


async def stream_completion(client: httpx.AsyncClient, body: dict, times: list[float],
                            stop: asyncio.Event | None = None) -> tuple[float, dict]:  # fmt: skip
    """POST `body` to /v1/completions, streamed, greedy, EOS ignored, usage included. Appends each text
    chunk's arrival time to `times`; with `stop`, closes the stream (the server cancels it) once it is
    set. Returns (the time it was sent, the usage)."""
    body = {**body, "stream": True, "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent, usage, before = time.perf_counter(), {}, len(times)
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            if any(c.get("text") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
            if stop is not None and stop.is_set():
                break
    if len(times) == before:
        raise RuntimeError("no text came back")
    return sent, usage


async def one_request(client: httpx.AsyncClient, body: dict) -> Result:
    times: list[float] = []
    sent, usage = await stream_completion(client, body, times)
    return Result(times[0] - sent, [b - a for a, b in zip(times, times[1:])], usage.get("completion_tokens", 0))


async def run_level(url: str, api_key: str | None, concurrency: int, n_requests: int, mix: list[dict]) -> Level:
    level = Level(concurrency)
    todo = iter(range(n_requests))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None, limits=limits) as client:

        async def worker():
            for j in todo:  # shared: each worker takes the next request
                body = mix[j % len(mix)]
                try:
                    level.results.append(await one_request(client, body))
                except RuntimeError as e:
                    level.errors += 1
                    print(f"request failed: {e}", file=sys.stderr)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.wall = time.perf_counter() - start
    return level


# ---- the schedule scenarios ------------------------------------------------------------------------


async def token_ids(client: httpx.AsyncClient, n: int, offset: int = 0) -> list[int]:
    """n token ids of filler text (BOS first), as the server's tokenizer encodes it (POST /tokenize);
    `offset` starts the text at another word."""
    words = [WORDS[(offset + i) % len(WORDS)] for i in range(n + 8)]
    ids: list[int] = []
    while len(ids) < n:
        response = await client.post("/tokenize", json={"prompt": " ".join(words)})
        if response.status_code != 200:
            raise RuntimeError(f"POST /tokenize: HTTP {response.status_code}: {response.text[:200]}")
        ids = response.json()["tokens"]
        words += words
    return ids[:n]


async def timed_stream(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, times: list[float] | None = None,
                       stop: asyncio.Event | None = None) -> tuple[float, dict]:  # fmt: skip
    """Stream a completion of `prompt`; returns (time to first text, usage). Appends each text chunk's
    arrival time to `times`; with `stop`, closes the stream once it is set."""
    times = [] if times is None else times
    first = len(times)
    sent, usage = await stream_completion(client, {"prompt": prompt, "max_tokens": max_tokens}, times, stop)
    return times[first] - sent, usage


async def prefix_scenario(url: str, api_key: str | None, rounds: int, system_tokens: int) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None) as client:
        system = await token_ids(client, system_tokens)
        await timed_stream(client, system + system[1:17], 2)  # stores the system prompt's blocks
        miss, hit, cached = [], [], {"miss": 0, "hit": 0}
        for i in range(rounds):
            question = (await token_ids(client, 17, offset=7 * i + 3))[1:]  # without its BOS
            rotated = [system[0]] + system[2 + i :] + system[1 : 2 + i]  # differs from the stored one at position 1
            for kind, prompt, ttfts in (("miss", rotated, miss), ("hit", system, hit)):
                ttft, usage = await timed_stream(client, prompt + question, 4)
                ttfts.append(ttft)
                cached[kind] += usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {"rounds": rounds, "prompt_tokens": system_tokens + 16,
            "ttft_miss_p50_ms": percentile(miss, 50) * 1e3, "ttft_miss_p95_ms": percentile(miss, 95) * 1e3,
            "ttft_hit_p50_ms": percentile(hit, 50) * 1e3, "ttft_hit_p95_ms": percentile(hit, 95) * 1e3,
            "miss_over_hit": percentile(miss, 50) / percentile(hit, 50),
            "cached_tokens_per_miss": cached["miss"] / rounds, "cached_tokens_per_hit": cached["hit"] / rounds}  # fmt: skip


async def interleave_scenario(url: str, api_key: str | None, rounds: int, long_tokens: int, context: int) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    before, during, longest, ttfts = [], [], [], []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None) as client:
        short = await token_ids(client, 8)
        response = await client.post("/tokenize", json={"prompt": "a"})
        context = min(context, response.json().get("max_model_len", context))  # a model of shorter context
        for i in range(rounds):
            long = (await token_ids(client, long_tokens, offset=11 * i + 1))
            times, started, stop = [], asyncio.Event(), asyncio.Event()

            async def stream_a():
                await timed_stream(client, short, context - len(short), times, stop)

            async def request_b():
                while len(times) < 8:  # the stream is running
                    await asyncio.sleep(0.005)
                sent = time.perf_counter()
                ttft, _ = await timed_stream(client, long, 1)
                window = (sent, sent + ttft)
                n = len(times)
                while len(times) < n + 4:  # a few more tokens of the stream after the prefill
                    await asyncio.sleep(0.005)
                stop.set()
                return window, ttft

            _, (window, ttft) = await asyncio.gather(stream_a(), request_b())
            gaps = [(a, b) for a, b in zip(times, times[1:])]
            before += [b - a for a, b in gaps if b <= window[0]][1:]
            inside = [b - a for a, b in gaps if b > window[0] and a < window[1]]  # gaps overlapping the prefill
            during += inside
            longest.append(max(inside))
            ttfts.append(ttft)
    return {"rounds": rounds, "long_prompt_tokens": long_tokens, "long_ttft_p50_ms": percentile(ttfts, 50) * 1e3,
            "itl_before_p50_ms": percentile(before, 50) * 1e3, "itl_during_p50_ms": percentile(during, 50) * 1e3,
            "itl_during_max_ms": max(longest) * 1e3, "stream_tokens_during": len(during) / rounds}  # fmt: skip


def table(summaries: list[dict]) -> str:
    lines = ["| concurrency | requests | requests/s | output tokens/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s in summaries:
        lines.append(
            f"| {s['concurrency']} | {s['requests']} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | "
            f"{s['ttft_p50_ms']:.0f} ms | {s['ttft_p95_ms']:.0f} ms | {s['itl_p50_ms']:.0f} ms | {s['itl_p95_ms']:.0f} ms |"
        )
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args, max_batch: int, prefill_chunk: int | None = None) -> Iterator[str]:
    """The base URL of a server answering /health and warmed up by one short request: --url's, or
    scripts/serve.py started here with these settings (and stopped on leaving, whatever happened).
    A server that exits or stays silent for --startup-timeout seconds raises RuntimeError."""
    if args.url:
        url = args.url.rstrip("/")
        warm_up(url, args.api_key)
        yield url
        return
    port = free_port()
    argv = [sys.executable, str(SERVE), "--port", str(port), "--max-batch-size", str(max_batch),
            "--dtype", args.dtype, "--device", args.device, "--max-seq-len", str(args.max_seq_len),
            "--log-level", "warning"]  # fmt: skip
    if prefill_chunk is not None:
        argv += ["--prefill-chunk", str(prefill_chunk)]
    if args.prefix_cache_tokens is not None:
        argv += ["--prefix-cache-tokens", str(args.prefix_cache_tokens)]
    if args.compile:
        argv += ["--compile"]
    if args.checkpoint:
        argv += ["--checkpoint", args.checkpoint]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.quantize != "none":
        argv += ["--quantize", args.quantize]
    env = dict(os.environ, LLAMA_API_KEY=args.api_key or "")
    if not args.api_key:
        env.pop("LLAMA_API_KEY")
    server = subprocess.Popen(argv, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(server, url, args.api_key, args.startup_timeout)
        warm_up(url, args.api_key)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:  # it ignored SIGTERM
            server.kill()
            server.wait()


def wait_ready(server: subprocess.Popen, url: str, api_key: str | None, timeout: float) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health within {timeout} s")


def warm_up(url: str, api_key: str | None) -> None:
    """One short request, so that the first measured one pays no first-call costs."""
    asyncio.run(run_level(url, api_key, 1, 1, [{**request_mix(2)[0], "max_tokens": 2}]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help="base URL of a running server (without /v1)")
    target.add_argument("--checkpoint", help="start scripts/serve.py on this checkpoint (default: the bundled model)")
    p.add_argument("--api-key", default=None, help="API key to send (and to start the server with)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="client counts to run (default 1 4 16)")
    p.add_argument("--rounds", type=int, default=2, help="requests per client, rounded up to whole passes over the mix of 6 (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens of the long half of the mix (default 64)")
    p.add_argument("--dtype", default="auto", help="server --dtype when this script starts it (default auto)")
    p.add_argument("--device", default="auto", help="server --device when this script starts it (default auto)")
    p.add_argument("--threads", type=int, default=None, help="server --threads when this script starts it")
    p.add_argument("--quantize", default="none", help="server --quantize when this script starts it (default none)")
    p.add_argument("--max-seq-len", type=int, default=512, help="server --max-seq-len when this script starts it (default 512)")
    p.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for the server to load (default 600)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--scenario", choices=["mix", "prefix", "interleave"], default="mix",
                   help="mix: the concurrency levels above; prefix: time to first token with and without a prefix "
                        "cache hit; interleave: a stream's inter-token latency while a long prompt is prefilled "
                        "(default mix)")
    p.add_argument("--prefill-chunk", type=int, nargs="+", default=None,
                   help="server --prefill-chunk when this script starts it; several values only for interleave: "
                        "one server per value, one after the other (default: the server's)")
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="server --prefix-cache-tokens when this script starts it (default: the server's)")
    p.add_argument("--compile", action="store_true", help="server --compile when this script starts it")
    p.add_argument("--system-tokens", type=int, default=200, help="prefix: tokens of the shared system prompt (default 200)")
    p.add_argument("--long-tokens", type=int, default=1024, help="interleave: tokens of the long prompt (default 1024)")
    args = p.parse_args(argv)
    if min(args.concurrency) < 1 or args.rounds < 1 or args.max_tokens < 1:
        p.error("--concurrency, --rounds and --max-tokens must be positive")
    if args.system_tokens < 18 or args.long_tokens < 2:
        p.error("--system-tokens must be at least 18 and --long-tokens at least 2")
    chunks = args.prefill_chunk or [None]
    if len(chunks) > 1 and (args.scenario != "interleave" or args.url):
        p.error("several --prefill-chunk values are for --scenario interleave, with servers this script starts "
                "(not --url)")  # fmt: skip
    if args.scenario == "interleave":
        args.max_seq_len = max(args.max_seq_len, args.long_tokens + 256)
    try:
        if args.scenario == "mix":
            results = mix_levels(args, chunks[0])
        else:
            results = [schedule_scenario(args, chunk) for chunk in chunks]
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.scenario == "mix":
        print(table(results))
        low, high = results[0], results[-1]
        if len(results) > 1:
            gain = high["output_tokens_per_s"] / low["output_tokens_per_s"]
            print(f"\noutput throughput, concurrency {high['concurrency']} over {low['concurrency']}: {gain:.1f}x")
    else:
        keys = list(results[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---:|" * len(keys))
        for r in results:
            print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def mix_levels(args, prefill_chunk: int | None) -> list[dict]:
    """Every --concurrency level against one server: their summaries."""
    mix, summaries = request_mix(args.max_tokens), []
    with serving(args, max(args.concurrency), prefill_chunk) as url:
        for c in args.concurrency:
            n_requests = -(-c * args.rounds // len(mix)) * len(mix)  # whole passes over the mix
            level = asyncio.run(run_level(url, args.api_key, c, n_requests, mix))
            if not level.results:
                raise RuntimeError(f"every request failed at concurrency {c}")
            summaries.append(level.summary())
            print(f"concurrency {c}: {summaries[-1]['output_tokens_per_s']:.1f} output tokens/s", file=sys.stderr)
    return summaries


def schedule_scenario(args, prefill_chunk: int | None) -> dict:
    """The prefix or the interleave scenario against one server (with this --prefill-chunk)."""
    with serving(args, 2, prefill_chunk) as url:
        if args.scenario == "prefix":
            return asyncio.run(prefix_scenario(url, args.api_key, args.rounds, args.system_tokens))
        measured = asyncio.run(interleave_scenario(url, args.api_key, args.rounds, args.long_tokens, args.max_seq_len))
        return {"prefill_chunk": prefill_chunk if prefill_chunk is not None else "default", **measured}


if __name__ == "__main__":
    sys.exit(main())
