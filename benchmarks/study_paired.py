"""Paired differences between any two rows of a study's ``results.json``, as a Markdown table.

Per task, row A's mean Rouge-L (``--parts choice``: acc_norm per benchmark set) minus row B's on the same examples;
the mean over the tasks both scored ± the standard error across tasks (:func:`modlora.study.stats.paired_difference`)::

    python benchmarks/study_paired.py runs/cpu-medium/results.json mbc/arrow:private/arrow random/arrow:mbc/arrow \\
        --parts heldout indist

Each pair also gets the count of tasks where A is above, below and level with B, and the two-sided sign-test p-value
of those counts (ties left out; ``scipy.stats.binomtest``), which does not assume the differences are normal.
``--per-task`` adds, for each pair and split, every task's two scores and their difference (largest first).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import binomtest

from modlora.study.stats import PAIRED_METRICS, paired_difference


def _task_scores(results: dict, a: str, b: str, part: str) -> list[tuple[float, float, str]]:
    """``(row a's score, row b's score, task)`` for every task both rows scored in ``part``, largest a − b first."""
    metric = PAIRED_METRICS[part]
    row_a, row_b = results["rows"][a].get(part) or {}, results["rows"][b].get(part) or {}
    return sorted(((row_a[t][metric], row_b[t][metric], t) for t in set(row_a) & set(row_b)),
                  key=lambda s: s[1] - s[0])


def _signs(scores: list[tuple[float, float, str]]) -> tuple[int, int, int]:
    """Tasks where row a scores above, below and level with row b (to 1e-9)."""
    diffs = [x - y for x, y, _ in scores]
    return sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs), sum(abs(d) <= 1e-9 for d in diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, help="a study's results.json")
    ap.add_argument("pairs", nargs="+", help="ROW_A:ROW_B (row keys as in results.md, e.g. private/arrow:base)")
    ap.add_argument("--parts", nargs="+", default=["heldout"], choices=list(PAIRED_METRICS),
                    help="held-out SNI / in-distribution Rouge-L, or choice: acc_norm over the benchmark sets "
                         "(default: heldout)")
    ap.add_argument("--per-task", action="store_true", help="also list each task's scores and difference")
    args = ap.parse_args()
    pairs = []
    for pair in args.pairs:
        a, sep, b = pair.partition(":")
        if not sep or not a or not b:
            ap.error(f"{pair!r}: expected ROW_A:ROW_B")
        pairs.append((a, b))
    results = json.loads(args.results.read_text())
    unknown = sorted({r for p in pairs for r in p} - set(results["rows"]))
    if unknown:
        ap.error(f"{', '.join(unknown)}: not rows of {args.results} (rows: {', '.join(results['rows'])})")
    print("| A − B | split | tasks | difference (points of Rouge-L, or acc_norm for choice) | in s.e. "
          "| A above / below / level | sign test p |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for a, b in pairs:
        for part in args.parts:
            d = paired_difference(results, a, b, part)
            if d is not None:
                up, down, level = _signs(_task_scores(results, a, b, part))
                p = f"{binomtest(up, up + down).pvalue:.2g}" if up + down else "-"
                print(f"| {a} − {b} | {part} | {d.n} | {100 * d.mean:+.1f} ± {100 * d.stderr:.1f} | {d.z:+.1f} "
                      f"| {up} / {down} / {level} | {p} |")
    if args.per_task:
        for a, b in pairs:
            for part in args.parts:
                if scores := _task_scores(results, a, b, part):
                    print(f"\n{a} − {b}, {part}, per task ({PAIRED_METRICS[part]}, %):\n")
                    print(f"| task | {a} | {b} | difference |\n|---|---:|---:|---:|")
                    for x, y, task in scores:
                        print(f"| {task} | {100 * x:.1f} | {100 * y:.1f} | {100 * (x - y):+.1f} |")


if __name__ == "__main__":
    main()
