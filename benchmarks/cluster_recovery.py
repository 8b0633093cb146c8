"""Cluster recovery: do MBC's similarity features and automatic-K criteria find planted task families?

**Synthetic libraries** model how LoRA experts are really trained. Every module has one initialisation ``A0``
(r × in, PEFT's kaiming-uniform bound ``1/sqrt(in)``) shared by all experts, as ``modlora build`` does today (one
seed), and B starts at 0. To first order a few optimizer steps on B with A fixed give ``B_i ∝ −G_i A_iᵀ``, where
``G_i`` (out × in) is the task's accumulated gradient with respect to W. The K planted families are families of
``G``: ``G_i = T_f + noise · ‖T_f‖ · N_i / ‖N_i‖`` (T_f, N_i Gaussian), so ``noise`` is the ratio of an expert's
own part to its family's part (at 1.0 two experts of a family have an expected ΔW cosine of about 0.5, as the
real demo experts do). B is scaled so that ``max |B| = 0.005`` (the demo library's 0.0045) and A drifts by the
matching first-order step ``−B_iᵀ G_i`` scaled to ``max 0.001``. ``--per-expert-seeds`` draws an independent
``A0`` for every expert instead (issue 15 item 7). A ``null`` row (K = 1: every expert its own family) measures how
often a criterion invents structure. Family sizes are random (each ≥ 2).

For each library the script clusters with ``features`` ∈ {params, delta, delta centred} (semantic needs task texts and a
model: not applicable to synthetic libraries) and reports, over the draws: the ARI at the planted K of each
partitioning algorithm (spectral clustering and k-means on the rows of S), and for each auto-K criterion the
fraction of draws whose chosen K equals the planted K (``no_structure`` counts as K = 1), the median chosen K and
the median ARI of the automatic clustering (partitioned by the criterion's own algorithm).

**Real libraries** (``--real LIB FAMILIES.json``, repeatable): the ARI and purity against known families of
trained private experts, per feature (params, delta centred, delta raw, semantic with the base model) at the known
K and with each auto-K criterion.

    PYTHONPATH=src python benchmarks/cluster_recovery.py --draws 10 --out benchmarks/results/cluster_recovery
    PYTHONPATH=src python benchmarks/cluster_recovery.py --draws 10 --per-expert-seeds \
        --out benchmarks/results/cluster_recovery_per_expert_seeds
    PYTHONPATH=src python benchmarks/cluster_recovery.py --no-synthetic --real runs/demo6 demo_families.json ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from modlora.build.clustering import (
    SimilarityResult,
    cluster_experts,
    cluster_quality,
    delta_similarity,
    expert_similarity,
)
from modlora.build.clustering.choices import AUTO_K_CRITERIA
from modlora.library.adapters import LoraAdapter, LoraSpec

MODULES = [f"model.layers.{layer}.self_attn.{proj}" for layer in range(2) for proj in ("q_proj", "v_proj")]
SPEC = LoraSpec(rank=4, alpha=16.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
GRID = [(6, 3), (16, 2), (16, 4), (24, 6), (64, 2), (64, 4), (64, 8), (64, 16), (256, 4), (256, 16), (32, 1), (128, 1),
        (256, 1)]
# a criterion per partitioning algorithm (modlora.build.clustering.auto_k.CRITERION_ALGORITHM), to cluster at the
# planted K with it
ALGORITHM_CRITERION = {"spectral": "spectral", "kmeans": "silhouette"}
NOISE = [0.5, 1.0, 2.0]


def family_sizes(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """Random sizes of k families summing to n, each ≥ 2 (k = 1: n singletons, the null)."""
    if k == 1:
        return [1] * n
    return [2 + int(x) for x in rng.multinomial(n - 2 * k, rng.dirichlet(np.ones(k)))]


def synthetic_library(n: int, k: int, noise: float, seed: int, *, dim: int = 64, per_expert_seeds: bool = False,
                      common: float = 0.0) -> tuple[dict[str, LoraAdapter], dict[str, int]]:
    """n experts in k planted families of accumulated gradients (see the module docstring); ``common`` adds a
    component shared by every task, ``common · ‖T_f‖ · T_0 / ‖T_0‖`` (what all tasks learn alike)."""
    rng = np.random.default_rng(seed)
    sizes = family_sizes(n, k, rng)
    family = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(family)
    bound = 1.0 / np.sqrt(dim)
    shared_a = {m: rng.uniform(-bound, bound, size=(SPEC.rank, dim)) for m in MODULES}
    targets = {m: rng.normal(size=(len(sizes), dim, dim)) for m in MODULES}
    shared_target = {m: rng.normal(size=(dim, dim)) if common else np.zeros((dim, dim)) for m in MODULES}
    experts: dict[str, LoraAdapter] = {}
    truth: dict[str, int] = {}
    for i in range(n):
        f = int(family[i])
        A: dict[str, torch.Tensor] = {}
        B: dict[str, torch.Tensor] = {}
        for m in MODULES:
            a0 = rng.uniform(-bound, bound, size=(SPEC.rank, dim)) if per_expert_seeds else shared_a[m]
            own = rng.normal(size=(dim, dim))
            scale = np.linalg.norm(targets[m][f])
            grad = (targets[m][f] + noise * scale * own / np.linalg.norm(own)
                    + (common * scale * shared_target[m] / np.linalg.norm(shared_target[m]) if common else 0.0))
            b = -grad @ a0.T
            b *= 0.005 / np.abs(b).max()
            drift = -b.T @ grad
            A[m] = torch.from_numpy(a0 + 0.001 * drift / np.abs(drift).max()).float()
            B[m] = torch.from_numpy(b).float()
        name = f"task{i:03d}"
        experts[name] = LoraAdapter(SPEC, A, B)
        truth[name] = f
    return experts, truth


def similarities(experts: dict[str, LoraAdapter]) -> dict[str, SimilarityResult]:
    return {"params": expert_similarity(experts), "delta": delta_similarity(experts, centre=False),
            "delta (centred)": delta_similarity(experts, centre=True)}


def ari(result: Any, truth: Mapping[str, Any]) -> float:
    names = [n for n in result.names if n in truth]
    return float(adjusted_rand_score([truth[n] for n in names], [result.assignment[n] for n in names]))


@dataclass
class Row:
    experts: int
    planted_k: int
    noise: float
    features: str
    draws: int
    ari_at_planted_k: dict[str, float]  # by partitioning algorithm (empty for the null, K = 1)
    recovery: dict[str, float]
    median_k: dict[str, float]
    median_auto_ari: dict[str, float]
    seconds: float


def run_synthetic(draws: int, per_expert_seeds: bool, grid: list[tuple[int, int]], noises: list[float],
                  criteria: list[str], stability_max_experts: int, common: float = 0.0) -> list[Row]:
    rows: list[Row] = []
    for n, k in grid:
        for noise in noises if k > 1 else [0.0]:
            per_feature: dict[str, dict[str, list]] = {}
            started = time.perf_counter()
            for draw in range(draws):
                experts, truth = synthetic_library(n, k, noise, seed=1000 * draw + 7 * n + k,
                                                   per_expert_seeds=per_expert_seeds, common=common)
                for features, sim in similarities(experts).items():
                    acc = per_feature.setdefault(features, {})
                    if k > 1:
                        for algorithm, criterion in ALGORITHM_CRITERION.items():
                            acc.setdefault(f"ari@k/{algorithm}", []).append(
                                ari(cluster_experts(sim, k=k, seed=draw, auto_k=criterion), truth))
                    for criterion in criteria:
                        if criterion == "stability" and n > stability_max_experts:
                            continue
                        auto = cluster_experts(sim, k="auto", seed=draw, auto_k=criterion)
                        acc.setdefault(f"k/{criterion}", []).append(auto.k)
                        acc.setdefault(f"ari/{criterion}", []).append(ari(auto, truth) if k > 1 else 0.0)
            seconds = time.perf_counter() - started
            for features, acc in per_feature.items():
                done = [c for c in criteria if f"k/{c}" in acc]
                row = Row(experts=n, planted_k=k, noise=noise, features=features, draws=draws,
                          ari_at_planted_k={a: float(np.mean(acc[f"ari@k/{a}"])) for a in ALGORITHM_CRITERION
                                            if f"ari@k/{a}" in acc},
                          recovery={c: float(np.mean(np.array(acc[f"k/{c}"]) == k)) for c in done},
                          median_k={c: float(np.median(acc[f"k/{c}"])) for c in done},
                          median_auto_ari={c: float(np.median(acc[f"ari/{c}"])) for c in done},
                          seconds=seconds)
                rows.append(row)
                print(json.dumps(asdict(row)), flush=True)
    return rows


def run_real(library: str, families_file: str, model: str | None, data: str | None, criteria: list[str]
             ) -> list[dict]:
    """ARI against known families for each feature on a trained library (families: {task: family})."""
    from modlora.build.clustering import expert_semantic_similarity
    from modlora.data import default_sni_dir, load_sni_tasks
    from modlora.library.store import ExpertLibrary

    families = json.loads(Path(families_file).read_text())
    sims: dict[str, SimilarityResult] = {}
    if library == "-":  # no trained experts: semantic features of the tasks themselves
        names = sorted(families)
    else:
        lib = ExpertLibrary(library)
        names = [n for n in lib.expert_names() if n in families]
        experts = {n: lib.get(n) for n in names}
        sims = {"params": expert_similarity(experts), "delta": delta_similarity(experts, centre=False),
                "delta (centred)": delta_similarity(experts, centre=True)}
    k = len(set(families[n] for n in names))
    if model:
        from modlora.models import load_base_model

        lm = load_base_model(model)
        tasks = load_sni_tasks(data or default_sni_dir(), names)
        sims["semantic"] = expert_semantic_similarity(lm, {n: [n] for n in names}, tasks)
    out = []
    for features, sim in sims.items():
        off = sim.similarity[~np.eye(len(names), dtype=bool)]
        same = np.array([[families[a] == families[b] and a != b for b in sim.names] for a in sim.names])
        diff = np.array([[families[a] != families[b] for b in sim.names] for a in sim.names])
        at_k = cluster_quality(cluster_experts(sim, k=k), families)
        row = {"library": library, "experts": len(names), "families": k, "features": features,
               "ari_at_known_k": at_k.ari, "purity_at_known_k": at_k.purity,
               "within_family_cosine": float(sim.similarity[same].mean()),
               "across_family_cosine": float(sim.similarity[diff].mean()),
               "off_diagonal_range": [float(off.min()), float(off.max())]}
        for criterion in criteria:
            auto = cluster_experts(sim, k="auto", auto_k=criterion)
            quality = cluster_quality(auto, families)
            row[f"k/{criterion}"] = auto.k
            row[f"ari/{criterion}"] = quality.ari
            row[f"purity/{criterion}"] = quality.purity
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def markdown(rows: list[Row], real: list[dict], command: str, meta: dict, criteria: list[str]) -> str:
    setting = "per-expert seeds" if meta["per_expert_seeds"] else "one shared A init"
    if meta.get("common"):
        setting += f", a component common to all tasks of weight {meta['common']:g}"
    lines = [f"# Cluster recovery ({setting})", "",
             f"Command: `{command}`", "",
             f"Machine: {meta['machine']}, load before/after {meta['load_before']} / {meta['load_after']}, "
             f"{meta['seconds']:.0f} s.", ""]
    if rows:
        lines += ["Synthetic libraries (module docstring of `benchmarks/cluster_recovery.py`): "
                  f"{meta['draws']} draws per row. `ARI@K`: mean ARI at the planted K of spectral clustering / "
                  "k-means on the rows of S. Per criterion: "
                  "recovery = fraction of draws choosing the planted K (no_structure counts as K = 1), "
                  "median chosen K, median ARI of the automatic clustering. Planted K = 1 is the null "
                  "(no families): recovery there = how often the criterion says *no structure*. "
                  "Semantic features: not applicable (synthetic experts have no task text).", ""]
        head = "| E | K | noise | features | ARI@K spectral / k-means | " + " | ".join(f"{c}: rec / K̃ / ARI" for c in criteria) + " |"
        lines += [head, "|" + "---|" * (5 + len(criteria))]
        for r in rows:
            cells = [f"{r.recovery[c]:.0%} / {r.median_k[c]:g} / {r.median_auto_ari[c]:.2f}" if c in r.recovery
                     else "–" for c in criteria]
            ari_cell = " / ".join(f"{r.ari_at_planted_k[a]:.2f}" for a in ALGORITHM_CRITERION
                                  if a in r.ari_at_planted_k) or "–"
            lines.append(f"| {r.experts} | {r.planted_k} | {r.noise:g} | {r.features} | {ari_cell} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if real:
        lines += ["Real private libraries against their known task families (ARI / purity at the known K with the "
                  "default algorithm, and chosen K / ARI / purity per criterion):", "",
                  "| library | E | families | features | ARI / purity @K | within / across cosine | "
                  + " | ".join(f"{c}: K / ARI / purity" for c in criteria) + " |",
                  "|" + "---|" * (6 + len(criteria))]
        for r in real:
            cells = [f"{r[f'k/{c}']} / {r[f'ari/{c}']:.2f} / {r[f'purity/{c}']:.2f}" for c in criteria]
            lines.append(f"| {r['library']} | {r['experts']} | {r['families']} | {r['features']} | "
                         f"{r['ari_at_known_k']:.2f} / {r['purity_at_known_k']:.2f} | {r['within_family_cosine']:.2f} / "
                         f"{r['across_family_cosine']:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--per-expert-seeds", action="store_true")
    parser.add_argument("--noise", type=float, nargs="+", default=NOISE)
    parser.add_argument("--common", type=float, default=0.0,
                        help="weight of a gradient component shared by all tasks (relative to a family's)")
    parser.add_argument("--grid", default=None, help="E:K pairs, e.g. 16:2,64:8 (default: the built-in grid)")
    parser.add_argument("--criteria", nargs="+", default=list(AUTO_K_CRITERIA), choices=AUTO_K_CRITERIA)
    parser.add_argument("--stability-max-experts", type=int, default=64,
                        help="skip the (costly) stability criterion on larger libraries")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--real", nargs=2, action="append", default=[], metavar=("LIBRARY", "FAMILIES_JSON"))
    parser.add_argument("--model", default=None, help="base model for semantic features on --real libraries")
    parser.add_argument("--data", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/cluster_recovery")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = GRID if args.grid is None else [tuple(int(x) for x in p.split(":")) for p in args.grid.split(",")]
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    rows = [] if args.no_synthetic else run_synthetic(args.draws, args.per_expert_seeds, grid, args.noise,
                                                      args.criteria, args.stability_max_experts, args.common)
    real = [r for lib, fam in args.real for r in run_real(lib, fam, args.model, args.data, args.criteria)]
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                       f"{args.threads}", "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()], "seconds": time.perf_counter() - started,
            "draws": args.draws, "per_expert_seeds": args.per_expert_seeds, "common": args.common}
    command = "PYTHONPATH=src python " + " ".join(["benchmarks/cluster_recovery.py", *sys.argv[1:]])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "meta": meta, "synthetic": [asdict(r) for r in rows],
                                                    "real": real}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, real, command, meta, args.criteria))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
