"""Constrained decoding for JSON mode: a token is allowed only if the text stays a valid prefix of
JSON (response_format json_object), or of JSON that validates against a schema (json_schema, and
forced tool calls).

    grammar = json_object_grammar()                        # any JSON object
    grammar = schema_grammar({"type": "object", ...})      # SchemaError names what is not supported
    constraint = TokenConstraint(grammar, Vocabulary(tokenizer))
    state = constraint.start()
    state = constraint.advance(state, token_id, budget, stop_tokens)    # None: the token is not allowed
    mask = constraint.allowed(state, budget, stop_tokens)               # (V,) bool: every allowed token

Three layers, each small:

1. Grammar: a context-free grammar over bytes. A rule is a list of alternatives, an alternative a
   sequence of symbols, a symbol another rule or a set of bytes (one byte of input). The generic
   JSON grammar and the schema compiler (schema_grammar) build one. Repetition is right recursion
   (`items -> item items | ""`), never left recursion, so a parse never loops without reading a byte.
2. Parse states: the set of stacks a pushdown automaton can be in after the bytes so far, as
   llama.cpp's grammar sampler keeps them. A stack is a chain of frames "alternative a, at symbol i,
   then return to frame p"; frames are interned as small integers, so a state is a frozenset of
   ints whose top symbol is a byte set (or ACCEPT: the whole value is complete). Reading a byte
   keeps the stacks whose top admits it and advances them; an empty result means the byte is not
   allowed. Alternatives (anyOf, optional properties, an enum) are simply several stacks.
3. Tokens: a token is allowed if all its bytes are (Vocabulary.walk reads every token of the
   vocabulary from a state, sharing the work of common prefixes: tokens are sorted, and a token
   starts from the longest prefix it shares with the one before).

Finishing within max_tokens. Each frame knows the fewest bytes that complete it (the shortest
string its remaining symbols derive), so a state knows the fewest bytes that complete the whole
value: its distance. The byte-level tokenizers of Llama (tiktoken: all 256 bytes are tokens;
sentencepiece: byte fallback) can always spend one token per byte, so a token is allowed only if
the distance after it fits in the tokens that remain after it. A generation that keeps choosing
long strings is thereby steered to close them in time, and every output within max_tokens parses.
Stop tokens are allowed only once the value is complete; when nothing can follow (an object or
array closed at the root), the engine ends the output there.

Whitespace between tokens of JSON is limited to MAX_WHITESPACE characters (a space, or a newline
and indentation), so a model cannot fill its budget with blanks; there is none after the value.
Object properties of a schema are written in the schema's order (required ones always, optional
ones may be left out): a valid subset of what the schema allows, as in llama.cpp and outlines.

Cost. The first time a state is met its allowed tokens are computed by one walk over the
vocabulary (milliseconds for the 4,096 tokens of the bundled model, about a second for Llama 3's
128,256 in Python on one core); the result is kept per grammar (an LRU of DIST_CACHE states), so a
string's characters, met again and again, cost a lookup. The engine first checks the token sampling
chose anyway and walks only when it is not allowed (see llama/serving/engine.py).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

ACCEPT = 0  # the node of an empty stack: the value is complete
MAX_WHITESPACE = 20  # characters of whitespace allowed between two tokens of JSON
MAX_REPEAT = 1024  # largest minLength / maxLength / minItems / maxItems a schema may give
MAX_RULES = 50_000  # a larger grammar is refused (it bounds the work one request can cause)
DIST_CACHE = 512  # states whose token distances a grammar keeps
STEP_CACHE = 1_000_000  # (state, byte) transitions a grammar keeps before starting afresh
UNREACHABLE = 2**31 - 1  # the distance of a token that is not allowed


class SchemaError(ValueError):
    """A JSON schema uses a feature constrained decoding does not implement, or is malformed; the
    message names the keyword and where it is (a JSON pointer)."""


# ---- 1. grammars ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bytes:
    """A symbol matching one byte out of a set, held as a 256-bit mask."""

    mask: int

    @staticmethod
    def of(chars: Iterable[int] | bytes | str) -> "Bytes":
        values = chars.encode() if isinstance(chars, str) else chars
        mask = 0
        for b in values:
            mask |= 1 << b
        return Bytes(mask)

    @staticmethod
    def span(lo: int, hi: int) -> "Bytes":
        return Bytes(((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1))

    def __or__(self, other: "Bytes") -> "Bytes":
        return Bytes(self.mask | other.mask)


Symbol = "int | Bytes"  # a rule id, or one byte out of a set


class Grammar:
    """Rules by id (`rules[r]`: a list of alternatives, each a tuple of symbols) and the root rule.
    Built with new_rule / define / rule; `literal` spells bytes as a sequence of symbols."""

    def __init__(self):
        self.rules: list[list[tuple]] = []
        self.root = -1

    def new_rule(self) -> int:
        if len(self.rules) >= MAX_RULES:
            raise SchemaError(f"the schema needs more than {MAX_RULES} grammar rules; make it smaller")
        self.rules.append([])
        return len(self.rules) - 1

    def define(self, rule: int, *alternatives: Sequence) -> int:
        self.rules[rule] = [tuple(a) for a in alternatives]
        return rule

    def rule(self, *alternatives: Sequence) -> int:
        return self.define(self.new_rule(), *alternatives)

    @staticmethod
    def literal(text: bytes | str) -> tuple:
        raw = text.encode() if isinstance(text, str) else text
        return tuple(Bytes.of([b]) for b in raw)


class _JsonRules:
    """The pieces of JSON's own grammar (RFC 8259) as rules of one Grammar, made once each."""

    def __init__(self, g: Grammar):
        self.g = g
        self._any = None
        blank = Bytes.of(b" \t")
        # ws: nothing, one space, or a newline and up to MAX_WHITESPACE - 1 spaces or tabs of indentation
        indent = g.rule(())
        for _ in range(MAX_WHITESPACE - 1):
            indent = g.rule((), (blank, indent))
        self.ws = g.rule((), (Bytes.of(b" "),), (Bytes.of(b"\n"), indent))
        self.char = self._char()
        self.chars = g.new_rule()
        g.define(self.chars, (), (self.char, self.chars))
        self.string = g.rule(g.literal('"') + (self.chars,) + g.literal('"'))
        digit, nonzero = Bytes.span(ord("0"), ord("9")), Bytes.span(ord("1"), ord("9"))
        digits = g.new_rule()
        g.define(digits, (digit,), (digit, digits))
        maybe_digits = g.rule((), (digits,))
        self.integer = g.rule(*[(*sign, *whole) for sign in ((), g.literal("-"))
                                for whole in (g.literal("0"), (nonzero, maybe_digits))])  # fmt: skip
        fraction = g.rule((), g.literal(".") + (digits,))
        exponent = g.rule((), (Bytes.of(b"eE"), g.rule((), (Bytes.of(b"+-"),)), digits))
        self.number = g.rule((self.integer, fraction, exponent))
        self.boolean = g.rule(g.literal("true"), g.literal("false"))
        self.null = g.rule(g.literal("null"))

    def _char(self) -> int:
        """One character of a JSON string: unescaped (not a quote, backslash or control character),
        an escape, or a well-formed multi-byte UTF-8 sequence (RFC 3629: no overlongs, no surrogates)."""
        g = self.g
        tail = Bytes.span(0x80, 0xBF)
        hexdigit = Bytes.of(b"0123456789abcdefABCDEF")
        plain = Bytes.span(0x20, 0x7F).mask & ~Bytes.of(b'"\\').mask
        return g.rule(
            (Bytes(plain),),
            (Bytes.of(b"\\"), Bytes.of(b'"\\/bfnrt')),
            (Bytes.of(b"\\"), Bytes.of(b"u"), hexdigit, hexdigit, hexdigit, hexdigit),
            (Bytes.span(0xC2, 0xDF), tail),
            (Bytes.of([0xE0]), Bytes.span(0xA0, 0xBF), tail),
            (Bytes.span(0xE1, 0xEC) | Bytes.span(0xEE, 0xEF), tail, tail),
            (Bytes.of([0xED]), Bytes.span(0x80, 0x9F), tail),
            (Bytes.of([0xF0]), Bytes.span(0x90, 0xBF), tail, tail),
            (Bytes.span(0xF1, 0xF3), tail, tail, tail),
            (Bytes.of([0xF4]), Bytes.span(0x80, 0x8F), tail, tail),
        )

    def sequence(self, open_: str, item: int, close: str, min_items: int = 0, max_items: int | None = None) -> int:
        """open_ item, item, ... close with min_items..max_items items (None: no limit)."""
        g, ws = self.g, self.ws
        if max_items == 0:
            return g.rule((*g.literal(open_), ws, *g.literal(close)))
        comma = (ws, *g.literal(","), ws)
        if max_items is None:
            more = g.new_rule()  # (, item)*
            g.define(more, (), (*comma, item, more))
        else:
            more = g.rule(())
            for _ in range(max_items - max(min_items, 1)):
                more = g.rule((), (*comma, item, more))
        for _ in range(max(min_items, 1) - 1):  # the mandatory ones after the first
            more = g.rule((*comma, item, more))
        alternatives = [(*g.literal(open_), ws, item, more, ws, *g.literal(close))]
        if min_items == 0:
            alternatives.append((*g.literal(open_), ws, *g.literal(close)))
        return g.rule(*alternatives)

    def member(self, value: int) -> int:
        """"key": value, with any key."""
        return self.g.rule((self.string, self.ws, *self.g.literal(":"), self.ws, value))

    def any_value(self) -> int:
        if self._any is None:
            self._any = self.g.new_rule()
            obj = self.sequence("{", self.member(self._any), "}")
            arr = self.sequence("[", self._any, "]")
            self.g.define(self._any, (obj,), (arr,), (self.string,), (self.number,), (self.boolean,), (self.null,))
        return self._any

    def any_object(self) -> int:
        self.any_value()
        return self.sequence("{", self.member(self._any), "}")


