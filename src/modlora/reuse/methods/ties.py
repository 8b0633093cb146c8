"""``ties``: TIES merging (Yadav et al. 2023) of the dense ΔW's, factored back to a LoRA by SVD.

Trim each ``ΔW_e`` to its top-``density`` magnitudes, elect each entry's sign by the sum of the trimmed values,
average the agreeing entries (disjoint mean), times ``λ``; see :func:`modlora.reuse.merging.ties_merge`."""

from __future__ import annotations

from dataclasses import dataclass

from modlora.library.experts import ExpertSet
from modlora.reuse.merging import MergeResult, check_fraction, ties_merge
from modlora.reuse.methods.core import MethodOptions, StaticMethod, option, parse_weights


@dataclass(frozen=True)
class TiesOptions(MethodOptions):
    weights: tuple[float, ...] | None = option(None, "comma-separated weight per expert (default 1 each)",
                                               type=parse_weights, metavar="W1,W2,...")
    density: float = option(0.2, "share of entries kept per expert, in (0, 1]", type=float)
    scale: float = option(1.0, "λ applied to the merged ΔW", type=float)
    rank: int | None = option(None, "SVD rank of the exported adapter (default: exact, can be large)", type=int)

    def __post_init__(self) -> None:
        check_fraction(self.density, "density", low_open=True, high_open=False)


class Ties(StaticMethod):
    name = "ties"
    summary = "TIES: trim, elect sign, disjoint mean of the dense ΔW's (SVD back to a LoRA)"
    Options = TiesOptions

    def combine(self, experts: ExpertSet) -> MergeResult:
        o = self.options
        assert isinstance(o, TiesOptions)
        return ties_merge(experts, o.weights, density=o.density, scale=o.scale, rank=o.rank)
