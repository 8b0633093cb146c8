"""The paper's experiment end to end at a configurable scale (the demo and ``benchmarks/study.py`` use it).

Steps, all resumable (finished experts and finished result rows are reused):

1. build the libraries named in the config over the training tasks (:mod:`modlora.build.strategies`): ``private``,
   ``mbc``, ``mbc-params``, ``shared``, ``random``, ``semantic``, ``poly``, ``mhr``, ``mbc-share``, ``semantic-share``
   (:data:`LIBRARIES`). MBC's stage 1 is a separate private library trained with ``stage1_fraction``
   of the budget (the paper's protocol), or — with ``mbc_reuses_private``, to save time in small runs — the private
   library itself: the clustering then sees fully trained private experts while MBC is charged only
   ``stage1_fraction`` of their cost, which slightly favours MBC (the tables say which was used);
2. cluster plot of the private library (similarity ordered by cluster);
3. for every row ``[library, method]`` or ``[library, method, {options}]`` (a method of the registry,
   :mod:`modlora.reuse.methods`, with its options; or ``lorahub``, the few-shot row): held-out SNI Rouge-L / exact match
   (greedy), in-distribution Rouge-L on the training tasks' *test* split, routing accuracy of per-token routers on
   in-distribution prompts (:func:`modlora.evaluation.prompt_routing_accuracy`), inference throughput (generated +
   prompt tokens per second), and training compute of the library; the benchmarks (``choice_tasks``) on the rows
   named in ``choice_rows`` (every row when it is ``None``);
4. a JSON with everything, a Markdown table and plots.

Compute matching: every library gets ``steps_per_task`` optimizer steps per training task in total (see
:mod:`modlora.build.strategies`); with ``mbc_reuses_private`` the MBC row reuses the private experts as its stage 1 and the
table reports MBC's training compute as stage 1 (``stage1_fraction`` of the private cost) + stage 2.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from modlora.build.clustering import DEFAULT_FEATURES, Features, partition_quality, plot_clustering, read_label_file
from modlora.build.initialisation import DEFAULT_INIT, InitMethod, check_init, check_init_fits
from modlora.build.strategies import (
    BuildConfig,
    build_mbc_library,
    build_poly_library,
    build_private_library,
    build_random_library,
    build_semantic_library,
    build_shared_library,
)
from modlora.build.training import TrainConfig
from modlora.data import (
    PromptFormatter,
    PromptLimits,
    Truncate,
    default_data_dir,
    encode_tasks,
    load_sni_tasks,
    split_instances,
)
from modlora.errors import ModloraError
from modlora.evaluation.generation import generate_and_score
from modlora.evaluation.indist import own_routed_expert, prompt_routing_accuracy
from modlora.evaluation.rank_classification import evaluate_choice_tasks
from modlora.evaluation.results import mean_and_stderr
from modlora.io import atomic_write_bytes, atomic_write_json
from modlora.library.experts import DEFAULT_SHARE_MODE, SHARE_MODES, ShareInfo, ShareMode
from modlora.library.store import ExpertLibrary
from modlora.models import DEFAULT_MODEL, LoadedModel, load_base_model
from modlora.reuse.methods import REGISTRY
from modlora.reuse.methods.core import MethodOptions, TrainingDataOptions
from modlora.reuse.prepare import prepare_model
from modlora.tables import print_split_table

LORAHUB_ROW = "lorahub"  # the few-shot row: not a zero-shot reuse method, so not in the registry


@dataclass
class StudyConfig:
    """Everything a study run needs; ``from_json`` reads the shipped configs in ``benchmarks/configs``."""

    name: str = "study"
    model: str = DEFAULT_MODEL
    dtype: str | None = None
    train_tasks: list[str] = field(default_factory=list)
    steps_per_task: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    max_examples: int | None = None
    max_prompt_tokens: int = 256
    max_target_tokens: int = 64
    truncate: Truncate = "left"
    """How a prompt over ``max_prompt_tokens`` is cut, in training and evaluation (:class:`modlora.data.PromptLimits`)."""
    max_val: int = 16
    libraries: list[str] = field(default_factory=lambda: ["private", "mbc"])
    k: int | str = 3
    stage1_fraction: float = 0.4
    mbc_reuses_private: bool = True
    skills: int = 4
    mhr_heads: int = 2
    allocation_lr: float = 1e-2
    share_fraction: float = 0.2
    share_mode: ShareMode = DEFAULT_SHARE_MODE
    rows: list[list[Any]] = field(default_factory=lambda: [["-", "base"], ["private", "mu"], ["private", "arrow"],
                                                           ["private", "oracle"], ["mbc", "mu"], ["mbc", "arrow"]])
    method_options: dict[str, dict[str, Any]] = field(default_factory=lambda: {"arrow": {"top_k": 4}})
    heldout_tasks: list[str] | None = None
    """Held-out tasks: SNI test tasks (``sni/heldout``) or pool tasks (``sni/tasks``) that no library trains on
    (``None``: every SNI test task)."""
    heldout_groups: str | None = None
    """A label file (JSON ``{task: group}`` or CSV) grouping the held-out tasks, e.g. ``related`` / ``unrelated``
    to the training tasks: each group gets its own paired differences (``None``: one group)."""
    heldout_limit: int = 5
    indist_limit: int = 5
    max_new_tokens: int = 32
    gen_batch_size: int = 8
    choice_tasks: list[str] = field(default_factory=list)
    choice_limit: int | None = None
    choice_batch_size: int = 16
    choice_rows: list[str] | None = None
    """Row keys (:func:`row_key`, e.g. ``"private/arrow"``) scored on the benchmarks; ``None``: every row."""
    examples_per_expert: int = 16
    task_families: str | None = None
    """A label file (JSON ``{task: family}`` or CSV ``task,family``) to score every clustered library's partition
    of the training tasks against: adjusted Rand index and purity (``None``: the number of clusters only)."""
    lorahub_shots: int = 5
    lorahub_budget: int = 40
    seed: int = 0
    init: InitMethod = DEFAULT_INIT
    """How every expert's A starts (:mod:`modlora.build.initialisation`; Poly/MHR skills always start from seeds)."""

    @classmethod
    def from_json(cls, path: str | Path) -> StudyConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModloraError(f"{path}: cannot read study config ({exc})") from None
        return cls.from_mapping(raw, path)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], path: str | Path) -> StudyConfig:
        """The config of a JSON object read from ``path``: unknown settings refused, ``task_families`` taken
        relative to the config's folder, then :meth:`validate`."""
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ModloraError(f"{path}: unknown study setting(s): {', '.join(unknown)}")
        raw = dict(raw)
        for key in ("task_families", "heldout_groups"):
            if raw.get(key):
                raw[key] = str(Path(path).parent / raw[key])
        cfg = cls(**raw)
        cfg.validate(str(path))
        return cfg

    def validate(self, source: str = "study config") -> None:
        """Check every row's method and options and that ``choice_rows`` names rows of the config, before any
        model loads (ModloraError naming ``source`` and the row), and ``share_mode``."""
        if self.share_mode not in SHARE_MODES:
            raise ModloraError(f"{source}: share_mode must be one of {', '.join(SHARE_MODES)}, got "
                               f"{self.share_mode!r}")
        try:
            self.limits.record()  # validates the prompt limits
            check_init(self.init)
            for name in self.libraries:
                check_init_fits(self.init, name)
        except ModloraError as exc:
            raise ModloraError(f"{source}: {exc}") from None
        for row in self.rows:
            try:
                self.row_options(row, Path("."))
            except ModloraError as exc:
                raise ModloraError(f"{source}: row {row}: {exc}") from None
        for key in ("task_families", "heldout_groups"):
            if getattr(self, key) is not None:
                try:
                    read_label_file(getattr(self, key))
                except ModloraError as exc:
                    raise ModloraError(f"{source}: {key}: {exc}") from None
        trained = sorted(set(self.heldout_tasks or ()) & set(self.train_tasks))
        if trained:
            raise ModloraError(f"{source}: heldout_tasks {', '.join(trained)} are training tasks of the study")
        if self.choice_rows is not None:
            keys = {row_key(row) for row in self.rows}
            unknown = [key for key in self.choice_rows if key not in keys]
            if unknown:
                raise ModloraError(f"{source}: choice_rows {', '.join(unknown)} are not rows of the study "
                                   f"(rows: {', '.join(sorted(keys))})")

    @property
    def limits(self) -> PromptLimits:
        return PromptLimits(self.max_prompt_tokens, self.max_target_tokens, self.truncate)

    def scores_choice(self, row: Sequence[Any]) -> bool:
        """Whether ``row`` is scored on the benchmarks (``choice_tasks`` and, if set, ``choice_rows``)."""
        return bool(self.choice_tasks) and (self.choice_rows is None or row_key(row) in self.choice_rows)

    def row_options(self, row: Sequence[Any], data_dir: Path) -> MethodOptions | None:
        """The validated options of a ``[library, method(, {options})]`` row: the method's defaults, then
        ``method_options[method]``, then the row's own; data-reading methods get the training-task directory and
        ``examples_per_expert``. ``None`` for the LoraHub row."""
        if not 2 <= len(row) <= 3 or (len(row) == 3 and not isinstance(row[2], Mapping)):
            raise ModloraError("a row is [library, method] or [library, method, {option: value}]")
        if row[1] == LORAHUB_ROW:
            return None
        method = REGISTRY.get(row[1])
        values: dict[str, Any] = {}
        if issubclass(method.Options, TrainingDataOptions):
            values = {"task_dir": str(data_dir / "sni" / "tasks"), "examples_per_expert": self.examples_per_expert}
        values |= dict(self.method_options.get(method.name, {})) | (dict(row[2]) if len(row) == 3 else {})
        return method.options_from(values)

    def build_config(self, device: str | None, data_dir: Path) -> BuildConfig:
        return BuildConfig(model=self.model, device=device, dtype=self.dtype, data_dir=str(data_dir / "sni" / "tasks"),
                           train=TrainConfig(steps=self.steps_per_task, batch_size=self.batch_size, lr=self.lr,
                                             seed=self.seed),
                           max_examples=self.max_examples, max_val=self.max_val,
                           max_prompt_tokens=self.max_prompt_tokens, max_target_tokens=self.max_target_tokens,
                           truncate=self.truncate,
                           init=self.init)


