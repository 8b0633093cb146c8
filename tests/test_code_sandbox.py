"""The code sandbox and HumanEval / MBPP program building."""

from __future__ import annotations

import json
import time

import pytest

from modlora.evaluation.code import (
    HUMANEVAL_STOPS,
    Sandbox,
    evaluate_code,
    extract_code,
    humaneval_program,
    load_humaneval,
    load_mbpp,
    mbpp_program,
    mbpp_prompt,
    run_program,
    truncate_at_stops,
)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(timeout_s=3.0, memory_mb=512)


def test_correct_solution_passes_and_wrong_fails(sandbox):
    ok = sandbox.run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('fine')\n")
    assert ok.passed and ok.status == "passed" and ok.returncode == 0 and ok.stdout.strip() == "fine"
    bad = sandbox.run("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr
    syntax = sandbox.run("def broken(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_infinite_loop_is_killed(sandbox):
    t0 = time.perf_counter()
    res = sandbox.run("while True:\n    pass\n")
    assert res.status == "timeout" and not res.passed
    assert time.perf_counter() - t0 < 30  # bounded (generous under a loaded CI machine)


def test_sleeping_children_are_killed_with_the_group(tmp_path):
    marker = tmp_path / "child_alive"
    child = f"import time; time.sleep(4); open({str(marker)!r}, 'w')"
    src = (f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\n"
           "print('started', flush=True)\ntime.sleep(60)\n")
    res = Sandbox(timeout_s=2.5, use_netns=False).run(src)
    assert res.status == "timeout" and "started" in res.stdout
    time.sleep(4.5)
    assert not marker.exists()


def test_memory_bomb_is_a_failure(sandbox):
    res = sandbox.run("x = bytearray(4 * 1024 ** 3)\n")
    assert res.status == "memory" and not res.passed
    res = sandbox.run("xs = []\nwhile True:\n    xs.append(' ' * 10 ** 7)\n")
    assert res.status in ("memory", "timeout") and not res.passed


def test_output_is_capped():
    res = run_program("import sys\nsys.stdout.write('x' * 200000)\n", timeout_s=5, max_output_bytes=1000)
    assert res.passed and len(res.stdout) < 1100 and res.stdout.endswith("[output truncated]")


def test_network_is_blocked(sandbox):
    src = ("import socket\n"
           "try:\n"
           "    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
           "except OSError:\n"
           "    raise SystemExit(0)\n"
           "raise SystemExit(1)\n")
    assert sandbox.run(src).passed
    shim_only = Sandbox(timeout_s=3.0, use_netns=False)
    assert shim_only.network_isolation.startswith("socket-shim")
    src2 = "import socket\ntry:\n    socket.socket()\nexcept OSError:\n    raise SystemExit(0)\nraise SystemExit(1)\n"
    assert shim_only.run(src2).passed
    assert shim_only.run("import asyncio, ssl, socket\ns = socket.socketpair()\n").passed  # stdlib still imports


def test_run_many_keeps_order(sandbox):
    res = sandbox.run_many([f"raise SystemExit({i % 2})" for i in range(4)], workers=2)
    assert [r.passed for r in res] == [True, False, True, False]


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
    run = evaluate_code(tiny_llama, char_tokenizer, data_dir=tmp_path, max_new_tokens=4, timeout_s=3)
    assert run.tasks["humaneval"].n == 1 and run.tasks["mbpp"].n == 2
    assert run.tasks["humaneval"].metrics["pass@1"] == 0.0  # 4 random characters never solve it
    assert sum(run.tasks["mbpp"].extra["status_counts"].values()) == 2
