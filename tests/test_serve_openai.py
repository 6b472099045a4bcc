"""The server's evaluation and application features (issue 14), through the official `openai`
client where it can send them, raw httpx where it cannot:

- echo with the prompt's logprobs, max_tokens 0, vLLM's prompt_logprobs, against the log-probs
  of a plain forward of the same checkpoint;
- the BOS rule (a string prompt equals the ids /tokenize gives for it), /tokenize, /detokenize,
  /tokenizer_info;
- logit_bias and OpenAI's presence / frequency penalties against a greedy loop written here;
- JSON mode and structured outputs (response_format json_object / json_schema, and the client's
  parse() with a pydantic model): every output parses and validates;
- tool calling in Llama 3.1's format: the prompt as Meta documents it, and the round trip
  (tools -> tool_calls -> a tool message -> an answer), plain and streamed;
- usage.prompt_tokens_details and system_fingerprint.

The server is test_serve's: a tiny random checkpoint with the real Llama 3 tokenizer.
"""

from __future__ import annotations

import copy
import datetime
import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch

import llama
from llama import ModelConfig
from llama.serving import tools as tool_format
from llama.serving.app import create_app
from llama.serving.engine import Engine
from random_models import random_model
from test_serve import (AUTH, CONTEXT, LLAMA3_TOKENIZER, MODEL, Server, checkpoint, client, error_of, expected, ref,  # noqa: F401
                        server, tokenizer)


def prompt_logprobs(ref, ids: list[int]) -> torch.Tensor:
    """(T - 1,) log P(ids[i] | ids[:i]) for i >= 1, from one plain forward."""
    with torch.inference_mode():
        logprobs = torch.log_softmax(ref(torch.tensor([ids]))[0, :-1], dim=-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# ---- echo and prompt logprobs -------------------------------------------------------------------------


def test_echo_returns_the_prompt_and_its_logprobs(client, ref, tokenizer):
    text = "And God said unto Moses"
    ids = tokenizer.encode(text, bos=True, eos=False)
    direct = prompt_logprobs(ref, ids)
    completion_ids, completion_logprobs = llama.generate(ref, [ids], 3, temperature=0, logprobs=True, stop_tokens=[])
    for prompt in (text, ids):
        r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
        lp = r.choices[0].logprobs
        n = len(ids)
        assert lp.tokens[:n] == [llama.serving.engine.token_text(tokenizer, i) for i in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:n] == pytest.approx(direct.tolist(), abs=1e-4)
        assert all(len(top) in (2, 3) for top in lp.top_logprobs[1:])  # the top 2, plus the token itself
        assert lp.token_logprobs[n:] == pytest.approx(completion_logprobs[0], abs=1e-4)
        expected_prompt = text if isinstance(prompt, str) else tokenizer.decode(ids)  # token ids: BOS's text too
        assert r.choices[0].text == expected_prompt + tokenizer.decode(completion_ids[0])
        assert lp.text_offset[n] == len(expected_prompt) and lp.text_offset[:n] == sorted(lp.text_offset[:n])


def test_max_tokens_0_scores_the_prompt_only(client, ref, tokenizer):
    ids = tokenizer.encode("In the beginning", bos=True, eos=False)
    r = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], echo=True, logprobs=0, max_tokens=0)
    assert [c.finish_reason for c in r.choices] == ["length", "length"] and r.usage.completion_tokens == 0
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(prompt_logprobs(ref, ids).tolist(), abs=1e-4)
    assert len(r.choices[1].logprobs.tokens) == 3


def test_vllm_prompt_logprobs(server, ref, tokenizer):
    ids = tokenizer.encode("Blessed are the meek", bos=True, eos=False)
    body = {"prompt": ids, "prompt_logprobs": 2, "max_tokens": 1, "temperature": 0, "n": 2}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()
    direct = prompt_logprobs(ref, ids)
    with torch.inference_mode():
        rows = torch.log_softmax(ref(torch.tensor([ids]))[0, :-1], dim=-1)
    for choice in r["choices"]:  # both choices of the prompt carry them
        scored = choice["prompt_logprobs"]
        assert scored[0] is None and len(scored) == len(ids)
        for i, entry in enumerate(scored[1:]):
            mine = entry[str(ids[i + 1])]
            assert mine["logprob"] == pytest.approx(float(direct[i]), abs=1e-4)
            assert mine["rank"] == int((rows[i] > rows[i, ids[i + 1]]).sum()) + 1
            top = sorted(entry.values(), key=lambda e: e["rank"])[:2]
            assert [e["rank"] for e in top] == [1, 2]
            assert top[0]["logprob"] == pytest.approx(float(rows[i].max()), abs=1e-4)


# ---- BOS and the tokenizer endpoints ------------------------------------------------------------------


