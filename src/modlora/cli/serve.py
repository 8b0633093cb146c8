"""Serving: ``modlora serve LIB`` (an OpenAI-compatible HTTP server, :mod:`modlora.serve`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modlora.cli.common import (
    UsageError,
    add_library_arg,
    add_model_args,
    nonnegative_int,
    open_library,
    positive_int,
)
from modlora.library.remote import is_url
from modlora.reuse.methods import Registry


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {text!r}")
    return value


def register(sub: Any, registry: Registry) -> None:
    from modlora.serve.routing import served_methods

    routers = list(served_methods(registry))
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server that routes every token through a library",
        description="Serve LIB over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions). "
                    "Models: LIB (the --router), LIB:<router> for each router below and LIB:expert:<name>; requests "
                    "may choose the router, top_k, temperature and a subset of experts with "
                    "extra_body={'routing': {...}}. Experts added to LIB while serving become available without a "
                    "restart.")
    add_library_arg(p, help="library directory, or a remote location (hf://, s3://, …: served from a verified local "
                            "snapshot; new experts there appear after a restart)")
    add_model_args(p)
    p.add_argument("--router", choices=routers, default="arrow", metavar="METHOD",
                   help=f"router of the model id LIB (default arrow; mu = parameter averaging, mu-delta = exact mean "
                        f"of the experts' ΔW, base = no experts); one of: {', '.join(routers)}")
    p.add_argument("--top-k", type=positive_int, default=4,
                   help="Arrow top-k when a request gives none (default 4, at most the number of experts)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None, help="model id of the library (default: the directory's name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $MODLORA_API_KEY; no key when unset)")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="requests decoded together in one forward pass (default 16)")
    p.add_argument("--max-queue", type=nonnegative_int, default=64,
                   help="requests that may wait for a batch slot; more get HTTP 429 (default 64)")
    p.add_argument("--batch-wait-ms", type=nonnegative_int, default=5,
                   help="after an idle spell, wait this long for more requests before the first forward (default 5)")
    p.add_argument("--default-max-tokens", type=positive_int, default=256,
                   help="new tokens of a chat request that sets no max_tokens (default 256; completions: 16)")
    p.add_argument("--ray", action="store_true", help="run under Ray Serve (a local Ray instance)")
    p.add_argument("--replicas", type=positive_int, default=None,
                   help="Ray Serve replicas, each with its own model (needs --ray; default 1)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from modlora.serve.engine import EngineOptions
    from modlora.serve.server import ServeConfig, resolve_api_key, run_ray, run_server

    if args.replicas is not None and not args.ray:
        raise UsageError("--replicas needs --ray")
    library = open_library(args.library, args.revision)
    if is_url(args.library) and not args.library.startswith("file://"):
        for name in library.expert_names():  # download and verify every expert into the local mirror, once
            library.get(name)
        print(f"modlora serve: serving a snapshot of {args.library} ({len(library)} experts, verified)", flush=True)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    options = EngineOptions(max_batch=args.max_batch, max_queue=args.max_queue,
                            batch_wait_s=args.batch_wait_ms / 1000, default_max_tokens=args.default_max_tokens,
                            default_router=args.router, default_top_k=args.top_k)
    dtype = None if args.dtype in (None, "auto") else args.dtype
    config = ServeConfig(str(Path(library.path).resolve()), model=args.model, device=args.device, dtype=dtype,
                         name=args.name, engine=options, api_key=resolve_api_key(args.api_key),
                         registry=args.registry)
    if args.ray:
        print(f"modlora serve: starting {args.replicas or 1} Ray Serve replica(s) on http://{args.host}:{args.port}/v1",
              flush=True)
        run_ray(config, args.host, args.port, args.replicas or 1)
    else:
        run_server(config, args.host, args.port,
                   announce=lambda line: print(f"modlora serve: {line} (Ctrl-C stops)", flush=True))
    return 0
