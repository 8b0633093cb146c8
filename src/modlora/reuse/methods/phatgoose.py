"""``phatgoose``: per-expert sigmoid gates trained on the expert's own data with the expert frozen (Muqeeth et al.
2024); per token, top-k experts by standardised ``x·g_e``. See :mod:`modlora.reuse.learned.gates`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modlora.reuse.methods.core import (
    Capabilities,
    RoutedLayerOptions,
    RoutedMethod,
    TrainingDataOptions,
    check_positive_int,
    check_top_k_fits,
    example_batches,
    option,
)

if TYPE_CHECKING:
    from modlora.library.experts import ExpertSet
    from modlora.models import LoadedModel


@dataclass(frozen=True)
class PhatgooseOptions(RoutedLayerOptions, TrainingDataOptions):
    top_k: int = option(2, "experts per token (the paper's 2)", type=int)
    steps: int = option(100, "gate-training steps per expert", type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.top_k, "top_k")
        check_positive_int(self.steps, "steps")


class Phatgoose(RoutedMethod):
    name = "phatgoose"
    summary = "per-token top-k routing by gates trained on each expert's data (needs training data)"
    Options = PhatgooseOptions
    capabilities = Capabilities(per_token=True, needs_data=True)

    def router(self, lm: LoadedModel, experts: ExpertSet) -> Any:
        import torch

        from modlora.reuse.learned.gates import PhatgooseRouter, phatgoose_gates_for_experts, stack_gates

        o = self.options
        assert isinstance(o, PhatgooseOptions)
        check_top_k_fits(self.name, o.top_k, experts)
        examples = example_batches(lm, experts, o, with_labels=True)
        with torch.enable_grad():  # gate training needs autograd even when called under no_grad/inference
            gates = phatgoose_gates_for_experts(lm.model, experts.as_dict(), examples, steps=o.steps,
                                                cache=experts.artifacts)
        return PhatgooseRouter(stack_gates(gates, list(experts.names)), top_k=o.top_k)
