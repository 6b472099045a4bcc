"""The OpenAI-compatible server (llama/serving/app.py) and its continuous-batching engine (llama/serving/engine.py).

Servers run in this process (uvicorn in a thread, on a loopback socket bound to a free port) and are
called with the official `openai` client, or with raw httpx where a client would refuse to send the
request. They serve a tiny random float32 checkpoint with the real Llama 3 tokenizer; expected outputs
come from llama.generate on a second copy of the same checkpoint, run alone. Two more engines wrap
the model: one that pauses before every forward (so requests stay in flight long enough to queue up,
be refused or be abandoned) and one that emits a scripted byte sequence (multi-byte characters split
across tokens, stop strings split across tokens).
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import llama
from llama import ModelConfig, Transformer
from llama.serving.app import create_app
from llama.serving.engine import ContextLengthError, Engine, EngineFullError, Request

SCRIPTS = Path(__file__).parents[1] / "scripts"
LLAMA3_TOKENIZER = Path(str(importlib.resources.files("llama_models.llama3") / "tokenizer.model"))
CONTEXT = 192
KEY = "test-key"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=64,
                         max_seq_len=CONTEXT, tie_word_embeddings=True)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:  # large weights: well-separated logits, so greedy never hinges on rounding
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("ckpt")
    llama.save(model, path)
    shutil.copy(LLAMA3_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return llama.load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def ref(checkpoint):
    """A second copy of the model for llama.generate (the engine owns its model's KV cache)."""
    return llama.load(checkpoint)


def expected(ref, prompt_ids: list[int], n: int, **sampling) -> list[int]:
    sampling.setdefault("temperature", 0)
    return llama.generate(ref, [prompt_ids], n, **sampling)[0]


class Server:
    """A uvicorn server for `app` in a background thread, on a loopback port picked by the OS."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def health(self) -> dict:
        response = httpx.get(f"{self.url}/health", headers=AUTH, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["engine"]

    def wait_idle(self, timeout: float = 5.0) -> dict:
        """The engine's counters once nothing runs or waits (fails after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while (stats := self.health())["running"] or stats["waiting"]:
            assert time.monotonic() < deadline, f"the engine is still busy: {stats}"
            time.sleep(0.05)
        return stats


@pytest.fixture(scope="module")
def server(checkpoint, tokenizer):
    engine = Engine(llama.load(checkpoint), tokenizer, max_batch_size=4, max_queue=16)
    with Server(create_app(engine, model_name=MODEL, api_key=KEY, max_body_bytes=64 * 1024)) as s:
        yield s


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


class SlowModel(torch.nn.Module):
    """The model, pausing before every forward: a long request stays in flight for seconds."""

    def __init__(self, model, delay: float):
        super().__init__()
        self.inner, self.delay = model, delay
        self.config, self.tok_embeddings, self.stop_tokens = model.config, model.tok_embeddings, model.stop_tokens

    def setup_cache(self, *args, **kwargs):
        self.inner.setup_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def slow_server(checkpoint, tokenizer):
    """One slot, one queue place, 50 ms per forward."""
    engine = Engine(SlowModel(llama.load(checkpoint), 0.05), tokenizer, max_batch_size=1, max_queue=1)
    with Server(create_app(engine, model_name=MODEL, api_key=KEY)) as s:
        yield s


def error_of(response: httpx.Response, status: int) -> dict:
    """The OpenAI error object of a response, checked for its status and shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ---- the endpoints, against llama.generate ---------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    stats = server.health()
    assert stats["alive"] and stats["max_batch_size"] == 4 and stats["context_len"] == CONTEXT


def test_completion_greedy_equals_generate(client, ref, tokenizer):
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    new = expected(ref, ids, 12)
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert result.object == "text_completion" and result.model == MODEL and result.id.startswith("cmpl-")
    (choice,) = result.choices
    assert choice.text == tokenizer.decode(new)
    assert choice.finish_reason == ("length" if len(new) == 12 else "stop")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), len(new))
    assert result.usage.total_tokens == len(ids) + len(new)


def test_completion_streaming_matches_non_streaming(client, ref, tokenizer):
    prompt = "Once upon a time"
    new = expected(ref, tokenizer.encode(prompt, bos=True, eos=False), 20)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == tokenizer.decode(new)
    assert sum(bool(t) for t in texts) > 1  # it did stream
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(new)


def test_token_id_prompts_and_a_batch_of_prompts(client, ref, tokenizer):
    prompts = ["Hello", "A much longer prompt about llamas and alpacas"]
    ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    result = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.text for c in sorted(result.choices, key=lambda c: c.index)] == [
        tokenizer.decode(expected(ref, i, 6)) for i in ids
    ]
    as_ids = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == result.choices[1].text


def test_chat_greedy_equals_generate_streaming_and_not(client, ref, tokenizer):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a river."}]
    ids = tokenizer.encode_dialog(messages)
    new = expected(ref, ids, 16, stop_tokens=tokenizer.stop_tokens)
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    (choice,) = result.choices
    assert choice.message.role == "assistant" and choice.message.content == tokenizer.decode(new)
    assert result.usage.prompt_tokens == len(ids) and result.usage.completion_tokens == len(new)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))  # fmt: skip
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_stop_strings_cut_the_text_before_them(client, ref, tokenizer):
    prompt = "In the beginning"
    full = tokenizer.decode(expected(ref, tokenizer.encode(prompt, bos=True, eos=False), 30))
    start = next(i for i in range(len(full) // 3, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    stop = full[start : start + 3]
    want = full[: full.find(stop)]
    for stream in (False, True):
        result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0,
                                           stop=[stop, "never seen"], stream=stream)  # fmt: skip
        chunks = list(result) if stream else [result]
        assert "".join(c.choices[0].text for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_reproduces_and_n_samples_use_seed_plus_i(client, ref, tokenizer):
    prompt = "Tell me a story"
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.95,
                                       seed=7, n=2)  # fmt: skip
    texts = [c.text for c in sorted(result.choices, key=lambda c: c.index)]
    for i, text in enumerate(texts):  # each choice equals llama.generate with seed 7 + i
        assert text == tokenizer.decode(expected(ref, ids, 10, temperature=0.9, top_p=0.95, seed=7 + i))
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    assert again.choices[0].text == texts[0]
    assert result.usage.completion_tokens == sum(len(expected(ref, ids, 10, temperature=0.9, top_p=0.95, seed=7 + i))
                                                 for i in range(2))  # fmt: skip


def test_logprobs_are_the_models(client, ref, tokenizer):
    prompt = "Counting: one, two,"
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    new, logprobs = llama.generate(ref, [ids], 5, temperature=0, logprobs=True)
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = result.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(logprobs[0], abs=1e-4)
    assert "".join(lp.tokens) == result.choices[0].text
    for token, top, logprob in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
        assert len(top) in (3, 4) and top[token] == pytest.approx(logprob, abs=1e-6)
        assert max(top.values()) == pytest.approx(logprob, abs=1e-6)  # greedy: the sampled token is the top one

    messages = [{"role": "user", "content": "Hi"}]
    chat_ids = tokenizer.encode_dialog(messages)
    new, logprobs = llama.generate(ref, [chat_ids], 4, temperature=0, logprobs=True)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(logprobs[0], abs=1e-4)
    assert [bytes(c.bytes) for c in content] == [tokenizer.token_bytes(t) for t in new[0]]
    assert all(len(c.top_logprobs) == 2 for c in content)


# ---- continuous batching -------------------------------------------------------------------------


def test_a_dozen_concurrent_requests_match_generate_in_fewer_decode_steps(server, ref, tokenizer):
    """Different prompt and output lengths, streaming and not, all at once on 4 slots (8 wait)."""
    words = "the llama walks slowly across the high plateau under a pale sky".split()
    prompts = [" ".join(words[: 1 + i % len(words)] * (1 + i // 4)) for i in range(12)]
    max_tokens = [4 + 3 * i for i in range(12)]
    wanted = [tokenizer.decode(expected(ref, tokenizer.encode(p, bos=True, eos=False), m))
              for p, m in zip(prompts, max_tokens)]  # fmt: skip
    before = server.wait_idle()

    async def one(aclient, prompt, n, stream):
        if not stream:
            result = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
            return result.choices[0].text, result.usage.completion_tokens
        chunks = [c async for c in await aclient.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True, stream_options={"include_usage": True})]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as aclient:
            return await asyncio.gather(*(one(aclient, p, n, i % 2 == 1) for i, (p, n) in enumerate(zip(prompts, max_tokens))))

    results = asyncio.run(all_at_once())
    assert [text for text, _ in results] == wanted
    after = server.wait_idle()
    steps = after["decode_steps"] - before["decode_steps"]
    one_by_one = sum(n - 1 for _, n in results)  # alone, each needs a decode step per token after the first
    assert after["prefills"] - before["prefills"] == 12
    assert steps < one_by_one * 0.6, (steps, one_by_one)


def test_engine_prefills_arrivals_together_and_decodes_them_together(checkpoint, ref, tokenizer):
    prompts = [tokenizer.encode("word " * (6 + i), bos=True, eos=False) for i in range(4)]  # similar lengths
    engine = Engine(llama.load(checkpoint), tokenizer, max_batch_size=4)
    deltas, done = {i: [] for i in range(4)}, threading.Event()

    def sink(i, delta):  # the engine thread
        deltas[i].append(delta)
        if all(d and d[-1].finish_reason for d in deltas.values()):
            done.set()

    engine.start()
    try:
        engine.submit([Request(p, max_tokens=10, stop_tokens=frozenset()) for p in prompts], sink)
        assert done.wait(30)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        assert [t for d in deltas[i] for t in d.tokens] == expected(ref, p, 10, stop_tokens=[])
        stats = deltas[i][-1].stats
        assert (stats.prompt_tokens, stats.completion_tokens, deltas[i][-1].finish_reason) == (len(p), 10, "length")
    counters = engine.stats()
    assert (counters["prefill_batches"], counters["prefills"], counters["decode_steps"]) == (1, 4, 9)


def test_engine_refuses_what_does_not_fit(checkpoint, tokenizer):
    engine = Engine(llama.load(checkpoint), tokenizer, max_batch_size=1, max_queue=1, max_seq_len=16)
    engine.start()
    try:
        with pytest.raises(ContextLengthError, match="16 tokens"):
            engine.submit([Request([1] * 10, max_tokens=7)], lambda i, d: None)
        with pytest.raises(EngineFullError, match="at most 2"):
            engine.submit([Request([1], max_tokens=2)] * 3, lambda i, d: None)
    finally:
        engine.stop()


# ---- bad input and limits -------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [  # path, body, status, param, code
    ("completions", b'{"prompt": "hi", "max_tokens": 3,', 400, None, "invalid_json"),
    ("completions", b"[1, 2]", 400, None, None),
    ("completions", {"max_tokens": 3}, 400, "prompt", "missing_required_parameter"),
    ("completions", {"prompt": 42}, 400, "prompt", None),
    ("completions", {"prompt": [10**9]}, 400, "prompt", None),
    ("completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature", None),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", None),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),  # 0 only with echo / prompt_logprobs
    ("completions", {"prompt": "hi", "max_tokens": -1, "echo": True}, 400, "max_tokens", None),
    ("completions", {"prompt": "hi", "n": 0}, 400, "n", None),
    ("completions", {"prompt": "hi", "stop": 5}, 400, "stop", None),
    ("completions", {"prompt": "hi", "stop": [""]}, 400, "stop", None),
    ("completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("completions", {"prompt": "hi", "seed": 1.5}, 400, "seed", None),
    ("completions", {"prompt": "hi", "logprobs": 99}, 400, "logprobs", None),
    ("completions", {"prompt": "hi", "suffix": "end"}, 400, "suffix", "unsupported_parameter"),
    ("completions", {"prompt": "hi", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("completions", {"prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs", None),
    ("completions", {"prompt": "hi", "guided_json": {"type": "object"}}, 400, "guided_json", "unknown_parameter"),
    ("completions", {"prompt": "hi", "grammar": "root ::= x"}, 400, "grammar", "unknown_parameter"),
    ("completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias", None),
    ("completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias", None),
    ("completions", {"prompt": "hi", "logit_bias": {"999999999": 1}}, 400, "prompt", None),
    ("completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty", None),
    ("completions", {"prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format", None),
    ("completions", {"prompt": "hi", "response_format": {"type": "json_schema"}}, 400, "response_format", None),
    ("completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "a+"}}}}, 400, "response_format", "unsupported_schema"),
    ("completions", {"prompt": "hi", "max_tokens": 1, "response_format": {"type": "json_object"}}, 400, "prompt", None),
    ("completions", {"prompt": "hi " * 100, "max_tokens": CONTEXT - 50}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("chat/completions", {"messages": []}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages", None),
    ("chat/completions", {"messages": CHAT, "max_tokens": CONTEXT}, 400, "messages", "context_length_exceeded"),
    ("chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("chat/completions", {"messages": CHAT, "temperature": None, "top_p": "x"}, 400, "top_p", None),
    ("chat/completions", {"messages": CHAT, "store": True}, 400, "store", "unknown_parameter"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400, "messages",
     "unknown_parameter"),
    ("chat/completions", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice", None),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                          "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice", None),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, 400,
     "tools", None),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                          "response_format": {"type": "json_object"}}, 400, "response_format", "unsupported_parameter"),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}],
                          "tool_choice": "required"}, 400, "tools", "unsupported_schema"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "4", "tool_call_id": "call_1"}]}, 400, "messages", None),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):
    kwargs = {"content": body, "headers": {**AUTH, "Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": AUTH}  # fmt: skip
    error = error_of(httpx.post(f"{server.url}/v1/{path}", timeout=10, **kwargs), status)
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] == "invalid_request_error"


def test_the_openai_client_raises_its_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=3)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=CONTEXT)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_api_key_is_checked_on_every_request(server):
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, f"{server.url}{path}", headers=headers, json={"prompt": "x"}, timeout=10)
            assert error_of(response, 401)["code"] == "invalid_api_key"


def test_unknown_fields_are_refused_by_name_and_unknown_paths_are_404(server):
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "some_future_field": {"x": 1}, "guided_json": {}, "user": "u1"}
    error = error_of(httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=10), 400)
    assert error["code"] == "unknown_parameter" and error["param"] == "some_future_field"
    assert "some_future_field" in error["message"] and "guided_json" in error["message"]
    nested = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}]}
    error = error_of(httpx.post(f"{server.url}/v1/chat/completions", json=nested, headers=AUTH, timeout=10), 400)
    assert error["code"] == "unknown_parameter" and "messages.0.content.0.cache_control" in error["message"]
    assert error_of(httpx.get(f"{server.url}/v1/nothing", headers=AUTH), 404)["code"] == "not_found"


def test_body_size_limit(server):
    big = {"prompt": "x" * 70_000}
    assert error_of(httpx.post(f"{server.url}/v1/completions", json=big, headers=AUTH, timeout=10), 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit counts the bytes as they arrive
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 2048
        yield b'"}'

    response = httpx.post(f"{server.url}/v1/completions", content=chunked(), timeout=10,
                          headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    assert error_of(response, 413)["code"] == "request_too_large"
    server.wait_idle()


def test_requests_beyond_slots_and_queue_get_429_and_the_others_go_on(slow_server):
    body = {"prompt": "A long story", "max_tokens": 100, "temperature": 0, "stream": True}
    client = openai.OpenAI(base_url=f"{slow_server.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    with httpx.Client(base_url=slow_server.url, headers=AUTH, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as running:
            assert running.status_code == 200
            with http.stream("POST", "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200
                deadline = time.monotonic() + 5
                while (stats := slow_server.health())["running"] != 1:  # admitted by the engine thread
                    assert time.monotonic() < deadline, stats
                    time.sleep(0.02)
                assert stats["waiting"] == 1
                with pytest.raises(openai.RateLimitError) as e:
                    client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
                assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # the running one still streams
    slow_server.wait_idle()  # both abandoned mid-stream: cancelled, the slot free again
    result = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
    assert result.choices[0].finish_reason in ("length", "stop")


def test_client_disconnect_mid_stream_frees_the_slot(slow_server):
    client = openai.OpenAI(base_url=f"{slow_server.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    before = slow_server.wait_idle()
    stream = client.completions.create(model=MODEL, prompt="A long story", max_tokens=150, temperature=0, stream=True)
    for i, _ in enumerate(stream):  # a few tokens, then hang up (150 tokens would take 7.5 s)
        if i == 2:
            break
    stream.close()
    after = slow_server.wait_idle(timeout=5)  # well before the 7.5 s the rest of the request would take
    assert after["cancelled"] == before["cancelled"] + 1
    # non-streaming too: the client gives up waiting, the server notices and frees the slot
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_server.url}/v1/completions", headers=AUTH, timeout=0.5,
                   json={"prompt": "A long story", "max_tokens": 150})  # fmt: skip
    after = slow_server.wait_idle(timeout=5)
    assert after["cancelled"] == before["cancelled"] + 2
    # the slot serves the next request at once
    result = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0)
    assert result.usage.completion_tokens > 0


# ---- text: whole characters, stop strings across tokens -----------------------------------------


class ScriptedModel(torch.nn.Module):
    """Produces `script` (token ids) after a one-token prompt, one id per position, whatever it is fed."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.config = ModelConfig(dim=2, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=vocab, ffn_dim=2,
                                  max_seq_len=len(script) + 8)  # fmt: skip
        self.tok_embeddings = torch.nn.Embedding(1, 1)
        self.stop_tokens = frozenset()
        self.script = torch.tensor(script + [script[-1]] * 8)

    def setup_cache(self, *args, **kwargs):
        pass

    def forward(self, tokens, start_pos=0, *, cache_rows=None, keep=None):
        B, T = tokens.shape
        positions = torch.as_tensor(start_pos).expand(B)[:, None] + torch.arange(T)  # (B, T)
        if keep is not None:  # only these positions' logits, as Transformer.forward(keep=)
            positions = positions.gather(1, keep.view(-1, 1))  # (B, 1)
        logits = torch.zeros(*positions.shape, self.config.vocab_size)
        return logits.scatter_(2, self.script[positions][..., None], 10.0)  # position p predicts script[p]


