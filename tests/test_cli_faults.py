"""Bad command lines end in one line naming what is at fault (exit status 2 or 1), never a traceback or a hang: a
device this machine has not, paths under /proc, a directory or a FIFO where a file is expected, a file where a
directory is expected. Each runs in its own process (real stderr; a timeout catches a read that would block), and
the readers of task, results, model and predictor files refuse a FIFO instead of waiting on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modlora.evaluation.results import EvalRun, TaskScores, save_results

from .conftest import save_tiny_model, write_sni_task

HANG_GUARD_S = 240   # a command that blocks on a FIFO never ends; this only stops the test from waiting forever


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, a data root, a two-expert library, a results file, a FIFO, a directory and a plain file."""
    from modlora.library.adapters import LoraSpec, random_adapter
    from modlora.library.store import ExpertLibrary
    from modlora.models import load_base_model

    root = tmp_path_factory.mktemp("faults")
    save_tiny_model(root / "tiny")
    for sub in ("sni/tasks", "sni/heldout", "eval"):
        (root / "data" / sub).mkdir(parents=True)
    for name in ("task1_alpha", "task2_beta"):
        write_sni_task(root / "data" / "sni" / "tasks", name, name[-1])
    write_sni_task(root / "data" / "sni" / "heldout", "task9_zeta", "z")
    lm = load_base_model(str(root / "tiny"), device="cpu")
    lib = ExpertLibrary.create(root / "lib", lm.info)
    for i in range(2):
        lib.add(f"e{i}", random_adapter(lm.model, LoraSpec(rank=2, alpha=4, dropout=0.0), seed=i), tasks=[f"t{i}"])
    save_results(EvalRun("base", "tiny", tasks={"t": TaskScores({"acc": 0.5}, {"acc": 0.1}, 2)}),
                 root / "results.json")
    os.mkfifo(root / "fifo")
    (root / "adir").mkdir()
    (root / "plain.txt").write_text("not a directory\n")
    return {"root": root}


M, D, LIB, OUT = "--model=MODEL", "--data=DATA", "LIB", "OUT"
#: (command line, text the one error line must hold: the option, path or device at fault)
BAD_COMMAND_LINES = [
    # devices: the grammar at parse time, availability before the model loads
    (["build", OUT, "--device", "quantum:7", M, D], "--device"),
    (["route", LIB, "--prompt", "x", "--device", "meta", M], "--device"),
    (["train", OUT, "task1_alpha", "--device", "cuda:99", M, D], "cuda:99"),
    (["route", LIB, "--prompt", "x", "--device", "mps", M], "mps"),
    # paths under /proc: nothing can be created there
    (["pull", "file://LIB", "/proc/1/x"], "/proc/1/x"),
    (["train", "/proc/1/x", "task1_alpha", M, D], "/proc/1"),
    (["eval", "--suite", "sni", "--limit", "1", "--max-new-tokens", "1", "--out", "/proc/1/x.json", M, D], "/proc/1"),
    (["merge", LIB, "--method", "linear", "--weights", "1,1", "--out", "/proc/1/x"], "/proc/1"),
    (["lorahub", LIB, "--task", "task1_alpha", "--shots", "1", "--budget", "1", "--out", "/proc/1/x", M, D],
     "/proc/1"),
    (["export", LIB, "e0", "/proc/1/x"], "/proc/1/"),
    (["build", OUT, "--model", "/proc/1/x", D], "/proc/1/x"),
    # a directory where a file is expected
    (["build", OUT, "--flat", "ADIR", M], "ADIR"),
    (["report", "ADIR", "--out", OUT], "ADIR"),
    (["eval", "--suite", "sni", "--limit", "1", "--max-new-tokens", "1", "--out", "ADIR", M, D], "ADIR"),
    (["cluster", LIB, "--k", "2", "--out", "ADIR"], "ADIR"),
    # a FIFO where a file is expected (an ordinary open would wait for a writer forever)
    (["build", OUT, "--flat", "FIFO", M], "FIFO"),
    (["report", "FIFO", "--out", OUT], "FIFO"),
    (["report", "RESULTS", "--out", OUT, "--similarity", "FIFO"], "FIFO"),
    (["cluster", LIB, "--k", "2", "--plot", "FIFO"], "FIFO"),
    (["build", OUT, "--data", "FIFO", M], "FIFO"),
    # a file where a directory is expected
    (["build", "PLAIN", "--tasks", "task1_alpha", M, D], "PLAIN"),
    (["merge", LIB, "--method", "linear", "--weights", "1,1", "--out", "PLAIN", "--overwrite"], "PLAIN"),
]


