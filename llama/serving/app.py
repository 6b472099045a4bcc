"""An OpenAI-compatible HTTP API over the continuous-batching Engine of llama/serving/engine.py.

    engine = Engine(llama.load(path), llama.load_tokenizer(path), max_batch_size=8)
    app = create_app(engine, model_name="my-model", api_key=None)
    run_server(app, host="127.0.0.1", port=8000)        # scripts/serve.py does this; Ctrl-C drains

Endpoints, in OpenAI's request and response shapes:
    GET  /v1/models            the served model, and each LoRA adapter of it as a model of its own
    POST /v1/completions       prompt: a string, a list of strings, token ids, or lists of token ids
    POST /v1/chat/completions  messages in the checkpoint's chat format (tokenizer.encode_dialog)
    GET  /health               {"status": "ok", "engine": {counters}}; 503 if the engine thread died

Request fields: model, prompt / messages, max_tokens (chat: also max_completion_tokens), temperature
[0, 2] (default 1), top_p (0, 1] (default 1), stop (a string or a list), seed (any integer, reduced
modulo 2**64), stream (with stream_options.include_usage), n, logprobs (completions: an int, the
legacy shape; chat: a bool and top_logprobs), and vLLM's extensions top_k, min_p, repetition_penalty
and ignore_eos. Unknown fields are ignored, as OpenAI does; a known field of the wrong type or out of
range is a 400 naming it: numbers must be finite (no NaN or Infinity), and text must be valid
Unicode (a lone surrogate such as "\\ud800" is refused, as everywhere in the project).

Limits on what one request may ask for (each refused with a 400 above it): at most MAX_STOP_STRINGS
stop strings of at most MAX_STOP_LENGTH characters, MAX_PROMPTS prompts in a list, n <= MAX_N,
logprobs / top_logprobs <= MAX_LOGPROBS, MAX_LOGIT_BIAS logit_bias entries, and n x prompts no more
than the engine's slots plus its queue.
Fields whose non-default values change the output in ways not implemented here (echo, suffix,
best_of, logit_bias, presence/frequency penalties, tools, non-text response_format) are refused
with a 400 rather than ignored. A `model` other than the served name (or one of the engine's LoRA
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
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.generation import GenerationError, SamplingParams, default_new_tokens
from ..core.tokenizer import ChatFormatError, InvalidTextError, check_text
from .engine import ContextLengthError, Delta, Engine, EngineFullError, EngineStoppedError, Request, token_text

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024  # characters; the matcher is linear in the text anyway, this bounds the request's size
MAX_PROMPTS = 128
MAX_N = 128
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
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
    errors (one per member), one raised by our own validators says more than "should be a string"."""
    errors = exc.errors()
    error = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    # Drop the "body" root and the union members pydantic names in the path ('stop', 'list[str]', 0).
    loc = [str(p) for p in error.get("loc", ()) if p != "body" and not _UNION_MEMBER.fullmatch(str(p))]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", error.get("msg"))
        return APIError(400, f"We could not parse the JSON body of your request: {detail}", code="invalid_json")
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


_UNION_MEMBER = re.compile(r"str|int|float|bool|none|[\w-]+\[.*\]")


# ---- request bodies ------------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: "0.5" is not a number and 1.5 is not an integer; NaN and Infinity (which Python's JSON
    # parser accepts) are not numbers either; unknown fields are ignored, as OpenAI does
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _unicode(value: str) -> str:
    return check_text(value, "the text")  # a lone surrogate: a 400 naming the field


Text = Annotated[str, AfterValidator(_unicode)]


class StreamOptions(_Body):
    include_usage: bool | None = False


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
    user: Text | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
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


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Body):
    type: Text
    text: Text | None = None


class ChatMessage(_Body):
    role: Text
    content: Text | list[ContentPart] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


