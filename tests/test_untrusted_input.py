"""What a client or a file sends can neither kill, stall nor fool the server and the loaders.

One test per case an adversarial review found (issue 15): sampling values that made NaN, seeds that
overflowed, lone surrogates, stop strings that stalled the engine, a request that killed the engine
thread, a 500 that reset its keep-alive connection, an empty API key, requests cut at shutdown, a
tokenizer from another model, and checkpoint or tokenizer files that aliased weights, held integer
keys, could not be read, were malformed or were FIFOs. test_fuzz.py looks for more of the same kind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

import llama
import weights
from llama import CheckpointError, GenerationError, ModelConfig
from llama.core.generation import SamplingParams, apply_repetition_penalty, check_seed, sample
from llama.core.stops import StopMatcher
from llama.core.tokenizer import (
    InvalidTextError,
    TokenizerFormatError,
    TokenizerMismatchError,
    check_text,
    load_tokenizer,
)
from llama.serving.app import MAX_STOP_LENGTH, GracefulServer, create_app
from llama.serving.engine import Engine, Request
from random_models import random_model
from test_serve import (AUTH, KEY, LLAMA3_TOKENIZER, MODEL, Server, SlowModel, checkpoint, error_of,  # noqa: F401
                        tokenizer)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
KJV = weights.BUNDLED_MODEL  # a sentencepiece tokenizer (Llama 2's kind), vocabulary 4096
TINY = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, ffn_dim=32, max_seq_len=64)


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY)


# ---- sampling: tiny or huge values are numerically safe ----------------------------------------------


@pytest.mark.parametrize("sampling", [dict(temperature=1e-300), dict(temperature=1e-40), dict(temperature=5e-324),
                                      dict(temperature=1.0, top_p=1e-300), dict(temperature=1.0, top_p=1e-40)],
                         ids=str)  # fmt: skip
def test_tiny_temperature_or_top_p_is_greedy_not_nan(tiny, sampling):
    prompt = [[1, 5, 9, 2]]
    greedy = llama.generate(tiny, prompt, 12, temperature=0, stop_tokens=[])
    assert llama.generate(tiny, prompt, 12, seed=3, stop_tokens=[], **sampling) == greedy


@pytest.mark.parametrize("penalty", [1e-300, 1e-40, 1e300, 1e40])
def test_extreme_repetition_penalty_samples_finite_distributions(tiny, penalty):
    out = llama.generate(tiny, [[1, 5, 9, 2]], 12, temperature=1.0, top_p=1.0, repetition_penalty=penalty, seed=0,
                         stop_tokens=[])  # fmt: skip
    assert len(out[0]) == 12 and all(0 <= t < TINY.vocab_size for t in out[0])
    logits = torch.randn(2, 50)
    logits[0, 7] = float("-inf")
    seen = torch.rand(2, 50) < 0.5
    penalised = apply_repetition_penalty(logits, seen, penalty)
    assert not penalised.isnan().any() and not (penalised == float("inf")).any()
    assert penalised[0, 7] == float("-inf")  # a masked token stays masked


def test_a_huge_temperature_is_uniform_and_keeps_masked_tokens_out():
    logits = torch.randn(1, 20)
    logits[0, :10] = float("-inf")
    tokens = sample(logits.repeat(400, 1), SamplingParams(temperature=1e300, top_p=1.0), torch.Generator().manual_seed(0))
    assert bool((tokens >= 10).all()) and len(set(tokens.tolist())) == 10  # every allowed one, no masked one


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=10**400), "temperature must be a finite number"),
    (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
    (dict(top_p=None), "top_p must be a number"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0"),
    (dict(min_p=float("nan")), "min_p must be in"),
])  # fmt: skip
def test_sampling_values_that_are_not_finite_numbers_are_refused(tiny, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        llama.generate(tiny, [[1, 2]], 2, **kwargs)


# ---- seeds of any size ----------------------------------------------------------------------------------


def test_seeds_of_any_size_are_taken_modulo_2_to_the_64(tiny):
    def run(seed):
        return llama.generate(tiny, [[1, 2, 3]], 10, temperature=1.0, top_p=1.0, seed=seed, stop_tokens=[])

    assert run(2**64) == run(0)
    assert run(10**30) == run(10**30 % 2**64)
    assert run(-(2**63) - 1) == run(2**64 - 2**63 - 1)
    assert run(-1) == run(2**64 - 1)  # torch's own mapping of negative seeds, kept
    assert check_seed(None) is None


@pytest.mark.parametrize("seed", ["abc", 1.5, True, [1]])
def test_a_seed_that_is_not_an_integer_is_a_generation_error(tiny, seed):
    with pytest.raises(GenerationError, match="seed must be an integer"):
        llama.generate(tiny, [[1, 2]], 2, temperature=1.0, seed=seed)


# ---- text: lone surrogates are refused everywhere ------------------------------------------------


@pytest.mark.parametrize("path", [KJV / "tokenizer.model", LLAMA3_TOKENIZER], ids=["sentencepiece", "tiktoken"])
def test_lone_surrogates_are_refused_by_both_tokenizers(path):
    """Before: sentencepiece raised pybind's RuntimeError, tiktoken silently encoded something else."""
    tok = load_tokenizer(path)
    for text in ["a\ud800b", "\udcff", "ok \udfff"]:
        with pytest.raises(InvalidTextError, match="lone surrogate"):
            tok.encode(text, bos=True, eos=False)
    with pytest.raises(InvalidTextError, match="lone surrogate U\\+D83D"):
        tok.encode_dialog([{"role": "user", "content": "hi \ud83d"}])
    tok.encode("a\U0001f999b", bos=False, eos=False)  # a real pair is fine
    assert check_text("fine") == "fine"


