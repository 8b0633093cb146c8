"""Atomic file and directory writes, checked reads, checksums and a simple inter-process lock.

A write never leaves a half-written file behind: data goes to a temporary sibling, is
fsync'ed, then ``os.replace``'d over the target (atomic on POSIX), and the parent directory is
fsync'ed so that the rename itself survives a crash. A read (and the lock file) goes through
:func:`open_regular_file`: never a symbolic link followed out of place, never a FIFO or device
that would block the reader forever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (the result of a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``; 0o022 where that is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename), with the permissions a plain ``open``
    would give (0o666 minus the umask; ``mkstemp`` alone would leave the file private to its owner)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~process_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Serialise ``obj`` as indented JSON and write it atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def fsync_tree(path: Path) -> None:
    """fsync every file and directory below ``path``."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` on success.

    The caller fills the yielded directory. On normal exit its contents are fsync'ed and it is
    renamed to ``target`` (with a normal directory's permissions); on any exception it is removed and ``target`` is untouched. With
    ``overwrite`` an existing ``target`` is replaced (moved aside, then deleted after the rename).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp makes it 0o700; the target gets a normal directory's mode
        yield tmp
        fsync_tree(tmp)
        old: Path | None = None
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular_file(path: str | os.PathLike[str], flags: int = os.O_RDONLY, *, follow_symlinks: bool = False
                      ) -> int:
    """A descriptor of the regular file at ``path``, for ``os.open`` ``flags`` (with ``O_CREAT`` a missing file is
    created with a plain file's permissions).

    It is opened without blocking (``O_NONBLOCK``: a FIFO without a writer, or some devices, would block an ordinary
    open or read forever) and, unless ``follow_symlinks``, without following a symbolic link at ``path``
    (``O_NOFOLLOW``: a link is refused, and with ``O_CREAT`` a dangling one never creates its target). Anything but a
    regular file then raises an ``OSError`` whose ``strerror`` says what it is (``IsADirectoryError`` for a
    directory); ``FileNotFoundError`` when absent."""
    flags |= os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks and os.path.islink(path):
            raise OSError(errno.ELOOP, "is a symbolic link; refusing to follow it", os.fspath(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((what for is_type, what in _FILE_TYPES if is_type(mode)), "a special file")
        raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL, f"is {kind}, not a regular file",
                      os.fspath(path))
    return fd


def read_regular_file(path: str | os.PathLike[str], *, follow_symlinks: bool = False) -> bytes:
    """The bytes of the regular file at ``path``, opened by :func:`open_regular_file`."""
    with os.fdopen(open_regular_file(path, follow_symlinks=follow_symlinks), "rb") as fh:
        return fh.read()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a regular file's bytes (opened by :func:`open_regular_file`)."""
    h = hashlib.sha256()
    with os.fdopen(open_regular_file(path), "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive advisory lock (``fcntl.flock``) on ``path``, held for the ``with`` block. The lock file is opened
    by :func:`open_regular_file`: a symbolic link, FIFO or directory there raises ``OSError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_regular_file(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # closing the descriptor releases the lock


#: why a reader's lock file cannot be opened in a read-only library (no lock then; anything else is an error)
_READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT})


@contextlib.contextmanager
def shared_file_lock(path: str | os.PathLike[str]) -> Iterator[bool]:
    """Shared advisory lock on ``path`` for readers: any number of them at once, never while a :func:`file_lock`
    writer holds it. Yields True when locked; False (no lock) when the lock file cannot be created (a read-only
    library), where readers fall back to checking what they read. A lock file that is not a regular file (a
    symbolic link, FIFO, directory) raises ``OSError``, as in :func:`file_lock`. Never take it while holding
    :func:`file_lock` on the same path in this process (flock would wait for ourselves)."""
    try:
        fd = open_regular_file(path, os.O_RDONLY | os.O_CREAT)
    except OSError as exc:
        if exc.errno not in _READ_ONLY_ERRNOS:
            raise
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield True
    finally:
        os.close(fd)   # closing the descriptor releases the lock


def parse_json(data: str | bytes) -> Any:
    """``json.loads`` whose every failure on bad input is a ``ValueError`` with a short reason: invalid JSON or
    UTF-8, numbers beyond Python's digit limit, and nesting too deep for the parser (``RecursionError``)."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as exc:   # e.g. an integer literal longer than sys.get_int_max_str_digits()
        raise ValueError(f"invalid JSON ({exc})") from None
