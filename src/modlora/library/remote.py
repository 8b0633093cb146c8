"""Reading a shared library: :func:`open_library` opens any location (:mod:`~modlora.library.location`), a remote
one read-only as a :class:`RemoteLibrary`.

A :class:`RemoteLibrary` is an ``ExpertLibrary`` over a local mirror
``$MODLORA_CACHE/libraries/<name>-<hash of URL and revision>/``. Opening fetches ``library.json`` and ``files.json``
(:mod:`~modlora.library.index`) only; an expert's files download on its first ``get`` into a temporary directory,
are checked against the manifest's SHA-256 and only then renamed into the mirror; a mismatch raises a
``LibraryError`` naming the URL, the expert and the file. Derived data computed on a remote library (Arrow
prototypes, a clustering) is written to the mirror only, so routing a remote library caches its prototypes locally.

In Hugging Face offline mode (``HF_HUB_OFFLINE=1``) an ``hf://`` library is read from the snapshot of its repository
in the Hugging Face cache, as ``huggingface_hub`` reads models then, and a warning says so (:func:`offline_snapshot`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from modlora.errors import LibraryError
from modlora.io import atomic_directory, atomic_write_bytes, read_regular_file, sha256_file
from modlora.library.adapters import LoraAdapter
from modlora.library.index import INDEX, FileRecord, expert_files, file_matches, read_index, sha256_bytes
from modlora.library.location import RemoteLocation, is_url, mirror_dir, resolve_location
from modlora.library.store import (
    ARTIFACTS_DIR,
    EXPERTS_DIR,
    MANIFEST,
    META_DIR,
    ExpertEntry,
    ExpertLibrary,
    VerifyProblem,
    check_name,
    library_lock,
)


def open_library(location: str | os.PathLike[str], *, revision: str | None = None) -> ExpertLibrary:
    """A library from a local path, a ``file://`` URL (both writable), or any remote location (read-only
    :class:`RemoteLibrary`). An ``hf://`` location in Hugging Face offline mode (``HF_HUB_OFFLINE=1``) is read from
    the cached snapshot of its repository and revision (:func:`offline_snapshot`), with a warning saying so."""
    if not is_url(location):
        if revision is not None:
            raise LibraryError(f"{location}: a revision applies to hf:// locations, not to a local library")
        return ExpertLibrary(location)
    loc = resolve_location(location, revision)
    if loc.is_local:
        return ExpertLibrary(loc.root)
    if loc.hub is not None and hub_offline():
        return RemoteLibrary(offline_snapshot(loc))
    return RemoteLibrary(loc)


def hub_offline() -> bool:
    """Whether ``huggingface_hub`` is in offline mode (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def offline_snapshot(location: RemoteLocation) -> RemoteLocation:
    """The ``hf://`` ``location`` read from the Hugging Face cache's snapshot of its repository at its revision
    (default ``main``; what ``hf download`` or ``snapshot_download`` left there), as a location over that folder
    named by the same URL (so the same local mirror); a :class:`UserWarning` says which snapshot is used. Every file
    is still checked against the snapshot's manifest. :class:`LibraryError` when the cache holds no snapshot."""
    import warnings

    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub = location.hub
    assert hub is not None
    try:
        folder = Path(snapshot_download(hub.repo_id, repo_type=hub.repo_type, revision=hub.revision,
                                        local_files_only=True))
    except LocalEntryNotFoundError:
        raise LibraryError(f"{location.url}: HF_HUB_OFFLINE is set and the Hugging Face cache holds no snapshot of "
                           f"{hub.repo_id} at {hub.revision or 'main'}: download it first (`hf download "
                           f"{hub.repo_id}`) or unset HF_HUB_OFFLINE") from None
    root = folder / hub.path_in_repo if hub.path_in_repo else folder
    warnings.warn(f"{location.url}: HF_HUB_OFFLINE is set: reading the cached snapshot {root} (commit "
                  f"{folder.name})", UserWarning, stacklevel=3)
    return RemoteLocation(location.url, DirFileSystem(path=str(root), fs=LocalFileSystem()), "")


class RemoteLibrary(ExpertLibrary):
    """A read-only library at a remote location, mirrored lazily (and checksum-verified) in the modlora cache."""

    def __init__(self, location: RemoteLocation, mirror: str | os.PathLike[str] | None = None):
        self.origin = location
        self.location = location.pinned()
        self.url = location.url
        path = Path(mirror) if mirror is not None else mirror_dir(location)
        self._manifest_bytes, self.index = self._fetch_manifest(path)
        try:
            super().__init__(path)
        except LibraryError as exc:
            raise LibraryError(f"{self.url}: {exc}") from None
        self._prune_mirror()

    def __repr__(self) -> str:
        return f"RemoteLibrary({self.url!r}, mirror={str(self.path)!r})"

    def _fetch_manifest(self, mirror: Path) -> tuple[bytes, dict[str, FileRecord]]:
        """Fetch the remote manifest (into the mirror) and the index that belongs to it."""
        manifest = self.location.read_bytes(MANIFEST)
        if manifest is None:
            raise LibraryError(f"{self.url}: no modlora library here (no {MANIFEST})")
        index = read_index(self.location, manifest)
        mirror.mkdir(parents=True, exist_ok=True)
        with library_lock(mirror):
            mpath = mirror / MANIFEST
            try:
                current = read_regular_file(mpath)
            except OSError:
                current = None   # absent, or not a regular file: replaced below
            if current != manifest:
                atomic_write_bytes(mpath, manifest)
        return manifest, index

    def _prune_mirror(self) -> None:
        """Drop mirrored experts the remote no longer has (and leftovers of interrupted downloads)."""
        edir = self.path / EXPERTS_DIR
        if edir.is_dir():
            with library_lock(self.path):
                for d in edir.iterdir():
                    if d.name not in self:
                        shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)

    def reload(self) -> None:
        """Re-read the remote manifest and index (another push may have changed the library)."""
        self.location = self.origin.pinned()
        self._manifest_bytes, self.index = self._fetch_manifest(self.path)
        try:
            super().reload()
        except LibraryError as exc:
            raise LibraryError(f"{self.url}: {exc}") from None
        self._prune_mirror()

    def entry(self, name: str) -> ExpertEntry:
        if name not in self:
            raise LibraryError(f"{self.url}: no expert named {name!r}")
        return super().entry(name)

    def _read_only(self, action: str) -> LibraryError:
        return LibraryError(f"{self.url}: a remote library opens read-only, cannot {action}; "
                            f"`modlora pull {self.url} DIR` makes a local copy")

    def add(self, *args: Any, **kwargs: Any) -> ExpertEntry:
        raise self._read_only("add an expert")

    def import_adapter(self, *args: Any, **kwargs: Any) -> ExpertEntry:
        raise self._read_only("import an adapter")

    def register(self, *args: Any, **kwargs: Any) -> None:
        raise self._read_only("register experts")

    def remove(self, name: str) -> None:
        raise self._read_only(f"remove expert {name!r}")

    def clean_incomplete(self) -> list[str]:
        raise self._read_only("clean it")

    def _mismatch(self, what: str, rel: str, source: str) -> LibraryError:
        """The error for a downloaded file whose SHA-256 is not the recorded one: the remote changed since it was
        opened (a push), or the file was tampered with."""
        try:
            now = self.location.read_bytes(MANIFEST)
        except LibraryError:
            now = self._manifest_bytes
        if now != self._manifest_bytes:
            return LibraryError(f"{self.url}: the remote library changed since it was opened ({what}: {rel} was "
                                "replaced by a push); open it again")
        return LibraryError(f"{self.url}: {what}: file {rel} does not match its sha256 in the {source} (tampered "
                            "with or corrupted); refusing it")

    def download_expert(self, name: str, target: Path) -> None:
        """Download expert ``name``'s files into ``target`` (atomically replaced), each checked against the
        manifest's SHA-256; nothing is written when a file does not match."""
        entry = self.entry(name)
        with atomic_directory(target, overwrite=True) as tmp:
            for fname, digest in sorted(entry.files.items()):
                rel = f"{EXPERTS_DIR}/{name}/{fname}"
                self.location.download(rel, tmp / fname)
                if sha256_file(tmp / fname) != digest:
                    raise self._mismatch(f"expert {name!r}", rel, "manifest")

    def download_file(self, rel: str, dest: Path, what: str) -> None:
        """Download an artifact or meta file listed in the index to ``dest`` (atomically), checked."""
        record = self.index[rel]
        data = self.location.read_bytes(rel)
        if data is None:
            raise LibraryError(f"{self.url}: {what}: file {rel} is missing")
        if sha256_bytes(data) != record.sha256:
            raise self._mismatch(what, rel, f"index {INDEX}")
        atomic_write_bytes(dest, data)

    def _fetch_expert(self, name: str, *, force: bool = False) -> None:
        entry = self.entry(name)
        target = self.expert_dir(name)

        def present() -> bool:
            return not force and all(file_matches(target / f, d) for f, d in entry.files.items())

        if present():
            return
        with library_lock(self.path):
            if not present():
                self.download_expert(name, target)

    def get(self, name: str) -> LoraAdapter:
        """The expert's adapter, downloaded (and checked) on first use."""
        if name not in self._cache:
            self._fetch_expert(name)
        return super().get(name)

    def load_artifact(self, expert: str, kind: str) -> dict[str, torch.Tensor] | None:
        """The mirror's artifact when fresh; else the remote's (downloaded and checked) when the index lists it."""
        found = super().load_artifact(expert, kind)
        if found is not None or expert not in self:
            return found
        path = self._artifact_path(expert, kind)
        rel = path.relative_to(self.path).as_posix()
        if rel not in self.index:
            return None
        with library_lock(self.path):
            self.download_file(rel, path, f"expert {expert!r} artifact {kind!r}")
        return super().load_artifact(expert, kind)

    def load_meta(self, key: str) -> Any | None:
        """The remote's meta document (downloaded and checked) when the index lists it, else the mirror's."""
        rel = f"{META_DIR}/{check_name(key, 'meta key')}.json"
        record = self.index.get(rel)
        if record is not None and not file_matches(self.path / rel, record.sha256):
            with library_lock(self.path):
                self.download_file(rel, self.path / rel, f"meta {key!r}")
        return super().load_meta(key)

    def size_bytes(self, name: str) -> int:
        """Bytes of the expert's two files: from the index (no download) when it lists them."""
        rels = expert_files(check_name(name))
        if all(r in self.index for r in rels):
            return sum(self.index[r].size for r in rels)
        return sum(self.location.size(r) for r in rels)

    def verify(self) -> list[VerifyProblem]:
        """Download every expert, artifact and meta file again and check it (the remote, not the mirror)."""
        problems: list[VerifyProblem] = []
        for name in self.expert_names():
            self._cache.pop(name, None)
            try:
                self._fetch_expert(name, force=True)
                self.get(name)
            except LibraryError as exc:
                problems.append(VerifyProblem(name, str(exc)))
        for rel in sorted(self.index):
            if rel.startswith((f"{ARTIFACTS_DIR}/", f"{META_DIR}/")):
                try:
                    with library_lock(self.path):
                        self.download_file(rel, self.path / rel, rel)
                except LibraryError as exc:
                    problems.append(VerifyProblem(rel, str(exc)))
        return problems
