"""Glue between data, training and the library: train experts for sets of tasks and store each as it finishes."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from modlora.build.initialisation import DEFAULT_INIT, InitMethod, initial_adapter
from modlora.build.multitrain import ExpertData, MultiTrainOptions, train_experts
from modlora.build.training import TrainConfig, TrainResult
from modlora.data import PromptFormatter, PromptLimits, Task, encode_tasks
from modlora.errors import LibraryError
from modlora.library.adapters import LoraAdapter, LoraSpec
from modlora.library.store import ExpertEntry, ExpertLibrary
from modlora.models import LoadedModel


@dataclass(frozen=True)
class ExpertPlan:
    """One expert to train: its tasks, optimisation settings, per-task example cap and extra manifest fields."""

    tasks: Mapping[str, Task]
    config: TrainConfig = field(default_factory=TrainConfig)
    max_examples: int | None = None
    extra_training: Mapping[str, Any] = field(default_factory=dict)
    init: LoraAdapter | None = None
    """Warm start: initial factors (default: PEFT's initialisation)."""


def training_record(config: TrainConfig, formatter: PromptFormatter, *, max_examples: int | None,
                    max_val: int | None, split_seed: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    """An expert's training record (its manifest's ``training``; the one writer): the optimisation settings, the
    per-task example caps, the prompt limits (:meth:`PromptLimits.record`, read back by
    :meth:`PromptLimits.from_record`) and how many of the expert's prompts ``formatter`` cut, the split seed, whether
    the chat template was used, then ``extra``."""
    return {**config.to_dict(), "max_examples_per_task": max_examples, "max_val_per_task": max_val,
            **formatter.limits.record(), "prompts_cut": formatter.cut_prompts,
            "definitions_cut": formatter.cut_definitions, "split_seed": split_seed,
            "chat_template": bool(formatter.use_chat_template), **extra}


def store_expert(library: ExpertLibrary, name: str, adapter: LoraAdapter, **fields: Any) -> ExpertEntry:
    """``library.add(name, adapter, **fields)``; a write the system refuses (a full disk, a file-size limit) raises
    :class:`LibraryError` saying why: the atomic write left the library as it was, every expert stored before kept."""
    try:
        return library.add(name, adapter, **fields)
    except OSError as exc:
        raise LibraryError(f"{library.path}: cannot store expert {name!r} ({exc.strerror or exc}); the library is as "
                           "it was, with every expert stored before") from exc


def train_task_experts(lm: LoadedModel, library: ExpertLibrary, plans: Mapping[str, ExpertPlan], *,
                       spec: LoraSpec | None = None, options: MultiTrainOptions | None = None,
                       max_val: int | None = 32, limits: PromptLimits = PromptLimits(), split_seed: int = 0,
                       overwrite: bool = False, progress: bool = True, desc: str = "train", keep: Collection[str] = (), init: InitMethod = DEFAULT_INIT
                       ) -> dict[str, ExpertEntry]:
    """Train every planned expert together (:func:`modlora.build.multitrain.train_experts`) on the train split of its
    tasks, validated on their validation split; each expert is added to ``library`` as soon as its budget ends (by
    :func:`store_expert`),
    except those named in ``keep`` (trained only as companions: already stored). Experts without a planned ``init``
    start as ``init`` says (:mod:`modlora.build.initialisation`). Prompts are cut as ``limits`` says; each expert records
    the limits and how many of its prompts were cut (``prompts_cut``, ``definitions_cut``: train and validation)."""
    spec = spec or LoraSpec()
    library.check_base_model(lm.info)
    data: dict[str, ExpertData] = {}
    formatters: dict[str, PromptFormatter] = {}
    for name, p in plans.items():
        fmt = formatters[name] = limits.formatter(lm.tokenizer)
        data[name] = ExpertData(encode_tasks(fmt, p.tasks, "train", max_per_task=p.max_examples, seed=split_seed),
                                encode_tasks(fmt, p.tasks, "validation", max_per_task=max_val, seed=split_seed),
                                p.config, p.init)
    for name, d in data.items():
        if d.init is None:
            d.init = initial_adapter(init, lm.model, spec, name, d.train, pad_id=lm.tokenizer.pad_token_id,
                                     seed=d.config.seed, batch_size=d.config.batch_size)
    entries: dict[str, ExpertEntry] = {}

    def store(name: str, result: TrainResult) -> None:
        if name in keep:
            return
        plan = plans[name]
        training = training_record(plan.config, formatters[name], max_examples=plan.max_examples, max_val=max_val,
                                   split_seed=split_seed, extra=plan.extra_training)
        entries[name] = store_expert(library, name, result.adapter, tasks=list(plan.tasks), training=training,
                                     metrics=result.metrics, base_model=lm.info, overwrite=overwrite)

    train_experts(lm.model, data, pad_id=lm.tokenizer.pad_token_id, spec=spec, options=options,
                  base_model_name=lm.info.name, progress=progress, desc=desc, on_finished=store)
    return entries


def train_task_expert(lm: LoadedModel, library: ExpertLibrary, name: str, tasks: Mapping[str, Task], *,
                      spec: LoraSpec | None = None, config: TrainConfig | None = None,
                      max_examples: int | None = None, max_val: int | None = 32,
                      limits: PromptLimits = PromptLimits(), split_seed: int = 0, overwrite: bool = False,
                      progress: bool = True, extra_training: Mapping[str, Any] | None = None,
                      init: InitMethod = DEFAULT_INIT) -> ExpertEntry:
    """Train one expert on the train split of ``tasks`` (validated on their validation split) and add it."""
    plan = ExpertPlan(tasks, config or TrainConfig(), max_examples, dict(extra_training or {}))
    return train_task_experts(lm, library, {name: plan}, spec=spec, max_val=max_val,
                              limits=limits, split_seed=split_seed, overwrite=overwrite, progress=progress,
                              desc=f"train {name}", init=init)[name]
