"""Evaluation results: per-task scores, JSON files and a printed table.

A results file (``modlora-eval-v1``) is one JSON object::

    {"schema": "modlora-eval-v1", "method": str, "model": str, "config": {...},
     "tasks": {task: {"metrics": {name: float}, "stderr": {name: float}, "n": int, "wall_s": float, "extra": {...}}},
     "average": {metric: float},          # unweighted mean over the tasks that report the metric
     "wall_s": float, "created": ISO-8601 str,
     "routing": {"entropy_per_layer": {layer: float}, "tokens_per_layer": {layer: int},     # per-token routers
                 "expert_usage": {task: {expert: frac}},
                 "accuracy": {"overall": float, "per_layer": {layer: float}, "n": int} | null}}

Metrics are fractions in [0, 1] (accuracy, exact match, Rouge-L F, pass@1); ``stderr`` is the standard error of the
mean over examples, ``sqrt(var_{ddof=1} / n)``. Per-token routers also record :class:`RoutingTelemetry` (what ``modlora
report`` plots). This module also holds the helpers shared by the evaluators: the seeded fixed subset used by
``limit``, JSON reading and the guarded model call.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from modlora.errors import DataError, ModloraError
from modlora.io import atomic_write_json, parse_json, read_regular_file

RESULTS_SCHEMA = "modlora-eval-v1"


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
    routing: RoutingTelemetry | None = None
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
            out["routing"] = self.routing.to_dict()
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
                   routing=RoutingTelemetry.from_dict(d["routing"], source) if d.get("routing") else None,
                   created=str(d.get("created", "")))


def save_results(run: EvalRun, path: str | os.PathLike[str]) -> Path:
    """Write ``run`` as JSON (atomically) and return the path."""
    path = Path(path)
    atomic_write_json(path, run.to_dict())
    return path


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a JSON file; a missing, malformed or unreadable one (a directory, a FIFO, a device: refused at once, never
    waited on; a symbolic link is followed) raises :class:`DataError` naming ``what`` and the path."""
    path = Path(path)
    try:
        return parse_json(read_regular_file(path, follow_symlinks=True))
    except FileNotFoundError as exc:
        raise DataError(f"{what} {str(path)!r} not found") from exc
    except OSError as exc:
        raise DataError(f"{what} {str(path)!r}: cannot read it ({exc.strerror or exc})") from exc
    except ValueError as exc:
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


NOT_PERCENT = ("loss",)  # metrics that are not fractions in [0, 1] (printed as they are)


def format_value(metric: str, value: float) -> str:
    """A metric value for people: fractions in % (``50.17``), others (``loss``) as they are (``2.057``)."""
    return f"{value:.3f}" if metric in NOT_PERCENT else f"{100 * value:.2f}"


def format_metrics(scores: TaskScores, metric: str | None = None) -> str:
    """``"acc=50.17±1.03  acc_norm=46.51±1.02"``: every metric of ``scores`` (or only ``metric``) ± stderr; fractions
    in %, the loss as it is."""
    names = [metric] if metric is not None else list(scores.metrics)
    return "  ".join(f"{m}={format_value(m, scores.metrics[m])}±{format_value(m, scores.stderr.get(m, math.nan))}"
                     for m in names if m in scores.metrics)


def results_table(runs: Sequence[EvalRun], metric: str | None = None, title: str = "Evaluation") -> Any:
    """A rich table: one row per (method, task) with metric ± stderr, n and wall time, then the averages.

    With ``metric`` only that metric is shown; otherwise every metric a task reports. Names are never split."""
    from rich.text import Text

    from modlora.tables import text_table

    table = text_table(title, ("method", "task", "metrics", "n", "wall s"), right=("n", "wall s"))
    for run in runs:
        for task, scores in run.tasks.items():
            table.add_row(run.method, task, format_metrics(scores, metric), str(scores.n), f"{scores.wall_s:.1f}")
        avg = run.average()
        names = [metric] if metric is not None else list(avg)
        table.add_row(run.method, Text("average", style="bold"), "  ".join(f"{m}={format_value(m, avg[m])}" for m in names
                                                               if m in avg), "", f"{run.wall_s:.1f}")
    return table


@dataclass
class RoutingAccuracy:
    """How often an example's routing mass is largest on its own task's expert: ``overall`` on the mass averaged
    over layers, ``per_layer`` on each layer's mass alone; ``n`` examples. On the layer-averaged mass also
    ``top2`` (own expert among the two largest), ``own_mass`` (mean share of the mass on the own expert) and
    ``experts`` E (chance: top-1 1/E, top-2 2/E; own mass 1/E under uniform routing). Results written before these
    were kept read back as NaN / 0."""

    overall: float
    per_layer: dict[str, float]
    n: int
    top2: float = math.nan
    own_mass: float = math.nan
    experts: int = 0

    @property
    def chance(self) -> float:
        """Top-1 accuracy of a router that picks an expert at random: 1/E."""
        return 1.0 / self.experts if self.experts else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"overall": self.overall, "per_layer": self.per_layer, "n": self.n, "top2": self.top2,
                "own_mass": self.own_mass, "experts": self.experts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoutingAccuracy:
        return cls(float(d["overall"]), {str(k): float(v) for k, v in d["per_layer"].items()}, int(d["n"]),
                   float(d.get("top2", math.nan)), float(d.get("own_mass", math.nan)), int(d.get("experts", 0)))


