"""An OpenAI-compatible HTTP API over the continuous-batching Engine of llama/serving/engine.py.

    engine = Engine(llama.load(path), llama.load_tokenizer(path), max_batch_size=8)
    app = create_app(engine, model_name="my-model", api_key=None)
    run_server(app, host="127.0.0.1", port=8000)        # scripts/serve.py does this; Ctrl-C drains

Endpoints, in OpenAI's request and response shapes (and vLLM's, for its extensions):
    GET  /v1/models            the served model, and each LoRA adapter of it as a model of its own
    POST /v1/completions       prompt: a string, a list of strings, token ids, or lists of token ids
    POST /v1/chat/completions  messages in the checkpoint's chat format (tokenizer.encode_dialog), or in
                               Llama 3.1's tool format when tools are involved (llama/serving/tools.py)
    POST /tokenize, /detokenize, GET /tokenizer_info   vLLM's tokenizer endpoints (lm-eval's remote tokenizer)
    GET  /health               {"status": "ok", "engine": {counters}}; 503 if the engine thread died

Request fields: model, prompt / messages, max_tokens (chat: also max_completion_tokens), temperature
[0, 2] (default 1), top_p (0, 1] (default 1), stop (a string or a list), seed (any integer, reduced
modulo 2**64), stream (with stream_options.include_usage), n, logprobs (completions: an int, the
legacy shape; chat: a bool and top_logprobs), logit_bias, presence_penalty and frequency_penalty,
response_format (text, json_object, json_schema: constrained decoding, llama/serving/constrained.py),
user; completions: echo (the prompt, with its logprobs) and max_tokens 0 with it; chat: tools,
tool_choice, parallel_tool_calls; and vLLM's extensions top_k, min_p, repetition_penalty,
ignore_eos and (completions) prompt_logprobs. A known field of the wrong type or out of range is a
400 naming it: numbers must be finite (no NaN or Infinity), and text must be valid Unicode (a lone
surrogate such as "\\ud800" is refused, as everywhere in the project).

Nothing is silently ignored: a field this server does not know (e.g. vLLM's guided_json, llama.cpp's
grammar, OpenAI's store) is a 400 naming it, and so is a known field whose value asks for
something not implemented (suffix, best_of other than n, a JSON-schema feature constrained decoding
does not support, tools on a checkpoint without Llama 3's chat format).

BOS. A string prompt is encoded with BOS in front, as /tokenize encodes it by default
(add_special_tokens: true); a token-id prompt is taken as given, so the ids /tokenize returns give
the same result as the string. Special-token text inside a string ("<|eot_id|>") is plain text.

Limits on what one request may ask for (each refused with a 400 above it): at most MAX_STOP_STRINGS
stop strings of at most MAX_STOP_LENGTH characters, MAX_PROMPTS prompts in a list, n <= MAX_N,
logprobs / top_logprobs / prompt_logprobs <= MAX_LOGPROBS, MAX_LOGIT_BIAS logit_bias entries,
MAX_TOOLS tools, grammars of at most constrained.MAX_RULES rules, and n x prompts no more than the
engine's slots plus its queue. A `model` other than the served name (or one of the engine's LoRA
adapters, which are served under their own names) is a 404 (model_not_found); omitting it means
the served base model.

Every error is OpenAI's object {"error": {"message", "type", "param", "code"}}: malformed JSON and
bad fields 400, a missing or wrong API key 401, unknown model or path 404, a body over the size limit
413, the engine's slots and queue full 429, the server shutting down 503. A 500 means a bug or a
broken device: it ends that request alone (in a stream: an error event, then [DONE]), and the
connection stays usable. A client that disconnects (streaming or not) has its sequences cancelled,
which frees their slots at the next step.

Shutdown (run_server, on SIGTERM or SIGINT): new requests get 503, accepted ones run on for up to
`shutdown_timeout` seconds, then whatever is left ends with a 503 error object (in a stream: an
error event, then [DONE]).

Each request is logged on one line by the `llama.serving.app` logger: id, method, path, status, prompt
and completion tokens, queue time, time to first token, latency and finish reasons.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.generation import GenerationError, SamplingParams, default_new_tokens
from ..core.tokenizer import ChatFormatError, InvalidTextError, check_text
from . import tools as tool_format
from .constrained import SchemaError, TokenConstraint, Vocabulary, json_object_grammar, schema_grammar
from .engine import (ContextLengthError, Delta, Engine, EngineFullError, EngineStoppedError, PromptLogprob, Request,
                     token_text)  # fmt: skip

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024  # characters; the matcher is linear in the text anyway, this bounds the request's size
MAX_PROMPTS = 128
MAX_N = 128
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_TOOLS = 64
MAX_GRAMMARS = 16  # compiled response formats kept for the next request with the same one
MAX_GRAMMAR_NODES = 2_000_000  # parse frames one kept grammar may accumulate before it is rebuilt afresh
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions; chat defaults to the rest of the context


# ---- errors ---------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return _JSON(self.body(), status_code=self.status)


class _JSON(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message may quote a client's text, and a lone
    surrogate in it cannot be encoded as UTF-8 (the response would fail as it is sent)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _validation_error(exc: RequestValidationError, content_type: str) -> APIError:
    """The first of pydantic's errors as a 400: the field it is about becomes `param`. Of a union's
    errors (one per member), one raised by our own validators says more than "should be a string";
    fields the server does not know are named all together."""
    errors = exc.errors()
    error = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", error.get("msg"))
        return APIError(400, f"We could not parse the JSON body of your request: {detail}", code="invalid_json")
    unknown = [_path(e) for e in errors if e.get("type") == "extra_forbidden"]
    if unknown and error.get("type") != "value_error":
        names = ", ".join(dict.fromkeys(".".join(p) for p in unknown))
        return APIError(400, f"Unrecognized request argument supplied: {names} (this server implements the fields "
                             "listed in its README; it ignores none)", param=unknown[0][0], code="unknown_parameter")  # fmt: skip
    loc = _path(error)
    if not loc:
        hint = "" if "json" in content_type else " (send it with the header 'Content-Type: application/json')"
        return APIError(400, f"The request body must be a JSON object{hint}: {error.get('msg')}")
    param = loc[0]
    got = repr(error.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    message = f"Invalid value for '{'.'.join(loc)}': {error.get('msg')}"
    if error.get("type") != "missing":
        message += f" (got {got})"
    return APIError(400, message, param=param, code="missing_required_parameter" if error.get("type") == "missing" else None)


def _path(error: dict) -> list[str]:
    """Where an error is, without the "body" root and the union members pydantic names ('stop', 'list[str]', 0)."""
    return [str(p) for p in error.get("loc", ()) if p != "body" and not _UNION_MEMBER.fullmatch(str(p))]


_UNION_MEMBER = re.compile(r"str|int|float|bool|none|[\w-]+\[.*\]|function-after\[.*\]|[A-Z]\w*")


# ---- request bodies ------------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: "0.5" is not a number and 1.5 is not an integer; NaN and Infinity (which Python's JSON
    # parser accepts) are not numbers either; a field we do not know is refused, never ignored
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _unicode(value: str) -> str:
    return check_text(value, "the text")  # a lone surrogate: a 400 naming the field


Text = Annotated[str, AfterValidator(_unicode)]


class StreamOptions(_Body):
    include_usage: bool | None = False


class JsonSchemaFormat(_Body):
    name: Text = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] | bool = Field(True, alias="schema")
    description: Text | None = None
    strict: bool | None = None  # constrained decoding always follows the schema


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Common(_Body):
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: Text | list[Text] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # OpenAI's end-user id: logged with the request
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop strings may have at most {MAX_STOP_LENGTH} characters, got "
                             f"{max(len(s) for s in stops)}")  # fmt: skip
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias):
        for key, value in (bias or {}).items():
            if not re.fullmatch(r"0|[1-9][0-9]{0,9}", key):
                raise ValueError(f"logit_bias keys are token ids written as decimal strings, got {key!r:.40}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {key}")
        return bias


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo or prompt_logprobs
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: Text | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's


class ContentPart(_Body):
    type: Text
    text: Text | None = None


class CalledFunction(_Body):
    name: Text
    arguments: Text


class ToolCallIn(_Body):
    id: Text
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Body):
    role: Text
    content: Text | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's message that called a tool
    tool_call_id: Text | None = None  # a tool's result: the call it answers


class FunctionDefinition(_Body):
    name: Text = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # forced calls always follow the parameters' schema


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: Text


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # Llama 3.1 makes one call per message, which both values allow


class TokenizeRequest(_Body):  # vLLM's POST /tokenize
    model: Text | None = None
    prompt: Text
    add_special_tokens: bool | None = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_Body):  # vLLM's POST /detokenize
    model: Text | None = None
    tokens: list[int]


def _refuse_unsupported(body: _Common) -> None:
    """Values of known fields that ask for something not implemented: refused, not ignored."""
    unsupported = {}
    if isinstance(body, CompletionRequest):
        unsupported = {"suffix": bool(body.suffix), "best_of": body.best_of not in (None, 1, body.n or 1)}
    if isinstance(body, ChatCompletionRequest):
        fmt = body.response_format.type if body.response_format else "text"
        unsupported = {"response_format": bool(body.tools) and fmt != "text"}  # with tools: one constraint at a time
    for name, used in unsupported.items():
        if used:
            raise APIError(400, f"'{name}' is not supported by this server" + (
                " together with tools" if name == "response_format" else ""), param=name, code="unsupported_parameter")  # fmt: skip


def _sampling(body: _Common) -> SamplingParams:
    top_k = body.top_k if body.top_k not in (None, -1, 0) else None
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=top_k, min_p=body.min_p,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        )  # fmt: skip
    except GenerationError as e:
        raise APIError(400, str(e)) from None


# ---- the bridge between the engine thread and the event loop -------------------------------------


class _Job:
    """One HTTP request's sequences in the engine; iterating yields (index, Delta) until all finished
    (or the job is aborted because the client left)."""

    def __init__(self, engine: Engine, requests: list[Request]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = len(requests)
        self.aborted = False
        self.ticket = engine.submit(requests, self._sink)

    def _sink(self, index: int, delta: Delta) -> None:  # the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, delta))

    def abort(self) -> None:
        self.aborted = True
        self.ticket.cancel()
        self.queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[tuple[int, Delta]]:
        while self.remaining:
            item = await self.queue.get()
            if item is None:
                return
            if item[1].finish_reason is not None:
                self.remaining -= 1
            yield item


async def _abort_on_disconnect(request: HTTPRequest, job: _Job) -> None:
    """For non-streaming requests: the body is read, so the next message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.abort()
            return


