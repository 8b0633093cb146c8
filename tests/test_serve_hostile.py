"""Hostile requests against ``modlora serve`` (issue 25): oversized and deeply nested bodies, out-of-range and
mistyped numbers, lone surrogates, degenerate sampling, an empty expert list and clients that leave. Each is
refused with a 4xx naming what is wrong (or, for a tiny ``top_p``, served exactly), never a 500, and the server then
answers a normal request exactly as before.

Uses the tiny model and library of ``tests/test_serve.py`` (its ``workdir`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from modlora.serve import BackgroundServer, ServerOptions, create_app
from modlora.serve.requests import RequestError

from .conftest import served_engine
from .test_serve import workdir  # noqa: F401 - the saved tiny model and library (a pytest fixture)

NORMAL = {"model": "lib", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
SMALL_LIMIT = 4096


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "lib", "prompt": "Hello", "max_tokens": 4, **fields}).encode()


def _raw(field: str, literal: bytes) -> bytes:
    """A completion request whose ``field`` is the raw JSON text ``literal``."""
    return b'{"model": "lib", "prompt": "Hello", "max_tokens": 4, "' + field.encode() + b'": ' + literal + b"}"


def _chat(content: str) -> bytes:
    return json.dumps({"model": "lib", "messages": [{"role": "user", "content": content}], "max_tokens": 4}).encode()


class Records(logging.Handler):
    """Every record logged by the server's loggers while installed."""

    LOGGERS = ("modlora.serve", "uvicorn", "uvicorn.error", "asyncio")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Records:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)

    def tracebacks(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.exc_info or r.stack_info]


@pytest.fixture(scope="module")
def served(workdir):  # noqa: F811 - the imported fixture
    with served_engine(workdir / "model", workdir / "lib", max_batch=8, batch_wait_s=0.01) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(served) -> str:
    """The greedy text of the normal request before any hostile one."""
    r = httpx.post(served.url + "/completions", json=NORMAL, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _post(url: str, content: bytes | Iterator[bytes], path: str = "/completions") -> httpx.Response:
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=60)


