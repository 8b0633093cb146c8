"""The budget curve: prompt-level routing accuracy against the training budget, from routing benchmark results.

Reads the ``OUT.json`` files of ``benchmarks/routing_accuracy.py`` (one or more libraries each), looks up every
library's budget (optimizer steps per expert × batch size, from its experts' training records) and initialisation
(its build config), and draws top-1 own-expert accuracy per router against steps, one line per (init, router, E),
with chance (1/E) dashed. Writes ``OUT.png`` and ``OUT.md`` (every point, with top-2, own mass and ΔW-MBC ARI)::

    python benchmarks/budget_curve.py runs/curve/routing_*.json --out docs/routing_budget_curve
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from modlora.library.store import ExpertLibrary


@dataclass(frozen=True)
class CurvePoint:
    """One library × router of a routing benchmark, with the library's budget."""

    library: str
    init: str
    steps: int
    batch_size: int
    router: str
    experts: int
    top1: float
    top2: float
    own_mass: float
    chance: float
    ari: float | None


def curve_points(paths: list[Path]) -> list[CurvePoint]:
    points = []
    for path in paths:
        result = json.loads(path.read_text())
        for score in result["scores"]:
            lib = ExpertLibrary(score["library"])
            training = lib.entry(lib.expert_names()[0]).training
            init = (lib.load_meta("build_config") or {}).get("init", "shared")
            acc = score["accuracy"]
            points.append(CurvePoint(score["library"], init, int(training["steps"]), int(training["batch_size"]),
                                     score["router"], acc["experts"], acc["overall"], acc["top2"], acc["own_mass"],
                                     1 / acc["experts"], result.get("ari", {}).get(score["library"])))
    return sorted(points, key=lambda p: (p.init, p.router, p.experts, p.steps))


def markdown(points: list[CurvePoint], command: str) -> str:
    lines = ["# Routing accuracy against the training budget\n", f"`{command}`\n",
             "| library | init | steps × batch | E | router | top-1 | top-2 | own mass | chance | ΔW-MBC ARI |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for p in points:
        ari = f"{p.ari:.2f}" if p.ari is not None else "-"
        lines.append(f"| {p.library} | {p.init} | {p.steps} × {p.batch_size} | {p.experts} | {p.router} | "
                     f"{p.top1:.1%} | {p.top2:.1%} | {p.own_mass:.1%} | {p.chance:.1%} | {ari} |")
    return "\n".join(lines) + "\n"


def plot(points: list[CurvePoint], path_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series: dict[tuple[str, str, int], list[CurvePoint]] = {}
    for p in points:
        series.setdefault((p.init, p.router, p.experts), []).append(p)
    for (init, router, experts), pts in series.items():
        ax.plot([p.steps for p in pts], [100 * p.top1 for p in pts], marker="o", label=f"{router}, {init} init, E={experts}")
    for experts in sorted({p.experts for p in points}):
        ax.axhline(100 / experts, linestyle="--", linewidth=0.8, color="grey", label=f"chance, E={experts}")
    steps = sorted({p.steps for p in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlim(steps[0] / 1.5, steps[-1] * 1.5)
    ax.set_xlabel("optimizer steps per expert (batch 8)")
    ax.set_ylabel("top-1 own-expert routing (% of prompts)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Routing accuracy against the training budget (cpu-medium tasks)", fontsize=10)
    fig.savefig(path_png, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="OUT.json files of benchmarks/routing_accuracy.py")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.png and OUT.md")
    args = ap.parse_args()
    points = curve_points(args.results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(points, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(markdown(points, "python benchmarks/budget_curve.py " + " ".join(sys.argv[1:])))
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
