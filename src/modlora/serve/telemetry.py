"""Routing telemetry of one request: what the batch router measured at each step, summed over the request's steps,
and the summary every response carries.

Per depth group g of layers (``groups`` equal slices of the decoder blocks) the router gives, for each example and
step, the routing mass ``Σ_tokens w`` (E,), the entropy ``Σ_tokens −Σ_e w_e log w_e`` and the token count
(:class:`~modlora.serve.routing.RowTelemetry`); :class:`RoutingTally` sums them over the steps, and the summary
divides by the tokens: mean weight per token and routed layer, mean entropy (nats) per token and layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RoutingTelemetry:
    """What the routing did for one request: router, library generation, experts with the largest routing mass
    (mean weight per token and routed layer) overall and per depth group of layers, and the mean routing entropy
    (nats) per token and layer."""

    router: str
    generation: int
    top_experts: list[tuple[str, float]]
    groups: list[dict[str, Any]]
    entropy: float
    merged: list[str] = field(default_factory=list)     # a static method: the experts merged into its adapter

    def to_json(self) -> dict[str, Any]:
        out = {"router": self.router, "library_generation": self.generation,
               "top_experts": [{"expert": n, "mass": round(m, 6)} for n, m in self.top_experts],
               "entropy": round(self.entropy, 6), "layer_groups": self.groups}
        if self.merged:
            out["merged_experts"] = self.merged
        return out


@dataclass
class RoutingTally:
    """Sums over a request's steps, per depth group: routing ``mass`` (groups, E) over the request's own experts,
    ``entropy`` (groups,) and ``tokens`` (groups,)."""

    mass: torch.Tensor
    entropy: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def add(cls, tally: RoutingTally | None, mass: torch.Tensor, columns: list[int], entropy: torch.Tensor,
            tokens: torch.Tensor) -> RoutingTally:
        """``tally`` plus one step's sums (a new tally when there is none yet, else ``tally`` updated in place):
        ``mass`` (groups, E) over the routed model's experts, of which the request's own are ``columns``."""
        if columns:
            mass = mass.index_select(1, torch.tensor(columns, dtype=torch.long))
        else:
            mass = mass.new_zeros(mass.shape[0], 0)
        if tally is None:
            return cls(mass.clone(), entropy.clone(), tokens.clone())
        tally.mass += mass
        tally.entropy += entropy
        tally.tokens += tokens
        return tally

    def summary(self, router: str, generation: int, names: list[str], top: int,
                num_layers: int) -> RoutingTelemetry:
        """The ``top`` experts (of ``names``, the mass's columns) by mean weight, overall and per depth group of
        ``num_layers`` decoder blocks, and the mean entropy."""
        tokens = self.tokens.clamp_min(1)
        per_group = self.mass / tokens.unsqueeze(1)                                  # (groups, E) mean weight
        overall = self.mass.sum(0) / self.tokens.sum().clamp_min(1)

        def ranked(v: torch.Tensor) -> list[tuple[str, float]]:
            vals, idx = torch.topk(v, min(top, len(names)))
            return [(names[i], float(x)) for x, i in zip(vals.tolist(), idx.tolist(), strict=True) if x > 0]

        G, L = per_group.shape[0], num_layers
        groups = []
        for g in range(G):
            if float(self.tokens[g]) == 0:
                continue
            lo, hi = -(-g * L // G), -(-(g + 1) * L // G) - 1
            groups.append({"layers": f"{lo}-{hi}",
                           "top_experts": [{"expert": n, "mass": round(m, 6)} for n, m in ranked(per_group[g])],
                           "entropy": round(float(self.entropy[g] / tokens[g]), 6)})
        return RoutingTelemetry(router, generation, ranked(overall), groups,
                                float(self.entropy.sum() / self.tokens.sum().clamp_min(1)))