def test_a_string_prompt_is_the_ids_tokenize_gives(server, client, tokenizer):
    text = "Let there be light"
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "return_token_strs": True}, headers=AUTH).json()
    assert tokens["tokens"] == tokenizer.encode(text, bos=True, eos=False) and tokens["count"] == len(tokens["tokens"])
    assert tokens["token_strs"][0] == "<|begin_of_text|>" and tokens["max_model_len"] == CONTEXT
    bare = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=AUTH).json()
    assert bare["tokens"] == tokens["tokens"][1:] and bare["token_strs"] is None
    a = client.completions.create(model=MODEL, prompt=text, max_tokens=6, temperature=0, logprobs=1)
    b = client.completions.create(model=MODEL, prompt=tokens["tokens"], max_tokens=6, temperature=0, logprobs=1)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].logprobs.token_logprobs == pytest.approx(b.choices[0].logprobs.token_logprobs, abs=1e-5)
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": bare["tokens"]}, headers=AUTH).json()
    assert back == {"prompt": text}


def test_tokenizer_info_and_tokenizer_errors(server, tokenizer):
    info = httpx.get(f"{server.url}/tokenizer_info", headers=AUTH).json()
    assert info["bos_token"] == "<|begin_of_text|>" and info["bos_token_id"] == tokenizer.bos_id
    assert info["eos_token"] == "<|end_of_text|>" and info["model_max_length"] == CONTEXT
    assert info["vocab_size"] == tokenizer.vocab_size and info["add_bos_token"] is True
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [5, 10**7]}, headers=AUTH)
    assert error_of(bad, 400)["param"] == "tokens"
    bad = httpx.post(f"{server.url}/tokenize", json={"prompt": "x", "add_generation_prompt": True}, headers=AUTH)
    assert error_of(bad, 400)["code"] == "unknown_parameter"
    assert error_of(httpx.post(f"{server.url}/tokenize", json={"prompt": "x", "model": "other"}, headers=AUTH), 404)


# ---- logit_bias and penalties -------------------------------------------------------------------------


def greedy_with(ref, ids: list[int], steps: int, bias: dict[int, float] = {}, presence: float = 0.0,
                frequency: float = 0.0) -> list[int]:  # fmt: skip
    """Greedy decoding with OpenAI's logit_bias and penalties, by their definitions (stop tokens ignored)."""
    ids, out = list(ids), []
    counts = torch.zeros(ref.config.vocab_size)
    with torch.inference_mode():
        for _ in range(steps):
            logits = ref(torch.tensor([ids]))[0, -1]
            for token, b in bias.items():
                logits[token] += b
            logits = logits - counts * frequency - (counts > 0).float() * presence
            token = int(logits.argmax())
            counts[token] += 1
            ids.append(token)
            out.append(token)
    return out


def completion_ids(server, body: dict) -> list[int]:
    body = {"max_tokens": 10, "temperature": 0, "ignore_eos": True, "logprobs": 0, **body}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()
    return r["choices"][0]["logprobs"]["tokens"], r["choices"][0]["logprobs"]["token_logprobs"]


@pytest.fixture(scope="module")
def flat():
    """A server whose model has nearly flat logits (small weights), so penalties of a few nats decide
    the greedy choice; and a copy of the model for greedy_with."""
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=64, max_seq_len=64)
    model = random_model(config, std=0.02)
    engine = Engine(copy.deepcopy(model), llama.load_tokenizer(LLAMA3_TOKENIZER), max_batch_size=2)
    with Server(create_app(engine, model_name=MODEL)) as s:
        s.ref = model
        yield s


def test_logit_bias_and_penalties_follow_openais_definitions(flat, tokenizer):
    ref = flat.ref
    ids = tokenizer.encode("And it came to pass", bos=True, eos=False)
    plain = greedy_with(ref, ids, 10)
    with torch.inference_mode():
        spread = float(ref(torch.tensor([ids]))[0, -1].std())
    lifted = {4242: 10 * spread + 0.05}  # wins every step unless penalised
    repeats = greedy_with(ref, ids, 10, lifted)
    assert repeats == [4242] * 10 and len(set(plain)) > 1
    cases = [({"logit_bias": {str(plain[0]): -100}}, {"bias": {plain[0]: -100}}, plain),
             ({"logit_bias": {"1000": 100}}, {"bias": {1000: 100}}, plain),
             ({"logit_bias": {"4242": lifted[4242]}, "presence_penalty": 1.5}, {"bias": lifted, "presence": 1.5}, repeats),
             ({"logit_bias": {"4242": lifted[4242]}, "frequency_penalty": 0.3}, {"bias": lifted, "frequency": 0.3}, repeats),
             ({"presence_penalty": -2, "frequency_penalty": -0.5}, {"presence": -2, "frequency": -0.5}, plain)]  # fmt: skip
    for body, manual, without in cases:
        want = greedy_with(ref, ids, 10, **manual)
        assert want != without, body  # the field changes the output, so the comparison below can fail
        tokens, _ = completion_ids(flat, {"prompt": ids, **body})
        assert tokens == [llama.serving.engine.token_text(tokenizer, t) for t in want], body


