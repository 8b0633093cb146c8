"""A study's report: the results table (:func:`results_markdown`, written to ``results.md`` and printed by
:func:`print_study_results`), the paired differences across tasks (:mod:`modlora.study.stats`) overall and per group
of held-out tasks, the clustered libraries' partitions, and two bar charts (:func:`plot_results`,
:func:`plot_paired`, drawn by :func:`modlora.evaluation.plots.grouped_bars_png`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from modlora.evaluation.plots import grouped_bars_png
from modlora.study.stats import PairedDifference, heldout_group_tasks, mean_of_means, paired_difference
from modlora.tables import print_split_table

PAIRED_HEADERS = ["row", "held-out − base", "held-out − μ", "in-dist − base", "benchmarks − base"]
PARTITION_HEADERS = ["library", "K", "ARI", "purity"]


def _row_differences(results: Mapping[str, Any], key: str) -> list[PairedDifference | None]:
    """Row ``key``'s paired differences in the order of ``PAIRED_HEADERS[1:]``: its held-out Rouge-L minus the
    base's and minus its library's μ, its in-distribution Rouge-L minus the base's and its benchmark acc_norm minus
    the base's (across benchmark sets); ``None`` where a pair has nothing to compare."""
    mu = f"{results['rows'][key].get('library')}/mu"
    return [paired_difference(results, key, "base"),
            paired_difference(results, key, mu) if key != mu else None,
            paired_difference(results, key, "base", "indist"),
            paired_difference(results, key, "base", "choice")]


def _paired_cells(results: Mapping[str, Any]) -> list[list[str]]:
    """Per row (but the base) with any paired difference: its :func:`_row_differences` as table cells."""
    out = []
    for key in results["rows"]:
        if key != "base" and any(diffs := _row_differences(results, key)):
            out.append([key, *(d.cell() if d else "-" for d in diffs)])
    return out



