"""The budget curve: routing accuracy and in-distribution Rouge-L against the training budget.

Reads the ``OUT.json`` files of ``benchmarks/routing_accuracy.py`` (one or more libraries each) and, with
``--indist``, results of ``modlora eval --suite indist --library LIB --method M --out FILE`` (one library × method
each). Every library's budget (optimizer steps per expert × batch size) and initialisation come from the routing
results (``meta.budgets``, recorded since they were added), else from the library itself, else from ``--budget``
(for a library that is gone and whose results predate the record). Draws top-1 own-expert
accuracy per router against steps, one line per (init, router, E), with chance (1/E) dashed, and, with
``--indist``, a second panel: in-distribution Rouge-L per method against steps. Writes ``OUT.png`` and ``OUT.md``
(every routing point with top-2, own mass and ΔW-MBC ARI; per library the Rouge-L of each method ± its standard error
across tasks and the paired differences Arrow − μ and Arrow − oracle across tasks)::

    python benchmarks/budget_curve.py runs/curve/routing_*.json --indist runs/curve/indist-*.json \\
        --out docs/routing_budget_curve
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routing_accuracy import library_budget

from modlora.evaluation.results import EvalRun, load_results, mean_and_stderr
from modlora.library.store import ExpertLibrary
from modlora.study.stats import PairedDifference, paired_difference

PAIRS = (("arrow", "mu"), ("arrow", "oracle"), ("arrow-whitened", "mu"), ("arrow-whitened", "oracle"))
"""The paired differences the in-distribution table reports, where both methods were evaluated."""


@dataclass(frozen=True)
class Budget:
    """How a library's experts were trained: ``steps`` optimizer steps of ``batch_size`` examples, ``init``."""

    steps: int
    batch_size: int
    init: str


@dataclass(frozen=True)
class CurvePoint:
    """One library × router of a routing benchmark, with the library's budget."""

    library: str
    budget: Budget
    router: str
    experts: int
    top1: float
    top2: float
    own_mass: float
    chance: float
    ari: float | None


@dataclass(frozen=True)
class IndistPoint:
    """One library's in-distribution results: per method, the mean Rouge-L over tasks ± its standard error, and the
    paired differences of :data:`PAIRS` (per task on the same examples, mean ± s.e. across tasks)."""

    library: str
    budget: Budget
    experts: int
    rouge: dict[str, tuple[float, float]]
    paired: list[PairedDifference]


def budget_of(library: str, recorded: dict[str, Any], given: dict[str, Any]) -> Budget:
    """``library``'s budget: recorded in the routing results, else read from the library, else given (``--budget``)."""
    if library in recorded:
        info = recorded[library]
    elif Path(library).is_dir():
        info = library_budget(ExpertLibrary(library))
    elif library in given:
        info = given[library]
    else:
        raise SystemExit(f"budget_curve: {library}: no budget recorded in the routing results and no library there "
                         "to read it from (give it with --budget LIBRARY=STEPSxBATCH:INIT)")
    if info.get("steps") is None or info.get("batch_size") is None:
        raise SystemExit(f"budget_curve: {library}: its experts record no training steps / batch size")
    return Budget(int(info["steps"]), int(info["batch_size"]), str(info["init"]))


def parse_budget(text: str) -> tuple[str, dict[str, Any]]:
    """``LIBRARY=STEPSxBATCH:INIT`` (e.g. ``runs/eva-s48=48x8:eva``) → ``(LIBRARY, {steps, batch_size, init})``."""
    library, sep, rest = text.rpartition("=")
    budget, _, init = rest.partition(":")
    steps, x, batch = budget.partition("x")
    if not (sep and library and x and steps.isdigit() and batch.isdigit() and init):
        raise argparse.ArgumentTypeError(f"--budget {text!r}: expected LIBRARY=STEPSxBATCH:INIT, e.g. runs/lib=48x8:eva")
    return library, {"steps": int(steps), "batch_size": int(batch), "init": init}


def read_routing(paths: list[Path], given: dict[str, Any]) -> list[CurvePoint]:
    """Routing points of every file, each with its library's budget (looked up once per library)."""
    results = [json.loads(path.read_text()) for path in paths]
    recorded = {lib: info for r in results for lib, info in r.get("meta", {}).get("budgets", {}).items()}
    budgets = {lib: budget_of(lib, recorded, given) for lib in {s["library"] for r in results for s in r["scores"]}}
    points = []
    for result in results:
        for score in result["scores"]:
            acc = score["accuracy"]
            points.append(CurvePoint(score["library"], budgets[score["library"]], score["router"],
                                     acc["experts"], acc["overall"], acc["top2"], acc["own_mass"], 1 / acc["experts"],
                                     result.get("ari", {}).get(score["library"])))
    ari = {p.library: p.ari for p in points if p.ari is not None}    # a library's ARI from any file that has it
    points = [dataclasses.replace(p, ari=ari.get(p.library)) for p in points]
    points.sort(key=lambda p: (p.budget.init, p.router, p.experts, p.budget.steps))
    return points


