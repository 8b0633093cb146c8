"""Push and pull a library between a local directory and any location (:mod:`~modlora.library.location`).

**Push** (:func:`push`) sends only the files whose SHA-256 differs from the remote index
(:mod:`~modlora.library.index`), and writes the manifest last, holding the location's push lock
(:meth:`~modlora.library.location.RemoteLocation.push_lock`: a second push meanwhile is refused):

1. when files the remote manifest or index vouches for are about to be replaced (a changed expert or artifact), an
   interim index without them and then an interim manifest without the changed experts are written first;
2. new and changed files are uploaded one expert (or artifact) at a time, the index being re-written after each
   (on the Hub: up to 64 files and the index per commit), so that a push killed mid-transfer resumes without
   re-sending an expert that arrived; the interim index records expert files only: artifacts and meta documents
   belong to the new library, so the index vouches for them together with its manifest;
3. the card (:mod:`~modlora.library.card`), the final index, then the manifest (on the Hub: one commit).

A reader opening the library at any moment therefore sees a complete library: the old one, the old one less the
experts and documents being replaced, or the new one; never an expert whose files are half sent, nor a document of
the new library beside the old experts. (A reader that opened the old manifest and downloads an expert the push
replaced afterwards is told the remote changed and to open it again.) Files of experts no longer in the library are
deleted after the manifest. A push refuses a local destination that is, contains or lies inside its source.

**Pull** (:func:`pull`) downloads every expert not already present and identical, and the artifacts and meta files
the index lists, into a staging library inside the destination (``LIB/.modlora-pull/``; a killed pull leaves it for
the next one to resume), checks it as ``modlora verify`` would (checksums; finite floating-point tensors of the
config's rank and of the base model's layer shapes; the manifest's fields) with artifacts finite and meta documents
valid JSON, and only then moves it into place, under the library's lock, recording the experts in the manifest last.
A pull refused leaves the destination as it was. Experts only in the destination are kept.

A pull never loses local data. It replaces an expert or a file only when an earlier pull wrote it and it is
unchanged since (``LIB/.pulled.json`` records the checksums of what pulls wrote). An expert or meta document changed
(or created) here is a conflict: the pull is refused naming them, unless ``force``, which moves them into a new
``LIB/backups/pull-<UTC time>/`` (with their manifest entries in ``entries.json``); an artifact (a derived cache) not
written by a pull is moved there without asking. A pull deletes no file it did not write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from modlora.errors import LibraryError
from modlora.io import atomic_write_bytes, atomic_write_json, parse_json, read_regular_file, sha256_file
from modlora.library.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from modlora.library.card import CARD, library_card
from modlora.library.index import INDEX, FileRecord, expert_files, file_matches, index_bytes, read_index
from modlora.library.location import RemoteLocation, path_inside, resolve_location
from modlora.library.remote import RemoteLibrary, hub_offline, offline_snapshot
from modlora.library.store import (
    ARTIFACTS_DIR,
    EXPERTS_DIR,
    LOCK,
    MANIFEST,
    META_DIR,
    ExpertEntry,
    ExpertLibrary,
    library_lock,
)

HUB_COMMIT_FILES = 64  # files per Hub commit while pushing (each commit also records them in the index)
STAGING = ".modlora-pull"  # LIB/.modlora-pull/: the staging library of a pull in progress
PULLED = ".pulled.json"  # LIB/.pulled.json: {relative path: sha256} of every file a pull wrote
PULLED_FORMAT = "modlora-pulled"
BACKUPS_DIR = "backups"  # LIB/backups/pull-<UTC time>/: what a forced pull moved aside
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int, str], None]
"""``progress(done, total, relative_path)``, called after each file is transferred."""


@dataclass
class TransferReport:
    """What a push or a pull did: files transferred (relative paths), files already in place, bytes sent or
    received, (push) remote files deleted because their experts left the library, and (pull) the local files
    moved aside (``set_aside``, relative paths) into the directory ``backup``."""

    source: str
    destination: str
    transferred: list[str] = field(default_factory=list)
    unchanged: int = 0
    bytes: int = 0
    removed: list[str] = field(default_factory=list)
    card: bool = False
    backup: Path | None = None
    set_aside: list[str] = field(default_factory=list)


def _without_experts(manifest: bytes, drop: Iterable[str]) -> bytes:
    """The manifest with some experts removed, serialised like ``atomic_write_json``."""
    raw = parse_json(manifest)
    drop = set(drop)
    raw["experts"] = {k: v for k, v in raw["experts"].items() if k not in drop}
    return (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()


def _local_files(lib: ExpertLibrary) -> dict[str, FileRecord]:
    """Every file a push sends: experts' files (checked against the manifest), artifacts of the library's experts
    and meta documents."""
    files: dict[str, FileRecord] = {}
    for name in lib.expert_names():
        for fname, digest in lib.entry(name).files.items():
            path = lib.expert_dir(name) / fname
            if not file_matches(path, digest):
                raise LibraryError(f"{lib.path}: expert {name!r}: {path} is missing or does not match its checksum; "
                                   "run `modlora verify`")
            files[f"{EXPERTS_DIR}/{name}/{fname}"] = FileRecord(digest, path.stat().st_size)
    adir = lib.path / ARTIFACTS_DIR
    for path in sorted(adir.glob("*/*.safetensors")) if _real_dir(adir) else []:
        if path.stem in lib and _real_dir(path.parent) and _regular(path):
            files[path.relative_to(lib.path).as_posix()] = FileRecord(sha256_file(path), path.stat().st_size)
    mdir = lib.path / META_DIR
    for path in sorted(mdir.glob("*.json")) if _real_dir(mdir) else []:
        if _regular(path) and not path.name.startswith("."):
            files[path.relative_to(lib.path).as_posix()] = FileRecord(sha256_file(path), path.stat().st_size)
    return files


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _refuse_overlap(path: Path, loc: RemoteLocation, role: str) -> None:
    """Refuse a local location that is ``path`` (``role``: what it is), lies inside it or contains it: a copy into
    itself."""
    if not loc.is_local:
        return
    here, there = path.resolve(), Path(loc.root).resolve()
    if here == there:
        raise LibraryError(f"{loc.url}: this is {role}")
    if there.is_relative_to(here):
        raise LibraryError(f"{loc.url}: lies inside {role} {path}; choose a location outside it")
    if here.is_relative_to(there):
        raise LibraryError(f"{loc.url}: {role} {path} lies inside it; choose a location outside it")


def _units(rels: Iterable[str]) -> list[list[str]]:
    """Group files into transfer units, experts first: an expert's files together, every other file alone."""
    order = {EXPERTS_DIR: 0, ARTIFACTS_DIR: 1}
    groups: dict[str, list[str]] = {}
    for rel in sorted(rels, key=lambda r: (order.get(r.split("/")[0], 2), r)):
        parts = rel.split("/")
        key = "/".join(parts[:2]) if parts[0] == EXPERTS_DIR else rel
        groups.setdefault(key, []).append(rel)
    return list(groups.values())