@pytest.fixture(scope="module")
def byte_tokens(tokenizer) -> dict[int, int]:
    """Llama 3's single-byte tokens: byte value -> id."""
    found = {}
    for i in range(tokenizer.vocab_size - 256):
        raw = tokenizer.token_bytes(i)
        if len(raw) == 1:
            found[raw[0]] = i
    assert len(found) == 256
    return found


@pytest.mark.parametrize("stop, want", [(None, "añb 🦙 日本語 ST STOP tail"), (["STOP"], "añb 🦙 日本語 ST "),
                                        (["🦙"], "añb ")])  # fmt: skip
def test_streamed_text_never_splits_a_character(tokenizer, byte_tokens, stop, want):
    text = "añb 🦙 日本語 ST STOP tail"
    script = [byte_tokens[b] for b in text.encode("utf-8")]  # one byte per token
    engine = Engine(ScriptedModel(script, tokenizer.vocab_size), tokenizer, max_batch_size=2)
    with Server(create_app(engine, model_name="scripted")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        chunks = list(client.completions.create(model="scripted", prompt=[tokenizer.bos_id], max_tokens=len(script),
                                                temperature=0, stop=stop, stream=True))  # fmt: skip
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == want
    assert all("\ufffd" not in t for t in texts)
    assert sum(bool(t) for t in texts) >= 4  # streamed piece by piece, not all at the end
    assert chunks[-1].choices[0].finish_reason == ("length" if stop is None else "stop")


# ---- the scripts ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_script_end_to_end(checkpoint, ref, tokenizer, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    argv = [sys.executable, str(SCRIPTS / "serve.py"), "--checkpoint", str(checkpoint), "--port", str(port),
            "--dtype", "float32", "--device", "cpu", "--max-batch-size", "2", "--served-model-name", MODEL]  # fmt: skip
    env = dict(os.environ, LLAMA_API_KEY=KEY)
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers=AUTH, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "Hello!"}]
        result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        ids = tokenizer.encode_dialog(messages)
        assert result.choices[0].message.content == tokenizer.decode(expected(ref, ids, 8, stop_tokens=tokenizer.stop_tokens))
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    output = log.read_text()
    assert process.returncode == 0, output
    assert f"POST /v1/chat/completions 200 in={len(ids)} out={result.usage.completion_tokens} " in output
    assert "GET /v1/models 401" in output