# ---- stop strings: linear in the text ---------------------------------------------------------------


def test_stop_matcher_time_does_not_grow_with_stop_length():
    """16 stop strings of 250,000 characters: each push must cost about what a short stop costs
    (before, one push tested every prefix of every stop: about 0.7 s per stop string per token)."""
    text = "the quick brown fox jumps over the lazy dog " * 50
    for stops in ([f"{i}" + "a" * 249_999 for i in range(16)], ["a" * 249_999 + "b"] * 16):
        matcher = StopMatcher(stops)
        started = time.perf_counter()
        shown = "".join(matcher.push(text[i : i + 4])[0] for i in range(0, len(text), 4))
        elapsed = time.perf_counter() - started
        assert shown + matcher.push("", final=True)[0] == text
        assert elapsed < 1.0, f"{elapsed:.2f} s for {len(text) // 4} pushes"
    # a text that follows a long stop string for a long time, then completes it
    matcher = StopMatcher(["a" * 100_000 + "b"])
    started = time.perf_counter()
    pieces = [matcher.push("a" * 1000) for _ in range(100)] + [matcher.push("bc")]
    assert time.perf_counter() - started < 1.0
    assert pieces[-1] == ("", True) and all(p == ("", False) for p in pieces[:-1])


def test_stop_matcher_cuts_at_the_earliest_stop_and_holds_back_prefixes():
    matcher = StopMatcher(["bcd", "abcdef"])
    assert matcher.push("xxab") == ("xx", False)  # "ab" may start "abcdef"
    assert matcher.push("cdef") == ("", True)  # both complete: the text ends before the earlier one, "abcdef"
    matcher = StopMatcher(["END"])
    assert matcher.push("the E") == ("the ", False)
    assert matcher.push("Nd") == ("ENd", False)
    assert matcher.push(" E", final=True) == (" E", False)


def test_engine_with_16_stop_strings_of_250k_characters_keeps_serving(checkpoint, tokenizer):
    """Bypassing the API's limit on stop length (MAX_STOP_LENGTH): the engine itself is fast."""
    engine = Engine(llama.load(checkpoint), tokenizer, max_batch_size=2)
    engine.start()
    try:
        stops = [f"{i}" * 250_000 for i in range(10)] + [chr(ord("a") + i) * 250_000 for i in range(6)]
        done, deltas = threading.Event(), []

        def sink(i, delta):
            deltas.append(delta)
            if delta.finish_reason:
                done.set()

        started = time.perf_counter()
        engine.submit([Request(tokenizer.encode("Hello", bos=True, eos=False), max_tokens=2, stop=stops)], sink)
        assert done.wait(10)
        assert time.perf_counter() - started < 2.0  # was 21 s
        assert deltas[-1].finish_reason in ("length", "stop") and deltas[-1].error is None
    finally:
        engine.stop()


# ---- the server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(checkpoint, tokenizer):
    """Two slots, 20 ms per forward: a long stream stays in flight while other requests come and go."""
    engine = Engine(SlowModel(llama.load(checkpoint), 0.02), tokenizer, max_batch_size=2, max_queue=8)
    with Server(create_app(engine, model_name=MODEL, api_key=KEY)) as s:
        yield s