def _submit(engine: Engine, requests: list[Request], prompt_param: str) -> _Job:
    try:
        return _Job(engine, requests)
    except ContextLengthError as e:
        raise APIError(400, f"This model's maximum context length is {e.context} tokens. However, you requested "
                       f"{e.prompt_tokens + e.max_tokens} tokens ({e.prompt_tokens} in the {prompt_param}, "
                       f"{e.max_tokens} in the completion). Please reduce the length of the {prompt_param} or "
                       f"max_tokens.", param=prompt_param, code="context_length_exceeded") from None
    except GenerationError as e:
        raise APIError(400, str(e), param=prompt_param) from None
    except EngineFullError as e:
        raise APIError(429, str(e), type="requests", code="rate_limit_exceeded") from None
    except EngineStoppedError as e:
        code = "server_shutting_down" if engine.state == "draining" else "engine_stopped"
        raise APIError(503, str(e), type="server_error", code=code) from None


# ---- the app -------------------------------------------------------------------------------------


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 4 * 2**20) -> FastAPI:  # fmt: skip
    """The FastAPI app serving `engine` under `model_name`. The app's lifespan starts and stops the engine
    thread. With `api_key`, every request needs `Authorization: Bearer <api_key>`; an empty key (or
    one with surrounding spaces, which no header could carry) is refused with a ValueError."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip() or api_key != api_key.strip()):
        raise ValueError("the API key must be a non-empty string without surrounding whitespace; "
                         "for a server without a key pass None")  # fmt: skip
    created = int(time.time())
    tokenizer = engine.tokenizer
    fingerprint = system_fingerprint(engine)
    grammars = _Grammars(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="llama-from-scratch", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=max_body_bytes, engine=engine)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        _log_info(request).update(error=exc.message)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        error = _validation_error(exc, request.headers.get("content-type", ""))
        _log_info(request).update(error=error.message)
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code).response()

    # The base model under model_name, and each LoRA adapter of the engine's model under its own name
    # (vLLM's convention for --lora-modules): a request picks one with "model".
    served = [model_name, *(a for a in engine.adapters if a != model_name)]

    def check_model(name: str | None) -> str:
        """The served name a request asked for (omitted: the base model)."""
        if name is not None and name not in served:
            raise APIError(404, f"The model `{name}` does not exist; this server serves {', '.join(f'`{m}`' for m in served)}.",
                           param="model", code="model_not_found")  # fmt: skip
        return model_name if name is None else name

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "llama-from-scratch",
                "max_model_len": engine.context_len}  # fmt: skip
        if name != model_name:
            card.update(root=name, parent=model_name)  # a LoRA adapter of the base model (as vLLM lists them)
        return card

    @app.get("/health")
    async def health():
        stats = engine.stats()  # state: running, draining (shutting down), stopped, failed
        ok = stats["state"] == "running"
        return JSONResponse({"status": "ok" if ok else stats["state"], "model": model_name, "engine": stats},
                            status_code=200 if ok else 503)  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in served]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        return model_card(check_model(name))

    # ---- vLLM's tokenizer endpoints (lm-eval's "remote" tokenizer uses them) ----

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        def text(token_id: int) -> str | None:
            return token_text(tokenizer, token_id) if 0 <= token_id < tokenizer.vocab_size else None

        return {"tokenizer_class": type(tokenizer).__name__, "bos_token": text(tokenizer.bos_id),
                "eos_token": text(tokenizer.eos_id), "pad_token": text(tokenizer.pad_id),
                "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                "pad_token_id": tokenizer.pad_id if tokenizer.pad_id >= 0 else None,
                "stop_token_ids": sorted(engine.stop_tokens), "vocab_size": tokenizer.vocab_size,
                "model_max_length": engine.context_len, "add_bos_token": True, "chat_template": None}  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        ids = await asyncio.to_thread(tokenizer.encode, body.prompt, bos=bool(body.add_special_tokens), eos=False)
        strs = [token_text(tokenizer, i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.context_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {tokenizer.vocab_size})",
                           param="tokens")  # fmt: skip
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}

    # ---- generation ----

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        name = check_model(body.model)
        _refuse_unsupported(body)
        if body.max_tokens == 0 and not body.echo and body.prompt_logprobs is None:
            raise APIError(400, "max_tokens 0 generates nothing: it needs echo or prompt_logprobs", param="max_tokens")
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
        check_capacity(body, len(prompts))  # before the work of tokenizing them
        # In a worker thread: a long prompt takes a while to tokenize, and other clients' streams go on meanwhile.
        ids = await asyncio.to_thread(
            lambda: [tokenizer.encode(p, bos=True, eos=False) if isinstance(p, str) else list(p) for p in prompts]
        )
        constraint = await grammars.constraint(body.response_format)
        # OpenAI's default, or what the context leaves after the longest prompt when that is less
        max_tokens = (default_new_tokens(engine.context_len, max(map(len, ids)), DEFAULT_COMPLETION_TOKENS)
                      if body.max_tokens is None else body.max_tokens)  # fmt: skip
        prompt_k = body.logprobs if body.echo and body.logprobs is not None else None
        if body.prompt_logprobs is not None:
            prompt_k = max(prompt_k or 0, body.prompt_logprobs)
        job = _start(body, ids, max_tokens, body.logprobs, "prompt", request, name, constraint, prompt_k)
        kind = _Completions(job, body, request, tokenizer, name, fingerprint, [len(i) for i in ids])
        kind.prompts = [p for p in ids for _ in range(body.n or 1)]
        kind.added_bos = [isinstance(p, str) for p in prompts for _ in range(body.n or 1)]
        return await kind.respond()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        name = check_model(body.model)
        _refuse_unsupported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        messages = _messages(body)
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        for tool in tools:
            tool["function"].pop("strict", None)  # not part of the prompt
        choice = _tool_choice(body, tools)
        uses_tools = bool(tools) or any(m.call is not None or m.role == "tool" for m in messages)
        if uses_tools and not tool_format.supports_tools(tokenizer):
            raise APIError(400, "tools need Llama 3's chat format (with <|python_tag|>); this checkpoint's tokenizer "
                                "has no such tokens", param="tools", code="unsupported_parameter")  # fmt: skip
        check_capacity(body, 1)
        offered = [] if choice == "none" else tools
        forced = [t for t in offered if choice == "required" or choice == t["function"]["name"]]
        try:
            if uses_tools:
                today = datetime.date.today()
                prompt = await asyncio.to_thread(tool_format.encode_tool_dialog, tokenizer, messages, offered, today,
                                                 bool(forced))  # fmt: skip
            else:
                plain = [{"role": m.role, "content": m.content} for m in messages]
                prompt = await asyncio.to_thread(tokenizer.encode_dialog, plain)
        except (ChatFormatError, InvalidTextError) as e:
            raise APIError(400, str(e), param="messages") from None
        if forced:
            constraint = await grammars.constraint(tool_format.call_schema(forced), param="tools")
        else:
            constraint = await grammars.constraint(body.response_format)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.context_len - len(prompt))
        k = (body.top_logprobs or 0) if body.logprobs else None
        job = _start(body, [prompt], max_tokens, k, "messages", request, name, constraint)
        kind = _ChatCompletions(job, body, request, tokenizer, name, fingerprint, [len(prompt)])
        kind.tools, kind.forced = offered, bool(forced)
        return await kind.respond()

    def check_capacity(body: _Common, prompts: int) -> None:
        n = body.n or 1
        capacity = engine.max_batch_size + engine.max_queue
        if n * prompts > capacity:
            raise APIError(400, f"n x prompts = {n * prompts} sequences exceed this server's capacity of "
                           f"{capacity}", param="n")  # fmt: skip

    def _start(body: _Common, prompts: list[list[int]], max_tokens: int, logprobs: int | None, param: str,
               request: HTTPRequest, name: str, constraint: TokenConstraint | None = None,
               prompt_logprobs: int | None = None) -> _Job:  # fmt: skip
        n = body.n or 1
        sampling = _sampling(body)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop_tokens = frozenset() if body.ignore_eos else None
        bias = {int(t): b for t, b in (body.logit_bias or {}).items()}
        requests = []
        for p in prompts:
            for j in range(n):  # choice j of a prompt: seed + j, so n samples differ but reproduce
                seed = None if body.seed is None else (body.seed + j) % 2**64
                adapter = None if name == model_name else name
                requests.append(Request(p, max_tokens, sampling, seed, stop, stop_tokens, logprobs,
                                        prompt_logprobs=prompt_logprobs if j == 0 else None,  # the choices share them
                                        logit_bias=bias or None, presence_penalty=body.presence_penalty or 0.0,
                                        frequency_penalty=body.frequency_penalty or 0.0, constraint=constraint, adapter=adapter))  # fmt: skip
        _log_info(request).update(prompt_tokens=sum(len(p) for p in prompts))
        return _submit(engine, requests, param)

    return app


def system_fingerprint(engine: Engine) -> str:
    """What determines this server's outputs for a seed: the model's configuration and dtype, the
    code's version and torch's (OpenAI's system_fingerprint)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("llama-from-scratch")
    except PackageNotFoundError:
        ours = "source"
    weights = next(iter(engine.model.parameters()), None)
    parts = [repr(engine.model.config), str(weights.dtype if weights is not None else None), ours, torch.__version__,
             type(engine.model).__name__]  # fmt: skip
    return "fp_" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _messages(body: ChatCompletionRequest) -> list[tool_format.Message]:
    """The request's messages as text, with the calls an assistant made and the results of tools."""
    out, pending_calls = [], set()
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "\n".join(part.text for part in content)
        role = "system" if m.role == "developer" else m.role
        call = None
        if m.tool_calls:
            if role != "assistant" or len(m.tool_calls) > 1 or (content or "").strip():
                raise APIError(400, f"messages[{i}]: tool_calls belong to an assistant message without content, one "
                               "call per message (Llama 3.1's format has no more)", param="messages")  # fmt: skip
            called = m.tool_calls[0]
            call = tool_format.ToolCall(called.function.name, called.function.arguments)
            pending_calls.add(called.id)
        if (m.tool_call_id is not None) != (role == "tool"):
            raise APIError(400, f"messages[{i}]: a message of role 'tool' needs 'tool_call_id', and only it may have one",
                           param="messages")  # fmt: skip
        if role == "tool" and m.tool_call_id not in pending_calls:
            raise APIError(400, f"messages[{i}]: tool_call_id {m.tool_call_id!r:.80} answers no earlier tool call",
                           param="messages")  # fmt: skip
        out.append(tool_format.Message(role, content or "", call))
    return out


def _tool_choice(body: ChatCompletionRequest, tools: list[dict]) -> str:
    """"none", "auto", "required", or the name of the function the request forces."""
    choice = body.tool_choice
    if choice is None:
        return "auto" if tools else "none"
    if choice != "none" and not tools:
        raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        names = [t["function"]["name"] for t in tools]
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r:.80}, which is not among the tools "
                           f"{names[:10]}", param="tool_choice")  # fmt: skip
        return choice.function.name
    return choice


