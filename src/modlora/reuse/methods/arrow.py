"""``arrow``: per-token routing by each expert's top right singular vector (Ostapenko et al. 2024).

Per expert e and adapted layer, ``v_e`` = top right singular vector of ``ΔW_e = s_e B_e A_e`` (exact, from the
factors; cached in the library). Per token input x: ``logit_e = |x·v_e| / T``, keep the top-k, softmax over them,
output ``W x + Σ_e w_e s_e B_e A_e x``. See :class:`modlora.reuse.routing.ArrowRouter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modlora.errors import OptionError
from modlora.reuse.arrow_defaults import ARROW_RIDGE, ARROW_TEMPERATURE, ARROW_TOP_K
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
    from modlora.reuse.routing import ArrowRouter


@dataclass(frozen=True)
class ArrowOptions(RoutedLayerOptions):
    """Arrow's options; their field defaults are the ones every Arrow caller reads (the server and its CLI too)."""

    top_k: int = option(ARROW_TOP_K, "experts per token (exact; must not exceed the number of experts)", type=int)
    temperature: float | str = option(ARROW_TEMPERATURE, "logit temperature T: a number or 'sqrt_d'",
                                      type=parse_temperature)
    tie_qkv: bool = option(False, "one prototype for q,k,v of a block (they read the same input)")
    normalize_inputs: bool = option(False, "L2-normalise x before |x·v|")
    remove_common: int = option(0, "per layer, project the c directions all experts' prototypes share most (top-c "
                                "singular vectors of their stack) out of every prototype (0: off; data-free)", type=int)

    def __post_init__(self) -> None:
        check_positive_int(self.top_k, "top_k")
        if isinstance(self.remove_common, bool) or not isinstance(self.remove_common, int) or self.remove_common < 0:
            raise OptionError(f"remove_common must be a non-negative integer, got {self.remove_common!r}")
        check_temperature(self.temperature)


class Arrow(RoutedMethod):
    name = "arrow"
    summary = "per-token routing by the experts' top singular directions (zero-shot, no data)"
    Options = ArrowOptions
    capabilities = Capabilities(per_token=True)

    def router(self, lm: LoadedModel, experts: ExpertSet) -> ArrowRouter:
        from modlora.reuse.routing import ArrowRouter

        o = self.options
        assert isinstance(o, ArrowOptions)
        return ArrowRouter(top_k=o.top_k, temperature=o.temperature, normalize_inputs=o.normalize_inputs,
                           tie_qkv=o.tie_qkv, remove_common=o.remove_common, **self.input_statistics(lm, experts))

    def input_statistics(self, lm: LoadedModel, experts: ExpertSet) -> dict[str, Any]:
        """The :class:`ArrowRouter` arguments measured on data: the per-layer ``input_mean`` subtracted from every
        token's input, and for whitening the ``input_covariance`` and ``ridge`` (plain Arrow: none)."""
        return {}


@dataclass(frozen=True)
class ArrowCentredOptions(ArrowOptions, TrainingDataOptions):
    def __post_init__(self) -> None:
        ArrowOptions.__post_init__(self)
        TrainingDataOptions.__post_init__(self)


class ArrowCentred(Arrow):
    """Arrow on centred inputs: ``logit_e = |(x − μ_l)·v_e| / T``, with ``μ_l`` the mean input of layer l over the
    experts' training tokens (the mean of the centroid router's per-expert means ``c_e,l``, cached in the library).
    The prototypes are Arrow's (data-free); the centring needs a few training examples per expert. It removes the
    component every token shares, which otherwise adds the same ``|μ·v_e|`` to each expert's logit."""

    name = "arrow-centred"
    summary = "Arrow on inputs centred by the experts' mean layer input (prototypes data-free; the mean needs data)"
    Options = ArrowCentredOptions
    capabilities = Capabilities(per_token=True, needs_data=True)

    def input_statistics(self, lm: LoadedModel, experts: ExpertSet) -> dict[str, Any]:
        from modlora.reuse.routing import compute_centroids

        o = self.options
        assert isinstance(o, ArrowCentredOptions)
        layers = experts.modules()
        centroids = compute_centroids(lm.model, example_batches(lm, experts, o, with_labels=False), layers,
                                      library=experts.artifacts)
        return {"input_mean": {layer: sum(c[layer] for c in centroids.values()) / len(centroids) for layer in layers}}


@dataclass(frozen=True)
class ArrowWhitenedOptions(ArrowCentredOptions):
    ridge: float = option(ARROW_RIDGE, "ridge ε: whiten by Σ + ε·tr(Σ)/d·I", type=float)

    def __post_init__(self) -> None:
        from modlora.reuse.routing.routers import check_ridge

        ArrowCentredOptions.__post_init__(self)
        check_ridge(self.ridge)


class ArrowWhitened(ArrowCentred):
    """Arrow on whitened inputs: per layer, μ and Σ = the mean and covariance of the inputs over the experts'
    training tokens (pooled, a few examples per expert); the prototype of expert e is the top right singular vector
    ṽ_e of ``ΔW_e R`` with ``R = (Σ + ε·tr(Σ)/d·I)^½``, and ``logit_e = |R⁻¹(x − μ)·ṽ_e| / T``
    (:class:`~modlora.reuse.routing.ArrowRouter`). Needs data, like :class:`ArrowCentred`, which it extends from the mean
    to the covariance."""

    name = "arrow-whitened"
    summary = "Arrow on inputs whitened by the experts' input covariance (needs a few training examples per expert)"
    Options = ArrowWhitenedOptions

    def input_statistics(self, lm: LoadedModel, experts: ExpertSet) -> dict[str, Any]:
        from modlora.activations import input_group, input_moments

        o = self.options
        assert isinstance(o, ArrowWhitenedOptions)
        layers = experts.modules()
        batches = [b for expert_batches in example_batches(lm, experts, o, with_labels=False).values()
                   for b in expert_batches]
        moments = input_moments(lm.model, layers, batches)
        return {"input_mean": {layer: moments[input_group(layer)].mean.float() for layer in layers},
                "input_covariance": {g: m.cov for g, m in moments.items()}, "ridge": o.ridge}
