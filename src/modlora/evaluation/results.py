"""Evaluation results: per-task scores, JSON files and a printed table.

A results file (``modlora-eval-v1``) is one JSON object::

    {"schema": "modlora-eval-v1", "method": str, "model": str, "config": {...},
     "tasks": {task: {"metrics": {name: float}, "stderr": {name: float}, "n": int, "wall_s": float, "extra": {...}}},
     "average": {metric: float},          # unweighted mean over the tasks that report the metric
     "wall_s": float, "created": ISO-8601 str,
     "routing": {"entropy_per_layer": {layer: float}, "expert_usage": {task: {expert: frac}}}   # optional}

Metrics are fractions in [0, 1] (accuracy, exact match, Rouge-L F, pass@1); ``stderr`` is the standard error of the
mean over examples, ``sqrt(var_{ddof=1} / n)``. This module also holds the helpers shared by the evaluators: data
directory resolution and the seeded fixed subset used by ``limit``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from modlora.errors import DataError, ModloraError
from modlora.io import atomic_write_json

RESULTS_SCHEMA = "modlora-eval-v1"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$MODLORA_DATA``, else ``../shared/data`` relative to the CWD."""
    if data_dir is not None:
        path = Path(data_dir)
    elif os.environ.get("MODLORA_DATA"):
        path = Path(os.environ["MODLORA_DATA"])
    else:
        path = Path.cwd().parent / "shared" / "data"
    if not path.is_dir():
        raise DataError(f"data directory {str(path)!r} does not exist (pass data_dir or set MODLORA_DATA)")
    return path


def seeded_subset(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """Indices of a fixed random subset of ``range(n)`` of size ``min(limit, n)``, in increasing order.

    The subset depends only on ``(n, limit, seed)``, so every method evaluated with the same options sees the same
    examples; ``limit=None`` (or ``limit >= n``) keeps everything.
    """
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise DataError(f"option 'limit' must be a positive integer, got {limit!r}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.permutation(n)[:limit])


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean of ``values`` and its standard error ``sqrt(var_{ddof=1} / n)`` (0 for fewer than 2 values)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    mean = float(arr.mean())
    stderr = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return mean, stderr


@dataclass
class TaskScores:
    """Scores of one task: ``metrics`` / ``stderr`` keyed by metric name, ``n`` examples, ``wall_s`` seconds."""

    metrics: dict[str, float]
    stderr: dict[str, float]
    n: int
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_per_example(cls, per_example: Mapping[str, Sequence[float]], wall_s: float = 0.0,
                         extra: dict[str, Any] | None = None) -> TaskScores:
        """Aggregate per-example scores ``{metric: [score_i]}`` into means and standard errors."""
        metrics, stderr, sizes = {}, {}, set()
        for name, values in per_example.items():
            metrics[name], stderr[name] = mean_and_stderr(values)
            sizes.add(len(values))
        if len(sizes) > 1:
            raise DataError(f"per-example metric lists have different lengths: {sorted(sizes)}")
        return cls(metrics=metrics, stderr=stderr, n=sizes.pop() if sizes else 0, wall_s=wall_s, extra=extra or {})

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "stderr": self.stderr, "n": self.n, "wall_s": self.wall_s, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], task: str = "?") -> TaskScores:
        if not isinstance(d, Mapping) or not isinstance(d.get("metrics"), Mapping):
            raise DataError(f"results task {task!r}: field 'metrics' missing or not an object")
        return cls(metrics={k: float(v) for k, v in d["metrics"].items()},
                   stderr={k: float(v) for k, v in (d.get("stderr") or {}).items()},
                   n=int(d.get("n", 0)), wall_s=float(d.get("wall_s", 0.0)), extra=dict(d.get("extra") or {}))


@dataclass
class EvalRun:
    """One evaluation run of one method (model + routing) over several tasks."""

    method: str
    model: str
    config: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, TaskScores] = field(default_factory=dict)
    wall_s: float = 0.0
    routing: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def average(self) -> dict[str, float]:
        """Unweighted mean over tasks of each metric (over the tasks that report it)."""
        by_metric: dict[str, list[float]] = {}
        for scores in self.tasks.values():
            for name, value in scores.metrics.items():
                by_metric.setdefault(name, []).append(value)
        return {name: float(np.mean(values)) for name, values in by_metric.items()}

    def merge(self, other: EvalRun) -> None:
        """Add ``other``'s tasks (and wall time) to this run; a task present in both is overwritten."""
        self.tasks.update(other.tasks)
        self.wall_s += other.wall_s
        self.config.update({k: v for k, v in other.config.items() if k not in self.config})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": RESULTS_SCHEMA, "method": self.method, "model": self.model,
                               "config": self.config, "tasks": {t: s.to_dict() for t, s in self.tasks.items()},
                               "average": self.average(), "wall_s": self.wall_s, "created": self.created}
        if self.routing is not None:
            out["routing"] = self.routing
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "results") -> EvalRun:
        if not isinstance(d, Mapping) or d.get("schema") != RESULTS_SCHEMA:
            raise DataError(f"{source}: not a modlora results file (field 'schema' must be {RESULTS_SCHEMA!r})")
        tasks = d.get("tasks")
        if not isinstance(tasks, Mapping):
            raise DataError(f"{source}: field 'tasks' missing or not an object")
        return cls(method=str(d.get("method", "?")), model=str(d.get("model", "?")), config=dict(d.get("config") or {}),
                   tasks={t: TaskScores.from_dict(s, t) for t, s in tasks.items()}, wall_s=float(d.get("wall_s", 0.0)),
                   routing=d.get("routing"), created=str(d.get("created", "")))


