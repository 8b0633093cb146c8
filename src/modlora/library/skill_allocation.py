"""A Poly/MHR library's learned task → skill allocation (``meta/poly_allocation.json``): ``logits[t, j, s]`` of
task t, head j, skill s; a task's adapter mixes the skills' factors per head (:func:`mix_factors`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modlora.errors import LibraryError
from modlora.library.adapters import LoraAdapter

ALLOCATION_META = "poly_allocation"


def mix_factors(weights: torch.Tensor, stacked: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """Per-row, per-head mixture of stacked factors.

    ``weights`` (rows, h, S), ``stacked`` (S, ...) with the rank r at ``rank_dim``; the rank is split into h blocks
    of r/h and block j of row b is ``Σ_s weights[b, j, s] · stacked[s, block j]``. Returns (rows, ...)."""
    n_skills, heads = stacked.shape[0], weights.shape[1]
    if heads == 1:
        return torch.einsum("bs,s...->b...", weights[:, 0].to(stacked.dtype), stacked)
    r = stacked.shape[rank_dim]
    split = stacked.reshape(*stacked.shape[:rank_dim], heads, r // heads, *stacked.shape[rank_dim + 1:])
    split = split.movedim(rank_dim, 1)  # (S, h, ...)
    mixed = torch.einsum("bhs,sh...->bh...", weights.to(stacked.dtype), split).movedim(1, rank_dim)
    assert mixed.shape[0] == weights.shape[0] and n_skills == weights.shape[2]
    return mixed.reshape(weights.shape[0], *stacked.shape[1:])


@dataclass
class Allocation:
    """Learned allocation: ``logits[t, j, s]`` of task ``tasks[t]``, head j, skill ``skills[s]`` (T × h × S)."""

    tasks: list[str]
    skills: list[str]
    heads: int
    logits: np.ndarray

    def weights(self) -> np.ndarray:
        """``softmax`` over skills: (T, h, S), each (t, j) row sums to 1."""
        z = self.logits - self.logits.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "skills": list(self.skills), "heads": self.heads,
                "normalisation": "softmax", "logits": self.logits.tolist()}

    @classmethod
    def from_dict(cls, d: Any, source: str = ALLOCATION_META) -> Allocation:
        if not isinstance(d, Mapping):
            raise LibraryError(f"{source}: expected a JSON object")
        try:
            tasks, skills, heads = [str(t) for t in d["tasks"]], [str(s) for s in d["skills"]], int(d["heads"])
            logits = np.asarray(d["logits"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise LibraryError(f"{source}: malformed allocation ({exc})") from None
        if logits.shape != (len(tasks), heads, len(skills)):
            raise LibraryError(f"{source}: logits have shape {logits.shape}, expected "
                               f"{(len(tasks), heads, len(skills))} (tasks × heads × skills)")
        if not np.isfinite(logits).all():
            raise LibraryError(f"{source}: logits contain NaN or Inf")
        return cls(tasks, skills, heads, logits)

    def task_adapter(self, task: str, skills: Mapping[str, LoraAdapter]) -> LoraAdapter:
        """Task ``task``'s adapter: ``A_t``, ``B_t`` mixed from the skills' factors (exact, rank r)."""
        if task not in self.tasks:
            raise LibraryError(f"task {task!r} has no allocation (allocated tasks: {', '.join(self.tasks[:8])}"
                               f"{' ...' if len(self.tasks) > 8 else ''})")
        missing = [s for s in self.skills if s not in skills]
        if missing:
            raise LibraryError(f"allocation names skill(s) missing from the library: {', '.join(missing)}")
        first = skills[self.skills[0]]
        w = torch.as_tensor(self.weights()[self.tasks.index(task)], dtype=torch.float32).unsqueeze(0)  # (1, h, S)
        A = {m: mix_factors(w, torch.stack([skills[s].A[m].float() for s in self.skills]), 1)[0] for m in first.A}
        B = {m: mix_factors(w, torch.stack([skills[s].B[m].float() for s in self.skills]), 2)[0] for m in first.B}
        return LoraAdapter(first.spec, A, B, first.base_model_name)
