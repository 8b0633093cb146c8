"""Markdown comparison of evaluation runs, with PNG plots (matplotlib, Agg backend).

``write_report(paths, out_dir)`` reads result files written by ``modlora.evaluation.results.save_results`` (and,
optionally, a library-similarity JSON ``{"similarity": n×n, "names": [n], "assignment": [n]}``) and writes into
``out_dir``:

* ``report.md`` — one table (methods × tasks, the main metric in percent ± standard error, and the average over
  tasks), a table of example counts and wall times, and links to the plots;
* ``per_task.png`` — grouped bars of the main metric per task, one bar per method, with stderr error bars
  (:func:`grouped_bars_png`, which the study's plots use too);
* ``routing_entropy.png`` — routing entropy per layer, one line per run of a per-token router (its
  :class:`~modlora.evaluation.results.RoutingTelemetry`);
* ``expert_usage_<method>.png`` — heatmap tasks × experts of the telemetry's share of routing mass;
* ``similarity.png`` — the library similarity matrix, rows / columns ordered by cluster, cluster blocks outlined.

The main metric of a task is the first of ``acc_norm, acc, rougeL, pass@1, exact_match`` that every run reporting
the task has (or ``metric`` when given).
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modlora.errors import DataError
from modlora.evaluation.results import RESULTS_SCHEMA, EvalRun, read_json
from modlora.io import atomic_write_bytes

METRIC_PREFERENCE = ("acc_norm", "acc", "rougeL", "pass@1", "exact_match")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _load_inputs(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[tuple[str, EvalRun]], dict[str, Any] | None]:
    runs: list[tuple[str, EvalRun]] = []
    similarity = None
    labels: set[str] = set()
    for p in paths:
        path = Path(p)
        data = read_json(path, "report input")
        if isinstance(data, dict) and data.get("schema") == RESULTS_SCHEMA:
            run = EvalRun.from_dict(data, source=str(path))
            label = run.method if run.method not in labels else f"{run.method} ({path.stem})"
            labels.add(label)
            runs.append((label, run))
        elif isinstance(data, dict) and "similarity" in data:
            similarity = data
        else:
            raise DataError(f"report input {str(path)!r} is neither a results file (schema {RESULTS_SCHEMA!r}) "
                            "nor a similarity file (field 'similarity')")
    return runs, similarity


def _main_metrics(runs: Sequence[tuple[str, EvalRun]], metric: str | None) -> dict[str, str]:
    tasks: dict[str, str] = {}
    for _, run in runs:
        for task in run.tasks:
            tasks.setdefault(task, "")
    for task in tasks:
        reported = [set(run.tasks[task].metrics) for _, run in runs if task in run.tasks]
        common = set.intersection(*reported)
        candidates = [metric] if metric is not None else list(METRIC_PREFERENCE) + sorted(common)
        tasks[task] = next((m for m in candidates if m in common), "")
    return {t: m for t, m in tasks.items() if m}


def _markdown(runs: Sequence[tuple[str, EvalRun]], main: Mapping[str, str], plots: Sequence[str]) -> str:
    tasks = list(main)
    lines = ["# Evaluation report", "", f"Runs: {len(runs)}. Scores in percent ± standard error; the main metric "
             "of each task is given under its name. *Average* is the unweighted mean of the columns.", ""]
    lines.append("| method | " + " | ".join(f"{t}<br>({main[t]})" for t in tasks) + " | average |")
    lines.append("|---|" + "---:|" * (len(tasks) + 1))
    for label, run in runs:
        cells, values = [], []
        for t in tasks:
            s = run.tasks.get(t)
            if s is None or main[t] not in s.metrics:
                cells.append("–")
                continue
            v, e = s.metrics[main[t]], s.stderr.get(main[t], float("nan"))
            values.append(v)
            cells.append(f"{100 * v:.1f} ± {100 * e:.1f}")
        avg = f"{100 * float(np.mean(values)):.1f}" if len(values) == len(tasks) and values else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    lines += ["", "## Counts and wall time", "", "| method | model | " + " | ".join(tasks) + " | wall s |",
              "|---|---|" + "---:|" * (len(tasks) + 1)]
    for label, run in runs:
        cells = [f"{run.tasks[t].n} / {run.tasks[t].wall_s:.0f}s" if t in run.tasks else "–" for t in tasks]
        lines.append(f"| {label} | {run.model} | " + " | ".join(cells) + f" | {run.wall_s:.0f} |")
    routed = [(label, run) for label, run in runs if run.routing is not None]
    if routed:
        lines += ["", "## Routing", ""]
        for label, run in routed:
            ent = run.routing.entropy_per_layer
            if ent:
                lines.append(f"- {label}: mean routing entropy {float(np.mean(list(ent.values()))):.3f} nats "
                             f"over {len(ent)} layers")
            acc = run.routing.accuracy
            if acc is not None:
                lines.append(f"- {label}: routing accuracy {100 * acc.overall:.1f}% over {acc.n} prompts")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _write_png(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _save(fig: Any, path: Path) -> None:
    _write_png(fig, path)
    _pyplot().close(fig)


BarSeries = tuple[str, Callable[[str], tuple[float, float] | None]]
"""One series of :func:`grouped_bars_png`: its legend label and ``get(group)`` → ``(height, standard error)``, or
``None`` for no bar."""


def grouped_bars_png(groups: Sequence[str], series: Sequence[BarSeries], path: Path, *, title: str, ylabel: str,
                     labels: Sequence[str] | None = None) -> Path:
    """One PNG of grouped bars: at x = i, one bar per series ``(label, get)`` of height ``get(groups[i])[0]`` with a
    ±``get(groups[i])[1]`` whisker (a NaN standard error draws none), and a line at 0. ``labels``: the x tick labels
    (default: ``groups``). Drawn on a bare matplotlib Figure (Agg; no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(series)) ** 0.5 + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(series), 1)
    drawn = False
    for j, (label, get) in enumerate(series):
        bars = [(i + (j - (len(series) - 1) / 2) * width, *v) for i, group in enumerate(groups) if (v := get(group))]
        if bars:
            xs, ys, es = zip(*bars, strict=True)
            ax.bar(xs, ys, width, yerr=[0.0 if math.isnan(e) else e for e in es], capsize=2, label=label)
            drawn = True
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(groups)), list(groups if labels is None else labels), rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if drawn:  # an empty legend is a matplotlib warning
        ax.legend(fontsize=8)
    return _write_png(fig, path)


