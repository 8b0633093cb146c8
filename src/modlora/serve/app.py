"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Requests are parsed by hand from the raw body (strict UTF-8, then JSON, then a pydantic model that forbids unknown
fields) so every bad request gets an OpenAI-style ``{"error": {...}}`` with a 4xx status. Routing is chosen with the
model id (``LIB``, ``LIB:<router>``, ``LIB:expert:<name>``) and an optional ``routing`` object (the ``openai`` client's
``extra_body={"routing": {...}}``); every response carries a ``routing`` object with the telemetry.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from modlora.serve.engine import Engine
from modlora.serve.requests import Event, RequestError, RoutingRequest, SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16      # OpenAI's default for /v1/completions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoutingParams(_Strict):
    """``extra_body={"routing": {...}}``: router, Arrow top-k and temperature (a number or 'sqrt_d'; the server's
    defaults when absent), and a subset of experts."""

    router: str | None = None
    top_k: int | None = Field(default=None, strict=True)
    temperature: float | Literal["sqrt_d"] | None = None
    experts: list[str] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: None = None
    routing: RoutingParams | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: Literal[False] = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class ServerOptions:
    """HTTP-level options: an optional API key (Bearer token), compared in constant time."""

    api_key: str | None = None


def error_response(status: int, message: str, code: str = "invalid_request_error", param: str | None = None,
                   ) -> JSONResponse:
    """An OpenAI-style error body."""
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        msg = "unknown or unsupported field"
    elif first.get("type") == "literal_error":
        msg = f"unsupported value ({msg.lower()})"
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                           ) from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return schema.model_validate(data)
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

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionRequest = await _parse(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise RequestError("give one prompt per request (a list of several prompts is not supported)",
                                   param="prompt")
            prompt = prompt[0]
        ids = engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return await _generate(body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body: ChatRequest = await _parse(request, ChatRequest)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", param="max_tokens")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content)} for m in body.messages]
        if getattr(engine.tokenizer, "chat_template", None) is None:
            raise RequestError("this base model has no chat template; use /v1/completions", param="messages")
        try:
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may reject a conversation in many ways
            raise RequestError(f"the chat template rejected these messages: {exc}", param="messages") from None
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _generate(body, ids, chat=True)

    async def _generate(body: CompletionRequest | ChatRequest, ids: list[int], chat: bool) -> Any:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise RequestError("stop takes at most 4 non-empty strings", param="stop")
        r = body.routing
        plan = None if r is None else RoutingRequest(r.router, None, r.top_k, r.temperature,
                                                     tuple(r.experts or ()))
        default_max = COMPLETION_DEFAULT_MAX_TOKENS if not chat else engine.options.default_max_tokens
        max_tokens = body.max_tokens if body.max_tokens is not None else min(
            default_max, max(1, engine.context_length - len(ids)))
        sampling = SamplingParams(max_tokens, body.temperature, body.top_p, tuple(stop), body.seed)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        req = engine.submit(ids, sampling, body.model, plan, asyncio_emitter(loop, events))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(req, events, rid, created, body.model, chat, include_usage),
                                     media_type="text/event-stream")
        parts: list[str] = []
        try:
            while True:
                ev = await events.get()
                if ev.error is not None:
                    raise ev.error
                parts.append(ev.delta)
                if ev.finish_reason is not None:
                    break
        except asyncio.CancelledError:
            req.cancelled = True
            raise
        text = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice],
                "usage": _usage(ev), "routing": ev.routing.to_json() if ev.routing else None}

    async def _stream(req: Any, events: asyncio.Queue[Event], rid: str, created: int, model: str, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:
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

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                ev = await events.get()
                if ev.error is not None:
                    err = {"error": {"message": str(ev.error), "type": "server_error", "code": ev.error.code}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                if ev.delta:
                    yield chunk(ev.delta, None)
                if ev.finish_reason is not None:
                    routing = ev.routing.to_json() if ev.routing else None
                    yield chunk(None, ev.finish_reason, routing=routing)
                    if include_usage:
                        payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                                   "usage": _usage(ev), "routing": routing}
                        yield f"data: {json.dumps(payload)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            req.cancelled = req.cancelled or not req.finished

    return app


def asyncio_emitter(loop: asyncio.AbstractEventLoop, q: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """An ``emit`` that hands events from the engine thread to an asyncio queue."""
    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(q.put_nowait, event)
    return emit


def _usage(ev: Event) -> dict[str, int] | None:
    if ev.usage is None:
        return None
    return {"prompt_tokens": ev.usage.prompt_tokens, "completion_tokens": ev.usage.completion_tokens,
            "total_tokens": ev.usage.total_tokens}
