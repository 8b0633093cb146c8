"""The routing page at ``/``: the library and a playground that colours every token by its experts.

Plain HTML/JS/CSS shipped in this package (``serve/static/``; no build step, nothing fetched from elsewhere).
The page reads the server's own API: ``GET /v1/library`` (below: the experts with their tasks, rank, size and
validation loss, the shared expert of a ``--share`` library, the routers served), ``POST /v1/completions`` with
``routing.per_token`` (each token's top experts per group of layers and its entropy, streamed as the model reads
the tokens: the page colours them as they arrive), and ``/metrics`` when the server has it. It inserts every text
as text (``textContent``, never HTML) and is served with a strict Content-Security-Policy (its own scripts, styles
and API only); its API calls send the API key the user types, so a server with ``--api-key`` refuses them without
it, as it refuses any client.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from modlora.errors import LibraryError
from modlora.library.shared_expert import ShareInfo
from modlora.library.store import ExpertLibrary
from modlora.serve.engine import Engine
from modlora.serve.snapshots import Snapshot

log = logging.getLogger("modlora.serve")

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
# the page's files: URL name -> media type (nothing else under static/ is served)
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
              "page.css": "text/css; charset=utf-8"}


@dataclass(frozen=True)
class ExpertCard:
    """One served expert as the page lists it (None: not recorded, or its files unreadable)."""

    name: str
    tasks: list[str]
    rank: int | None
    parameters: int
    size_bytes: int | None
    val_loss: float | None
    steps: int | None


@dataclass(frozen=True)
class LibraryView:
    """``GET /v1/library``: the experts of the snapshot being served (``generation``), the experts left out (with
    the reason), the shared expert of a ``--share`` library, the served routers and the default one, and
    Arrow's default top-k and temperature."""

    library: str
    generation: int
    experts: list[ExpertCard]
    skipped: list[str]
    shared_expert: str | None
    share_mode: str | None
    routers: list[str]
    default_router: str
    default_top_k: int | None
    default_temperature: float | str | None


def _number(value: Any, kind: type) -> Any:
    """``value`` if it is a ``kind`` number (not a bool), else None (a manifest's metrics are free-form)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and (
        kind is float or isinstance(value, int)) else None


def library_view(engine: Engine, snapshot: Snapshot) -> LibraryView:
    """What the page lists for ``snapshot``: the manifest's record of each served expert."""
    cat = engine.catalogue
    cards: list[ExpertCard] = []
    try:
        lib: ExpertLibrary | None = ExpertLibrary(engine.library_path)
    except LibraryError as exc:               # the manifest being replaced: names only until the next poll
        log.warning("library listing without details: %s", exc)
        lib = None
    for name in snapshot.names():
        entry = lib.entries.get(name) if lib is not None else None
        if entry is None:
            cards.append(ExpertCard(name, [], None, 0, None, None, None))
            continue
        try:
            size: int | None = lib.size_bytes(name) if lib is not None else None
        except LibraryError:
            size = None
        cards.append(ExpertCard(name, list(entry.tasks), _number(entry.lora.get("r"), int), entry.num_parameters,
                                size, _number(entry.metrics.get("best_val_loss"), float),
                                _number(entry.metrics.get("steps"), int)))
    share: ShareInfo | None = cat.share
    return LibraryView(cat.name, snapshot.generation, cards, list(snapshot.skipped),
                       share.expert if share else None, share.mode if share else None, list(cat.methods),
                       cat.default_router, cat.default_top_k, cat.default_temperature)


def page_router(engine: Engine) -> APIRouter:
    """The page (``/``, ``/static/<file>``) and its library listing (``/v1/library``, behind the API key like the
    rest of ``/v1``)."""
    router = APIRouter()
    static = resources.files("modlora.serve") / "static"
    listing: dict[int, dict[str, Any]] = {}     # the latest snapshot generation -> its listing

    def page_file(name: str) -> Response:
        return Response((static / name).read_bytes(), media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    @router.get("/", include_in_schema=False)
    async def index() -> Response:
        return page_file("index.html")

    @router.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in PAGE_FILES or name == "index.html":
            return Response("not found", status_code=404, media_type="text/plain", headers=PAGE_HEADERS)
        return page_file(name)

    @router.get("/v1/library")
    async def library() -> dict[str, Any]:
        snap = engine.snapshot
        if snap.generation not in listing:
            listing.clear()
            listing[snap.generation] = asdict(await run_in_threadpool(library_view, engine, snap))
        return listing[snap.generation]

    return router