def _batches(units: list[list[str]], max_files: int) -> list[list[str]]:
    """Consecutive units joined into batches of at least ``max_files`` files (the last may be smaller)."""
    batches: list[list[str]] = []
    for unit in units:
        if not batches or len(batches[-1]) >= max_files:
            batches.append([])
        batches[-1].extend(unit)
    return batches


def push(library: ExpertLibrary | str | os.PathLike[str], url: str | os.PathLike[str] | RemoteLocation, *,
         revision: str | None = None, card: bool = True, progress: Progress | None = None) -> TransferReport:
    """Send a local library to ``url`` incrementally (see the module docstring for the order of writes)."""
    lib = library if isinstance(library, ExpertLibrary) else ExpertLibrary(library)
    if isinstance(lib, RemoteLibrary):
        raise LibraryError(f"{lib.url}: push sends a local library; pull this one first")
    loc = resolve_location(url, revision)
    _refuse_overlap(lib.path, loc, "the library being pushed")
    with library_lock(lib.path):  # a consistent snapshot: no writer between the manifest and the hashes
        lib.reload()
        try:
            manifest = read_regular_file(lib.path / MANIFEST)
        except OSError as exc:
            raise LibraryError(f"{lib.path / MANIFEST}: cannot read the manifest ({exc.strerror or exc})") from None
        local = _local_files(lib)
    loc.prepare_for_writing()
    with loc.push_lock():
        return _send(lib, loc, manifest, local, card, progress)


