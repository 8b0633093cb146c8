"""Building libraries: private, shared, MBC (model-based clustering) and random-cluster libraries.

Budgets are per task, so the strategies can be compared at equal training compute (the paper's protocol):

* **private**: one expert per task, ``B`` = ``train.steps`` optimizer steps (or ``train.epochs`` over its split).
* **shared**: one expert on the union of all N tasks for ``N·B`` steps (same total compute); with ``balanced`` every
  task contributes the same number of training examples (the smallest task's count, or ``max_examples``), so large
  tasks do not dominate.
* **mbc**: stage 1 trains private experts for ``f·B`` steps (``stage1_fraction`` f, default 2/5 as in the reference,
  which splits 2 of 5 epochs to stage 1) or reuses an existing private library; the experts are clustered
  (:func:`modlora.build.clustering.model_based_clustering`: by default the exact cosine of their ΔW, spectral
  partition, ``k="auto"`` by the spectral silhouette; the paper's flattened-parameter features with k-means on the
  similarity rows are ``features="params"``); stage 2 trains one
  expert per cluster on the union of its tasks for ``(1-f)·B·|cluster|`` steps. Total: ``N·B`` — what private costs.
* **random**: clusters of the same sizes as an MBC clustering with random members; each cluster expert gets
  ``B·|cluster|`` steps (the MBC total, stage 1 included, so compute matches private and MBC).
* **semantic**: tasks clustered by the base model's embeddings of their definitions and first inputs
  (:func:`modlora.build.clustering.task_embeddings`); each cluster expert gets ``B·|cluster|`` steps (no stage 1).
* **poly** / **mhr**: S skills and a learned task → skill allocation (per head for MHR) trained jointly on all
  tasks for ``N·B`` steps (:mod:`modlora.build.poly`); skills stored as ``skill{s}``, allocation as metadata.
* ``share_fraction`` g (mbc, semantic): an expert ``shared`` on all tasks gets ``g·N·B`` steps first; every cluster
  expert gets g less of each of its tasks' budgets (same total) and either starts from the shared factors
  (``share_mode="warm"``) or is a fresh LoRA trained on the base with ``ΔW_shared`` merged into its frozen weights
  (``"residual"``: reuse then applies ``ΔW_shared`` on every token, :mod:`modlora.reuse.apply`).

Experts train together (:func:`modlora.build.multitrain.train_experts`: one frozen base, mixed batches, per-example
factors), in *chunks* of ``experts_per_job`` experts; each chunk is one job (:mod:`modlora.build.executors`): ``local``
runs them in this process, ``ray`` spreads them over the workers (one GPU each when the cluster has GPUs). An expert
is written to the library as soon as its budget ends, and a job skips experts already in the library, so an
interrupted build resumes where it stopped and loses at most the unfinished experts of the running chunk; a crash
mid-write leaves no partial expert (atomic library writes), and :meth:`ExpertLibrary.clean_incomplete` removes the
leftovers of the interrupted write.

One build at a time writes into a library (:class:`BuildLock`): a second build into the same directory, from
another process, is refused at once with :class:`~modlora.errors.LibraryError` (it does not wait), before it loads a
model or touches the library.

Each expert records the fingerprint of what determines its training (:func:`expert_fingerprint`: the build config
less execution-only fields, its tasks and budget), and the library stores the build config (``meta/build_config``).
Re-running a build with other settings on an existing library is refused with the differences listed, unless
``on_config_change`` is ``"retrain-changed"`` (experts whose fingerprint differs are retrained) or ``"new-library"``
(the old library is moved aside to ``<path>.replaced-<time>`` and a fresh one is built).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modlora.build.clustering import ClusteringResult, cluster_tasks, model_based_clustering, random_clustering
from modlora.build.clustering.choices import DEFAULT_FEATURES, Features
from modlora.build.executors import Job, run_jobs
from modlora.build.initialisation import DEFAULT_INIT, InitMethod, check_init, check_init_fits
from modlora.build.multitrain import MultiTrainOptions
from modlora.build.pipeline import ExpertPlan, store_expert, train_task_experts, training_record
from modlora.build.training import TrainConfig
from modlora.data import (
    PromptLimits,
    Task,
    default_sni_dir,
    encode_tasks,
    load_flat_jsonl,
    load_sni_tasks,
    split_instances,
)
from modlora.errors import LibraryError, ModloraError
from modlora.library.adapters import LoraSpec, adapter_merged, resolve_spec
from modlora.library.remote import open_library
from modlora.library.shared_expert import DEFAULT_SHARE_MODE, SHARE_META, SHARE_MODES, ShareInfo, ShareMode
from modlora.library.store import ExpertLibrary
from modlora.models import LoadedModel, load_base_model

Strategy = Literal["private", "shared", "mbc", "random", "semantic", "poly", "mhr"]
OnConfigChange = Literal["refuse", "retrain-changed", "new-library"]
CLUSTERING_META = "clustering"
SHARED_EXPERT = "shared"
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
    limits: PromptLimits = PromptLimits()
    """The prompt and target caps and how a long prompt is cut (:class:`modlora.data.PromptLimits`)."""
    balanced: bool = False
    experts_per_job: int = 8
    shared_prefix: bool = True
    max_tokens_per_forward: int | None = 1024
    init: InitMethod = DEFAULT_INIT
    """How each new expert's A starts (:mod:`modlora.build.initialisation`); B starts at 0."""

    def __post_init__(self) -> None:
        check_init(self.init)
        if self.experts_per_job < 1:
            raise ModloraError(f"experts_per_job must be >= 1, got {self.experts_per_job}")
        MultiTrainOptions(self.shared_prefix, self.max_tokens_per_forward)  # validates

    @property
    def options(self) -> MultiTrainOptions:
        return MultiTrainOptions(self.shared_prefix, self.max_tokens_per_forward)

    def training_settings(self) -> dict[str, Any]:
        """The fields that determine what the experts become (everything but :data:`EXECUTION_ONLY`), flat:
        ``{"lora.rank": 4, "train.steps": 100, "max_val": 32, "max_prompt_tokens": 384, …}``: the prompt limits
        under their training-record keys, unprefixed, as builds have always stored them."""
        flat: dict[str, Any] = {}
        for k, v in dataclasses.asdict(self).items():
            if k in EXECUTION_ONLY:
                continue
            if k == "limits":
                flat |= self.limits.record()
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
    init_from: str | None = None
    """Warm start: the expert (of the same library) whose factors this one starts from."""
    residual_on: str | None = None
    """Residual: the expert (of the same library) merged into the frozen base weights while this one trains."""
    extra: tuple[tuple[str, Any], ...] = ()
    """Further settings that determine the expert (Poly/MHR: skills, heads, allocation lr; the shared expert's
    fingerprint): part of its fingerprint."""


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
    for key, old in (("init", "shared"), ("truncate", "left"), ("lora.fan_in_fan_out", False)):
        if doc[key] == old:
            del doc[key]  # experts built before the setting existed were built this way: their fingerprints stay valid
    if doc["lora.target_modules"] == ["attention"]:
        # the default before targets were resolved per architecture, on the Llama-style bases it could train
        doc["lora.target_modules"] = ["k_proj", "o_proj", "q_proj", "v_proj"]
    if expert.init_from is not None:
        doc["init_from"] = expert.init_from
    if expert.residual_on is not None:
        doc["residual_on"] = expert.residual_on
    if expert.extra:
        doc["extra"] = [list(kv) for kv in expert.extra]
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
    dropout masks, as in an uninterrupted build; the experts already stored are kept as they are. Residual experts
    (``residual_on``, one for the whole chunk) train on the base with that stored expert merged into its weights,
    restored bit-exactly afterwards."""
    lib = ExpertLibrary(job.library)
    cfg = job.config
    stored = {e.name for e in job.experts if e.name in lib}
    if len(stored) == len(job.experts):
        return [{"name": e.name, "status": "skipped", "metrics": lib.entry(e.name).metrics} for e in job.experts]
    lm = _process_model(cfg.model, cfg.device, cfg.dtype)
    residual_on = {e.residual_on for e in job.experts}
    if len(residual_on) != 1:
        raise ModloraError(f"{job.name}: experts trained together must share one base (residual_on: {residual_on})")
    (base_expert,) = residual_on
    if base_expert is None:
        return _train_chunk(job, lib, lm, stored)
    if base_expert not in lib:
        raise ModloraError(f"{lib.path}: expert(s) of {job.name} are residuals on {base_expert!r}, which is not stored")
    with adapter_merged(lm.model, lib.get(base_expert), name=f"{lib.path}: expert {base_expert!r}"):
        return _train_chunk(job, lib, lm, stored)


def _train_chunk(job: ExpertsJob, lib: ExpertLibrary, lm: LoadedModel, stored: set[str]) -> list[dict[str, Any]]:
    cfg = job.config
    tasks = load_tasks(cfg, sorted({t for e in job.experts for t in e.tasks}))
    plans = {}
    for e in job.experts:
        mine = {t: tasks[t] for t in e.tasks}
        init = None
        if e.init_from is not None:
            if e.init_from not in lib:
                raise ModloraError(f"{lib.path}: expert {e.name!r} starts from {e.init_from!r}, which is not stored")
            init = lib.get(e.init_from)
        plans[e.name] = ExpertPlan(mine, cfg.train_config(e.budget_scale), _example_cap(cfg, mine), {
            "stage": e.stage, "budget_scale": e.budget_scale, "balanced": cfg.balanced,
            **({"init_from": e.init_from} if e.init_from else {}),
            **({"residual_on": e.residual_on} if e.residual_on else {}), FINGERPRINT_KEY: expert_fingerprint(cfg, e)},
            init=init)
    entries = train_task_experts(lm, lib, plans, spec=cfg.lora, options=cfg.options, max_val=cfg.max_val,
                                 limits=cfg.limits,
                                 split_seed=cfg.train.seed, progress=job.show_progress, desc=job.name, keep=stored,
                                 init=cfg.init)
    return [{"name": e.name, "status": "skipped" if e.name in stored else "trained",
             "metrics": lib.entry(e.name).metrics if e.name in stored else entries[e.name].metrics}
            for e in job.experts]


def _example_cap(cfg: BuildConfig, tasks: Mapping[str, Task]) -> int | None:
    """Training examples per task: ``max_examples``; with ``balanced`` also the smallest task's count."""
    cap = cfg.max_examples
    if cfg.balanced and len(tasks) > 1:
        smallest = min(len(split_instances(t, seed=cfg.train.seed)["train"]) for t in tasks.values())
        cap = min(cap, smallest) if cap is not None else smallest
    return cap


