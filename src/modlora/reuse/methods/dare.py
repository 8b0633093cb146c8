"""``dare-linear`` / ``dare-ties``: DARE (Yu et al. 2024): drop each ΔW entry with probability p, rescale by
1/(1−p), then combine by task arithmetic or by TIES sign election; factored back to a LoRA by SVD."""

from __future__ import annotations

from dataclasses import dataclass

from modlora.library.experts import ExpertSet
from modlora.reuse.merging import MergeResult, check_fraction, dare_merge
from modlora.reuse.methods.core import MethodOptions, StaticMethod, option, parse_weights


@dataclass(frozen=True)
class DareOptions(MethodOptions):
    weights: tuple[float, ...] | None = option(None, "comma-separated weight per expert (default: 1/E for "
                                               "dare-linear, 1 for dare-ties)", type=parse_weights,
                                               metavar="W1,W2,...")
    drop_rate: float = option(0.5, "drop probability p, in [0, 1)", type=float)
    drop_seed: int = option(0, "seed of the drop masks", type=int)
    rank: int | None = option(None, "SVD rank of the exported adapter (default: exact, can be large)", type=int)

    def __post_init__(self) -> None:
        check_fraction(self.drop_rate, "drop_rate", low_open=False, high_open=True)


class DareLinear(StaticMethod):
    name = "dare-linear"
    summary = "DARE drop-and-rescale, then Σ w_e ΔW_e (SVD back to a LoRA)"
    Options = DareOptions

    def combine(self, experts: ExpertSet) -> MergeResult:
        o = self.options
        assert isinstance(o, DareOptions)
        return dare_merge(experts, o.weights, drop_rate=o.drop_rate, seed=o.drop_seed, rank=o.rank,
                          combine=self.name.removeprefix("dare-"))  # type: ignore[arg-type]


class DareTies(DareLinear):
    name = "dare-ties"
    summary = "DARE drop-and-rescale, then TIES sign election (SVD back to a LoRA)"