class _Grammars:
    """Compiled response formats, kept for the next request with the same one (a grammar also keeps
    the allowed tokens of every parse state it met, which is most of its work). Built in a worker
    thread: a large schema takes a while to compile, the tokenizer's vocabulary once a while to read."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.vocabulary: Vocabulary | None = None
        self.cache: OrderedDict[str, TokenConstraint] = OrderedDict()
        self.lock = threading.Lock()

    async def constraint(self, fmt: ResponseFormat | dict | None, param: str = "response_format") -> TokenConstraint | None:
        if fmt is None or (isinstance(fmt, ResponseFormat) and fmt.type == "text"):
            return None
        if isinstance(fmt, ResponseFormat) and fmt.type == "json_schema" and fmt.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs 'json_schema': {'name', 'schema'}",
                           param=param)  # fmt: skip
        schema = fmt if isinstance(fmt, dict) else None if fmt.type == "json_object" else fmt.json_schema.schema_
        key = json.dumps(schema, sort_keys=True)
        try:
            return await asyncio.to_thread(self._get, key, schema)
        except SchemaError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="unsupported_schema") from None
        except RecursionError:
            raise APIError(400, f"{param}: the schema is nested too deeply", param=param) from None

    def _get(self, key: str, schema: Any) -> TokenConstraint:
        with self.lock:
            cached = self.cache.get(key)
            if cached is not None and cached.parser.size < MAX_GRAMMAR_NODES:
                self.cache.move_to_end(key)
                return cached
            if self.vocabulary is None:
                self.vocabulary = Vocabulary(self.engine.tokenizer)
            grammar = json_object_grammar() if schema is None else schema_grammar(schema)
            constraint = self.cache[key] = TokenConstraint(grammar, self.vocabulary, self.engine.vocab_size)
            if len(self.cache) > MAX_GRAMMARS:
                self.cache.popitem(last=False)
            return constraint


def run_server(app: FastAPI, *, host: str, port: int, shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Serve `app` (from create_app) with uvicorn until SIGTERM or SIGINT, then shut down gracefully:
    the engine admits nothing new (503), the requests it has run for up to `shutdown_timeout` seconds,
    and whatever is left then ends with an error (503; in a stream, an error event and [DONE])."""
    # access_log off: the app logs its own line per request, with tokens and latency. uvicorn's own
    # grace period is a backstop a little longer than the engine's, which ends every request itself.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout + 5)  # fmt: skip
    try:
        GracefulServer(config, app.state.engine, shutdown_timeout).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it has handled, once it has shut down
        pass