def _base_info(config: BuildConfig):
    return _process_model(config.model, config.device, config.dtype).info


class BuildLock:
    """The library directory at ``path`` held by one build: an exclusive ``flock`` on the directory itself, taken
    without waiting, so a second build into it (another process) is refused with :class:`LibraryError` while this one
    runs. The kernel releases it when the build ends or its process dies (a killed build leaves nothing to clean up).
    Writers of single experts serialise on the library's own lock file (:func:`modlora.library.store.library_lock`),
    which this one leaves alone. The directory is created when missing and removed again if the build leaves it
    empty (it failed before creating the library)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> BuildLock:
        self._created = not os.path.lexists(self.path)
        self._fd = self._hold()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()    # only an empty directory goes

    def _hold(self) -> int:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileExistsError:
            raise LibraryError(f"{self.path}: exists and is not a directory, so it cannot hold a library") from None
        except OSError as exc:
            raise LibraryError(f"{self.path}: cannot build a library here ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LibraryError(f"{self.path}: another build is writing into this library; wait for it to end "
                                   "(it resumes from what is stored), or build into another directory") from None
            raise LibraryError(f"{self.path}: cannot lock the library for this build ({exc.strerror or exc})") from None
        return fd

    def move_aside(self, to: Path) -> None:
        """Rename the held library to ``to`` (``new-library``) and hold the fresh directory at :attr:`path`."""
        self.path.rename(to)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._created = True
        self._fd = self._hold()


def _open(path: str | Path, config: BuildConfig) -> ExpertLibrary:
    lm = _process_model(config.model, config.device, config.dtype)
    resolve_spec(lm.model, config.lora)   # targets the model lacks are refused before the library is created
    lib = ExpertLibrary.open_or_create(path, lm.info)
    lib.clean_incomplete()
    return lib


def _settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _reconcile(lock: BuildLock, config: BuildConfig, planned: Sequence[PlannedExpert],
               on_config_change: OnConfigChange, strategy_settings: Mapping[str, Any] | None = None) -> ExpertLibrary:
    """Open (or create) the library ``lock`` holds and make sure that the experts it holds were trained as ``config``
    plans.

    Experts whose recorded fingerprint differs are refused (:class:`ModloraError` listing the differences),
    retrained (``"retrain-changed"``) or the whole library is moved aside (``"new-library"``).
    ``strategy_settings`` (e.g. ``{"share.mode": "residual"}``) are stored with the build config and listed among
    the differences; they already count through the experts' fingerprints."""
    settings = {**config.training_settings(), **(strategy_settings or {})}
    if on_config_change not in ("refuse", "retrain-changed", "new-library"):
        raise ModloraError(f"on_config_change must be 'refuse', 'retrain-changed' or 'new-library', "
                           f"got {on_config_change!r}")
    lib = _open(lock.path, config)
    changed = [e.name for e in planned if e.name in lib
               and lib.entry(e.name).training.get(FINGERPRINT_KEY) != expert_fingerprint(config, e)]
    if changed:
        if on_config_change == "new-library":
            moved = lib.path.with_name(f"{lib.path.name}.replaced-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
            lock.move_aside(moved)
            lib = _open(lock.path, config)
        elif on_config_change == "retrain-changed":
            for name in changed:
                lib.remove(name)
        else:
            stored = lib.load_meta(BUILD_CONFIG_META)
            diff = (_settings_diff(stored, settings) if isinstance(stored, dict)
                    else ["(the library records no build config: it was built before fingerprints were kept)"])
            tasks_or_budget = "" if diff else " (their tasks or budgets differ)"
            raise ModloraError(
                f"{lib.path}: {len(changed)} expert(s) were trained with other settings than this build"
                f"{tasks_or_budget}: {', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}\n  "
                + "\n  ".join(diff) + "\nRe-run with --retrain-changed to retrain them, or --new-library to move "
                "the library aside and build a new one (or choose another output path).")
    lib.save_meta(BUILD_CONFIG_META, settings)
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
    with BuildLock(path) as lock:
        lib = _reconcile(lock, config, planned, on_config_change)
        _run(lib, planned, config, executor, ray_address, f"{stage} experts", progress)
    return lib


def build_shared_library(path: str | Path, tasks: Sequence[str], config: BuildConfig, *, name: str = "shared",
                         executor: str = "local", ray_address: str | None = None, progress: bool = True,
                         on_config_change: OnConfigChange = "refuse") -> ExpertLibrary:
    """One expert on the union of all tasks, with N per-task budgets."""
    planned = [PlannedExpert(name, tuple(tasks), float(len(tasks)), "shared")]
    with BuildLock(path) as lock:
        lib = _reconcile(lock, config, planned, on_config_change)
        _run(lib, planned, config, executor, ray_address, "shared expert", progress)
    return lib


def build_cluster_library(path: str | Path, clustering: ClusteringResult, tasks_of: Mapping[str, Sequence[str]],
                          config: BuildConfig, *, budget_per_task: float, stage: str, executor: str = "local",
                          ray_address: str | None = None, progress: bool = True,
                          on_config_change: OnConfigChange = "refuse", share_fraction: float | None = None,
                          share_mode: ShareMode = DEFAULT_SHARE_MODE, lock: BuildLock | None = None
                          ) -> ExpertLibrary:
    """One expert per cluster (``cluster{i}``) on the union of its tasks, ``budget_per_task·|tasks|`` budgets.
    ``lock``: the caller's :class:`BuildLock` of ``path`` when it holds it already (MBC, semantic and random builds
    hold it from their start); None takes it here.

    ``share_fraction`` g (sharing across clusters): first one expert ``shared`` is trained on all the tasks for
    ``g·N`` budgets, then every cluster expert trains for ``(budget_per_task - g)·|tasks|`` budgets (same total),
    starting from the shared factors (``share_mode="warm"``) or as a fresh LoRA on top of the base with
    ``ΔW_shared`` merged into it (``"residual"``). ``meta/share.json`` (:class:`~modlora.library.shared_expert.ShareInfo`) and
    the stored build config record both; the mode is part of every cluster expert's fingerprint."""
    if share_mode not in SHARE_MODES:
        raise ModloraError(f"share_mode must be one of {', '.join(SHARE_MODES)}, got {share_mode!r}")
    clusters = cluster_tasks(clustering, tasks_of)
    shared: list[PlannedExpert] = []
    init_from = residual_on = None
    extra: tuple[tuple[str, Any], ...] = ()
    per_task, settings = budget_per_task, {}
    if share_fraction is not None:
        if not 0.0 < share_fraction < budget_per_task:
            raise ModloraError(f"share_fraction must be in (0, {budget_per_task:g}) (the cluster experts' share of "
                               f"each task's budget), got {share_fraction}")
        all_tasks = tuple(sorted({t for c in clusters for t in c}))
        shared = [PlannedExpert(SHARED_EXPERT, all_tasks, share_fraction * len(all_tasks), "shared")]
        per_task = budget_per_task - share_fraction
        if share_mode == "warm":
            init_from, extra = SHARED_EXPERT, (("init_fingerprint", expert_fingerprint(config, shared[0])),)
        else:
            residual_on, extra = SHARED_EXPERT, (("residual_fingerprint", expert_fingerprint(config, shared[0])),)
        settings = {"share.mode": share_mode, "share.fraction": share_fraction}
    planned = [PlannedExpert(f"cluster{i}", tuple(cluster), per_task * len(cluster), stage, init_from=init_from,
                             residual_on=residual_on, extra=extra) for i, cluster in enumerate(clusters)]
    with contextlib.ExitStack() as stack:
        held = lock if lock is not None else stack.enter_context(BuildLock(path))
        lib = _reconcile(held, config, shared + planned, on_config_change, settings)
        lib.save_meta(CLUSTERING_META, clustering.to_dict())
        if shared:
            lib.save_meta(SHARE_META, ShareInfo(SHARED_EXPERT, share_mode, share_fraction,
                                                tuple(e.name for e in planned)).to_dict())
            _run(lib, shared, config, executor, ray_address, "shared expert", progress)
        _run(lib, planned, config, executor, ray_address, f"{stage} experts", progress)
    return lib


def _refuse_no_structure(clustering: ClusteringResult, path: Path | str, what: str) -> None:
    """``k="auto"`` that found no cluster structure builds nothing: a K = 1 library would silently be a shared one."""
    if clustering.no_structure:
        raise ModloraError(f"{path}: automatic K found no cluster structure in {what}: {clustering.message}. Nothing "
                           "was built; give a number of clusters (--k N) or build a shared library (--strategy shared)")


def build_mbc_library(path: str | Path, tasks: Sequence[str], config: BuildConfig, *, k: int | str = 10,
                      stage1_fraction: float = 0.4, private_library: str | Path | None = None,
                      k_range: tuple[int, int] | None = None, sparsity: float = 0.5, n_components: int = 64,
                      executor: str = "local", ray_address: str | None = None, progress: bool = True,
                      on_config_change: OnConfigChange = "refuse", share_fraction: float | None = None,
                      share_mode: ShareMode = DEFAULT_SHARE_MODE, features: Features = DEFAULT_FEATURES
                      ) -> tuple[ExpertLibrary, ClusteringResult]:
    """MBC: stage-1 private experts (or an existing private library), clustering on ``features`` (``delta``: the
    experts' updates ΔW; ``params``: the paper's flattened, sparsified factors; see :mod:`modlora.build.clustering`),
    stage-2 cluster experts (``share_fraction``, ``share_mode``: sharing across clusters, see
    :func:`build_cluster_library`)."""
    if not 0.0 < stage1_fraction < 1.0:
        raise ModloraError(f"stage1_fraction must be in (0, 1), got {stage1_fraction}")
    path = Path(path)
    with BuildLock(path) as lock:
        if private_library is None:
            private_library = path.parent / f"{path.name}-stage1"
            stage1 = build_private_library(private_library, tasks, config, budget_scale=stage1_fraction,
                                           executor=executor, ray_address=ray_address, stage="mbc-stage1",
                                           progress=progress, on_config_change=on_config_change)
        else:
            stage1 = open_library(private_library)  # a local path or any location (hf://, s3://, ...)
            stage1.check_base_model(_base_info(config))
            missing = [t for t in tasks if t not in stage1.task_to_expert()]
            if missing:
                raise ModloraError(f"{private_library}: no private expert for task(s) {', '.join(missing[:5])}")
        names = [stage1.task_to_expert()[t] for t in tasks]
        k_value: int | Literal["auto"] = "auto" if k == "auto" else int(k)
        if k_value != "auto" and not 1 <= k_value <= len(names):
            raise ModloraError(f"k={k_value} clusters needs at least that many experts (have {len(names)})")
        clustering = model_based_clustering(stage1.experts(names), k_value, features=features, sparsity=sparsity,
                                            n_components=n_components, k_range=k_range, seed=config.train.seed,
                                            cache=stage1)
        _refuse_no_structure(clustering, path, f"the stage-1 private experts (kept in {private_library})")
        tasks_of = {n: stage1.tasks(n) for n in names}
        lib = build_cluster_library(path, clustering, tasks_of, config, budget_per_task=1.0 - stage1_fraction,
                                    stage="mbc-stage2", executor=executor, ray_address=ray_address, progress=progress,
                                    on_config_change=on_config_change, share_fraction=share_fraction,
                                    share_mode=share_mode, lock=lock)
    return lib, clustering


def build_semantic_library(path: str | Path, tasks: Sequence[str], config: BuildConfig, *, k: int | str = "auto",
                           k_range: tuple[int, int] | None = None, auto_k: str | None = None, n_inputs: int = 4,
                           executor: str = "local", ray_address: str | None = None, progress: bool = True,
                           on_config_change: OnConfigChange = "refuse", share_fraction: float | None = None,
                           share_mode: ShareMode = DEFAULT_SHARE_MODE) -> tuple[ExpertLibrary, ClusteringResult]:
    """Semantic clustering: tasks clustered by the base model's embeddings of their definition + ``n_inputs``
    inputs (:func:`modlora.build.clustering.task_embeddings`, centred cosine), then one expert per cluster trained as
    MBC's stage 2 but with each task's whole budget (no stage 1): ``B·|cluster|`` steps, total ``N·B``."""
    from modlora.build.clustering import cluster_experts, semantic_similarity, task_embeddings
    from modlora.build.clustering.choices import DEFAULT_AUTO_K
    names = sorted(tasks)
    k_value: int | Literal["auto"] = "auto" if k == "auto" else int(k)
    if k_value != "auto" and not 1 <= k_value <= len(names):
        raise ModloraError(f"k={k_value} clusters needs at least that many tasks (have {len(names)})")
    with BuildLock(path) as lock:
        lm = _process_model(config.model, config.device, config.dtype)
        embeddings = task_embeddings(lm, load_tasks(config, names), n_inputs=n_inputs, progress=progress)
        clustering = cluster_experts(semantic_similarity(embeddings), k_value, k_range=k_range,
                                     seed=config.train.seed, auto_k=auto_k or DEFAULT_AUTO_K)  # type: ignore[arg-type]
        clustering = dataclasses.replace(clustering, method="semantic")
        _refuse_no_structure(clustering, path, "the tasks' embeddings")
        lib = build_cluster_library(path, clustering, {t: [t] for t in names}, config, budget_per_task=1.0,
                                    stage="semantic", executor=executor, ray_address=ray_address, progress=progress,
                                    on_config_change=on_config_change, share_fraction=share_fraction,
                                    share_mode=share_mode, lock=lock)
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
                                on_config_change=on_config_change)   # takes the lock of ``path``
    return lib, rnd


