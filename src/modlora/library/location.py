"""Where a library lives, and the filesystem operations a shared library needs there.

A location (:func:`~modlora.library.remote.open_library`, :func:`~modlora.library.transfer.push`,
:func:`~modlora.library.transfer.pull`) is

* a local path or ``file://PATH``: opened as the library itself (``ExpertLibrary(PATH)``, writable);
* ``hf://[datasets/]ORG/REPO[@REVISION][/PATH]``: a Hub repository through ``huggingface_hub.HfFileSystem``; a
  revision is a branch, tag or commit, and a push to a revision commits to that branch (created if missing);
* any other fsspec URL: ``memory://``, ``s3://``, ``gs://``, ``az://``, ... (its fsspec back-end must be installed).
  These have no revisions: ``revision`` is refused for them.

On a local filesystem every file is reached without following a symbolic link below the root (each component is
``lstat``-ed, and what it resolves to must stay inside the root) and read through
:func:`~modlora.io.read_regular_file` (never a FIFO or a device), so that a hostile shared directory can neither
point a read or a write outside itself nor block a reader.

:meth:`RemoteLocation.push_lock` keeps two pushes to one location apart: on a local filesystem an ``flock`` on
``ROOT/.push.lock`` (released by the kernel when a push dies), elsewhere that file created exclusively (fsspec
``open(..., "xb")``) with the pusher's host, process and time, deleted at the end; one older than
:data:`STALE_LOCK_MINUTES` is reported as stale with how to clear it. A Hub repository has no file a lock could live
in; there a push reads the branch's head when it starts and makes each commit with ``parent_commit`` = the head it
last saw or made, so the Hub refuses the commit of a push that another push overtook (HTTP 412): of two pushes at
once, one ends with a clear error and nothing of the two is interleaved. Each commit being atomic, a pull during a
push sees a whole library (the manifest is committed last).

:func:`resolve_location` parses one into a :class:`RemoteLocation` (its fsspec filesystem, root path and Hub
repository); :func:`mirror_dir` is where a remote library is mirrored locally.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from modlora.errors import LibraryError
from modlora.io import atomic_write_bytes, open_regular_file, parse_json, read_regular_file
from modlora.models import cache_root

MIRRORS_DIR = "libraries"
PUSH_LOCK = ".push.lock"
STALE_LOCK_MINUTES = 60  # a push lock older than this is reported as stale (its push was probably killed)
_HF_PROTOCOL = "hf://"
_HF_TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


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


@dataclass
class RemoteLocation:
    """A library's place in an fsspec filesystem: ``fs``, the root path in it, and its Hub repository if any."""

    url: str
    fs: Any
    root: str
    hub: HubRepo | None = None
    hub_head: str | None = field(default=None, compare=False)   # during a Hub push: the head its next commit follows

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
            if self.is_local:
                return read_regular_file(self.local_path(rel))
            return bytes(self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            return None
        except LibraryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any back-end's failure becomes one clear error
            raise self._failure("read", rel, exc) from None

    def local_path(self, rel: str) -> str:
        """The checked path of ``rel`` under a local root (:func:`path_inside`)."""
        return path_inside(self.root, rel, self.url)

    def download(self, rel: str, dest: Path) -> None:
        try:
            if self.is_local:   # checked first: a regular file inside the root (never a link, FIFO or device)
                os.close(open_regular_file(self.local_path(rel)))
            self.fs.get_file(self.path(rel), str(dest))
        except FileNotFoundError:
            raise LibraryError(f"{self.url}: file {rel} is missing") from None
        except LibraryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failure("download", rel, exc) from None

    def upload(self, src: Path, rel: str) -> None:
        try:
            if self.is_local:   # never written through a link: a link or special file there is refused
                path = self.local_path(rel)
                if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
                    raise LibraryError(f"{self.url}: {path} is not a regular file; refusing to write through it")
                self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            self.fs.put_file(str(src), self.path(rel))
        except LibraryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failure("upload", rel, exc) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole small file; atomically (temporary file + rename) on a local filesystem, where a reader could
        otherwise see it half written (object stores and Hub commits replace a file as a whole)."""
        try:
            if self.is_local:
                atomic_write_bytes(self.local_path(rel), data)
            else:
                self.fs.pipe_file(self.path(rel), data)
        except LibraryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failure("write", rel, exc) from None

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.local_path(rel) if self.is_local else self.path(rel))
        except FileNotFoundError:
            pass
        except LibraryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failure("delete", rel, exc) from None

    def size(self, rel: str) -> int:
        try:
            if self.is_local:
                return os.lstat(self.local_path(rel)).st_size
            return int(self.fs.info(self.path(rel))["size"])
        except FileNotFoundError:
            raise LibraryError(f"{self.url}: file {rel} is missing") from None
        except LibraryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failure("stat", rel, exc) from None

    @contextlib.contextmanager
    def push_lock(self) -> Iterator[None]:
        """Held by a push for its whole length (see the module docstring); a second push is refused with a
        LibraryError saying who holds the lock since when (and, for a stale one, how to clear it)."""
        if self.hub is not None:
            self.hub_head = self.head_commit()
            try:
                yield
            finally:
                self.hub_head = None
            return
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "created": time.time(), "token": uuid.uuid4().hex}
        data = (json.dumps(owner, sort_keys=True) + "\n").encode()
        if self.is_local:
            with self._local_push_lock(data):
                yield
            return
        try:
            if self.fs.exists(self.path(PUSH_LOCK)):   # for back-ends whose "xb" is not exclusive
                raise FileExistsError(PUSH_LOCK)
            with self.fs.open(self.path(PUSH_LOCK), "xb") as fh:
                fh.write(data)
        except FileExistsError:
            raise self._lock_held(self.read_bytes(PUSH_LOCK), stale_possible=True) from None
        except Exception as exc:  # noqa: BLE001
            raise self._failure("create the push lock", PUSH_LOCK, exc) from None
        try:
            yield
        except BaseException:
            with contextlib.suppress(LibraryError):   # the push's own error is the one to report
                self._release_push_lock(data)
            raise
        self._release_push_lock(data)

    @contextlib.contextmanager
    def _local_push_lock(self, data: bytes) -> Iterator[None]:
        """An exclusive, non-blocking ``flock`` on ``ROOT/.push.lock`` (the file is left in place: deleting a
        locked file would let a third push lock a new one)."""
        try:
            os.makedirs(self.root, exist_ok=True)
            path = self.local_path(PUSH_LOCK)
            fd = open_regular_file(path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise LibraryError(f"{self.url}: cannot use the push lock {self.path(PUSH_LOCK)} "
                               f"({exc.strerror or exc})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._lock_held(os.pread(fd, 4096, 0), stale_possible=False) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            yield
        finally:
            os.close(fd)   # releases the lock

    def _lock_held(self, data: bytes | None, *, stale_possible: bool) -> LibraryError:
        """The error for a push that finds another one's lock (``data``: the lock file's contents)."""
        try:
            owner = parse_json(data or b"")
            who = f"{owner['host']} (process {owner['pid']})"
            minutes = (time.time() - float(owner["created"])) / 60
        except (ValueError, TypeError, KeyError):
            who, minutes = "an unknown pusher", float("inf")
        since = f"for {minutes:.0f} min" if minutes != float("inf") else "since an unknown time"
        where = f"{self.url.rstrip('/')}/{PUSH_LOCK}"
        if stale_possible and minutes > STALE_LOCK_MINUTES:
            return LibraryError(f"{self.url}: another push's lock {where}, held by {who} {since}, looks stale (a push "
                                f"killed before it finished); if no push to this location is running, delete {where} "
                                "and push again")
        return LibraryError(f"{self.url}: another push to this location is in progress ({who}, {since}); push again "
                            "when it has finished" + (f" (if none is running, delete {where})" if stale_possible else ""))

    def _release_push_lock(self, data: bytes) -> None:
        """Delete the push lock if it is still this push's."""
        if self.read_bytes(PUSH_LOCK) == data:
            self.remove(PUSH_LOCK)

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
            info = HfApi().create_commit(self.hub.repo_id, operations=operations, commit_message=message,
                                         repo_type=self.hub.repo_type, revision=self.hub.revision,
                                         parent_commit=self.hub_head)
        except Exception as exc:  # noqa: BLE001
            if self.hub_head is not None and getattr(getattr(exc, "response", None), "status_code", None) == 412:
                raise LibraryError(f"{self.url}: another push committed to {self.hub.revision or 'main'} during this "
                                   f"one (its head is no longer {self.hub_head[:12]}); this push stopped before "
                                   f"'{message}'. Run it again when the other has finished") from None
            raise self._failure("commit to", f"{len(operations)} file(s) ({message})", exc) from None
        if self.hub_head is not None:
            self.hub_head = info.oid
        self.fs.invalidate_cache()

    def pinned(self) -> RemoteLocation:
        """On the Hub, this location at the commit its revision points to now, so that every later read sees one
        snapshot even while a push commits to the branch; elsewhere the location itself."""
        if self.hub is None:
            return self
        sha = self.head_commit()
        sub = f"/{self.hub.path_in_repo}" if self.hub.path_in_repo else ""
        return RemoteLocation(self.url, self.fs, f"{_HF_TYPE_PREFIX[self.hub.repo_type]}{self.hub.repo_id}@{sha}{sub}",
                              self.hub)

    def head_commit(self) -> str:
        """The commit a Hub location's revision (branch, tag or commit; default main) points to now."""
        assert self.hub is not None
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
        try:
            return str(HfApi().repo_info(self.hub.repo_id, repo_type=self.hub.repo_type,
                                         revision=self.hub.revision).sha)
        except RevisionNotFoundError:
            raise LibraryError(f"{self.url}: no revision {self.hub.revision!r} in {self.hub.repo_id}") from None
        except RepositoryNotFoundError:
            raise LibraryError(f"{self.url}: no such repository (or no access to it)") from None
        except Exception as exc:  # noqa: BLE001
            raise self._failure("resolve", f"revision {self.hub.revision or 'main'}", exc) from None

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


