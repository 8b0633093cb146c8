"""HumanEval and MBPP pass@1 (greedy); the generated programs run in :mod:`modlora.evaluation.sandbox`.

Prompts:

* HumanEval: the problem's ``prompt`` with trailing whitespace stripped (as bigcode-evaluation-harness does: a
  prompt ending in "\\n" splits the newline + indent token) in completion mode; the generation is cut at the first
  of the standard stop sequences ``"\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint(", "\\n#"``; the
  graded program is ``prompt.rstrip() + completion`` and the tests ``check(<entry_point>)``.
* MBPP: the 3-shot prompt of Austin et al. (2021) as used by bigcode-evaluation-harness / DeepSeek-Coder: shots are
  task_ids 2, 3, 4 (from the prompt split 1-10), each ``"You are an expert Python programmer, and here is your task:
  {text} Your code should pass these tests:\\n\\n{tests}\\n[BEGIN]\\n{code}\\n[DONE]\\n"``, then the problem with
  ``[BEGIN]\\n`` as cue; generation stops at ``[DONE]``. ``mbpp_shots=0`` gives the zero-shot version (same
  header, no shots). The graded program is the code; the tests are ``test_setup_code`` + the ``test_list`` asserts.
  The test split is task_id 11-510.

With ``chat=True`` the prompt goes through the chat template and the code is taken from the first fenced code block
(```` ```python ... ``` ````) of the answer, falling back to the raw answer cut at the stop sequences.

pass@1 with greedy decoding is the fraction of problems whose program passes :func:`grade_program`: the program
runs in one :class:`~modlora.evaluation.sandbox.Sandbox` (bubblewrap namespaces where available) and only answers
calls, with plain data (:func:`encode_plain`); the benchmark's own tests run in a second sandbox, the judge, with
the program's functions replaced by stubs that relay each call's arguments through the evaluator. The verdict is
the judge's: the tests' asserts hold on the program's answers. No expected value, comparison or assert reaches the
graded program, so nothing it prints, skips, re-executes or returns other than a right answer can pass a test
(EvalPlus likewise compares outputs outside the candidate's reach; here the benchmark's own check code does the
comparing, so tolerances, loops and helper functions in the tests keep their meaning).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modlora.data import default_data_dir
from modlora.errors import DataError, SandboxUnavailableError
from modlora.evaluation.generation import greedy_generate
from modlora.evaluation.results import EvalRun, TaskScores, recording_routing, routing_telemetry, seeded_subset
from modlora.evaluation.sandbox import Sandbox, SandboxSession
from modlora.io import parse_json, read_regular_file

HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
MBPP_STOPS = ("[DONE]",)
MBPP_SHOT_IDS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)


# --------------------------------------------------------------------------------------------------- code extraction

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def truncate_at_stops(text: str, stops: Iterable[str]) -> str:
    """``text`` up to the earliest occurrence of any stop sequence."""
    cut = len(text)
    for stop in stops:
        pos = text.find(stop)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def extract_code(generation: str, stops: Iterable[str] = (), entry_point: str | None = None) -> str:
    """Code from a model answer: a fenced block if there is one, else the text cut at ``stops``.

    Among several fenced blocks, the first python (or untagged) one defining ``entry_point`` wins, else the first
    python/untagged block, else the first block. An unterminated final fence counts as a block.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(generation)]
    if blocks:
        python_like = [b for lang, b in blocks if lang in ("", "python", "py", "python3")]
        if entry_point is not None:
            for body in python_like:
                if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", body):
                    return body
        return (python_like or [blocks[0][1]])[0]
    return truncate_at_stops(generation, stops)


# ---------------------------------------------------------------------------------------------------------- problems

def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = [line for line in read_regular_file(path, follow_symlinks=True).decode().splitlines() if line.strip()]
    except FileNotFoundError as exc:
        raise DataError(f"code benchmark file {str(path)!r} not found") from exc
    except OSError as exc:
        raise DataError(f"code benchmark file {str(path)!r}: cannot read it ({exc.strerror or exc})") from exc
    rows = []
    for i, line in enumerate(lines):
        try:
            row = parse_json(line)
        except ValueError as exc:
            raise DataError(f"{path}:{i + 1}: {exc}") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i + 1}: expected a JSON object")
        rows.append(row)
    return rows


def _require(row: dict[str, Any], fields: dict[str, type], where: str) -> None:
    for name, kind in fields.items():
        if not isinstance(row.get(name), kind):
            raise DataError(f"{where}: field {name!r} must be a {kind.__name__}")


