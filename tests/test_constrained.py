"""Constrained decoding (llama/serving/constrained.py): the grammars against Python's json module and
the jsonschema package, the distances that let an output finish within max_tokens, the token walk
against a token-by-token check, and many sampled generations of a random model through the engine:
every output parses, and validates against its schema."""

from __future__ import annotations

import copy
import json
import threading

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama
import weights
from llama import ModelConfig
from llama.core.generation import SamplingParams
from llama.serving.constrained import (ACCEPT, MAX_WHITESPACE, UNREACHABLE, Parser, SchemaError, TokenConstraint,
                                       Vocabulary, json_object_grammar, schema_grammar)  # fmt: skip
from llama.serving.engine import Engine, Request
from random_models import random_model

KJV = weights.BUNDLED_MODEL  # a real 4,096-token sentencepiece vocabulary with byte fallback


@pytest.fixture(scope="module")
def json_parser() -> Parser:
    return Parser(json_object_grammar())


def accepts(parser: Parser, text: str | bytes) -> bool:
    state = parser.feed(parser.start, text.encode() if isinstance(text, str) else text)
    return state is not None and ACCEPT in state


def live(parser: Parser, text: str) -> bool:
    return parser.feed(parser.start, text.encode()) is not None


# ---- the JSON grammar against json.loads ------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(value=st.dictionaries(st.text(max_size=5), json_values, max_size=4), indent=st.sampled_from([None, 0, 1, 2]),
       ascii_only=st.booleans())  # fmt: skip
def test_every_json_object_is_accepted_and_every_prefix_is_live(json_parser, value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    assert accepts(json_parser, text), text
    for cut in range(len(text)):
        assert live(json_parser, text[:cut]), (text, cut)


@settings(max_examples=300, deadline=None)
@given(value=st.dictionaries(st.text(max_size=5), json_values, max_size=3), position=st.integers(0, 1000),
       junk=st.sampled_from(list("{}[],:\"\\ x0-.eE+tfn\t\n\x00\x7f") + ["\u00e9", "\U0001f999", "\ud800"]))  # fmt: skip
def test_what_the_grammar_accepts_is_a_json_object(json_parser, value, position, junk):
    """Soundness on text one character away from JSON. (The grammar allows less whitespace than
    JSON does, so not every object json.loads takes is accepted: completeness is the test above.)"""
    text = json.dumps(value)
    position %= len(text) + 1
    mutated = (text[:position] + junk + text[position:]).encode("utf-8", "surrogatepass")
    if accepts(json_parser, mutated):
        assert isinstance(json.loads(mutated), dict), mutated


def test_the_grammar_refuses_what_json_refuses(json_parser):
    for bad in ['{"a":1,}', "{'a': 1}", '{"a" 1}', "[1]", '"x"', "{}{}", '{"a": 01}', '{"a": 1.}', '{"a": .5}',
                '{"a": +1}', '{"a": NaN}', '{"a": "\\x"}', '{"a": "\t"}', '{"a": tru}', '{"a": "\\ud8"}',
                ' {"a": 1} ']:  # fmt: skip
        assert not accepts(json_parser, bad), bad
    assert not accepts(json_parser, b'{"a": "\xc0\xaf"}')  # an overlong UTF-8 sequence
    assert not accepts(json_parser, b'{"a": "\xed\xa0\x80"}')  # a surrogate in UTF-8
    assert accepts(json_parser, '{"a": "\\ud83e\\udd99 \u00e9 \U0001f999", "b": [1e5, -0.5E-3, true, null, {}]}')
    # whitespace: none, one space, or a newline and indentation, MAX_WHITESPACE characters at most
    assert live(json_parser, "{\n" + " " * (MAX_WHITESPACE - 1)) and not live(json_parser, "{\n" + " " * MAX_WHITESPACE)
    assert live(json_parser, '{ "a": 1 }') and not live(json_parser, "{  ")


# ---- distances ----------------------------------------------------------------------------------------


def shortest_completion(parser: Parser, state) -> int:
    """Breadth-first search over bytes for the fewest bytes that complete the value (the oracle)."""
    frontier, seen = [state], {state}
    for depth in range(40):
        if any(ACCEPT in s for s in frontier):
            return depth
        nxt = []
        for s in frontier:
            for b in range(256):
                t = parser.step(s, b)
                if t is not None and t not in seen:
                    seen.add(t)
                    nxt.append(t)
        frontier = nxt
    raise AssertionError("no completion within 40 bytes")


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 5},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", 7]}, "minItems": 2, "maxItems": 3},
        "ok": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
    },
    "required": ["tags", "name"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("grammar, prefixes", [
    (json_object_grammar(), ["", "{", '{"a', '{"a":', '{"a": [', '{"a": [1, {"b": "c', '{"a": -', '{"a": 1.', '{"a": 1e']),
    (schema_grammar(SCHEMA), ["", "{", '{"na', '{"name": "', '{"name": "abcde', '{"name": "ab", "age": 1',
                              '{"name": "ab", "tags": ["re', '{"name": "ab", "tags": [7, 7']),
])  # fmt: skip
def test_the_distance_is_the_shortest_completion(grammar, prefixes):
    parser = Parser(grammar)
    for prefix in prefixes:
        state = parser.feed(parser.start, prefix.encode())
        assert state is not None, prefix
        assert parser.distance_of(state) == shortest_completion(parser, state), prefix


# ---- schemas against jsonschema -----------------------------------------------------------------------


def test_schema_accepts_exactly_what_validates():
    parser = Parser(schema_grammar(SCHEMA))
    cases = ['{"name": "ab", "tags": ["red", 7]}', '{"name": "abcde", "age": -3, "tags": [7, 7, "green"], "ok": null}',
             '{"name": "a", "tags": ["red", 7]}', '{"name": "abcdef", "tags": ["red", 7]}', '{"tags": ["red", 7]}',
             '{"name": "ab", "tags": ["red"]}', '{"name": "ab", "tags": ["red", 7, 7, 7]}', '{"name": "ab", "tags": ["blue", 7]}',
             '{"name": "ab", "tags": [7, 7], "extra": 1}', '{"name": "ab", "age": 1.5, "tags": [7, 7]}',
             '{"name": "ab", "tags": [7, 7], "ok": true}', '{"name": "ab", "tags": [7, 7], "ok": 1}']  # fmt: skip
    for text in cases:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid = True
        except jsonschema.ValidationError:
            valid = False
        # properties are written in the schema's order: a valid text in another order is not accepted
        in_order = valid and list(json.loads(text)) == [k for k in SCHEMA["properties"] if k in json.loads(text)]
        assert accepts(parser, text) == in_order, text


def test_refs_and_recursion():
    schema = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                                  "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                                 "required": ["v", "next"]}},
              "$ref": "#/$defs/node"}  # fmt: skip
    parser = Parser(schema_grammar(schema))
    assert accepts(parser, '{"v": 1, "next": {"v": 2, "next": null}}')
    assert not accepts(parser, '{"v": 1, "next": {"v": 2}}')


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "string", "pattern": "^a+$"}, "pattern"),
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "number", "multipleOf": 2}, "multipleOf"),
    ({"oneOf": [{"type": "string"}]}, "oneOf"),
    ({"allOf": [{"type": "string"}]}, "allOf"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "patternProperties": {"a": {}}}, "patternProperties"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": "object", "properties": {"a": {"nullable": True}}}, "nullable"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"type": "string", "maxLength": 10**6}, "maxLength"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "type"),
    (False, "false"),
])  # fmt: skip
def test_unsupported_schema_features_are_refused_by_name(schema, keyword):
    with pytest.raises(SchemaError, match=keyword.replace("$", r"\$")):
        schema_grammar(schema)


