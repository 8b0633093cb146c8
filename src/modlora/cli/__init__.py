"""The ``modlora`` command line: ``modlora COMMAND --help`` explains every option.

One module per group of commands, each with ``register(subparsers, registry)``: :mod:`.library` (tasks, show,
verify, import, export, remove), :mod:`.build` (train, build, cluster), :mod:`.reuse` (generate, route, merge,
export-arrow, lorahub), :mod:`.evaluate` (eval, report), :mod:`.share` (push, pull), :mod:`.serve` (serve),
:mod:`.demo`. Commands that only read a library accept any location of :mod:`modlora.library.location` (``hf://``, fsspec
URLs) through ``common.open_library``. Shared argument groups, parse-time types and the method flags generated from
the registry are in :mod:`.common`. Options are checked before any model loads; bad input ends with ``modlora: error: …`` and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from modlora.cli import build, demo, evaluate, library, reuse, serve, share
from modlora.cli.common import console
from modlora.errors import ModloraError
from modlora.reuse.methods import REGISTRY, Registry

COMMAND_GROUPS = (build, reuse, evaluate, library, share, serve, demo)


def build_parser(registry: Registry = REGISTRY) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modlora", description="Build and reuse libraries of LoRA experts (private, shared and MBC libraries; "
        "Arrow routing and baselines). `modlora COMMAND --help` explains every option.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub, registry)
    return parser


def quiet_libraries() -> None:
    """Keep library chatter (transformers' deprecation notices and weight-loading bars, tokenizers' fork warning) out of
    normal output; modlora's own progress bars stay."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None, registry: Registry = REGISTRY) -> int:
    """Run one command; returns the exit status (0 ok, 1 a check failed, 2 bad input, 130 interrupted)."""
    parser = build_parser(registry)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    args.registry = registry
    quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except ModloraError as exc:
        print(f"modlora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130

