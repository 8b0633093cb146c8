"""``modlora serve``: an OpenAI-compatible HTTP server that routes every token through a live expert library.

* :mod:`modlora.serve.engine` — the loop: continuous batching over one model thread, built from
  :mod:`~modlora.serve.requests` (request/response types), :mod:`~modlora.serve.catalogue` (model ids, admission),
  :mod:`~modlora.serve.snapshots` (live library snapshots, the pool of expert versions),
  :mod:`~modlora.serve.decoding` (one request's decoding state), :mod:`~modlora.serve.batching` (the batch, its
  slot KV cache and the prefix cache), :mod:`~modlora.serve.sampling` (token choice, stop strings) and :mod:`~modlora.serve.telemetry`;
* :mod:`modlora.serve.routing` — per-example routing inside a shared forward (the one link to modlora.reuse.routing);
* :mod:`modlora.serve.app` — the FastAPI app (OpenAI schemas, SSE, errors, API key, /metrics, adapter loading);
* :mod:`modlora.serve.page` — the routing page at ``/`` (``static/``: plain HTML/JS/CSS);
* :mod:`modlora.serve.server` — uvicorn and Ray Serve runners.
"""

from __future__ import annotations

from modlora.lazy import lazy_exports

# name → the submodule that defines it; imported on first use, so importing one submodule (or the package)
# does not load the others and their dependencies
_LAZY = {
    "create_app": "modlora.serve.app",
    "ServerOptions": "modlora.serve.app",
    "Engine": "modlora.serve.engine",
    "EngineOptions": "modlora.serve.requests",
    "RequestError": "modlora.serve.requests",
    "RoutingRequest": "modlora.serve.requests",
    "SamplingParams": "modlora.serve.requests",
    "BackgroundServer": "modlora.serve.server",
    "build_app": "modlora.serve.server",
    "run_ray": "modlora.serve.server",
    "run_server": "modlora.serve.server",
    "ServeConfig": "modlora.serve.server",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