def read_indist(paths: list[Path], routed: dict[str, CurvePoint]) -> list[IndistPoint]:
    """Group ``modlora eval --suite indist`` results by library; per library, each method's mean Rouge-L ± s.e. across
    tasks and the paired differences of :data:`PAIRS`. ``routed``: a routing point of each library, for its budget
    and E (a library without routing results is refused)."""
    by_library: dict[str, dict[str, EvalRun]] = {}
    for path in paths:
        run = load_results(path)
        library = run.config.get("library")
        if not library:
            raise SystemExit(f"budget_curve: {path}: not a library's in-distribution result (no 'library' in its "
                             "config)")
        method = str(run.config.get("router") or run.method)
        if library not in routed:
            raise SystemExit(f"budget_curve: {path}: in-distribution results of {library}, which has no routing "
                             "results")
        if method in by_library.setdefault(library, {}):
            raise SystemExit(f"budget_curve: {path}: a second result for {library} × {method}")
        by_library[library][method] = run
    points = []
    for library, runs in by_library.items():
        rows = {m: {"indist": {t: s.metrics for t, s in run.tasks.items()}} for m, run in runs.items()}
        rouge = {m: mean_and_stderr([s.metrics["rougeL"] for s in run.tasks.values()]) for m, run in runs.items()}
        paired = [d for a, b in PAIRS if a in runs and b in runs
                  if (d := paired_difference({"rows": rows}, a, b, part="indist")) is not None]
        points.append(IndistPoint(library, routed[library].budget, routed[library].experts, rouge, paired))
    return sorted(points, key=lambda p: (p.budget.init, p.experts, p.budget.steps))


def markdown(points: list[CurvePoint], indist: list[IndistPoint], command: str) -> str:
    lines = ["# Routing accuracy and in-distribution Rouge-L against the training budget\n", f"`{command}`\n",
             "| library | init | steps × batch | E | router | top-1 | top-2 | own mass | chance | ΔW-MBC ARI |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for p in points:
        ari = f"{p.ari:.2f}" if p.ari is not None else "-"
        lines.append(f"| {p.library} | {p.budget.init} | {p.budget.steps} × {p.budget.batch_size} | {p.experts} | "
                     f"{p.router} | {p.top1:.1%} | {p.top2:.1%} | {p.own_mass:.1%} | {p.chance:.1%} | {ari} |")
    if indist:
        methods = sorted({m for p in indist for m in p.rouge})
        lines += ["", "In-distribution Rouge-L (each library's own tasks, test split; mean ± s.e. across tasks), and "
                  "paired differences across tasks (Rouge-L points, in brackets in standard errors):", "",
                  "| library | init | steps × batch | " + " | ".join(methods) + " | paired |",
                  "|---|---|---|" + "---:|" * len(methods) + "---|"]
        for p in indist:
            cells = [f"{100 * p.rouge[m][0]:.1f} ± {100 * p.rouge[m][1]:.1f}" if m in p.rouge else "-" for m in methods]
            paired = "; ".join(f"{d.row} − {d.reference} {d.cell()}" for d in p.paired) or "-"
            lines.append(f"| {p.library} | {p.budget.init} | {p.budget.steps} × {p.budget.batch_size} | "
                         + " | ".join(cells) + f" | {paired} |")
    return "\n".join(lines) + "\n"


def plot(points: list[CurvePoint], indist: list[IndistPoint], path_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if indist else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    series: dict[tuple[str, str, int], list[CurvePoint]] = {}
    for p in points:
        series.setdefault((p.budget.init, p.router, p.experts), []).append(p)
    for (init, router, experts), pts in series.items():
        ax.plot([p.budget.steps for p in pts], [100 * p.top1 for p in pts], marker="o",
                label=f"{router}, {init} init, E={experts}")
    for experts in sorted({p.experts for p in points}):
        ax.axhline(100 / experts, linestyle="--", linewidth=0.8, color="grey", label=f"chance, E={experts}")
    steps = sorted({p.budget.steps for p in points} | {p.budget.steps for p in indist})
    ax.set_ylabel("top-1 own-expert routing (% of prompts)")
    ax.set_ylim(0, 100)
    ax.set_title("Routing accuracy against the training budget", fontsize=10)
    if indist:
        right = axes[0][1]
        lines: dict[tuple[str, str, int], list[tuple[int, float, float]]] = {}
        for p in indist:
            for method, (mean, se) in p.rouge.items():
                lines.setdefault((p.budget.init, method, p.experts), []).append((p.budget.steps, mean, se))
        for i, ((init, method, experts), pts) in enumerate(sorted(lines.items())):
            shift = 1.04 ** (i - (len(lines) - 1) / 2)      # side by side, so that the error bars stay apart
            right.errorbar([s * shift for s, _, _ in pts], [100 * m for _, m, _ in pts],
                           yerr=[100 * e for _, _, e in pts], marker="o", capsize=3,
                           label=f"{method}, {init} init, E={experts}")
        right.set_ylabel("in-distribution Rouge-L (± s.e. across tasks)")
        right.set_title("In-distribution Rouge-L against the training budget", fontsize=10)
        right.legend(fontsize=7, loc="lower right")
    for a in axes[0]:
        a.set_xscale("log", base=2)
        a.set_xticks(steps, [str(s) for s in steps])
        a.set_xlim(steps[0] / 1.5, steps[-1] * 1.5)
        a.set_xlabel("optimizer steps per expert (batch 8)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0) if panels == 1 else (0.0, -0.15))
    fig.savefig(path_png, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="OUT.json files of benchmarks/routing_accuracy.py")
    ap.add_argument("--indist", nargs="*", type=Path, default=[],
                    help="results of `modlora eval --suite indist` (one library × method each)")
    ap.add_argument("--budget", nargs="*", type=parse_budget, default=[], metavar="LIBRARY=STEPSxBATCH:INIT",
                    help="the budget of a library that is gone, for routing results written before budgets were "
                         "recorded in them")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.png and OUT.md")
    args = ap.parse_args()
    given = dict(args.budget)
    points = read_routing(args.results, given)
    indist = read_indist(args.indist, {p.library: p for p in points})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(points, indist, args.out.with_suffix(".png"))
    command = "python benchmarks/budget_curve.py " + " ".join(sys.argv[1:])
    args.out.with_suffix(".md").write_text(markdown(points, indist, command))
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
