"""A sandbox for untrusted Python programs (generated code): bubblewrap namespaces where available, else a plain
subprocess under the same time, memory and output limits (with a :class:`SandboxIsolationWarning`).

A run (:meth:`Sandbox.run`) passes iff the program exits with status 0 *and* prints a per-run random token appended
after its last line; see :class:`Sandbox` for what is isolated on each path. A session (:meth:`Sandbox.session`)
instead exchanges JSON lines with a running program, so that the evaluator can judge what the program says rather
than how it ends: :mod:`modlora.evaluation.code` grades HumanEval / MBPP programs this way.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from modlora.errors import DataError, SandboxUnavailableError
from modlora.io import parse_json

_SOCKET_SHIM = '''"""modlora sandbox: best-effort network block (installed as sitecustomize)."""
import socket as _socket

_BLOCKED = {getattr(_socket, name) for name in ("AF_INET", "AF_INET6", "AF_PACKET") if hasattr(_socket, name)}


class _NoNetworkSocket(_socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and (family == -1 or family in _BLOCKED):
            raise OSError("network access is disabled in the modlora sandbox")
        super().__init__(family, type, proto, fileno)


def _blocked(*args, **kwargs):
    raise OSError("network access is disabled in the modlora sandbox")


_socket.socket = _NoNetworkSocket
_socket.create_connection = _blocked
_socket.getaddrinfo = _blocked
'''


SANDBOX_UID = 65534  # "nobody": the uid (and gid) programs run as, inside the sandbox and, when we are root, outside
_SANDBOX_DIR = "/tmp"  # the private tmpfs inside the bwrap sandbox: working directory, HOME and TMPDIR
_FALLBACK_GAPS = ("the file system (a program can read and write whatever the evaluator's user can: the project, "
                  "home and /tmp), host Unix sockets, the evaluator and other processes (a program can signal them, "
                  "and read or alter those of the same user, the code-grading judge and its expected values "
                  "included), "
                  "the process count (no RLIMIT_NPROC: fork bombs are unbounded) and the process tree (a child that "
                  "calls setsid survives the run until RLIMIT_CPU ends it)")


class SandboxIsolationWarning(RuntimeWarning):
    """Generated programs run without bubblewrap: only the time, memory and output limits hold."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program.

    ``status`` is "passed" (exit status 0 *and* the end-of-program token printed after the last statement),
    "failed", "timeout", "memory" or "error" (the sandbox did not start). ``returncode``: the exit status, a death
    by signal as ``-signal`` (bwrap's ``128 + signal`` converted). ``isolation``: "bwrap" or "subprocess".
    ``reached_end``: the token was seen, i.e. the program ran to its last statement (always False for a session,
    which has no token).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: str
    reached_end: bool

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _network_namespace_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _with_end_marker(source: str) -> tuple[str, str]:
    """``(program, token)``: ``source`` followed by code that writes ``\\n<token>\\n`` to fd 1 once ``source``'s last
    line has run; ``token`` is a fresh random hex string."""
    token = secrets.token_hex(16)
    return f"{source}\n\n__import__('sys').stdout.flush()\n__import__('os').write(1, b'\\n{token}\\n')\n", token


@dataclass
class Sandbox:
    """Runs untrusted Python programs (generated code) under limits; one fresh sandbox per program.

    With bubblewrap >= 0.8 (``isolation == "bwrap"``, the default where it can create namespaces): new user, pid,
    mount, network, IPC, UTS and cgroup namespaces; the program runs as uid/gid 65534 with no capabilities and
    cannot create further user namespaces; the file system is a read-only root holding only ``/usr``, the
    ``/bin``, ``/sbin``, ``/lib*`` links and the interpreter's prefix (read-only), a fresh
    ``/proc`` and minimal ``/dev``; the only writable places are two private tmpfs, ``/tmp`` (working directory,
    ``HOME``, ``TMPDIR``; ``tmpfs_mb``) and ``/dev/shm`` (``tmpfs_mb``). No host socket, project file or host
    process is visible; the network namespace has only loopback. ``RLIMIT_NPROC`` = ``max_processes`` is set
    inside (it counts this sandbox's processes only). When the program ends, or at the timeout, the sandbox's
    init dies and the kernel kills every process left in its pid namespace. When the evaluator runs as root,
    an outer bwrap (mount namespace only) first makes the interpreter's prefix reachable and ``setpriv`` drops
    to uid 65534 on the host too, so that ``RLIMIT_NPROC`` applies (the kernel ignores it for host root).

    Without usable bubblewrap (``isolation == "subprocess"``, with a :class:`SandboxIsolationWarning` naming what is
    not isolated): a plain subprocess in a temporary directory, in its own session, with a network namespace via
    ``unshare -rn`` when allowed (``network_isolation``) and in every case a ``sitecustomize`` shim that refuses
    AF_INET/AF_INET6 sockets (best-effort: ``_socket`` bypasses it).

    In both: a minimal environment; ``RLIMIT_AS`` = ``memory_mb``, ``RLIMIT_CPU`` = timeout + 1 s,
    ``RLIMIT_FSIZE`` = ``max_file_bytes`` (stdout and stderr are files, read back capped at ``max_output_bytes``),
    no core dumps; a wall-clock timeout. A run passes only if it exits with status 0 *and* prints a per-run
    random token appended after the program's last line, so ``sys.exit(0)`` or ``os._exit(0)`` before the tests
    is a failure (a program written to find the token in its own source could still forge it, which is why code
    grading uses sessions instead: :func:`modlora.evaluation.code.grade_program`).

    ``use_bwrap``: None probes once per instance (the answer is kept in ``isolation``); False takes the
    subprocess path; True refuses to build the sandbox when bwrap is unusable.
    """

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 16 * 1024 * 1024
    python: str = sys.executable
    use_netns: bool | None = None  # subprocess path only; None: probe ``unshare -rn``
    use_bwrap: bool | None = None
    bwrap: str = "bwrap"
    max_processes: int = 32
    tmpfs_mb: int = 64
    isolation: str = field(init=False)
    isolation_problem: str = field(init=False)
    network_isolation: str = field(init=False)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb < 64:
            raise DataError(f"sandbox needs timeout_s > 0 and memory_mb >= 64, got {self.timeout_s}, {self.memory_mb}")
        if self.max_processes < 4 or self.tmpfs_mb < 1:
            raise DataError(f"sandbox needs max_processes >= 4 and tmpfs_mb >= 1, got {self.max_processes}, "
                            f"{self.tmpfs_mb}")
        self.isolation_problem = "use_bwrap=False" if self.use_bwrap is False else self._bwrap_problem()
        if self.isolation_problem and self.use_bwrap:
            raise SandboxUnavailableError(f"use_bwrap=True but bubblewrap cannot run the sandbox: "
                                          f"{self.isolation_problem}")
        self.isolation = "subprocess" if self.isolation_problem else "bwrap"
        if self.isolation == "bwrap":
            self.network_isolation = "netns"
            return
        if self.use_netns is None:
            self.use_netns = _network_namespace_available()
        self.network_isolation = "netns" if self.use_netns else "socket-shim (best-effort)"
        warnings.warn(f"code sandbox NOT isolated: bubblewrap is unusable ({self.isolation_problem}), so generated "
                      f"programs run in a plain subprocess with only time, memory and output limits and network "
                      f"isolation by {self.network_isolation}. Not isolated: {_FALLBACK_GAPS}. Install bubblewrap "
                      f"(apt-get install bubblewrap) on a system that allows user namespaces.",
                      SandboxIsolationWarning, stacklevel=3)

    # ----------------------------------------------------------------------------------------------------- bwrap
    def _bwrap_problem(self) -> str:
        """Why bwrap cannot run programs here ("" if it can), found by running one program through it."""
        if shutil.which(self.bwrap) is None:
            return f"{self.bwrap!r} not found on PATH"
        if os.geteuid() == 0 and shutil.which("setpriv") is None:
            return "running as root needs 'setpriv' (util-linux) to drop to an unprivileged uid, and it is missing"
        probe = self._run(*_with_end_marker("import sys\n"), bwrap=True)
        if probe.passed:
            return ""
        hint = " (bubblewrap >= 0.8 is needed)" if "Unknown option" in probe.stderr else ""
        return f"a probe program did not run: {(probe.stderr.strip() or probe.status)[-300:]}{hint}"

    def _bwrap_argv(self, program_fd: int, info_fd: int) -> list[str]:
        """bwrap command running ``program_fd``'s contents as ``/tmp/program.py`` (see the class docstring)."""
        python = os.path.realpath(self.python)
        prefix = Path(python).parent.parent
        root_view = ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                root_view += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                root_view += ["--ro-bind", top, top]
        if not prefix.is_relative_to("/usr"):
            for parent in reversed(prefix.parents[:-1]):
                root_view += ["--perms", "0755", "--dir", str(parent)]
            root_view += ["--ro-bind", str(prefix), str(prefix)]
        tmpfs = str(self.tmpfs_mb * 1024 * 1024)
        env = {"PATH": "/usr/bin:/bin", "HOME": _SANDBOX_DIR, "TMPDIR": _SANDBOX_DIR, "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        nproc = self.max_processes
        start = (f"import os, resource, sys\nresource.setrlimit(resource.RLIMIT_NPROC, ({nproc}, {nproc}))\n"
                 f"os.execv(sys.executable, [sys.executable, '-s', '-B', 'program.py'])\n")
        inner = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                 "--new-session", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
                 *root_view, "--proc", "/proc", "--dev", "/dev", "--size", tmpfs, "--tmpfs", "/dev/shm",
                 "--remount-ro", "/dev", "--size", tmpfs, "--tmpfs", _SANDBOX_DIR,
                 "--file", str(program_fd), f"{_SANDBOX_DIR}/program.py", "--remount-ro", "/",
                 "--chdir", _SANDBOX_DIR, "--clearenv", *[a for k, v in env.items() for a in ("--setenv", k, v)],
                 "--info-fd", str(info_fd), "--", python, "-s", "-B", "-c", start]
        if os.geteuid() != 0:
            return inner
        # As root: an outer mount namespace where the prefix (e.g. under /root, mode 700) is reachable, then drop to
        # uid 65534 so that the inner bwrap's user namespace maps to an unprivileged host uid.
        outer = [self.bwrap, "--die-with-parent", *root_view, "--bind", "/proc", "/proc", "--dev", "/dev",
                 "--tmpfs", "/tmp", "--", "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}",
                 "--clear-groups", "--"]
        return outer + inner

    @contextlib.contextmanager
    def _launch(self, program: str, bwrap: bool) -> Iterator[_Launch]:
        """How to start ``program`` under bwrap or as a plain subprocess; what it needs exists until the block ends."""
        encoded = program.encode("utf-8", errors="surrogatepass")
        if bwrap:
            with tempfile.TemporaryFile() as src:
                src.write(encoded)
                src.flush()
                src.seek(0)
                info_pipe = os.pipe()
                yield _Launch(self._bwrap_argv(src.fileno(), info_pipe[1]), None, None,
                              (src.fileno(), info_pipe[1]), info_pipe)
            return
        workdir = Path(tempfile.mkdtemp(prefix="modlora-sandbox-"))
        try:
            shim = workdir / "_shim"
            shim.mkdir()
            (shim / "sitecustomize.py").write_text(_SOCKET_SHIM)
            run_dir = workdir / "run"
            run_dir.mkdir()
            (run_dir / "program.py").write_bytes(encoded)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(run_dir), "PYTHONPATH": str(shim),
                   "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8",
                   "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "TMPDIR": str(run_dir)}
            cmd = [self.python, "-s", "-B", "program.py"]
            if self.use_netns:
                cmd = ["unshare", "-rn", *cmd]
            yield _Launch(cmd, run_dir, env, (), None)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------------- common
    def _limits(self) -> Callable[[], None]:
        mem = self.memory_mb * 1024 * 1024
        cpu = int(self.timeout_s) + 1
        fsize = self.max_file_bytes

        def apply_limits() -> None:  # runs in the child between fork and exec
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        return apply_limits

    def run(self, source: str) -> SandboxResult:
        """Run ``source`` as ``__main__``; passed iff it runs to its last line and exits 0 within the limits."""
        program, token = _with_end_marker(source)
        return self._run(program, token, self.isolation == "bwrap")

    def _run(self, program: str, token: str, bwrap: bool) -> SandboxResult:
        isolation = "bwrap" if bwrap else "subprocess"
        with self._launch(program, bwrap) as launch, tempfile.TemporaryFile() as out, \
                tempfile.TemporaryFile() as err:
            try:
                running = self._start(launch, subprocess.DEVNULL, out, err)
            except OSError as exc:
                return SandboxResult("error", None, "", f"could not start the sandbox: {exc}", 0.0, isolation, False)
            code, timed_out, wall = self._stop(running, wait=True)
            stdout, reached_end = _read_stdout(out, token, self.max_output_bytes)
            stderr = _read_capped(err, self.max_output_bytes)
        status = _status(code, timed_out, wall >= self.timeout_s, stderr, reached_end)
        return SandboxResult(status, code, stdout, stderr, wall, isolation, reached_end)

    @contextlib.contextmanager
    def session(self, source: str) -> Iterator[SandboxSession]:
        """Start ``source`` as a program that exchanges JSON lines with the evaluator over its stdin and stdout (see
        :class:`SandboxSession`), under the same isolation and limits as :meth:`run`; killed when the block ends.

        Raises :class:`SandboxUnavailableError` if the sandbox cannot start.
        """
        bwrap = self.isolation == "bwrap"
        with self._launch(source, bwrap) as launch, tempfile.TemporaryFile() as err:
            try:
                running = self._start(launch, subprocess.PIPE, subprocess.PIPE, err)
            except OSError as exc:
                raise SandboxUnavailableError(f"could not start the sandbox: {exc}") from exc
            session = SandboxSession(self, running, err)
            try:
                yield session
            finally:
                session.finish(wait=False)

    def _start(self, launch: _Launch, stdin: int | IO[bytes], stdout: int | IO[bytes],
               stderr: IO[bytes]) -> _Running:
        """Start ``launch`` under the rlimits in its own session; raises OSError if it cannot start.

        ``launch.info_pipe`` (bwrap only; closed here): the pipe of bwrap's ``--info-fd``, whose JSON gives the host
        pid of the sandbox's init, which :meth:`_stop` kills first.
        """
        t0 = time.perf_counter()
        info_pipe = launch.info_pipe
        try:
            proc = subprocess.Popen(launch.cmd, cwd=launch.cwd, env=launch.env, stdin=stdin, stdout=stdout,
                                    stderr=stderr, bufsize=0, start_new_session=True, preexec_fn=self._limits(),
                                    close_fds=True, pass_fds=launch.pass_fds)
        except OSError:
            if info_pipe is not None:
                os.close(info_pipe[0])
                os.close(info_pipe[1])
            raise
        sandbox_init = None
        if info_pipe is not None:
            os.close(info_pipe[1])  # our write end: the read end sees EOF once bwrap is done with it
            try:
                sandbox_init = _read_child_pid(info_pipe[0], t0 + self.timeout_s)
            finally:
                os.close(info_pipe[0])
        return _Running(proc, sandbox_init, t0, "subprocess" if info_pipe is None else "bwrap")

    def _stop(self, running: _Running, wait: bool) -> tuple[int, bool, float]:
        """``(exit status, timed out, wall seconds)`` of a started program, after letting it run until its time limit
        (``wait``) or not at all. What is left is killed: the sandbox's init first (the kernel then kills its whole
        pid namespace and bwrap exits), then the session of the command."""
        proc = running.proc
        timed_out = False
        try:
            if wait:
                proc.wait(timeout=max(0.0, running.t0 + self.timeout_s - time.perf_counter()))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if running.sandbox_init is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(running.sandbox_init, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        code = proc.returncode
        if running.isolation == "bwrap" and code > 128:
            code = -(code - 128)
        return code, timed_out, time.perf_counter() - running.t0

    def run_many(self, sources: Sequence[str], workers: int = 2) -> list[SandboxResult]:
        """Run several programs, ``workers`` at a time, results in input order."""
        if workers <= 1:
            return [self.run(s) for s in sources]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self.run, sources))