def expected_total_steps(strategy: Strategy, n_tasks: int, steps_per_task: int, cluster_sizes: Sequence[int] = (),
                         stage1_fraction: float = 0.4) -> int:
    """Optimizer steps a build costs (for compute matching and estimates)."""
    if strategy in ("private", "shared", "poly", "mhr"):
        return n_tasks * steps_per_task
    if strategy == "mbc":
        s1 = n_tasks * max(1, round(steps_per_task * stage1_fraction))
        return s1 + sum(max(1, round(steps_per_task * (1 - stage1_fraction) * s)) for s in cluster_sizes)
    return sum(max(1, math.ceil(steps_per_task * s)) for s in cluster_sizes)



@dataclass(frozen=True)
class PolyJob(Job):
    """Train the skills and allocation of a Poly/MHR library (one joint job) into ``library``."""

    library: str
    tasks: tuple[str, ...]
    skills: tuple[PlannedExpert, ...]
    heads: int
    allocation_lr: float
    config: BuildConfig
    show_progress: bool = False


def train_poly_job(job: PolyJob) -> dict[str, Any]:
    """Job body: train skills + allocation jointly (:func:`modlora.build.poly.train_poly`), store every skill, then the
    allocation (``meta/poly_allocation.json``, written last: its presence marks a finished build)."""
    from modlora.build.poly import PolyOptions, train_poly
    from modlora.library.skill_allocation import ALLOCATION_META
    lib = ExpertLibrary(job.library)
    cfg = job.config
    lm = _process_model(cfg.model, cfg.device, cfg.dtype)
    tasks = load_tasks(cfg, list(job.tasks))
    fmt = cfg.limits.formatter(lm.tokenizer)
    cap = _example_cap(cfg, tasks)
    train = {n: encode_tasks(fmt, {n: t}, "train", max_per_task=cap, seed=cfg.train.seed) for n, t in tasks.items()}
    val = {n: encode_tasks(fmt, {n: t}, "validation", max_per_task=cfg.max_val, seed=cfg.train.seed)
           for n, t in tasks.items()}
    train_config = cfg.train_config(float(len(job.tasks)))
    options = PolyOptions(len(job.skills), job.heads, job.allocation_lr)
    result = train_poly(lm.model, train, val, pad_id=lm.tokenizer.pad_token_id, spec=cfg.lora, config=train_config,
                        options=options, train_options=cfg.options, base_model_name=lm.info.name,
                        progress=job.show_progress, desc=job.name)
    shared_cost = ("train_tokens", "target_tokens", "train_seconds")
    metrics = {k: v / len(job.skills) if k in shared_cost else v for k, v in result.metrics.items()}
    for planned in job.skills:  # each skill records 1/S of the joint run's cost: sums over the library add up
        extra = {"stage": planned.stage, "budget_scale": planned.budget_scale, "balanced": cfg.balanced,
                 **dict(planned.extra), FINGERPRINT_KEY: expert_fingerprint(cfg, planned)}
        training = training_record(train_config, fmt, max_examples=cap, max_val=cfg.max_val,
                                   split_seed=cfg.train.seed, extra=extra)
        store_expert(lib, planned.name, result.skills[planned.name], tasks=list(job.tasks), training=training,
                     metrics=metrics, base_model=lm.info, overwrite=True)
    lib.save_meta(ALLOCATION_META, {**result.allocation.to_dict(), "allocation_lr": job.allocation_lr})
    return {"skills": [e.name for e in job.skills], "metrics": result.metrics}


