"""The paper's experiment end to end at a configurable scale (the demo and ``benchmarks/study.py`` use it): what
:class:`~modlora.study.config.StudyConfig` names is built, evaluated and reported (:mod:`modlora.study.report`).

Steps, all resumable (finished experts and finished result rows are reused):

1. build the libraries named in the config over the training tasks (:mod:`modlora.build.strategies`): ``private``,
   ``mbc``, ``mbc-params``, ``shared``, ``random``, ``semantic``, ``poly``, ``mhr``, ``mbc-share``, ``semantic-share``
   (:data:`~modlora.study.config.LIBRARIES`). MBC's stage 1 is a separate private library trained with
   ``stage1_fraction`` of the budget (the paper's protocol), or — with ``mbc_reuses_private``, to save time in small
   runs — the private library itself: the clustering then sees fully trained private experts while MBC is charged
   only ``stage1_fraction`` of their cost, which slightly favours MBC (the tables say which was used);
2. cluster plot of the private library (similarity ordered by cluster);
3. for every row ``[library, method]`` or ``[library, method, {options}]`` (a method of the registry,
   :mod:`modlora.reuse.methods`, with its options; or ``lorahub``, the few-shot row): held-out SNI Rouge-L / exact match
   (greedy), in-distribution Rouge-L on the training tasks' *test* split, routing accuracy of per-token routers on
   in-distribution prompts (:func:`modlora.evaluation.prompt_routing_accuracy`), inference throughput (generated +
   prompt tokens per second), and training compute of the library; the benchmarks (``choice_tasks``) on the rows
   named in ``choice_rows`` (every row when it is ``None``);
4. a JSON with everything, a Markdown table and plots (:mod:`modlora.study.report`).

Compute matching: every library gets ``steps_per_task`` optimizer steps per training task in total (see
:mod:`modlora.build.strategies`); with ``mbc_reuses_private`` the MBC row reuses the private experts as its stage 1 and the
table reports MBC's training compute as stage 1 (``stage1_fraction`` of the private cost) + stage 2.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from modlora.build.clustering import partition_quality, plot_clustering, read_label_file
from modlora.build.strategies import (
    build_mbc_library,
    build_poly_library,
    build_private_library,
    build_random_library,
    build_semantic_library,
    build_shared_library,
)
from modlora.data import PromptFormatter, default_data_dir, encode_tasks, load_sni_tasks, split_instances
from modlora.errors import ModloraError
from modlora.evaluation.generation import generate_and_score
from modlora.evaluation.indist import own_routed_expert, prompt_routing_accuracy
from modlora.evaluation.rank_classification import evaluate_choice_tasks
from modlora.evaluation.results import mean_and_stderr, read_json
from modlora.io import atomic_write_bytes, atomic_write_json
from modlora.library.shared_expert import ShareInfo
from modlora.library.store import ExpertLibrary
from modlora.models import LoadedModel, load_base_model
from modlora.reuse.methods import REGISTRY
from modlora.reuse.prepare import prepare_model
from modlora.study.config import LIBRARIES, LORAHUB_ROW, MBC_FEATURES, StudyConfig, row_key
from modlora.study.report import plot_paired, plot_results, print_study_results, results_markdown
from modlora.study.stats import mean_of_means


def build_libraries(cfg: StudyConfig, out: Path, device: str | None, console: Console, data_dir: Path
                    ) -> dict[str, ExpertLibrary]:
    """Build (or resume) every library of the study; returns them by name."""
    unknown = [name for name in cfg.libraries if name not in LIBRARIES]
    if unknown:
        raise ModloraError(f"unknown study librar{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                           f"choose from {', '.join(LIBRARIES)}")
    bcfg = cfg.build_config(device, data_dir)
    libs: dict[str, ExpertLibrary] = {}
    mbc_kinds = [name for name in MBC_FEATURES if name in cfg.libraries]
    need_private = "private" in cfg.libraries or (bool(mbc_kinds) and cfg.mbc_reuses_private)
    if need_private:
        console.print(f"[bold]private library[/]: {len(cfg.train_tasks)} experts × {cfg.steps_per_task} steps")
        libs["private"] = build_private_library(out / "private", cfg.train_tasks, bcfg)
    for name in mbc_kinds:
        libs[name], clustering = build_mbc_library(
            out / name, cfg.train_tasks, bcfg, k=cfg.k, stage1_fraction=cfg.stage1_fraction,
            private_library=out / "private" if cfg.mbc_reuses_private else None,
            share_fraction=cfg.share_fraction if name == "mbc-share" else None, share_mode=cfg.share_mode,
            features=MBC_FEATURES[name])
        console.print(f"[bold]{name}[/]: K={clustering.k} clusters {clustering.clusters}")
        plot_clustering(clustering, out / f"{name}_clusters.png",
                        title=f"{cfg.name}: {name} similarity ({clustering.features})")
        atomic_write_bytes(out / f"{name}_clusters.json", clustering.to_json().encode())
    for name in ("semantic", "semantic-share"):
        if name in cfg.libraries:
            libs[name], clustering = build_semantic_library(
                out / name, cfg.train_tasks, bcfg, k=cfg.k,
                share_fraction=cfg.share_fraction if name == "semantic-share" else None,
                share_mode=cfg.share_mode)
            console.print(f"[bold]{name}[/]: K={clustering.k} clusters {clustering.clusters}")
            atomic_write_bytes(out / f"{name}_clusters.json", clustering.to_json().encode())
    for name in ("poly", "mhr"):
        if name in cfg.libraries:
            console.print(f"[bold]{name} library[/]: {cfg.skills} skills")
            libs[name] = build_poly_library(out / name, cfg.train_tasks, bcfg, skills=cfg.skills,
                                            heads=cfg.mhr_heads if name == "mhr" else 1,
                                            allocation_lr=cfg.allocation_lr)
    if "shared" in cfg.libraries:
        console.print("[bold]shared library[/]")
        libs["shared"] = build_shared_library(out / "shared", cfg.train_tasks, bcfg)
    if "random" in cfg.libraries:
        libs["random"], _ = build_random_library(out / "random", out / "mbc", bcfg, seed=cfg.seed + 1)
    return libs


def training_compute(lib: ExpertLibrary) -> dict[str, float]:
    """Tokens and seconds spent training the library's experts (from the manifest)."""
    tokens = sum(float(lib.entry(n).metrics.get("train_tokens", 0)) for n in lib.expert_names())
    seconds = sum(float(lib.entry(n).metrics.get("train_seconds", 0)) for n in lib.expert_names())
    return {"train_tokens": tokens, "train_seconds": seconds}


