"""``oracle``: each example uses the expert trained on its own (known) task — the in-distribution ceiling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from modlora.errors import RoutingError
from modlora.reuse.methods.core import Capabilities, RoutedMethod

if TYPE_CHECKING:
    import torch

    from modlora.library.experts import ExpertSet
    from modlora.models import LoadedModel
    from modlora.reuse.apply import ExampleRouter


class Oracle(RoutedMethod):
    name = "oracle"
    summary = "each example routed to its own task's expert (in-distribution evaluation only)"
    capabilities = Capabilities(needs_task_labels=True)

    def router(self, lm: LoadedModel, experts: ExpertSet) -> str:
        return "uniform"  # replaced by the per-example weights on every call

    def example_router(self, lm: LoadedModel, experts: ExpertSet) -> ExampleRouter:
        from modlora.reuse.routing import oracle_weights

        tasks_of = {n: experts.tasks_of(n) for n in experts.names}

        def weights(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tasks: Sequence[str] | None,
                    continuing: bool) -> torch.Tensor:
            if tasks is None:
                raise RoutingError("the oracle router needs each example's task (in-distribution evaluation only)")
            return oracle_weights(tasks, experts, tasks_of)

        return weights
