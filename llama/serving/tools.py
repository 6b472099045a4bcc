"""Tool calling in Llama 3.1's JSON format, as Meta documents it (llama-models,
models/llama3_1/prompt_format.md, "JSON based tool calling"):

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
    Environment: ipython\\n\\nCutting Knowledge Date: December 2023\\nToday Date: 21 September 2024\\n\\n
    {the client's system message}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n
    Answer the user's question by making use of the following functions if needed. ... {the tools,
    one JSON object each} ... Return function calls in JSON format.<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{the question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

The model answers with a call, `<|python_tag|>{"type": "function", "name": ..., "parameters": {...}}`
ending in <|eom_id|> (end of message: the executor runs the tool), or with text ending in <|eot_id|>.
A call in the history is written back the same way; a tool's result is a message of role `ipython`
(the OpenAI role `tool`). Meta's format has one call per message, so a response has at most one.

`tool_choice` "required" or a named function forces a call: the prompt ends with <|python_tag|> and
the output is constrained to the calls' JSON schema (llama/serving/constrained.py); "auto" leaves the
choice to the model and recognises a call in its output; "none" leaves the tools out of the prompt.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..core.tokenizer import ChatFormatError

KNOWLEDGE_DATE = "December 2023"  # Llama 3.1's, as its system prompt states it


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: the function's name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    """A chat message: role system, user, assistant or tool; an assistant's message may be a call."""

    role: str
    content: str = ""
    call: ToolCall | None = None


def supports_tools(tokenizer) -> bool:
    """Llama 3's chat format, with the tokens a call needs."""
    specials = getattr(tokenizer, "special_tokens", {})
    return all(t in specials for t in ("<|python_tag|>", "<|eom_id|>", "<|eot_id|>", "<|start_header_id|>"))


def system_text(system: str, today: datetime.date) -> str:
    """The system message with tools: Meta's environment and date lines, then the client's text."""
    lines = ["Environment: ipython", "", f"Cutting Knowledge Date: {KNOWLEDGE_DATE}",
             f"Today Date: {today.day} {today:%B %Y}"]  # fmt: skip
    if system.strip():
        lines += ["", system.strip()]
    return "\n".join(lines)


def tools_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The user message that lists the tools (each {"type": "function", "function": {...}})."""
    listed = "\n".join(json.dumps(tool, indent=4, ensure_ascii=False) for tool in tools)
    return ("Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            "Here is a list of functions in JSON format:\n"
            f"{listed}\n\nReturn function calls in JSON format.")  # fmt: skip


def call_text(call: ToolCall) -> str:
    """A call as the model writes it after <|python_tag|>."""
    try:
        parameters = json.loads(call.arguments)
    except ValueError:
        raise ChatFormatError(f"the arguments of the call to {call.name!r} are not JSON: {call.arguments!r:.80}") from None
    return json.dumps({"type": "function", "name": call.name, "parameters": parameters}, ensure_ascii=False)


def encode_tool_dialog(tokenizer, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]],
                       today: datetime.date, force_call: bool = False) -> list[int]:  # fmt: skip
    """Prompt ids in Llama 3.1's tool format (see the module docstring), ending where the
    assistant's answer starts; with force_call, after the <|python_tag|> that opens a call.
    `tools` may be empty (a conversation that has used tools, answered without them)."""
    special = tokenizer.special_tokens
    eot, eom, python_tag = special["<|eot_id|>"], special["<|eom_id|>"], special["<|python_tag|>"]

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, bos=False, eos=False)

    system = "\n".join(m.content for m in messages if m.role == "system")
    ids = [tokenizer.bos_id, *tokenizer.header("system"), *text(system_text(system, today)), eot]
    listed = not tools
    for i, m in enumerate(messages):
        if m.role == "system":
            continue
        if m.role == "user" and not listed:
            ids += [*tokenizer.header("user"), *text(tools_text(tools)), eot]
            listed = True
        if m.role == "assistant" and m.call is not None:
            ids += [*tokenizer.header("assistant"), python_tag, *text(call_text(m.call)), eom]
        elif m.role in ("user", "assistant", "tool"):
            ids += [*tokenizer.header(m.role), *text(m.content.strip()), eot]  # header() writes tool as ipython
        else:
            raise ChatFormatError(f"message {i}: unknown role {m.role!r}; expected system, user, assistant or tool")
    if not listed:
        ids += [*tokenizer.header("user"), *text(tools_text(tools)), eot]
    ids += tokenizer.header("assistant")
    return ids + [python_tag] if force_call else ids


def call_schema(tools: Sequence[Mapping[str, Any]]) -> dict:
    """The JSON schema of a call to one of `tools`, in the order Meta's format writes it."""
    options = []
    for tool in tools:
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "required": ["type", "name", "parameters"],
                        "properties": {"type": {"const": "function"}, "name": {"const": function["name"]},
                                       "parameters": parameters}})  # fmt: skip
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse_call(text: str, tools: Sequence[Mapping[str, Any]]) -> ToolCall | None:
    """The call in a model's output, or None if it is an ordinary answer: a JSON object
    {"type": "function"?, "name": one of the tools, "parameters": an object}, after an optional
    <|python_tag|> (its text, as the decoder writes the special token)."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return None
    try:
        call = json.loads(body)
    except ValueError:
        return None
    names = {tool["function"]["name"] for tool in tools}
    if (not isinstance(call, dict) or set(call) - {"type", "name", "parameters"} or call.get("type", "function") != "function"
            or call.get("name") not in names or not isinstance(call.get("parameters"), dict)):  # fmt: skip
        return None
    return ToolCall(call["name"], json.dumps(call["parameters"], ensure_ascii=False))