def row_key(row: Sequence[Any]) -> str:
    """``library/method`` (``method`` alone without a library), plus ``[opt=value,…]`` for a row's own options."""
    key = f"{row[0]}/{row[1]}" if row[0] != "-" else str(row[1])
    return key + ("[" + ",".join(f"{k}={v}" for k, v in sorted(row[2].items())) + "]" if len(row) == 3 else "")


MBC_FEATURES: dict[str, Features] = {"mbc": DEFAULT_FEATURES, "mbc-params": "params", "mbc-share": DEFAULT_FEATURES}
"""The MBC library kinds and the similarity each clusters on (:mod:`modlora.build.clustering`): ``mbc`` and ``mbc-share``
on the experts' updates ΔW (``delta``), ``mbc-params`` on the paper's flattened, sparsified parameters."""

LIBRARIES = ("private", "mbc", "mbc-params", "shared", "random", "semantic", "poly", "mhr", "mbc-share",
             "semantic-share")
"""Library kinds a study can build: the MBC kinds of :data:`MBC_FEATURES`; ``mbc-share`` / ``semantic-share`` are
MBC / semantic with ``--share`` (``share_fraction`` of the budget on a shared expert, ``share_mode`` warm or
residual); ``random`` copies the cluster sizes of ``mbc``; ``poly`` / ``mhr`` have ``skills`` skills (MHR:
``mhr_heads`` heads)."""


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
            results["rows"][key] = json.loads(path.read_text())
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