def _send(lib: ExpertLibrary, loc: RemoteLocation, manifest: bytes, local: dict[str, FileRecord], card: bool,
          progress: Progress | None) -> TransferReport:
    """The writes of a push (see the module docstring), under the location's push lock."""
    remote_manifest = loc.read_bytes(MANIFEST)
    remote: RemoteLibrary | None = None
    if remote_manifest is not None:
        remote = RemoteLibrary(loc)
        remote_manifest = remote._manifest_bytes
        if not remote.base_model.same_weights(lib.base_model) or not remote.base_model.same_tokenizer(lib.base_model):
            raise LibraryError(f"{loc.url}: the library there is for base model {remote.base_model.name!r}, this one "
                               f"for {lib.base_model.name!r}; push to another location")
        index = dict(remote.index)
        old_entries = remote.entries
    else:
        index = read_index(loc, None)  # left by an interrupted first push
        old_entries = {}
    old_files = set(index) | {rel for n in old_entries for rel in expert_files(n)}
    report = TransferReport(str(lib.path), loc.url)

    replaced_experts = {n for n, e in old_entries.items() if n in lib and e.files != lib.entry(n).files}
    replaced = {rel for rel, rec in index.items() if rel in local and rec.sha256 != local[rel].sha256}
    replaced |= {rel for n in replaced_experts for rel in expert_files(n)}
    current = remote_manifest
    if current is not None and replaced:
        if replaced_experts:
            current = _without_experts(current, replaced_experts)
        index = {rel: rec for rel, rec in index.items() if rel not in replaced}
        loc.send(writes=[(INDEX, index_bytes(current, index))] + ([(MANIFEST, current)] if replaced_experts else []),
                 message="modlora push: withdraw the experts being replaced")

    units = _units(rel for rel, rec in local.items() if index.get(rel) != rec)
    total = sum(len(u) for u in units)
    report.unchanged = len(local) - total
    for batch in _batches(units, HUB_COMMIT_FILES if loc.hub else 1):
        index.update((rel, local[rel]) for rel in batch if rel.startswith(f"{EXPERTS_DIR}/"))
        loc.send([(lib.path / rel, rel) for rel in batch], [(INDEX, index_bytes(current, index))],
                 message=f"modlora push: {len(batch)} file(s)")
        for rel in batch:
            report.transferred.append(rel)
            report.bytes += local[rel].size
            if progress is not None:
                progress(len(report.transferred), total, rel)

    final: list[tuple[str, bytes]] = []
    if card:
        text = library_card(lib, loc).encode()
        if loc.read_bytes(CARD) != text:
            final.append((CARD, text))
        report.card = True
    final_index = index_bytes(manifest, local)
    if final or current != manifest or loc.read_bytes(INDEX) != final_index:  # else: the remote is this library
        loc.send(writes=final + [(INDEX, final_index), (MANIFEST, manifest)],
                 message=f"modlora push: library of {len(lib)} experts")
    report.removed = sorted(old_files - set(local))
    loc.delete(report.removed, message="modlora push: delete the files of experts no longer in the library")
    return report