def save_results(run: EvalRun, path: str | os.PathLike[str]) -> Path:
    """Write ``run`` as JSON (atomically) and return the path."""
    path = Path(path)
    atomic_write_json(path, run.to_dict())
    return path


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a JSON file; a missing or malformed file raises :class:`DataError` naming ``what`` and the path."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{what} {str(path)!r} not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {str(path)!r} is not valid JSON: {exc}") from exc


def model_forward(model: Any, during: str, **kwargs: Any) -> Any:
    """``model(**kwargs)``; a failure inside the model becomes a :class:`ModloraError` saying what was running."""
    try:
        return model(**kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ModloraError(f"model forward failed during {during}: {type(exc).__name__}: {exc}") from exc


def load_results(path: str | os.PathLike[str]) -> EvalRun:
    """Read a results JSON written by :func:`save_results`."""
    return EvalRun.from_dict(read_json(path, "results file"), source=str(Path(path)))


def format_metrics(scores: TaskScores, metric: str | None = None) -> str:
    """``"acc=50.17±1.03  acc_norm=46.51±1.02"``: every metric of ``scores`` (or only ``metric``) in %, ± stderr."""
    names = [metric] if metric is not None else list(scores.metrics)
    return "  ".join(f"{m}={100 * scores.metrics[m]:.2f}±{100 * scores.stderr.get(m, float('nan')):.2f}"
                     for m in names if m in scores.metrics)


def results_table(runs: Sequence[EvalRun], metric: str | None = None, title: str = "Evaluation"):
    """A ``rich.table.Table``: one row per (method, task) with metric ± stderr, n and wall time, then the averages.

    With ``metric`` only that metric is shown; otherwise every metric a task reports.
    """
    from rich.table import Table

    table = Table(title=title)
    for col in ("method", "task", "metrics", "n", "wall s"):
        table.add_column(col, justify="right" if col in ("n", "wall s") else "left")
    for run in runs:
        for task, scores in run.tasks.items():
            table.add_row(run.method, task, format_metrics(scores, metric), str(scores.n), f"{scores.wall_s:.1f}")
        avg = run.average()
        names = [metric] if metric is not None else list(avg)
        table.add_row(run.method, "[b]average[/b]", "  ".join(f"{m}={100 * avg[m]:.2f}" for m in names if m in avg),
                      "", f"{run.wall_s:.1f}")
    return table


def print_results(runs: Sequence[EvalRun], metric: str | None = None, title: str = "Evaluation") -> None:
    """Print :func:`results_table` with rich (scores in percent)."""
    from rich.console import Console

    Console().print(results_table(runs, metric=metric, title=title))


def routing_accuracy(weights: Any, true_expert: Any) -> dict[str, Any]:
    """In-distribution routing accuracy: how often the top-weighted expert is the example's own expert.

    ``weights`` is an array (n, E) of per-example routing weights, an array (L, n, E) of per-layer weights, or a
    mapping ``{layer name: (n, E)}``; ``true_expert`` is (n,) expert indices. Returns ``{"overall": float,
    "per_layer": {layer: float}, "n": n}`` where per-layer accuracy is ``mean_i [argmax_e w[l, i, e] == t_i]``
    and ``overall`` is the mean over layers (for (n, E) input: the single accuracy, ``per_layer`` empty).
    """
    from modlora.errors import RoutingError

    def as_array(x: Any, what: str) -> np.ndarray:
        if hasattr(x, "detach"):
            x = x.detach().float().cpu().numpy()
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2:
            raise RoutingError(f"routing weights for {what} must have shape (n, E), got {arr.shape}")
        return arr

    truth = np.asarray(true_expert.detach().cpu().numpy() if hasattr(true_expert, "detach") else true_expert)
    if truth.ndim != 1 or not np.issubdtype(truth.dtype, np.integer):
        raise RoutingError(f"true_expert must be a 1-d integer array, got shape {truth.shape} dtype {truth.dtype}")
    if isinstance(weights, Mapping):
        layers = {str(k): as_array(v, f"layer {k!r}") for k, v in weights.items()}
        flat = False
    else:
        raw = weights.detach().float().cpu().numpy() if hasattr(weights, "detach") else np.asarray(weights, dtype=float)
        if raw.ndim == 3:
            layers, flat = {str(i): raw[i] for i in range(raw.shape[0])}, False
        else:
            layers, flat = {"all": as_array(raw, "all layers")}, True
    if not layers:
        raise RoutingError("no routing weights given")
    per_layer = {}
    for name, arr in layers.items():
        if arr.shape[0] != truth.shape[0]:
            raise RoutingError(f"layer {name!r}: {arr.shape[0]} examples of routing weights but {truth.shape[0]} labels")
        if truth.size and (truth.min() < 0 or truth.max() >= arr.shape[1]):
            raise RoutingError(f"true_expert indices must lie in [0, {arr.shape[1]}) for layer {name!r}")
        per_layer[name] = float((arr.argmax(axis=1) == truth).mean()) if truth.size else float("nan")
    overall = float(np.mean(list(per_layer.values())))
    return {"overall": overall, "per_layer": {} if flat else per_layer, "n": int(truth.shape[0])}