def _refuse_unsupported(body: _Common) -> None:
    """Fields we parse but do not implement: refuse non-default values instead of ignoring them."""
    unsupported = {
        "presence_penalty": body.presence_penalty not in (None, 0),
        "frequency_penalty": body.frequency_penalty not in (None, 0),
        "logit_bias": bool(body.logit_bias),
    }
    if isinstance(body, CompletionRequest):
        unsupported |= {"echo": bool(body.echo), "suffix": bool(body.suffix),
                        "best_of": body.best_of not in (None, 1, body.n or 1)}  # fmt: skip
    if isinstance(body, ChatCompletionRequest):
        fmt = (body.response_format or {}).get("type", "text")
        unsupported |= {"tools": bool(body.tools), "response_format": fmt != "text"}
    for name, used in unsupported.items():
        if used:
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        name = check_model(body.model)
        _refuse_unsupported(body)
        tokenizer = engine.tokenizer
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
        # OpenAI's default, or what the context leaves after the longest prompt when that is less
        max_tokens = body.max_tokens or default_new_tokens(engine.context_len, max(map(len, ids)), DEFAULT_COMPLETION_TOKENS)
        job = _start(body, ids, max_tokens, body.logprobs, "prompt", request, name)
        kind = _Completions(job, body, request, tokenizer, name, [len(i) for i in ids])
        return await kind.respond()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        name = check_model(body.model)
        _refuse_unsupported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                content = "\n".join(part.text for part in content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content or ""})
        check_capacity(body, 1)
        try:
            prompt = await asyncio.to_thread(engine.tokenizer.encode_dialog, messages)
        except (ChatFormatError, InvalidTextError) as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.context_len - len(prompt))
        k = (body.top_logprobs or 0) if body.logprobs else None
        job = _start(body, [prompt], max_tokens, k, "messages", request, name)
        kind = _ChatCompletions(job, body, request, engine.tokenizer, name, [len(prompt)])
        return await kind.respond()

    def check_capacity(body: _Common, prompts: int) -> None:
        n = body.n or 1
        capacity = engine.max_batch_size + engine.max_queue
        if n * prompts > capacity:
            raise APIError(400, f"n x prompts = {n * prompts} sequences exceed this server's capacity of "
                           f"{capacity}", param="n")  # fmt: skip

    def _start(body: _Common, prompts: list[list[int]], max_tokens: int, logprobs: int | None, param: str,
               request: HTTPRequest, name: str) -> _Job:  # fmt: skip
        n = body.n or 1
        sampling = _sampling(body)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop_tokens = frozenset() if body.ignore_eos else None
        requests = []
        for p in prompts:
            for j in range(n):  # choice j of a prompt: seed + j, so n samples differ but reproduce
                seed = None if body.seed is None else (body.seed + j) % 2**64
                adapter = None if name == model_name else name
                requests.append(Request(p, max_tokens, sampling, seed, stop, stop_tokens, logprobs, adapter))
        _log_info(request).update(prompt_tokens=sum(len(p) for p in prompts))
        return _submit(engine, requests, param)

    return app


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

    def __init__(self, job: _Job, body: _Common, request: HTTPRequest, tokenizer, model_name: str,
                 prompt_lengths: list[int]):  # fmt: skip
        self.job, self.body, self.request, self.tokenizer = job, body, request, tokenizer
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model_name
        self.n_choices = job.remaining
        self.prompt_tokens = sum(prompt_lengths)
        self.completion_tokens = 0
        self.finish_reasons: list[str | None] = [None] * self.n_choices
        self.stats = []
        self.log = _log_info(request)
        self.log.update(id=self.id)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}  # fmt: skip

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
                 "choices": choices}  # fmt: skip
        if include_usage:
            chunk["usage"] = None
        return chunk

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
    id_prefix, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        self.texts = [""] * self.n_choices
        self.logprobs = [_empty_legacy_logprobs() for _ in range(self.n_choices)]

    def _legacy_logprobs(self, delta: Delta) -> dict | None:
        if delta.logprobs is None:
            return None
        out = _empty_legacy_logprobs()
        for t in delta.logprobs:
            text = token_text(self.tokenizer, t.id)
            out["tokens"].append(text)
            out["token_logprobs"].append(t.logprob)
            top = {token_text(self.tokenizer, i): lp for i, lp in t.top}
            top.setdefault(text, t.logprob)  # OpenAI: the top k, plus the sampled token
            out["top_logprobs"].append(top)
            out["text_offset"].append(t.offset)
        return out

    def collect(self, index: int, delta: Delta) -> None:
        self.texts[index] += delta.text
        part = self._legacy_logprobs(delta)
        if part is not None:
            for key, values in part.items():
                self.logprobs[index][key] += values

    def result(self) -> dict:
        choices = [{"index": i, "text": self.texts[i],
                    "logprobs": self.logprobs[i] if self.body.logprobs is not None else None,
                    "finish_reason": self.finish_reasons[i]} for i in range(self.n_choices)]  # fmt: skip
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}  # fmt: skip

    def chunks(self, index: int, delta: Delta) -> list[list[dict]]:
        choice = {"index": index, "text": delta.text, "logprobs": self._legacy_logprobs(delta),
                  "finish_reason": delta.finish_reason}  # fmt: skip
        return [[choice]]


def _empty_legacy_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


class _ChatCompletions(_Response):
    id_prefix, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, *args):
        super().__init__(*args)
        self.texts = [""] * self.n_choices
        self.logprobs: list[list[dict]] = [[] for _ in range(self.n_choices)]

    def _content_logprobs(self, delta: Delta) -> list[dict] | None:
        if delta.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            return {"token": token_text(self.tokenizer, token_id), "logprob": logprob,
                    "bytes": list(self.tokenizer.token_bytes(token_id))}  # fmt: skip

        return [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in delta.logprobs]

    def collect(self, index: int, delta: Delta) -> None:
        self.texts[index] += delta.text
        self.logprobs[index] += self._content_logprobs(delta) or []

    def result(self) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": self.texts[i]},
                    "logprobs": {"content": self.logprobs[i]} if self.body.logprobs else None,
                    "finish_reason": self.finish_reasons[i]} for i in range(self.n_choices)]  # fmt: skip
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}  # fmt: skip

    def opening_chunks(self) -> list[list[dict]]:
        return [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
                for i in range(self.n_choices)]  # fmt: skip

    def chunks(self, index: int, delta: Delta) -> list[list[dict]]:
        logprobs = self._content_logprobs(delta)
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