def post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json=body, headers=AUTH, timeout=30, **kwargs)


@pytest.mark.parametrize("path, body", [
    ("completions", {"prompt": "Hi", "max_tokens": 6, "temperature": 1e-300}),
    ("completions", {"prompt": "Hi", "max_tokens": 6, "temperature": 1e-40}),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "top_p": 1e-300}),
    ("completions", {"prompt": "Hi", "max_tokens": 6, "temperature": 1, "repetition_penalty": 1e-300}),
])  # fmt: skip
def test_tiny_sampling_values_neither_fail_nor_kill_the_engine(slow_server, path, body):
    """Before: a 500, the engine thread dead, a concurrent stream cut, /health 503 until a restart."""
    other = {"prompt": "A long story", "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.Client(base_url=slow_server.url, headers=AUTH, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=other) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # it is running
            response = http.post(f"/v1/{path}", json=body)
            assert response.status_code == 200, response.text
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
    greedy = post(slow_server, path, {**body, "temperature": 0, "top_p": 1, "repetition_penalty": 1}).json()
    pick = (lambda r: r["choices"][0]["text"]) if path == "completions" else (lambda r: r["choices"][0]["message"]["content"])
    if body.get("repetition_penalty") is None:
        assert pick(response.json()) == pick(greedy)  # tiny temperature or top_p: greedy
    assert slow_server.health()["state"] == "running"


@pytest.mark.parametrize("seed, same_as", [(2**64, 0), (10**30, 10**30 % 2**64), (-(2**63) - 1, 2**63 - 1)])
def test_seeds_of_any_size_are_accepted_by_the_api(slow_server, seed, same_as):
    body = {"prompt": "Once", "max_tokens": 8, "temperature": 1.0, "n": 2}
    got = post(slow_server, "completions", {**body, "seed": seed})
    assert got.status_code == 200, got.text
    want = post(slow_server, "completions", {**body, "seed": same_as}).json()
    assert [c["text"] for c in got.json()["choices"]] == [c["text"] for c in want["choices"]]


@pytest.mark.parametrize("path, body, param", [
    ("completions", {"prompt": "a\ud800b"}, "prompt"),
    ("completions", {"prompt": ["fine", "\udcff"]}, "prompt"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}]}, "messages"),
    ("completions", {"prompt": "hi", "model": "\ud800"}, "model"),
    ("completions", {"prompt": "hi", "stop": ["\ud800"]}, "stop"),
])  # fmt: skip
def test_lone_surrogates_in_a_request_are_a_400(slow_server, path, body, param):
    raw = json.dumps({**body, "max_tokens": 2}).encode()  # ensure_ascii: "\ud800" escapes, valid JSON
    response = httpx.post(f"{slow_server.url}/v1/{path}", content=raw, timeout=30,
                          headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    error = error_of(response, 400)
    assert error["param"] == param and "lone surrogate" in error["message"], error


def test_limits_on_stop_strings_and_sizes_are_400s(slow_server):
    cases = [
        ({"prompt": "hi", "stop": ["x" * (MAX_STOP_LENGTH + 1)]}, "stop", "at most 1024 characters"),
        ({"prompt": "hi", "stop": ["x" * 250_000] * 16}, "stop", "at most 1024 characters"),
        ({"prompt": "hi", "stop": ["x"] * 17}, "stop", "at most 16 stop strings"),
        ({"prompt": "hi", "logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias", "at most 300"),
        ({"prompt": ["hi"] * 129}, "prompt", "at most 128 prompts"),
        ({"prompt": ["hi"] * 6, "n": 2}, "n", "exceed this server's capacity of 10"),
        ({"prompt": "hi", "temperature": float("nan")}, "temperature", "finite number"),
        ({"prompt": "hi", "repetition_penalty": float("inf")}, "repetition_penalty", "finite number"),
    ]
    for body, param, message in cases:
        response = httpx.post(f"{slow_server.url}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                              content=json.dumps(body).encode(), timeout=30)  # fmt: skip
        error = error_of(response, 400)
        assert error["param"] == param and message in error["message"], (body, error)


class BrokenTokenizer:
    """The real tokenizer, except that encoding "boom" raises: a stand-in for any bug behind a request."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, **kwargs):
        if text == "boom":
            raise RuntimeError("a bug")
        return self.inner.encode(text, **kwargs)


def test_a_500_leaves_the_keep_alive_connection_usable(checkpoint, tokenizer):
    engine = Engine(llama.load(checkpoint), BrokenTokenizer(tokenizer), max_batch_size=1)
    with Server(create_app(engine, model_name=MODEL)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            stream = sock.makefile("rb")
            for prompt, status in (("boom", 500), ("fine", 200), ("boom", 500), ("fine", 200)):
                body = json.dumps({"prompt": prompt, "max_tokens": 2}).encode()
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                head = stream.readline()
                assert head.startswith(b"HTTP/1.1 %d" % status), head
                headers = {}
                while (line := stream.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                payload = json.loads(stream.read(int(headers["content-length"])))
                assert headers.get("connection") != "close"
                if status == 500:
                    assert set(payload["error"]) == {"message", "type", "param", "code"}
                    assert payload["error"]["type"] == "server_error"
        assert server.health()["state"] == "running"


def test_a_bug_mid_stream_ends_the_stream_with_an_error_event_and_done(checkpoint, tokenizer):
    class NoTokenBytes(BrokenTokenizer):  # logprobs need token_bytes: it fails, after the stream began
        def token_bytes(self, token_id):
            raise RuntimeError("a bug")

    engine = Engine(llama.load(checkpoint), NoTokenBytes(tokenizer), max_batch_size=1)
    with Server(create_app(engine, model_name=MODEL)) as server:
        body = {"prompt": "Hi", "max_tokens": 4, "stream": True, "logprobs": 2}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "server_error"
        assert server.health()["state"] == "running"


def test_engine_survives_a_failing_request_and_serves_the_others(checkpoint, tokenizer):
    """A tokenizer that cannot decode one token: that request alone ends, with an error."""

    class Undecodable:
        def push(self, token_id):
            raise ValueError("undecodable")

    class FailsOnDecode:  # the real tokenizer, but a prompt ending in id 2 gets a decoder that fails
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def stream_decoder(self, prompt=()):
            return Undecodable() if prompt[-1] == 2 else self.inner.stream_decoder(prompt)

    engine = Engine(llama.load(checkpoint), FailsOnDecode(tokenizer), max_batch_size=2)
    engine.start()
    try:
        deltas = {0: [], 1: []}
        done = threading.Event()

        def sink(i, delta):
            deltas[i].append(delta)
            if all(d and d[-1].finish_reason for d in deltas.values()):
                done.set()

        engine.submit([Request([1, 2], max_tokens=5), Request([1, 3], max_tokens=5, stop_tokens=frozenset())], sink)
        assert done.wait(30)
        assert deltas[0][-1].finish_reason == "error" and "undecodable" in deltas[0][-1].error
        assert deltas[1][-1].finish_reason == "length" and deltas[1][-1].stats.completion_tokens == 5
        assert engine.state == "running" and engine.stats()["running"] == 0
    finally:
        engine.stop()


# ---- graceful shutdown --------------------------------------------------------------------------------


def test_shutdown_lets_running_requests_finish_and_ends_the_rest_with_errors(checkpoint, tokenizer, caplog):
    """One slot, 20 ms per token, a 1.5 s grace period: a short running stream finishes; queued
    streams end with an error event and [DONE]; queued non-streamed requests get a 503 error object."""
    engine = Engine(SlowModel(llama.load(checkpoint), 0.02), tokenizer, max_batch_size=1, max_queue=8)
    server = DrainingServer(create_app(engine, model_name=MODEL), engine, grace=1.5)
    caplog.set_level(logging.INFO)
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own logging setup may stop them propagating
        logging.getLogger(name).addHandler(caplog.handler)

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:

            async def stream(max_tokens):
                body = {"prompt": "Once", "max_tokens": max_tokens, "temperature": 0, "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    return response.status_code, [line async for line in response.aiter_lines() if line.startswith("data: ")]

            async def plain():
                response = await http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 150})
                return response.status_code, response.json()

            running = asyncio.create_task(stream(20))
            while engine.stats()["running"] == 0:
                await asyncio.sleep(0.01)
            queued = [asyncio.create_task(stream(150)) for _ in range(3)] + [asyncio.create_task(plain()) for _ in range(2)]
            while engine.stats()["waiting"] < 5:
                await asyncio.sleep(0.01)
            server.server.should_exit = True  # what SIGTERM does
            return await running, await asyncio.gather(*queued)

    with server:
        started = time.monotonic()
        (status, events), queued = asyncio.run(scenario())
    assert time.monotonic() - started < 10
    assert status == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"  # it finished
    for status, result in queued[:3]:
        assert status == 200 and result[-1] == "data: [DONE]"
        error = json.loads(result[-2].removeprefix("data: "))["error"]
        assert error["code"] == "server_shutting_down", error
    for status, body in queued[3:]:
        assert status == 503 and body["error"]["code"] == "server_shutting_down", body
    assert engine.state == "stopped"
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage() or "Cancel" in r.getMessage()]


class DrainingServer(Server):
    """Server, with llama.serving.app's GracefulServer (as scripts/serve.py runs it)."""

    def __init__(self, app, engine, grace: float):
        import uvicorn

        super().__init__(app)
        config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=grace + 5)
        self.server = GracefulServer(config, engine, grace)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)


def test_while_draining_new_requests_get_503_and_health_says_so(checkpoint, tokenizer):
    engine = Engine(llama.load(checkpoint), tokenizer, max_batch_size=1)
    with Server(create_app(engine, model_name=MODEL)) as server:
        engine.drain(30)
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, timeout=30)
        assert error_of(response, 503)["code"] == "server_shutting_down"
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "draining"