@pytest.mark.slow
def test_serve_script_flag_errors():
    result = subprocess.run([sys.executable, str(SCRIPTS / "serve.py"), "--max-batch-size", "0"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "--max-batch-size must be at least 1" in result.stderr


def test_bench_serve_reports_the_table(server):
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_serve.py"), "--url", server.url, "--api-key", KEY,
                             "--concurrency", "1", "3", "--rounds", "1", "--max-tokens", "4"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "3"]
    assert [row.split("|")[2].strip() for row in rows] == ["6", "6"]  # one pass over the mix of 6
    assert "concurrency 3 over 1:" in result.stdout


def test_bench_serve_starts_its_own_server_and_stops_it(tmp_path):
    """The bundled model served by scripts/serve.py, started and stopped by the benchmark: the prefix
    scenario's hit finds the 2 whole blocks of its 40-token system prompt."""
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_serve.py"), "--scenario", "prefix", "--rounds", "1",
                             "--system-tokens", "40", "--threads", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (measured,) = json.loads(out.read_text())
    assert (measured["cached_tokens_per_miss"], measured["cached_tokens_per_hit"]) == (0, 32)


def test_bench_serve_reports_a_server_that_does_not_start():
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_serve.py"), "--checkpoint", "/nonexistent",
                             "--concurrency", "1"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "error: the server exited with status 2" in result.stderr, result.stderr


@pytest.mark.parametrize("flags", [["--prefill-chunk", "64", "0"], ["--scenario", "prefix", "--prefill-chunk", "64", "0"],
                                   ["--scenario", "interleave", "--url", "http://127.0.0.1:9", "--prefill-chunk", "64", "0"]])
def test_bench_serve_takes_several_prefill_chunks_only_for_interleave(flags):
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_serve.py"), *flags],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "several --prefill-chunk values are for --scenario interleave" in result.stderr
