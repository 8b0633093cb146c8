"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (with
``n``, ``logprobs``, ``echo`` (with ``logprobs``: the prompt's too; ``max_tokens`` 0 scores the prompt alone, as
lm-evaluation-harness asks), the penalties, ``logit_bias``, ``stop_token_ids`` and ``response_format``: see
:mod:`modlora.serve.sampling`), ``/metrics`` (Prometheus), ``/tokenize``, ``/detokenize``, ``/version`` and vLLM's
``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (``modlora import`` / ``remove`` over HTTP, when allowed).

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
from itertools import accumulate
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import modlora
from modlora.errors import LibraryError
from modlora.library.adapters import ADAPTER_WEIGHTS
from modlora.library.store import ExpertEntry, ExpertLibrary, check_name
from modlora.serve.decoding import GenerationRequest
from modlora.serve.engine import Engine
from modlora.serve.page import page_router
from modlora.serve.requests import (
    MAX_SEED,
    MIN_SAMPLING_TEMPERATURE,
    Event,
    RequestError,
    RoutingRequest,
    SamplingParams,
    TokenLogprob,
)
from modlora.serve.sampling import ConstrainedDecoding, GrammarConstraint
from modlora.serve.telemetry import ServingMetrics, ServingState

COMPLETION_DEFAULT_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
MAX_CHOICES = 128                       # n; a server takes at most --max-batch
MAX_LOGPROBS = 20                       # logprobs / top_logprobs (OpenAI's bound)
MIN_REPETITION_PENALTY = 1e-3           # repetition_penalty in [1e-3, 1e3]: z/r and z·r stay finite in float32
ADAPTER_WAIT_S = 60.0                   # how long load/unload_lora_adapter wait for the engine to serve the change
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
            names = {f.alias or name for name, f in cls.model_fields.items()}
            unknown = next((key for key in data if key not in names), None)
            if unknown is not None:
                raise PydanticCustomError("extra_forbidden", "unknown or unsupported field", {"field": unknown})
        return data


class RoutingParams(_Strict):
    """``extra_body={"routing": {...}}``: router, Arrow top-k and temperature (a number or 'sqrt_d'; the server's
    defaults when absent, checked by the registry's Arrow options), a subset of experts, and ``per_token``: the
    telemetry also lists every token read with its own top experts and entropy."""

    router: str | None = None
    top_k: int | None = None
    temperature: float | Literal["sqrt_d"] | None = None
    experts: Items[str] | None = None
    per_token: bool = False


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: the output is JSON valid under ``schema`` (always enforced, so ``strict``
    true and false both hold)."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError("value_error", "json_schema is given with type 'json_schema' and only then")
        return self


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKEN_COUNT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | Items[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, ge=MIN_REPETITION_PENALTY, le=1 / MIN_REPETITION_PENALTY)
    top_k: int = Field(default=0, ge=-1, le=MAX_TOKEN_COUNT)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(fail_fast=True)] | None = None
    stop_token_ids: Items[int] | None = None
    response_format: ResponseFormat | None = None
    routing: RoutingParams | None = None

    @field_validator("temperature")
    @classmethod
    def _exact_temperature(cls, value: float) -> float:
        if 0 < value < MIN_SAMPLING_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_SAMPLING_TEMPERATURE:g} (a smaller one overflows "
                             "float32 logits)")
        return value


class CompletionRequest(_Common):
    prompt: str | Items[str] | Items[int] | Items[Items[int]]     # text or token ids; one prompt per request
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKEN_COUNT)   # 0: score the echoed prompt only


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
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Strict):
    """vLLM's ``POST /tokenize``: a ``prompt``, or chat ``messages`` through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: Items[ChatMessage] | None = None
    add_special_tokens: bool | None = None         # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: Items[int]


class LoadAdapterRequest(_Strict):
    """vLLM's ``POST /v1/load_lora_adapter``: import the PEFT adapter directory ``lora_path`` (on the server) as the
    expert ``lora_name``, as ``modlora import`` does; ``load_inplace`` replaces an expert of that name; ``tasks`` and
    ``force_base`` as ``modlora import --tasks / --force-base``."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False
    tasks: Items[str] | None = None
    force_base: bool = False