@dataclass(frozen=True)
class _Launch:
    """A command that runs a program in the sandbox: what :meth:`Sandbox._start` passes to ``Popen``."""

    cmd: list[str]
    cwd: Path | None
    env: dict[str, str] | None
    pass_fds: tuple[int, ...]
    info_pipe: tuple[int, int] | None


@dataclass(frozen=True)
class _Running:
    proc: subprocess.Popen[bytes]
    sandbox_init: int | None
    t0: float
    isolation: str


def _status(code: int, timed_out: bool, at_time_limit: bool, stderr: str, ran_to_end: bool) -> str:
    """A finished program's :attr:`SandboxResult.status`."""
    if timed_out or code in (-signal.SIGXCPU, -signal.SIGKILL) and at_time_limit:
        return "timeout"
    if code == 0 and ran_to_end:
        return "passed"
    if "MemoryError" in stderr or code == -signal.SIGSEGV and "Cannot allocate memory" in stderr:
        return "memory"
    return "failed"


class SandboxSession:
    """A program running in the sandbox that exchanges JSON objects with the evaluator, one per line: it reads
    them on its stdin and writes them to its stdout (what it writes to stderr is kept as in :meth:`Sandbox.run`).

    Every :meth:`send` and :meth:`receive` gives up at the run's time limit. The first failure closes the channel:
    ``problem`` says why, and every later call fails too. The program decides nothing here: its messages are all
    the evaluator learns from it, and the evaluator judges them.
    """

    def __init__(self, sandbox: Sandbox, running: _Running, stderr: IO[bytes]) -> None:
        self._sandbox = sandbox
        self._running = running
        self._stderr = stderr
        self._deadline = running.t0 + sandbox.timeout_s
        self._buffer = bytearray()
        self._result: SandboxResult | None = None
        self.problem = ""
        os.set_blocking(self._stdin_fd, False)

    @property
    def _stdin_fd(self) -> int:
        assert self._running.proc.stdin is not None
        return self._running.proc.stdin.fileno()

    def _fail(self, problem: str) -> None:
        self.problem = self.problem or problem

    def send(self, message: dict[str, Any]) -> bool:
        """Write ``message`` as one line to the program's stdin; False if it cannot be (see ``problem``)."""
        if self.problem:
            return False
        data = memoryview((json.dumps(message) + "\n").encode())
        while data:
            left = self._deadline - time.perf_counter()
            if left <= 0 or not select.select([], [self._stdin_fd], [], left)[1]:
                self._fail("the program did not read its input within the time limit")
                return False
            try:
                written = os.write(self._stdin_fd, data)
            except BrokenPipeError:
                self._fail("the program stopped reading its input")
                return False
            data = data[written:]
        return True

    def receive(self) -> dict[str, Any] | None:
        """The program's next message, or None (see ``problem``) if it ends its output, writes a line that is not a
        JSON object or longer than ``max_output_bytes``, or writes nothing within the time limit."""
        if self.problem:
            return None
        assert self._running.proc.stdout is not None
        fd = self._running.proc.stdout.fileno()
        limit = self._sandbox.max_output_bytes
        while not self.problem and (end := self._buffer.find(b"\n")) < 0:
            left = self._deadline - time.perf_counter()
            if len(self._buffer) > limit:
                self._fail(f"the program wrote a message over {limit} bytes")
            elif left <= 0 or not select.select([fd], [], [], left)[0]:
                self._fail("the program wrote no message within the time limit")
            elif chunk := os.read(fd, 65536):
                self._buffer += chunk
            else:
                self._fail("the program closed its output")
        if self.problem:
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        try:
            message = parse_json(line) if len(line) <= limit else None
        except ValueError as exc:
            self._fail(f"the program wrote a message that is not JSON: {exc}")
            return None
        if not isinstance(message, dict):
            self._fail(f"the program wrote a message that is not a JSON object of at most {limit} bytes")
            return None
        return message

    def finish(self, wait: bool = True) -> SandboxResult:
        """End the program (once): close its stdin, then let it exit until the time limit (``wait``) or kill it now.

        A session has no end token: its status is "passed" on exit status 0, and ``stdout`` is empty (it was the
        channel).
        """
        if self._result is None:
            self._fail("the session has ended")
            proc = self._running.proc
            assert proc.stdin is not None and proc.stdout is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
            code, timed_out, wall = self._sandbox._stop(self._running, wait)
            proc.stdout.close()
            stderr = _read_capped(self._stderr, self._sandbox.max_output_bytes)
            status = _status(code, timed_out, wall >= self._sandbox.timeout_s, stderr, True)
            self._result = SandboxResult(status, code, "", stderr, wall, self._running.isolation, False)
        return self._result