@dataclass(frozen=True)
class TaskPartition:
    """How a clustered library (MBC, semantic, random) splits the training tasks: ``k`` routed experts (a
    ``--share`` library's shared expert left out), ``clusters`` their task lists, and against reference task
    families (when given) the adjusted Rand index ``ari`` and ``purity``."""

    k: int
    clusters: list[list[str]]
    ari: float | None = None
    purity: float | None = None


def task_partition(lib: ExpertLibrary, tasks: Sequence[str], families: Mapping[str, str] | None
                   ) -> TaskPartition | None:
    """The library's partition of ``tasks`` when its routed experts cover each task exactly once with fewer
    experts than tasks (a clustered library); ``None`` otherwise (private, shared, Poly/MHR skills)."""
    share = ShareInfo.of(lib)
    names = share.routed(lib.expert_names()) if share else lib.expert_names()
    clusters = [list(lib.tasks(name)) for name in names]
    if not 1 < len(names) < len(tasks) or sorted(t for c in clusters for t in c) != sorted(tasks):
        return None
    if families is None:
        return TaskPartition(len(names), clusters)
    quality = partition_quality(own_routed_expert(lib, names), families)
    return TaskPartition(len(names), clusters, quality.ari, quality.purity)


def _heldout(cfg: StudyConfig, data_dir: Path) -> dict[str, Any]:
    """The held-out tasks by name, each read from ``sni/heldout`` (the SNI test tasks) or else from the pool
    ``sni/tasks``; all SNI test tasks when ``heldout_tasks`` is ``None``."""
    from modlora.data import sni_task_files
    test = sni_task_files(data_dir / "sni" / "heldout")
    names = cfg.heldout_tasks or sorted(test)
    pool = [n for n in names if n not in test]
    tasks = load_sni_tasks(data_dir / "sni" / "heldout", [n for n in names if n in test])
    tasks |= load_sni_tasks(data_dir / "sni" / "tasks", pool) if pool else {}
    return {n: tasks[n] for n in names}