def test_annotations_and_format_are_accepted():
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "T", "description": "d",
              "type": "object", "properties": {"when": {"type": "string", "format": "date-time", "examples": ["x"]}},
              "required": ["when"]}  # fmt: skip
    assert accepts(Parser(schema_grammar(schema)), '{"when": "yesterday"}')


# ---- tokens --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kjv_tokenizer():
    return llama.load_tokenizer(KJV)


@pytest.fixture(scope="module")
def vocabulary(kjv_tokenizer):
    return Vocabulary(kjv_tokenizer)


def test_the_walk_allows_exactly_the_tokens_a_check_allows(kjv_tokenizer, vocabulary):
    constraint = TokenConstraint(schema_grammar(SCHEMA), vocabulary)
    parser = constraint.parser
    stops = {kjv_tokenizer.eos_id}
    for prefix in ["", "{", '{"name": "a', '{"name": "abcde', '{"name": "ab", "tags": [', '{"name": "ab", "tags": [7, 7]}']:
        state = parser.feed(parser.start, prefix.encode())
        for budget in (0, 3, 1000):
            mask = constraint.allowed(state, budget, stops)
            expected = torch.tensor([constraint.advance(state, t, budget, stops) is not None for t in range(len(mask))])
            assert torch.equal(mask, expected), (prefix, budget)
    assert not constraint.allowed(parser.start, 1000, stops)[kjv_tokenizer.bos_id]  # control tokens never
    assert constraint.distances(parser.start)[kjv_tokenizer.eos_id] == UNREACHABLE