def json_object_grammar() -> Grammar:
    """Any JSON object (OpenAI's response_format {"type": "json_object"}), after optional whitespace."""
    g = Grammar()
    json_rules = _JsonRules(g)
    g.root = g.rule((json_rules.ws, json_rules.any_object()))
    return g


# JSON Schema keywords that only describe (they constrain nothing here); `format` is an annotation
# too unless a validator opts in to asserting it (JSON Schema 2020-12, "format-annotation").
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "format", "$defs", "definitions"})  # fmt: skip
SUPPORTED = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength"},
    "integer": set(),
    "number": set(),
    "boolean": set(),
    "null": set(),
}
TYPES = tuple(SUPPORTED)


def schema_grammar(schema: Any) -> Grammar:
    """The grammar of JSON text (after optional whitespace) that validates against `schema`.

    Supported: type (one or a list), properties / required / additionalProperties (a bool or a
    schema), items / minItems / maxItems, minLength / maxLength, enum, const, anyOf, $ref to
    "#", "#/$defs/..." or "#/definitions/...", and the annotations in ANNOTATIONS. Anything else
    (pattern, minimum, oneOf, allOf, not, if, patternProperties, uniqueItems, ...) is refused with a
    SchemaError naming it.
    """
    g = Grammar()
    compiler = _SchemaCompiler(g, schema)
    g.root = g.rule((compiler.json.ws, compiler.compile(schema, "#")))
    return g


