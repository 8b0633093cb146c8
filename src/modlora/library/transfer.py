"""Push and pull a library between a local directory and any location (:mod:`~modlora.library.location`).

**Push** (:func:`push`) sends only the files whose SHA-256 differs from the remote index
(:mod:`~modlora.library.index`), and writes the manifest last:

1. when files the remote manifest or index vouches for are about to be replaced (a changed expert or artifact), an
   interim index without them and then an interim manifest without the changed experts are written first;
2. new and changed files are uploaded one expert (or artifact) at a time, the index being re-written after each
   (on the Hub: up to 64 files and the index per commit), so that a push killed mid-transfer resumes without
   re-sending what arrived;
3. the card (:mod:`~modlora.library.card`), the final index, then the manifest (on the Hub: one commit).

A reader opening the library at any moment therefore sees a complete library: the old one, the old one less the
experts being replaced, or the new one, never an expert whose files are half sent. (A reader that opened the old
manifest and downloads an expert the push replaced afterwards is told the remote changed and to open it again.)
Files of experts no longer in the library are deleted after the manifest.

**Pull** (:func:`pull`) downloads every expert not already present and identical into the destination library, each
through a temporary directory and checked, then artifacts and meta files, and records the experts in the
destination's manifest last; a killed pull leaves no manifest entry for a half-downloaded expert and resumes where
it stopped. Experts only in the destination are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from modlora.errors import LibraryError
from modlora.io import atomic_write_bytes, file_lock, parse_json, sha256_file
from modlora.library.card import CARD, library_card
from modlora.library.index import INDEX, FileRecord, expert_files, file_matches, index_bytes, read_index
from modlora.library.location import RemoteLocation, resolve_location
from modlora.library.remote import RemoteLibrary
from modlora.library.store import ARTIFACTS_DIR, EXPERTS_DIR, LOCK, MANIFEST, META_DIR, ExpertLibrary

HUB_COMMIT_FILES = 64  # files per Hub commit while pushing (each commit also records them in the index)

Progress = Callable[[int, int, str], None]
"""``progress(done, total, relative_path)``, called after each file is transferred."""


@dataclass
class TransferReport:
    """What a push or a pull did: files transferred (relative paths), files already in place, bytes sent or
    received, and (push) remote files deleted because their experts left the library."""

    source: str
    destination: str
    transferred: list[str] = field(default_factory=list)
    unchanged: int = 0
    bytes: int = 0
    removed: list[str] = field(default_factory=list)
    card: bool = False


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
    for path in sorted(adir.glob("*/*.safetensors")) if adir.is_dir() else []:
        if path.stem in lib and not path.is_symlink() and path.is_file():
            files[path.relative_to(lib.path).as_posix()] = FileRecord(sha256_file(path), path.stat().st_size)
    mdir = lib.path / META_DIR
    for path in sorted(mdir.glob("*.json")) if mdir.is_dir() else []:
        if not path.is_symlink() and path.is_file() and not path.name.startswith("."):
            files[path.relative_to(lib.path).as_posix()] = FileRecord(sha256_file(path), path.stat().st_size)
    return files


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
    if loc.is_local and Path(loc.root).resolve() == lib.path.resolve():
        raise LibraryError(f"{url}: this is the library being pushed")
    with file_lock(lib.path / LOCK):  # a consistent snapshot: no writer between the manifest and the hashes
        lib.reload()
        manifest = (lib.path / MANIFEST).read_bytes()
        local = _local_files(lib)
    loc.prepare_for_writing()
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
        for rel in batch:
            index[rel] = local[rel]
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
         progress: Progress | None = None) -> TransferReport:
    """Copy the library at ``url`` into the local library ``library_path`` (created if absent), resumably."""
    loc = resolve_location(url, revision)
    dest = Path(library_path)
    if loc.is_local and Path(loc.root).resolve() == dest.resolve():
        raise LibraryError(f"{url}: this is the destination library")
    remote = RemoteLibrary(loc)
    local: ExpertLibrary | None = None
    if (dest / MANIFEST).exists():
        local = ExpertLibrary(dest)
        if not local.base_model.same_weights(remote.base_model) or not local.base_model.same_tokenizer(
                remote.base_model):
            raise LibraryError(f"{dest}: this library is for base model {local.base_model.name!r}, the one at "
                               f"{loc.url} for {remote.base_model.name!r}; pull into another directory")
    elif dest.exists() and (not dest.is_dir() or any(
            p.name not in (EXPERTS_DIR, ARTIFACTS_DIR, META_DIR, LOCK) for p in dest.iterdir())):
        raise LibraryError(f"{dest}: exists and is neither a library nor an interrupted pull; pull into a new "
                           "directory")
    _remove_leftovers(dest)
    report = TransferReport(loc.url, str(dest))
    wanted: list[tuple[list[str], Callable[[], None]]] = []
    for name in remote.expert_names():
        entry = remote.entry(name)
        target = dest / EXPERTS_DIR / name
        if all(file_matches(target / f, d) for f, d in entry.files.items()):
            report.unchanged += len(entry.files)
            continue
        wanted.append((expert_files(name), lambda n=name, t=target: remote.download_expert(n, t)))
    for rel in sorted(remote.index):
        parts = rel.split("/")
        if parts[0] == ARTIFACTS_DIR and parts[2].removesuffix(".safetensors") not in remote:
            continue
        if parts[0] not in (ARTIFACTS_DIR, META_DIR):
            continue
        if file_matches(dest / rel, remote.index[rel].sha256):
            report.unchanged += 1
            continue
        wanted.append(([rel], lambda r=rel: remote.download_file(r, dest / r, r)))
    total = sum(len(rels) for rels, _ in wanted)
    for rels, fetch in wanted:
        fetch()
        for rel in rels:
            report.transferred.append(rel)
            report.bytes += (dest / rel).stat().st_size
            if progress is not None:
                progress(len(report.transferred), total, rel)
    if local is None:
        with file_lock(dest / LOCK):
            if not (dest / MANIFEST).exists():
                atomic_write_bytes(dest / MANIFEST, remote._manifest_bytes)
                ExpertLibrary(dest)  # validates what was written
                return report
        local = ExpertLibrary(dest)
    local.register(remote.entry(n) for n in remote.expert_names())
    return report


def _remove_leftovers(dest: Path) -> None:
    """Delete the temporary files and directories an interrupted pull (or write) left in a library, under its
    writers' lock (writers hold it while their temporaries exist)."""
    if not dest.is_dir():
        return
    with file_lock(dest / LOCK):
        for pattern in (f"{EXPERTS_DIR}/.*", f"{ARTIFACTS_DIR}/*/.*.tmp", f"{META_DIR}/.*.tmp"):
            for path in dest.glob(pattern):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
