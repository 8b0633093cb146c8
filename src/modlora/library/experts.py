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
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from modlora.errors import AdapterError, LibraryError
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


SHARE_META = "share"
ShareMode = Literal["warm", "residual"]
SHARE_MODES: tuple[ShareMode, ...] = ("warm", "residual")
DEFAULT_SHARE_MODE: ShareMode = "warm"
"""Measured (benchmarks/results/share_warm_start.md, README: Sharing across clusters): residual was worse than warm
start in every seed, by a little, and warm start needs nothing extra at reuse."""


@dataclass(frozen=True)
class ShareInfo:
    """How a library built with ``--share`` (``meta/share.json``) is applied.

    Expert ``expert`` was trained on all the tasks first (``fraction`` g of every task's budget); the cluster
    ``experts`` then either started from its factors (``warm``: each already contains the shared start) or were
    trained as residuals on top of it (``residual``: base weights ``W + ΔW_shared`` frozen while they trained, so
    reuse applies ``ΔW_shared`` on every token). Either way reuse routes or merges over the cluster ``experts``
    only."""

    expert: str
    mode: ShareMode
    fraction: float
    experts: tuple[str, ...]

    def routed(self, library_experts: Sequence[str]) -> list[str]:
        """The experts a reuse method combines by default: every expert of the library but the shared one (experts
        added after the build included)."""
        return [name for name in library_experts if name != self.expert]

    def to_dict(self) -> dict[str, Any]:
        return {"expert": self.expert, "mode": self.mode, "fraction": self.fraction, "experts": list(self.experts)}

    @classmethod
    def from_dict(cls, d: Any, source: str = "meta/share.json") -> ShareInfo:
        """Parse ``meta/share.json`` (``mode: warm-start``, written before the residual mode existed, is ``warm``);
        :class:`LibraryError` naming ``source`` and the field when malformed."""
        if not isinstance(d, Mapping):
            raise LibraryError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mode = {"warm-start": "warm"}.get(d.get("mode"), d.get("mode"))
        if mode not in SHARE_MODES:
            raise LibraryError(f"{source}: field 'mode' must be one of {', '.join(SHARE_MODES)}, got {d.get('mode')!r}")
        expert, experts, fraction = d.get("expert"), d.get("experts"), d.get("fraction")
        if not isinstance(expert, str) or not expert:
            raise LibraryError(f"{source}: field 'expert' must be an expert name, got {expert!r}")
        if not isinstance(experts, list) or not all(isinstance(n, str) for n in experts) or expert in experts:
            raise LibraryError(f"{source}: field 'experts' must list the cluster experts' names (not {expert!r}), "
                               f"got {experts!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise LibraryError(f"{source}: field 'fraction' must be a number, got {fraction!r}")
        return cls(expert, mode, float(fraction), tuple(experts))  # type: ignore[arg-type]

    @classmethod
    def of(cls, experts: Experts) -> ShareInfo | None:
        """The share record of a library (any source with ``load_meta``), or ``None`` (no ``--share``, or not a
        library)."""
        load_meta = getattr(experts, "load_meta", None)
        if load_meta is None:
            return None
        meta = load_meta(SHARE_META)
        path = getattr(experts, "path", None)
        return None if meta is None else cls.from_dict(meta, f"{path}/meta/{SHARE_META}.json" if path else
                                                       f"meta/{SHARE_META}.json")