# ---- the API key ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", " ", " key"])
def test_an_empty_api_key_is_refused(checkpoint, tokenizer, key):
    engine = Engine(llama.load(checkpoint), tokenizer, max_batch_size=1)
    with pytest.raises(ValueError, match="API key must be a non-empty string"):
        create_app(engine, model_name=MODEL, api_key=key)


def test_an_empty_bearer_token_is_refused(slow_server):
    for value in ("Bearer", "bearer", f"Basic {KEY}", f"Bearer{KEY}"):  # (a trailing space is stripped in transit)
        response = httpx.get(f"{slow_server.url}/v1/models", headers={"Authorization": value}, timeout=30)
        assert error_of(response, 401)["code"] == "invalid_api_key"


# ---- a tokenizer from another model ----------------------------------------------------------------


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_at_load(tiny, tokenizer):
    with pytest.raises(TokenizerMismatchError, match="128256 tokens but the model's embedding only 64 rows"):
        Engine(tiny, tokenizer)
    with pytest.raises(TokenizerMismatchError, match="128256 tokens"):
        llama.Llama(tiny, tokenizer)
    llama.Llama(random_model(TINY.replace(vocab_size=4096)), load_tokenizer(KJV))  # equal sizes: fine


# ---- loaders: files that alias, mislead, block or cannot be read ----------------------------------------------


