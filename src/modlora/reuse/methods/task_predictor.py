"""``tp``: a task predictor (logistic regression on the base model's mean-pooled last hidden states of each
expert's training inputs) routes each example to its top-k predicted experts, for every token of that example."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    import torch

    from modlora.library.experts import ExpertSet
    from modlora.models import LoadedModel
    from modlora.reuse.apply import ExampleRouter


@dataclass(frozen=True)
class TaskPredictorOptions(RoutedLayerOptions, TrainingDataOptions):
    top_k: int = option(1, "experts per example: 1 routes to the predicted expert, k > 1 mixes the top-k by "
                        "renormalised probability", type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.top_k, "top_k")


class _PromptPrediction:
    """Per-example weights predicted on each prompt and kept while decoding continues its KV cache."""

    def __init__(self, predictor: object, model: torch.nn.Module, routed_names: Sequence[str], top_k: int) -> None:
        self.predictor = predictor
        self.model = model
        self.order = [predictor.expert_names.index(n) for n in routed_names]  # type: ignore[attr-defined]
        self.top_k = top_k
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 tasks: Sequence[str] | None, continuing: bool) -> torch.Tensor:
        if continuing and self.last is not None and self.last.shape[0] == input_ids.shape[0]:
            return self.last
        w = self.predictor.predict_weights(self.model, input_ids, attention_mask,  # type: ignore[attr-defined]
                                           top_k=self.top_k)
        self.last = w[:, self.order]
        return self.last


class TaskPredictor(RoutedMethod):
    name = "tp"
    summary = "task predictor: per-example routing to the predicted expert(s) (needs training data)"
    Options = TaskPredictorOptions
    capabilities = Capabilities(per_example=True, needs_data=True)

    def router(self, lm: LoadedModel, experts: ExpertSet) -> str:
        return "uniform"  # replaced by the per-example weights on every call

    def example_router(self, lm: LoadedModel, experts: ExpertSet) -> ExampleRouter:
        from modlora.reuse.learned.classifier import TaskPredictor as Predictor

        o = self.options
        assert isinstance(o, TaskPredictorOptions)
        check_top_k_fits(self.name, o.top_k, experts)
        predictor = Predictor.fit(lm.model, example_batches(lm, experts, o, with_labels=False))
        return _PromptPrediction(predictor, lm.model, experts.names, o.top_k)