def routing_accuracy(masses: Mapping[str, Any], true_expert: Any) -> RoutingAccuracy:
    """Routing accuracy from per-layer routing masses ``{layer: (n, E)}`` (tensors or arrays; a row is one
    example's routing weights summed or averaged over its tokens) and ``true_expert`` (n,) expert indices:
    ``per_layer[l] = mean_i [argmax_e m_l[i, e] = t_i]`` and ``overall = mean_i [argmax_e mean_l m_l[i, e] = t_i]``.
    """
    from modlora.errors import RoutingError

    truth = np.asarray(true_expert.detach().cpu().numpy() if hasattr(true_expert, "detach") else true_expert)
    if truth.ndim != 1 or not np.issubdtype(truth.dtype, np.integer):
        raise RoutingError(f"true_expert must be a 1-d integer array, got shape {truth.shape} dtype {truth.dtype}")
    if not masses:
        raise RoutingError("no routing weights given")
    layers: dict[str, np.ndarray] = {}
    for name, m in masses.items():
        arr = np.asarray(m.detach().float().cpu().numpy() if hasattr(m, "detach") else m, dtype=np.float64)
        if arr.ndim != 2:
            raise RoutingError(f"routing weights of layer {name!r} must have shape (n, E), got {arr.shape}")
        if arr.shape[0] != truth.shape[0]:
            raise RoutingError(f"layer {name!r}: {arr.shape[0]} examples of routing weights but {truth.shape[0]} labels")
        if truth.size and (truth.min() < 0 or truth.max() >= arr.shape[1]):
            raise RoutingError(f"true_expert indices must lie in [0, {arr.shape[1]}) for layer {name!r}")
        layers[str(name)] = arr
    if len({a.shape for a in layers.values()}) > 1:
        raise RoutingError("routing weights of all layers must have the same shape (n, E)")

    def accuracy(arr: np.ndarray) -> float:
        return float((arr.argmax(axis=1) == truth).mean()) if truth.size else float("nan")

    mean = np.mean(list(layers.values()), axis=0)
    rows = np.arange(truth.size)
    own = mean[rows, truth]
    # own expert among the two largest; a tie counts against it
    top2 = float(((mean >= own[:, None]).sum(axis=1) - 1 < 2).mean()) if truth.size else float("nan")
    share = float((own / np.maximum(mean.sum(axis=1), 1e-30)).mean()) if truth.size else float("nan")
    return RoutingAccuracy(accuracy(mean), {name: accuracy(arr) for name, arr in layers.items()}, int(truth.shape[0]),
                           top2, share, int(mean.shape[1]))


@dataclass
class RoutingTelemetry:
    """What per-token routers did during an evaluation run.

    ``entropy_per_layer``: mean per-token routing entropy ``−Σ_e w_e log w_e`` (nats) over every scored or generated
    token; ``tokens_per_layer``: how many tokens that mean is over; ``expert_usage[task][expert]``: the expert's
    share of the routing mass on that task (tokens and layers pooled); ``accuracy``: in-distribution routing
    accuracy, when the tasks' own experts are known."""

    entropy_per_layer: dict[str, float] = field(default_factory=dict)
    tokens_per_layer: dict[str, int] = field(default_factory=dict)
    expert_usage: dict[str, dict[str, float]] = field(default_factory=dict)
    accuracy: RoutingAccuracy | None = None

    def add_task(self, task: str, recorder: Any) -> None:
        """Fold one task's :class:`~modlora.reuse.routing.RoutingRecorder` into the run's telemetry."""
        if not recorder.tokens:
            return
        for layer, mean_entropy in recorder.entropy().items():
            old_n, new_n = self.tokens_per_layer.get(layer, 0), recorder.tokens[layer]
            old = self.entropy_per_layer.get(layer, 0.0)
            self.entropy_per_layer[layer] = (old * old_n + mean_entropy * new_n) / max(old_n + new_n, 1)
            self.tokens_per_layer[layer] = old_n + new_n
        total = sum(m for m in recorder.mass.values())
        share = total / max(float(total.sum()), 1e-30)
        self.expert_usage[task] = {n: float(v) for n, v in zip(recorder.expert_names, share.tolist(), strict=True)}

    def to_dict(self) -> dict[str, Any]:
        return {"entropy_per_layer": self.entropy_per_layer, "tokens_per_layer": self.tokens_per_layer,
                "expert_usage": self.expert_usage,
                "accuracy": self.accuracy.to_dict() if self.accuracy is not None else None}

    @classmethod
    def from_dict(cls, d: Any, source: str = "results") -> RoutingTelemetry:
        if not isinstance(d, Mapping):
            raise DataError(f"{source}: field 'routing' must be an object")
        try:
            acc = d.get("accuracy")
            return cls({str(k): float(v) for k, v in (d.get("entropy_per_layer") or {}).items()},
                       {str(k): int(v) for k, v in (d.get("tokens_per_layer") or {}).items()},
                       {str(t): {str(e): float(v) for e, v in row.items()}
                        for t, row in (d.get("expert_usage") or {}).items()},
                       RoutingAccuracy.from_dict(acc) if acc else None)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: malformed field 'routing' ({type(exc).__name__}: {exc})") from None


@contextlib.contextmanager
def recording_routing(model: Any, telemetry: RoutingTelemetry | None, task: str) -> Iterator[None]:
    """Record ``model``'s routing while one task runs, into ``telemetry`` (from :func:`routing_telemetry`, which is
    ``None`` unless the model routes per token: then nothing is recorded)."""
    if telemetry is None:
        yield
        return
    with model.routed.record() as rec:
        yield
    telemetry.add_task(task, rec)


def routing_telemetry(model: Any) -> RoutingTelemetry | None:
    """An empty :class:`RoutingTelemetry` when ``model`` routes per token (something to record), else ``None``."""
    return RoutingTelemetry() if getattr(model, "per_token", False) and getattr(model, "routed", None) else None
