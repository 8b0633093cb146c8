"""``modlora serve``: an OpenAI-compatible HTTP server that routes every token through a live expert library.

* :mod:`modlora.serve.engine` — continuous batching over one model thread, live library snapshots;
* :mod:`modlora.serve.routing` — per-example routing inside a shared forward (the one link to modlora.reuse.routing);
* :mod:`modlora.serve.app` — the FastAPI app (OpenAI schemas, SSE, errors, API key);
* :mod:`modlora.serve.server` — uvicorn and Ray Serve runners.
"""

from modlora.serve.app import ServerOptions, create_app
from modlora.serve.engine import Engine, EngineOptions, RequestError, RoutingRequest, SamplingParams
from modlora.serve.server import BackgroundServer, ServeConfig, build_app, run_ray, run_server

__all__ = ["BackgroundServer", "Engine", "EngineOptions", "RequestError", "RoutingRequest", "SamplingParams",
           "ServeConfig", "ServerOptions", "build_app", "create_app", "run_ray", "run_server"]