class _SchemaCompiler:
    def __init__(self, g: Grammar, root: Any):
        self.g, self.root = g, root
        self.json = _JsonRules(g)
        self.refs: dict[str, int] = {}

    def compile(self, schema: Any, where: str) -> int:
        if schema is True or schema == {}:
            return self.json.any_value()
        if schema is False:
            raise SchemaError(f"{where}: the schema `false` allows no value at all")
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be an object or a boolean, got {type(schema).__name__}")
        if "$ref" in schema:
            self._only(schema, {"$ref"}, where)
            return self._ref(schema["$ref"], where)
        if "anyOf" in schema:
            self._only(schema, {"anyOf"}, where)
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                raise SchemaError(f"{where}/anyOf: must be a non-empty list of schemas")
            return self.g.rule(*[(self.compile(s, f"{where}/anyOf/{i}"),) for i, s in enumerate(options)])
        if "const" in schema or "enum" in schema:
            key = "const" if "const" in schema else "enum"
            self._only(schema, {key, "type"}, where)
            values = [schema["const"]] if key == "const" else schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}/enum: must be a non-empty list")
            return self.g.rule(*[self.g.literal(_dumps(v, f"{where}/{key}")) for v in values])
        types = schema.get("type", list(TYPES))
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(t not in SUPPORTED for t in types):
            raise SchemaError(f"{where}/type: expected one of {list(TYPES)} or a list of them, got {schema.get('type')!r:.80}")
        self._only(schema, {"type"}.union(*(SUPPORTED[t] for t in types)), where)
        return self.g.rule(*[(self._typed(t, schema, where),) for t in dict.fromkeys(types)])

    def _only(self, schema: dict, allowed: set[str], where: str) -> None:
        extra = [k for k in schema if k not in allowed and k not in ANNOTATIONS]
        if extra:
            raise SchemaError(f"{where}: the keyword {extra[0]!r} is not supported by constrained decoding "
                              f"(supported here: {sorted(allowed)}, plus annotations)")  # fmt: skip

    def _typed(self, kind: str, schema: dict, where: str) -> int:
        j, g = self.json, self.g
        if kind == "string":
            lo, hi = self._count(schema, "minLength", where), self._count(schema, "maxLength", where)
            if lo == 0 and hi is None:
                return j.string
            return g.rule(g.literal('"') + (self._repeat(j.char, lo, hi),) + g.literal('"'))
        if kind == "integer":
            return j.integer
        if kind == "number":
            return j.number
        if kind == "boolean":
            return j.boolean
        if kind == "null":
            return j.null
        if kind == "array":
            items = self.compile(schema.get("items", True), f"{where}/items")
            lo, hi = self._count(schema, "minItems", where), self._count(schema, "maxItems", where)
            return j.sequence("[", items, "]", lo, hi)
        return self._object(schema, where)

    def _count(self, schema: dict, key: str, where: str) -> int | None:
        value = schema.get(key)
        if value is None:
            return 0 if key.startswith("min") else None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPEAT:
            raise SchemaError(f"{where}/{key}: must be an integer in [0, {MAX_REPEAT}], got {value!r:.40}")
        low = schema.get(key.replace("max", "min"), 0) if key.startswith("max") else 0
        if key.startswith("max") and isinstance(low, int) and value < low:
            raise SchemaError(f"{where}/{key}: {value} is below {key.replace('max', 'min')} {low}")
        return value

    def _repeat(self, item: int, lo: int, hi: int | None) -> int:
        """item repeated lo..hi times (hi None: no limit)."""
        g = self.g
        if hi is None:
            rest = g.new_rule()
            g.define(rest, (), (item, rest))
        else:
            rest = g.rule(())
            for _ in range(hi - lo):
                rest = g.rule((), (item, rest))
        for _ in range(lo):
            rest = g.rule((item, rest))
        return rest

    def _object(self, schema: dict, where: str) -> int:
        j, g = self.json, self.g
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict):
            raise SchemaError(f"{where}/properties: must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}/required: must be a list of strings")
        missing = [r for r in required if r not in properties]
        if missing:
            raise SchemaError(f"{where}/required: {missing[0]!r} is required but not among the properties")
        extra = schema.get("additionalProperties", True)
        if not properties:  # a map: any keys, each value as additionalProperties says
            if extra is False:
                return g.rule(g.literal("{") + (j.ws,) + g.literal("}"))
            return j.sequence("{", j.member(self.compile(extra, f"{where}/additionalProperties")), "}")
        if extra is not True and extra is not False:
            self.compile(extra, f"{where}/additionalProperties")  # checked; no extra keys are written
        members = [g.rule(g.literal(_dumps(name, where)) + (j.ws, *g.literal(":"), j.ws,
                                                            self.compile(s, f"{where}/properties/{name}")))
                   for name, s in properties.items()]  # fmt: skip
        needed = [name in required for name in properties]
        n = len(members)
        comma = (j.ws, *g.literal(","), j.ws)
        # after[k]: the members from k on, given that at least one was written before (so each starts with a comma)
        after = [0] * (n + 1)
        after[n] = g.rule(())
        for k in range(n - 1, -1, -1):
            options = [(*comma, members[k], after[k + 1])]
            if not needed[k]:
                options.append((after[k + 1],))
            after[k] = g.rule(*options)
        # first[k]: the members from k on, none written yet
        first = [0] * (n + 1)
        first[n] = g.rule(())
        for k in range(n - 1, -1, -1):
            options = [(members[k], after[k + 1])]
            if not needed[k]:
                options.append((first[k + 1],))
            first[k] = g.rule(*options)
        return g.rule(g.literal("{") + (j.ws, first[0], j.ws) + g.literal("}"))

    def _ref(self, ref: Any, where: str) -> int:
        if not isinstance(ref, str):
            raise SchemaError(f"{where}/$ref: must be a string")
        if ref in self.refs:
            return self.refs[ref]
        if ref == "#":
            target = self.root
        else:
            parts = ref.split("/")
            if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
                raise SchemaError(f"{where}/$ref: only '#', '#/$defs/<name>' and '#/definitions/<name>' are "
                                  f"supported, got {ref!r:.80}")  # fmt: skip
            defs = self.root.get(parts[1]) if isinstance(self.root, dict) else None
            if not isinstance(defs, dict) or parts[2] not in defs:
                raise SchemaError(f"{where}/$ref: {ref!r:.80} points to nothing")
            target = defs[parts[2]]
        rule = self.refs[ref] = self.g.new_rule()  # before compiling it: the target may refer to itself
        self.g.define(rule, (self.compile(target, ref),))
        return rule