@pytest.fixture
def hf(tmp_path) -> Path:
    path = tmp_path / "hf"
    llama.save(random_model(TINY), path)
    return path


def rewrite_header(file: Path, edit) -> None:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    file.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])  # offsets count from the header's end


def test_safetensors_tensors_sharing_bytes_are_refused_like_the_reference_library(hf):
    file = hf / "model.safetensors"

    def alias(header):  # the output norm reads the first bytes of another tensor of its size
        other = next(k for k, v in header.items() if k != "model.norm.weight" and k != "__metadata__"
                     and v["data_offsets"][0] == 0)  # fmt: skip
        begin = header[other]["data_offsets"][0]
        size = header["model.norm.weight"]["data_offsets"][1] - header["model.norm.weight"]["data_offsets"][0]
        header["model.norm.weight"]["data_offsets"] = [begin, begin + size]

    rewrite_header(file, alias)
    with pytest.raises(SafetensorError):  # the reference refuses it
        safe_open(str(file), "pt")
    before = file.read_bytes()
    with pytest.raises(CheckpointError, match="tensor '.*' at bytes .* overlaps the tensor before it"):
        llama.load(hf)
    assert file.read_bytes() == before


def test_safetensors_with_a_gap_or_trailing_bytes_is_refused(hf):
    file = hf / "model.safetensors"
    file.write_bytes(file.read_bytes() + b"\0" * 16)
    with pytest.raises(SafetensorError):
        safe_open(str(file), "pt")
    with pytest.raises(CheckpointError, match="the tensors take .* bytes of data, but the file holds"):
        llama.load(hf)


def test_safetensors_entries_of_the_wrong_types_are_refused(hf):
    file = hf / "model.safetensors"
    for bad in ({"shape": [-1, -32]}, {"shape": [16.0]}, {"shape": [True] * 16}, {"data_offsets": [0, 64.0]},
                {"data_offsets": [64, 0]}):  # fmt: skip
        copy = hf.parent / f"bad{len(list(hf.parent.iterdir()))}"
        shutil.copytree(hf, copy)
        rewrite_header(copy / "model.safetensors", lambda h: h["model.norm.weight"].update(bad))
        with pytest.raises(CheckpointError, match="corrupt header entry for tensor 'model.norm.weight'"):
            llama.load(copy)


