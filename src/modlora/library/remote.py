"""Sharing expert libraries: open, push and pull a library at a local path, on the Hugging Face Hub or at any
fsspec URL.

Locations (``open_library`` / ``ExpertLibrary.open``, ``push``, ``pull``):

* a local path or ``file://PATH``: opened as the library itself (``ExpertLibrary(PATH)``, writable);
* ``hf://[datasets/]ORG/REPO[@REVISION][/PATH]``: a Hub repository through ``huggingface_hub.HfFileSystem``; a
  revision is a branch, tag or commit, and a push to a revision commits to that branch (created if missing);
* any other fsspec URL: ``memory://``, ``s3://``, ``gs://``, ``az://``, ... (its fsspec back-end must be installed).
  These have no revisions: ``revision`` is refused for them.

A shared library has the local layout (``library.json``, ``experts/<name>/`` PEFT adapter directories,
``artifacts/<kind>/<expert>.safetensors``, ``meta/<key>.json``) plus

* ``files.json``, the file index ``{"format": "modlora-remote-index", "version": 1, "manifest_sha256": S,
  "files": {relative path: {"sha256": H, "size": N}}}``, where S is the SHA-256 of the ``library.json`` bytes the
  index belongs to (null before a first push completes). Expert files are checked against the manifest's
  checksums; artifacts and meta files only against an index whose S matches the manifest that was read (any other
  index is ignored, and its artifacts are recomputed locally);
* ``README.md``, the library card: a Hub model card (``library_name: modlora``, ``base_model``, tags), a table of
  the experts, and how to load the library with modlora and each expert with PEFT.

**Reading.** A remote library opens read-only as a :class:`RemoteLibrary`: an ``ExpertLibrary`` over a local
mirror ``$MODLORA_CACHE/libraries/<name>-<hash of URL and revision>/``. Opening fetches ``library.json`` and
``files.json`` only; an expert's files download on its first ``get`` into a temporary directory, are checked
against the manifest's SHA-256 and only then renamed into the mirror; a mismatch raises a ``LibraryError`` naming
the URL, the expert and the file. Derived data computed on a remote library (Arrow prototypes, a clustering) is
written to the mirror only, so routing a remote library caches its prototypes locally.

**Push** (``push``) sends only the files whose SHA-256 differs from the remote index, and writes the manifest last:

1. when files the remote manifest or index vouches for are about to be replaced (a changed expert or artifact), an
   interim index without them and then an interim manifest without the changed experts are written first;
2. new and changed files are uploaded one expert (or artifact) at a time, the index being re-written after each
   (on the Hub: up to 64 files and the index per commit), so that a push killed mid-transfer resumes without
   re-sending what arrived;
3. the card, the final index, then the manifest (on the Hub: one commit).

A reader opening the library at any moment therefore sees a complete library: the old one, the old one less the
experts being replaced, or the new one, never an expert whose files are half sent. (A reader that opened the old
manifest and downloads an expert the push replaced afterwards is told the remote changed and to open it again.)
Files of experts no longer in the library are deleted after the manifest.

**Pull** (``pull``) downloads every expert not already present and identical into the destination library, each
through a temporary directory and checked, then artifacts and meta files, and records the experts in the
destination's manifest last; a killed pull leaves no manifest entry for a half-downloaded expert and resumes where
it stopped. Experts only in the destination are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch

from modlora.errors import LibraryError
from modlora.io import atomic_directory, atomic_write_bytes, file_lock, sha256_file
from modlora.library.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter
from modlora.library.store import (
    ARTIFACTS_DIR,
    EXPERTS_DIR,
    LOCK,
    MANIFEST,
    META_DIR,
    ExpertEntry,
    ExpertLibrary,
    VerifyProblem,
    check_name,
)
from modlora.models import EMBEDDED_NAME, cache_root

INDEX = "files.json"
CARD = "README.md"
INDEX_FORMAT = "modlora-remote-index"
INDEX_VERSION = 1
MIRRORS_DIR = "libraries"
HUB_COMMIT_FILES = 64  # files per Hub commit while pushing (each commit also records them in the index)
_HF_PROTOCOL = "hf://"
_HF_TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_ID_OF_NAME = {EMBEDDED_NAME: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the GGUF the embedded model comes from
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int, str], None]
"""``progress(done, total, relative_path)``, called after each file is transferred."""


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` and fsspec chained URLs (``a::b://...``); False for plain paths."""
    return isinstance(location, str) and ("://" in location or "::" in location)


