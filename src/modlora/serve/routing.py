"""The server's one link to modlora's routing API: a batch router that routes each example of a batch its own way.

A batch may mix requests with different routings; every example ``b`` gets a :class:`RowRouting`:

* **arrow** over an allowed subset ``S_b`` of experts: per token and layer ``logit_e = |x·v_e| / T_b`` for
  ``e ∈ S_b`` (``v_e`` the expert's Arrow prototype at that layer), keep the ``k_b`` largest, softmax over them —
  :func:`~modlora.reuse.routing.top_k_softmax` with the other experts masked, i.e.
  :class:`~modlora.reuse.routing.ArrowRouter` restricted to ``S_b`` (``T_b = "sqrt_d"``: ``√in`` per layer);
* **fixed** weights ``w_b`` (E,): the same weights for every token (μ = ``1/|S|`` on ``S``, one expert = one-hot,
  base = all zero), as ``RoutedModel.example_weights`` would apply.

Both are per-example weights over the same stacked experts, so any mix shares one forward pass (the routed layer's
dense-fold path takes (t, E) weights; an all-Arrow batch returns a :class:`TopKRouting` for the sparse path).
While routing, the router accumulates per example and per group of layers the routing mass ``Σ_tokens w`` (E,),
the entropy ``Σ_tokens −Σ_e w_e log w_e`` and the token count (for the responses' telemetry).

Which methods of the registry (:mod:`modlora.reuse.methods`) a server offers, and how (:func:`~modlora.serve.served.served_methods`):

* ``base`` (uses no experts): fixed weights 0;
* ``arrow``: the per-row Arrow above, its ``top_k``/``temperature`` validated by the registry's ``ArrowOptions``
  (whose field defaults are the server's defaults);
* ``mu-delta`` (exact ΔW mean): fixed weights ``1/|S|`` — the same function as its merged adapter;
* ``mu`` (parameter averaging, ``s·(mean B)(mean A)``): its combined adapter (rank r) becomes one extra *virtual*
  expert of the routed model, and the row puts weight 1 on it.

Other methods are refused per request: TIES/DARE give dense (full-rank) adapters, which would pad every routed
expert to full rank; centroid, PhatGOOSE, the task predictor and the oracle need training data or task labels.

This module is the server's only link to :mod:`modlora.reuse.routing` and :mod:`modlora.reuse.methods`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch

from modlora.errors import ModloraError, RoutingError
from modlora.library.adapters import LoraAdapter
from modlora.library.experts import ExpertSet
from modlora.reuse.methods import REGISTRY, Registry
from modlora.reuse.methods.core import check_top_k_fits
from modlora.reuse.routing import ArrowRouter, RoutedModel, TopKRouting, route, top_k_softmax
from modlora.reuse.routing.routers import Temperature, resolve_temperature

ARROW_KIND = ArrowRouter().artifact_kind
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class RowRouting:
    """Routing of one example: Arrow (``allowed`` experts, ``top_k``, ``temperature``) or ``fixed`` weights (E,)."""

    kind: str                                   # "arrow" or "fixed"
    allowed: tuple[int, ...] = ()               # arrow: global expert indices it may use
    top_k: int = 0
    temperature: Temperature = 1.0
    fixed: Mapping[int, float] | None = None    # fixed: global expert index -> weight (absent = 0)

    @classmethod
    def uniform(cls, experts: Sequence[int]) -> RowRouting:
        """Fixed weights ``1/|S|`` on ``experts`` S: μ-delta; weight 1 on one expert or on a static method's
        combined adapter; none at all for base (no experts)."""
        return cls("fixed", fixed={i: 1.0 / len(experts) for i in experts})


@dataclass
class RowTelemetry:
    """Per example of one step: ``mass`` (groups, E), ``entropy`` (groups,) and ``tokens`` (groups,) sums."""

    mass: torch.Tensor
    entropy: torch.Tensor
    tokens: torch.Tensor


def layer_group_of(layer: str, num_layers: int, groups: int) -> int:
    """Index of the depth group (``groups`` equal slices of ``num_layers`` decoder blocks) of a module path."""
    m = _LAYER_INDEX.search(f".{layer}")
    if m is None or num_layers <= 0:
        return 0
    return min(groups - 1, int(m.group(1)) * groups // num_layers)


class BatchRouter:
    """A router (``__call__(x, layer)``) whose weights differ per example; set :meth:`set_rows` before a forward.

    ``prototypes[key][layer]``: unit Arrow prototype (in,) of the expert ``key`` (``keys[i]`` is global index i).
    """

    def __init__(self, keys: Sequence[str], prototypes: Mapping[str, Mapping[str, torch.Tensor]],
                 num_layers: int, groups: int) -> None:
        self.keys = list(keys)
        self._prototypes = prototypes
        self.num_layers = num_layers
        self.groups = groups
        self.matrices: dict[str, torch.Tensor] = {}      # layer -> (E_layer, in)
        self.layer_ids: dict[str, torch.Tensor] = {}     # layer -> (E_layer,) global indices
        self.layer_group: dict[str, int] = {}
        self._rows: list[RowRouting] = []
        self._batch: dict[str, torch.Tensor] = {}
        self._inv_temperatures: dict[int, torch.Tensor] = {}   # input width -> (B,) 1/T of each row
        self.telemetry: RowTelemetry | None = None

    def bind(self, experts: ExpertSet, layers: Mapping[str, list[int]], device: torch.device | str = "cpu") -> None:
        for layer, ids in layers.items():
            self.layer_ids[layer] = torch.tensor(ids, dtype=torch.long, device=device)
            self.layer_group[layer] = layer_group_of(layer, self.num_layers, self.groups)
            protos = [self._prototypes.get(self.keys[i], {}).get(layer) for i in ids]
            if any(p is not None for p in protos):   # virtual experts have none: a zero row, never allowed
                width = next(p for p in protos if p is not None).numel()
                self.matrices[layer] = torch.stack([torch.zeros(width) if p is None else p.float().reshape(-1)
                                                    for p in protos]).to(device)

    def set_rows(self, rows: Sequence[RowRouting]) -> None:
        """Routing of each example of the next forward; resets the telemetry accumulators."""
        E, B = len(self.keys), len(rows)
        allow = torch.zeros(B, E, dtype=torch.bool)
        fixed = torch.zeros(B, E)
        for b, row in enumerate(rows):
            if row.kind == "arrow":
                allow[b, list(row.allowed)] = True
            else:
                for i, w in (row.fixed or {}).items():
                    fixed[b, i] = w
        self._rows = list(rows)
        self._batch = {"arrow": torch.tensor([r.kind == "arrow" for r in rows]), "allow": allow, "fixed": fixed,
                       "k": torch.tensor([r.top_k for r in rows], dtype=torch.long)}
        self._inv_temperatures = {}
        self.telemetry = RowTelemetry(torch.zeros(B, self.groups, E), torch.zeros(B, self.groups),
                                      torch.zeros(B, self.groups))

    def _inv_temperature(self, width: int) -> torch.Tensor:
        """``1/T_b`` (B,) of each row at a layer with ``width`` inputs (1 for rows that are not Arrow)."""
        if width not in self._inv_temperatures:
            self._inv_temperatures[width] = torch.tensor(
                [1.0 / resolve_temperature(r.temperature, width) if r.kind == "arrow" else 1.0 for r in self._rows])
        return self._inv_temperatures[width]

    def _arrow(self, x: torch.Tensor, layer: str, ids: torch.Tensor, seq: int) -> TopKRouting:
        """Each row's Arrow routing over its allowed experts of the layer: indices (t, k) and weights (t, k), with
        weight 0 past a row's own k or where it has no allowed expert."""
        mat = self.matrices.get(layer)
        if mat is None:
            raise RoutingError(f"no Arrow prototypes for layer {layer}")
        bt = self._batch
        logits = (x.to(mat.device, torch.float32) @ mat.T).abs_()                       # (t, E_l)
        logits = logits * self._inv_temperature(mat.shape[1]).repeat_interleave(seq).unsqueeze(1)
        allow = bt["allow"].index_select(1, ids).repeat_interleave(seq, 0)                # (t, E_l)
        return top_k_softmax(logits, bt["k"].repeat_interleave(seq), allow)

    def __call__(self, x: torch.Tensor, layer: str) -> torch.Tensor | TopKRouting:
        bt = self._batch
        B = len(self._rows)
        if B == 0 or x.shape[0] % B:
            raise RoutingError(f"batch router: {x.shape[0]} tokens for a batch of {B}")
        seq = x.shape[0] // B
        ids = self.layer_ids[layer]
        is_arrow = bt["arrow"]
        if bool(is_arrow.all()):
            arrow = self._arrow(x, layer, ids, seq)
            dense = arrow.dense(ids.shape[0])
            routing: torch.Tensor | TopKRouting = TopKRouting(arrow.indices.to(x.device), arrow.weights.to(x.device))
        else:
            dense = bt["fixed"].index_select(1, ids).repeat_interleave(seq, 0)            # (t, E_l)
            if bool(is_arrow.any()):
                arrow_dense = self._arrow(x, layer, ids, seq).dense(ids.shape[0])
                dense = torch.where(is_arrow.repeat_interleave(seq).unsqueeze(1), arrow_dense, dense)
            routing = dense.to(x.device)
        self._record(dense, layer, ids, B, seq)
        return routing

    def _record(self, dense: torch.Tensor, layer: str, ids: torch.Tensor, B: int, seq: int) -> None:
        tel = self.telemetry
        if tel is None:
            return
        g = self.layer_group[layer]
        per_ex = dense.view(B, seq, -1)
        tel.mass[:, g].index_add_(1, ids, per_ex.sum(1))
        ent = -(per_ex.clamp_min(1e-30).log() * per_ex).sum(-1)                         # (B, seq)
        tel.entropy[:, g] += ent.sum(1)
        tel.tokens[:, g] += seq