def evaluate_row(lm: LoadedModel, lib: ExpertLibrary | None, row: Sequence[Any], cfg: StudyConfig, data_dir: Path,
                 heldout: Mapping[str, Any], train_tasks: Mapping[str, Any]) -> dict[str, Any]:
    """Scores of one ``[library, method(, options)]`` row: held-out SNI, in-distribution, routing accuracy,
    throughput. What applies follows the method's capabilities: a method that needs task labels (the oracle) is
    scored in distribution only; one that routes per example from the whole prompt (the task predictor) scores a
    benchmark's options with their context, not from a shared prefix; per-token routers get the routing accuracy."""
    method = row[1]
    fmt = cfg.limits.formatter(lm.tokenizer)
    if method == LORAHUB_ROW:
        if lib is None:
            raise ModloraError("the lorahub row needs a library")
        return _lorahub_row(lm, lib, cfg, fmt, heldout)
    caps = REGISTRY.get(method).capabilities
    t_prep = time.perf_counter()
    rm = prepare_model(lm, lib, method, cfg.row_options(row, data_dir))
    out: dict[str, Any] = {"method": method, "heldout": {}, "indist": {}, "choice": {},
                           "prepare_seconds": time.perf_counter() - t_prep}
    gen_tokens, gen_seconds = 0, 0.0

    def generate(model: Any, task: Any, instances: Sequence[Any]) -> dict[str, Any]:
        nonlocal gen_tokens, gen_seconds
        t0 = time.perf_counter()
        scores, tokens = generate_and_score(model, lm.tokenizer, fmt, task, instances,
                                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size)
        gen_seconds += time.perf_counter() - t0
        gen_tokens += tokens
        return _task_cell(scores)

    try:
        if not caps.needs_task_labels and cfg.scores_choice(row):
            run = evaluate_choice_tasks(rm, lm.tokenizer, cfg.choice_tasks, data_dir=data_dir, limit=cfg.choice_limit,
                                        seed=cfg.seed, batch_size=cfg.choice_batch_size,
                                        prefix_reuse=not caps.per_example, progress=True)
            for task, sc in run.tasks.items():
                out["choice"][task] = {"acc_norm": sc.metrics["acc_norm"], "stderr": sc.stderr["acc_norm"],
                                       "acc": sc.metrics["acc"], "n": sc.n}
        if not caps.needs_task_labels:
            for name, task in heldout.items():
                out["heldout"][name] = generate(rm, task, task.instances[: cfg.heldout_limit])
        for name, task in train_tasks.items():
            insts = split_instances(task, seed=cfg.seed)["test"][: cfg.indist_limit]
            out["indist"][name] = generate(rm.for_task(name) if caps.needs_task_labels else rm, task, insts)
        if caps.per_token and lib is not None and own_routed_expert(lib, rm.routed.expert_names):
            exs = encode_tasks(fmt, train_tasks, "test", max_per_task=cfg.indist_limit, seed=cfg.seed)
            out["routing_accuracy"] = prompt_routing_accuracy(rm, exs, lib).to_dict()
    finally:
        rm.restore()
    return _finish_row(out, gen_tokens, gen_seconds)


def _lorahub_row(lm: LoadedModel, lib: ExpertLibrary, cfg: StudyConfig, fmt: PromptFormatter,
                 heldout: Mapping[str, Any]) -> dict[str, Any]:
    """LoraHub is few-shot: per held-out task, search expert weights (nevergrad, ``lorahub_budget`` evaluations) on
    ``lorahub_shots`` labelled instances that follow the evaluated ones, merge the combined adapter, generate, and
    restore the base weights. Only the held-out SNI column applies (no shots are defined for the benchmarks, and in
    distribution the oracle is the few-shot ceiling)."""
    from modlora.library.adapters import merge_adapter
    from modlora.reuse.learned.lorahub import lorahub_search, restored_weights

    experts = lib.experts(lib.expert_names())
    device = next(lm.model.parameters()).device
    row: dict[str, Any] = {"method": "lorahub", "heldout": {}, "indist": {}, "choice": {}, "lorahub_weights": {},
                           "prepare_seconds": 0.0}
    gen_tokens, gen_seconds = 0, 0.0
    for name, task in heldout.items():
        shots = task.instances[cfg.heldout_limit: cfg.heldout_limit + cfg.lorahub_shots]
        if not shots:
            raise ModloraError(f"held-out task {name}: no instances left for LoraHub shots after the first "
                               f"{cfg.heldout_limit}")
        examples = [fmt.encode(task, inst).labelled(device) for inst in shots]
        t0 = time.perf_counter()
        res = lorahub_search(lm.model, experts, examples, budget=cfg.lorahub_budget, seed=cfg.seed)
        row["prepare_seconds"] += time.perf_counter() - t0
        row["lorahub_weights"][name] = res.weights
        with restored_weights(lm.model, res.adapter.modules), torch.no_grad():
            merge_adapter(lm.model, res.adapter)
            t0 = time.perf_counter()
            scores, tokens = generate_and_score(lm.model, lm.tokenizer, fmt, task, task.instances[: cfg.heldout_limit],
                                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size)
            gen_seconds += time.perf_counter() - t0
            gen_tokens += tokens
        row["heldout"][name] = _task_cell(scores)
    return _finish_row(row, gen_tokens, gen_seconds)