def load_humaneval(path: str | os.PathLike[str], limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """HumanEval problems (upstream schema); ``limit`` keeps a fixed seeded subset."""
    rows = _read_jsonl(Path(path))
    for row in rows:
        _require(row, {"task_id": str, "prompt": str, "entry_point": str, "test": str}, f"{path} {row.get('task_id')}")
    return [rows[i] for i in seeded_subset(len(rows), limit, seed)]


def load_mbpp(path: str | os.PathLike[str], limit: int | None = None, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """MBPP test problems (task_id 11-510, a fixed seeded subset with ``limit``) and the 3 few-shot problems."""
    rows = _read_jsonl(Path(path))
    for row in rows:
        _require(row, {"task_id": int, "text": str, "code": str, "test_list": list}, f"{path} task {row.get('task_id')}")
    by_id = {row["task_id"]: row for row in rows}
    missing = [i for i in MBPP_SHOT_IDS if i not in by_id]
    if missing:
        raise DataError(f"{path}: few-shot MBPP task_ids {missing} missing")
    test = [by_id[i] for i in MBPP_TEST_IDS if i in by_id]
    if not test:
        raise DataError(f"{path}: no MBPP test problems (task_id 11-510)")
    return [test[i] for i in seeded_subset(len(test), limit, seed)], [by_id[i] for i in MBPP_SHOT_IDS]


def _mbpp_block(problem: dict[str, Any]) -> str:
    tests = "\n".join(problem["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {problem['text']} "
            f"Your code should pass these tests:\n\n{tests}\n")


def mbpp_prompt(problem: dict[str, Any], shots: Sequence[dict[str, Any]] = ()) -> str:
    """The MBPP prompt: ``shots`` as solved examples (``[BEGIN] code [DONE]``), then the problem and ``[BEGIN]``."""
    parts = [f"{_mbpp_block(s)}[BEGIN]\n{s['code'].replace(chr(13), '')}\n[DONE]\n" for s in shots]
    return "".join(parts) + f"{_mbpp_block(problem)}[BEGIN]\n"


def humaneval_candidate(problem: dict[str, Any], code: str, chat: bool = False, prompt_stripped: bool = False) -> str:
    """The graded program: prompt + completion, or the chat answer's code (with the prompt's imports) if it defines
    the entry point.

    ``prompt_stripped``: the completion continues ``prompt.rstrip()`` (how :func:`evaluate_code` prompts).
    """
    entry = problem["entry_point"]
    if chat and re.search(rf"\bdef\s+{re.escape(entry)}\s*\(", code):
        header = "\n".join(line for line in problem["prompt"].splitlines() if line.startswith(("import ", "from ")))
        return f"{header}\n{code}"
    return (problem["prompt"].rstrip() if prompt_stripped else problem["prompt"]) + code


def humaneval_program(problem: dict[str, Any], code: str, chat: bool = False, prompt_stripped: bool = False) -> str:
    """The upstream single test program, :func:`humaneval_candidate` + test + ``check(entry_point)``, for reading
    or :meth:`Sandbox.run`; grading does not run it (see :func:`grade_program`)."""
    body = humaneval_candidate(problem, code, chat, prompt_stripped)
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_program(problem: dict[str, Any], code: str) -> str:
    """The upstream single test program, setup code + solution + the problem's asserts, for reading or
    :meth:`Sandbox.run`; grading does not run it (see :func:`grade_program`)."""
    setup = problem.get("test_setup_code") or ""
    return f"{setup}\n{code}\n\n" + "\n".join(problem["test_list"]) + "\n"


# ----------------------------------------------------------------------------------------------------------- grading

@dataclass(frozen=True)
class CodeTests:
    """A problem's tests as the judge runs them: ``context`` (trusted code run first: a HumanEval prompt, the
    standard modules MBPP asserts use), then ``test`` (the benchmark's test code) with each of ``candidate_names``
    (what the tests call of the graded program) bound to a stub that asks the graded program for its answer.
    ``problem``: why the tests cannot be graded ("" if they can)."""

    context: str
    test: str
    candidate_names: tuple[str, ...]
    problem: str = ""


def humaneval_tests(problem: dict[str, Any]) -> CodeTests:
    """The judge's view of a HumanEval problem: the prompt (its helpers, e.g. ``poly``, stay the benchmark's own),
    then ``check(entry_point)`` with the entry point (as ``candidate`` and by name) answered by the graded program."""
    entry = problem["entry_point"]
    return CodeTests(problem["prompt"], f"{problem['test']}\n\ncheck({entry})\n", (entry,))


def mbpp_tests(problem: dict[str, Any]) -> CodeTests:
    """The judge's view of an MBPP problem: setup code + asserts, where every name they call that the reference
    solution defines, or that is not a builtin, is answered by the graded program (a builtin such as ``set`` or
    ``sorted`` around its answer stays the judge's); free names that are standard modules (``math``) are imported.
    Any other free name (a value the graded program would define) makes the problem ungradable."""
    test = (problem.get("test_setup_code") or "") + "\n" + "\n".join(problem["test_list"]) + "\n"
    try:
        tree = ast.parse(test)
        reference = {node.name for node in ast.parse(problem["code"]).body
                     if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    except (SyntaxError, ValueError) as exc:
        return CodeTests("", test, (), f"the tests or the reference solution do not parse: {exc}")
    bound, loaded, called = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            bound.add(node.name)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            called.add(node.func.id)
    builtin = set(dir(builtins)) - reference
    candidate = sorted(called - bound - builtin)
    modules = sorted(name for name in loaded - bound - builtin - called if name in sys.stdlib_module_names)
    unknown = sorted(loaded - bound - builtin - called - set(modules))
    problem = f"the tests read {unknown} from the graded program; only calls to it can be graded" if unknown else ""
    return CodeTests("".join(f"import {name}\n" for name in modules), test, tuple(candidate), problem)


@dataclass(frozen=True)
class CodeGrade:
    """The verdict on one program.

    ``status``: "passed" (the benchmark's tests hold on the program's answers), "failed", "timeout", "memory",
    "ungradable" (the tests cannot be run against answers; never a pass) or "error" (the sandbox did not start).
    ``calls``: how many calls the program answered; ``detail``: why it did not pass (the failing assert, the
    program's error, the end of its stderr).
    """

    status: str
    calls: int
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def encode_plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-ready plain data, or TypeError if it is none.

    None, bool, int, float and str are themselves, a list a JSON list; a tuple, set, frozenset, dict or complex is
    a one-key object naming its type: ``{"tuple": [...]}``, ``{"set": [...]}``, ``{"frozenset": [...]}``,
    ``{"dict": [[key, value], ...]}``, ``{"complex": [real, imag]}``. A subclass of one of these (a namedtuple, a
    Counter, an IntEnum) is encoded as its base type, by value. Nesting is limited to 100 levels.

    Runs in the sandbox too (shipped as source, see ``_HARNESS_SOURCE``): it refers to nothing outside itself.
    """
    if depth > 100:
        raise TypeError("plain data nested deeper than 100 levels")
    if value is None or value is True or value is False:
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value) if type(value) is not kind else value
    if isinstance(value, complex):
        return {"complex": [float(value.real), float(value.imag)]}
    if isinstance(value, dict):
        return {"dict": [[encode_plain(k, depth + 1), encode_plain(v, depth + 1)] for k, v in dict.items(value)]}
    for kind, tag in ((list, ""), (tuple, "tuple"), (set, "set"), (frozenset, "frozenset")):
        if isinstance(value, kind):
            items = [encode_plain(item, depth + 1) for item in kind.__iter__(value)]
            return {tag: items} if tag else items
    raise TypeError(f"a {type(value).__name__} is not plain data")


def decode_plain(data: Any, depth: int = 0) -> Any:
    """The value :func:`encode_plain` encoded as ``data`` (parsed JSON), or ValueError if ``data`` is not such an
    encoding. Builds only builtin values. Runs in the sandbox too (see :func:`encode_plain`)."""
    if depth > 100:
        raise ValueError("plain data nested deeper than 100 levels")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode_plain(item, depth + 1) for item in data]
    if type(data) is dict and len(data) == 1:
        ((tag, items),) = data.items()
        if tag == "complex" and type(items) is list and len(items) == 2 and all(type(x) is float for x in items):
            return complex(*items)
        kind = {"tuple": tuple, "set": set, "frozenset": frozenset, "dict": dict}.get(tag)
        if kind is not None and type(items) is list:
            values = [decode_plain(item, depth + 1) for item in items]
            if kind is dict and not all(type(pair) is list and len(pair) == 2 for pair in values):
                raise ValueError("not plain data: a dict's items must be [key, value] pairs")
            try:
                return kind(values)
            except TypeError as exc:  # an unhashable set member or dict key
                raise ValueError(f"not plain data: {exc}") from None
    raise ValueError(f"not plain data: {str(data)[:80]}")


def _open_channel() -> tuple[Any, Any]:
    """Sandbox side: the message channel, the process's original stdin and stdout, as ``(incoming, outgoing)``
    files; the program's own stdin becomes /dev/null and its stdout its stderr."""
    import os

    incoming = os.fdopen(os.dup(0), "rb")
    outgoing = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    return incoming, outgoing


def _serve_candidate(source: str) -> None:
    """Sandbox side of the graded program: run ``source`` as ``__main__``, say "ready", then answer each call the
    evaluator asks for with the plain data it returns, or the exception it raises, until the channel closes.

    Nothing here is trusted: the program can rewrite or bypass all of it; it can only ever answer calls.
    """
    import json

    calls, answers = _open_channel()
    namespace = {"__name__": "__main__"}
    exec(compile(source, "solution.py", "exec"), namespace)

    def send(message: dict) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    send({"ready": True})
    for line in calls:
        call = json.loads(line)
        try:
            function = namespace[call["name"]]
            args = [decode_plain(arg) for arg in call["args"]]
            kwargs = {key: decode_plain(arg) for key, arg in call["kwargs"].items()}
            answer = {"call": call["call"], "value": encode_plain(function(*args, **kwargs))}
        except BaseException as exc:  # whatever the program does wrong is this call's answer
            answer = {"call": call["call"], "error": f"{type(exc).__name__}: {exc}"[:500]}
        send(answer)


def _judge(context: str, test: str, candidate_names: list[str]) -> None:
    """Sandbox side of the judge (no graded code runs here): run the benchmark's ``context`` and ``test`` with each
    of ``candidate_names`` a stub that sends its arguments to the evaluator and returns the graded program's answer
    (an answer that is not a value ends the grading before the judge hears of it); say "done" once the test code
    has run to its end, i.e. its asserts held."""
    import itertools
    import json
    import linecache
    import traceback

    answers, calls = _open_channel()
    numbers = itertools.count()

    def send(message: dict) -> None:
        calls.write(json.dumps(message) + "\n")
        calls.flush()

    def stub(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                message = {"call": next(numbers), "name": name, "args": [encode_plain(arg) for arg in args],
                           "kwargs": {key: encode_plain(arg) for key, arg in kwargs.items()}}
            except TypeError as exc:
                send({"ungradable": f"the tests call {name} with an argument that is not plain data: {exc}"})
                raise
            send(message)
            return decode_plain(json.loads(answers.readline())["value"])  # the evaluator sends values only

        call.__name__ = call.__qualname__ = name
        return call

    namespace: dict = {"__name__": "__main__"}
    try:
        for filename, code in (("<context>", context), ("<test>", test)):
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
            exec(compile(code, filename, "exec"), namespace)
            namespace.update({name: stub(name) for name in candidate_names})
    except BaseException:
        traceback.print_exc()  # with the failing assert's line, from linecache
        raise SystemExit(1) from None
    send({"done": True})


# What the sandboxed harnesses run, taken once from this module's source so that it matches the code loaded here.
_HARNESS_SOURCE = "from __future__ import annotations\n\n" + "\n\n".join(
    inspect.getsource(function) for function in (encode_plain, decode_plain, _open_channel, _serve_candidate, _judge))


def _harness_program(main: Callable[..., None], *args: Any) -> str:
    """A sandbox program: the plain-data codec, the channel and the harnesses, then ``main(*args)`` with ``args``
    written as literals."""
    return f"{_HARNESS_SOURCE}\n\nARGS = {args!r}\n{main.__name__}(*ARGS)\n"


def grade_program(sandbox: Sandbox, tests: CodeTests, source: str) -> CodeGrade:
    """Grade the program ``source`` on ``tests`` (see :class:`CodeTests`); the verdict is the judge's alone.

    Two sandboxes run at once: the graded program, which only ever receives the arguments of each call the tests
    make and answers with plain data (:func:`encode_plain`), and the judge, which runs the benchmark's own test code
    with the graded program's names replaced by stubs. The evaluator relays each call, checks every answer is plain
    data for the call asked (call numbers in order), and passes the program iff it loaded, answered every call
    with a value, and the judge ran the tests to their end (asserts included) and exited 0. Expected values,
    comparisons and asserts never enter the graded program's process: what it prints, how it exits, which flags it
    re-executes itself with, or which objects it returns can change its answers, never the judge's verdict.
    """
    if tests.problem:
        return CodeGrade("ungradable", 0, tests.problem)
    judge_program = _harness_program(_judge, tests.context, tests.test, list(tests.candidate_names))
    try:
        with sandbox.session(_harness_program(_serve_candidate, source)) as candidate, \
                sandbox.session(judge_program) as judge:
            return _relay(candidate, judge, tests.candidate_names)
    except SandboxUnavailableError as exc:
        return CodeGrade("error", 0, str(exc))


def _relay(candidate: SandboxSession, judge: SandboxSession, names: tuple[str, ...]) -> CodeGrade:
    """Pass the judge's calls to the graded program and its checked answers back, until the judge's verdict."""
    if candidate.receive() != {"ready": True}:
        return _stopped(candidate, 0, "the program did not load")
    calls = 0
    while (message := judge.receive()) is not None:
        if message == {"done": True}:
            ended = judge.finish()
            if ended.status != "passed":
                return CodeGrade("failed", calls, f"the judge ended badly: {ended.stderr[-500:]}")
            if calls == 0:
                return CodeGrade("ungradable", 0, "the tests never call the program")
            return CodeGrade("passed", calls, "")
        if set(message) == {"ungradable"}:
            return CodeGrade("ungradable", calls, str(message["ungradable"])[:500])
        if not _is_call(message, calls, names):
            return CodeGrade("ungradable", calls, f"the judge sent an unexpected message: {str(message)[:200]}")
        what = f"call {calls} ({message['name']})"
        if not candidate.send(message):
            return _stopped(candidate, calls, what)
        answer = candidate.receive()
        if answer is None:
            return _stopped(candidate, calls, what)
        if set(answer) == {"call", "error"} and answer["call"] == calls:
            error = str(answer["error"])[:500]
            return CodeGrade("memory" if error.startswith("MemoryError") else "failed", calls, f"{what}: {error}")
        if set(answer) != {"call", "value"} or answer["call"] != calls:
            return CodeGrade("failed", calls, f"{what}: the program's answer is out of turn: {str(answer)[:200]}")
        try:
            decode_plain(answer["value"])
        except ValueError as exc:
            return CodeGrade("failed", calls, f"{what}: the program's answer is not plain data ({exc})")
        if not judge.send({"call": calls, "value": answer["value"]}):
            break
        calls += 1
    ended = judge.finish(wait=False)
    status = ended.status if ended.status in ("timeout", "memory") else "failed"
    return CodeGrade(status, calls, f"the tests failed on the program's answers: {ended.stderr[-500:]}")


def _is_call(message: dict[str, Any], number: int, names: tuple[str, ...]) -> bool:
    """Whether the judge's ``message`` is call ``number`` to one of ``names`` with plain-data arguments."""
    if set(message) != {"call", "name", "args", "kwargs"} or message["call"] != number or message["name"] not in names:
        return False
    if type(message["args"]) is not list or type(message["kwargs"]) is not dict:
        return False
    try:
        for value in [*message["args"], *message["kwargs"].values()]:
            decode_plain(value)
    except ValueError:
        return False
    return True


def _stopped(candidate: SandboxSession, calls: int, what: str) -> CodeGrade:
    """The verdict on a graded program that stopped answering (crashed, exited, hung, wrote garbage)."""
    ended = candidate.finish(wait=False)
    status = ended.status if ended.status in ("timeout", "memory") else "failed"
    return CodeGrade(status, calls, f"{what}: {candidate.problem}; stderr: {ended.stderr[-400:]}")


def grade_many(sandbox: Sandbox, items: Sequence[tuple[CodeTests, str]], workers: int = 2) -> list[CodeGrade]:
    """:func:`grade_program` on each ``(tests, source)``, ``workers`` at a time, in input order."""
    if workers <= 1:
        return [grade_program(sandbox, tests, source) for tests, source in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda item: grade_program(sandbox, *item), items))


# -------------------------------------------------------------------------------------------------------- evaluation

def _chat_wrap(tokenizer: Any, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def generate_code(model: torch.nn.Module, tokenizer: Any, bench: str, root: Path, *, limit: int | None = None,
                  seed: int = 0, batch_size: int = 8, max_new_tokens: int = 384, chat: bool = False,
                  mbpp_shots: int = 3) -> tuple[list[dict[str, Any]], list[str]]:
    """The problems of ``bench`` (``humaneval`` or ``mbpp``, from ``root``) and the model's greedy generations."""
    if bench == "humaneval":
        problems = load_humaneval(root / "humaneval.jsonl", limit, seed)
        prompts = [p["prompt"].rstrip() for p in problems]  # as bigcode-evaluation-harness: no trailing "\n"
        if chat:
            prompts = [_chat_wrap(tokenizer, f"Complete the following Python function.\n```python\n{p}```")
                       for p in prompts]
        stops: tuple[str, ...] = () if chat else HUMANEVAL_STOPS
    elif bench == "mbpp":
        problems, shots = load_mbpp(root / "mbpp.jsonl", limit, seed)
        prompts = [mbpp_prompt(p, shots[:mbpp_shots]) for p in problems]
        if chat:
            prompts = [_chat_wrap(tokenizer, p.removesuffix("[BEGIN]\n")) for p in prompts]
        stops = () if chat else MBPP_STOPS
    else:
        raise DataError(f"unknown code benchmark {bench!r}; known: humaneval, mbpp")
    gens = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           stop_strings=stops, max_prompt_tokens=None)
    return problems, gens


def code_items(bench: str, problems: Sequence[dict[str, Any]], gens: Sequence[str],
               chat: bool = False) -> list[tuple[CodeTests, str]]:
    """What :func:`grade_many` grades for each generation: the benchmark's tests and the candidate's source."""
    if bench == "humaneval":
        codes = [extract_code(g, HUMANEVAL_STOPS, p["entry_point"]) if chat
                 else truncate_at_stops(g, HUMANEVAL_STOPS) for p, g in zip(problems, gens, strict=True)]
        return [(humaneval_tests(p), humaneval_candidate(p, code, chat, prompt_stripped=True))
                for p, code in zip(problems, codes, strict=True)]
    return [(mbpp_tests(p), extract_code(g, MBPP_STOPS)) for p, g in zip(problems, gens, strict=True)]


def evaluate_code(model: torch.nn.Module, tokenizer: Any, benchmarks: Iterable[str] = ("humaneval", "mbpp"), *,
                  data_dir: str | os.PathLike[str] | None = None, limit: int | None = None, seed: int = 0,
                  batch_size: int = 8, max_new_tokens: int = 384, chat: bool = False, mbpp_shots: int = 3,
                  timeout_s: float = 10.0, memory_mb: int = 1024, workers: int = 2, method: str = "base",
                  model_name: str = "?", on_task_done: Callable[[str, TaskScores], None] | None = None) -> EvalRun:
    """Greedy pass@1 on HumanEval and/or MBPP from ``<data_dir>/eval``.

    Per benchmark: ``pass@1`` (mean ± stderr), ``extra["status_counts"]`` (passed / failed / timeout / memory /
    ungradable / error, see :class:`CodeGrade`) and ``extra["samples"]``: the first 3 problems' raw generation,
    status and the end of the grade's detail.
    """
    root = default_data_dir(data_dir) / "eval"
    if mbpp_shots not in (0, 3):
        raise DataError(f"option 'mbpp_shots' must be 0 or 3, got {mbpp_shots!r}")
    sandbox = Sandbox(timeout_s=timeout_s, memory_mb=memory_mb)
    run = EvalRun(method=method, model=model_name,
                  config={"kind": "code", "limit": limit, "seed": seed, "batch_size": batch_size,
                          "max_new_tokens": max_new_tokens, "chat": chat, "mbpp_shots": mbpp_shots,
                          "timeout_s": timeout_s, "memory_mb": memory_mb, "isolation": sandbox.isolation,
                          "network_isolation": sandbox.network_isolation, "data_dir": str(root.parent)})
    t0 = time.perf_counter()
    run.routing = routing_telemetry(model)
    for bench in benchmarks:
        t_task = time.perf_counter()
        with recording_routing(model, run.routing, bench):
            problems, gens = generate_code(model, tokenizer, bench, root, limit=limit, seed=seed,
                                           batch_size=batch_size, max_new_tokens=max_new_tokens, chat=chat,
                                           mbpp_shots=mbpp_shots)
        items = code_items(bench, problems, gens, chat)
        results = grade_many(sandbox, items, workers=workers)
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        samples = [{"task_id": p["task_id"], "generation": g, "status": r.status, "detail": r.detail[-300:]}
                   for p, g, r in zip(problems[:3], gens[:3], results[:3], strict=False)]
        run.tasks[bench] = TaskScores.from_per_example({"pass@1": [float(r.passed) for r in results]},
                                                       wall_s=time.perf_counter() - t_task,
                                                       extra={"status_counts": counts, "samples": samples})
        run.wall_s = time.perf_counter() - t0
        if on_task_done is not None:
            on_task_done(bench, run.tasks[bench])
    return run