def _group_cells(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the held-out paired differences per group of ``results["heldout_groups"]``: per row
    with held-out scores (but the base), its difference from the base and from its library's μ in each group."""
    groups = heldout_group_tasks(results)
    if not groups:
        return [], []
    headers = ["row"] + [f"{g} ({len(t)} tasks) − {ref}" for g, t in groups.items() for ref in ("base", "μ")]
    rows = []
    for key, row in results["rows"].items():
        if key == "base" or not row.get("heldout"):
            continue
        mu = f"{row.get('library')}/mu"
        diffs = [paired_difference(results, key, ref, tasks=t) if ref != key else None
                 for t in groups.values() for ref in ("base", mu)]
        rows.append([key, *(d.cell() if d else "-" for d in diffs)])
    return headers, rows


def _partition_rows(results: Mapping[str, Any]) -> list[list[str]]:
    return [[name, str(p["k"]), f"{p['ari']:.2f}" if p.get("ari") is not None else "-",
             f"{p['purity']:.2f}" if p.get("purity") is not None else "-"]
            for name, p in (results.get("partitions") or {}).items()]


def _fmt(m: Any) -> str:
    if isinstance(m, dict) and "mean" in m:
        return f"{100 * m['mean']:.1f} ± {100 * m['stderr']:.1f}" if not math.isnan(m["stderr"]) else \
            f"{100 * m['mean']:.1f}"
    return "-"


def _average(row: Mapping[str, Any]) -> dict[str, float] | None:
    """Mean of the held-out columns (each benchmark's acc_norm and the held-out SNI Rouge-L), s.e. propagated."""
    cells = [(d["acc_norm"], d["stderr"]) for d in row.get("choice", {}).values()]
    if "heldout_rougeL" in row:
        cells.append((row["heldout_rougeL"]["mean"], row["heldout_rougeL"]["stderr"]))
    return mean_of_means(cells) if cells else None


def _headers(results: Mapping[str, Any]) -> list[str]:
    choice = list(results["config"].get("choice_tasks") or [])
    return (["row"] + choice + ["held-out SNI Rouge-L"] + (["average"] if choice else [])
            + ["in-dist Rouge-L", "routing acc.", "train tokens", "train s", "infer tok/s"])


def _row_cells(key: str, row: Mapping[str, Any], results: Mapping[str, Any]) -> list[str]:
    lib = results["libraries"].get(row.get("library", "-"), {})
    acc = row.get("routing_accuracy", {}).get("overall")
    choice = [_fmt({"mean": row["choice"][t]["acc_norm"], "stderr": row["choice"][t]["stderr"]})
              if t in row.get("choice", {}) else "-" for t in results["config"].get("choice_tasks") or []]
    average = [(_fmt(_average(row)) if row.get("choice") else "-")] if choice else []
    return [key, *choice, _fmt(row.get("heldout_rougeL")), *average, _fmt(row.get("indist_rougeL")),
            f"{100 * acc:.0f}%" if acc is not None else "-",
            f"{lib.get('train_tokens', 0) / 1000:.0f}k" if lib else "0",
            f"{lib.get('train_seconds', 0):.0f}" if lib else "0",
            f"{row.get('tokens_per_second', 0):.0f}"]


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results table, then the paired differences across tasks and the clustered libraries' partitions."""
    text = _markdown_table(_headers(results), [_row_cells(k, r, results) for k, r in results["rows"].items()])
    text += ("\nBenchmarks: rank-classification accuracy with per-character length normalisation (acc_norm), in %; "
             "Rouge-L in %; mean ± standard error over examples (the average's s.e. propagated from its columns). "
             "Train tokens/s: the library's training compute (MBC includes its stage 1); infer tok/s: generation "
             "throughput.\n")
    paired = _paired_cells(results)
    if paired:
        text += ("\n**Paired differences** in Rouge-L points (benchmarks: acc_norm points): per task (benchmark "
                 "set), the row's mean minus the reference row's mean on the same examples; mean ± standard error "
                 "across tasks (in brackets: the difference in standard errors).\n\n" + _markdown_table(PAIRED_HEADERS, paired))
    group_headers, group_rows = _group_cells(results)
    if group_rows:
        text += ("\n**Held-out tasks by group** (`heldout_groups`): the same paired differences of held-out Rouge-L "
                 "within each group of tasks.\n\n" + _markdown_table(group_headers, group_rows))
    parts = _partition_rows(results)
    if parts:
        text += ("\n**Clustered libraries**: K routed experts and, against the task families "
                 f"(`{results['config'].get('task_families')}`), adjusted Rand index and purity.\n\n"
                 + _markdown_table(PARTITION_HEADERS, parts))
    return text


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def plot_results(results: Mapping[str, Any], path_png: Path) -> Path:
    """One PNG: per result row, bars for the held-out SNI Rouge-L, the benchmark average (acc_norm) and the
    in-distribution Rouge-L, with ±1 standard-error whiskers (over examples)."""
    rows = results["rows"]

    def score(field: str) -> Callable[[str], tuple[float, float] | None]:
        return lambda key: (100 * m["mean"], 100 * m["stderr"]) if (m := rows[key].get(field)) else None

    series = [("held-out SNI Rouge-L", score("heldout_rougeL")), ("benchmarks acc_norm (avg)", score("choice_acc_norm")),
              ("in-dist Rouge-L", score("indist_rougeL"))]
    return grouped_bars_png(list(rows), series, path_png,
                            title=f"{results['config'].get('name', 'study')}: mean ± s.e.", ylabel="%")


def plot_paired(results: Mapping[str, Any], path_png: Path) -> Path:
    """One PNG: per result row but the base, the Rouge-L paired differences of :func:`results_markdown` (held-out
    − base and − the library's μ, in-distribution − base), ±1 standard error across tasks."""
    keys = [key for key in results["rows"] if key != "base"]
    diffs = {key: _row_differences(results, key) for key in keys}

    def column(j: int) -> Callable[[str], tuple[float, float] | None]:
        return lambda key: (100 * d.mean, 100 * d.stderr) if (d := diffs[key][j]) else None

    series = [(PAIRED_HEADERS[1 + j], column(j)) for j in range(3)]  # the Rouge-L columns; benchmarks differ in unit
    return grouped_bars_png(keys, series, path_png, title=f"{results['config'].get('name', 'study')}: paired "
                            "differences across tasks, mean ± s.e.", ylabel="Rouge-L points")


def print_study_results(results: Mapping[str, Any], console: Console) -> None:
    """The tables of :func:`results_markdown`, each split into column groups that fit the terminal."""
    for title, headers, rows in (
            ("results (%, mean ± s.e.)", _headers(results), [_row_cells(k, r, results) for k, r in results["rows"].items()]),
            ("paired differences across tasks (Rouge-L / acc_norm points, mean ± s.e.)", PAIRED_HEADERS,
             _paired_cells(results)),
            ("held-out paired differences by group of tasks", *_group_cells(results)),
            ("clustered libraries vs the task families", PARTITION_HEADERS, _partition_rows(results))):
        if rows:
            print_split_table(console, title, headers, rows, right=headers[1:])
