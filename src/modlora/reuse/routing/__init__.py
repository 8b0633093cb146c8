"""Routing over a library of LoRA experts: Arrow, centroid, uniform and per-example routing, diagnostics, export.

Quick use::

    routed = route(model, experts, ArrowRouter(top_k=4))      # experts: a library, a mapping or an ExpertSet
    out = routed(input_ids=ids, attention_mask=mask)           # or routed.generate(...)
    with routed.example_weights(oracle_weights(tasks, routed.experts)):   # oracle / task-predictor hook
        routed(input_ids=ids)
    routed.restore()                                           # the original modules, bit-identical

The reuse *methods* built on this (Arrow, centroid, PhatGOOSE, task predictor, oracle) are in :mod:`modlora.reuse.methods`;
the exact factor algebra (prototypes, μ, GenKnowSub) is in :mod:`modlora.reuse.lowrank`.

Router interface
----------------
A router is any callable ``router(x, layer) -> weights``:

* ``x``: the input of one adapted linear layer, flattened to (t, in) (t = batch · seq tokens; with a KV cache only
  the new tokens), in the model's dtype;
* ``layer``: that layer's module path, e.g. ``model.layers.0.self_attn.q_proj``;
* ``weights``: either a (t, E_layer) tensor of mixing weights over the experts of that layer, in the order
  ``routed.layer_experts[layer]`` (global indices into ``routed.expert_names``), or a
  :class:`TopKRouting` ``(indices (t, k), weights (t, k))`` which lets the layer use the O(k) sparse path.

A router may define ``bind(experts: ExpertSet, layers: dict[str, list[int]], device)``; :func:`route` calls it once
(to compute prototypes etc.). Routing is per token, so it must not pool over the sequence.

Per-example weights (oracle, task predictors): ``with routed.example_weights(w):`` with ``w`` (batch, E) over
``routed.expert_names`` (or one ``{expert: weight}`` dict per example) routes every token of example ``b`` with
``w[b]`` instead of calling the router.

Mixing modes: ``"outputs"`` (default) ``Σ_e w_e s_e B_e A_e x``; ``"parameters"``
``(Σ_e w_e s_e B_e)(Σ_e w_e A_e) x`` (the reference code's default; equal ranks only).
"""

from modlora.reuse.routing.layer import LayerRouter, RoutedLoraLinear, RoutingState, TopKRouting
from modlora.reuse.routing.model import (
    RoutedModel,
    RoutingRecorder,
    explain,
    explain_routing,
    export_prompt_adapter,
    route,
)
from modlora.reuse.routing.routers import (
    ArrowRouter,
    CentroidRouter,
    UniformRouter,
    compute_centroids,
    oracle_weights,
    top_k_softmax,
)

__all__ = [
    "ArrowRouter", "CentroidRouter", "LayerRouter", "RoutedLoraLinear", "RoutedModel",
    "RoutingRecorder", "RoutingState", "TopKRouting", "UniformRouter", "compute_centroids", "explain",
    "explain_routing", "export_prompt_adapter", "oracle_weights", "route", "top_k_softmax",
]