class GracefulServer(uvicorn.Server):
    """uvicorn's server, draining the engine when it starts shutting down (a signal, or should_exit)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout: float):
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        # Before uvicorn closes idle connections and waits for the busy ones: those finish (or are
        # ended by the engine when the grace period is over) instead of being cancelled mid-response.
        logger.info("shutting down: finishing the requests in flight for up to %.0f s", self.shutdown_timeout)
        self.engine.drain(self.shutdown_timeout)
        await super().shutdown(sockets)


def _log_info(request) -> dict:
    return request.scope.setdefault("llama.log", {})


# ---- responses -----------------------------------------------------------------------------------


class _Response:
    """Turns a job's Deltas into an OpenAI response: one JSON object, or server-sent events."""

    object_name: str
    id_prefix: str

    def __init__(self, job: _Job, body: _Common, request: HTTPRequest, tokenizer, model_name: str, fingerprint: str,
                 prompt_lengths: list[int]):  # fmt: skip
        self.job, self.body, self.request, self.tokenizer = job, body, request, tokenizer
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model, self.fingerprint = model_name, fingerprint
        self.n_choices = job.remaining
        self.prompt_tokens = sum(prompt_lengths)
        self.completion_tokens = 0
        self.finish_reasons: list[str | None] = [None] * self.n_choices
        self.stats = []
        self.log = _log_info(request)
        self.log.update(id=self.id)

    def usage(self) -> dict:
        # cached_tokens: prompt tokens whose keys and values the engine's prefix cache supplied
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in self.stats)}}  # fmt: skip

    def _account(self, index: int, delta: Delta) -> None:
        self.completion_tokens += len(delta.tokens)
        if delta.finish_reason is not None:
            self.finish_reasons[index] = delta.finish_reason
            if delta.stats is not None:
                self.stats.append(delta.stats)
            self.log.update(
                completion_tokens=self.completion_tokens,
                finish=",".join(sorted({r for r in self.finish_reasons if r})),
                queue_time=max(s.queue_time for s in self.stats) if self.stats else 0.0,
                ttft=max(s.time_to_first_token for s in self.stats) if self.stats else 0.0,
            )  # fmt: skip

    async def respond(self) -> Response:
        if self.body.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self._events(), media_type="text/event-stream", headers=headers)
        watcher = asyncio.create_task(_abort_on_disconnect(self.request, self.job))
        try:
            async for index, delta in self.job:
                self._account(index, delta)
                if delta.error is not None:
                    raise _delta_error(delta)
                self.collect(index, delta)
        finally:
            watcher.cancel()
            self.job.ticket.cancel()  # no-op once finished
        if self.job.aborted:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        headers = {"X-Queue-Time-Ms": f"{self.log.get('queue_time', 0.0) * 1e3:.1f}"}
        return JSONResponse(self.result(), headers=headers)

    async def _events(self) -> AsyncIterator[str]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            for chunk in self.opening_chunks():
                yield _sse(self._chunk(chunk, include_usage))
            async for index, delta in self.job:
                self._account(index, delta)
                if delta.error is not None:
                    yield _sse(_delta_error(delta).body(), ascii=True)
                    break
                try:
                    chunks = [_sse(self._chunk(chunk, include_usage)) for chunk in self.chunks(index, delta)]
                except Exception as e:  # a bug turning this delta into chunks: this stream ends, properly
                    logger.exception("a stream failed")
                    self.log.update(error=f"{type(e).__name__}: {e}")
                    yield _sse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(), ascii=True)
                    break
                for chunk in chunks:
                    yield chunk
            if include_usage:
                yield _sse({**self._chunk([], False), "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: the stream is cancelled, and so are the sequences
            self.job.ticket.cancel()

    def _chunk(self, choices: list[dict], include_usage: bool) -> dict:
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "system_fingerprint": self.fingerprint, "choices": choices}  # fmt: skip
        if include_usage:
            chunk["usage"] = None
        return chunk

    def _result(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices, "usage": self.usage()}  # fmt: skip

    # what each endpoint fills in
    chunk_object: str

    def opening_chunks(self) -> list[list[dict]]:
        return []

    def collect(self, index: int, delta: Delta) -> None:
        raise NotImplementedError

    def result(self) -> dict:
        raise NotImplementedError

    def chunks(self, index: int, delta: Delta) -> list[list[dict]]:
        raise NotImplementedError


def _sse(obj: dict, ascii: bool = False) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=ascii, separators=(',', ':'))}\n\n"


