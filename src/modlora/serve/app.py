"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Requests are parsed by hand from the raw body so every bad request gets an OpenAI-style ``{"error": {...}}`` with a
4xx status and no request can take the server down: the body is read as it arrives and refused (413) past
``ServerOptions.max_body_bytes``; then strict UTF-8; then pydantic's JSON parser (Rust: bounded nesting, no lone
surrogates, no NaN/Infinity) straight into strict models that forbid unknown fields, coerce no types (``"5"`` or
``true`` is not an integer) and bound every number. Sampling is exact or refused: temperature 0 is greedy, a smaller
positive one than ``MIN_SAMPLING_TEMPERATURE`` is refused, and a ``top_p`` at most 1/vocabulary (whose nucleus is the
most likely token alone) is served greedily. A client that leaves (before its response, or mid-stream) cancels its
request and is logged in one line. Routing is chosen with the model id (``LIB``, ``LIB:<router>``,
``LIB:expert:<name>``) and an optional ``routing`` object (the ``openai`` client's ``extra_body={"routing": {...}}``);
every response carries a ``routing`` object with the telemetry.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from modlora.serve.engine import Engine
from modlora.serve.requests import (
    MAX_SEED,
    MIN_SAMPLING_TEMPERATURE,
    Event,
    RequestError,
    RoutingRequest,
    SamplingParams,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_TOKEN_COUNT = 2**31 - 1             # bounds max_tokens before the context check
CLIENT_CLOSED_REQUEST = 499             # nginx's status for a request whose client left (nobody receives it)

log = logging.getLogger("modlora.serve")
Schema = TypeVar("Schema", bound=BaseModel)
T = TypeVar("T")
# a list's first bad item is its only error: a 1 MiB body may hold 500,000 bad items, and building one error each
# would hold the event loop for seconds
Items = Annotated[list[T], Field(fail_fast=True)]


class _Strict(BaseModel):
    """A request object: strict types, finite numbers, no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_field(cls, data: Any) -> Any:
        """Refuse the first unknown field alone (``extra="forbid"`` builds one error per unknown field, and a 1 MiB
        body may hold 100,000)."""
        if isinstance(data, dict):
            unknown = next((key for key in data if key not in cls.model_fields), None)
            if unknown is not None:
                raise PydanticCustomError("extra_forbidden", "unknown or unsupported field", {"field": unknown})
        return data


class RoutingParams(_Strict):
    """``extra_body={"routing": {...}}``: router, Arrow top-k and temperature (a number or 'sqrt_d'; the server's
    defaults when absent, checked by the registry's Arrow options), and a subset of experts."""

    router: str | None = None
    top_k: int | None = None
    temperature: float | Literal["sqrt_d"] | None = None
    experts: Items[str] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKEN_COUNT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | Items[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: None = None
    routing: RoutingParams | None = None

    @field_validator("temperature")
    @classmethod
    def _exact_temperature(cls, value: float) -> float:
        if 0 < value < MIN_SAMPLING_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_SAMPLING_TEMPERATURE:g} (a smaller one overflows "
                             "float32 logits)")
        return value


class CompletionRequest(_Common):
    prompt: str | Items[str]
    echo: Literal[False] = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | Items[TextPart]
    name: str | None = None


class ChatRequest(_Common):
    messages: Items[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKEN_COUNT)


@dataclass(frozen=True)
class ServerOptions:
    """HTTP-level options: an optional API key (Bearer token), compared in constant time, and the largest request
    body read (``modlora serve --max-body-bytes``)."""

    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def error_response(status: int, message: str, code: str = "invalid_request_error", param: str | None = None,
                   ) -> JSONResponse:
    """An OpenAI-style error body."""
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _json_message(reason: str) -> str:
    """A one-line message for a body pydantic's JSON parser refused (``reason``: its error and position)."""
    if "recursion limit" in reason:
        return f"the request body is nested too deeply ({reason})"
    if "number out of range" in reason:
        return f"a number in the request body is out of range ({reason})"
    if "surrogate" in reason or "hex escape" in reason:   # jiter's words for a lone \ud800-\udfff escape
        return f"the request body is not valid Unicode: a lone surrogate escape ({reason})"
    return f"the request body is not valid JSON: {reason}"


def _validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    first = errs[0] if errs else {}
    kind = first.get("type")
    field = [first["ctx"]["field"]] if kind == "extra_forbidden" and "field" in first.get("ctx", {}) else []
    loc = ".".join(str(p) for p in [*first.get("loc", ()), *field] if p != "body")
    msg = first.get("msg", "invalid request")
    if kind == "json_invalid":
        return _json_message(str(first.get("ctx", {}).get("error", msg))), None
    if kind == "model_type" and not loc:
        return "the request body must be a JSON object", None
    if kind == "extra_forbidden":
        msg = "unknown or unsupported field"
    elif kind == "literal_error":
        msg = f"unsupported value ({msg.lower()})"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read as it arrives: refused (413) as soon as it exceeds ``limit`` bytes (at once when its
    Content-Length says so), so an oversized body never sits in memory."""
    too_large = RequestError(f"the request body exceeds {limit} bytes (modlora serve --max-body-bytes)", status=413,
                             code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > len(str(limit)) or int(declared) > limit):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_request(raw: bytes, schema: type[Schema]) -> Schema:
    """``raw`` as a ``schema`` request: strict UTF-8, then pydantic's JSON parser and strict validation; a
    :class:`RequestError` (400) naming the field for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return schema.model_validate_json(text)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise RequestError(message, param=param) from None


def create_app(engine: Engine, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI application serving ``engine`` (which must be started)."""
    options = options or ServerOptions()
    app = FastAPI(title="modlora", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, _exc: ClientDisconnect) -> Response:
        log.warning("client disconnected while sending its request (%s %s)", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal server error ({type(exc).__name__})", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if options.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), options.api_key.encode()):
                return error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                      "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        snap = engine.snapshot
        return {"status": "ok", "library": engine.name, "generation": snap.generation, "experts": len(snap.experts),
                "skipped": list(snap.skipped), "stats": asdict(engine.stats)}

    def model_cards() -> list[dict[str, Any]]:
        created = int(time.time())
        return [{"id": i, "object": "model", "created": created, "owned_by": "modlora"}
                for i in engine.catalogue.model_ids(engine.snapshot)]

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Any:
        for card in model_cards():
            if card["id"] == model_id:
                return card
        return error_response(404, f"the model {model_id!r} does not exist", "model_not_found", "model")

    vocab_size = int(engine.model.config.vocab_size)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = parse_request(await read_body(request, options.max_body_bytes), CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise RequestError("give one prompt per request (a list of several prompts is not supported)",
                                   param="prompt")
            prompt = prompt[0]
        ids = await run_in_threadpool(lambda: engine.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return await _generate(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = parse_request(await read_body(request, options.max_body_bytes), ChatRequest)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", param="max_tokens")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content)} for m in body.messages]
        if getattr(engine.tokenizer, "chat_template", None) is None:
            raise RequestError("this base model has no chat template; use /v1/completions", param="messages")
        ids = await run_in_threadpool(_chat_ids, messages)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _generate(request, body, ids, chat=True)

    def _chat_ids(messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids: the base model's chat template over ``messages``, then the tokenizer."""
        try:
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may reject a conversation in many ways
            raise RequestError(f"the chat template rejected these messages: {exc}", param="messages") from None
        return engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _sampling(body: CompletionRequest | ChatRequest, max_tokens: int, stop: list[str]) -> SamplingParams:
        """The request's decoding; a ``top_p`` at most 1/vocabulary keeps the most likely token alone (its mass is at
        least 1/vocabulary), which is greedy decoding, exactly."""
        greedy = body.top_p * vocab_size <= 1
        return SamplingParams(max_tokens, 0.0 if greedy else body.temperature, 1.0 if greedy else body.top_p,
                              tuple(stop), body.seed)

    async def _generate(request: Request, body: CompletionRequest | ChatRequest, ids: list[int], chat: bool) -> Any:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise RequestError("stop takes at most 4 non-empty strings", param="stop")
        r = body.routing
        plan = None if r is None else RoutingRequest(r.router, None, r.top_k, r.temperature,
                                                     None if r.experts is None else tuple(r.experts))
        default_max = COMPLETION_DEFAULT_MAX_TOKENS if not chat else engine.options.default_max_tokens
        max_tokens = body.max_tokens if body.max_tokens is not None else min(
            default_max, max(1, engine.context_length - len(ids)))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | None] = asyncio.Queue()      # None: the client left
        req = engine.submit(ids, _sampling(body, max_tokens, stop), body.model, plan, asyncio_emitter(loop, events))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(req, events, rid, created, body.model, chat, include_usage),
                                     media_type="text/event-stream")
        parts: list[str] = []
        watch = asyncio.ensure_future(_watch_disconnect(request, events))
        try:
            while True:
                ev = await events.get()
                if ev is None:
                    req.cancelled = True
                    log.warning("client disconnected before the response: cancelled %s after %d tokens", rid,
                                len(parts))
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                if ev.error is not None:
                    raise ev.error
                parts.append(ev.delta)
                if ev.finish_reason is not None:
                    break
        except asyncio.CancelledError:
            req.cancelled = True
            raise
        finally:
            watch.cancel()
        text = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice],
                "usage": _usage(ev), "routing": ev.routing.to_json() if ev.routing else None}

    async def _stream(req: Any, events: asyncio.Queue[Event | None], rid: str, created: int, model: str, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        """The SSE chunks of one request; if the client leaves first (the response stops iterating), the request is
        cancelled and the disconnect logged in one line."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False, **extra: Any) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                    {} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice], **extra}
            return f"data: {json.dumps(payload)}\n\n"

        sent, done = 0, False
        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                ev = await events.get()
                assert ev is not None                      # only a non-streamed response watches for disconnects
                if ev.error is not None:
                    done = True
                    err = {"error": {"message": str(ev.error), "type": "server_error", "code": ev.error.code}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                if ev.delta:
                    sent += 1
                    yield chunk(ev.delta, None)
                if ev.finish_reason is not None:
                    done = True
                    routing = ev.routing.to_json() if ev.routing else None
                    yield chunk(None, ev.finish_reason, routing=routing)
                    if include_usage:
                        payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                                   "usage": _usage(ev), "routing": routing}
                        yield f"data: {json.dumps(payload)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not done:
                req.cancelled = True
                log.warning("client disconnected mid-stream: cancelled %s after %d chunks", rid, sent)

    return app


async def _watch_disconnect(request: Request, events: asyncio.Queue[Event | None]) -> None:
    """Put None on ``events`` when the client disconnects (its body already read, ``receive`` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(None)


def asyncio_emitter(loop: asyncio.AbstractEventLoop, q: asyncio.Queue[Event | None]) -> Callable[[Event], None]:
    """An ``emit`` that hands events from the engine thread to an asyncio queue."""
    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(q.put_nowait, event)
    return emit


def _usage(ev: Event) -> dict[str, int] | None:
    if ev.usage is None:
        return None
    return {"prompt_tokens": ev.usage.prompt_tokens, "completion_tokens": ev.usage.completion_tokens,
            "total_tokens": ev.usage.total_tokens}
