"""Building libraries: private, shared, MBC (model-based clustering) and random-cluster libraries.

Budgets are per task, so the strategies can be compared at equal training compute (the paper's protocol):

* **private**: one expert per task, ``B`` = ``train.steps`` optimizer steps (or ``train.epochs`` over its split).
* **shared**: one expert on the union of all N tasks for ``N·B`` steps (same total compute); with ``balanced`` every
  task contributes the same number of training examples (the smallest task's count, or ``max_examples``), so large
  tasks do not dominate.
* **mbc**: stage 1 trains private experts for ``f·B`` steps (``stage1_fraction`` f, default 2/5 as in the reference,
  which splits 2 of 5 epochs to stage 1) or reuses an existing private library; the experts are clustered
  (:func:`modlora.clustering.model_based_clustering`: flatten LoRA params, keep the largest-magnitude half, truncated
  SVD, cosine similarity, k-means on the similarity rows; ``k="auto"`` chooses K by silhouette); stage 2 trains one
  expert per cluster on the union of its tasks for ``(1-f)·B·|cluster|`` steps. Total: ``N·B`` — what private costs.
* **random**: clusters of the same sizes as an MBC clustering with random members; each cluster expert gets
  ``B·|cluster|`` steps (the MBC total, stage 1 included, so compute matches private and MBC).

Experts train together (:func:`modlora.multitrain.train_experts`: one frozen base, mixed batches, per-example
factors), in *chunks* of ``experts_per_job`` experts; each chunk is one job (:mod:`modlora.executors`): ``local``
runs them in this process, ``ray`` spreads them over the workers (one GPU each when the cluster has GPUs). An expert
is written to the library as soon as its budget ends, and a job skips experts already in the library, so an
interrupted build resumes where it stopped and loses at most the unfinished experts of the running chunk; a crash
mid-write leaves no partial expert (atomic library writes), and :meth:`ExpertLibrary.clean_incomplete` removes the
leftovers of the interrupted write.

Each expert records the fingerprint of what determines its training (:func:`expert_fingerprint`: the build config
less execution-only fields, its tasks and budget), and the library stores the build config (``meta/build_config``).
Re-running a build with other settings on an existing library is refused with the differences listed, unless
``on_config_change`` is ``"retrain-changed"`` (experts whose fingerprint differs are retrained) or ``"new-library"``
(the old library is moved aside to ``<path>.replaced-<time>`` and a fresh one is built).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modlora.adapters import LoraSpec
from modlora.clustering import ClusteringResult, cluster_tasks, model_based_clustering, random_clustering
from modlora.data import Task, default_sni_dir, load_flat_jsonl, load_sni_tasks, split_instances
from modlora.errors import ModloraError
from modlora.executors import Job, run_jobs
from modlora.library import ExpertLibrary
from modlora.models import LoadedModel, load_base_model
from modlora.multitrain import MultiTrainOptions
from modlora.pipeline import ExpertPlan, train_task_experts
from modlora.training import TrainConfig

Strategy = Literal["private", "shared", "mbc", "random"]
OnConfigChange = Literal["refuse", "retrain-changed", "new-library"]
CLUSTERING_META = "clustering"
BUILD_CONFIG_META = "build_config"
FINGERPRINT_KEY = "build_fingerprint"
EXECUTION_ONLY = ("device", "experts_per_job", "shared_prefix", "max_tokens_per_forward")
"""BuildConfig fields that change how fast experts train, not what they become: left out of fingerprints."""


@dataclass(frozen=True)
class BuildConfig:
    """What every expert of a build shares: base model, data source, LoRA spec, per-task budget."""

    model: str = "smollm2-135m"
    device: str | None = None
    dtype: str | None = None
    data_dir: str | None = None
    flat_file: str | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    max_examples: int | None = None
    max_val: int = 32
    max_prompt_tokens: int = 384
    max_target_tokens: int = 128
    balanced: bool = False
    experts_per_job: int = 8
    shared_prefix: bool = True
    max_tokens_per_forward: int | None = 1024

    def __post_init__(self) -> None:
        if self.experts_per_job < 1:
            raise ModloraError(f"experts_per_job must be >= 1, got {self.experts_per_job}")
        MultiTrainOptions(self.shared_prefix, self.max_tokens_per_forward)  # validates

    @property
    def options(self) -> MultiTrainOptions:
        return MultiTrainOptions(self.shared_prefix, self.max_tokens_per_forward)

    def training_settings(self) -> dict[str, Any]:
        """The fields that determine what the experts become (everything but :data:`EXECUTION_ONLY`), flat:
        ``{"lora.rank": 4, "train.steps": 100, "max_val": 32, …}``."""
        flat: dict[str, Any] = {}
        for k, v in dataclasses.asdict(self).items():
            if k in EXECUTION_ONLY:
                continue
            for key, value in (v.items() if isinstance(v, dict) else [(None, v)]):
                flat[f"{k}.{key}" if key else k] = list(value) if isinstance(value, tuple) else value
        return flat

    def train_config(self, budget_scale: float) -> TrainConfig:
        """``train`` for an expert worth ``budget_scale`` per-task budgets: ``train.steps`` is per task and scales;
        without steps, ``train.epochs`` over the union of the tasks already scales with the number of tasks."""
        if self.train.steps is not None:
            return dataclasses.replace(self.train, steps=max(1, round(self.train.steps * budget_scale)))
        return dataclasses.replace(self.train, epochs=self.train.epochs * budget_scale)


@dataclass(frozen=True)
class PlannedExpert:
    """Expert ``name`` on ``tasks`` with ``budget_scale`` per-task budgets."""

    name: str
    tasks: tuple[str, ...]
    budget_scale: float
    stage: str


@dataclass(frozen=True)
class ExpertsJob(Job):
    """Train a chunk of ``experts`` together into ``library``."""

    library: str
    experts: tuple[PlannedExpert, ...]
    config: BuildConfig
    show_progress: bool = False


def expert_fingerprint(config: BuildConfig, expert: PlannedExpert) -> str:
    """sha256 of what determines an expert's training: the config's training settings, its tasks and budget."""
    doc = {**config.training_settings(), "tasks": list(expert.tasks), "budget_scale": expert.budget_scale}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _process_model(model: str, device: str | None, dtype: str | None = None) -> LoadedModel:
    """One base model per worker process, reused by every job it runs (never mutated: LoRA layers are unloaded).

    ``dtype`` names the weights dtype (``"bfloat16"``: the frozen base in bf16, the LoRA factors in fp32 as PEFT
    keeps them); None is the device default.
    """
    return load_base_model(model, device=device, dtype=dtype)


def load_tasks(config: BuildConfig, names: Sequence[str] | None) -> dict[str, Task]:
    """The named tasks from the configured source (SNI directory, or a flat JSONL file)."""
    if config.flat_file:
        tasks = load_flat_jsonl(config.flat_file)
        if names is not None:
            missing = [n for n in names if n not in tasks]
            if missing:
                raise ModloraError(f"task(s) not in {config.flat_file}: {', '.join(missing[:5])}")
            tasks = {n: tasks[n] for n in names}
        return tasks
    return load_sni_tasks(config.data_dir or default_sni_dir(), names)


def train_experts_job(job: ExpertsJob) -> list[dict[str, Any]]:
    """Ray/local job body: train the chunk's experts together and store those not in the library yet.

    A chunk with every expert stored is skipped (resumability). A partly stored chunk (a crash between two writes,
    or ``retrain-changed``) is trained whole again, so that every expert sees the same companions, hence the same
    dropout masks, as in an uninterrupted build; the experts already stored are kept as they are."""
    lib = ExpertLibrary(job.library)
    cfg = job.config
    stored = {e.name for e in job.experts if e.name in lib}
    if len(stored) == len(job.experts):
        return [{"name": e.name, "status": "skipped", "metrics": lib.entry(e.name).metrics} for e in job.experts]
    lm = _process_model(cfg.model, cfg.device, cfg.dtype)
    tasks = load_tasks(cfg, sorted({t for e in job.experts for t in e.tasks}))
    plans = {}
    for e in job.experts:
        mine = {t: tasks[t] for t in e.tasks}
        cap = cfg.max_examples
        if cfg.balanced and len(mine) > 1:
            smallest = min(len(split_instances(t, seed=cfg.train.seed)["train"]) for t in mine.values())
            cap = min(cap, smallest) if cap is not None else smallest
        plans[e.name] = ExpertPlan(mine, cfg.train_config(e.budget_scale), cap, {
            "stage": e.stage, "budget_scale": e.budget_scale, "balanced": cfg.balanced,
            FINGERPRINT_KEY: expert_fingerprint(cfg, e)})
    entries = train_task_experts(lm, lib, plans, spec=cfg.lora, options=cfg.options, max_val=cfg.max_val,
                                 max_prompt_tokens=cfg.max_prompt_tokens, max_target_tokens=cfg.max_target_tokens,
                                 split_seed=cfg.train.seed, progress=job.show_progress, desc=job.name, keep=stored)
    return [{"name": e.name, "status": "skipped" if e.name in stored else "trained",
             "metrics": lib.entry(e.name).metrics if e.name in stored else entries[e.name].metrics}
            for e in job.experts]


def _base_info(config: BuildConfig):
    return _process_model(config.model, config.device, config.dtype).info


def _open(path: str | Path, config: BuildConfig) -> ExpertLibrary:
    lib = ExpertLibrary.open_or_create(path, _base_info(config))
    lib.clean_incomplete()
    return lib


def _settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _reconcile(path: str | Path, config: BuildConfig, planned: Sequence[PlannedExpert],
               on_config_change: OnConfigChange) -> ExpertLibrary:
    """Open (or create) the library and make sure that the experts it holds were trained as ``config`` plans.

    Experts whose recorded fingerprint differs are refused (:class:`ModloraError` listing the differences),
    retrained (``"retrain-changed"``) or the whole library is moved aside (``"new-library"``)."""
    if on_config_change not in ("refuse", "retrain-changed", "new-library"):
        raise ModloraError(f"on_config_change must be 'refuse', 'retrain-changed' or 'new-library', "
                           f"got {on_config_change!r}")
    lib = _open(path, config)
    changed = [e.name for e in planned if e.name in lib
               and lib.entry(e.name).training.get(FINGERPRINT_KEY) != expert_fingerprint(config, e)]
    if changed:
        if on_config_change == "new-library":
            moved = lib.path.with_name(f"{lib.path.name}.replaced-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
            lib.path.rename(moved)
            lib = _open(path, config)
        elif on_config_change == "retrain-changed":
            for name in changed:
                lib.remove(name)
        else:
            stored = lib.load_meta(BUILD_CONFIG_META)
            diff = (_settings_diff(stored, config.training_settings()) if isinstance(stored, dict)
                    else ["(the library records no build config: it was built before fingerprints were kept)"])
            tasks_or_budget = "" if diff else " (their tasks or budgets differ)"
            raise ModloraError(
                f"{lib.path}: {len(changed)} expert(s) were trained with other settings than this build"
                f"{tasks_or_budget}: {', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}\n  "
                + "\n  ".join(diff) + "\nRe-run with --retrain-changed to retrain them, or --new-library to move "
                "the library aside and build a new one (or choose another output path).")
    lib.save_meta(BUILD_CONFIG_META, config.training_settings())
    return lib


def _chunk_name(desc: str, chunk: Sequence[PlannedExpert]) -> str:
    names = [e.name for e in chunk]
    shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
    return f"{desc} [{shown}]"


def _run(lib: ExpertLibrary, planned: Sequence[PlannedExpert], config: BuildConfig, executor: str,
         ray_address: str | None, desc: str, progress: bool) -> None:
    """Train ``planned`` in chunks of ``config.experts_per_job`` (one job each)."""
    n = config.experts_per_job
    chunks = [tuple(planned[i:i + n]) for i in range(0, len(planned), n)]
    jobs = [ExpertsJob(name=_chunk_name(desc, chunk), library=str(lib.path), experts=chunk, config=config,
                       show_progress=progress and executor == "local")  # per-step bars only in-process
            for i, chunk in enumerate(chunks)]
    run_jobs(jobs, train_experts_job, executor, ray_address=ray_address, desc=desc,  # type: ignore[arg-type]
             progress=progress)
    lib.reload()


def build_private_library(path: str | Path, tasks: Sequence[str], config: BuildConfig, *, budget_scale: float = 1.0,
                          executor: str = "local", ray_address: str | None = None, stage: str = "private",
                          progress: bool = True, on_config_change: OnConfigChange = "refuse") -> ExpertLibrary:
    """One expert per task (name = task name)."""
    planned = [PlannedExpert(t, (t,), budget_scale, stage) for t in tasks]
    lib = _reconcile(path, config, planned, on_config_change)
    _run(lib, planned, config, executor, ray_address, f"{stage} experts", progress)
    return lib


def build_shared_library(path: str | Path, tasks: Sequence[str], config: BuildConfig, *, name: str = "shared",
                         executor: str = "local", ray_address: str | None = None, progress: bool = True,
                         on_config_change: OnConfigChange = "refuse") -> ExpertLibrary:
    """One expert on the union of all tasks, with N per-task budgets."""
    planned = [PlannedExpert(name, tuple(tasks), float(len(tasks)), "shared")]
    lib = _reconcile(path, config, planned, on_config_change)
    _run(lib, planned, config, executor, ray_address, "shared expert", progress)
    return lib


def build_cluster_library(path: str | Path, clustering: ClusteringResult, tasks_of: Mapping[str, Sequence[str]],
                          config: BuildConfig, *, budget_per_task: float, stage: str, executor: str = "local",
                          ray_address: str | None = None, progress: bool = True,
                          on_config_change: OnConfigChange = "refuse") -> ExpertLibrary:
    """One expert per cluster (``cluster{i}``) on the union of its tasks, ``budget_per_task·|tasks|`` budgets."""
    planned = [PlannedExpert(f"cluster{i}", tuple(cluster), budget_per_task * len(cluster), stage)
               for i, cluster in enumerate(cluster_tasks(clustering, tasks_of))]
    lib = _reconcile(path, config, planned, on_config_change)
    lib.save_meta(CLUSTERING_META, clustering.to_dict())
    _run(lib, planned, config, executor, ray_address, f"{stage} experts", progress)
    return lib


def build_mbc_library(path: str | Path, tasks: Sequence[str], config: BuildConfig, *, k: int | str = 10,
                      stage1_fraction: float = 0.4, private_library: str | Path | None = None,
                      k_range: tuple[int, int] | None = None, sparsity: float = 0.5, n_components: int = 64,
                      executor: str = "local", ray_address: str | None = None, progress: bool = True,
                      on_config_change: OnConfigChange = "refuse") -> tuple[ExpertLibrary, ClusteringResult]:
    """MBC: stage-1 private experts (or an existing private library), clustering, stage-2 cluster experts."""
    if not 0.0 < stage1_fraction < 1.0:
        raise ModloraError(f"stage1_fraction must be in (0, 1), got {stage1_fraction}")
    path = Path(path)
    if private_library is None:
        private_library = path.parent / f"{path.name}-stage1"
        stage1 = build_private_library(private_library, tasks, config, budget_scale=stage1_fraction,
                                       executor=executor, ray_address=ray_address, stage="mbc-stage1",
                                       progress=progress, on_config_change=on_config_change)
    else:
        stage1 = ExpertLibrary.open(private_library)  # a local path or any location (hf://, s3://, ...)
        stage1.check_base_model(_base_info(config))
        missing = [t for t in tasks if t not in stage1.task_to_expert()]
        if missing:
            raise ModloraError(f"{private_library}: no private expert for task(s) {', '.join(missing[:5])}")
    names = [stage1.task_to_expert()[t] for t in tasks]
    k_value: int | Literal["auto"] = "auto" if k == "auto" else int(k)
    if k_value != "auto" and not 1 <= k_value <= len(names):
        raise ModloraError(f"k={k_value} clusters needs at least that many experts (have {len(names)})")
    clustering = model_based_clustering(stage1.experts(names), k_value, sparsity=sparsity, n_components=n_components,
                                        k_range=k_range, seed=config.train.seed, cache=stage1)
    tasks_of = {n: stage1.tasks(n) for n in names}
    lib = build_cluster_library(path, clustering, tasks_of, config, budget_per_task=1.0 - stage1_fraction,
                                stage="mbc-stage2", executor=executor, ray_address=ray_address, progress=progress,
                                on_config_change=on_config_change)
    return lib, clustering


def build_random_library(path: str | Path, mbc_library: str | Path, config: BuildConfig, *, seed: int = 0,
                         executor: str = "local", ray_address: str | None = None, progress: bool = True,
                         on_config_change: OnConfigChange = "refuse") -> tuple[ExpertLibrary, ClusteringResult]:
    """Random clusters with the sizes of ``mbc_library``'s clustering; each task keeps its full budget."""
    meta = ExpertLibrary(mbc_library).load_meta(CLUSTERING_META)
    if meta is None:
        raise ModloraError(f"{mbc_library}: no MBC clustering stored (build it with --strategy mbc first)")
    mbc = ClusteringResult.from_dict(meta, source=f"{mbc_library}/meta/{CLUSTERING_META}.json")
    rnd = random_clustering(mbc, seed=seed)
    stage1 = Path(mbc_library).parent / f"{Path(mbc_library).name}-stage1"
    tasks_of: dict[str, list[str]] = {}
    if (stage1 / "library.json").is_file():
        s1 = ExpertLibrary(stage1)
        tasks_of = {n: s1.tasks(n) for n in s1.expert_names()}
    lib = build_cluster_library(path, rnd, tasks_of, config, budget_per_task=1.0, stage="random",
                                executor=executor, ray_address=ray_address, progress=progress,
                                on_config_change=on_config_change)
    return lib, rnd


def expected_total_steps(strategy: Strategy, n_tasks: int, steps_per_task: int, cluster_sizes: Sequence[int] = (),
                         stage1_fraction: float = 0.4) -> int:
    """Optimizer steps a build costs (for compute matching and estimates)."""
    if strategy in ("private", "shared"):
        return n_tasks * steps_per_task
    if strategy == "mbc":
        s1 = n_tasks * max(1, round(steps_per_task * stage1_fraction))
        return s1 + sum(max(1, round(steps_per_task * (1 - stage1_fraction) * s)) for s in cluster_sizes)
    return sum(max(1, math.ceil(steps_per_task * s)) for s in cluster_sizes)