def pull(url: str | os.PathLike[str] | RemoteLocation, library_path: str | os.PathLike[str], *, revision: str | None = None,
         force: bool = False, progress: Progress | None = None) -> TransferReport:
    """Copy the library at ``url`` into the local library ``library_path`` (created if absent), resumably and
    checked (see the module docstring); ``force`` moves local changes aside instead of refusing them. An ``hf://``
    ``url`` in offline mode is read from the Hugging Face cache's snapshot (:func:`~.remote.offline_snapshot`)."""
    loc = resolve_location(url, revision)
    dest = Path(library_path)
    _refuse_overlap(dest, loc, "the destination library")
    remote = RemoteLibrary(offline_snapshot(loc) if loc.hub is not None and hub_offline() else loc)
    local = _destination(dest, remote)
    if local is not None:
        with library_lock(dest):
            local.reload()
            plan = _Plan.of(dest, local, remote)
    else:
        plan = _Plan.of(dest, None, remote)
    if plan.conflicts and not force:
        raise _conflict_error(dest, loc.url, plan.conflicts)
    created = not os.path.lexists(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LibraryError(f"{dest}: cannot create the library directory ({exc.strerror or exc})") from None
    report = TransferReport(loc.url, str(dest))
    with _pull_lock(dest):
        staging = _staging(dest, plan, remote)
        try:
            _download(remote, staging, plan, report, progress)
            problems = [" ".join(p.split()) for p in _staged_problems(staging, remote, local, plan)]
            if problems:
                raise _Refused(LibraryError(
                    f"{loc.url}: refusing the pull into {dest} (left as it was): " + "; ".join(problems[:3])
                    + (f"; and {len(problems) - 3} more problem(s)" if len(problems) > 3 else "")))
            _commit(dest, staging, remote, plan, force, report)
        except _Refused as refused:
            _discard(staging, dest if created else None)
            raise refused.error from None
        shutil.rmtree(staging)
    return report


class _Refused(Exception):
    """A pull refused once it started (content that fails the checks, or a local change meanwhile): its staging is
    discarded, unlike after a failed transfer (kept for the next pull to resume)."""

    def __init__(self, error: LibraryError):
        super().__init__(str(error))
        self.error = error


@dataclass
class _Plan:
    """What a pull does to the destination: experts and files (artifacts, meta) to download and move into place, how
    many files are already identical, and the local items it would replace that no pull wrote (``conflicts``: only
    with ``force``; ``set_aside``: artifacts, moved aside without asking)."""

    experts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    unchanged: int = 0
    conflicts: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)
    pulled: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, dest: Path, local: ExpertLibrary | None, remote: RemoteLibrary) -> _Plan:
        plan = cls(pulled=_read_pulled(dest))
        entries = local.entries if local is not None else {}
        for name in remote.expert_names():
            files = remote.entry(name).files
            target = dest / EXPERTS_DIR / name
            if _real_dir(target) and all(_matches(target / f, d) for f, d in files.items()):
                plan.unchanged += len(files)
                continue
            plan.experts.append(name)
            if os.path.lexists(target) and not plan._pulled_expert(target, name, entries.get(name)):
                plan.conflicts.append(f"{EXPERTS_DIR}/{name}")
        for rel in _remote_files(remote):
            path = dest / rel
            if _matches(path, remote.index[rel].sha256):
                plan.unchanged += 1
                continue
            plan.files.append(rel)
            if os.path.lexists(path) and not (rel in plan.pulled and _matches(path, plan.pulled[rel])):
                (plan.conflicts if rel.startswith(f"{META_DIR}/") else plan.set_aside).append(rel)
        plan.conflicts.sort()
        return plan

    def _pulled_expert(self, target: Path, name: str, entry: ExpertEntry | None) -> bool:
        """Whether ``experts/<name>`` holds exactly what an earlier pull wrote there (and the manifest records)."""
        names = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
        digests = {f: self.pulled.get(f"{EXPERTS_DIR}/{name}/{f}", "") for f in names}
        try:
            if not _real_dir(target) or sorted(os.listdir(target)) != sorted(names):
                return False
        except OSError:
            return False
        return all(_matches(target / f, d) for f, d in digests.items()) and (entry is None or entry.files == digests)


def _remote_files(remote: RemoteLibrary) -> list[str]:
    """The artifacts (of the remote's experts) and meta documents its index lists."""
    out = []
    for rel in sorted(remote.index):
        parts = rel.split("/")
        if (parts[0] == META_DIR
                or (parts[0] == ARTIFACTS_DIR and parts[2].removesuffix(".safetensors") in remote)):
            out.append(rel)
    return out


def _matches(path: Path, digest: str) -> bool:
    """:func:`~modlora.library.index.file_matches`, False for a file that cannot be read."""
    try:
        return bool(digest) and file_matches(path, digest)
    except OSError:
        return False


def _destination(dest: Path, remote: RemoteLibrary) -> ExpertLibrary | None:
    """The library at ``dest`` (same base model as the remote), or None for a new directory or an interrupted
    first pull."""
    if (dest / MANIFEST).exists():
        local = ExpertLibrary(dest)
        if not local.base_model.same_weights(remote.base_model) or not local.base_model.same_tokenizer(
                remote.base_model):
            raise LibraryError(f"{dest}: this library is for base model {local.base_model.name!r}, the one at "
                               f"{remote.url} for {remote.base_model.name!r}; pull into another directory")
        return local
    if dest.exists() and (not dest.is_dir() or any(
            p.name not in (EXPERTS_DIR, ARTIFACTS_DIR, META_DIR, LOCK, STAGING, PULLED, BACKUPS_DIR)
            for p in dest.iterdir())):
        raise LibraryError(f"{dest}: exists and is neither a library nor an interrupted pull; pull into a new "
                           "directory")
    return None


