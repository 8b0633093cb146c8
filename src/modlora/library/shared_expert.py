"""A library built with ``--share`` (``meta/share.json``): which expert is the shared one and how reuse applies it
(:class:`ShareInfo`). Torch-free, so the CLI reads the share modes without loading torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from modlora.errors import LibraryError

if TYPE_CHECKING:
    from modlora.library.experts import Experts


SHARE_META = "share"


ShareMode = Literal["warm", "residual"]


SHARE_MODES: tuple[ShareMode, ...] = ("warm", "residual")


DEFAULT_SHARE_MODE: ShareMode = "warm"
"""Measured (benchmarks/results/share_warm_start.md, docs/methods.md: sharing across clusters): residual was worse than warm
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