@dataclass(frozen=True)
class HubRepo:
    """The Hub repository of an ``hf://`` location."""

    repo_id: str
    repo_type: str
    revision: str | None
    path_in_repo: str


@dataclass(frozen=True)
class FileRecord:
    """SHA-256 (hex) and size (bytes) of one file of a library."""

    sha256: str
    size: int


@dataclass
class RemoteLocation:
    """A library's place in an fsspec filesystem: ``fs``, the root path in it, and its Hub repository if any."""

    url: str
    fs: Any
    root: str
    hub: HubRepo | None = None

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    @property
    def is_local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem
        return isinstance(self.fs, LocalFileSystem)

    def _failure(self, action: str, rel: str, exc: Exception) -> LibraryError:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return LibraryError(f"{self.url}: cannot {action} {rel}: {type(exc).__name__}"
                            + (f": {detail}" if detail else ""))

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None when it does not exist; any other failure (network, permissions) raises a
        LibraryError naming the URL."""
        try:
            return bytes(self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - any back-end's failure becomes one clear error
            raise self._failure("read", rel, exc) from None

    def download(self, rel: str, dest: Path) -> None:
        try:
            self.fs.get_file(self.path(rel), str(dest))
        except FileNotFoundError:
            raise LibraryError(f"{self.url}: file {rel} is missing") from None
        except Exception as exc:  # noqa: BLE001
            raise self._failure("download", rel, exc) from None

    def upload(self, src: Path, rel: str) -> None:
        try:
            if self.is_local:
                self.fs.makedirs(self.fs._parent(self.path(rel)), exist_ok=True)
            self.fs.put_file(str(src), self.path(rel))
        except Exception as exc:  # noqa: BLE001
            raise self._failure("upload", rel, exc) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole small file; atomically (temporary file + rename) on a local filesystem, where a reader could
        otherwise see it half written (object stores and Hub commits replace a file as a whole)."""
        try:
            if self.is_local:
                atomic_write_bytes(self.path(rel), data)
            else:
                self.fs.pipe_file(self.path(rel), data)
        except Exception as exc:  # noqa: BLE001
            raise self._failure("write", rel, exc) from None

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._failure("delete", rel, exc) from None

    def size(self, rel: str) -> int:
        try:
            return int(self.fs.info(self.path(rel))["size"])
        except FileNotFoundError:
            raise LibraryError(f"{self.url}: file {rel} is missing") from None
        except Exception as exc:  # noqa: BLE001
            raise self._failure("stat", rel, exc) from None

    def send(self, uploads: Iterable[tuple[Path, str]] = (), writes: Iterable[tuple[str, bytes]] = (), *,
             message: str = "modlora push") -> None:
        """Upload local files, then write small files, in this order; on the Hub as one commit (atomic, and one
        commit rather than one per file)."""
        uploads, writes = list(uploads), list(writes)
        if self.hub is None:
            for src, rel in uploads:
                self.upload(src, rel)
            for rel, data in writes:
                self.write_bytes(rel, data)
            return
        from huggingface_hub import CommitOperationAdd
        self._hub_commit([CommitOperationAdd(path_in_repo=self._in_repo(rel), path_or_fileobj=str(src))
                          for src, rel in uploads]
                         + [CommitOperationAdd(path_in_repo=self._in_repo(rel), path_or_fileobj=data)
                            for rel, data in writes], message)

    def delete(self, rels: Iterable[str], *, message: str = "modlora push: delete files") -> None:
        """Delete files (missing ones are skipped); on the Hub as one commit."""
        rels = list(rels)
        if self.hub is None:
            for rel in rels:
                self.remove(rel)
            return
        if rels:
            from huggingface_hub import CommitOperationDelete
            existing = [rel for rel in rels if self.exists(rel)]
            if existing:
                self._hub_commit([CommitOperationDelete(path_in_repo=self._in_repo(rel)) for rel in existing],
                                 message)

    def exists(self, rel: str) -> bool:
        try:
            return bool(self.fs.exists(self.path(rel)))
        except Exception as exc:  # noqa: BLE001
            raise self._failure("stat", rel, exc) from None

    def _in_repo(self, rel: str) -> str:
        assert self.hub is not None
        return f"{self.hub.path_in_repo}/{rel}" if self.hub.path_in_repo else rel

    def _hub_commit(self, operations: list[Any], message: str) -> None:
        assert self.hub is not None
        from huggingface_hub import HfApi
        try:
            HfApi().create_commit(self.hub.repo_id, operations=operations, commit_message=message,
                                  repo_type=self.hub.repo_type, revision=self.hub.revision)
        except Exception as exc:  # noqa: BLE001
            raise self._failure("commit to", f"{len(operations)} file(s) ({message})", exc) from None
        self.fs.invalidate_cache()

    def pinned(self) -> RemoteLocation:
        """On the Hub, this location at the commit its revision points to now, so that every later read sees one
        snapshot even while a push commits to the branch; elsewhere the location itself."""
        if self.hub is None:
            return self
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
        try:
            sha = HfApi().repo_info(self.hub.repo_id, repo_type=self.hub.repo_type, revision=self.hub.revision).sha
        except RevisionNotFoundError:
            raise LibraryError(f"{self.url}: no revision {self.hub.revision!r} in {self.hub.repo_id}") from None
        except RepositoryNotFoundError:
            raise LibraryError(f"{self.url}: no such repository (or no access to it)") from None
        except Exception as exc:  # noqa: BLE001
            raise self._failure("resolve", f"revision {self.hub.revision or 'main'}", exc) from None
        sub = f"/{self.hub.path_in_repo}" if self.hub.path_in_repo else ""
        return RemoteLocation(self.url, self.fs, f"{_HF_TYPE_PREFIX[self.hub.repo_type]}{self.hub.repo_id}@{sha}{sub}",
                              self.hub)

    def prepare_for_writing(self) -> None:
        """On the Hub, create the repository and the revision's branch when missing; elsewhere nothing to do."""
        if self.hub is None:
            return
        from huggingface_hub import HfApi
        api = HfApi()
        try:
            api.create_repo(self.hub.repo_id, repo_type=self.hub.repo_type, exist_ok=True)
            if self.hub.revision is not None:
                api.create_branch(self.hub.repo_id, repo_type=self.hub.repo_type, branch=self.hub.revision,
                                  exist_ok=True)
        except Exception as exc:  # noqa: BLE001
            raise LibraryError(f"{self.url}: cannot create the repository or branch: {type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
        self.fs.invalidate_cache()


def resolve_location(url: str | os.PathLike[str] | RemoteLocation, revision: str | None = None) -> RemoteLocation:
    """Parse a location (see the module docstring) into its fsspec filesystem and root path."""
    if isinstance(url, RemoteLocation):
        if revision is not None:
            raise LibraryError(f"{url.url}: give the revision in the location itself")
        return url
    url = os.fspath(url)
    if url.startswith(_HF_PROTOCOL):
        return _hub_location(url, revision)
    if revision is not None:
        raise LibraryError(f"{url}: a revision applies to hf:// locations (Hub branches, tags, commits); this "
                           "location has none")
    import fsspec
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise LibraryError(f"{url}: cannot open this location: {exc}") from None
    return RemoteLocation(url, fs, str(root).rstrip("/") or "/")


def _hub_location(url: str, revision: str | None) -> RemoteLocation:
    from huggingface_hub import HfFileSystem, parse_hf_uri
    from huggingface_hub.errors import HfUriError
    try:
        parsed = parse_hf_uri(url)
    except HfUriError as exc:
        raise LibraryError(f"{url}: not a valid hf:// location ({exc})") from None
    if parsed.type not in _HF_TYPE_PREFIX:
        raise LibraryError(f"{url}: libraries live in model, dataset or space repositories, not a {parsed.type}")
    if revision is not None and parsed.revision is not None and revision != parsed.revision:
        raise LibraryError(f"{url}: the URL names revision {parsed.revision!r} but --revision is {revision!r}")
    revision = revision if revision is not None else parsed.revision
    repo = _HF_TYPE_PREFIX[parsed.type] + parsed.id
    sub = f"/{parsed.path_in_repo.strip('/')}" if parsed.path_in_repo.strip("/") else ""
    root = repo + (f"@{quote(revision, safe='')}" if revision else "") + sub
    shown = _HF_PROTOCOL + repo + (f"@{revision}" if revision else "") + sub
    fs = HfFileSystem(skip_instance_cache=True)
    return RemoteLocation(shown, fs, root, HubRepo(parsed.id, parsed.type, revision, parsed.path_in_repo.strip("/")))


def open_library(location: str | os.PathLike[str], *, revision: str | None = None) -> ExpertLibrary:
    """A library from a local path, a ``file://`` URL (both writable), or any remote location (read-only
    :class:`RemoteLibrary`)."""
    if not is_url(location):
        if revision is not None:
            raise LibraryError(f"{location}: a revision applies to hf:// locations, not to a local library")
        return ExpertLibrary(location)
    loc = resolve_location(location, revision)
    if loc.is_local:
        return ExpertLibrary(loc.root)
    return RemoteLibrary(loc)


def mirror_dir(location: RemoteLocation) -> Path:
    """The local mirror of a remote library: ``$MODLORA_CACHE/libraries/<name>-<sha256(url)[:16]>``."""
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", location.url.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or "library"
    return cache_root() / MIRRORS_DIR / f"{tail[:48]}-{hashlib.sha256(location.url.encode()).hexdigest()[:16]}"


# -- the file index -------------------------------------------------------------------------------------------------
def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _index_bytes(manifest: bytes | None, files: dict[str, FileRecord]) -> bytes:
    doc = {"format": INDEX_FORMAT, "version": INDEX_VERSION,
           "manifest_sha256": _sha256_bytes(manifest) if manifest is not None else None,
           "files": {rel: {"sha256": r.sha256, "size": r.size} for rel, r in sorted(files.items())}}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _read_index(location: RemoteLocation, manifest: bytes | None) -> dict[str, FileRecord]:
    """The remote index's records when it belongs to ``manifest`` (by SHA-256), else ``{}`` (absent, from another
    push, or malformed: nothing in it is trusted)."""
    data = location.read_bytes(INDEX)
    if data is None:
        return {}
    try:
        doc = json.loads(data)
        if (doc.get("format") != INDEX_FORMAT or doc.get("version") != INDEX_VERSION
                or doc.get("manifest_sha256") != (_sha256_bytes(manifest) if manifest is not None else None)):
            return {}
        records = {}
        for rel, rec in doc["files"].items():
            if (not isinstance(rel, str) or not _safe_relative(rel) or not isinstance(rec.get("sha256"), str)
                    or not _SHA256_RE.match(rec["sha256"]) or not isinstance(rec.get("size"), int)):
                return {}
            records[rel] = FileRecord(rec["sha256"], rec["size"])
        return records
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        return {}


def _safe_relative(rel: str) -> bool:
    """A library file's relative path: ``experts/<name>/<file>``, ``artifacts/<kind>/<name>.safetensors`` or
    ``meta/<key>.json``, with no empty, ``.`` or ``..`` segment."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return False
    return ((len(parts) == 3 and parts[0] == EXPERTS_DIR and parts[2] in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
            or (len(parts) == 3 and parts[0] == ARTIFACTS_DIR and parts[2].endswith(".safetensors"))
            or (len(parts) == 2 and parts[0] == META_DIR and parts[1].endswith(".json")))


def _expert_files(name: str) -> list[str]:
    return [f"{EXPERTS_DIR}/{name}/{f}" for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]


def _matches(path: Path, digest: str) -> bool:
    return path.is_file() and not path.is_symlink() and sha256_file(path) == digest


def _without_experts(manifest: bytes, drop: Iterable[str]) -> bytes:
    """The manifest with some experts removed, serialised like ``atomic_write_json``."""
    raw = json.loads(manifest)
    drop = set(drop)
    raw["experts"] = {k: v for k, v in raw["experts"].items() if k not in drop}
    return (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()


# -- reading --------------------------------------------------------------------------------------------------------
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
        index = _read_index(self.location, manifest)
        mirror.mkdir(parents=True, exist_ok=True)
        with file_lock(mirror / LOCK):
            mpath = mirror / MANIFEST
            if not mpath.is_file() or mpath.read_bytes() != manifest:
                atomic_write_bytes(mpath, manifest)
        return manifest, index

    def _prune_mirror(self) -> None:
        """Drop mirrored experts the remote no longer has (and leftovers of interrupted downloads)."""
        edir = self.path / EXPERTS_DIR
        if edir.is_dir():
            with file_lock(self.path / LOCK):
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
        if _sha256_bytes(data) != record.sha256:
            raise self._mismatch(what, rel, f"index {INDEX}")
        atomic_write_bytes(dest, data)

    def _fetch_expert(self, name: str, *, force: bool = False) -> None:
        entry = self.entry(name)
        target = self.expert_dir(name)

        def present() -> bool:
            return not force and all(_matches(target / f, d) for f, d in entry.files.items())

        if present():
            return
        with file_lock(self.path / LOCK):
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
        with file_lock(self.path / LOCK):
            self.download_file(rel, path, f"expert {expert!r} artifact {kind!r}")
        return super().load_artifact(expert, kind)

    def load_meta(self, key: str) -> Any | None:
        """The remote's meta document (downloaded and checked) when the index lists it, else the mirror's."""
        rel = f"{META_DIR}/{check_name(key, 'meta key')}.json"
        record = self.index.get(rel)
        if record is not None and not _matches(self.path / rel, record.sha256):
            with file_lock(self.path / LOCK):
                self.download_file(rel, self.path / rel, f"meta {key!r}")
        return super().load_meta(key)

    def size_bytes(self, name: str) -> int:
        """Bytes of the expert's two files: from the index (no download) when it lists them."""
        rels = _expert_files(check_name(name))
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
                    with file_lock(self.path / LOCK):
                        self.download_file(rel, self.path / rel, rel)
                except LibraryError as exc:
                    problems.append(VerifyProblem(rel, str(exc)))
        return problems


# -- push and pull --------------------------------------------------------------------------------------------------
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


def _local_files(lib: ExpertLibrary) -> dict[str, FileRecord]:
    """Every file a push sends: experts' files (checked against the manifest), artifacts of the library's experts
    and meta documents."""
    files: dict[str, FileRecord] = {}
    for name in lib.expert_names():
        for fname, digest in lib.entry(name).files.items():
            path = lib.expert_dir(name) / fname
            if not _matches(path, digest):
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
        index = _read_index(loc, None)  # left by an interrupted first push
        old_entries = {}
    old_files = set(index) | {rel for n in old_entries for rel in _expert_files(n)}
    report = TransferReport(str(lib.path), loc.url)

    replaced_experts = {n for n, e in old_entries.items() if n in lib and e.files != lib.entry(n).files}
    replaced = {rel for rel, rec in index.items() if rel in local and rec.sha256 != local[rel].sha256}
    replaced |= {rel for n in replaced_experts for rel in _expert_files(n)}
    current = remote_manifest
    if current is not None and replaced:
        if replaced_experts:
            current = _without_experts(current, replaced_experts)
        index = {rel: rec for rel, rec in index.items() if rel not in replaced}
        loc.send(writes=[(INDEX, _index_bytes(current, index))] + ([(MANIFEST, current)] if replaced_experts else []),
                 message="modlora push: withdraw the experts being replaced")

    units = _units(rel for rel, rec in local.items() if index.get(rel) != rec)
    total = sum(len(u) for u in units)
    report.unchanged = len(local) - total
    for batch in _batches(units, HUB_COMMIT_FILES if loc.hub else 1):
        for rel in batch:
            index[rel] = local[rel]
        loc.send([(lib.path / rel, rel) for rel in batch], [(INDEX, _index_bytes(current, index))],
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
    final_index = _index_bytes(manifest, local)
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
        if all(_matches(target / f, d) for f, d in entry.files.items()):
            report.unchanged += len(entry.files)
            continue
        wanted.append((_expert_files(name), lambda n=name, t=target: remote.download_expert(n, t)))
    for rel in sorted(remote.index):
        parts = rel.split("/")
        if parts[0] == ARTIFACTS_DIR and parts[2].removesuffix(".safetensors") not in remote:
            continue
        if parts[0] not in (ARTIFACTS_DIR, META_DIR):
            continue
        if _matches(dest / rel, remote.index[rel].sha256):
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


# -- the library card -----------------------------------------------------------------------------------------------
def hub_base_model(name: str) -> str | None:
    """The Hub id of a base model name, when there is one (an ``org/name`` id, or the embedded model's origin)."""
    if name in _HUB_ID_OF_NAME:
        return _HUB_ID_OF_NAME[name]
    return name if _HUB_ID_RE.match(name) else None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def library_card(lib: ExpertLibrary, location: RemoteLocation) -> str:
    """The library's README.md: Hub metadata (``library_name: modlora``, ``base_model``, tags), the experts with
    their tasks, sizes and metrics, and how to load the library (modlora) and each expert (PEFT)."""
    from huggingface_hub import ModelCardData
    base = lib.base_model
    base_id = hub_base_model(base.name)
    data = ModelCardData(library_name="modlora", base_model=base_id,
                         tags=["modlora", "lora", "peft", "expert-library", "arrow-routing"])
    hub = location.hub
    title = hub.repo_id.split("/")[-1] if hub else location.url.rstrip("/").rsplit("/", 1)[-1]
    lines = ["---", data.to_yaml(), "---", "",
             f"# {title}: a modlora library of {len(lib)} LoRA experts", "",
             f"A library of LoRA experts built with [modlora](https://pypi.org/project/modlora/) for the base model "
             f"`{base.name}`" + (f" ([{base_id}](https://huggingface.co/{base_id}))" if base_id else "") + ".",
             "Route over it zero-shot with Arrow, merge it, or load any expert on its own as a PEFT adapter.", "",
             "| expert | tasks | rank | parameters | size | validation loss | steps |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in lib.expert_names():
        e = lib.entry(name)
        val = e.metrics.get("best_val_loss")
        size = sum((lib.expert_dir(name) / f).stat().st_size for f in e.files)
        lines.append(f"| {_cell(name)} | {_cell(', '.join(e.tasks) or '-')} | {e.lora.get('r', '-')} | "
                     f"{e.num_parameters:,} | {size / 1024:.0f} KiB | "
                     f"{f'{val:.4f}' if isinstance(val, float) else '-'} | {e.metrics.get('steps', '-')} |")
    url = location.url
    example = lib.expert_names()[0] if len(lib) else "EXPERT"
    prefix = f"{hub.path_in_repo}/" if hub and hub.path_in_repo else ""
    repo = hub.repo_id if hub else "my-library"
    rev = f", revision={hub.revision!r}" if hub and hub.revision else ""
    lines += ["", "## Load the library with modlora", "", "```bash", "pip install modlora",
              f"modlora show {url}", f"modlora route {url} --prompt \"...\" --router arrow",
              f"modlora pull {url} my-library   # a local copy", "```", "", "```python",
              "from modlora.library.remote import open_library", f"library = open_library({url!r})",
              f"adapter = library.get({example!r})  # downloaded on first use, checked against its sha256",
              "```", "", "## Load one expert with PEFT", "",
              f"Each expert is a standard PEFT LoRA adapter in `{prefix}experts/<name>/`"
              + ("" if hub else f" (here after `modlora pull {url} my-library`)") + ":", "", "```python",
              "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f"base = AutoModelForCausalLM.from_pretrained({(base_id or base.name)!r})",
              f"model = PeftModel.from_pretrained(base, {repo!r}, subfolder={prefix + 'experts/' + example!r}{rev})",
              "```", ""]
    return "\n".join(lines)