def build_poly_library(path: str | Path, tasks: Sequence[str], config: BuildConfig, *, skills: int = 4,
                       heads: int = 1, allocation_lr: float | None = None, executor: str = "local",
                       ray_address: str | None = None, progress: bool = True,
                       on_config_change: OnConfigChange = "refuse") -> ExpertLibrary:
    """Poly (``heads=1``) or MHR (``heads > 1``): ``skills`` LoRA skills and a task → skill allocation trained
    jointly on all tasks for ``N·B`` steps (the shared expert's budget; :mod:`modlora.build.poly`). Skills are stored as
    experts ``skill{s}``, the allocation as ``meta/poly_allocation.json``. A finished build (every skill and the
    allocation stored, same fingerprints) is skipped; an unfinished one is trained again from the start."""
    from modlora.build.poly import DEFAULT_ALLOCATION_LR, PolyOptions
    from modlora.library.skill_allocation import ALLOCATION_META
    options = PolyOptions(skills, heads, allocation_lr if allocation_lr is not None else DEFAULT_ALLOCATION_LR)
    options.check_rank(config.lora.rank)
    check_init_fits(config.init, "poly" if heads == 1 else "mhr")
    names = tuple(sorted(tasks))
    if not names:
        raise ModloraError("a Poly/MHR library needs at least one task")
    stage = "poly" if heads == 1 else "mhr"
    extra = (("skills", options.skills), ("heads", options.heads), ("allocation_lr", options.allocation_lr))
    planned = tuple(PlannedExpert(f"skill{s}", names, float(len(names)), stage, extra=extra)
                    for s in range(options.skills))
    with BuildLock(path) as lock:
        lib = _reconcile(lock, config, planned, on_config_change)
        stored = lib.load_meta(ALLOCATION_META)
        done = (all(e.name in lib for e in planned) and isinstance(stored, dict)
                and stored.get("tasks") == list(names) and stored.get("skills") == [e.name for e in planned]
                and stored.get("heads") == heads)
        if not done:
            job = PolyJob(name=f"{stage} [{options.skills} skills × {heads} head(s)]", library=str(lib.path),
                          tasks=names, skills=planned, heads=heads, allocation_lr=options.allocation_lr,
                          config=config, show_progress=progress and executor == "local")
            run_jobs([job], train_poly_job, executor, ray_address=ray_address, desc=f"{stage} skills",  # type: ignore
                     progress=progress)
            lib.reload()
    return lib