def check_arrow(top_k: int, temperature: Temperature, experts: Sized, registry: Registry = REGISTRY) -> None:
    """Refuse what the registry's Arrow options refuse and a ``top_k`` above the number of ``experts``
    (:class:`RoutingError`)."""
    registry.get("arrow").options_from({"top_k": top_k, "temperature": temperature})
    check_top_k_fits("arrow", top_k, experts)


def static_adapter(name: str, experts: Mapping[str, LoraAdapter], registry: Registry = REGISTRY) -> LoraAdapter:
    """The adapter of the static method ``name`` over ``experts`` (its registry ``combine``); refused when its rank
    exceeds the experts' largest rank (it would pad every routed expert to that rank)."""
    method = registry.get(name)
    try:
        adapter = method().combine(ExpertSet.of(dict(experts))).adapter
    except ModloraError as exc:
        raise RoutingError(f"{name}: {exc}") from None
    limit = max(a.spec.rank for a in experts.values())
    if adapter.spec.rank > limit:
        raise RoutingError(f"{name} gives a rank-{adapter.spec.rank} adapter (experts have rank <= {limit}); "
                           "it cannot share a routed batch")
    return adapter


def arrow_prototypes(name: str, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Arrow prototypes ``{layer: v (in,), layer + "::sigma": σ₁}`` of one expert (the library's cached kind)."""
    return ArrowRouter().expert_prototypes(ExpertSet((name,), (adapter,)), 0, list(adapter.A))


def attach(model: torch.nn.Module, keys: Sequence[str], adapters: Sequence[LoraAdapter],
           router: BatchRouter) -> RoutedModel:
    """Route ``model`` in place over the experts ``adapters`` (global index i = ``keys[i]``) with ``router``."""
    return route(model, dict(zip(keys, adapters, strict=True)), router, path="auto")


def detach(routed: Any) -> None:
    """Put the model's original linear layers back."""
    routed.restore()