@dataclass(frozen=True)
class PairedDifference:
    """Row ``row`` minus row ``reference`` on each task both scored: Rouge-L for ``part`` ``heldout`` or ``indist``,
    acc_norm per benchmark set for ``choice``; the mean difference ± its standard error across the ``n`` tasks
    (sd / √n, ddof 1)."""

    row: str
    reference: str
    part: str
    mean: float
    stderr: float
    n: int

    @property
    def z(self) -> float:
        """The difference in standard errors (NaN when the standard error is 0)."""
        return self.mean / self.stderr if self.stderr > 0 else math.nan

    def cell(self) -> str:
        """``+3.2 ± 1.1 (+2.9 s.e.)`` in Rouge-L (or accuracy) points."""
        z = f" ({self.z:+.1f} s.e.)" if not math.isnan(self.z) else ""
        return f"{100 * self.mean:+.1f} ± {100 * self.stderr:.1f}{z}"


PAIRED_METRICS = {"heldout": "rougeL", "indist": "rougeL", "choice": "acc_norm"}
"""The per-task score :func:`paired_difference` pairs, by part of a result row."""


def paired_difference(results: Mapping[str, Any], row: str, reference: str, part: str = "heldout",
                      tasks: Collection[str] | None = None) -> PairedDifference | None:
    """:class:`PairedDifference` of two result rows over the tasks both scored (and in ``tasks`` when given);
    ``None`` with fewer than two."""
    a = results["rows"].get(row, {}).get(part) or {}
    b = results["rows"].get(reference, {}).get(part) or {}
    both = set(a) & set(b)
    common = sorted(both if tasks is None else both & set(tasks))
    if len(common) < 2:
        return None
    metric = PAIRED_METRICS[part]
    mean, stderr = mean_and_stderr([a[t][metric] - b[t][metric] for t in common])
    return PairedDifference(row, reference, part, mean, stderr, len(common))


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