def _answers_normally(url: str, expected: str) -> None:
    r = httpx.post(url + "/completions", json=NORMAL, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected


HOSTILE = [  # (id, path, body, needle in the 400 message)
    ("nested-100k-arrays", "/completions", _raw("routing", b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    ("nested-100k-objects", "/completions", _raw("stop", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000),
     "nested too deeply"),
    ("seed-5000-digits", "/completions", _raw("seed", b"9" * 5000), "number out of range"),
    ("seed-2**64+5", "/completions", _body(seed=2**64 + 5), "seed"),
    ("seed-2**63", "/completions", _body(seed=2**63), "seed"),
    ("seed-negative", "/completions", _body(seed=-1), "seed"),
    ("lone-high-surrogate-prompt", "/completions", _raw("stop", b'"x"').replace(b'"Hello"', b'"Hel\\ud800lo"'),
     "surrogate"),
    ("lone-low-surrogate-prompt", "/completions", _raw("stop", b'"x"').replace(b'"Hello"', b'"\\udc00"'), "surrogate"),
    ("lone-surrogate-chat", "/chat/completions", _chat("hi \ud800 there"), "surrogate"),
    ("lone-surrogate-stop", "/completions", _raw("stop", b'["\\ud800"]'), "surrogate"),
    ("max-tokens-string", "/completions", _raw("max_tokens", b'"5"').replace(b'"max_tokens": 4, ', b""),
     "max_tokens"),
    ("max-tokens-true", "/completions", _raw("max_tokens", b"true").replace(b'"max_tokens": 4, ', b""),
     "max_tokens"),
    ("max-tokens-float", "/completions", _raw("max_tokens", b"5.0").replace(b'"max_tokens": 4, ', b""),
     "max_tokens"),
    ("max-tokens-10**30", "/completions", _raw("max_tokens", b"1" + b"0" * 30).replace(b'"max_tokens": 4, ', b""),
     "max_tokens"),
    ("max-completion-tokens-string", "/chat/completions",
     json.dumps({"model": "lib", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": "5"}
                ).encode(), "max_completion_tokens"),
    ("stream-string", "/completions", _raw("stream", b'"true"'), "stream"),
    ("top-p-nan", "/completions", _raw("top_p", b"NaN"), "top_p"),
    ("top-p-1e999", "/completions", _raw("top_p", b"1e999"), "top_p"),
    ("temperature-infinity", "/completions", _raw("temperature", b"Infinity"), "temperature"),
    ("temperature-1e-300", "/completions", _body(temperature=1e-300), "temperature"),
    ("temperature-string", "/completions", _raw("temperature", b'"0.5"'), "temperature"),
    ("routing-experts-empty", "/completions", _body(routing={"experts": []}), "routing.experts"),
    ("routing-top-k-true", "/completions", _body(routing={"top_k": True}), "routing.top_k"),
    ("routing-top-k-zero", "/completions", _body(routing={"top_k": 0}), "top_k"),
    ("routing-top-k-negative", "/completions", _body(routing={"top_k": -3}), "top_k"),
    ("routing-top-k-10**30", "/completions", _body(routing={"top_k": 10**30}), "top_k"),
    ("routing-temperature-1e-300", "/completions", _body(routing={"temperature": 1e-300}), "temperature"),
    ("routing-temperature-nan", "/completions", _raw("routing", b'{"temperature": NaN}'), "routing.temperature"),
    ("routing-experts-number", "/completions", _body(routing={"experts": [1]}), "routing.experts.0"),
    ("prompt-number", "/completions", _body(prompt=5), "prompt"),
    ("not-an-object", "/completions", b'"just a string"', "JSON object"),
]


@pytest.mark.parametrize(("path", "body", "needle"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_request_is_refused_and_the_next_one_served(served, expected, path, body, needle) -> None:
    with Records() as logs:
        r = _post(served.url, body, path)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error", err
    assert len(err["message"]) < 400 and "\n" not in err["message"]
    assert logs.tracebacks() == []
    _answers_normally(served.url, expected)


@pytest.mark.parametrize(("schema", "body"), [
    ("ChatRequest", b'{"model": "lib", "messages": [' + b",".join([b"1"] * 300_000) + b"]}"),
    ("CompletionRequest", b'{"model": "lib", "prompt": [' + b",".join([b"true"] * 200_000) + b"]}"),
    ("CompletionRequest", b'{"model": "lib", "prompt": "x", "stop": [' + b",".join([b"{}"] * 300_000) + b"]}"),
    ("CompletionRequest", b"{" + b",".join(b'"%x": 1' % i for i in range(100_000)) + b"}"),
    ("CompletionRequest", b'{"model": "lib", "prompt": "x", "routing": {'
     + b",".join(b'"%x": 1' % i for i in range(100_000)) + b"}}"),
], ids=["messages", "prompt-list", "stop-list", "unknown-fields", "unknown-routing-fields"])
def test_a_body_of_bad_items_is_refused_at_its_first(served, expected, schema, body) -> None:
    """Validation stops at the first bad item or unknown field: one error, not one per item (which kept the event
    loop busy for seconds)."""
    from pydantic import ValidationError

    from modlora.serve import app
    with pytest.raises(ValidationError) as caught:
        getattr(app, schema).model_validate_json(body)
    assert caught.value.error_count() <= 4                   # one per member of the union (prompt: 4)
    path = "/chat/completions" if schema == "ChatRequest" else "/completions"
    r = _post(served.url, body, path)
    assert r.status_code == 400 and len(r.json()["error"]["message"]) < 200
    _answers_normally(served.url, expected)


def test_a_prompt_of_300_000_token_ids_is_refused_with_400(served, expected) -> None:
    body = b'{"model": "lib", "prompt": [' + b",".join([b"1"] * 300_000) + b"]}"
    r = _post(served.url, body)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text
    _answers_normally(served.url, expected)


def test_tiny_top_p_is_served_greedily(served, expected) -> None:
    """A ``top_p`` at most 1/vocabulary keeps only the most likely token by definition: the greedy text, exactly."""
    for top_p in (1e-300, 5e-324, 1e-3):
        r = httpx.post(served.url + "/completions", json={**NORMAL, "temperature": 1.0, "top_p": top_p, "seed": 3},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
    _answers_normally(served.url, expected)


def test_a_prompt_of_almost_a_megabyte_is_refused_with_400(served, expected) -> None:
    body = _body(prompt="a" * (1024 * 1024 - 200))
    r = _post(served.url, body)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    _answers_normally(served.url, expected)


def test_body_limit_is_enforced_while_reading(served, expected) -> None:
    """Over ``max_body_bytes`` → 413, whether the size is declared (Content-Length) or only seen while reading
    (chunked); a body at the limit is served."""
    assert ServerOptions().max_body_bytes == 1024 * 1024
    small = create_app(served.engine, ServerOptions(max_body_bytes=SMALL_LIMIT))
    with BackgroundServer(small) as srv, Records() as logs:
        fits = _body(prompt="x", stop="y" * 100)
        assert len(fits) < SMALL_LIMIT and _post(srv.url, fits).status_code == 200
        over = _body(prompt="x", stop="y" * SMALL_LIMIT)
        declared = _post(srv.url, over)
        assert declared.status_code == 413, declared.text
        assert f"{SMALL_LIMIT} bytes" in declared.json()["error"]["message"]
        chunked = _post(srv.url, iter([over[i:i + 512] for i in range(0, len(over), 512)]))
        assert chunked.status_code == 413, chunked.text
        _answers_normally(srv.url, expected)
    assert logs.tracebacks() == []


def test_read_body_stops_at_the_limit() -> None:
    """An endless body is read only up to the limit (plus one chunk), never whole."""
    chunk = b"x" * 1000
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    from starlette.requests import Request

    from modlora.serve.app import read_body
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    with pytest.raises(RequestError) as caught:
        asyncio.run(read_body(Request(scope, receive), 10_000))
    assert caught.value.status == 413 and received == 11


def _wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_client_disconnects_are_logged_in_one_line(served, expected) -> None:
    """A client leaving mid-stream, before its (non-streamed) response or half-way through its body: one log line
    each, no traceback; the request stops decoding and the server goes on."""
    with Records() as logs:
        with httpx.stream("POST", served.url + "/completions", timeout=60,
                          json={**NORMAL, "max_tokens": 400, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        _wait_until(lambda: any("disconnected" in rec.getMessage() for rec in logs.records),
                    "the mid-stream disconnect was not logged")
        with socket.create_connection((served.host, served.port)) as s:
            body = json.dumps({**NORMAL, "max_tokens": 400}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            _wait_until(served.engine.busy, "the request never reached the engine")
        _wait_until(lambda: sum("disconnected" in rec.getMessage() for rec in logs.records) >= 2,
                    "the disconnect before the response was not logged")
        with socket.create_connection((served.host, served.port)) as s:      # leaves half-way through its body
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 1000\r\n\r\n" + body[:10])
        _wait_until(lambda: sum("disconnected" in rec.getMessage() for rec in logs.records) >= 3,
                    "the disconnect while sending the body was not logged")
        _wait_until(lambda: not served.engine.busy(), "the abandoned requests kept decoding")
        _answers_normally(served.url, expected)
    lines = [rec.getMessage() for rec in logs.records if "disconnected" in rec.getMessage()]
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert "mid-stream" in lines[0] and "before the response" in lines[1] and "sending its request" in lines[2]
    assert logs.tracebacks() == [] and not [r for r in logs.records if r.levelno >= logging.ERROR]


def test_cli_max_body_bytes_reaches_the_app(workdir, monkeypatch, capsys) -> None:  # noqa: F811
    import modlora.serve.server as server_mod
    from modlora.cli import main

    assert main(["serve", str(workdir / "lib"), "--max-body-bytes", "0"]) == 2
    assert "--max-body-bytes" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(server_mod, "run_server", lambda config, host, port, announce: seen.update(config=config))
    assert main(["serve", str(workdir / "lib"), "--model", str(workdir / "model"), "--max-body-bytes", "2048"]) == 0
    assert seen["config"].max_body_bytes == 2048
    assert main(["serve", str(workdir / "lib"), "--model", str(workdir / "model")]) == 0
    assert seen["config"].max_body_bytes == ServerOptions().max_body_bytes == 1024 * 1024
