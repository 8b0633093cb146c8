"""``ties``: TIES merging (Yadav et al. 2023) of the dense ΔW's, factored back to a LoRA by SVD.

Trim each ``ΔW_e`` to its top-``density`` magnitudes, elect each entry's sign by the sum of the trimmed values,
average the agreeing entries (disjoint mean), times ``λ``; see :class:`modlora.reuse.merging.TaskArithmeticMerge`."""

from __future__ import annotations

from dataclasses import dataclass

from modlora.errors import OptionError
from modlora.reuse.methods.core import option
from modlora.reuse.methods.linear import TaskArithmetic, TaskArithmeticOptions


@dataclass(frozen=True)
class TiesOptions(TaskArithmeticOptions):
    density: float = option(0.2, "share of entries kept per expert, in (0, 1]", type=float)
    scale: float = option(1.0, "λ applied to the merged ΔW", type=float)
    rank: int | None = option(None, "SVD rank of the exported adapter (default: exact, can be large)", type=int)

    def __post_init__(self) -> None:
        from modlora.reuse.merging import check_fraction

        check_fraction(self.density, "density", low_open=True, high_open=False, error=OptionError)


class Ties(TaskArithmetic):
    name = "ties"
    summary = "TIES: trim, elect sign, disjoint mean of the dense ΔW's (SVD back to a LoRA)"
    Options = TiesOptions
    sparsify = "magnitude"
    sign_consensus = True
