"""The code sandbox (bubblewrap isolation, the subprocess fallback, the end-of-program token) and HumanEval / MBPP
program building."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import warnings
from pathlib import Path

import pytest

from modlora.errors import SandboxUnavailableError
from modlora.evaluation.code import (
    HUMANEVAL_STOPS,
    evaluate_code,
    extract_code,
    humaneval_program,
    load_humaneval,
    load_mbpp,
    mbpp_program,
    mbpp_prompt,
    truncate_at_stops,
)
from modlora.evaluation.sandbox import Sandbox, SandboxIsolationWarning, run_program

REPO = Path(__file__).resolve().parents[1]


def _quiet_sandbox(**kwargs) -> Sandbox:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxIsolationWarning)
        return Sandbox(**kwargs)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    """bwrap where it works, else the subprocess fallback."""
    return _quiet_sandbox(timeout_s=3.0, memory_mb=512)


@pytest.fixture(scope="module")
def fallback() -> Sandbox:
    return _quiet_sandbox(timeout_s=3.0, memory_mb=512, use_bwrap=False)


@pytest.fixture(scope="module")
def bwrapped(sandbox) -> Sandbox:
    if sandbox.isolation != "bwrap":
        pytest.skip(f"bubblewrap unusable here: {sandbox.isolation_problem}")
    return sandbox


def _attempt(body: str) -> str:
    """A program that runs ``body`` (indented), prints ESCAPED if it raised nothing, BLOCKED <error> otherwise."""
    indented = "\n".join("    " + line for line in body.splitlines())
    return (f"try:\n{indented}\nexcept Exception as exc:\n    print('BLOCKED', type(exc).__name__, exc)\n"
            f"else:\n    print('ESCAPED')\n")


def _processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker`` (a /proc scan)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# ------------------------------------------------------------------------------------------- both isolation paths

def test_correct_solution_passes_and_wrong_fails(sandbox):
    ok = sandbox.run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('fine')\n")
    assert ok.passed and ok.status == "passed" and ok.returncode == 0 and ok.stdout.strip() == "fine"
    assert ok.reached_end and ok.isolation == sandbox.isolation
    bad = sandbox.run("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr and not bad.reached_end
    syntax = sandbox.run("def broken(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr
    assert sandbox.run("print('no newline at the end', end='')").stdout == "no newline at the end"


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit(0)",
                                       "exit()", "import sys; sys.stdout.close(); sys.exit(0)"])
@pytest.mark.parametrize("which", ["sandbox", "fallback"])
def test_exiting_before_the_asserts_is_not_a_pass(exit_call, which, request):
    box = request.getfixturevalue(which)
    res = box.run(f"def f():\n    return 1\n{exit_call}\nassert f() == 2\n")
    assert res.returncode == 0 and not res.reached_end and res.status == "failed" and not res.passed


def test_infinite_loop_is_killed(sandbox):
    t0 = time.perf_counter()
    res = sandbox.run("while True:\n    pass\n")
    assert res.status == "timeout" and not res.passed
    assert time.perf_counter() - t0 < 30  # bounded (generous under a loaded CI machine)


def test_fallback_kills_sleeping_children_with_the_group(tmp_path):
    marker = tmp_path / "child_alive"
    child = f"import time; time.sleep(4); open({str(marker)!r}, 'w')"
    src = (f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\n"
           "print('started', flush=True)\ntime.sleep(60)\n")
    res = _quiet_sandbox(timeout_s=2.5, use_bwrap=False, use_netns=False).run(src)
    assert res.status == "timeout" and "started" in res.stdout and res.isolation == "subprocess"
    time.sleep(4.5)
    assert not marker.exists()


def test_memory_bomb_is_a_failure(sandbox):
    res = sandbox.run("x = bytearray(4 * 1024 ** 3)\n")
    assert res.status == "memory" and not res.passed
    res = sandbox.run("xs = []\nwhile True:\n    xs.append(' ' * 10 ** 7)\n")
    assert res.status in ("memory", "timeout") and not res.passed


def test_output_is_capped():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxIsolationWarning)
        res = run_program("import sys\nsys.stdout.write('x' * 200000)\n", timeout_s=5, max_output_bytes=1000)
    assert res.passed and len(res.stdout) < 1100 and res.stdout.endswith("[output truncated]")


def test_network_is_blocked(sandbox):
    src = ("import socket\n"
           "try:\n"
           "    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
           "except OSError:\n"
           "    pass\n"
           "else:\n"
           "    raise AssertionError('connected')\n")
    assert sandbox.run(src).passed
    with pytest.warns(SandboxIsolationWarning):
        shim_only = Sandbox(timeout_s=3.0, use_bwrap=False, use_netns=False)
    assert shim_only.network_isolation.startswith("socket-shim") and shim_only.isolation == "subprocess"
    src2 = "import socket\ntry:\n    socket.socket()\nexcept OSError:\n    pass\nelse:\n    assert False\n"
    assert shim_only.run(src2).passed
    assert shim_only.run("import asyncio, ssl, socket\ns = socket.socketpair()\n").passed  # stdlib still imports


def test_run_many_keeps_order(sandbox):
    res = sandbox.run_many([f"assert {i} % 2 == 0" for i in range(4)], workers=2)
    assert [r.passed for r in res] == [True, False, True, False]


def test_fallback_warns_loudly_and_still_checks_the_token():
    with pytest.warns(SandboxIsolationWarning) as caught:
        box = Sandbox(timeout_s=3.0, bwrap="/nonexistent/bwrap")
    message = str(caught[0].message)
    assert "NOT isolated" in message and "'/nonexistent/bwrap' not found" in message
    for gap in ("file system", "Unix sockets", "signal", "RLIMIT_NPROC", "setsid"):
        assert gap in message
    assert box.isolation == "subprocess" and box.isolation_problem
    assert box.run("assert 1 + 1 == 2\n").passed
    assert not box.run("raise SystemExit(0)\nassert False\n").passed
    with pytest.raises(SandboxUnavailableError, match="nonexistent"):
        Sandbox(bwrap="/nonexistent/bwrap", use_bwrap=True)


# ------------------------------------------------------------------------------------ escapes that bwrap must stop

def test_bwrap_cannot_write_outside_its_tmpfs(bwrapped, tmp_path):
    outside = tmp_path / "escaped.txt"
    for target in (outside, Path("/escaped.txt"), Path("/usr/escaped.txt"), REPO / "escaped.txt"):
        res = bwrapped.run(_attempt(f"open({str(target)!r}, 'w').write('x')"))
        assert res.passed and res.stdout.startswith("BLOCKED"), (target, res)
        assert not target.exists()
    res = bwrapped.run("open('inside.txt', 'w').write('x')\nopen('/dev/shm/x', 'w').write('x')\n"
                       "import os\nassert os.getcwd() == '/tmp' and sorted(os.listdir('.')) == ['inside.txt', "
                       "'program.py']\n")
    assert res.passed, res
    small = Sandbox(timeout_s=3.0, memory_mb=512, tmpfs_mb=2)
    res = small.run(_attempt("for i in range(4):\n    open(f'f{i}', 'wb').write(bytes(1024 * 1024))"))
    assert res.stdout.startswith("BLOCKED OSError") and "No space left" in res.stdout


def test_bwrap_cannot_read_the_project_or_list_around_it(bwrapped):
    readme = REPO / "README.md"
    assert readme.is_file()
    res = bwrapped.run(_attempt(f"print(open({str(readme)!r}).read()[:80])"))
    assert res.passed and res.stdout.startswith("BLOCKED FileNotFoundError"), res
    # only the directories leading to the interpreter's prefix may show (e.g. /root/.pyenv for a pyenv Python)
    on_prefix_path = set(Path(os.path.realpath(bwrapped.python)).parent.parent.parts)
    own_tmpfs = {Path("/tmp"), Path("/dev/shm")}  # the sandbox's private tmpfs: listing them shows its own files
    for folder in (REPO, REPO.parent, Path.home(), Path("/work"), Path("/home"), Path("/run"), Path("/var/run"),
                   Path("/etc")):
        if folder in own_tmpfs:  # e.g. a checkout in /tmp: its parent is, inside, the sandbox's own /tmp
            continue
        res = bwrapped.run(f"import os\ntry:\n    print(os.listdir({str(folder)!r}))\nexcept OSError:\n"
                           f"    print('[]')\n")
        assert set(eval(res.stdout)) <= on_prefix_path, (folder, res)
    res = bwrapped.run("import os\nprint(sorted(os.listdir('/')))\n")
    assert set(eval(res.stdout)) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "root", "sbin", "tmp",
                                     "usr"}, res.stdout


def test_bwrap_cannot_reach_host_unix_sockets(bwrapped, tmp_path):
    path = tmp_path / "host.sock"
    abstract = f"\0modlora-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as server_abstract:
        server.bind(str(path))
        server_abstract.bind(abstract)
        for srv in (server, server_abstract):
            srv.listen(1)
            srv.setblocking(False)
        for address in (str(path), abstract):
            res = bwrapped.run(_attempt(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({address!r})\n"
                                        f"s.sendall(b'stolen')"))
            assert res.passed and res.stdout.startswith("BLOCKED"), (address, res)
        for srv in (server, server_abstract):
            with pytest.raises(BlockingIOError):
                srv.accept()  # nobody connected, so nothing was received


def test_bwrap_blocks_tcp_even_without_the_shim(bwrapped):
    res = bwrapped.run(_attempt("import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                                "s.settimeout(2)\ns.connect(('1.1.1.1', 80))"))
    assert res.passed and res.stdout.startswith("BLOCKED OSError"), res


@pytest.mark.parametrize("program_end", ["exit", "timeout"])
def test_bwrap_kills_a_setsid_child_with_the_run(bwrapped, program_end):
    marker = f"modlora-orphan-{secrets.token_hex(8)}"
    child = "import time; time.sleep(30)"
    src = (f"import subprocess, sys, time\n"
           f"subprocess.Popen([sys.executable, '-c', {child!r}, {marker!r}], start_new_session=True)\n"
           f"time.sleep(0.5)\nprint('started', flush=True)\n" + ("time.sleep(60)\n" if program_end == "timeout" else ""))
    res = bwrapped.run(src)
    assert "started" in res.stdout and res.status == ("passed" if program_end == "exit" else "timeout"), res
    assert _processes_with(marker) == []  # gone when run() returns


def test_bwrap_limits_the_process_count(bwrapped):
    src = ("import os, time\nn = 0\ntry:\n    for _ in range(150):\n        if os.fork() == 0:\n"
           "            time.sleep(10)\n            os._exit(0)\n        n += 1\nexcept OSError as exc:\n"
           "    print('BLOCKED', n, exc)\nelse:\n    print('ESCAPED', n)\n")
    res = bwrapped.run(src)
    words = res.stdout.split()
    assert res.passed and words[0] == "BLOCKED" and int(words[1]) < bwrapped.max_processes, res


def test_bwrap_cannot_see_or_signal_the_evaluator(bwrapped):
    me = os.getpid()
    res = bwrapped.run(_attempt(f"import os\nprint(os.getppid(), os.getuid(), os.getgid(), flush=True)\n"
                                f"os.kill({me}, 0)"))
    first, second = res.stdout.splitlines()
    assert first.split() == ["1", "65534", "65534"]  # the parent visible is the sandbox's init, not the evaluator
    assert second.startswith("BLOCKED ProcessLookupError"), res
    env = bwrapped.run("import os\nprint(sorted(os.environ))\n")
    assert set(eval(env.stdout)) == {"PATH", "HOME", "TMPDIR", "PWD", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED",
                                     "PYTHONIOENCODING", "LANG", "OMP_NUM_THREADS"}, env.stdout  # nothing of ours


def test_truncate_and_extract_code():
    gen = "    return x + 1\n\ndef other():\n    pass\n"
    assert truncate_at_stops(gen, HUMANEVAL_STOPS) == "    return x + 1\n"
    assert truncate_at_stops("    return 1\n# comment\n", HUMANEVAL_STOPS) == "    return 1"
    chat = "Sure!\n```python\ndef f(x):\n    return x\n```\nAnd a test:\n```python\nprint(f(1))\n```"
    assert extract_code(chat, entry_point="f") == "def f(x):\n    return x\n"
    two = "```\nimport os\n```\n```python\ndef g():\n    return 2\n```"
    assert extract_code(two, entry_point="g") == "def g():\n    return 2\n"
    assert extract_code("```python\ndef h():\n    return 3") == "def h():\n    return 3"  # unterminated fence
    assert extract_code("def k():\n    return 1\n[DONE] junk", ["[DONE]"]) == "def k():\n    return 1\n"


HE = {"task_id": "t/0", "prompt": "import math\n\ndef sq(x):\n    \"\"\"Square.\"\"\"\n", "entry_point": "sq",
      "canonical_solution": "    return x * x\n", "test": "def check(candidate):\n    assert candidate(3) == 9\n"}


def test_humaneval_program_completion_and_chat(sandbox):
    assert sandbox.run(humaneval_program(HE, HE["canonical_solution"])).passed
    assert not sandbox.run(humaneval_program(HE, "    return x + x\n")).passed
    assert sandbox.run(humaneval_program(HE, "\n    return x * x\n", prompt_stripped=True)).passed
    chat_code = extract_code("```python\ndef sq(x):\n    return math.pow(x, 2)\n```", entry_point="sq")
    assert sandbox.run(humaneval_program(HE, chat_code, chat=True)).passed  # imports from the prompt kept


def test_mbpp_prompt_and_program(sandbox):
    shot = {"task_id": 2, "text": "Add.", "code": "def add(a,b):\r\n    return a+b", "test_list": ["assert add(1,2)==3"]}
    prob = {"task_id": 11, "text": "Mul.", "code": "def mul(a,b):\n    return a*b", "test_list": ["assert mul(2,3)==6"],
            "test_setup_code": ""}
    prompt = mbpp_prompt(prob, [shot])
    assert prompt.count("[BEGIN]") == 2 and prompt.count("[DONE]") == 1 and prompt.endswith("[BEGIN]\n")
    assert "\r" not in prompt and "assert mul(2,3)==6" in prompt
    assert sandbox.run(mbpp_program(prob, prob["code"])).passed
    assert not sandbox.run(mbpp_program(prob, "def mul(a,b):\n    return a+b")).passed


def test_canonical_solutions_pass_on_real_data(shared_data, sandbox):
    he = load_humaneval(shared_data / "eval" / "humaneval.jsonl", limit=3, seed=0)
    mb, shots = load_mbpp(shared_data / "eval" / "mbpp.jsonl", limit=3, seed=0)
    assert [s["task_id"] for s in shots] == [2, 3, 4] and all(11 <= p["task_id"] <= 510 for p in mb)
    sources = [humaneval_program(p, p["canonical_solution"]) for p in he] + [mbpp_program(p, p["code"]) for p in mb]
    assert all(r.passed for r in sandbox.run_many(sources, workers=2))


def test_evaluate_code_end_to_end(tiny_llama, char_tokenizer, tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "humaneval.jsonl").write_text(json.dumps(HE) + "\n")
    mbpp = [{"task_id": i, "text": f"T{i}", "code": "def f():\n    return 1", "test_list": ["assert f() == 1"]}
            for i in (2, 3, 4, 11, 12)]
    (ev / "mbpp.jsonl").write_text("\n".join(json.dumps(r) for r in mbpp) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxIsolationWarning)
        run = evaluate_code(tiny_llama, char_tokenizer, data_dir=tmp_path, max_new_tokens=4, timeout_s=3)
    assert run.tasks["humaneval"].n == 1 and run.tasks["mbpp"].n == 2
    assert run.tasks["humaneval"].metrics["pass@1"] == 0.0  # 4 random characters never solve it
    assert sum(run.tasks["mbpp"].extra["status_counts"].values()) == 2
    assert run.config["isolation"] in ("bwrap", "subprocess")


# ------------------------------------------------------------------------------------------------------- sessions

def test_session_exchanges_json_lines(sandbox):
    echo = ("import json, sys\nfor line in sys.stdin:\n    message = json.loads(line)\n"
            "    print(json.dumps({'echo': message}), flush=True)\n    print('log', file=sys.stderr)\n")
    with sandbox.session(echo) as session:
        for message in ({"a": [1, 2.5, None]}, {"b": "é\n"}):
            assert session.send(message) and session.receive() == {"echo": message}
        result = session.finish()
    assert result.status == "passed" and result.returncode == 0 and result.stdout == "" and "log" in result.stderr
    assert not result.reached_end and result.isolation == sandbox.isolation
    assert not session.send({"late": True}) and session.receive() is None and session.problem


@pytest.mark.parametrize("program,problem", [
    ("print('[1, 2]')", "not a JSON object"), ("print('{bad')", "not JSON"), ("print('1' * 5000)", "not a JSON object"),
    ("import sys\nsys.stdout.write('x' * 100000)\nsys.stdout.flush()\nimport time\ntime.sleep(60)\n", "over 4096 bytes"),
    ("import time\ntime.sleep(60)\n", "within the time limit"), ("print('{\"half\": ', end='')", "closed its output"),
])
def test_session_refuses_anything_but_json_object_lines(program, problem):
    box = _quiet_sandbox(timeout_s=2.0, memory_mb=512, max_output_bytes=4096)
    with box.session(program) as session:
        assert session.receive() is None and problem in session.problem, session.problem
        assert session.receive() is None and not session.send({"x": 1})  # the channel stays closed


def test_session_send_gives_up_on_a_program_that_does_not_read():
    box = _quiet_sandbox(timeout_s=2.0, memory_mb=512)
    with box.session("import time\ntime.sleep(60)\n") as session:
        assert not session.send({"blob": "x" * 1_000_000}) and "did not read" in session.problem
    with box.session("pass") as session:
        assert not session.send({"blob": "x" * 1_000_000}) and "stopped reading" in session.problem