class UnloadAdapterRequest(_Strict):
    """vLLM's ``POST /v1/unload_lora_adapter``: remove the expert ``lora_name`` from the library (as ``modlora
    remove``); ``lora_int_id`` (vLLM's numeric ids) has no meaning here and is refused."""

    lora_name: str
    lora_int_id: None = None


def _messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Chat messages as the chat template takes them (text parts joined)."""
    return [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
            for m in messages]


@dataclass(frozen=True)
class ServerOptions:
    """HTTP-level options: an optional API key (Bearer token), compared in constant time, and the largest request
    body read (``modlora serve --max-body-bytes``); ``adapter_loading``: whether ``/v1/load_lora_adapter`` and
    ``/v1/unload_lora_adapter`` may change the library (``--allow-adapter-loading``; off: 403)."""

    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    adapter_loading: bool = False         # POST /v1/load_lora_adapter and /v1/unload_lora_adapter write the library


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
        if options.api_key and request.url.path.startswith(("/v1/", "/tokenize", "/detokenize")):
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
    grammars = ConstrainedDecoding(engine.tokenizer, vocab_size, engine.eos_ids)
    def serving_state() -> ServingState:
        waiting, running = engine.load()
        snap = engine.snapshot
        return ServingState(waiting, running, engine.stats.steps, engine.stats.rows, len(snap.experts),
                            snap.generation)

    metrics = ServingMetrics(serving_state)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, media_type = metrics.exposition()
        return Response(body, media_type=media_type)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": modlora.__version__}

    def _check_model(model: str | None) -> None:
        if model is not None and model not in engine.catalogue.model_ids(engine.snapshot):
            raise RequestError(f"the model {model!r} does not exist", status=404, code="model_not_found",
                               param="model")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse_request(await read_body(request, options.max_body_bytes), TokenizeRequest)
        _check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("give a prompt or messages (one of them)", param="prompt")
        if body.prompt is not None:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await run_in_threadpool(lambda: engine.tokenizer(body.prompt, add_special_tokens=special)[
                "input_ids"])
        else:
            assert body.messages is not None
            ids = await run_in_threadpool(_chat_ids, _messages(body.messages), body.add_generation_prompt,
                                          bool(body.add_special_tokens))
        return {"count": len(ids), "max_model_len": engine.context_length, "tokens": list(ids)}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse_request(await read_body(request, options.max_body_bytes), DetokenizeRequest)
        _check_model(body.model)
        ids = _token_ids(body.tokens, "tokens")
        return {"prompt": await run_in_threadpool(engine.tokenizer.decode, list(ids))}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        body = parse_request(await read_body(request, options.max_body_bytes), LoadAdapterRequest)
        _adapter_loading_allowed()
        entry = await run_in_threadpool(_import_adapter, body)
        await _served(body.lora_name, entry.files[ADAPTER_WEIGHTS])
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        body = parse_request(await read_body(request, options.max_body_bytes), UnloadAdapterRequest)
        _adapter_loading_allowed()
        await run_in_threadpool(_remove_adapter, body.lora_name)
        await _served(body.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def _adapter_loading_allowed() -> None:
        if not options.adapter_loading:
            raise RequestError("loading and unloading adapters is off on this server (modlora serve "
                               "--allow-adapter-loading turns it on)", status=403, code="permission_denied")

    def _import_adapter(body: LoadAdapterRequest) -> ExpertEntry:
        """``modlora import``'s checks and write (:meth:`ExpertLibrary.import_adapter`); a 400 naming the field."""
        try:
            check_name(body.lora_name)
            library = ExpertLibrary(engine.library_path)
            if body.lora_name in library and not body.load_inplace:
                raise RequestError(f"lora_name: the library already has an expert {body.lora_name!r} (load_inplace: "
                                   "true replaces it)", param="lora_name")
            return library.import_adapter(body.lora_path, body.lora_name, tasks=body.tasks or (),
                                          overwrite=body.load_inplace, force_base=body.force_base)
        except LibraryError as exc:
            param = "lora_name" if "name" in str(exc).split(":")[0] else "lora_path"
            raise RequestError(f"{param}: {exc}", param=param) from None

    def _remove_adapter(name: str) -> None:
        library = ExpertLibrary(engine.library_path)
        if name not in library:
            raise RequestError(f"lora_name: the library has no expert {name!r}", status=404, code="model_not_found",
                               param="lora_name")
        try:
            library.remove(name)
        except LibraryError as exc:
            raise RequestError(f"lora_name: {exc}", param="lora_name") from None

    async def _served(name: str, sha256: str | None) -> None:
        """Wait until the engine serves expert ``name`` at ``sha256`` (None: serves no expert ``name``)."""
        deadline = time.monotonic() + ADAPTER_WAIT_S
        while time.monotonic() < deadline:
            snap = engine.snapshot
            versions = {e.name: e.sha256 for e in snap.experts}
            if versions.get(name) == sha256:
                return
            skipped = [s for s in snap.skipped if s.startswith(name + ":")]
            if sha256 is not None and skipped:
                raise RequestError(f"the adapter was stored but is not served: {skipped[0]}", status=500,
                                   code="server_error")
            await asyncio.sleep(0.02)
        raise RequestError(f"the library changed but the server did not pick up {name!r} within {ADAPTER_WAIT_S:g} s",
                           status=500, code="server_error")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = parse_request(await read_body(request, options.max_body_bytes), CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise RequestError("give one prompt per request (a list of several prompts is not supported)",
                                   param="prompt")
            prompt = prompt[0]
        if body.max_tokens == 0 and not body.echo:
            raise RequestError("max_tokens: 0 (read the prompt, sample nothing) needs echo: true; otherwise give at "
                               "least 1", param="max_tokens")
        if isinstance(prompt, str):
            text = prompt
            ids = await run_in_threadpool(lambda: engine.tokenizer(text, add_special_tokens=True)["input_ids"])
            echo = prompt if body.echo else ""
        else:                                  # token ids, read as given (no special tokens added)
            ids = list(_token_ids(prompt, "prompt"))
            echo = await run_in_threadpool(engine.tokenizer.decode, ids) if body.echo else ""
        return await _generate(request, body, ids, False, body.logprobs, echo, body.logprobs if body.echo else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = parse_request(await read_body(request, options.max_body_bytes), ChatRequest)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", param="max_tokens")
        ids = await run_in_threadpool(_chat_ids, _messages(body.messages))
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true", param="top_logprobs")
        return await _generate(request, body, ids, True, (body.top_logprobs or 0) if body.logprobs else None)

    def _chat_ids(messages: list[dict[str, str]], add_generation_prompt: bool = True,
                  add_special_tokens: bool = False) -> list[int]:
        """The prompt's token ids: the base model's chat template over ``messages``, then the tokenizer."""
        if getattr(engine.tokenizer, "chat_template", None) is None:
            raise RequestError("this base model has no chat template; use /v1/completions", param="messages")
        try:
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                        tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may reject a conversation in many ways
            raise RequestError(f"the chat template rejected these messages: {exc}", param="messages") from None
        return engine.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _sampling(body: CompletionRequest | ChatRequest, max_tokens: int, stop: list[str], seed: int | None,
                  logprobs: int | None, prompt_logprobs: int | None, constraint: GrammarConstraint | None
                  ) -> SamplingParams:
        """The request's decoding; a ``top_p`` at most 1/vocabulary keeps the most likely token alone (its mass is at
        least 1/vocabulary), which is greedy decoding, exactly."""
        greedy = body.top_p * vocab_size <= 1
        return SamplingParams(
            max_tokens, 0.0 if greedy else body.temperature, 1.0 if greedy else body.top_p, tuple(stop), seed,
            top_k=max(body.top_k, 0), min_p=body.min_p, repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=_logit_bias(body.logit_bias), stop_token_ids=_token_ids(body.stop_token_ids, "stop_token_ids"),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, constraint=constraint)

    def _token_ids(ids: list[int] | None, param: str) -> tuple[int, ...]:
        """``ids`` checked against the vocabulary (a 400 naming the first one outside it)."""
        for i, token in enumerate(ids or ()):
            if not 0 <= token < vocab_size:
                raise RequestError(f"{param}.{i}: {token} is not a token id (0…{vocab_size - 1})", param=param)
        return tuple(ids or ())

    def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``logit_bias`` (token id as a decimal string → bias in [-100, 100]) as ``(id, bias)`` pairs."""
        out = []
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
                raise RequestError(f"logit_bias: key {key[:40]!r} is not a token id (0…{vocab_size - 1})",
                                   param="logit_bias")
            out.append((int(key), value))
        return tuple(out)

    async def _constraint(fmt: ResponseFormat | None) -> GrammarConstraint | None:
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return await run_in_threadpool(grammars.json, None, "response_format")
        assert fmt.json_schema is not None
        return await run_in_threadpool(grammars.json, fmt.json_schema.schema_, "response_format.json_schema.schema")

    async def _generate(request: Request, body: CompletionRequest | ChatRequest, ids: list[int], chat: bool,
                        logprobs: int | None, echo: str = "", prompt_logprobs: int | None = None) -> Any:
        arrived = time.monotonic()
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise RequestError("stop takes at most 4 non-empty strings", param="stop")
        if body.n > engine.options.max_batch:
            raise RequestError(f"n: at most {engine.options.max_batch} choices (modlora serve --max-batch), got "
                               f"{body.n}", param="n")
        r = body.routing
        plan = None if r is None else RoutingRequest(r.router, None, r.top_k, r.temperature,
                                                     None if r.experts is None else tuple(r.experts), r.per_token)
        default_max = COMPLETION_DEFAULT_MAX_TOKENS if not chat else engine.options.default_max_tokens
        max_tokens = body.max_tokens if body.max_tokens is not None else min(
            default_max, max(1, engine.context_length - len(ids)))
        constraint = await _constraint(body.response_format)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()      # None: the client left
        reqs = []
        try:
            for i in range(body.n):       # choice i draws with seed + i: choice 0 is the n=1 answer
                seed = None if body.seed is None else body.seed + i
                sampling = _sampling(body, max_tokens, stop, seed, logprobs, prompt_logprobs, constraint)
                reqs.append(engine.submit(ids, sampling, body.model, plan, asyncio_emitter(loop, events, i)))
        except RequestError:
            for req in reqs:
                req.cancelled = True
            raise
        metrics.admitted(len(ids))
        reply = _Reply(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time()), body.model, chat,
                       echo, ids, arrived, body.n, _token_text)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(reqs, events, reply, include_usage), media_type="text/event-stream")
        texts = [echo] * body.n
        tokens: list[list[TokenLogprob]] = [[] for _ in reqs]
        prompts: list[tuple[TokenLogprob, ...] | None] = [None] * body.n
        ends: list[Event | None] = [None] * body.n
        watch = asyncio.ensure_future(_watch_disconnect(request, events))
        try:
            while any(e is None for e in ends):
                item = await events.get()
                if item is None:
                    for req in reqs:
                        req.cancelled = True
                    _cancelled(reqs, reply)
                    log.warning("client disconnected before the response: cancelled %s after %d tokens", reply.rid,
                                sum(req.sampled for req in reqs))
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                i, ev = item
                _observe(reply, ev)
                if ev.error is not None:
                    for req in reqs:
                        req.cancelled = True
                    raise ev.error
                texts[i] += ev.delta
                tokens[i] += ev.logprobs
                if ev.prompt_logprobs is not None:
                    prompts[i] = ev.prompt_logprobs
                if ev.finish_reason is not None:
                    ends[i] = ev
        except asyncio.CancelledError:
            for req in reqs:
                req.cancelled = True
            raise
        finally:
            watch.cancel()
        finished = [e for e in ends if e is not None]
        choices = [reply.choice(i, texts[i], ends[i], tokens[i] if logprobs is not None else None, prompts[i])
                   for i in range(body.n)]
        return {"id": reply.rid, "object": reply.kind, "created": reply.created, "model": body.model,
                "choices": choices, "usage": reply.usage(finished), "routing": _routing(finished[0])}

    def _observe(reply: _Reply, ev: Event) -> None:
        """Count one event in the metrics: tokens, and at the end time to first token, latency and routing."""
        metrics.tokens(ev.sampled)
        if ev.finish_reason is not None:
            metrics.finished(ev.finish_reason, reply.arrived, ev.first_token_at, ev.routing)
        elif ev.error is not None:
            metrics.ended("error")

    def _cancelled(reqs: list[GenerationRequest], reply: _Reply) -> None:
        for req in reqs:
            if not req.finished:
                metrics.ended("cancelled")

    def _token_text(token: int) -> str:
        return engine.tokenizer.decode([token], skip_special_tokens=False)

    async def _stream(reqs: list[GenerationRequest], events: asyncio.Queue[tuple[int, Event] | None], reply: _Reply,
                      include_usage: bool) -> AsyncIterator[str]:
        """The SSE chunks of one request (its choices interleaved, each with its index; with ``routing.per_token``
        a chunk before the last carries ``routing.tokens``, the entries of the tokens read since the previous one);
        if the client leaves first (the response stops iterating), the request is cancelled and the disconnect
        logged in one line."""
        sent, ends = 0, [None] * reply.n
        wants_logprobs = reqs[0].sampling.logprobs is not None
        scores_prompt = reqs[0].sampling.prompt_logprobs is not None      # the echo waits for its logprobs
        finished: list[Event] = []
        try:
            for i in range(reply.n):
                if reply.chat:
                    yield reply.chunk(i, None, None, None, first=True)
                elif reply.echo and not scores_prompt:
                    yield reply.chunk(i, reply.echo, None, None)
            while len(finished) < reply.n:
                item = await events.get()
                assert item is not None                      # only a non-streamed response watches for disconnects
                i, ev = item
                _observe(reply, ev)
                if ev.error is not None:
                    finished = [ev] * reply.n
                    for req in reqs:
                        req.cancelled = True
                    err = {"error": {"message": str(ev.error), "type": "server_error", "code": ev.error.code}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                if ev.prompt_logprobs is not None:
                    yield reply.chunk(i, reply.echo, None, [], prompt=ev.prompt_logprobs)
                if ev.delta or ev.logprobs or ev.token_routing:
                    sent += 1
                    routed = {"routing": {"tokens": list(ev.token_routing)}} if ev.token_routing else {}
                    yield reply.chunk(i, ev.delta, None, list(ev.logprobs) if wants_logprobs else None, **routed)
                if ev.finish_reason is not None:
                    ends[i] = ev
                    finished.append(ev)
                    yield reply.chunk(i, None, ev.finish_reason, None, routing=_routing(ev))
            if include_usage:
                payload = {"id": reply.rid, "object": reply.kind + (".chunk" if reply.chat else ""),
                           "created": reply.created, "model": reply.model, "choices": [],
                           "usage": reply.usage(finished), "routing": _routing(finished[0])}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if len(finished) < reply.n:
                for req in reqs:
                    req.cancelled = True
                _cancelled(reqs, reply)
                log.warning("client disconnected mid-stream: cancelled %s after %d chunks", reply.rid, sent)

    app.include_router(page_router(engine))
    return app


@dataclass
class _Reply:
    """How one request's response is written (OpenAI's shapes): its id, model, whether it is a chat, the ``echo``d
    prompt, the prompt's token ids, ``n`` choices, and ``token_text`` (a token id's text, for logprobs); ``arrived``:
    when the request came (``time.monotonic()``, for the metrics)."""

    rid: str
    created: int
    model: str
    chat: bool
    echo: str
    prompt_ids: list[int]
    arrived: float
    n: int
    token_text: Callable[[int], str]

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def logprobs(self, tokens: list[TokenLogprob] | None, prompt: tuple[TokenLogprob, ...] | None = None
                 ) -> dict[str, Any] | None:
        """OpenAI's logprobs object: chat ``{"content": [...]}``, completions the legacy four lists, which start
        with the echoed prompt's tokens when ``prompt`` (prompt tokens 1 … L − 1) is given: the first has no
        log-probability (``None``), and their text offsets add up their tokens' texts."""
        if tokens is None:
            return None
        text = self.token_text
        if self.chat:
            def entry(token: int, lp: float) -> dict[str, Any]:
                s = text(token)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                                for t in tokens], "refusal": None}
        def top(t: TokenLogprob) -> dict[str, float]:
            return {**{text(i): v for i, v in t.top}, text(t.token): t.logprob}

        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if prompt is not None:
            texts = [text(t) for t in self.prompt_ids]
            out["tokens"] += texts
            out["token_logprobs"] += [None, *(t.logprob for t in prompt)]
            out["top_logprobs"] += [None, *map(top, prompt)]
            out["text_offset"] += list(accumulate(map(len, texts[:-1]), initial=0))
        out["tokens"] += [text(t.token) for t in tokens]
        out["token_logprobs"] += [t.logprob for t in tokens]
        out["top_logprobs"] += list(map(top, tokens))
        out["text_offset"] += [len(self.echo) + t.offset for t in tokens]
        return out

    def choice(self, i: int, text: str, end: Event | None, tokens: list[TokenLogprob] | None,
               prompt: tuple[TokenLogprob, ...] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"index": i, "finish_reason": end.finish_reason if end else None,
                               "logprobs": self.logprobs(tokens, prompt)}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        if self.n > 1 and end is not None:
            out["routing"] = _routing(end)
        return out

    def chunk(self, i: int, delta: str | None, finish: str | None, tokens: list[TokenLogprob] | None,
              first: bool = False, prompt: tuple[TokenLogprob, ...] | None = None, **extra: Any) -> str:
        if self.chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {} if delta is None else {"content": delta})
            choice = {"index": i, "delta": d, "finish_reason": finish, "logprobs": self.logprobs(tokens)}
        else:
            choice = {"index": i, "text": delta or "", "finish_reason": finish,
                      "logprobs": self.logprobs(tokens, prompt)}
        payload = {"id": self.rid, "object": self.kind + (".chunk" if self.chat else ""),
                   "created": self.created, "model": self.model, "choices": [choice], **extra}
        return f"data: {json.dumps(payload)}\n\n"

    def usage(self, ends: list[Event]) -> dict[str, int] | None:
        """Usage over the choices: the prompt once, every choice's completion tokens."""
        if any(e.usage is None for e in ends):
            return None
        completion = sum(e.usage.completion_tokens for e in ends if e.usage is not None)
        prompt = len(self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _watch_disconnect(request: Request, events: asyncio.Queue[tuple[int, Event] | None]) -> None:
    """Put None on ``events`` when the client disconnects (its body already read, ``receive`` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(None)


def asyncio_emitter(loop: asyncio.AbstractEventLoop, q: asyncio.Queue[tuple[int, Event] | None], index: int = 0
                    ) -> Callable[[Event], None]:
    """An ``emit`` that hands the events of choice ``index`` from the engine thread to an asyncio queue."""
    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(q.put_nowait, (index, event))
    return emit


def _routing(ev: Event) -> dict[str, Any] | None:
    return ev.routing.to_json() if ev.routing else None