def _dumps(value: Any, where: str) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise SchemaError(f"{where}: {e}") from None


# ---- 2. parse states --------------------------------------------------------------------------------


State = frozenset  # of node ids: stacks whose top is a byte set, or ACCEPT


class Parser:
    """The parse states of one Grammar. Frames are interned: node n is (alternative, position,
    parent node), where the alternative's symbol at `position` is the next to match and `parent`
    is where to continue once the alternative is done. Everything derived from a node (its byte
    mask, the states after its byte, its distance) is computed once."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.alts: list[tuple] = []  # every alternative of every rule
        self.rule_alts: list[list[int]] = []
        for alternatives in grammar.rules:
            self.rule_alts.append([len(self.alts) + i for i in range(len(alternatives))])
            self.alts.extend(alternatives)
        self.rule_min = self._shortest()
        # suffix[a][i]: the fewest bytes alternative a derives from symbol i on
        self.suffix = []
        for alt in self.alts:
            tail = [0] * (len(alt) + 1)
            for i in range(len(alt) - 1, -1, -1):
                tail[i] = tail[i + 1] + (1 if isinstance(alt[i], Bytes) else self.rule_min[alt[i]])
            self.suffix.append(tail)
        self.node_key: list[tuple] = [(-1, -1, -1)]  # node 0 is ACCEPT
        self.node_ids: dict[tuple, int] = {}
        self.mask: list[int] = [0]
        self.distance: list[int] = [0]
        self.after: dict[int, State] = {}  # node -> state after reading its byte
        self.expanded: dict[int, State] = {ACCEPT: frozenset([ACCEPT])}
        self.steps: dict[tuple[State, int], State | None] = {}
        root_alt = len(self.alts)
        self.alts.append((grammar.root,))
        self.suffix.append([self.rule_min[grammar.root], 0])
        self.start = self._expand(self._node(root_alt, 0, ACCEPT))

    def _shortest(self) -> list[int]:
        """The fewest bytes each rule derives (a fixpoint); a rule that derives no finite string is a bug."""
        best = [math.inf] * len(self.grammar.rules)
        changed = True
        while changed:
            changed = False
            for r, alternatives in enumerate(self.grammar.rules):
                for alt in alternatives:
                    length = sum(1 if isinstance(s, Bytes) else best[s] for s in alt)
                    if length < best[r]:
                        best[r], changed = length, True
        assert all(b < math.inf for b in best), "a grammar rule derives no finite string"
        return [int(b) for b in best]

    @property
    def size(self) -> int:
        return len(self.node_key)

    def _node(self, alt: int, pos: int, parent: int) -> int:
        """The frame continuing alternative `alt` at `pos`, or the parent itself when `alt` is done."""
        if pos == len(self.alts[alt]):
            return parent
        key = (alt, pos, parent)
        node = self.node_ids.get(key)
        if node is None:
            node = self.node_ids[key] = len(self.node_key)
            self.node_key.append(key)
            symbol = self.alts[alt][pos]
            self.mask.append(symbol.mask if isinstance(symbol, Bytes) else 0)
            self.distance.append(self.suffix[alt][pos] + self.distance[parent])
        return node

    def _expand(self, node: int, active: frozenset = frozenset()) -> State:
        """The stacks `node` stands for with a byte set on top: rules on top are replaced by their
        alternatives (an empty alternative continues with what follows the rule)."""
        done = self.expanded.get(node)
        if done is not None:
            return done
        assert node not in active, "a grammar rule refers to itself without reading a byte"
        alt, pos, parent = self.node_key[node]
        symbol = self.alts[alt][pos]
        if isinstance(symbol, Bytes):
            result = frozenset([node])
        else:
            then = self._node(alt, pos + 1, parent)
            result = frozenset().union(*(self._expand(self._node(a, 0, then), active | {node})
                                         for a in self.rule_alts[symbol]))  # fmt: skip
        self.expanded[node] = result
        return result

    def step(self, state: State, byte: int) -> State | None:
        """The state after one more byte, or None if the byte is not allowed."""
        key = (state, byte)
        try:
            return self.steps[key]
        except KeyError:
            pass
        out: set[int] = set()
        for node in state:
            if self.mask[node] >> byte & 1:
                after = self.after.get(node)
                if after is None:
                    alt, pos, parent = self.node_key[node]
                    after = self.after[node] = self._expand(self._node(alt, pos + 1, parent))
                out |= after
        result = frozenset(out) if out else None
        if len(self.steps) >= STEP_CACHE:
            self.steps.clear()
        self.steps[key] = result
        return result

    def feed(self, state: State | None, data: bytes) -> State | None:
        for b in data:
            if state is None:
                return None
            state = self.step(state, b)
        return state

    def distance_of(self, state: State) -> int:
        """The fewest bytes that complete the value from `state` (0: it is complete)."""
        return min(self.distance[n] for n in state)


# ---- 3. tokens ----------------------------------------------------------------------------------------


class Vocabulary:
    """The bytes of every ordinary token of a tokenizer (special and control tokens excluded: their
    text is not what they mean), sorted so that a walk shares the work of common prefixes."""

    def __init__(self, tokenizer):
        special = getattr(tokenizer, "special_ids", frozenset())
        items = []
        for i in range(tokenizer.vocab_size):
            if i in special:
                continue
            raw = tokenizer.token_bytes(i)
            if raw:
                items.append((raw, i))
        items.sort()
        self.size = tokenizer.vocab_size
        self.ids = [i for _, i in items]
        self.bytes = [b for b, _ in items]
        self.token_bytes = {i: b for b, i in items}
        self.lcp = [0] + [_common_prefix(a, b) for a, b in zip(self.bytes, self.bytes[1:])]
        self.longest = max((len(b) for b in self.bytes), default=0)

    def walk(self, parser: Parser, state: State) -> tuple[list[int], list[int]]:
        """Every token allowed after `state` and the distance after it: (ids, distances)."""
        states: list[State | None] = [None] * (self.longest + 1)
        states[0] = state
        ids, distances = [], []
        depth, dead = 0, False  # states[0..depth] hold the previous token's prefix; dead: its byte `depth` failed
        for token_id, raw, shared in zip(self.ids, self.bytes, self.lcp):
            if dead and shared > depth:
                continue  # it starts with the byte that failed the previous token
            d, dead = min(shared, depth), False
            s = states[d]
            while d < len(raw):
                s = parser.step(s, raw[d])
                if s is None:
                    dead = True
                    break
                d += 1
                states[d] = s
            depth = d
            if not dead:
                ids.append(token_id)
                distances.append(min(parser.distance[n] for n in s))
        return ids, distances


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TokenConstraint:
    """A Grammar applied to the tokens of a vocabulary. Shared by all requests with the same grammar;
    each request keeps its own state (start(), then advance() per token).

    `budget` is the number of tokens that may still follow the token being chosen: a token is allowed
    if its bytes continue the grammar and the distance after them is at most `budget`. A request's
    stop tokens are allowed once the value is complete, and only then.
    """

    def __init__(self, grammar: Grammar, vocabulary: Vocabulary, vocab_size: int | None = None):
        self.parser = Parser(grammar)
        self.vocabulary = vocabulary
        self.vocab_size = vocab_size or vocabulary.size  # the model's logits may have padding rows
        self._dist: OrderedDict[State, torch.Tensor] = OrderedDict()

    def start(self) -> State:
        return self.parser.start

    def minimum_tokens(self) -> int:
        """The fewest tokens any complete output takes (one per byte at worst)."""
        return self.parser.distance_of(self.parser.start)

    @staticmethod
    def complete(state: State) -> bool:
        return ACCEPT in state

    @staticmethod
    def finished(state: State) -> bool:
        """Complete, and nothing may follow (an object or array closed at the root)."""
        return state == frozenset([ACCEPT])

    def advance(self, state: State, token: int, budget: int, stop_tokens: Iterable[int] = ()) -> State | None:
        """The state after `token`, or None if the token is not allowed here."""
        if token in stop_tokens:
            return state if self.complete(state) else None
        raw = self.vocabulary.token_bytes.get(token)
        if raw is None:
            return None
        after = self.parser.feed(state, raw)
        if after is None or self.parser.distance_of(after) > budget:
            return None
        return after

    def allowed(self, state: State, budget: int, stop_tokens: Iterable[int] = ()) -> torch.Tensor:
        """(V,) bool: the tokens advance() would accept."""
        mask = self.distances(state) <= budget
        stops = [t for t in stop_tokens if t < self.vocab_size]
        if stops:
            mask[torch.tensor(stops)] = self.complete(state)
        return mask

    def distances(self, state: State) -> torch.Tensor:
        """(V,) int32: the distance after each ordinary token (UNREACHABLE where it is not allowed)."""
        dist = self._dist.get(state)
        if dist is not None:
            self._dist.move_to_end(state)
            return dist
        ids, distances = self.vocabulary.walk(self.parser, state)
        dist = torch.full((self.vocab_size,), UNREACHABLE, dtype=torch.int32)
        if ids:
            dist[torch.tensor(ids)] = torch.tensor(distances, dtype=torch.int32)
        self._dist[state] = dist
        if len(self._dist) > DIST_CACHE:
            self._dist.popitem(last=False)
        return dist
