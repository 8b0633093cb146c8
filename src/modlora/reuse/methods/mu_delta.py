"""``mu-delta``: μ by exact ΔW averaging, ``ΔW = mean_e s_e B_e A_e`` as one rank-``Σ r_e`` adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modlora.reuse.methods.core import StaticMethod

if TYPE_CHECKING:
    from modlora.library.experts import ExpertSet
    from modlora.reuse.merging import MergeResult


class MuDelta(StaticMethod):
    name = "mu-delta"
    summary = "μ: uniform ΔW averaging, exact (mean of B·A, rank Σr)"

    def combine(self, experts: ExpertSet) -> MergeResult:
        from modlora.reuse.lowrank import weighted_delta_sum
        from modlora.reuse.merging import MergeResult

        return MergeResult.exact(weighted_delta_sum(experts), {"method": self.name, "experts": list(experts.names)})