def path_inside(root: str | os.PathLike[str], rel: str, where: str | None = None) -> str:
    """``root/rel`` on the local filesystem, checked: no component below ``root`` is a symbolic link, and the path
    resolves inside ``root`` (components that do not exist yet are fine); else a LibraryError (naming ``where``, the
    location, when given)."""
    prefix = f"{where}: " if where else ""
    real_root = os.path.realpath(root)
    current = os.fspath(root)
    for part in rel.split("/"):
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break
        except OSError as exc:
            raise LibraryError(f"{prefix}cannot stat {current} ({exc.strerror or exc})") from None
        if stat.S_ISLNK(mode):
            raise LibraryError(f"{prefix}{current} is a symbolic link; refusing to follow it")
    if os.path.commonpath([real_root, os.path.realpath(current)]) != real_root:
        raise LibraryError(f"{prefix}{rel} resolves outside {root}")
    return os.path.join(os.fspath(root), rel)


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


def mirror_dir(location: RemoteLocation) -> Path:
    """The local mirror of a remote library: ``$MODLORA_CACHE/libraries/<name>-<sha256(url)[:16]>``."""
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", location.url.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or "library"
    return cache_root() / MIRRORS_DIR / f"{tail[:48]}-{hashlib.sha256(location.url.encode()).hexdigest()[:16]}"
