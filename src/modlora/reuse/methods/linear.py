"""``linear``: task arithmetic ``ΔW = Σ_e w_e ΔW_e``, exact as one rank-``Σ r_e`` adapter (PEFT's ``"cat"``)."""

from __future__ import annotations

from dataclasses import dataclass

from modlora.library.experts import ExpertSet
from modlora.reuse.merging import MergeResult, select_experts, weighted_combination
from modlora.reuse.methods.core import MethodOptions, StaticMethod, option, parse_weights


@dataclass(frozen=True)
class LinearOptions(MethodOptions):
    weights: tuple[float, ...] | None = option(None, "comma-separated weight per expert (default 1/E each)",
                                               type=parse_weights, metavar="W1,W2,...")


class Linear(StaticMethod):
    name = "linear"
    summary = "task arithmetic: Σ w_e ΔW_e, exact (rank Σr)"
    Options = LinearOptions

    def combine(self, experts: ExpertSet) -> MergeResult:
        o = self.options
        assert isinstance(o, LinearOptions)
        chosen, w = select_experts(experts, o.weights)
        return MergeResult.exact(weighted_combination(chosen, w),
                                 {"method": self.name, "experts": list(chosen.names), "weights": w})