def _task_cell(scores: Mapping[str, list[float]]) -> dict[str, Any]:
    """One task's mean of each per-example metric and its count; the per-example Rouge-L rides along (under
    ``_per_example_rougeL``) until :func:`_finish_row` pools it over the row's tasks."""
    return ({k: mean_and_stderr(v)[0] for k, v in scores.items()}
            | {"n": len(scores["rougeL"]), "_per_example_rougeL": scores["rougeL"]})



def _finish_row(row: dict[str, Any], gen_tokens: int, gen_seconds: float) -> dict[str, Any]:
    """Throughput and the pooled means ± standard errors of a row's per-task scores."""
    row["tokens_per_second"] = gen_tokens / max(gen_seconds, 1e-9)
    if row["choice"]:
        row["choice_acc_norm"] = mean_of_means([(d["acc_norm"], d["stderr"]) for d in row["choice"].values()]) \
            | {"n": len(row["choice"])}
    for part in ("heldout", "indist"):
        vals = [r for d in row[part].values() for r in d.pop("_per_example_rougeL")]
        if vals:
            mean, se = mean_and_stderr(vals)
            row[f"{part}_rougeL"] = {"mean": mean, "stderr": se, "n": len(vals)}
            row[f"{part}_exact_match"] = sum(d["exact_match"] for d in row[part].values()) / len(row[part])
    return row


def run_study(cfg: StudyConfig, out: Path, *, device: str | None = None, data_dir: Path | None = None,
              console: Console | None = None) -> dict[str, Any]:
    """Build, evaluate and report; returns the results dict (also written to ``out/results.json``)."""
    console = console or Console()
    cfg.validate(cfg.name)
    start = time.perf_counter()
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", asdict(cfg))
    libs = build_libraries(cfg, out, device, console, data_dir)
    lm = load_base_model(cfg.model, device=device, dtype=cfg.dtype)
    heldout = _heldout(cfg, data_dir)
    train_tasks = load_sni_tasks(data_dir / "sni" / "tasks", cfg.train_tasks)
    rows_dir = out / "rows"
    results: dict[str, Any] = {"config": asdict(cfg), "rows": {}, "libraries": {},
                               "mbc_stage1": "private library reused" if cfg.mbc_reuses_private else "separate"}
    for name, lib in libs.items():
        results["libraries"][name] = {"path": str(lib.path), "experts": {n: lib.tasks(n) for n in lib.expert_names()},
                                      **training_compute(lib)}
    families = read_label_file(cfg.task_families) if cfg.task_families else None
    if cfg.heldout_groups:
        results["heldout_groups"] = {t: g for t, g in read_label_file(cfg.heldout_groups).items() if t in heldout}
    results["partitions"] = {name: asdict(part) for name, lib in libs.items()
                             if (part := task_partition(lib, cfg.train_tasks, families)) is not None}
    for name in MBC_FEATURES:
        if name in libs and cfg.mbc_reuses_private:  # MBC's stage 1 is part of its cost
            p = results["libraries"]["private"]
            results["libraries"][name]["train_tokens"] += cfg.stage1_fraction * p["train_tokens"]
            results["libraries"][name]["train_seconds"] += cfg.stage1_fraction * p["train_seconds"]
    for row in cfg.rows:
        lib_name, key = row[0], row_key(row)
        path = rows_dir / (key.replace("/", "__") + ".json")
        if path.is_file():
            results["rows"][key] = read_json(path, "study row")
            console.print(f"[dim]{key}: reused {path}[/]")
            continue
        if lib_name != "-" and lib_name not in libs:
            raise ModloraError(f"row {key}: library {lib_name!r} is not built in this study")
        console.print(f"evaluating [bold]{key}[/] …")
        t0 = time.perf_counter()
        scores = evaluate_row(lm, libs.get(lib_name), row, cfg, data_dir, heldout, train_tasks)
        scores["eval_seconds"] = time.perf_counter() - t0
        scores["library"] = lib_name
        atomic_write_json(path, scores)
        results["rows"][key] = scores
    results["wall_seconds"] = time.perf_counter() - start
    atomic_write_json(out / "results.json", results)
    table_md = results_markdown(results)
    atomic_write_bytes(out / "results.md", table_md.encode())
    plot_results(results, out / "results.png")
    plot_paired(results, out / "paired.png")
    print_study_results(results, console)
    return results