def _delta_error(delta: Delta) -> APIError:
    """The error a request ended with in the engine, as the client sees it."""
    if delta.error_kind == "shutdown":
        return APIError(503, delta.error, type="server_error", code="server_shutting_down")
    return APIError(500, f"generation failed: {delta.error}", type="server_error", code="generation_failed")


class _Completions(_Response):
    """Completions; with echo, each choice's text and logprobs begin with its prompt's (the first
    token's logprob null, as OpenAI's legacy API has it); vLLM's prompt_logprobs come per choice."""

    id_prefix, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        self.texts = [""] * self.n_choices
        self.logprobs = [_empty_legacy_logprobs() for _ in range(self.n_choices)]
        self.prompts: list[list[int]] = []  # each choice's prompt ids (set by the endpoint)
        self.added_bos: list[bool] = []  # whether the server put BOS in front (a string prompt)
        self.scored: dict[int, tuple[PromptLogprob, ...]] = {}  # by prompt: the n choices of a prompt share them
        self.begun = [False] * self.n_choices
        self.echoed = [0] * self.n_choices  # characters of echoed prompt before the completion
        self.prompt_logprobs: list[list | None] = [None] * self.n_choices

    def _prompt_part(self, index: int, delta: Delta) -> tuple[str, dict | None]:
        """What comes before the completion in choice `index`: the echoed prompt and its logprobs,
        on the choice's first Delta (the engine sends the prompt's logprobs before any token)."""
        prompt = index // (self.body.n or 1)
        if delta.prompt_logprobs is not None:
            self.scored[prompt] = delta.prompt_logprobs
        if self.begun[index]:
            return "", None
        self.begun[index] = True
        scored = self.scored.get(prompt)
        if self.body.prompt_logprobs is not None:
            self.prompt_logprobs[index] = _vllm_prompt_logprobs(self.tokenizer, scored, self.body.prompt_logprobs)
        if not self.body.echo:
            return "", None
        text, offsets = _text_with_offsets(self.tokenizer, self.prompts[index], self.added_bos[index])
        self.echoed[index] = len(text)
        if self.body.logprobs is None:
            return text, None
        out = _empty_legacy_logprobs()
        for p, offset in zip(scored, offsets):
            name = token_text(self.tokenizer, p.id)
            out["tokens"].append(name)
            out["token_logprobs"].append(p.logprob)
            if p.logprob is None:
                out["top_logprobs"].append(None)
            else:
                top = {token_text(self.tokenizer, i): lp for i, lp in p.top[: self.body.logprobs]}
                top.setdefault(name, p.logprob)
                out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
        return text, out

    def _legacy_logprobs(self, index: int, delta: Delta, prompt_part: dict | None) -> dict | None:
        if self.body.logprobs is None:
            return None
        out = prompt_part or _empty_legacy_logprobs()
        for t in delta.logprobs or ():
            text = token_text(self.tokenizer, t.id)
            out["tokens"].append(text)
            out["token_logprobs"].append(t.logprob)
            top = {token_text(self.tokenizer, i): lp for i, lp in t.top}
            top.setdefault(text, t.logprob)  # OpenAI: the top k, plus the sampled token
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.echoed[index] + t.offset)
        return out

    def collect(self, index: int, delta: Delta) -> None:
        echo, prompt_part = self._prompt_part(index, delta)
        self.texts[index] += echo + delta.text
        part = self._legacy_logprobs(index, delta, prompt_part)
        if part is not None:
            for key, values in part.items():
                self.logprobs[index][key] += values

    def result(self) -> dict:
        choices = []
        for i in range(self.n_choices):
            choice = {"index": i, "text": self.texts[i], "logprobs": self.logprobs[i] if self.body.logprobs is not None else None,
                      "finish_reason": self.finish_reasons[i]}  # fmt: skip
            if self.body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self.prompt_logprobs[i]
            choices.append(choice)
        return self._result(choices)

    def chunks(self, index: int, delta: Delta) -> list[list[dict]]:
        first = not self.begun[index]
        echo, prompt_part = self._prompt_part(index, delta)
        if not (echo or delta.text or delta.tokens or delta.finish_reason or (first and self.body.prompt_logprobs is not None)):
            return []  # the prompt's logprobs alone, with nothing to show for them yet
        choice = {"index": index, "text": echo + delta.text, "logprobs": self._legacy_logprobs(index, delta, prompt_part),
                  "finish_reason": delta.finish_reason}  # fmt: skip
        if first and self.body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.prompt_logprobs[index]
        return [[choice]]


