"""The ``modlora`` command line: ``modlora COMMAND --help`` explains every option.

One module per group of commands, each with ``register(subparsers, registry)``: :mod:`.library` (tasks, show,
verify, import, export, remove), :mod:`.build` (train, build, cluster), :mod:`.reuse` (generate, route, merge,
export-arrow, lorahub), :mod:`.evaluate` (eval, report), :mod:`.share` (push, pull), :mod:`.serve` (serve),
:mod:`.demo`. Commands that only read a library accept any location of :mod:`modlora.library.location` (``hf://``, fsspec
URLs) through ``common.open_library``. Shared argument groups, parse-time types and the method flags generated from
the registry are in :mod:`.common`. Options are checked before any model loads. Every failure is one line on stderr
naming what is at fault, never a traceback: bad input ``modlora COMMAND: error: …`` with exit status 2, a file the
system refused (a path that cannot be created, a full disk) ``modlora COMMAND: error: PATH: reason`` with exit status 1,
Ctrl-C ``modlora COMMAND: interrupted`` with exit status 130 (a build keeps every expert it stored and resumes).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from modlora.cli import build, demo, evaluate, library, reuse, serve, share
from modlora.cli.common import CommandLineParser
from modlora.errors import ModloraError
from modlora.reuse.methods import REGISTRY, Registry

COMMAND_GROUPS = (build, reuse, evaluate, library, share, serve, demo)


def build_parser(registry: Registry = REGISTRY) -> argparse.ArgumentParser:
    parser = CommandLineParser(
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


def describe_os_error(exc: OSError) -> str:
    """One line for an error the system raised: the path(s) it names, then the reason (``PATH: No space left on
    device``)."""
    reason = " ".join((exc.strerror or str(exc) or type(exc).__name__).split())
    paths = [os.fsdecode(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def main(argv: Sequence[str] | None = None, registry: Registry = REGISTRY) -> int:
    """Run one command; returns the exit status (0 ok, 1 a check failed or the system refused a file, 2 bad input,
    130 interrupted)."""
    parser = build_parser(registry)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    args.registry = registry
    try:
        quiet_libraries()
        return int(args.func(args) or 0)
    except ModloraError as exc:
        print(f"modlora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"modlora {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = getattr(args, "on_interrupt", None)
        print(f"modlora {args.command}: interrupted" + (f"; {resume}" if resume else ""), file=sys.stderr)
        return 130

