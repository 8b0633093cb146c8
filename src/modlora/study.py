"""The paper's experiment end to end at a configurable scale (the demo and ``benchmarks/study.py`` use it).

Steps, all resumable (finished experts and finished result rows are reused):

1. build the libraries named in the config over the training tasks (:mod:`modlora.building`): ``private``,
   ``mbc``, ``shared``, ``random``. MBC's stage 1 is a separate private library trained with ``stage1_fraction``
   of the budget (the paper's protocol), or — with ``mbc_reuses_private``, to save time in small runs — the private
   library itself: the clustering then sees fully trained private experts while MBC is charged only
   ``stage1_fraction`` of their cost, which slightly favours MBC (the tables say which was used);
2. cluster plot of the private library (similarity ordered by cluster);
3. for every row ``(library, method)``: held-out SNI Rouge-L / exact match (greedy), in-distribution Rouge-L on the
   training tasks' *test* split, routing accuracy of per-token routers on in-distribution prompts (the share of
   examples whose routing mass, summed over tokens, is largest on their own task's expert — overall and per layer),
   inference throughput (generated + prompt tokens per second), and training compute of the library;
4. a JSON with everything, a Markdown table and plots.

Compute matching: every library gets ``steps_per_task`` optimizer steps per training task in total (see
:mod:`modlora.building`); with ``mbc_reuses_private`` the MBC row reuses the private experts as its stage 1 and the
table reports MBC's training compute as stage 1 (``stage1_fraction`` of the private cost) + stage 2.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from modlora.building import (
    BuildConfig,
    build_cluster_library,
    build_private_library,
    build_random_library,
    build_shared_library,
)
from modlora.clustering import model_based_clustering, plot_clustering
from modlora.data import PromptFormatter, collate, default_data_dir, encode_tasks, load_sni_tasks, split_instances
from modlora.errors import ModloraError
from modlora.evaluation.generation import greedy_generate, score_generations
from modlora.evaluation.rank_classification import evaluate_choice_tasks
from modlora.evaluation.results import mean_and_stderr
from modlora.io import atomic_write_bytes, atomic_write_json
from modlora.library import ExpertLibrary
from modlora.models import LoadedModel, load_base_model
from modlora.reuse import ReuseModel, RouterOptions, prepare_model

PER_TOKEN_ROUTERS = ("arrow", "centroid", "phatgoose")


@dataclass
class StudyConfig:
    """Everything a study run needs; ``from_json`` reads the shipped configs in ``benchmarks/configs``."""

    name: str = "study"
    model: str = "smollm2-135m"
    dtype: str | None = None
    train_tasks: list[str] = field(default_factory=list)
    steps_per_task: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    max_examples: int | None = None
    max_prompt_tokens: int = 256
    max_target_tokens: int = 64
    max_val: int = 16
    libraries: list[str] = field(default_factory=lambda: ["private", "mbc"])
    k: int | str = 3
    stage1_fraction: float = 0.4
    mbc_reuses_private: bool = True
    rows: list[list[str]] = field(default_factory=lambda: [["-", "base"], ["private", "mu"], ["private", "arrow"],
                                                           ["private", "oracle"], ["mbc", "mu"], ["mbc", "arrow"]])
    top_k: int = 4
    heldout_tasks: list[str] | None = None
    heldout_limit: int = 5
    indist_limit: int = 5
    max_new_tokens: int = 32
    gen_batch_size: int = 8
    choice_tasks: list[str] = field(default_factory=list)
    choice_limit: int | None = None
    choice_batch_size: int = 16
    examples_per_expert: int = 16
    phatgoose_steps: int = 100
    lorahub_shots: int = 5
    lorahub_budget: int = 40
    seed: int = 0

    @classmethod
    def from_json(cls, path: str | Path) -> StudyConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModloraError(f"{path}: cannot read study config ({exc})") from None
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ModloraError(f"{path}: unknown study setting(s): {', '.join(unknown)}")
        return cls(**raw)

    def build_config(self, device: str | None, data_dir: Path) -> BuildConfig:
        return BuildConfig(model=self.model, device=device, dtype=self.dtype, data_dir=str(data_dir / "sni" / "tasks"), steps_per_task=self.steps_per_task,
                           batch_size=self.batch_size, lr=self.lr, max_examples=self.max_examples, max_val=self.max_val,
                           max_prompt_tokens=self.max_prompt_tokens, max_target_tokens=self.max_target_tokens,
                           seed=self.seed)


def build_libraries(cfg: StudyConfig, out: Path, device: str | None, console: Console, data_dir: Path
                    ) -> dict[str, ExpertLibrary]:
    """Build (or resume) every library of the study; returns them by name."""
    bcfg = cfg.build_config(device, data_dir)
    libs: dict[str, ExpertLibrary] = {}
    need_private = "private" in cfg.libraries or ("mbc" in cfg.libraries and cfg.mbc_reuses_private)
    if need_private:
        console.print(f"[bold]private library[/]: {len(cfg.train_tasks)} experts × {cfg.steps_per_task} steps")
        libs["private"] = build_private_library(out / "private", cfg.train_tasks, bcfg)
    if "mbc" in cfg.libraries:
        stage1 = libs["private"] if cfg.mbc_reuses_private else build_private_library(
            out / "mbc-stage1", cfg.train_tasks, bcfg, budget_scale=cfg.stage1_fraction, stage="mbc-stage1")
        names = [stage1.task_to_expert()[t] for t in cfg.train_tasks]
        k = cfg.k if cfg.k == "auto" else int(cfg.k)
        clustering = model_based_clustering(stage1.experts(names), k, seed=cfg.seed, cache=stage1)
        console.print(f"[bold]MBC[/]: K={clustering.k} clusters {clustering.clusters}")
        plot_clustering(clustering, out / "mbc_clusters.png", title=f"{cfg.name}: MBC similarity")
        atomic_write_bytes(out / "mbc_clusters.json", clustering.to_json().encode())
        libs["mbc"] = build_cluster_library(out / "mbc", clustering, {n: stage1.tasks(n) for n in names}, bcfg,
                                            budget_per_task=1.0 - cfg.stage1_fraction, stage="mbc-stage2")
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


def _heldout(cfg: StudyConfig, data_dir: Path) -> dict[str, Any]:
    from modlora.data import sni_task_files
    directory = data_dir / "sni" / "heldout"
    names = cfg.heldout_tasks or sorted(sni_task_files(directory))
    return load_sni_tasks(directory, names)


def _generate_scores(model: Any, lm: LoadedModel, fmt: PromptFormatter, task: Any, instances: Sequence[Any],
                     cfg: StudyConfig) -> tuple[dict[str, list[float]], int]:
    prompts = [fmt.prompt_text(task.definition, inst.input) for inst in instances]
    preds = greedy_generate(model, lm.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.gen_batch_size, max_prompt_tokens=cfg.max_prompt_tokens)
    tokens = sum(len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    tokens += sum(len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in preds)
    return score_generations(preds, [inst.outputs for inst in instances]), tokens


def routing_accuracy(rm: ReuseModel, lm: LoadedModel, examples: Sequence[Any], expert_of_task: Mapping[str, str]
                     ) -> dict[str, Any]:
    """Share of examples whose routing mass (summed over the prompt's tokens) is largest on their task's expert,
    overall (mass averaged over layers) and per layer."""
    names = rm.routed.expert_names
    correct, per_layer_hits, n = 0, {}, 0
    for ex in examples:
        own = expert_of_task.get(ex.task)
        if own is None:
            continue
        ids = torch.tensor([ex.prompt_ids], device=rm.device)
        with torch.inference_mode(), rm.routed.record() as rec:
            rm.model(input_ids=ids)
        masses = {lay: rec.mass[lay] / max(rec.tokens[lay], 1) for lay in rec.mass}
        full = torch.zeros(len(names))
        for lay, m in masses.items():
            full += m
            per_layer_hits[lay] = per_layer_hits.get(lay, 0) + int(names[int(m.argmax())] == own)
        correct += int(names[int(full.argmax())] == own)
        n += 1
    return {"accuracy": correct / max(n, 1), "n": n,
            "per_layer": {lay: hits / max(n, 1) for lay, hits in sorted(per_layer_hits.items())}}


def evaluate_indist(rm: ReuseModel, lm: LoadedModel, library: ExpertLibrary, *, data_dir: Path,
                    limit: int = 10, seed: int = 0, max_new_tokens: int = 64, batch_size: int = 8,
                    max_prompt_tokens: int = 384) -> Any:
    """In-distribution suite: per library task, target loss and Rouge-L / exact match on the task's *test* split,
    plus the routing accuracy of per-token routers; returns an :class:`~modlora.evaluation.results.EvalRun`."""
    from modlora.evaluation.results import EvalRun, TaskScores
    from modlora.training import target_loss

    tasks = load_sni_tasks(data_dir / "sni" / "tasks", sorted({t for n in library.expert_names()
                                                               for t in library.tasks(n)}))
    fmt = PromptFormatter(lm.tokenizer, max_prompt_tokens=max_prompt_tokens)
    cfg = StudyConfig(max_new_tokens=max_new_tokens, gen_batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
    run = EvalRun(method=rm.method, model=lm.info.name, config={"kind": "indist", "limit": limit, "seed": seed,
                                                                  "library": str(library.path)})
    t_all = time.perf_counter()
    for name, task in tasks.items():
        t0 = time.perf_counter()
        insts = split_instances(task, seed=seed)["test"][:limit]
        model = rm.for_task(name) if rm.method == "oracle" else rm
        scores, _ = _generate_scores(model, lm, fmt, task, insts, cfg)
        losses = []
        for inst in insts:
            ex = fmt.encode(task, inst)
            batch = collate([ex], lm.tokenizer.pad_token_id).to(rm.device)
            with torch.inference_mode(), rm.per_example_routing(batch.input_ids, batch.attention_mask, [name]):
                loss, n = target_loss(rm.model, batch)
            losses.append(float(loss) / max(n, 1))
        scores["loss"] = losses
        run.tasks[name] = TaskScores.from_per_example(scores, wall_s=time.perf_counter() - t0)
    if rm.method in PER_TOKEN_ROUTERS:
        exs = encode_tasks(fmt, tasks, "test", max_per_task=limit, seed=seed)
        run.routing = {"accuracy": routing_accuracy(rm, lm, exs, {t: n for n in library.expert_names()
                                                                   for t in library.tasks(n)})}
    run.wall_s = time.perf_counter() - t_all
    return run


def evaluate_row(lm: LoadedModel, lib: ExpertLibrary | None, method: str, cfg: StudyConfig, data_dir: Path,
                 heldout: Mapping[str, Any], train_tasks: Mapping[str, Any]) -> dict[str, Any]:
    """Scores of one (library, method) row: held-out SNI, in-distribution, routing accuracy, throughput."""
    fmt = PromptFormatter(lm.tokenizer, max_prompt_tokens=cfg.max_prompt_tokens, max_target_tokens=cfg.max_target_tokens)
    if method == "lorahub":
        if lib is None:
            raise ModloraError("the lorahub row needs a library")
        return _lorahub_row(lm, lib, cfg, fmt, heldout)
    opts = RouterOptions(top_k=min(cfg.top_k, len(lib) if lib is not None else cfg.top_k), data_dir=str(
        data_dir / "sni" / "tasks"), examples_per_expert=cfg.examples_per_expert, phatgoose_steps=cfg.phatgoose_steps)
    t_prep = time.perf_counter()
    rm = prepare_model(lm, lib, method, opts) if lib is not None else ReuseModel("base", lm.model)
    row: dict[str, Any] = {"method": method, "heldout": {}, "indist": {}, "choice": {},
                           "prepare_seconds": time.perf_counter() - t_prep}
    gen_tokens, gen_seconds = 0, 0.0
    try:
        if method != "oracle" and cfg.choice_tasks:
            # a task predictor pools over the whole input, so contexts are not scored separately for it
            run = evaluate_choice_tasks(rm, lm.tokenizer, cfg.choice_tasks, data_dir=data_dir, limit=cfg.choice_limit,
                                        seed=cfg.seed, batch_size=cfg.choice_batch_size, prefix_reuse=method != "tp",
                                        progress=True)
            for task, sc in run.tasks.items():
                row["choice"][task] = {"acc_norm": sc.metrics["acc_norm"], "stderr": sc.stderr["acc_norm"],
                                       "acc": sc.metrics["acc"], "n": sc.n}
        if method != "oracle":
            for name, task in heldout.items():
                t0 = time.perf_counter()
                scores, tokens = _generate_scores(rm, lm, fmt, task, task.instances[: cfg.heldout_limit], cfg)
                gen_seconds += time.perf_counter() - t0
                gen_tokens += tokens
                row["heldout"][name] = _task_cell(scores)
        for name, task in train_tasks.items():
            insts = split_instances(task, seed=cfg.seed)["test"][: cfg.indist_limit]
            model = rm.for_task(name) if method == "oracle" else rm
            t0 = time.perf_counter()
            scores, tokens = _generate_scores(model, lm, fmt, task, insts, cfg)
            gen_seconds += time.perf_counter() - t0
            gen_tokens += tokens
            row["indist"][name] = _task_cell(scores)
        if method in PER_TOKEN_ROUTERS and lib is not None:
            exs = encode_tasks(fmt, train_tasks, "test", max_per_task=cfg.indist_limit, seed=cfg.seed)
            row["routing_accuracy"] = routing_accuracy(rm, lm, exs, {t: n for n in lib.expert_names()
                                                                     for t in lib.tasks(n)})
    finally:
        rm.restore()
    return _finish_row(row, gen_tokens, gen_seconds)


def _lorahub_row(lm: LoadedModel, lib: ExpertLibrary, cfg: StudyConfig, fmt: PromptFormatter,
                 heldout: Mapping[str, Any]) -> dict[str, Any]:
    """LoraHub is few-shot: per held-out task, search expert weights (nevergrad, ``lorahub_budget`` evaluations) on
    ``lorahub_shots`` labelled instances that follow the evaluated ones, merge the combined adapter, generate, and
    restore the base weights. Only the held-out SNI column applies (no shots are defined for the benchmarks, and in
    distribution the oracle is the few-shot ceiling)."""
    from modlora.adapters import merge_adapter
    from modlora.lorahub import lorahub_search, restored_weights

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
            scores, tokens = _generate_scores(lm.model, lm, fmt, task, task.instances[: cfg.heldout_limit], cfg)
            gen_seconds += time.perf_counter() - t0
            gen_tokens += tokens
        row["heldout"][name] = _task_cell(scores)
    return _finish_row(row, gen_tokens, gen_seconds)


def _task_cell(scores: Mapping[str, list[float]]) -> dict[str, Any]:
    """One task's mean of each per-example metric and its count; the per-example Rouge-L rides along (under
    ``_per_example_rougeL``) until :func:`_finish_row` pools it over the row's tasks."""
    return ({k: mean_and_stderr(v)[0] for k, v in scores.items()}
            | {"n": len(scores["rougeL"]), "_per_example_rougeL": scores["rougeL"]})