def _empty_legacy_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _text_with_offsets(tokenizer, ids: list[int], added_bos: bool) -> tuple[str, list[int]]:
    """The text of a prompt and where each token's text starts in it (a token that completes a
    character split over several tokens carries it). A BOS the server added is not part of the
    text the client sent: it stands at offset 0 and adds no text."""
    decoder = tokenizer.stream_decoder()
    text, offsets = "", []
    if added_bos:
        ids, offsets = ids[1:], [0]
    for token_id in ids:
        offsets.append(len(text))
        text += decoder.push(token_id)
    return text + decoder.flush(), offsets


def _vllm_prompt_logprobs(tokenizer, scored: tuple[PromptLogprob, ...] | None, k: int) -> list | None:
    """vLLM's shape: per prompt token, null for the first, else {token id: {logprob, rank,
    decoded_token}} for the token itself and the k most likely ones."""
    if scored is None:
        return None
    out: list = []
    for p in scored:
        if p.logprob is None:
            out.append(None)
            continue
        entry = {str(i): {"logprob": lp, "rank": r + 1, "decoded_token": token_text(tokenizer, i)}
                 for r, (i, lp) in enumerate(p.top[:k])}  # fmt: skip
        entry.setdefault(str(p.id), {"logprob": p.logprob, "rank": p.rank, "decoded_token": token_text(tokenizer, p.id)})
        out.append(entry)
    return out


