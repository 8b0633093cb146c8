"""Serving: ``modlora serve LIB`` (an OpenAI-compatible HTTP server, :mod:`modlora.serve`)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modlora.cli.common import (
    UsageError,
    add_library_arg,
    add_model_args,
    nonnegative_int,
    open_library,
    option_flag,
    positive_int,
)
from modlora.errors import ModloraError
from modlora.library.location import is_url
from modlora.reuse.methods import Registry
from modlora.reuse.methods.core import ReuseMethod


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {text!r}")
    return value


def _option_value(method: type[ReuseMethod], field: dataclasses.Field[Any]) -> Callable[[str], Any]:
    """An argparse type for one option field of ``method``: the field's own parser, then the method's own check."""
    parse = field.metadata.get("cli", {}).get("type", str)

    def value(text: str) -> Any:
        try:
            parsed = parse(text)
            method.options_from({field.name: parsed})
        except (ValueError, ModloraError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return parsed
    value.__name__ = field.name
    return value


def add_arrow_defaults(p: argparse.ArgumentParser, registry: Registry) -> None:
    """``--route-top-k`` and ``--route-temperature``: Arrow's options for the requests that give none, with the defaults, help
    text and checks of the registry's Arrow options."""
    arrow = registry.get("arrow")
    fields = {f.name: f for f in dataclasses.fields(arrow.Options)}
    notes = {"top_k": "; a default above the number of experts is capped, a requested top_k is refused"}
    for name in ("top_k", "temperature"):
        f = fields[name]
        p.add_argument(option_flag(name), dest=name, type=_option_value(arrow, f), default=f.default,
                       help=f"Arrow's {f.metadata['help']}, for requests that give none (default {f.default}"
                            f"{notes.get(name, '')})")


def register(sub: Any, registry: Registry) -> None:
    from modlora.serve.served import served_methods

    methods = list(served_methods(registry))
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server that routes every token through a library",
        description="Serve LIB over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions). "
                    "Models: LIB (the --method), LIB:<method> for each method below and LIB:expert:<name>; requests "
                    "may choose the router, top_k, temperature and a subset of experts with "
                    "extra_body={'routing': {...}}. Experts added to LIB while serving become available without a "
                    "restart.")
    add_library_arg(p, help="library directory, or a remote location (hf://, s3://, …: served from a verified local "
                            "snapshot; new experts there appear after a restart)")
    add_model_args(p)
    p.add_argument("--method", choices=methods, default="arrow", metavar="METHOD",
                   help=f"method of the model id LIB (default arrow; mu = parameter averaging, mu-delta = exact mean "
                        f"of the experts' ΔW, base = no experts); one of: {', '.join(methods)}")
    add_arrow_defaults(p, registry)
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
    p.add_argument("--max-body-bytes", type=positive_int, default=1024 * 1024, metavar="N",
                   help="largest request body in bytes; a larger one is refused with HTTP 413 while it is being read, "
                        "never held whole (default 1048576 = 1 MiB)")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="let POST /v1/load_lora_adapter and /v1/unload_lora_adapter import a PEFT adapter directory "
                        "on this machine into LIB (modlora import's checks) or remove an expert (default: off, 403)")
    p.add_argument("--prefill-tokens", type=positive_int, default=256, metavar="N",
                   help="most prompt tokens one step reads (several prompts packed together; a longer prompt is read "
                        "over several steps between decoding steps, so it never stalls the batch; default 256)")
    p.add_argument("--prefix-cache-tokens", type=nonnegative_int, default=8192, metavar="N",
                   help="prompt tokens whose keys/values are kept for prompts that start alike (a task's definition, "
                        "a system prompt); 0 turns the prefix cache off (default 8192)")
    p.add_argument("--prefix-block", type=positive_int, default=16, metavar="N",
                   help="prefix-cache block: prompts share whole blocks of this many tokens (default 16)")
    p.add_argument("--ray", action="store_true", help="run under Ray Serve (a local Ray instance)")
    p.add_argument("--ray-log-level", choices=("WARNING", "INFO", "DEBUG"), default="WARNING",
                   help="Ray Serve's log level; INFO adds a line per request (default WARNING; needs --ray)")
    p.add_argument("--replicas", type=positive_int, default=None,
                   help="Ray Serve replicas, each with its own model (needs --ray; default 1)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from modlora.serve.requests import EngineOptions
    from modlora.serve.server import ServeConfig, resolve_api_key, run_ray, run_server

    if args.replicas is not None and not args.ray:
        raise UsageError("--replicas needs --ray")
    if args.ray_log_level != "WARNING" and not args.ray:
        raise UsageError("--ray-log-level needs --ray")
    if args.allow_adapter_loading and is_url(args.library) and not args.library.startswith("file://"):
        raise UsageError("--allow-adapter-loading needs a local library (a remote one is served from a read-only "
                         "snapshot)")
    library = open_library(args.library, args.revision)
    if is_url(args.library) and not args.library.startswith("file://"):
        for name in library.expert_names():  # download and verify every expert into the local mirror, once
            library.get(name)
        print(f"modlora serve: serving a snapshot of {args.library} ({len(library)} experts, verified)", flush=True)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    options = EngineOptions(max_batch=args.max_batch, max_queue=args.max_queue,
                            batch_wait_s=args.batch_wait_ms / 1000, default_max_tokens=args.default_max_tokens,
                            default_router=args.method, default_top_k=args.top_k,
                            default_temperature=args.temperature, prefill_tokens=args.prefill_tokens,
                            prefix_cache_tokens=args.prefix_cache_tokens, prefix_block=args.prefix_block)
    dtype = None if args.dtype in (None, "auto") else args.dtype
    config = ServeConfig(str(Path(library.path).resolve()), model=args.model, device=args.device, dtype=dtype,
                         name=args.name, engine=options, api_key=resolve_api_key(args.api_key),
                         max_body_bytes=args.max_body_bytes, registry=args.registry,
                         adapter_loading=args.allow_adapter_loading)
    if args.ray:
        print(f"modlora serve: starting {args.replicas or 1} Ray Serve replica(s) on http://{args.host}:{args.port}/v1",
              flush=True)
        run_ray(config, args.host, args.port, args.replicas or 1, log_level=args.ray_log_level)
    else:
        run_server(config, args.host, args.port,
                   announce=lambda line: print(f"modlora serve: {line} (Ctrl-C stops)", flush=True))
    return 0
