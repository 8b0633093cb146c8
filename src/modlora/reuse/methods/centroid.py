"""``centroid``: route by similarity to per-expert mean layer inputs ("hidden-state prototypes").

Per expert and layer, ``c_e`` = mean input of that layer over a few of the expert's training tokens (cached in the
library). Per token: ``logit_e = x·c_e / T`` (T = √in by default), softmax over all experts or over the top-k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from modlora.reuse.methods.core import (
    Capabilities,
    RoutedLayerOptions,
    RoutedMethod,
    TrainingDataOptions,
    check_positive_int,
    check_temperature,
    example_batches,
    option,
    parse_temperature,
)

if TYPE_CHECKING:
    from modlora.library.experts import ExpertSet
    from modlora.models import LoadedModel
    from modlora.reuse.routing import CentroidRouter


@dataclass(frozen=True)
class CentroidOptions(RoutedLayerOptions, TrainingDataOptions):
    top_k: int | None = option(None, "experts per token (default: softmax over all experts)", type=int)
    temperature: float | str = option("sqrt_d", "logit temperature T: a number or 'sqrt_d'", type=parse_temperature)
    similarity: str = option("dot", "x·c (dot) or cosine similarity", choices=("dot", "cosine"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k is not None:
            check_positive_int(self.top_k, "top_k")
        check_temperature(self.temperature)


class Centroid(RoutedMethod):
    name = "centroid"
    summary = "per-token routing by similarity to each expert's mean layer inputs (needs training data)"
    Options = CentroidOptions
    capabilities = Capabilities(per_token=True, needs_data=True)

    def router(self, lm: LoadedModel, experts: ExpertSet) -> CentroidRouter:
        from modlora.reuse.routing import CentroidRouter, compute_centroids

        o = self.options
        assert isinstance(o, CentroidOptions)
        batches = example_batches(lm, experts, o, with_labels=False)
        centroids = compute_centroids(lm.model, batches, experts.modules(), library=experts.artifacts)
        return CentroidRouter(centroids, similarity=o.similarity, temperature=o.temperature, top_k=o.top_k)
