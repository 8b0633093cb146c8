"""Building libraries: private, shared, MBC (model-based clustering) and random-cluster libraries.

Budgets are per task, so the strategies can be compared at equal training compute (the paper's protocol):

* **private**: one expert per task, ``B`` = ``steps_per_task`` optimizer steps (or ``epochs`` over its split).
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

Each expert is one job (:mod:`modlora.executors`): ``local`` runs them in this process, ``ray`` one Ray task per
expert (one GPU each when the cluster has GPUs). A job whose expert is already in the library is skipped, so an
interrupted build resumes where it stopped; a crash mid-expert leaves no partial expert (atomic library writes), and
:meth:`ExpertLibrary.clean_incomplete` removes the leftovers of the interrupted write.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modlora.adapters import LoraSpec
from modlora.clustering import ClusteringResult, cluster_tasks, model_based_clustering, random_clustering
from modlora.data import Task, default_sni_dir, load_flat_jsonl, load_sni_tasks, split_instances
from modlora.errors import ModloraError
from modlora.executors import Job, run_jobs
from modlora.library import ExpertLibrary
from modlora.models import LoadedModel, load_base_model
from modlora.pipeline import train_task_expert
from modlora.training import TrainConfig

Strategy = Literal["private", "shared", "mbc", "random"]
CLUSTERING_META = "clustering"


@dataclass(frozen=True)
class BuildConfig:
    """What every expert of a build shares: base model, data source, LoRA spec, per-task budget."""

    model: str = "smollm2-135m"
    device: str | None = None
    dtype: str | None = None
    data_dir: str | None = None
    flat_file: str | None = None
    rank: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps_per_task: int | None = 100
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_ratio: float = 0.06
    seed: int = 0
    max_examples: int | None = None
    max_val: int = 32
    max_prompt_tokens: int = 384
    max_target_tokens: int = 128
    balanced: bool = False

    @property
    def spec(self) -> LoraSpec:
        return LoraSpec(self.rank, self.alpha, self.dropout, tuple(self.target_modules))

    def train_config(self, budget_scale: float) -> TrainConfig:
        """The optimisation settings for an expert worth ``budget_scale`` per-task budgets."""
        if self.steps_per_task is not None:
            return TrainConfig(steps=max(1, round(self.steps_per_task * budget_scale)), batch_size=self.batch_size,
                               grad_accum=self.grad_accum, lr=self.lr, warmup_ratio=self.warmup_ratio, seed=self.seed)
        # epochs over the union of the tasks already scale with the number of tasks
        return TrainConfig(epochs=self.epochs * budget_scale, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           lr=self.lr, warmup_ratio=self.warmup_ratio, seed=self.seed)


@dataclass(frozen=True)
class ExpertJob(Job):
    """Train expert ``name`` on ``tasks`` into ``library`` with ``budget_scale`` per-task budgets."""

    library: str
    tasks: tuple[str, ...]
    budget_scale: float
    stage: str
    config: BuildConfig
    show_progress: bool = False


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


def train_expert_job(job: ExpertJob) -> dict[str, Any]:
    """Ray/local job body: train one expert unless it is already in the library (resumability)."""
    lib = ExpertLibrary(job.library)
    if job.name in lib:
        return {"name": job.name, "status": "skipped", "metrics": lib.entry(job.name).metrics}
    cfg = job.config
    lm = _process_model(cfg.model, cfg.device, cfg.dtype)
    tasks = load_tasks(cfg, list(job.tasks))
    cap = cfg.max_examples
    if cfg.balanced and len(tasks) > 1:
        smallest = min(len(split_instances(t, seed=cfg.seed)["train"]) for t in tasks.values())
        cap = min(cap, smallest) if cap is not None else smallest
    entry = train_task_expert(
        lm, lib, job.name, tasks, spec=cfg.spec, config=cfg.train_config(job.budget_scale), max_examples=cap,
        max_val=cfg.max_val, max_prompt_tokens=cfg.max_prompt_tokens, max_target_tokens=cfg.max_target_tokens,
        split_seed=cfg.seed, progress=job.show_progress,
        extra_training={"stage": job.stage, "budget_scale": job.budget_scale, "balanced": cfg.balanced})
    return {"name": job.name, "status": "trained", "metrics": entry.metrics}


def _base_info(config: BuildConfig):
    return _process_model(config.model, config.device, config.dtype).info


def _open(path: str | Path, config: BuildConfig) -> ExpertLibrary:
    lib = ExpertLibrary.open_or_create(path, _base_info(config))
    lib.clean_incomplete()
    return lib


def _run(jobs: list[ExpertJob], executor: str, ray_address: str | None, desc: str, progress: bool
         ) -> list[dict[str, Any]]:
    if executor == "local" and progress:  # per-step bars only in-process (Ray workers' output interleaves)
        jobs = [dataclasses.replace(j, show_progress=True) for j in jobs]
    return run_jobs(jobs, train_expert_job, executor, ray_address=ray_address, desc=desc,  # type: ignore[arg-type]
                    progress=progress)


def build_private_library(path: str | Path, tasks: Sequence[str], config: BuildConfig, *, budget_scale: float = 1.0,
                          executor: str = "local", ray_address: str | None = None, stage: str = "private",
                          progress: bool = True) -> ExpertLibrary:
    """One expert per task (name = task name)."""
    lib = _open(path, config)
    jobs = [ExpertJob(name=t, library=str(lib.path), tasks=(t,), budget_scale=budget_scale, stage=stage,
                      config=config) for t in tasks]
    _run(jobs, executor, ray_address, f"{stage} experts", progress)
    lib.reload()
    return lib


def build_shared_library(path: str | Path, tasks: Sequence[str], config: BuildConfig, *, name: str = "shared",
                         executor: str = "local", ray_address: str | None = None, progress: bool = True
                         ) -> ExpertLibrary:
    """One expert on the union of all tasks, with N per-task budgets."""
    lib = _open(path, config)
    job = ExpertJob(name=name, library=str(lib.path), tasks=tuple(tasks), budget_scale=float(len(tasks)),
                    stage="shared", config=config)
    _run([job], executor, ray_address, "shared expert", progress)
    lib.reload()
    return lib


def build_cluster_library(path: str | Path, clustering: ClusteringResult, tasks_of: Mapping[str, Sequence[str]],
                          config: BuildConfig, *, budget_per_task: float, stage: str, executor: str = "local",
                          ray_address: str | None = None, progress: bool = True) -> ExpertLibrary:
    """One expert per cluster (``cluster{i}``) on the union of its tasks, ``budget_per_task·|tasks|`` budgets."""
    lib = _open(path, config)
    lib.save_meta(CLUSTERING_META, clustering.to_dict())
    jobs = []
    for i, cluster in enumerate(cluster_tasks(clustering, tasks_of)):
        jobs.append(ExpertJob(name=f"cluster{i}", library=str(lib.path), tasks=tuple(cluster),
                              budget_scale=budget_per_task * len(cluster), stage=stage, config=config))
    _run(jobs, executor, ray_address, f"{stage} experts", progress)
    lib.reload()
    return lib


def build_mbc_library(path: str | Path, tasks: Sequence[str], config: BuildConfig, *, k: int | str = 10,
                      stage1_fraction: float = 0.4, private_library: str | Path | None = None,
                      k_range: tuple[int, int] | None = None, sparsity: float = 0.5, n_components: int = 64,
                      executor: str = "local", ray_address: str | None = None, progress: bool = True
                      ) -> tuple[ExpertLibrary, ClusteringResult]:
    """MBC: stage-1 private experts (or an existing private library), clustering, stage-2 cluster experts."""
    if not 0.0 < stage1_fraction < 1.0:
        raise ModloraError(f"stage1_fraction must be in (0, 1), got {stage1_fraction}")
    path = Path(path)
    if private_library is None:
        private_library = path.parent / f"{path.name}-stage1"
        stage1 = build_private_library(private_library, tasks, config, budget_scale=stage1_fraction,
                                       executor=executor, ray_address=ray_address, stage="mbc-stage1",
                                       progress=progress)
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
                                        k_range=k_range, seed=config.seed, cache=stage1)
    tasks_of = {n: stage1.tasks(n) for n in names}
    lib = build_cluster_library(path, clustering, tasks_of, config, budget_per_task=1.0 - stage1_fraction,
                                stage="mbc-stage2", executor=executor, ray_address=ray_address, progress=progress)
    return lib, clustering


def build_random_library(path: str | Path, mbc_library: str | Path, config: BuildConfig, *, seed: int = 0,
                         executor: str = "local", ray_address: str | None = None, progress: bool = True
                         ) -> tuple[ExpertLibrary, ClusteringResult]:
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
                                executor=executor, ray_address=ray_address, progress=progress)
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


def config_from_dict(d: Mapping[str, Any]) -> BuildConfig:
    """A :class:`BuildConfig` from a plain mapping (unknown keys are an error naming them)."""
    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ModloraError(f"unknown build setting(s): {', '.join(unknown)}")
    d = dict(d)
    if "target_modules" in d:
        d["target_modules"] = tuple(d["target_modules"])
    return BuildConfig(**d)