def _conflict_error(dest: Path, url: str, conflicts: list[str]) -> LibraryError:
    shown = ", ".join(conflicts[:8]) + (f" and {len(conflicts) - 8} more" if len(conflicts) > 8 else "")
    return LibraryError(f"{dest}: the pull from {url} would replace {len(conflicts)} item(s) changed here since a "
                        f"pull wrote them (or never pulled): {shown}; nothing was changed. Pass --force (force=True) "
                        f"to move them aside into {dest / BACKUPS_DIR}/ and take the remote's")


@contextlib.contextmanager
def _pull_lock(dest: Path) -> Iterator[None]:
    """One pull at a time into ``dest``: an exclusive ``flock`` on the directory itself (not on the library's
    ``.lock``, which readers share: they may go on reading while the pull downloads)."""
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise LibraryError(f"{dest}: cannot lock the directory for a pull ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _staging(dest: Path, plan: _Plan, remote: RemoteLibrary) -> Path:
    """``dest/.modlora-pull/``, keeping only what an interrupted pull staged that this one still wants, intact."""
    staging = dest / STAGING
    if os.path.lexists(staging) and not _real_dir(staging):
        raise LibraryError(f"{staging}: is not the directory a pull stages its downloads in; move it away")
    keep = {f"{EXPERTS_DIR}/{n}/{f}": d for n in plan.experts for f, d in remote.entry(n).files.items()}
    keep.update((rel, remote.index[rel].sha256) for rel in plan.files)
    for root, dirs, files in os.walk(staging, topdown=False):
        for fname in files:
            path = Path(root) / fname
            rel = path.relative_to(staging).as_posix()
            if not (rel in keep and _matches(path, keep[rel])):
                path.unlink()
        for dname in dirs:
            path = Path(root) / dname
            if path.is_symlink():
                path.unlink()
            elif not any(path.iterdir()):
                path.rmdir()
    staging.mkdir(exist_ok=True)
    return staging


def _download(remote: RemoteLibrary, staging: Path, plan: _Plan, report: TransferReport,
              progress: Progress | None) -> None:
    """Download into the staging library what it does not hold yet (each file checked against its SHA-256)."""
    report.unchanged = plan.unchanged
    wanted: list[tuple[list[str], Callable[[], None]]] = []
    for name in plan.experts:
        target = staging / EXPERTS_DIR / name
        if all(_matches(target / f, d) for f, d in remote.entry(name).files.items()):
            report.unchanged += len(remote.entry(name).files)
        else:
            wanted.append((expert_files(name), lambda n=name, t=target: remote.download_expert(n, t)))
    for rel in plan.files:
        if _matches(staging / rel, remote.index[rel].sha256):
            report.unchanged += 1
        else:
            wanted.append(([rel], lambda r=rel: remote.download_file(r, staging / r, r)))
    total = sum(len(rels) for rels, _ in wanted)
    for rels, fetch in wanted:
        fetch()
        for rel in rels:
            report.transferred.append(rel)
            report.bytes += (staging / rel).stat().st_size
            if progress is not None:
                progress(len(report.transferred), total, rel)


def _staged_problems(staging: Path, remote: RemoteLibrary, local: ExpertLibrary | None, plan: _Plan) -> list[str]:
    """What ``modlora verify`` would find wrong with the staged experts (against the destination's base model shapes
    when it records them), non-finite artifacts and meta documents that are not JSON."""
    problems: list[str] = []
    if plan.experts:
        raw = parse_json(remote._manifest_bytes)
        raw["experts"] = {n: raw["experts"][n] for n in plan.experts}
        if local is not None and local.linear_shapes:
            raw["base_model"]["linear_shapes"] = {m: list(s) for m, s in local.linear_shapes.items()}
        atomic_write_json(staging / MANIFEST, raw)
        for p in ExpertLibrary(staging).verify():
            problems.append(p.problem if repr(p.expert) in p.problem else f"expert {p.expert!r}: {p.problem}")
    for rel in plan.files:
        try:
            data = read_regular_file(staging / rel)
            if rel.startswith(f"{META_DIR}/"):
                parse_json(data)
                continue
            tensors = load_safetensors_bytes(data)
        except (OSError, ValueError, SafetensorError) as exc:
            problems.append(f"{rel}: not a valid {'JSON' if rel.startswith(META_DIR) else 'safetensors'} file "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            continue
        bad = sorted(k for k, t in tensors.items() if not t.is_floating_point() or not torch.isfinite(t).all())
        if bad:
            problems.append(f"{rel}: tensor {bad[0]!r} is not finite floating point")
    return problems


def _commit(dest: Path, staging: Path, remote: RemoteLibrary, plan: _Plan, force: bool,
            report: TransferReport) -> None:
    """Move the staged files into the destination (what they replace moved aside, or deleted when a pull wrote it)
    and record the experts in its manifest, last; then record what was pulled."""
    with library_lock(dest):
        local = ExpertLibrary(dest) if (dest / MANIFEST).exists() else None
        now = _Plan.of(dest, local, remote)
        if not set(now.experts) <= set(plan.experts) or not set(now.files) <= set(plan.files):
            raise _Refused(LibraryError(f"{dest}: the library changed during the pull; pull again"))
        if now.conflicts and not force:
            raise _Refused(_conflict_error(dest, remote.url, now.conflicts))
        moves = [f"{EXPERTS_DIR}/{n}" for n in now.experts] + now.files
        for rel in moves:   # never written through a link (the item itself, if a link, is moved aside)
            path_inside(dest, rel.rsplit("/", 1)[0])
        aside = set(now.conflicts) | set(now.set_aside)
        replaced = staging / ".replaced"
        set_aside_entries: dict[str, Any] = {}
        for rel in moves:
            target = dest / rel
            if rel in aside:
                if report.backup is None:
                    report.backup = _backup_dir(dest)
                (report.backup / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, report.backup / rel)
                report.set_aside.append(rel)
                name = rel.split("/")[1]
                if rel.startswith(f"{EXPERTS_DIR}/") and local is not None and name in local:
                    set_aside_entries[name] = local.entry(name).to_dict()
            elif os.path.lexists(target):   # an earlier pull's file, unchanged since
                (replaced / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, replaced / rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target)
        if report.backup is not None:
            atomic_write_json(report.backup / "entries.json", set_aside_entries)
        if local is None:
            atomic_write_bytes(dest / MANIFEST, remote._manifest_bytes)
            ExpertLibrary(dest)  # validates what was written
    if local is not None:
        local.register(remote.entry(n) for n in remote.expert_names())
    pulled = {**now.pulled, **{f"{EXPERTS_DIR}/{n}/{f}": d for n in remote.expert_names()
                               for f, d in remote.entry(n).files.items()}}
    pulled.update((rel, remote.index[rel].sha256) for rel in _remote_files(remote))
    atomic_write_json(dest / PULLED, {"format": PULLED_FORMAT, "version": 1, "files": dict(sorted(pulled.items()))})


def _backup_dir(dest: Path) -> Path:
    """A new ``dest/backups/pull-<UTC time>[-N]/``."""
    stamp = time.strftime("%Y%m%d-%H%M%SZ", time.gmtime())
    for n in range(1, 1000):
        path = dest / BACKUPS_DIR / (f"pull-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise LibraryError(f"{dest / BACKUPS_DIR}: cannot create a new backup directory")


def _discard(staging: Path, created: Path | None) -> None:
    """Remove a refused pull's staging library (and the destination directory when this pull created it and
    nothing else is there)."""
    shutil.rmtree(staging, ignore_errors=True)
    if created is not None:
        with contextlib.suppress(OSError):
            if {p.name for p in created.iterdir()} <= {LOCK}:
                (created / LOCK).unlink(missing_ok=True)
                created.rmdir()


def _read_pulled(dest: Path) -> dict[str, str]:
    """``LIB/.pulled.json``'s records; ``{}`` when absent or malformed (then nothing counts as pulled: a pull refuses
    more, never less)."""
    try:
        doc = parse_json(read_regular_file(dest / PULLED))
        files = doc["files"] if doc.get("format") == PULLED_FORMAT and doc.get("version") == 1 else {}
        if isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) and _SHA256_RE.match(v)
                                           for k, v in files.items()):
            return dict(files)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return {}
