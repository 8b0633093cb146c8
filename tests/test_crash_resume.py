"""SIGKILL a library build at several points; the library always opens and resumes to the uninterrupted result."""

from __future__ import annotations

import json
import os
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
