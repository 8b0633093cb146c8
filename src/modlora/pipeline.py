"""Glue between data, training and the library: train one expert for a set of tasks and store it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modlora.adapters import LoraSpec
from modlora.data import PromptFormatter, Task, encode_tasks
from modlora.library import ExpertEntry, ExpertLibrary
from modlora.models import LoadedModel
from modlora.training import TrainConfig, train_expert


def train_task_expert(lm: LoadedModel, library: ExpertLibrary, name: str, tasks: Mapping[str, Task], *,
                      spec: LoraSpec | None = None, config: TrainConfig | None = None,
                      max_examples: int | None = None, max_val: int | None = 32, max_prompt_tokens: int = 384,
                      max_target_tokens: int = 128, split_seed: int = 0, overwrite: bool = False,
                      progress: bool = True, extra_training: Mapping[str, Any] | None = None) -> ExpertEntry:
    """Train one expert on the train split of ``tasks`` (validated on their validation split) and add it."""
    spec = spec or LoraSpec()
    config = config or TrainConfig()
    library.check_base_model(lm.info)
    fmt = PromptFormatter(lm.tokenizer, max_prompt_tokens=max_prompt_tokens, max_target_tokens=max_target_tokens)
    train = encode_tasks(fmt, tasks, "train", max_per_task=max_examples, seed=split_seed)
    val = encode_tasks(fmt, tasks, "validation", max_per_task=max_val, seed=split_seed)
    result = train_expert(lm.model, train, val, pad_id=lm.tokenizer.pad_token_id, spec=spec, config=config,
                          base_model_name=lm.info.name, progress=progress, desc=f"train {name}")
    training = {**config.to_dict(), "max_examples_per_task": max_examples, "max_val_per_task": max_val,
                "max_prompt_tokens": max_prompt_tokens, "max_target_tokens": max_target_tokens,
                "split_seed": split_seed, "chat_template": bool(fmt.use_chat_template), **(extra_training or {})}
    return library.add(name, result.adapter, tasks=list(tasks), training=training, metrics=result.metrics,
                       base_model=lm.info, overwrite=overwrite)