def heldout_group_tasks(results: Mapping[str, Any]) -> dict[str, list[str]]:
    """``results["heldout_groups"]`` ({task: group}) inverted: the held-out tasks of each group (empty: no groups)."""
    groups: dict[str, list[str]] = {}
    for task, group in (results.get("heldout_groups") or {}).items():
        groups.setdefault(group, []).append(task)
    return groups


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
    return _mean_of_means(cells) if cells else None


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


def _grouped_bars_png(keys: Sequence[str], series: Sequence[tuple[str, Any]], title: str, ylabel: str,
                      path_png: Path) -> Path:
    """One PNG of grouped bars: per key, one bar per ``(label, get)`` series, ``get(key)`` → ``(value, stderr)`` or
    ``None``, with ±1 standard-error whiskers."""
    import io

    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot, no global backend change

    fig = Figure(figsize=(max(6.0, 0.9 * len(keys) + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    drawn = False
    for j, (label, get) in enumerate(series):
        bars = [(i + (j - (len(series) - 1) / 2) * width, *v) for i, key in enumerate(keys) if (v := get(key))]
        if bars:
            xs, ys, es = zip(*bars, strict=True)
            ax.bar(xs, ys, width, yerr=[0.0 if math.isnan(e) else e for e in es], capsize=2, label=label)
            drawn = True
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if drawn:  # an empty legend is a matplotlib warning
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path_png, buf.getvalue())
    return path_png


def plot_results(results: Mapping[str, Any], path_png: Path) -> Path:
    """One PNG: per result row, bars for the held-out SNI Rouge-L, the benchmark average (acc_norm) and the
    in-distribution Rouge-L, with ±1 standard-error whiskers (over examples)."""
    rows = results["rows"]

    def score(field: str) -> Any:
        return lambda key: (100 * m["mean"], 100 * m["stderr"]) if (m := rows[key].get(field)) else None

    series = [("held-out SNI Rouge-L", score("heldout_rougeL")), ("benchmarks acc_norm (avg)", score("choice_acc_norm")),
              ("in-dist Rouge-L", score("indist_rougeL"))]
    return _grouped_bars_png(list(rows), series, f"{results['config'].get('name', 'study')}: mean ± s.e.", "%",
                             path_png)


def plot_paired(results: Mapping[str, Any], path_png: Path) -> Path:
    """One PNG: per result row but the base, the Rouge-L paired differences of :func:`results_markdown` (held-out
    − base and − the library's μ, in-distribution − base), ±1 standard error across tasks."""
    keys = [key for key in results["rows"] if key != "base"]
    diffs = {key: _row_differences(results, key) for key in keys}

    def column(j: int) -> Any:
        return lambda key: (100 * d.mean, 100 * d.stderr) if (d := diffs[key][j]) else None

    series = [(PAIRED_HEADERS[1 + j], column(j)) for j in range(3)]  # the Rouge-L columns; benchmarks differ in unit
    return _grouped_bars_png(keys, series, f"{results['config'].get('name', 'study')}: paired differences across "
                             "tasks, mean ± s.e.", "Rouge-L points", path_png)


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
