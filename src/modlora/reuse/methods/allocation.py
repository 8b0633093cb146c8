"""``allocation``: Poly/MHR in distribution — each example uses its task's learned mixture of the skills.

Task t's adapter is mixed from the skills' factors with its allocation ``w_t = softmax(Z[t])`` (per head for
MHR; :mod:`modlora.build.poly`): ``A_t = Σ_s w_ts A_s``, ``B_t = Σ_s w_ts B_s``, ``ΔW_t = s · B_t A_t``. A product of
mixtures is not a mixture of per-skill outputs (``B_t A_t ≠ Σ_s w_ts B_s A_s``), so per-example weights over the
skills cannot express it; instead the T task adapters (rank r each) are materialised once and each example is
routed to its own task's adapter — exact, for Poly and MHR alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modlora.errors import RoutingError
from modlora.reuse.methods.core import Capabilities, MethodOptions, ReuseMethod, option

if TYPE_CHECKING:
    import torch

    from modlora.library.experts import ExpertSet
    from modlora.library.skill_allocation import Allocation
    from modlora.models import LoadedModel
    from modlora.reuse.apply import ReuseModel


def library_allocation(experts: ExpertSet) -> Allocation:
    """The allocation stored with the experts' library (``meta/poly_allocation.json``)."""
    from modlora.library.skill_allocation import ALLOCATION_META, Allocation

    source = experts.source
    stored = source.load_meta(ALLOCATION_META) if source is not None and hasattr(source, "load_meta") else None
    if stored is None:
        raise RoutingError("the allocation method needs a Poly/MHR library (meta/poly_allocation.json: build it "
                           "with --strategy poly or mhr)")
    return Allocation.from_dict(stored, source=f"{getattr(source, 'path', 'library')}/meta/{ALLOCATION_META}.json")


@dataclass(frozen=True)
class AllocationOptions(MethodOptions):
    path: str = option("auto", "routed-layer kernel over the task adapters: dense fold, sparse top-k or automatic",
                       choices=("auto", "dense", "sparse"))


class AllocationMethod(ReuseMethod):
    name = "allocation"
    summary = "Poly/MHR: each example uses its task's learned mixture of the skills (in-distribution only)"
    capabilities = Capabilities(needs_task_labels=True)
    Options = AllocationOptions

    def prepare(self, lm: LoadedModel, experts: ExpertSet | None) -> ReuseModel:
        import torch

        from modlora.library.experts import ExpertSet
        from modlora.reuse.apply import ReuseModel
        from modlora.reuse.routing import route

        opts = self.options
        assert isinstance(opts, AllocationOptions)
        if experts is None:
            raise RoutingError("the allocation method needs a Poly/MHR library")
        allocation = library_allocation(experts)
        skills = experts.as_dict()
        per_task = ExpertSet.of({t: allocation.task_adapter(t, skills) for t in allocation.tasks})
        routed = route(lm.model, per_task, "uniform", path=opts.path)  # type: ignore[arg-type]
        index = {t: i for i, t in enumerate(per_task.names)}

        def weights(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tasks: Sequence[str] | None,
                    continuing: bool) -> torch.Tensor:
            if tasks is None:
                raise RoutingError("the allocation method needs each example's task (in-distribution only)")
            unknown = sorted({t for t in tasks if t not in index})
            if unknown:
                raise RoutingError(f"allocation: task(s) {', '.join(unknown[:5])} have no learned allocation")
            w = torch.zeros(len(tasks), len(index))
            w[torch.arange(len(tasks)), torch.tensor([index[t] for t in tasks])] = 1.0
            return w

        return ReuseModel(self.name, lm.model, routed=routed, example_router=weights)