class _ChatCompletions(_Response):
    """Chat completions. With tools offered, a choice's output is held back until it is complete and
    then answered as a tool call (finish_reason "tool_calls") if it is one, else as text."""

    id_prefix, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, *args):
        super().__init__(*args)
        self.texts = [""] * self.n_choices
        self.logprobs: list[list[dict]] = [[] for _ in range(self.n_choices)]
        self.tools: list[dict] = []  # offered to the model (set by the endpoint)
        self.forced = False  # the prompt opened a call: the output is its JSON

    def _content_logprobs(self, delta: Delta) -> list[dict] | None:
        if delta.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            return {"token": token_text(self.tokenizer, token_id), "logprob": logprob,
                    "bytes": list(self.tokenizer.token_bytes(token_id))}  # fmt: skip

        generated = delta.logprobs[: len(delta.tokens)]  # without the stop token (not part of the message)
        return [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in generated]

    def _call(self, index: int) -> dict | None:
        """Choice `index`'s tool call in OpenAI's shape, if its (complete) output is one."""
        if not self.tools or self.finish_reasons[index] in (None, "error"):
            return None
        text = self.texts[index]
        call = tool_format.parse_call("<|python_tag|>" + text if self.forced else text, self.tools)
        if call is None:
            return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip

    def _message(self, index: int) -> tuple[dict, str | None]:
        call = self._call(index)
        if call is not None:
            return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        return {"role": "assistant", "content": self.texts[index]}, self.finish_reasons[index]

    def collect(self, index: int, delta: Delta) -> None:
        self.texts[index] += delta.text
        self.logprobs[index] += self._content_logprobs(delta) or []

    def result(self) -> dict:
        choices = []
        for i in range(self.n_choices):
            message, finish = self._message(i)
            choices.append({"index": i, "message": message, "logprobs": {"content": self.logprobs[i]} if self.body.logprobs else None,
                            "finish_reason": finish})  # fmt: skip
        return self._result(choices)

    def opening_chunks(self) -> list[list[dict]]:
        return [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
                for i in range(self.n_choices)]  # fmt: skip

    def chunks(self, index: int, delta: Delta) -> list[list[dict]]:
        logprobs = self._content_logprobs(delta)
        if self.tools:  # held back until the output is complete
            self.collect(index, delta)
            if delta.finish_reason is None:
                return []
            message, finish = self._message(index)
            if message["content"] is None:
                update = {"tool_calls": [{"index": 0, **message["tool_calls"][0]}]}
            else:
                update = {"content": message["content"]}
            logprobs = {"content": self.logprobs[index]} if self.body.logprobs else None
            return [[{"index": index, "delta": update, "logprobs": logprobs, "finish_reason": None}],
                    [{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}]]  # fmt: skip
        out = []
        if delta.text or logprobs:
            out.append([{"index": index, "delta": {"content": delta.text},
                         "logprobs": {"content": logprobs} if logprobs is not None else None,
                         "finish_reason": None}])  # fmt: skip
        if delta.finish_reason is not None:
            out.append([{"index": index, "delta": {}, "logprobs": None, "finish_reason": delta.finish_reason}])
        return out