def plot_per_task(runs: Sequence[tuple[str, EvalRun]], main: Mapping[str, str], path: Path) -> None:
    """Grouped bars: x = tasks, one bar per run, height = main metric (%), error bar = stderr."""

    def score(run: EvalRun) -> Callable[[str], tuple[float, float] | None]:
        def get(task: str) -> tuple[float, float] | None:
            s = run.tasks.get(task)
            if s is None or main[task] not in s.metrics:
                return None
            return 100 * s.metrics[main[task]], 100 * s.stderr.get(main[task], 0.0)

        return get

    grouped_bars_png(list(main), [(label, score(run)) for label, run in runs], path, title="Per-task scores",
                     ylabel="score (%)", labels=[f"{t}\n({main[t]})" for t in main])


def plot_routing_entropy(runs: Sequence[tuple[str, EvalRun]], path: Path) -> bool:
    """Routing entropy per layer, one line per run that has it; returns False when no run has it."""
    series = [(label, run.routing.entropy_per_layer) for label, run in runs
              if run.routing is not None and run.routing.entropy_per_layer]
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, ent in series:
        layers = list(ent)
        ax.plot(range(len(layers)), [float(ent[layer]) for layer in layers], marker="o", label=label)
        ticks = layers
    ax.set_xticks(range(len(ticks)), ticks, rotation=60, fontsize=6)
    ax.set_xlabel("layer")
    ax.set_ylabel("entropy (nats)")
    ax.set_title("Routing entropy per layer")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_expert_usage(usage: Mapping[str, Mapping[str, float]], title: str, path: Path) -> None:
    """Heatmap rows = tasks, columns = experts, value = fraction of routing mass."""
    plt = _pyplot()
    tasks = list(usage)
    experts = sorted({e for row in usage.values() for e in row})
    mat = np.array([[float(usage[t].get(e, 0.0)) for e in experts] for t in tasks])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(experts) + 2), max(3.0, 0.35 * len(tasks) + 1.5)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(experts)), experts, rotation=90, fontsize=6)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=6)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="usage fraction")
    _save(fig, path)


def plot_similarity(similarity: Mapping[str, Any], path: Path) -> None:
    """The n×n similarity matrix, ordered by cluster ``assignment``, with each cluster's block outlined."""
    sim = np.asarray(similarity.get("similarity"), dtype=float)
    names = list(similarity.get("names") or [str(i) for i in range(len(sim))])
    assign = list(similarity.get("assignment") or [0] * len(sim))
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or len(names) != len(sim) or len(assign) != len(sim):
        raise DataError(f"similarity file: 'similarity' must be n×n with n names and n assignments, got "
                        f"{sim.shape}, {len(names)} names, {len(assign)} assignments")
    order = sorted(range(len(sim)), key=lambda i: (str(assign[i]), names[i]))
    mat = sim[np.ix_(order, order)]
    plt = _pyplot()
    n = len(sim)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.2 * n + 2), max(4.0, 0.2 * n + 1.5)))
    im = ax.imshow(mat, cmap="magma")
    labels = [f"{names[i]} [{assign[i]}]" for i in order]
    fontsize = 6 if n <= 60 else 3
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), labels, fontsize=fontsize)
    start = 0
    sorted_assign = [assign[i] for i in order]
    for k in range(1, n + 1):
        if k == n or sorted_assign[k] != sorted_assign[start]:
            ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), k - start, k - start, fill=False, edgecolor="cyan",
                                       linewidth=1.2))
            start = k
    ax.set_title(f"Library similarity ({len(set(map(str, assign)))} clusters)")
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def write_report(result_json_paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                 similarity_json: str | os.PathLike[str] | None = None, metric: str | None = None) -> Path:
    """Write ``report.md`` and the PNG plots (see the module doc) into ``out_dir``; returns the Markdown path."""
    paths = list(result_json_paths) + ([similarity_json] if similarity_json is not None else [])
    runs, similarity = _load_inputs(paths)
    if not runs and similarity is None:
        raise DataError("write_report needs at least one results file or a similarity file")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main = _main_metrics(runs, metric)
    if metric is not None and runs and not main:
        raise DataError(f"no task reports metric {metric!r}")
    plots: list[str] = []
    if main:
        plot_per_task(runs, main, out / "per_task.png")
        plots.append("per_task.png")
    if plot_routing_entropy(runs, out / "routing_entropy.png"):
        plots.append("routing_entropy.png")
    for label, run in runs:
        usage = run.routing.expert_usage if run.routing is not None else None
        if usage:
            name = f"expert_usage_{_safe_name(label)}.png"
            plot_expert_usage(usage, f"Expert usage: {label}", out / name)
            plots.append(name)
    if similarity is not None:
        plot_similarity(similarity, out / "similarity.png")
        plots.append("similarity.png")
    report = out / "report.md"
    atomic_write_bytes(report, _markdown(runs, main, plots).encode())
    return report
