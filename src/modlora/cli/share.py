"""Sharing commands: ``push`` a local library to a location, ``pull`` one into a local library."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modlora.cli.common import UsageError, console
from modlora.reuse.methods import Registry

LOCATIONS = "file://, hf://ORG/REPO[@REVISION][/PATH], or any fsspec URL (s3://, gs://, memory://, ...) or directory"


@contextmanager
def _progress(verb: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar over files (shown on a terminal only), as a ``progress(done, total, path)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn(f"{verb} [progress.description]{{task.description}}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, rel: str) -> None:
            bar.update(task, completed=done, total=total, description=rel)

        yield update


def _summary(report: Any, verb: str) -> str:
    return (f"{verb} {len(report.transferred)} file(s), {report.bytes / 1024:.0f} KiB; {report.unchanged} already "
            f"there" + (f"; {len(report.removed)} removed" if report.removed else ""))


def cmd_push(args: argparse.Namespace) -> int:
    from modlora.library.store import ExpertLibrary
    from modlora.library.transfer import push

    lib = ExpertLibrary(args.library)
    with _progress("push") as progress:
        report = push(lib, args.url, revision=args.revision, card=not args.no_card, progress=progress)
    console.print(f"{_summary(report, 'sent')} → {report.destination} ({len(lib)} experts"
                  + (", library card README.md" if report.card else "") + ")", highlight=False)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from modlora.library.store import ExpertLibrary
    from modlora.library.transfer import pull

    if args.library.exists() and not args.library.is_dir():
        raise UsageError(f"{args.library} is a file, not a library directory")
    with _progress("pull") as progress:
        report = pull(args.url, args.library, revision=args.revision, force=args.force, progress=progress)
    console.print(f"{_summary(report, 'received')} ← {report.source}; {args.library} has "
                  f"{len(ExpertLibrary(args.library))} experts", highlight=False)
    if report.backup is not None:
        console.print(f"moved {len(report.set_aside)} local item(s) aside into {report.backup}: "
                      + ", ".join(report.set_aside), highlight=False)
    return 0


def register(sub: Any, registry: Registry) -> None:
    p = sub.add_parser("push", help="send a library to the Hub or any fsspec location (incremental)",
                       description="Send a local library to a location: only new or changed experts, artifacts and "
                                   "meta files travel, and the manifest is written last, so a reader never sees a "
                                   "half-pushed library; an interrupted push resumes. Writes a library card "
                                   "(README.md, a Hub model card). The Hub repository and branch are created when "
                                   "missing (log in with `hf auth login` or set HF_TOKEN).")
    p.add_argument("library", type=Path, help="the local library directory to send")
    p.add_argument("url", help=f"where to: {LOCATIONS}")
    p.add_argument("--revision", default=None, help="hf:// only: the branch to commit to (created if missing)")
    p.add_argument("--no-card", action="store_true", help="leave README.md alone (no library card)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="copy a shared library into a local library (resumable)",
                       description="Copy the library at a location into a local library directory (created if "
                                   "missing; experts only there are kept). Every file is checked against its sha256 "
                                   "and every expert as `modlora verify` would before anything is moved into place; "
                                   "only experts not already present and identical are downloaded, and the manifest "
                                   "is written last, so an interrupted pull resumes. An expert or meta document "
                                   "changed here since a pull wrote it is never replaced without --force.")
    p.add_argument("url", help=f"where from: {LOCATIONS}")
    p.add_argument("library", type=Path, help="the local library directory to fill")
    p.add_argument("--revision", default=None, help="hf:// only: the branch, tag or commit to copy")
    p.add_argument("--force", action="store_true",
                   help="replace experts and meta documents changed here with the remote's, moving the local ones "
                        "into LIB/backups/pull-<UTC time>/ (never deleted)")
    p.set_defaults(func=cmd_pull)
