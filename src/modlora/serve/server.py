"""Running the app: in this process with uvicorn (:func:`run_server`, :class:`BackgroundServer` for tests) or
scaled out over Ray Serve replicas (:func:`run_ray`)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn

from modlora.errors import ModloraError
from modlora.models import DEFAULT_MODEL, load_base_model
from modlora.reuse.methods import REGISTRY, Registry
from modlora.serve.app import DEFAULT_MAX_BODY_BYTES, ServerOptions, create_app
from modlora.serve.engine import Engine
from modlora.serve.requests import EngineOptions

API_KEY_ENV = "MODLORA_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """Everything a replica needs to build its engine and app (plain data, so Ray can ship it)."""

    library: str
    model: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str | None = None
    name: str | None = None
    engine: EngineOptions = EngineOptions()
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    adapter_loading: bool = False
    registry: Registry = REGISTRY


def build_app(config: ServeConfig) -> Any:
    """Load the base model, open the library, start the engine and return the FastAPI app."""
    lm = load_base_model(config.model, device=config.device, dtype=config.dtype)
    engine = Engine(lm, config.library, config.engine, name=config.name, registry=config.registry).start()
    app = create_app(engine, ServerOptions(api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                                                   adapter_loading=config.adapter_loading))
    app.state.engine = engine
    return app


def resolve_api_key(flag: str | None) -> str | None:
    """``--api-key`` if given, else ``$MODLORA_API_KEY``, else no key."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    return key or None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """uvicorn serving ``app`` from a thread (tests, benchmarks); ``url`` is its ``/v1`` base URL."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.port = port or free_port(host)
        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise ModloraError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
               announce: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted; ``announce`` gets a one-line status once the model is loaded."""
    app = build_app(config)
    engine = app.state.engine
    if announce is not None:
        announce(f"serving {engine.name} ({len(engine.snapshot.experts)} experts) on http://{host}:{port}/v1")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="off")
    finally:
        app.state.engine.stop()


RAY_QUIET = "WARNING"      # Ray Serve's log level unless asked: no INFO line per request


def ray_logging(level: str = RAY_QUIET) -> dict[str, Any]:
    """Ray Serve's logging config at ``level`` (its access log, one INFO line per request, only at INFO or
    DEBUG)."""
    return {"log_level": level, "enable_access_log": level in ("INFO", "DEBUG")}


def ray_deployment(config: ServeConfig, replicas: int, log_level: str = RAY_QUIET) -> Any:
    """A Ray Serve application: ``replicas`` copies of the app, each with its own engine. A replica takes at most
    ``--max-batch`` requests at a time (``max_ongoing_requests``; Ray's default is 5), so Ray routes the rest to
    another replica or queues them; its logs are at ``log_level``."""
    from ray import serve

    if replicas < 1:
        raise ModloraError(f"--replicas must be >= 1, got {replicas}")

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=config.engine.max_batch, logging_config=ray_logging(log_level))
    @serve.ingress(lambda: build_app(config))
    class ModloraServe:
        pass

    return ModloraServe.bind()


def run_ray(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
            log_level: str = RAY_QUIET) -> None:
    """Start (or join) a local Ray instance and serve with Ray Serve until interrupted (Ray's controller, proxy
    and replicas log at ``log_level``)."""
    import ray
    from ray import serve

    ray.init(ignore_reinit_error=True, include_dashboard=False, logging_level=log_level)
    serve.start(http_options={"host": host, "port": port}, logging_config=ray_logging(log_level))
    serve.run(ray_deployment(config, replicas, log_level), name="modlora", route_prefix="/", blocking=True,
              logging_config=ray_logging(log_level))