def _mean_of_means(cells: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Mean of ``(mean, stderr)`` cells with the standard error propagated: ``sqrt(Σ se²) / n``."""
    return {"mean": sum(m for m, _ in cells) / len(cells),
            "stderr": math.sqrt(sum(se * se for _, se in cells)) / len(cells)}


def _finish_row(row: dict[str, Any], gen_tokens: int, gen_seconds: float) -> dict[str, Any]:
    """Throughput and the pooled means ± standard errors of a row's per-task scores."""
    row["tokens_per_second"] = gen_tokens / max(gen_seconds, 1e-9)
    if row["choice"]:
        row["choice_acc_norm"] = _mean_of_means([(d["acc_norm"], d["stderr"]) for d in row["choice"].values()]) \
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
    if "mbc" in libs and cfg.mbc_reuses_private:  # MBC's stage 1 is part of its cost
        p = results["libraries"]["private"]
        results["libraries"]["mbc"]["train_tokens"] += cfg.stage1_fraction * p["train_tokens"]
        results["libraries"]["mbc"]["train_seconds"] += cfg.stage1_fraction * p["train_seconds"]
    for lib_name, method in cfg.rows:
        key = f"{lib_name}/{method}" if lib_name != "-" else method
        path = rows_dir / (key.replace("/", "__") + ".json")
        if path.is_file():
            results["rows"][key] = json.loads(path.read_text())
            console.print(f"[dim]{key}: reused {path}[/]")
            continue
        if lib_name != "-" and lib_name not in libs:
            raise ModloraError(f"row {key}: library {lib_name!r} is not built in this study")
        console.print(f"evaluating [bold]{key}[/] …")
        t0 = time.perf_counter()
        row = evaluate_row(lm, libs.get(lib_name), method, cfg, data_dir, heldout, train_tasks)
        row["eval_seconds"] = time.perf_counter() - t0
        row["library"] = lib_name
        atomic_write_json(path, row)
        results["rows"][key] = row
    results["wall_seconds"] = time.perf_counter() - start
    atomic_write_json(out / "results.json", results)
    table_md = results_markdown(results)
    atomic_write_bytes(out / "results.md", table_md.encode())
    plot_results(results, out / "results.png")
    print_results(results, console)
    return results


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
    return _mean_of_means(cells) if cells else None


def _headers(results: Mapping[str, Any]) -> list[str]:
    choice = list(results["config"].get("choice_tasks") or [])
    return (["row"] + choice + ["held-out SNI Rouge-L"] + (["average"] if choice else [])
            + ["in-dist Rouge-L", "routing acc.", "train tokens", "train s", "infer tok/s"])


def _row_cells(key: str, row: Mapping[str, Any], results: Mapping[str, Any]) -> list[str]:
    lib = results["libraries"].get(row.get("library", "-"), {})
    acc = row.get("routing_accuracy", {}).get("accuracy")
    choice = [_fmt({"mean": row["choice"][t]["acc_norm"], "stderr": row["choice"][t]["stderr"]})
              if t in row.get("choice", {}) else "-" for t in results["config"].get("choice_tasks") or []]
    average = [(_fmt(_average(row)) if row.get("choice") else "-")] if choice else []
    return [key, *choice, _fmt(row.get("heldout_rougeL")), *average, _fmt(row.get("indist_rougeL")),
            f"{100 * acc:.0f}%" if acc is not None else "-",
            f"{lib.get('train_tokens', 0) / 1000:.0f}k" if lib else "0",
            f"{lib.get('train_seconds', 0):.0f}" if lib else "0",
            f"{row.get('tokens_per_second', 0):.0f}"]


def results_markdown(results: Mapping[str, Any]) -> str:
    headers = _headers(results)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for key, row in results["rows"].items():
        lines.append("| " + " | ".join(_row_cells(key, row, results)) + " |")
    return "\n".join(lines) + ("\n\nBenchmarks: rank-classification accuracy with per-character length normalisation "
                               "(acc_norm), in %; Rouge-L in %; mean ± standard error over examples (the average's "
                               "s.e. propagated from its columns). Train tokens/s: the library's training compute "
                               "(MBC includes its stage 1); infer tok/s: generation throughput.\n")


def plot_results(results: Mapping[str, Any], path_png: Path) -> Path:
    """One PNG: per result row, bars for the held-out SNI Rouge-L, the benchmark average (acc_norm) and the
    in-distribution Rouge-L, with ±1 standard-error whiskers."""
    import io

    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot, no global backend change

    series = [("held-out SNI Rouge-L", lambda r: r.get("heldout_rougeL")),
              ("benchmarks acc_norm (avg)", lambda r: r.get("choice_acc_norm")),
              ("in-dist Rouge-L", lambda r: r.get("indist_rougeL"))]
    keys = list(results["rows"])
    fig = Figure(figsize=(max(6.0, 0.9 * len(keys) + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for j, (label, get) in enumerate(series):
        xs, ys, es = [], [], []
        for i, key in enumerate(keys):
            m = get(results["rows"][key])
            if m:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ys.append(100 * m["mean"])
                es.append(100 * m["stderr"] if not math.isnan(m["stderr"]) else 0.0)
        if xs:
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=label)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(f"{results['config'].get('name', 'study')}: mean ± s.e.")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path_png, buf.getvalue())
    return path_png


def print_results(results: Mapping[str, Any], console: Console) -> None:
    table = Table(title="results (%, mean ± s.e.)")
    for h in _headers(results):
        table.add_column(h)
    for key, row in results["rows"].items():
        table.add_row(*_row_cells(key, row, results))
    console.print(table)