def test_meta_checkpoint_with_an_integer_key_is_refused(tmp_path):
    path = tmp_path / "meta"
    llama.save(random_model(TINY), path, format="meta")
    shard = torch.load(path / "consolidated.00.pth", weights_only=True)
    shard[7] = torch.zeros(2)
    torch.save(shard, path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: expected a dict of tensors by name; keys \[7\]"):
        llama.load(path)


@pytest.mark.parametrize("content, message", [
    (os.urandom(2000), "not UTF-8|malformed JSON"),
    (b"not json at all", "malformed JSON"),
    (b"[1, 2, 3]", "expected a JSON object with a BPE 'model'"),
    (b'{"model": [1]}', "expected a JSON object with a BPE 'model'"),
    (b'{"model": {"type": "BPE", "vocab": {"a": "zero"}}}', "token 'a' has id 'zero'"),
    (b'{"model": {"type": "BPE", "vocab": {"a": 1.5}}}', "token 'a' has id 1.5"),
    (b'{"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": {"x": 1}}', "'added_tokens' must be a list"),
    (b'{"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": [{"content": "x", "id": [1]}]}',
     "'added_tokens' must be a list"),
    (b'{"model": {"type": "BPE", "vocab": {"a": 0, "b": 0}}, "added_tokens": [{"content": "<|begin_of_text|>", "id": 1},'
     b' {"content": "<|end_of_text|>", "id": 2}]}', "id 0 is given to two tokens"),
    (b"[" * 100_000, "malformed JSON"),
])  # fmt: skip
def test_malformed_tokenizer_json_is_a_tokenizer_format_error(tmp_path, content, message):
    file = tmp_path / "tokenizer.json"
    file.write_bytes(content)
    with pytest.raises(TokenizerFormatError, match=message):
        load_tokenizer(tmp_path)


def test_malformed_tiktoken_files_are_refused_before_tiktoken_panics(tmp_path):
    import base64

    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    cases = {
        "duplicate rank": lines + [f"{base64.b64encode(b'ab').decode()} 5"],
        "a gap": lines + [f"{base64.b64encode(b'ab').decode()} 1000"],
        "a byte missing": lines[1:] + [f"{base64.b64encode(b'ab').decode()} 0"],
        "a negative rank": lines + [f"{base64.b64encode(b'ab').decode()} -1"],
    }
    messages = {"duplicate rank": "id 5 is given to two tokens", "a gap": "without gaps", "a byte missing": "single byte",
                "a negative rank": "has id -1"}  # fmt: skip
    for name, content in cases.items():
        (tmp_path / "tokenizer.model").write_text("\n".join(content) + "\n")
        with pytest.raises(TokenizerFormatError, match=messages[name]):
            load_tokenizer(tmp_path)


def call_or_unblock(fn, fifo: Path, timeout: float = 10.0):
    """fn() in a thread; if it blocks on `fifo` for `timeout` seconds, a writer end is opened and closed
    (the reader sees end of file) so the thread ends, and the test fails."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (reported below)
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return result


@pytest.mark.parametrize("layout, name", [("hf", "model.safetensors"), ("hf", "config.json"), ("meta", "params.json"),
                                          ("meta", "consolidated.00.pth")])  # fmt: skip
def test_a_fifo_in_a_checkpoint_is_refused_without_hanging(tmp_path, layout, name):
    path = tmp_path / layout
    llama.save(random_model(TINY), path, format=layout)
    (path / name).unlink()
    os.mkfifo(path / name)
    result = call_or_unblock(lambda: llama.load(path), path / name)
    assert isinstance(result.get("error"), CheckpointError), result
    assert f"{path / name}: cannot read: not a regular file (a FIFO)" in str(result["error"])


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json", "generation_config.json"])
def test_a_fifo_as_a_tokenizer_file_is_refused_without_hanging(tmp_path, name):
    if name == "generation_config.json":
        shutil.copy(KJV / "tokenizer.model", tmp_path / "tokenizer.model")
    os.mkfifo(tmp_path / name)
    result = call_or_unblock(lambda: load_tokenizer(tmp_path), tmp_path / name)
    assert isinstance(result.get("error"), TokenizerFormatError), result
    assert "not a regular file (a FIFO)" in str(result["error"])


def test_a_directory_where_a_file_belongs_is_refused(tmp_path):
    path = tmp_path / "hf"
    llama.save(random_model(TINY), path)
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read: is a directory"):
        llama.load(path)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").mkdir()
    with pytest.raises(TokenizerFormatError, match="tokenizer.model: cannot read: is a directory"):
        load_tokenizer(tmp_path / "tok")


UNPRIVILEGED_PROBE = """
import sys
from pathlib import Path
import llama
from llama import CheckpointError
from llama.core.tokenizer import TokenizerFormatError, load_tokenizer
for target, call in [("config", lambda: llama.load(sys.argv[1])), ("directory", lambda: llama.load(sys.argv[2])),
                     ("tokenizer", lambda: load_tokenizer(sys.argv[3])), ("tokenizer-dir", lambda: load_tokenizer(sys.argv[2]))]:
    try:
        call()
        print(target, "loaded")
    except (CheckpointError, TokenizerFormatError) as e:
        print(target, type(e).__name__, e)
"""


def test_unreadable_files_and_directories_are_errors_naming_them(tmp_path):
    """chmod 000: run as a user the permissions apply to (root without its capabilities, via setpriv)."""
    readable = tmp_path / "readable"
    llama.save(random_model(TINY.replace(vocab_size=4096)), readable)
    shutil.copy(KJV / "tokenizer.model", readable / "tokenizer.model")
    locked_config, locked_dir = tmp_path / "locked-config", tmp_path / "locked-dir"
    shutil.copytree(readable, locked_config)
    shutil.copytree(readable, locked_dir)
    (locked_config / "config.json").chmod(0)
    (locked_config / "tokenizer.model").chmod(0)
    locked_dir.chmod(0)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root, and setpriv (to drop root's capabilities) is not installed")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    try:
        result = subprocess.run([*prefix, sys.executable, "-c", UNPRIVILEGED_PROBE, str(locked_config), str(locked_dir),
                                 str(locked_config / "tokenizer.model")], capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    finally:
        locked_dir.chmod(0o755)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["config"].startswith(f"CheckpointError {locked_config / 'config.json'}: cannot read: Permission denied")
    assert lines["directory"].startswith(f"CheckpointError {locked_dir}: cannot read the directory: Permission denied")
    assert lines["tokenizer"].startswith(f"TokenizerFormatError {locked_config / 'tokenizer.model'}: cannot read: "
                                         "Permission denied")  # fmt: skip
    assert lines["tokenizer-dir"].startswith(f"TokenizerFormatError {locked_dir}: cannot read: Permission denied")


# ---- the scripts: user errors exit 2 with "error: ...", and nothing else fails ------------------------------


def run_script(name: str, *args, stdin: bytes | None = None, env: dict | None = None, timeout: float = 180):
    argv = [sys.executable, str(SCRIPTS / name), *(a if isinstance(a, bytes) else str(a) for a in args)]
    result = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})})  # fmt: skip
    return result.returncode, result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory) -> Path:
    """A 64-token model beside the Llama 3 tokenizer (128,256 tokens)."""
    path = tmp_path_factory.mktemp("mismatched")
    llama.save(random_model(TINY), path)
    shutil.copy(LLAMA3_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def aliased(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("aliased") / "hf"
    llama.save(random_model(TINY), path)
    file = path / "model.safetensors"
    rewrite_header(file, lambda h: h["model.norm.weight"].update(
        data_offsets=[0, h["model.norm.weight"]["data_offsets"][1] - h["model.norm.weight"]["data_offsets"][0]]))
    return path


FAST = ["--no-kernels", "--dtype", "float32", "--device", "cpu"]  # no native kernels to build on first use
GENERATE = ["--max-new-tokens", 8, *FAST, "--prompt", "And God said"]
SCRIPT_ERRORS = {  # name -> (script, arguments, stdin, environment, what the error line must say)
    "generate-invalid-utf8-prompt": ("generate.py", ["--prompt", b"And \xff\xfe God", "--max-new-tokens", 4, *FAST], None,
                                     None, "--prompt is not valid Unicode"),
    "generate-invalid-utf8-stdin": ("generate.py", ["--prompt-file", "-", "--max-new-tokens", 4, *FAST], b"And \xff God",
                                    None, "not valid Unicode|not UTF-8|can't decode"),
    "generate-mismatched-tokenizer": ("generate.py", ["--checkpoint", "{mismatched}", "--max-new-tokens", 4, *FAST], None,
                                      None, "the tokenizer has 128256 tokens but the model's embedding only 64 rows"),
    "perplexity-mismatched-tokenizer": ("perplexity.py", ["--checkpoint", "{mismatched}", "--text-file", KJV / "README.md"],
                                        None, None, "the tokenizer has 128256 tokens"),
    "serve-mismatched-tokenizer": ("serve.py", ["--checkpoint", "{mismatched}", "--port", 1, *FAST], None, None,
                                   "the tokenizer has 128256 tokens"),
    "serve-empty-api-key": ("serve.py", ["--api-key", ""], None, None, "--api-key is empty"),
    "serve-empty-api-key-variable": ("serve.py", [], None, {"LLAMA_API_KEY": ""}, "LLAMA_API_KEY is empty"),
    "convert-aliased-tensors": ("convert.py", ["{aliased}", "{out}", "--to", "meta"], None, None, "overlaps the tensor"),
}  # fmt: skip
SCRIPT_RUNS = {  # name -> (script, arguments): each must exit 0
    "generate-greedy": ("generate.py", [*GENERATE, "--temperature", 0]),
    "generate-temperature-1e-300": ("generate.py", [*GENERATE, "--temperature", "1e-300"]),
    "generate-top-p-and-penalty-1e-300": ("generate.py", [*GENERATE, "--temperature", 1, "--top-p", "1e-300",
                                                          "--repetition-penalty", "1e-300"]),
    "generate-seed-2**64": ("generate.py", [*GENERATE, "--temperature", 1, "--seed", 2**64]),
    "generate-seed-0": ("generate.py", [*GENERATE, "--temperature", 1, "--seed", 0]),
}


@pytest.fixture(scope="module")
def script_runs(mismatched, aliased, tmp_path_factory) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path_factory.mktemp("convert") / "out"
    where = {"{mismatched}": mismatched, "{aliased}": aliased, "{out}": out}
    jobs = {name: (script, [where.get(a, a) if isinstance(a, str) else a for a in args], stdin, env)
            for name, (script, args, stdin, env, _) in SCRIPT_ERRORS.items()}  # fmt: skip
    jobs |= {name: (script, args, None, None) for name, (script, args) in SCRIPT_RUNS.items()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_script, script, *args, stdin=stdin, env=env)
                   for name, (script, args, stdin, env) in jobs.items()}  # fmt: skip
        results = {name: future.result() for name, future in futures.items()}
    assert not out.exists(), "convert.py wrote an output for a corrupt source"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPT_ERRORS))
def test_script_user_errors_exit_2_with_an_error_line(script_runs, name):
    code, _, stderr = script_runs[name]
    assert code == 2 and "Traceback" not in stderr, stderr
    line = next((line for line in stderr.splitlines() if line.startswith("error:") or ": error:" in line), "")
    assert re.search(SCRIPT_ERRORS[name][-1], line), stderr


@pytest.mark.slow
def test_scripts_take_tiny_sampling_values_and_seeds_of_any_size(script_runs):
    for name, (code, _, stderr) in script_runs.items():
        if name in SCRIPT_RUNS:
            assert code == 0 and "Traceback" not in stderr, (name, stderr)
    text = {name: script_runs[name][1] for name in SCRIPT_RUNS}
    assert text["generate-temperature-1e-300"] == text["generate-greedy"]
    assert text["generate-seed-2**64"] == text["generate-seed-0"]


@pytest.mark.slow
def test_serve_script_says_whether_a_key_is_required_and_shuts_down_gracefully(checkpoint, tmp_path):
    """The key from LLAMA_API_KEY (not on the command line); SIGTERM with a stream in flight: the stream
    ends with [DONE] (finished, or an error event once --shutdown-timeout is over), the process ends as
    SIGTERM asks (uvicorn re-raises the signal once it has shut down), and no traceback in the log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    argv = [sys.executable, str(SCRIPTS / "serve.py"), "--checkpoint", str(checkpoint), "--port", str(port),
            *FAST, "--max-batch-size", "1", "--served-model-name", MODEL, "--shutdown-timeout", "1"]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, LLAMA_API_KEY=KEY))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers=AUTH, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        body = {"prompt": "Once", "max_tokens": 150, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert process.returncode in (0, -signal.SIGTERM), output
    assert rest[-1] == "data: [DONE]", rest[-3:]
    assert "API key required (from LLAMA_API_KEY)" in output
    assert "Traceback" not in output and "Cancel" not in output, output
