"""Every canonical HumanEval / MBPP solution through the code grader: how many pass (they all should, except MBPP
task 367, whose reference solution defines ``Node`` after the setup code that needs it).

Each solution goes through :func:`modlora.evaluation.code.grade_program` exactly as a generated one would: the
solution answers calls in one sandbox, the benchmark's tests run in the judge's. Writes ``<out>.json`` and
``<out>.md`` (the counts, the isolation used and every solution that did not pass, with why)::

    nice -n 10 python benchmarks/canonical_code_pass.py --out benchmarks/results/canonical_code_pass
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from modlora.data import default_data_dir
from modlora.errors import ModloraError
from modlora.evaluation.code import (
    grade_many,
    humaneval_candidate,
    humaneval_tests,
    load_humaneval,
    load_mbpp,
    mbpp_tests,
)
from modlora.evaluation.sandbox import Sandbox
from modlora.io import atomic_write_bytes, atomic_write_json


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="data root holding eval/ (default: $MODLORA_DATA or ../shared/data)")
    ap.add_argument("--workers", type=int, default=2, help="problems graded at once (each runs two sandboxes)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per problem")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/canonical_code_pass"))
    args = ap.parse_args(argv)
    try:
        root = default_data_dir(args.data) / "eval"
        humaneval = load_humaneval(root / "humaneval.jsonl")
        mbpp, _ = load_mbpp(root / "mbpp.jsonl")
    except ModloraError as err:
        ap.error(str(err))
    sandbox = Sandbox(timeout_s=args.timeout)
    benchmarks = {
        "humaneval": [(str(p["task_id"]), humaneval_tests(p), humaneval_candidate(p, p["canonical_solution"]))
                      for p in humaneval],
        "mbpp": [(str(p["task_id"]), mbpp_tests(p), p["code"]) for p in mbpp],
    }
    report = {"isolation": sandbox.isolation, "timeout_s": args.timeout, "benchmarks": {}}
    for name, problems in benchmarks.items():
        t0 = time.perf_counter()
        grades = grade_many(sandbox, [(tests, code) for _, tests, code in problems], workers=args.workers)
        not_passed = [{"task_id": task_id, "status": g.status, "detail": g.detail[-300:]}
                      for (task_id, _, _), g in zip(problems, grades, strict=True) if not g.passed]
        report["benchmarks"][name] = {"problems": len(problems), "passed": len(problems) - len(not_passed),
                                      "calls": sum(g.calls for g in grades),
                                      "wall_s": round(time.perf_counter() - t0, 1), "not_passed": not_passed}
        print(f"{name}: {len(problems) - len(not_passed)}/{len(problems)} canonical solutions pass")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), report)
    atomic_write_bytes(args.out.with_suffix(".md"), _markdown(report).encode())
    print(json.dumps({n: f"{b['passed']}/{b['problems']}" for n, b in report["benchmarks"].items()}))


def _markdown(report: dict) -> str:
    lines = [f"# Canonical solutions through the code grader (isolation: {report['isolation']}, "
             f"{report['timeout_s']:g} s per problem)", "", "| benchmark | pass | problems | calls answered | wall s |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {b['passed']} | {b['problems']} | {b['calls']} | {b['wall_s']} |"
              for name, b in report["benchmarks"].items()]
    failures = [(name, f) for name, b in report["benchmarks"].items() for f in b["not_passed"]]
    if failures:
        lines += ["", "Not passed:", ""]
        lines += [f"* {name} {f['task_id']}: {f['status']}: `{f['detail'].splitlines()[-1] if f['detail'] else ''}`"
                  for name, f in failures]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