@pytest.mark.parametrize("argv, message", [
    (["train", OUT, "task1_alpha", "--name", "../escape", M, D], "--name: invalid expert name '../escape'"),
    (["eval", "--suite", "sni", "--sni-split", "../../etc", M, D], "argument --sni-split: expected one directory name"),
    (["eval", "--suite", "sni", "--sni-split", "nope", M, D], "--sni-split nope: no directory"),
])
def test_refused_before_the_model_loads(world, tmp_path, monkeypatch, capsys, argv, message):
    """Values that used to fail only after the model had loaded (or trained), or not at all: an expert name that is
    not a name, a split that is a path or is missing."""
    from modlora.cli import main

    def no_model(*_a, **_k):
        raise AssertionError("the model must not load for a bad option")

    monkeypatch.setattr("modlora.models.load_base_model", no_model)
    assert main(_argv(world, argv, tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err


def _argv(world: dict[str, Path], argv: list[str], tmp_path: Path) -> list[str]:
    root = world["root"]
    names = {"LIB": str(root / "lib"), "OUT": str(tmp_path / "out"), "ADIR": str(root / "adir"),
             "FIFO": str(root / "fifo"), "PLAIN": str(root / "plain.txt"), "RESULTS": str(root / "results.json"),
             "MODEL": str(root / "tiny"), "DATA": str(root / "data")}
    out = []
    for arg in argv:
        for key, value in names.items():
            if arg == key or arg.endswith("=" + key) or arg == f"file://{key}":
                arg = arg[: len(arg) - len(key)] + value
        out.append(arg)
    return out


@pytest.mark.parametrize("argv, culprit", BAD_COMMAND_LINES, ids=[" ".join(a[:2]) + f" [{c}]"
                                                                  for a, c in BAD_COMMAND_LINES])
def test_bad_command_line_fails_in_one_line(world, tmp_path, argv, culprit):
    argv = _argv(world, argv, tmp_path)
    culprit = _argv(world, [culprit], tmp_path)[0]
    try:
        run = subprocess.run([sys.executable, "-m", "modlora.cli", *argv], capture_output=True, text=True,
                             timeout=HANG_GUARD_S, cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    except subprocess.TimeoutExpired:
        pytest.fail(f"modlora {' '.join(argv)} never ended (a blocking read?)")
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode in (1, 2), (run.returncode, run.stderr)
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("modlora") and culprit in lines[0], lines[0]


FIFO_READERS = """
import os, sys
from pathlib import Path
root = Path(sys.argv[1])
fifo = root / "fifo"
def attempt(what, read):
    try:
        read()
    except Exception as exc:
        print(what, type(exc).__name__, str(fifo) in str(exc) or "FIFO" in str(exc), flush=True)
    else:
        print(what, "read a FIFO", flush=True)
from modlora.data import load_sni_task, read_flat_jsonl, read_index
from modlora.evaluation.results import read_json
from modlora.models import resolve_model_source
from modlora.reuse.learned.classifier import TaskPredictor
attempt("sni", lambda: load_sni_task(fifo))
attempt("flat", lambda: read_flat_jsonl(fifo))
(root / "data" / "sni").mkdir(parents=True)
os.mkfifo(root / "data" / "sni" / "index.json")
fifo = root / "data" / "sni" / "index.json"
attempt("index", lambda: read_index(root / "data"))
fifo = root / "fifo"
attempt("results", lambda: read_json(fifo, "results file"))
model = root / "model"
model.mkdir()
(model / "config.json").write_text("{}")
os.mkfifo(model / "modlora_base.json")
fifo = model / "modlora_base.json"
attempt("model", lambda: resolve_model_source(str(model)))
for name in ("task_predictor.json", "task_predictor.safetensors"):
    tp = root / name.replace(".", "_")
    tp.mkdir()
    (tp / "task_predictor.json").write_text('{"format": "modlora-task-predictor-v1", "expert_names": ["a"]}')
    if name.endswith("json"):
        (tp / name).unlink()
    os.mkfifo(tp / name)
    fifo = tp / name
    attempt(name, lambda: TaskPredictor.load(tp))
"""


def test_readers_refuse_a_fifo_instead_of_waiting(tmp_path):
    """Task files (SNI, flat JSONL, the index), results files, a cached model's identity and a saved task predictor
    (config and weights): a FIFO in their place raises an error naming it at once (an ordinary open would wait for a
    writer forever; the timeout only stops the test)."""
    os.mkfifo(tmp_path / "fifo")
    try:
        run = subprocess.run([sys.executable, "-c", FIFO_READERS, str(tmp_path)], capture_output=True, text=True,
                             timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired as exc:
        done = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"a reader blocked on a FIFO; those before it said:\n{done}")
    assert run.returncode == 0, run.stderr
    results = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert set(results) == {"sni", "flat", "index", "results", "model", "task_predictor.json",
                            "task_predictor.safetensors"}, run.stdout
    for what, outcome in results.items():
        assert outcome.endswith(" True") and outcome.split()[0] in ("DataError", "ModelLoadError", "RoutingError"), \
            (what, outcome)


@pytest.mark.parametrize("error, line", [
    (PermissionError(13, "Permission denied", "/srv/lib/meta"), "/srv/lib/meta: Permission denied"),
    (OSError(28, "No space left on device"), "No space left on device"),
    (OSError(18, "Invalid cross-device link", "/a", None, "/b"), "/a -> /b: Invalid cross-device link"),
    (OSError("a reason\nover two lines"), "a reason over two lines"),
])
def test_an_error_of_the_system_is_one_line_naming_its_paths(monkeypatch, capsys, error, line):
    """Whatever a command meets from the system (a path it may not write, a full disk, a rename across devices) ends
    the command with exit status 1 and one line: the path(s) and the reason."""
    def refused(args):
        raise error

    monkeypatch.setattr("modlora.cli.library.cmd_show", refused)
    from modlora.cli import main
    assert main(["show", "LIB"]) == 1
    assert capsys.readouterr().err == f"modlora show: error: {line}\n"


def test_a_gpu_index_beyond_the_machine_is_refused_naming_it(monkeypatch):
    """On a machine with one GPU (simulated here), ``cuda:1`` is refused before anything loads, saying what there
    is; ``cuda:0`` and ``cuda`` pass."""
    import torch

    from modlora.errors import ModelLoadError
    from modlora.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ModelLoadError, match=r"device 'cuda:1': this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ModelLoadError, match="device 'meta'"):
        resolve_device("meta")
