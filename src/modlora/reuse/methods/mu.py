"""``mu``: μ by parameter averaging, the reference implementation's μ: ``Ā = mean_e A_e``, ``B̄ = mean_e B_e``,
``ΔW = s · B̄ Ā`` (equal ranks and scalings), merged into the weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modlora.reuse.methods.core import StaticMethod

if TYPE_CHECKING:
    from modlora.library.experts import ExpertSet
    from modlora.reuse.merging import MergeResult


class Mu(StaticMethod):
    name = "mu"
    summary = "μ: uniform parameter averaging (mean A, mean B; the paper's μ)"

    def combine(self, experts: ExpertSet) -> MergeResult:
        from modlora.reuse.lowrank import parameter_average
        from modlora.reuse.merging import MergeResult

        return MergeResult.exact(parameter_average(experts), {"method": self.name, "experts": list(experts.names)})