# ---- the gate: API key, body size, one log line per request ---------------------------------------


class _Gate:
    """Pure ASGI middleware, outermost: checks the API key, refuses new requests while the engine does
    not admit any (503; /health still answers), caps the body size (Content-Length and the bytes
    actually received, so a chunked body cannot slip past), answers a bug's exception with a 500
    error object instead of letting it reach the server (which would drop the keep-alive
    connection), and logs one line per request."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, engine: Engine):
        self.app, self.api_key, self.max_body_bytes, self.engine = app, api_key, max_body_bytes, engine

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        info = scope.setdefault("llama.log", {})
        status = [0]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._refuse(scope)
            if error is None:
                body, error = await self._read_body(receive)
            if error is not None:
                info.setdefault("error", error.message)
                await error.response()(scope, receive, send_and_record)
                return
            await self.app(scope, _replay(body, receive), send_and_record)
        except Exception as e:  # a bug: logged with its traceback, answered with OpenAI's error object
            logger.exception("unexpected error")
            info["error"] = f"{type(e).__name__}: {e}"
            if status[0]:  # the response had begun (a stream): it cannot be completed, so the connection closes
                raise
            await APIError(500, f"internal error: {type(e).__name__}", type="server_error").response()(
                scope, receive, send_and_record)  # fmt: skip
        except BaseException:  # cancelled: the server is going down
            status[0] = status[0] or 500
            raise
        finally:
            self._log(scope, info, status[0], time.perf_counter() - started)

    def _refuse(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self.api_key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                code="invalid_api_key")  # fmt: skip
        if scope.get("path") != "/health" and not self.engine.alive:
            state = self.engine.state
            code = "server_shutting_down" if state in ("draining", "stopped") else "engine_stopped"
            message = "The server is shutting down" if code == "server_shutting_down" else f"The engine is {state}"
            return APIError(503, f"{message} and accepts no new requests.", type="server_error", code=code)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body exceeds this server's limit of {self.max_body_bytes} bytes.",
                        code="request_too_large")  # fmt: skip

    async def _read_body(self, receive) -> tuple[list[dict], APIError | None]:
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None  # the client left; the app sees the disconnect
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return messages, self._too_large()
            if not message.get("more_body", False):
                return messages, None

    @staticmethod
    def _log(scope, info: dict, status: int, latency: float) -> None:
        path = scope.get("path", "")
        level = logging.DEBUG if path == "/health" and status == 200 else logging.INFO
        parts = [info.get("id", "-"), scope.get("method", ""), path, str(status)]
        if "prompt_tokens" in info:
            parts.append(f"in={info['prompt_tokens']} out={info.get('completion_tokens', 0)}")
        if "queue_time" in info:
            parts.append(f"queue={info['queue_time'] * 1e3:.0f}ms ttft={info['ttft'] * 1e3:.0f}ms")
        parts.append(f"latency={latency * 1e3:.0f}ms")
        if "finish" in info:
            parts.append(f"finish={info['finish']}")
        if "error" in info:
            parts.append(f"error={info['error'][:200]!r}")
        logger.log(level, " ".join(parts))


def _replay(messages: list[dict], receive):
    """A receive() that first returns the body messages already read, then the real ones (a disconnect)."""
    pending = list(messages)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
