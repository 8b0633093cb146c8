"""SIGKILL a library build at several points; the library always opens and resumes to the uninterrupted result.
Through the command line: SIGINT mid-build, a second build into a library being built, and a write the system refuses
(a file-size limit, a full disk) each end in one line and lose nothing already stored."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modlora.library.store import ExpertLibrary

from .conftest import make_char_tokenizer, make_tiny_llama

CHILD = Path(__file__).with_name("crash_child.py")
TASKS = ["first", "last", "lower", "upper"]
# (mode, occurrence): inside training, while writing expert files, between the two renames, mid-manifest write
CRASH_POINTS = [("train", 1), ("train", 4), ("before_rename", 1), ("before_rename", 3), ("after_rename", 2),
                ("after_rename", 4), ("manifest_tmp", 2), ("manifest_tmp", 5)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    make_tiny_llama(seed=0).save_pretrained(root / "tiny")
    make_char_tokenizer().save_pretrained(root / "tiny")
    with open(root / "flat.jsonl", "w") as fh:
        for t in TASKS:
            for i, w in enumerate(["ab", "Cd", "eF", "gh", "IJ", "kl"] * 3):
                out = {"upper": w.upper(), "lower": w.lower(), "first": w[0], "last": w[-1]}[t]
                fh.write(json.dumps({"task_name": t, "source": f"{w}{i}", "target": out, "id": f"{t}{i}"}) + "\n")
    ref = root / "reference"
    _run(root, ref, "none", 0)
    return root, ExpertLibrary(ref)


def _run(root: Path, lib: Path, mode: str, n: int) -> int:
    envvars = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, str(CHILD), str(root / "tiny"), str(root / "flat.jsonl"), str(lib), mode,
                           str(n)], env=envvars, capture_output=True, timeout=600).returncode


@pytest.mark.parametrize("mode,n", CRASH_POINTS)
def test_kill_then_resume(env, tmp_path, mode, n):
    root, reference = env
    lib_dir = tmp_path / "lib"
    code = _run(root, lib_dir, mode, n)
    assert code == -9, f"child was expected to be SIGKILLed at {mode}#{n}, exit code {code}"
    lib = ExpertLibrary(lib_dir)  # always opens
    finished = lib.expert_names()
    assert set(finished) <= set(TASKS)
    for name in finished:  # everything listed is complete and intact
        lib.get(name)
    assert _run(root, lib_dir, "none", 0) == 0  # resume
    final = ExpertLibrary(lib_dir)
    assert final.expert_names() == reference.expert_names() == TASKS
    assert final.verify() == []
    for name in finished:  # experts finished before the kill were kept, not retrained
        assert final.entry(name).created == lib.entry(name).created
    for name in TASKS:  # same content as the uninterrupted build
        a, b = final.get(name), reference.get(name)
        for m in a.modules:
            torch.testing.assert_close(a.A[m], b.A[m])
            torch.testing.assert_close(a.B[m], b.B[m])


# ------------------------------------------------------------------ faults through the command line: SIGINT, two
# builds into one library, a write the system refuses (file-size limit, full disk)
FAULT_CHILD = Path(__file__).with_name("fault_child.py")


def _build_argv(root: Path, lib: Path) -> list[str]:
    """``modlora build`` of the reference library (what crash_child.py builds) through the command line."""
    return ["build", str(lib), "--strategy", "private", "--tasks", "upper", "lower", "first", "last", "--flat",
            str(root / "flat.jsonl"), "--model", str(root / "tiny"), "--device", "cpu", "--steps", "2",
            "--batch-size", "4", "--lr", "1e-3", "--max-val", "4", "--max-prompt-tokens", "64",
            "--max-target-tokens", "8", "--experts-per-job", "2"]


def _child(root: Path, lib: Path, mode: str, n: int) -> list[str]:
    return [sys.executable, str(FAULT_CHILD), mode, str(n), *_build_argv(root, lib)]


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _start_and_hold(root: Path, lib: Path, mode: str, n: int, stderr) -> subprocess.Popen:
    """A build that stops at the chosen point and waits there (it printed "ready") until a line comes on its stdin."""
    proc = subprocess.Popen(_child(root, lib, mode, n), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                            text=True, env=_child_env())
    for line in proc.stdout:
        if line.strip() == "ready":
            return proc
    proc.wait()
    raise AssertionError(f"the build ended (exit status {proc.returncode}) before reaching {mode}#{n}")


def _command_lines(stderr: str, command: str = "modlora build") -> list[str]:
    """The lines the command itself wrote (progress lines aside)."""
    return [line for line in stderr.splitlines() if line.startswith(command)]


def _leftovers(lib_dir: Path, finished: list[str]) -> list[str]:
    """Whatever an interrupted write left in the library: temporary files and directories, unlisted experts."""
    experts = lib_dir / "experts"
    return ([p.name for p in experts.iterdir() if p.name not in finished] if experts.is_dir() else []) + \
        [p.name for p in lib_dir.iterdir() if p.name.endswith(".tmp")]


def _same_as_reference(lib: ExpertLibrary, reference: ExpertLibrary) -> None:
    assert lib.expert_names() == reference.expert_names() == TASKS
    assert lib.verify() == []
    for name in TASKS:
        a, b = lib.get(name), reference.get(name)
        for m in a.modules:
            torch.testing.assert_close(a.A[m], b.A[m])
            torch.testing.assert_close(a.B[m], b.B[m])


@pytest.mark.parametrize("mode,n,stored", [("hold_step", 5, 2), ("hold_write", 2, 1)])
def test_sigint_mid_build_keeps_what_is_stored_and_resumes(env, tmp_path, mode, n, stored):
    """Ctrl-C in the middle of ``modlora build`` (training the second chunk; writing an expert's files): the command
    ends at once with exit status 130 and one line saying so, the experts already stored stay stored and intact, the
    half-written one leaves nothing behind, and the same command run again trains only the rest, to the same library
    as an uninterrupted build."""
    root, reference = env
    lib_dir = tmp_path / "lib"
    with open(tmp_path / "stderr", "w+") as err:
        proc = _start_and_hold(root, lib_dir, mode, n, err)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=600)
        err.seek(0)
        stderr = err.read()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert _command_lines(stderr) == ["modlora build: interrupted; every expert already stored is kept: run the same "
                                      "command again to train the rest"], stderr
    lib = ExpertLibrary(lib_dir)
    finished = lib.expert_names()
    assert len(finished) == stored and lib.verify() == []
    assert _leftovers(lib_dir, finished) == []
    rerun = subprocess.run(_child(root, lib_dir, "none", 0), capture_output=True, text=True, env=_child_env(),
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    final = ExpertLibrary(lib_dir)
    for name in finished:  # kept, not trained again
        assert final.entry(name).created == lib.entry(name).created
        assert final.entry(name).files == lib.entry(name).files
    _same_as_reference(final, reference)


def test_a_second_build_into_a_library_being_built_is_refused(env, tmp_path):
    """Two builds into one library: while the first is training, the second is refused at once (exit status 2, one
    line naming the library; it does not wait) and changes nothing; the first then finishes as if alone."""
    root, reference = env
    lib_dir = tmp_path / "lib"
    with open(tmp_path / "stderr", "w+") as err:
        first = _start_and_hold(root, lib_dir, "hold_step", 1, err)
        try:
            before = (lib_dir / "library.json").read_bytes()
            second = subprocess.run(_child(root, lib_dir, "none", 0), capture_output=True, text=True,
                                    env=_child_env(), timeout=600)
            after = (lib_dir / "library.json").read_bytes()
        finally:
            first.stdin.write("\n")
            first.stdin.flush()
            first.communicate(timeout=600)
        err.seek(0)
        first_stderr = err.read()
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    assert _command_lines(second.stderr) == [
        f"modlora build: error: {lib_dir}: another build is writing into this library; wait for it to end (it resumes "
        "from what is stored), or build into another directory"], second.stderr
    assert after == before
    assert first.returncode == 0, first_stderr
    _same_as_reference(ExpertLibrary(lib_dir), reference)


def test_a_refused_write_leaves_the_library_as_it_was(env, tmp_path):
    """A file-size limit (RLIMIT_FSIZE: the kernel refuses the write with EFBIG, as a full disk does with ENOSPC)
    reached while the third expert is written: the build ends with one line naming the expert and the reason; the
    manifest is byte for byte what it was, the two experts stored before are intact, nothing half-written stays; a
    rerun finishes the library."""
    root, reference = env
    lib_dir = tmp_path / "lib"
    run = subprocess.run(_child(root, lib_dir, "fsize", 2), capture_output=True, text=True, env=_child_env(),
                         timeout=600)
    assert run.returncode in (1, 2), run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    (line,) = _command_lines(run.stderr)
    assert "File too large" in line and f"{lib_dir}: cannot store expert" in line, line
    assert any(f"expert {name!r}" in line for name in ("first", "last")), line
    assert (lib_dir / "library.json").read_bytes() == Path(f"{lib_dir}.json.before").read_bytes()
    lib = ExpertLibrary(lib_dir)
    finished = lib.expert_names()
    assert finished == ["lower", "upper"] and lib.verify() == []
    assert _leftovers(lib_dir, finished) == []
    assert subprocess.run(_child(root, lib_dir, "none", 0), capture_output=True, env=_child_env(),
                          timeout=600).returncode == 0
    final = ExpertLibrary(lib_dir)
    assert all(final.entry(name).created == lib.entry(name).created for name in finished)
    _same_as_reference(final, reference)


def test_a_full_disk_while_saving_an_expert_is_one_line(env, tmp_path, monkeypatch, capsys):
    """ENOSPC when the second expert's weights reach the disk (fsync, where delayed allocation reports it): ``modlora
    build`` says which expert could not be stored and why in one line; the manifest and the first expert are as they
    were."""
    from modlora.cli import main

    root, _ = env
    lib_dir = tmp_path / "lib"
    real_fsync = os.fsync
    seen = {"weights": 0, "manifest": b""}

    def full_disk(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and "adapter_model.safetensors" in \
                os.readlink(f"/proc/self/fd/{fd}"):
            seen["weights"] += 1
            if seen["weights"] == 2:
                seen["manifest"] = (lib_dir / "library.json").read_bytes()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    argv = _build_argv(root, lib_dir)
    argv[argv.index("--experts-per-job") + 1] = "4"
    assert main(argv) == 2
    err = capsys.readouterr().err
    (line,) = _command_lines(err)
    assert "No space left on device" in line and "cannot store expert" in line and "Traceback" not in err, err
    assert (lib_dir / "library.json").read_bytes() == seen["manifest"]
    lib = ExpertLibrary(lib_dir)
    assert len(lib.expert_names()) == 1 and lib.verify() == []
    assert _leftovers(lib_dir, lib.expert_names()) == []