# ---- JSON mode ----------------------------------------------------------------------------------------


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip


@pytest.mark.slow
def test_json_modes_always_parse_with_the_openai_client(client):
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, response_format={"type": "json_object"},
                                       max_tokens=24, temperature=0)  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=1.0, seed=3, n=3,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "person", "schema": PERSON}})  # fmt: skip
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)

    class Verse(pydantic.BaseModel):
        book: str
        chapter: int
        holy: bool

    parsed = client.chat.completions.parse(model=MODEL, messages=messages, response_format=Verse, max_tokens=40,
                                           temperature=0)  # fmt: skip
    assert isinstance(parsed.choices[0].message.parsed, Verse)
    stream = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=20, temperature=0.7, seed=1, stream=True,
                                       extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
    assert isinstance(json.loads("".join(c.choices[0].text for c in stream)), dict)


# ---- tool calling -------------------------------------------------------------------------------------


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                         "parameters": {"type": "object", "properties": {}}}}  # fmt: skip


def test_the_tool_prompt_is_metas_json_format():
    """llama-models' llama3_1/prompt_format.md, "JSON based tool calling", with a call and its result."""
    tokenizer = llama.load_tokenizer(LLAMA3_TOKENIZER)
    messages = [tool_format.Message("system", "You are a helpful assistant."),
                tool_format.Message("user", "Use tools to get the weather in Paris"),
                tool_format.Message("assistant", call=tool_format.ToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}')),
                tool_format.Message("tool", '{"temperature": 21}')]  # fmt: skip
    ids = tool_format.encode_tool_dialog(tokenizer, messages, [WEATHER], datetime.date(2024, 9, 21))
    listed = json.dumps(WEATHER, indent=4)
    assert tokenizer.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n\n"
        "You are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\nHere is a list of functions in JSON format:\n"
        f"{listed}\n\nReturn function calls in JSON format.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nUse tools to get the weather in Paris<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}<|eom_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 21}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )  # fmt: skip
    forced = tool_format.encode_tool_dialog(tokenizer, messages[:2], [WEATHER], datetime.date(2024, 9, 21), force_call=True)
    assert forced[-1] == tokenizer.special_tokens["<|python_tag|>"]


def test_a_call_is_recognised_only_in_metas_shape():
    parse = tool_format.parse_call
    call = parse('<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Rome"}}', [WEATHER])
    assert call == tool_format.ToolCall("get_weather", '{"city": "Rome"}')
    assert parse('{"name": "get_time", "parameters": {}}', [WEATHER, TIME]).name == "get_time"
    for text in ['{"name": "get_time", "parameters": {}}', '{"name": "get_weather"}', '{"name": "get_weather", "parameters": 3}',
                 '{"name": "get_weather", "parameters": {}, "x": 1}', "It is sunny.", '{"name": "get_weather", "param']:  # fmt: skip
        assert parse(text, [WEATHER]) is None, text


@pytest.fixture(scope="module")
def tool_client():
    """A server with room for tool prompts (the list of tools alone is a few hundred tokens)."""
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=64, max_seq_len=768)
    engine = Engine(random_model(config, std=0.3), llama.load_tokenizer(LLAMA3_TOKENIZER), max_batch_size=2)
    with Server(create_app(engine, model_name=MODEL)) as s:
        yield openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=300)


def test_tool_call_round_trip_with_the_openai_client(tool_client, tokenizer):
    client = tool_client
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=120, temperature=0)  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    today = datetime.date.today()
    prompt = tool_format.encode_tool_dialog(tokenizer, [tool_format.Message(m["role"], m["content"]) for m in messages],
                                            [WEATHER, TIME], today, force_call=True)  # fmt: skip
    assert r.usage.prompt_tokens == len(prompt)

    messages += [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], tool_choice="none",
                                            max_tokens=8, temperature=0)  # fmt: skip
    assert answer.choices[0].finish_reason in ("stop", "length") and isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].message.tool_calls is None

    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(model=MODEL, messages=messages[:2], tools=[WEATHER, TIME], tool_choice=named,
                                            max_tokens=120, temperature=0.8, seed=5, stream=True)  # fmt: skip
    chunks = list(stream)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_messages_are_checked(tool_client):
    client = tool_client
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    bad = [[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call, call]}],  # two calls
           [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_2", "content": "x"}],  # answers no call
           [{"role": "user", "content": "hi", "tool_call_id": "call_1"}],
           [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
               {**call, "function": {"name": "get_time", "arguments": "not json"}}]}]]  # fmt: skip
    for messages in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, tools=[TIME], max_tokens=2)
        assert e.value.body["param"] == "messages", messages


# ---- usage and fingerprint ----------------------------------------------------------------------------


def test_usage_details_and_system_fingerprint(client):
    a = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    b = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(b)
    assert a.usage.prompt_tokens_details.cached_tokens == 0 and chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    assert a.system_fingerprint.startswith("fp_") and {c.system_fingerprint for c in chunks} == {a.system_fingerprint}