def _read_child_pid(fd: int, deadline: float) -> int | None:
    """The ``child-pid`` of bwrap's ``--info-fd`` JSON (the sandbox's init, as a host pid), or None if bwrap
    exits or the deadline passes first."""
    data = b""
    while (left := deadline - time.perf_counter()) > 0 and select.select([fd], [], [], left)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
        try:
            info = json.loads(data)
        except ValueError:
            continue  # not complete yet
        pid = info.get("child-pid") if isinstance(info, dict) else None
        return pid if isinstance(pid, int) and pid > 1 else None
    return None


def _read_stdout(out: IO[bytes], token: str, limit: int) -> tuple[str, bool]:
    """Captured stdout without the end-of-program token line (capped at ``limit`` bytes), and whether it was there."""
    out.seek(0)
    data = out.read()
    marker = f"\n{token}\n".encode()
    pos = data.rfind(marker)
    if pos >= 0:
        data = data[:pos] + data[pos + len(marker):]
    return _capped_text(data, limit), pos >= 0


def _read_capped(fh: IO[bytes], limit: int) -> str:
    fh.seek(0)
    return _capped_text(fh.read(limit + 1), limit)


def _capped_text(data: bytes, limit: int) -> str:
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n...[output truncated]" if len(data) > limit else "")


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
                max_output_bytes: int = 64 * 1024) -> SandboxResult:
    """Run one program in a fresh :class:`Sandbox` (see there for the limits)."""
    return Sandbox(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes).run(source)
