"""``dare-linear`` / ``dare-ties``: DARE (Yu et al. 2024): drop each ΔW entry with probability p, rescale by
1/(1−p), then combine by task arithmetic or by TIES sign election; factored back to a LoRA by SVD."""

from __future__ import annotations

from dataclasses import dataclass

from modlora.errors import OptionError
from modlora.reuse.methods.core import option
from modlora.reuse.methods.linear import TaskArithmetic, TaskArithmeticOptions


@dataclass(frozen=True)
class DareOptions(TaskArithmeticOptions):
    drop_rate: float = option(0.5, "drop probability p, in [0, 1)", type=float)
    drop_seed: int = option(0, "seed of the drop masks", type=int)
    rank: int | None = option(None, "SVD rank of the exported adapter (default: exact, can be large)", type=int)

    def __post_init__(self) -> None:
        from modlora.reuse.merging import check_fraction

        check_fraction(self.drop_rate, "drop_rate", low_open=False, high_open=True, error=OptionError)


class DareLinear(TaskArithmetic):
    name = "dare-linear"
    summary = "DARE drop-and-rescale, then Σ w_e ΔW_e (SVD back to a LoRA)"
    Options = DareOptions
    sparsify = "random"


class DareTies(DareLinear):
    name = "dare-ties"
    summary = "DARE drop-and-rescale, then TIES sign election (SVD back to a LoRA)"
    sign_consensus = True
