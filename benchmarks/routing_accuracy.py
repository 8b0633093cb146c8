"""Routing benchmark: does a router send each prompt to the expert trained on its task? No generation: minutes.

For every library and router, on the held-out *test* split of each of the library's tasks (``--per-task`` prompts,
never seen in training; the split is the build's seeded 80/10/10):

* **top-1**: share of prompts whose routing mass, averaged over the prompt's tokens and the adapted layers, is
  largest on the prompt's own expert (chance 1/E); **top-2**: own expert among the two largest (chance 2/E);
* **own mass**: mean share of the routing mass on the own expert (uniform routing: 1/E);
* **per layer**: top-1 on each layer's mass alone, summarised per decoder block (mean over its adapted layers).

Only tasks with exactly one routed expert count (:func:`modlora.evaluation.indist.own_routed_expert`). Routers are
``METHOD[:opt=value,...]`` of :data:`modlora.reuse.methods.REGISTRY` (``arrow``, ``arrow:remove_common=1``,
``arrow:temperature=sqrt_d``, ``centroid``, ``tp``, ...). ``centroid`` and ``tp`` need data: they are fitted on the
experts' *training* split (``examples_per_expert``), never on the prompts scored. With ``--families FILE`` (task →
family JSON) each library also gets the adjusted Rand index of ΔW-MBC (k-means on the ΔW cosine, K = the number of
families) against the families.

Writes ``OUT.json`` (every figure, per layer too) and ``OUT.md``::

    python benchmarks/routing_accuracy.py runs/curve/shared-lr1e-3-s12 runs/curve/eva-lr1e-3-s12 \\
        --routers arrow centroid tp --per-task 20 --families benchmarks/configs/families-cpu-medium.json \\
        --out benchmarks/results/routing_accuracy_curve --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from modlora.cli import quiet_libraries
from modlora.data import TRUNCATE_MODES, default_sni_dir, load_sni_tasks, split_instances
from modlora.errors import ModloraError
from modlora.evaluation.indist import prompt_routing_accuracy, recorded_limits
from modlora.evaluation.results import RoutingAccuracy
from modlora.library.remote import open_library
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.reuse.methods import REGISTRY
from modlora.reuse.methods.core import TrainingDataOptions
from modlora.reuse.prepare import prepare_model


@dataclass
class RouterScore:
    """One library × router: its routing accuracy and how long routing the prompts took."""

    library: str
    router: str
    accuracy: RoutingAccuracy
    seconds: float
    per_block: dict[str, float] = field(default_factory=dict)


def parse_router(spec: str) -> tuple[str, dict[str, Any]]:
    """``arrow:top_k=2,remove_common=1`` → ``("arrow", {"top_k": 2, "remove_common": 1})`` (values as JSON when
    they parse, else strings)."""
    method, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ModloraError(f"router {spec!r}: option {item!r} is not key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    REGISTRY.get(method).options_from(options)  # validates the name and the options before any model loads
    return method, options


def per_block(acc: RoutingAccuracy) -> dict[str, float]:
    """Top-1 per decoder block: the mean of its adapted layers' per-layer accuracy (``model.layers.7.self_attn.q_proj``
    → block ``7``)."""
    blocks: dict[str, list[float]] = {}
    for layer, value in acc.per_layer.items():
        m = re.search(r"\.(\d+)\.", layer)
        blocks.setdefault(m.group(1) if m else layer, []).append(value)
    return {b: statistics.fmean(v) for b, v in sorted(blocks.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit()
                                                          else -1)}


def markdown(scores: list[RouterScore], ari: dict[str, float], meta: dict[str, Any]) -> str:
    lines = [f"# Routing accuracy\n\n`{meta['command']}`\n",
             f"{meta['prompts_per_task']} test prompts per task (never trained on), cut as each library's experts "
             f"were trained ({meta['prompt_limits']}; prompts cut / with the definition cut / all, per library: "
             f"{meta['cut_prompts_definitions_total']}); load average {meta['load_before']} → "
             f"{meta['load_after']}.\n",
             "| library | router | E | top-1 | top-2 | own mass | chance top-1 | best block | worst block | s |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for s in scores:
        a = s.accuracy
        best = max(s.per_block.items(), key=lambda kv: kv[1]) if s.per_block else ("-", float("nan"))
        worst = min(s.per_block.items(), key=lambda kv: kv[1]) if s.per_block else ("-", float("nan"))
        lines.append(f"| {s.library} | {s.router} | {a.experts} | {a.overall:.1%} | {a.top2:.1%} | {a.own_mass:.1%} | "
                     f"{a.chance:.1%} | {best[0]}: {best[1]:.0%} | {worst[0]}: {worst[1]:.0%} | {s.seconds:.0f} |")
    if ari:
        lines += ["", "| library | ΔW-MBC ARI against the families |", "|---|---:|"]
        lines += [f"| {lib} | {value:.2f} |" for lib, value in ari.items()]
    return "\n".join(lines) + "\n"


def library_budget(library: ExpertLibrary) -> dict[str, Any]:
    """The training budget of a library's experts (its first expert's record: optimizer steps and batch size, ``None``
    where an expert records none, e.g. an imported one) and its initialisation (build config; ``shared`` when the
    build recorded none). Kept in the results so that a budget curve can be drawn after the library is gone."""
    training = library.entry(library.expert_names()[0]).training
    return {"steps": training.get("steps"), "batch_size": training.get("batch_size"),
            "init": (library.load_meta("build_config") or {}).get("init", "shared")}


def delta_mbc_ari(library: ExpertLibrary, families: dict[str, str]) -> tuple[float, list[list[str]]]:
    """ARI of ΔW-MBC (k-means on the rows of the ΔW cosine, K = the number of families) against ``families``, and
    the clusters (expert names)."""
    from modlora.build.clustering import cluster_quality, model_based_clustering

    names = library.expert_names()
    labels = {n: families[t] for n in names for t in library.tasks(n) if t in families}
    k = len(set(labels.values()))
    clustering = model_based_clustering(library, k, features="delta", partition="kmeans")
    return cluster_quality(clustering, labels).ari, [list(c) for c in clustering.clusters]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("libraries", nargs="+", type=Path, help="expert library directories")
    ap.add_argument("--routers", nargs="+", default=["arrow", "centroid", "tp"],
                    help="METHOD[:opt=value,...] of the registry (default: arrow centroid tp)")
    ap.add_argument("--per-task", type=int, default=20, help="test prompts per task (default 20)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="prompt cap (default: the library's, from its training record)")
    ap.add_argument("--split-seed", type=int, default=0, help="the build's split seed (default 0)")
    ap.add_argument("--truncate", choices=TRUNCATE_MODES, default=None,
                    help="how a prompt over the cap is cut: left (the definition's start goes first) or input (the "
                         "instance input's end goes; the definition stays whole); default: the library's")
    ap.add_argument("--families", type=Path, default=None, help="task → family JSON: adds ΔW-MBC's ARI")
    ap.add_argument("--data", type=Path, default=None, help="SNI task directory (default ../shared/data/sni/tasks)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    try:
        routers = [(spec, *parse_router(spec)) for spec in args.routers]
        libraries = {str(p): open_library(p) for p in args.libraries}
        families = json.loads(args.families.read_text()) if args.families else None
    except (ModloraError, OSError, json.JSONDecodeError) as err:
        ap.error(str(err))
    if args.per_task < 1:
        ap.error("--per-task must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lm = load_base_model(args.model, dtype=args.dtype)
    task_dir = str(args.data or default_sni_dir())
    scores: list[RouterScore] = []
    ari: dict[str, float] = {}
    cuts: dict[str, list[int]] = {}
    caps: dict[str, dict[str, Any]] = {}
    budgets: dict[str, dict[str, Any]] = {}
    clusters: dict[str, list[list[str]]] = {}
    for path, library in libraries.items():
        limits = dataclasses.replace(recorded_limits(library), **{k: v for k, v in (("max_prompt_tokens", args.max_prompt_tokens),
                                                                   ("truncate", args.truncate)) if v is not None})
        fmt = limits.formatter(lm.tokenizer)
        tasks = load_sni_tasks(task_dir, sorted({t for n in library.expert_names() for t in library.tasks(n)}))
        prompts = []
        for name, task in tasks.items():
            test = split_instances(task, seed=args.split_seed)["test"]
            if len(test) < args.per_task:
                ap.error(f"{path}: task {name} has {len(test)} test instances, fewer than --per-task {args.per_task}")
            prompts += [fmt.encode(task, inst) for inst in test[: args.per_task]]
        cuts[path] = [fmt.cut_prompts, fmt.cut_definitions, len(prompts)]
        caps[path] = limits.record()
        budgets[path] = library_budget(library)
        print(f"{path}: {len(prompts)} prompts, {fmt.cut_prompts} over the cap of {limits.max_prompt_tokens} "
              f"({fmt.cut_definitions} with the definition cut; truncate {limits.truncate})", flush=True)
        for spec, method, options in routers:
            if issubclass(REGISTRY.get(method).Options, TrainingDataOptions):
                options = {"task_dir": task_dir, **options}
            t0 = time.perf_counter()
            rm = prepare_model(lm, library, method, options)
            try:
                acc = prompt_routing_accuracy(rm, prompts, library)
            finally:
                rm.restore()
            score = RouterScore(path, spec, acc, time.perf_counter() - t0, per_block(acc))
            scores.append(score)
            print(f"{path} {spec}: top-1 {acc.overall:.1%} top-2 {acc.top2:.1%} own mass {acc.own_mass:.1%} "
                  f"(E = {acc.experts}, chance {acc.chance:.1%}, {acc.n} prompts, {score.seconds:.0f} s)", flush=True)
        if families is not None:
            ari[path], clusters[path] = delta_mbc_ari(library, families)
            print(f"{path}: ΔW-MBC ARI {ari[path]:.2f}, clusters {clusters[path]}", flush=True)
    meta = {"command": "python benchmarks/routing_accuracy.py " + " ".join(sys.argv[1:]),
            "prompts_per_task": args.per_task, "prompt_limits": caps, "cut_prompts_definitions_total": cuts,
            "budgets": budgets,
            "load_before": load_before, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "ari": ari, "clusters": clusters, "scores": [{**asdict(s), "accuracy": s.accuracy.to_dict()} for s in scores]},
        indent=1))
    args.out.with_suffix(".md").write_text(markdown(scores, ari, meta))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
