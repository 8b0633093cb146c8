"""The server's one link to modlora's routing API: a batch router that routes each example of a batch its own way.

A batch may mix requests with different routings; every example ``b`` gets a :class:`RowRouting`:

* **arrow** over an allowed subset ``S_b`` of experts: per token and layer ``logit_e = |x·v_e| / T_b`` for
  ``e ∈ S_b`` (``v_e`` the expert's Arrow prototype at that layer), keep the ``k_b`` largest, softmax over them —
  exactly :class:`~modlora.reuse.routing.ArrowRouter` restricted to ``S_b``;
* **fixed** weights ``w_b`` (E,): the same weights for every token (μ = ``1/|S|`` on ``S``, one expert = one-hot,
  base = all zero), as ``RoutedModel.example_weights`` would apply.

Both are per-example weights over the same stacked experts, so any mix shares one forward pass (the routed layer's
dense-fold path takes (t, E) weights; an all-Arrow batch returns a :class:`TopKRouting` for the sparse path).
While routing, the router accumulates per example and per group of layers the routing mass ``Σ_tokens w`` (E,),
the entropy ``Σ_tokens −Σ_e w_e log w_e`` and the token count (for the responses' telemetry).

Which methods of the registry (:mod:`modlora.reuse.methods`) a server offers, and how (:func:`served_methods`):

* ``base`` (uses no experts): fixed weights 0;
* ``arrow``: the per-row Arrow above, its ``top_k``/``temperature`` validated by the registry's ``ArrowOptions``;
* ``mu-delta`` (exact ΔW mean): fixed weights ``1/|S|`` — the same function as its merged adapter;
* ``mu`` (parameter averaging, ``s·(mean B)(mean A)``): its combined adapter (rank r) becomes one extra *virtual*
  expert of the routed model, and the row puts weight 1 on it.

Other methods are refused per request: TIES/DARE give dense (full-rank) adapters, which would pad every routed
expert to full rank; centroid, PhatGOOSE, the task predictor and the oracle need training data or task labels.

This module is the server's only link to :mod:`modlora.reuse.routing` and :mod:`modlora.reuse.methods`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modlora.errors import ModloraError, RoutingError
from modlora.library.adapters import LoraAdapter
from modlora.library.experts import ExpertSet
from modlora.reuse.methods import REGISTRY, Registry
from modlora.reuse.routing import ArrowRouter, RoutedModel, TopKRouting, route

ARROW_KIND = ArrowRouter().artifact_kind
SERVED_KINDS = {"base": "base", "arrow": "arrow", "mu-delta": "weights", "mu": "static"}
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class RowRouting:
    """Routing of one example: Arrow (``allowed`` experts, ``top_k``, ``temperature``) or ``fixed`` weights (E,)."""

    kind: str                                   # "arrow" or "fixed"
    allowed: tuple[int, ...] = ()               # arrow: global expert indices it may use
    top_k: int = 0
    temperature: float = 1.0
    fixed: Mapping[int, float] | None = None    # fixed: global expert index -> weight (absent = 0)


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
        self._batch = {
            "arrow": torch.tensor([r.kind == "arrow" for r in rows]), "allow": allow, "fixed": fixed,
            "inv_temp": torch.tensor([1.0 / r.temperature if r.kind == "arrow" else 1.0 for r in rows]),
            "k": torch.tensor([r.top_k for r in rows], dtype=torch.long)}
        self.telemetry = RowTelemetry(torch.zeros(B, self.groups, E), torch.zeros(B, self.groups),
                                      torch.zeros(B, self.groups))

    def _arrow(self, x: torch.Tensor, layer: str, ids: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k indices (t, k) into the layer's experts and their softmax weights (t, k) (0 where masked)."""
        mat = self.matrices.get(layer)
        if mat is None:
            raise RoutingError(f"no Arrow prototypes for layer {layer}")
        bt = self._batch
        logits = (x.to(mat.device, torch.float32) @ mat.T).abs_()                       # (t, E_l)
        logits = logits * bt["inv_temp"].repeat_interleave(seq).unsqueeze(1)
        allow = bt["allow"].index_select(1, ids).repeat_interleave(seq, 0)                # (t, E_l)
        logits = logits.masked_fill(~allow, float("-inf"))
        kmax = min(int(bt["k"].max()), logits.shape[1])
        vals, idx = torch.topk(logits, kmax, dim=1)
        keep = torch.arange(kmax).unsqueeze(0) < bt["k"].repeat_interleave(seq).unsqueeze(1)
        vals = vals.masked_fill(~keep, float("-inf"))
        w = torch.softmax(vals, dim=1).nan_to_num(0.0)          # a row with no allowed expert here: all zero
        return idx, w

    def __call__(self, x: torch.Tensor, layer: str) -> torch.Tensor | TopKRouting:
        bt = self._batch
        B = len(self._rows)
        if B == 0 or x.shape[0] % B:
            raise RoutingError(f"batch router: {x.shape[0]} tokens for a batch of {B}")
        seq = x.shape[0] // B
        ids = self.layer_ids[layer]
        is_arrow = bt["arrow"]
        if bool(is_arrow.all()):
            idx, w = self._arrow(x, layer, ids, seq)
            dense = w.new_zeros(x.shape[0], ids.shape[0]).scatter_add_(1, idx, w)
            routing: torch.Tensor | TopKRouting = TopKRouting(idx.to(x.device), w.to(x.device))
        else:
            dense = bt["fixed"].index_select(1, ids).repeat_interleave(seq, 0)            # (t, E_l)
            if bool(is_arrow.any()):
                idx, w = self._arrow(x, layer, ids, seq)
                arrow_dense = w.new_zeros(dense.shape).scatter_add_(1, idx, w)
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


@dataclass(frozen=True)
class ServedMethod:
    """A registry method as the server runs it: ``kind`` is ``base``, ``arrow``, ``weights`` or ``static``."""

    name: str
    kind: str
    summary: str


def served_methods(registry: Registry = REGISTRY) -> dict[str, ServedMethod]:
    """The registry's methods this server can run per request (see the module docstring), in registry order."""
    out = {}
    for method in registry.methods:
        kind = SERVED_KINDS.get(method.name)
        if kind is not None:
            out[method.name] = ServedMethod(method.name, kind, method.summary)
    return out


def refusal(name: str, registry: Registry = REGISTRY) -> str:
    """Why the method ``name`` is not served (for the 400 message)."""
    method = registry.get(name)                       # raises RoutingError for an unknown name
    caps = method.capabilities
    if caps.needs_data or caps.needs_task_labels:
        return f"method {name!r} needs the experts' training data or each example's task; it is not served"
    return f"method {name!r} gives a dense (full-rank) adapter that cannot share a routed batch; it is not served"


def arrow_row(allowed: Sequence[int], top_k: int, temperature: float, registry: Registry = REGISTRY) -> RowRouting:
    """An Arrow row, its options checked by the registry's Arrow options (raises :class:`RoutingError`)."""
    registry.get("arrow").options_from({"top_k": top_k, "temperature": float(temperature)})
    if top_k > len(allowed):
        raise RoutingError(f"top_k={top_k} exceeds the number of experts ({len(allowed)})")
    return RowRouting("arrow", tuple(allowed), top_k, float(temperature))


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
