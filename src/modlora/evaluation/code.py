"""HumanEval and MBPP pass@1 (greedy); the generated programs run in :mod:`modlora.evaluation.sandbox`.

Prompts:

* HumanEval: the problem's ``prompt`` with trailing whitespace stripped (as bigcode-evaluation-harness does: a
  prompt ending in "\\n" splits the newline + indent token) in completion mode; the generation is cut at the first
  of the standard stop sequences ``"\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint(", "\\n#"`` and the
  program is ``prompt.rstrip() + completion + test + "check(<entry_point>)"``.
* MBPP: the 3-shot prompt of Austin et al. (2021) as used by bigcode-evaluation-harness / DeepSeek-Coder: shots are
  task_ids 2, 3, 4 (from the prompt split 1-10), each ``"You are an expert Python programmer, and here is your task:
  {text} Your code should pass these tests:\\n\\n{tests}\\n[BEGIN]\\n{code}\\n[DONE]\\n"``, then the problem with
  ``[BEGIN]\\n`` as cue; generation stops at ``[DONE]``. ``mbpp_shots=0`` gives the zero-shot version (same
  header, no shots). The program is ``test_setup_code + code + test_list`` asserts. The test split is task_id 11-510.

With ``chat=True`` the prompt goes through the chat template and the code is taken from the first fenced code block
(```` ```python ... ``` ````) of the answer, falling back to the raw answer cut at the stop sequences.

pass@1 with greedy decoding is the fraction of problems whose program, run in the
:class:`~modlora.evaluation.sandbox.Sandbox` (bubblewrap namespaces where available), runs to its last line (a
per-run random token printed after the last assert is seen) and exits with status 0.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from modlora.data import default_data_dir
from modlora.errors import DataError
from modlora.evaluation.generation import greedy_generate
from modlora.evaluation.results import EvalRun, TaskScores, recording_routing, routing_telemetry, seeded_subset
from modlora.evaluation.sandbox import Sandbox
from modlora.io import parse_json

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
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError as exc:
        raise DataError(f"code benchmark file {str(path)!r} not found") from exc
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


def humaneval_program(problem: dict[str, Any], code: str, chat: bool = False, prompt_stripped: bool = False) -> str:
    """Test program: prompt + completion (or the chat answer's code if it defines the entry point) + tests.

    ``prompt_stripped``: the completion continues ``prompt.rstrip()`` (how :func:`evaluate_code` prompts).
    """
    entry = problem["entry_point"]
    if chat and re.search(rf"\bdef\s+{re.escape(entry)}\s*\(", code):
        header = "\n".join(line for line in problem["prompt"].splitlines() if line.startswith(("import ", "from ")))
        body = f"{header}\n{code}"
    else:
        body = (problem["prompt"].rstrip() if prompt_stripped else problem["prompt"]) + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def mbpp_program(problem: dict[str, Any], code: str) -> str:
    """Test program: setup code + solution + the problem's asserts."""
    setup = problem.get("test_setup_code") or ""
    return f"{setup}\n{code}\n\n" + "\n".join(problem["test_list"]) + "\n"


# -------------------------------------------------------------------------------------------------------- evaluation

def _chat_wrap(tokenizer: Any, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def evaluate_code(model: torch.nn.Module, tokenizer: Any, benchmarks: Iterable[str] = ("humaneval", "mbpp"), *,
                  data_dir: str | os.PathLike[str] | None = None, limit: int | None = None, seed: int = 0,
                  batch_size: int = 8, max_new_tokens: int = 384, chat: bool = False, mbpp_shots: int = 3,
                  timeout_s: float = 10.0, memory_mb: int = 1024, workers: int = 2, method: str = "base",
                  model_name: str = "?", on_task_done: Callable[[str, TaskScores], None] | None = None) -> EvalRun:
    """Greedy pass@1 on HumanEval and/or MBPP from ``<data_dir>/eval``.

    Per benchmark: ``pass@1`` (mean ± stderr), ``extra["status_counts"]`` (passed / failed / timeout / memory) and
    ``extra["samples"]``: the first 3 problems' raw generation, status and stderr tail.
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
        with recording_routing(model, run.routing, bench):
            gens = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   stop_strings=stops, max_prompt_tokens=None)
        if bench == "humaneval":
            sources = [humaneval_program(p, extract_code(g, HUMANEVAL_STOPS, p["entry_point"]) if chat
                                         else truncate_at_stops(g, HUMANEVAL_STOPS), chat, prompt_stripped=True)
                       for p, g in zip(problems, gens, strict=True)]
        else:
            sources = [mbpp_program(p, extract_code(g, MBPP_STOPS)) for p, g in zip(problems, gens, strict=True)]
        results = sandbox.run_many(sources, workers=workers)
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        samples = [{"task_id": p["task_id"], "generation": g, "status": r.status, "stderr_tail": r.stderr[-300:]}
                   for p, g, r in zip(problems[:3], gens[:3], results[:3], strict=False)]
        run.tasks[bench] = TaskScores.from_per_example({"pass@1": [float(r.passed) for r in results]},
                                                       wall_s=time.perf_counter() - t_task,
                                                       extra={"status_counts": counts, "samples": samples})
        run.wall_s = time.perf_counter() - t0
        if on_task_done is not None:
            on_task_done(bench, run.tasks[bench])
    return run