def run(engine: Engine, requests: list[Request]) -> list[tuple[str, list[int], str]]:
    """(text, token ids, finish_reason) of each request."""
    texts, ids, finish = [""] * len(requests), [[] for _ in requests], [None] * len(requests)
    done = threading.Event()

    def sink(i, delta):
        texts[i] += delta.text
        ids[i] += delta.tokens
        if delta.finish_reason is not None:
            finish[i] = delta.finish_reason if delta.error is None else f"error: {delta.error}"
            if all(f is not None for f in finish):
                done.set()

    engine.submit(requests, sink)
    assert done.wait(600)
    return list(zip(texts, ids, finish))


@pytest.fixture(scope="module")
def engine(kjv_tokenizer):
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=4096, ffn_dim=64, max_seq_len=256)
    engine = Engine(random_model(config, std=0.3), kjv_tokenizer, max_batch_size=16, max_queue=256)
    engine.start()
    yield engine
    engine.stop()


SCHEMAS = [
    None,  # json_object
    SCHEMA,
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "string", "maxLength": 4}},
                                "required": ["x"]}, "maxItems": 3},
    {"anyOf": [{"type": "integer"}, {"enum": ["yes", "no", None]}, {"type": "object", "properties": {"q": {"const": [1, 2]}}}]},
    {"type": "object", "additionalProperties": {"type": "boolean"}},
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("schema", SCHEMAS, ids=["json_object", "object", "array", "anyOf", "map"])
def test_sampled_outputs_of_a_random_model_always_parse_and_validate(engine, kjv_tokenizer, vocabulary, schema):
    grammar = json_object_grammar() if schema is None else schema_grammar(schema)
    constraint = TokenConstraint(grammar, vocabulary, engine.vocab_size)
    prompt = kjv_tokenizer.encode("And God said", bos=True, eos=False)
    shortest = constraint.minimum_tokens()
    samplings = [SamplingParams(temperature=1.0, top_p=1.0), SamplingParams(temperature=1.3, top_p=0.9, top_k=50),
                 SamplingParams(temperature=0)]  # fmt: skip
    requests = [Request(prompt, max_tokens, sampling, seed=seed, constraint=constraint)
                for seed, sampling in enumerate(samplings * 8)
                for max_tokens in (shortest, shortest + 3, 60)]  # fmt: skip
    for text, ids, finish in run(engine, requests):
        assert finish in ("stop", "length"), finish
        value = json.loads(text)
        if schema is None:
            assert isinstance(value, dict)
        else:
            jsonschema.validate(value, schema)
    assert engine.stats()["errors"] == 0


def test_greedy_constrained_decoding_is_the_argmax_of_the_masked_logits(engine, kjv_tokenizer, vocabulary):
    """The engine's fast path (take the model's choice when it is allowed) against the definition."""
    constraint = TokenConstraint(schema_grammar(SCHEMA), vocabulary, engine.vocab_size)
    prompt = kjv_tokenizer.encode("In the beginning", bos=True, eos=False)
    max_tokens = 40
    (text, got, _), = run(engine, [Request(prompt, max_tokens, SamplingParams(temperature=0), constraint=constraint)])
    model = copy.deepcopy(engine.model)  # the engine owns its model's cache
    model.clear_cache()
    state, ids = constraint.start(), list(prompt)
    expected = []
    with torch.inference_mode():
        for step in range(max_tokens):
            logits = model(torch.tensor([ids]))[0, -1]  # a plain forward over the whole sequence
            allowed = constraint.allowed(state, max_tokens - step - 1, engine.stop_tokens)
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            if token in engine.stop_tokens:
                break
            expected.append(token)
            ids.append(token)
            state = constraint.advance(state, token, max_tokens - step - 1)
            if constraint.finished(state):
                break
    assert got == expected
    jsonschema.validate(json.loads(text), SCHEMA)


def test_a_vocabulary_of_llama3_is_walked(kjv_tokenizer):
    """The 128,256-token Llama 3 vocabulary: strings of any token are allowed inside a JSON string."""
    from test_serve import LLAMA3_TOKENIZER

    tokenizer = llama.load_tokenizer(LLAMA3_TOKENIZER)
    constraint = TokenConstraint(json_object_grammar(), Vocabulary(tokenizer))
    state = constraint.parser.feed(constraint.start(), b'{"key": "va')
    mask = constraint.allowed(state, 1000, tokenizer.stop_tokens)
    for text in ["lue", " the", "\u00e9", '"}', "\\n"]:
        ids = tokenizer.encode(text, bos=False, eos=False)
        assert mask[ids[0]], text
    assert not mask[tokenizer.encode('"x', bos=False, eos=False)[0]]  # a quote then a letter: not JSON
    assert not mask[sorted(tokenizer.stop_tokens)].any()  # not complete: no stop token
