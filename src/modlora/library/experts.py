"""Where experts come from: one :class:`ExpertSource` protocol and one ordered, validated :class:`ExpertSet`.

Every function that takes "some experts" (routing, merging, clustering, the reuse methods) accepts
``Experts = ExpertSource | Mapping[str, LoraAdapter] | ExpertSet`` and turns it into an :class:`ExpertSet` with
:meth:`ExpertSet.of` — the single entry point. An :class:`~modlora.library.store.ExpertLibrary` is an ``ExpertSource``;
so is any object with the same methods (a remote library, a test double). Derived tensors (Arrow prototypes,
centroids, similarity embeddings) are cached through the source's artifacts when it has them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from modlora.errors import AdapterError
from modlora.library.adapters import LoraAdapter


@runtime_checkable
class ArtifactStore(Protocol):
    """Per-expert auxiliary tensors keyed by ``kind`` (e.g. ``arrow-v1-untied``); ``None`` when absent."""

    def load_artifact(self, expert: str, kind: str) -> dict[str, torch.Tensor] | None: ...

    def save_artifact(self, expert: str, kind: str, tensors: Mapping[str, torch.Tensor]) -> None: ...


@runtime_checkable
class ExpertSource(ArtifactStore, Protocol):
    """A named collection of LoRA experts with their training tasks and an artifact cache (a library)."""

    def expert_names(self) -> list[str]: ...

    def get(self, name: str) -> LoraAdapter: ...

    def tasks(self, name: str) -> list[str]: ...


@dataclass(frozen=True)
class ExpertSet:
    """An ordered, validated view of the experts to combine or route over.

    ``names[i]`` is expert ``i``; ``adapters[i]`` its factors. ``source`` is the :class:`ExpertSource` they came from
    (used for task labels and to cache derived tensors), else ``None``; ``tag`` is appended to artifact kinds so
    that derived experts (GenKnowSub) never share a cache entry with the stored ones.
    """

    names: tuple[str, ...]
    adapters: tuple[LoraAdapter, ...]
    source: ExpertSource | None = None
    tag: str = ""

    @classmethod
    def of(cls, experts: Experts, names: Sequence[str] | None = None) -> ExpertSet:
        """The experts of a source, a mapping or an ``ExpertSet`` (optionally only ``names``, in that order).

        Raises :class:`AdapterError` naming the expert when one is missing or is not a :class:`LoraAdapter`, and
        when there are no experts at all."""
        if isinstance(experts, ExpertSet):
            out = experts if names is None else experts.subset(names)
        elif isinstance(experts, Mapping):
            chosen = list(experts) if names is None else list(names)
            unknown = [n for n in chosen if n not in experts]
            if unknown:
                raise AdapterError(f"unknown expert(s) {unknown[:5]}; known: {list(experts)[:10]}")
            out = cls(tuple(str(n) for n in chosen), tuple(experts[n] for n in chosen))
        elif isinstance(experts, ExpertSource):
            chosen = list(experts.expert_names()) if names is None else list(names)
            out = cls(tuple(chosen), tuple(experts.get(n) for n in chosen), experts)
        else:
            raise AdapterError(f"experts must be a library, a mapping name -> LoraAdapter or an ExpertSet, got "
                               f"{type(experts).__name__}")
        if not out.names:
            raise AdapterError("no experts given")
        for n, a in zip(out.names, out.adapters, strict=True):
            if not isinstance(a, LoraAdapter):
                raise AdapterError(f"expert {n!r} is a {type(a).__name__}, not a LoraAdapter")
        return out

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, names: Sequence[str]) -> ExpertSet:
        """The named experts, in the given order (same source and tag)."""
        return ExpertSet(tuple(names), tuple(self.adapters[self.index(n)] for n in names), self.source, self.tag)

    def items(self) -> list[tuple[str, LoraAdapter]]:
        return list(zip(self.names, self.adapters, strict=True))

    def as_dict(self) -> dict[str, LoraAdapter]:
        return dict(self.items())

    def modules(self) -> list[str]:
        """Union of module paths adapted by any expert, sorted."""
        return sorted({m for a in self.adapters for m in a.A})

    def experts_of(self, module: str) -> list[int]:
        """Indices of the experts that adapt ``module``."""
        return [i for i, a in enumerate(self.adapters) if module in a.A]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise AdapterError(f"unknown expert {name!r}; known: {list(self.names)[:10]}") from None

    def tasks_of(self, name: str) -> list[str]:
        """Training tasks of expert ``name`` from the source (``[]`` without one)."""
        return list(self.source.tasks(name)) if self.source is not None else []

    @property
    def artifacts(self) -> ArtifactStore | None:
        """Where derived tensors are cached (the source), or ``None``."""
        return self.source


Experts = ExpertSource | Mapping[str, LoraAdapter] | ExpertSet


