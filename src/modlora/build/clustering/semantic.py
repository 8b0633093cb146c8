"""Semantic task embeddings: the base model's mean-pooled last hidden states on each task's definition and first
inputs (:func:`task_embeddings`), and the (centred) cosine of tasks or of experts (the mean embedding of their
tasks' texts) as a :class:`~modlora.build.clustering.similarity.SimilarityResult`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from modlora.build.clustering.similarity import (
    SimilarityResult,
    _load_cached_rows,
    _save_cached_rows,
    centre_gram,
    cosine_from_gram,
)
from modlora.errors import DataError, LibraryError
from modlora.library.experts import ArtifactStore

if TYPE_CHECKING:
    from modlora.data import Task
    from modlora.models import LoadedModel

SEMANTIC_ARTIFACT_VERSION = "mbc-semantic-v1"


@dataclass
class TaskEmbeddings:
    """Mean-pooled last hidden states of the base model: ``vectors[i]`` (hidden size h) belongs to ``names[i]``."""

    names: list[str]
    vectors: np.ndarray


def task_text(task: Task, n_inputs: int = 4) -> str:
    """What describes a task: its definition followed by its first ``n_inputs`` instance inputs."""
    parts = [task.definition.strip()] + [inst.input.strip() for inst in task.instances[:n_inputs]]
    return "\n\n".join(p for p in parts if p)


def _embed_text(lm: LoadedModel, text: str, max_tokens: int) -> np.ndarray:
    """Mean over tokens of the last hidden state (h,), for the first ``max_tokens`` tokens of ``text``."""
    ids = lm.tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_tokens,
                       return_tensors="pt")["input_ids"]
    device = next(lm.model.parameters()).device
    with torch.inference_mode():
        out = lm.model(input_ids=ids.to(device), output_hidden_states=True)
    return out.hidden_states[-1][0].float().mean(dim=0).cpu().double().numpy()


def _embed_groups(lm: LoadedModel, groups: Mapping[str, Sequence[str]], *, max_tokens: int,
                  cache: ArtifactStore | None, kind: str, progress: bool) -> np.ndarray:
    """Row per group: the mean of its texts' embeddings; cached per group name with a fingerprint of the
    base model's identity and the texts."""
    rows: list[np.ndarray] = []
    items = list(groups.items())
    iterator: Any = items
    if progress:
        from modlora.progress import progress_bar

        iterator = progress_bar(items, desc="embedding tasks", unit="task")
    for name, texts in iterator:
        if not texts:
            raise DataError(f"{name!r}: no task text to embed")
        h = hashlib.sha256(json.dumps([kind, lm.info.to_dict(),
                                       list(texts)]).encode())
        fingerprint = h.digest()
        cached = _load_cached_rows(cache, [name], kind, "embedding", fingerprint) if cache is not None else None
        if cached is not None:
            rows.append(cached[0])
            continue
        row = np.mean([_embed_text(lm, text, max_tokens) for text in texts], axis=0)
        if cache is not None:
            _save_cached_rows(cache, [name], kind, "embedding", fingerprint, row[None, :])
        rows.append(row)
    return np.stack(rows)


def task_embeddings(lm: LoadedModel, tasks: Mapping[str, Task] | Sequence[Task], *, n_inputs: int = 4,
                    max_tokens: int = 256, progress: bool = False) -> TaskEmbeddings:
    """Embed each task (definition + first ``n_inputs`` inputs, at most ``max_tokens`` tokens) with the base model.

    ``vectors[i] = mean_t h_L(t)`` over the tokens t of :func:`task_text` (n × hidden size, float64); tasks are
    ordered by name. Nothing is downloaded: the base model itself is the encoder.
    """
    by_name = dict(tasks) if isinstance(tasks, Mapping) else {t.name: t for t in tasks}
    names = sorted(by_name)
    if not names:
        raise DataError("no tasks to embed")
    vectors = _embed_groups(lm, {name: [task_text(by_name[name], n_inputs)] for name in names}, max_tokens=max_tokens,
                            cache=None, kind=f"{SEMANTIC_ARTIFACT_VERSION}-i{n_inputs}-t{max_tokens}",
                            progress=progress)
    return TaskEmbeddings(names=names, vectors=vectors)


def semantic_similarity(embeddings: TaskEmbeddings, *, centre: bool = True) -> SimilarityResult:
    """Cosine of the (centred: minus the mean over tasks, which removes the model's common direction) embeddings."""
    vectors = np.asarray(embeddings.vectors, dtype=np.float64)
    if len(embeddings.names) < 2:
        raise LibraryError(f"clustering needs at least 2 tasks, got {len(embeddings.names)}")
    gram = vectors @ vectors.T
    similarity, normalised = cosine_from_gram(centre_gram(gram) if centre else gram)
    return SimilarityResult(names=list(embeddings.names), similarity=similarity, embeddings=normalised,
                            n_components=len(embeddings.names), features="semantic", centred=centre)


def expert_semantic_similarity(lm: LoadedModel, tasks_of: Mapping[str, Sequence[str]], tasks: Mapping[str, Task], *,
                               n_inputs: int = 4, max_tokens: int = 256, centre: bool = True,
                               cache: ArtifactStore | None = None, progress: bool = False) -> SimilarityResult:
    """Semantic similarity of experts: each expert is the mean embedding of its tasks' texts (:func:`task_text`).

    ``tasks_of`` maps expert name → its task names (all must be in ``tasks``). ``cache`` (an expert library)
    stores each expert's embedding, keyed by the base model's identity and the texts.
    """
    names = sorted(tasks_of)
    if len(names) < 2:
        raise LibraryError(f"MBC needs at least 2 experts to compare, got {len(names)} ({names})")
    groups: dict[str, list[str]] = {}
    for name in names:
        missing = [t for t in tasks_of[name] if t not in tasks]
        if missing or not tasks_of[name]:
            raise DataError(f"expert {name!r}: no data for its task(s) {missing or ['(none recorded)']}; semantic "
                            "features need each task's definition and inputs (--data)")
        groups[name] = [task_text(tasks[t], n_inputs) for t in tasks_of[name]]
    vectors = _embed_groups(lm, groups, max_tokens=max_tokens, cache=cache,
                            kind=f"{SEMANTIC_ARTIFACT_VERSION}-i{n_inputs}-t{max_tokens}", progress=progress)
    return semantic_similarity(TaskEmbeddings(names=names, vectors=vectors), centre=centre)
