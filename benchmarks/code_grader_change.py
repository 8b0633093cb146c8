"""The base model's HumanEval / MBPP pass@1 under the current grader and under the grader before issue 25, on the
same generations, problem by problem.

The grader before issue 25 ran ``program + tests`` in one sandbox and took a per-run token printed after the last
line as the pass (a program could forge it). This script generates the base model's greedy completions once
(exactly as ``modlora eval --suite code`` does), grades them with :func:`modlora.evaluation.code.grade_many`, and
grades the same completions with the old grader, imported from a checkout of the commit before the change in a
subprocess (its package would shadow this one)::

    git worktree add /tmp/grader-old cc9019b
    nice -n 10 python benchmarks/code_grader_change.py --old-tree /tmp/grader-old --threads 1 \\
        --dtype bfloat16 --out benchmarks/results/code_grader_change

Writes ``<out>.json`` (per problem: both verdicts, the new grade's status and detail) and ``<out>.md`` (the counts,
the paired difference and every problem whose verdict changed, with why).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from modlora.data import default_data_dir
from modlora.errors import ModloraError
from modlora.evaluation.code import code_items, generate_code, grade_many
from modlora.evaluation.results import mean_and_stderr
from modlora.evaluation.sandbox import Sandbox
from modlora.io import atomic_write_bytes, atomic_write_json
from modlora.models import DEFAULT_MODEL, load_base_model

# Run by the old tree's interpreter path: the programs the old evaluate_code built, graded by its Sandbox.run_many.
OLD_GRADER = """
import json, sys
from modlora.evaluation.code import HUMANEVAL_STOPS, MBPP_STOPS, extract_code, humaneval_program, mbpp_program
from modlora.evaluation.code import truncate_at_stops
from modlora.evaluation.sandbox import Sandbox
job = json.load(sys.stdin)
sources = []
for bench, problem, gen in job["items"]:
    if bench == "humaneval":
        sources.append(humaneval_program(problem, truncate_at_stops(gen, HUMANEVAL_STOPS), False, prompt_stripped=True))
    else:
        sources.append(mbpp_program(problem, extract_code(gen, MBPP_STOPS)))
results = Sandbox(timeout_s=job["timeout_s"]).run_many(sources, workers=job["workers"])
json.dump([[r.passed, r.status] for r in results], sys.stdout)
"""


def old_verdicts(old_tree: Path, items: list[tuple[str, dict, str]], timeout_s: float,
                 workers: int) -> list[tuple[bool, str]]:
    """(passed, status) of each ``(bench, problem, generation)`` under the old tree's grader."""
    env = {**os.environ, "PYTHONPATH": str(old_tree / "src")}
    job = json.dumps({"items": items, "timeout_s": timeout_s, "workers": workers})
    out = subprocess.run([sys.executable, "-c", OLD_GRADER], input=job, capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise ModloraError(f"the old grader in {old_tree} failed: {out.stderr.strip().splitlines()[-1:]}")
    return [(bool(p), str(s)) for p, s in json.loads(out.stdout)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-tree", type=Path, required=True, help="checkout of the commit with the old grader")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model (default: the embedded SmolLM2)")
    ap.add_argument("--data", default=None, help="data root holding eval/ (default: $MODLORA_DATA or ../shared/data)")
    ap.add_argument("--limit", type=int, default=None, help="problems per benchmark, seeded subset (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=384, help="as modlora eval --suite code (384)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="auto", help="model dtype (auto: float32 on CPU; bfloat16 is faster)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--workers", type=int, default=2, help="problems graded at once")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per problem")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/code_grader_change"))
    args = ap.parse_args(argv)
    if not (args.old_tree / "src" / "modlora" / "evaluation" / "code.py").is_file():
        ap.error(f"--old-tree {args.old_tree}: no src/modlora/evaluation/code.py there")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = default_data_dir(args.data) / "eval"
    lm = load_base_model(args.model, dtype=args.dtype)
    model, tokenizer = lm.model, lm.tokenizer
    sandbox = Sandbox(timeout_s=args.timeout)
    report: dict = {"model": args.model, "dtype": args.dtype, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                    "isolation": sandbox.isolation, "timeout_s": args.timeout, "benchmarks": {}}
    for bench in ("humaneval", "mbpp"):
        t0 = time.perf_counter()
        problems, gens = generate_code(model, tokenizer, bench, root, limit=args.limit,
                                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        t_gen = time.perf_counter() - t0
        new = grade_many(sandbox, code_items(bench, problems, gens), workers=args.workers)
        old = old_verdicts(args.old_tree, [(bench, p, g) for p, g in zip(problems, gens, strict=True)],
                           args.timeout, args.workers)
        rows = [{"task_id": str(p["task_id"]), "new": g.passed, "new_status": g.status, "old": o[0],
                 "old_status": o[1], "detail": g.detail[-300:], "generation": gen}
                for p, gen, g, o in zip(problems, gens, new, old, strict=True)]
        diff = mean_and_stderr([float(r["new"]) - float(r["old"]) for r in rows])
        report["benchmarks"][bench] = {"problems": len(rows), "new_passed": sum(r["new"] for r in rows),
                                       "old_passed": sum(r["old"] for r in rows), "new_minus_old": diff,
                                       "generation_s": round(t_gen, 1), "rows": rows}
        b = report["benchmarks"][bench]
        print(f"{bench}: new {b['new_passed']}/{len(rows)}, old {b['old_passed']}/{len(rows)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), report)
    atomic_write_bytes(args.out.with_suffix(".md"), _markdown(report).encode())


def _markdown(report: dict) -> str:
    lines = [f"# Base-model pass@1 under the current grader and the grader before issue 25 ({report['model']}, "
             f"{report['dtype']}, greedy, {report['max_new_tokens']} new tokens, isolation {report['isolation']})", "",
             "Same generations graded twice (`python benchmarks/code_grader_change.py --old-tree DIR`; see the "
             "script's docstring).", "",
             "| benchmark | problems | pass (current) | pass (before) | current − before (± s.e.) |",
             "|---|---:|---:|---:|---:|"]
    for name, b in report["benchmarks"].items():
        n = b["problems"]
        mean, se = b["new_minus_old"]
        lines.append(f"| {name} | {n} | {b['new_passed']} ({b['new_passed'] / n:.1%}) | "
                     f"{b['old_passed']} ({b['old_passed'] / n:.1%}) | {mean:+.3f} ± {se:.3f} |")
    changed = [(name, r) for name, b in report["benchmarks"].items() for r in b["rows"] if r["new"] != r["old"]]
    lines += ["", f"Problems whose verdict changed: {len(changed)}.", ""]
    for name, r in changed:
        last = r["detail"].strip().splitlines()[-1] if r["detail"].strip() else ""
        lines.append(f"* {name} {r['task_id']}: before {r['old_status']}, now {r['new_status']}: `{last}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
