"""``linear``: task arithmetic ``ΔW = Σ_e w_e ΔW_e``, exact as one rank-``Σ r_e`` adapter (PEFT's ``"cat"``).

:class:`TaskArithmetic` is the one method class behind ``linear``, ``ties``, ``dare-linear`` and ``dare-ties``
(:class:`~modlora.reuse.merging.TaskArithmeticMerge`): a method names its sparsification and whether signs are
elected; its options give the weights and the merge's numeric settings, by the same names (``density``,
``drop_rate``, ``drop_seed``, ``scale``, ``rank``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from modlora.reuse.methods.core import MethodOptions, StaticMethod, option, parse_weights

if TYPE_CHECKING:
    from modlora.library.experts import ExpertSet
    from modlora.reuse.merging import MergeResult, Sparsify


@dataclass(frozen=True)
class TaskArithmeticOptions(MethodOptions):
    """The options of every task-arithmetic merge; a method's subclass adds the settings it exposes."""

    weights: tuple[float, ...] | None = option(None, "comma-separated weight per expert (default 1/E each; 1 each "
                                               "with TIES sign election)", type=parse_weights, metavar="W1,W2,...")


class TaskArithmetic(StaticMethod):
    """Sparsify each ``ΔW_e`` (``sparsify``), elect signs or not (``sign_consensus``), ``λ · Σ_e w_e ΔW_e``."""

    Options = TaskArithmeticOptions
    sparsify: ClassVar[Sparsify] = "none"
    sign_consensus: ClassVar[bool] = False

    def combine(self, experts: ExpertSet) -> MergeResult:
        from modlora.reuse.merging import TaskArithmeticMerge

        o = self.options
        assert isinstance(o, TaskArithmeticOptions)
        given = {f.name for f in fields(o)}
        settings = {f.name: getattr(o, f.name) for f in fields(TaskArithmeticMerge) if f.name in given}
        merge = TaskArithmeticMerge(sparsify=self.sparsify, sign_consensus=self.sign_consensus, **settings)
        return merge.merge(experts, o.weights, method=self.name)


class Linear(TaskArithmetic):
    name = "linear"
    summary = "task arithmetic: Σ w_e ΔW_e, exact (rank Σr)"
