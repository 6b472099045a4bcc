"""Serving LoRA adapters: one engine batch mixing two adapters and the base model, each request equal
to its adapter run alone; the base projections run once per step for all rows; /v1/models lists
the adapters and a request picks one by "model"; serve.py --lora and generate.py --adapter.

The checkpoint is a tiny random float32 model with the real Llama 3 tokenizer (as in test_serve.py);
each adapter gets random B so it changes the output. Expected outputs come from llama.generate on
another copy of the model with only that adapter active.
"""

from __future__ import annotations

import importlib.resources
import shutil
import threading
from pathlib import Path

import httpx
import pytest
import torch
from random_models import random_model

import kernels
import llama
from llama import ModelConfig
from llama.serving.app import create_app
from llama.serving.engine import Engine, Request
from llama.training import lora

LLAMA3_TOKENIZER = Path(str(importlib.resources.files("llama_models.llama3") / "tokenizer.model"))
CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=64, max_seq_len=128,
                     tie_word_embeddings=True)  # fmt: skip
ADAPTERS = {"a": (["q_proj", "v_proj", "down_proj"], 1), "b": (["k_proj", "o_proj", "gate_proj", "up_proj"], 2)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The base checkpoint and two adapters, made here and saved in peft's layout."""
    root = tmp_path_factory.mktemp("serve-lora")
    model = random_model(CONFIG, std=0.5)
    llama.save(model, root / "base")
    shutil.copy(LLAMA3_TOKENIZER, root / "base" / "tokenizer.model")
    for name, (targets, seed) in ADAPTERS.items():
        adapted = llama.load(root / "base")
        lora.apply_lora(adapted, targets, rank=4, name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, module in lora.lora_modules(adapted):
                module.lora_B[name].copy_(torch.randn(module.lora_B[name].shape, generator=g) * 0.3)
        lora.save_adapter(adapted, root / name)
    return root


def with_adapters(files, active=None):
    model = llama.load(files / "base")
    for name in ADAPTERS:
        lora.load_adapter(model, files / name, name)
    lora.set_adapter(model, active)
    return model


def alone(files, adapter, prompt, n):
    return llama.generate(with_adapters(files, adapter), [prompt], n, temperature=0, stop_tokens=[])[0]


def run_engine(engine, requests):
    deltas, done = {i: [] for i in range(len(requests))}, threading.Event()

    def sink(i, delta):
        deltas[i].append(delta)
        if all(d and d[-1].finish_reason for d in deltas.values()):
            done.set()

    engine.start()
    try:
        engine.submit(requests, sink)
        assert done.wait(60)
    finally:
        engine.stop()
    return [[t for d in deltas[i] for t in d.tokens] for i in range(len(requests))]


def test_a_batch_mixing_adapters_and_the_base_equals_each_run_alone(files):
    tokenizer = llama.load_tokenizer(files / "base")
    prompts = [tokenizer.encode(text, bos=True, eos=False) for text in ("The king said", "In the land of", "And the river")]
    choices = ["a", None, "b", "a", "b", None]
    model = with_adapters(files)
    # The base projections run once per forward, for every row together (a forward hook counts them).
    calls = []
    model.layers[0].attention.wq.base.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    engine = Engine(model, tokenizer, max_batch_size=6)
    requests = [Request(prompts[i % 3], max_tokens=8, stop_tokens=frozenset(), adapter=a) for i, a in enumerate(choices)]
    outputs = run_engine(engine, requests)
    for request, out in zip(requests, outputs):
        assert out == alone(files, request.adapter, list(request.prompt), 8), request.adapter
    assert len({tuple(o) for o in outputs}) >= 4  # the adapters make a difference
    stats = engine.stats()
    assert stats["decode_steps"] == 7 and stats["decode_rows"] == 7 * 6  # every decode step held all six rows
    assert stats["prefill_batches"] == 1  # the prompts are of similar lengths: prefilled together
    assert calls == [6] * 8  # each forward (one prefill, seven decode steps) ran wq's base matmul once for all six rows

    with pytest.raises(llama.GenerationError, match=r"no adapter named 'c'; the model has \['a', 'b'\]"):
        Engine(with_adapters(files), tokenizer).submit([Request(prompts[0], 4, adapter="c")], lambda i, d: None)


def test_adapters_through_the_kernels(files):
    """kernels.optimize (fusions off: adapters sit on the projections) keeps the adapters' outputs."""
    tokenizer = llama.load_tokenizer(files / "base")
    prompt = tokenizer.encode("The king said", bos=True, eos=False)
    model = kernels.optimize(with_adapters(files), fuse_qkv=False, fuse_gate_up=False)
    engine = Engine(model, tokenizer, max_batch_size=2)
    outputs = run_engine(engine, [Request(prompt, 6, stop_tokens=frozenset(), adapter=a) for a in ("a", "b")])
    assert outputs == [alone(files, "a", prompt, 6), alone(files, "b", prompt, 6)]


def test_the_app_serves_each_adapter_as_a_model(files):
    from fastapi.testclient import TestClient

    tokenizer = llama.load_tokenizer(files / "base")
    engine = Engine(with_adapters(files), tokenizer, max_batch_size=4)
    with TestClient(create_app(engine, model_name="base")) as client:
        models = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["base", "a", "b"] and models[1]["parent"] == "base"
        prompt = "The king said"
        ids = tokenizer.encode(prompt, bos=True, eos=False)
        for name, adapter in (("a", "a"), ("b", "b"), ("base", None), (None, None)):
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            if name is not None:
                body["model"] = name
            response = client.post("/v1/completions", json=body).json()
            assert response["model"] == (name or "base")
            assert response["choices"][0]["text"] == tokenizer.decode(alone(files, adapter, ids, 6)), name
        error = client.post("/v1/completions", json={"model": "c", "prompt": "x"})
        assert error.status_code == 404 and error.json()["error"]["code"] == "model_not_found"
        assert "`base`, `a`, `b`" in error.json()["error"]["message"]


@pytest.mark.slow
def test_serve_script_with_lora(files):
    import socket
    import subprocess
    import sys
    import time

    scripts = Path(__file__).parents[1] / "scripts"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, str(scripts / "serve.py"), "--checkpoint", str(files / "base"), "--port", str(port),
            "--dtype", "float32", "--served-model-name", "base", "--lora", f"a={files / 'a'}", "--lora", f"b={files / 'b'}"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.poll() is not None else "timeout"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]] == ["base", "a", "b"]
        tokenizer = llama.load_tokenizer(files / "base")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "b", "prompt": "The king said", "max_tokens": 5, "temperature": 0, "ignore_eos": True})  # fmt: skip
        assert r.json()["choices"][0]["text"] == tokenizer.decode(alone(files, "b", tokenizer.encode("The king said", bos=True, eos=False), 5))
    finally:
        process.terminate()
        process.wait(30)
    bad = subprocess.run([sys.executable, str(scripts / "serve.py"), "--lora", "nodir"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--lora 'nodir': expected NAME=DIR" in bad.stderr
