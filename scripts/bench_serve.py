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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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


async def one_request(client: httpx.AsyncClient, body: dict) -> Result:
    body = {**body, "stream": True, "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
    if not times:
        raise RuntimeError("no text came back")
    return Result(times[0] - sent, [b - a for a, b in zip(times, times[1:])], tokens)


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


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, str(SERVE), "--port", str(port), "--max-batch-size", str(max_batch),
            "--dtype", args.dtype, "--device", args.device, "--max-seq-len", str(args.max_seq_len),
            "--log-level", "warning"]  # fmt: skip
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
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", headers=headers, timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"the server did not answer /health within {args.startup_timeout} s")


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
    args = p.parse_args(argv)
    if min(args.concurrency) < 1 or args.rounds < 1 or args.max_tokens < 1:
        p.error("--concurrency, --rounds and --max-tokens must be positive")

    server = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            server, url = start_server(args, max(args.concurrency))
        mix = request_mix(args.max_tokens)
        asyncio.run(run_level(url, args.api_key, 1, 1, [{**mix[0], "max_tokens": 2}]))  # warm-up
        summaries = []
        for c in args.concurrency:
            n_requests = -(-c * args.rounds // len(mix)) * len(mix)  # whole passes over the mix
            level = asyncio.run(run_level(url, args.api_key, c, n_requests, mix))
            if not level.results:
                raise RuntimeError(f"every request failed at concurrency {c}")
            summaries.append(level.summary())
            print(f"concurrency {c}: {summaries[-1]['output_tokens_per_s']:.1f} output tokens/s", file=sys.stderr)
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    print(table(summaries))
    low, high = summaries[0], summaries[-1]
    if len(summaries) > 1:
        gain = high["output_tokens_per_s"] / low["output_tokens_per_s"]
        print(f"\noutput throughput, concurrency {high['concurrency']} over {low['concurrency']}: {gain:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
