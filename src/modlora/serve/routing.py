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

from modlora.activations import input_group
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
    """One forward's routing sums per *segment* (a run of one row's tokens; the engine says which token is in
    which): ``mass`` (segments, groups, E), ``entropy`` (segments, groups) and ``tokens`` (segments, groups: the
    router's token-layer calls); with ``per_token`` also per token of the forward's flattened input:
    ``token_mass`` (t, groups, E) and ``token_entropy`` (t, groups)."""

    mass: torch.Tensor
    entropy: torch.Tensor
    tokens: torch.Tensor
    token_mass: torch.Tensor | None = None
    token_entropy: torch.Tensor | None = None

    def cpu(self) -> RowTelemetry:
        """The same sums on the CPU (one transfer per forward)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.cpu()
        return RowTelemetry(self.mass.cpu(), self.entropy.cpu(), self.tokens.cpu(), move(self.token_mass),
                            move(self.token_entropy))


def layer_group_of(layer: str, num_layers: int, groups: int) -> int:
    """Index of the depth group (``groups`` equal slices of ``num_layers`` decoder blocks) of a module path."""
    m = _LAYER_INDEX.search(f".{layer}")
    if m is None or num_layers <= 0:
        return 0
    return min(groups - 1, int(m.group(1)) * groups // num_layers)


class BatchRouter:
    """A router (``__call__(x, layer)``) whose weights differ per example; set :meth:`set_rows` before a forward.

    ``prototypes[key][layer]``: unit Arrow prototype (in,) of the expert ``key`` (``keys[i]`` is global index i).
    Every table it builds lives on the prototypes' device (``bind``'s ``device``), where the layer inputs are.
    """

    def __init__(self, keys: Sequence[str], prototypes: Mapping[str, Mapping[str, torch.Tensor]],
                 num_layers: int, groups: int) -> None:
        self.keys = list(keys)
        self._prototypes = prototypes
        self.num_layers = num_layers
        self.groups = groups
        self.device = torch.device("cpu")
        self.matrices: dict[str, torch.Tensor] = {}      # layer -> (E_layer, in)
        self.layer_ids: dict[str, torch.Tensor] = {}     # layer -> (E_layer,) global indices
        self.layer_group: dict[str, int] = {}
        self._host_ids: dict[int, tuple[int, ...]] = {}  # id(layer_ids tensor) -> its ids, on the host
        self._siblings: dict[str, tuple[str, int, int, torch.Tensor]] = {}   # layer -> (group, block, blocks, P)
        self._sibling_hit: tuple[str, tuple[Any, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._rows: list[RowRouting] = []
        self._batch: dict[str, torch.Tensor] = {}
        self._all_arrow = self._any_arrow = False
        self._shared_k: int | None = None
        self._token_rows: torch.Tensor | None = None     # (t,) row of each token; None: (B, seq) row-major
        self._segments: torch.Tensor | None = None       # (t,) segment of each token
        self._inv_temperatures: dict[int, torch.Tensor] = {}   # input width -> (B,) 1/T of each row
        self._token_tables: dict[Any, Any] = {}
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self._num_segments = 0
        self._telemetry: RowTelemetry | None = None
        self.per_token = False

    def bind(self, experts: ExpertSet, layers: Mapping[str, list[int]], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        for layer, ids in layers.items():
            self.layer_ids[layer] = torch.tensor(ids, dtype=torch.long, device=device)
            self._host_ids[id(self.layer_ids[layer])] = tuple(ids)
            self.layer_group[layer] = layer_group_of(layer, self.num_layers, self.groups)
            protos = [self._prototypes.get(self.keys[i], {}).get(layer) for i in ids]
            if any(p is not None for p in protos):   # virtual experts have none: a zero row, never allowed
                width = next(p for p in protos if p is not None).numel()
                self.matrices[layer] = torch.stack([torch.zeros(width) if p is None else p.float().reshape(-1)
                                                    for p in protos]).to(device)
        # siblings that read one input (q/k/v, gate/up) with the same experts: routed with one matmul
        by_input: dict[tuple[str, tuple[int, ...]], list[str]] = {}
        for layer, ids in layers.items():
            if layer in self.matrices:
                by_input.setdefault((input_group(layer), tuple(ids)), []).append(layer)
        for members in by_input.values():
            if len(members) > 1 and len({self.matrices[m].shape[1] for m in members}) == 1:
                stacked = torch.cat([self.matrices[m] for m in members]).contiguous()
                for b, m in enumerate(members):
                    self._siblings[m] = (members[0], b, len(members), stacked)

    def set_rows(self, rows: Sequence[RowRouting], token_rows: Sequence[int] | None = None,
                 segments: Sequence[int] | None = None, per_token: bool = False) -> None:
        """Routing of each row of the next forward; resets the telemetry accumulators.

        ``token_rows``: the row of each token of the forward's flattened input (t,) — a packed forward mixes rows
        of different lengths; None: the (B, seq) layout, token ``i`` in row ``i // seq``. ``segments``: the
        telemetry segment of each token (None: one per row); ``per_token``: also keep each token's sums."""
        self.per_token = per_token
        E, B = len(self.keys), len(rows)
        dev = self.device
        allow = torch.zeros(B, E, dtype=torch.bool)
        fixed = torch.zeros(B, E)
        for b, row in enumerate(rows):
            if row.kind == "arrow":
                allow[b, list(row.allowed)] = True
            else:
                for i, w in (row.fixed or {}).items():
                    fixed[b, i] = w
        self._rows = list(rows)
        arrow = [r.kind == "arrow" for r in rows]
        self._all_arrow, self._any_arrow = all(arrow), any(arrow)
        ks = {r.top_k for r in rows if r.kind == "arrow"}
        self._shared_k = ks.pop() if len(ks) == 1 else None     # one k: top_k_softmax takes an int (no host sync)
        self._batch = {"arrow": torch.tensor(arrow, device=dev), "allow": allow.to(dev), "fixed": fixed.to(dev),
                       "k": torch.tensor([r.top_k for r in rows], dtype=torch.long, device=dev)}
        self._allow_host = allow
        self._arrow_host = torch.tensor(arrow, dtype=torch.bool)
        self._allow_all = bool(allow[self._arrow_host].all())     # no Arrow row restricted to a subset
        self._token_rows = None if token_rows is None else torch.tensor(token_rows, dtype=torch.long, device=dev)
        self._segments = None if segments is None else torch.tensor(segments, dtype=torch.long, device=dev)
        self._num_segments = B if segments is None else (max(segments) + 1 if len(segments) else 0)
        self._inv_temperatures = {}
        self._token_tables: dict[Any, Any] = {}
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self._telemetry: RowTelemetry | None = None
        self._sibling_hit = None

    @property
    def telemetry(self) -> RowTelemetry | None:
        """The routing sums of the last forward (computed once, after it, from the weights each layer got)."""
        if self._telemetry is None and self._rows:
            self._telemetry = self._summarise()
        return self._telemetry

    def _inv_temperature(self, width: int) -> torch.Tensor:
        """``1/T_b`` (B,) of each row at a layer with ``width`` inputs (1 for rows that are not Arrow)."""
        if width not in self._inv_temperatures:
            self._inv_temperatures[width] = torch.tensor(
                [1.0 / resolve_temperature(r.temperature, width) if r.kind == "arrow" else 1.0 for r in self._rows],
                device=self.device)
        return self._inv_temperatures[width]

    def _rows_of(self, t: int) -> torch.Tensor:
        """The row of each of the forward's ``t`` tokens."""
        if self._token_rows is not None:
            if self._token_rows.shape[0] != t:
                raise RoutingError(f"batch router: {t} tokens, but the step was set for {self._token_rows.shape[0]}")
            return self._token_rows
        B = len(self._rows)
        if B == 0 or t % B:
            raise RoutingError(f"batch router: {t} tokens for a batch of {B}")
        self._token_rows = torch.arange(B, device=self.device).repeat_interleave(t // B)
        return self._token_rows

    def _token_table(self, name: str, key: Any, make: Any) -> Any:
        """A per-token table of this forward, built once (``make()``) for every layer that shares ``key``."""
        if (name, key) not in self._token_tables:
            self._token_tables[name, key] = make()
        return self._token_tables[name, key]

    def _arrow_tables(self, width: int, ids: torch.Tensor, rows: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None, int | torch.Tensor]:
        """This forward's per-token 1/T (t, 1), allowed experts (t, E_l; None when every Arrow row may use all of
        the layer's) and top-k (an int when every Arrow row has the same, else (t,))."""
        bt = self._batch
        inv_t = self._token_table("inv_t", width, lambda: self._inv_temperature(width).index_select(0, rows)
                                  .unsqueeze(1))

        host_ids = self._host_ids[id(ids)]

        def make_allow() -> torch.Tensor | None:
            if self._allow_all or bool(self._allow_host[self._arrow_host][:, host_ids].all()):
                return None                                  # every Arrow row may use every expert of the layer
            return bt["allow"].index_select(1, ids).index_select(0, rows)

        allow = self._token_table("allow", host_ids, make_allow)
        k = self._shared_k if self._shared_k is not None else self._token_table(
            "k", None, lambda: bt["k"].index_select(0, rows))
        return inv_t, allow, k

    def _arrow(self, x: torch.Tensor, layer: str, ids: torch.Tensor, rows: torch.Tensor) -> TopKRouting:
        """Each token's Arrow routing over its row's allowed experts of the layer: indices (t, k) and weights
        (t, k), with weight 0 past its row's own k or where the row has no allowed expert."""
        mat = self.matrices.get(layer)
        if mat is None:
            raise RoutingError(f"no Arrow prototypes for layer {layer}")
        inv_t, allow, k = self._arrow_tables(mat.shape[1], ids, rows)
        logits = (x.to(mat.device, torch.float32) @ mat.T).abs_().mul_(inv_t)                 # (t, E_l)
        return top_k_softmax(logits, k, allow)

    def _arrow_siblings(self, x: torch.Tensor, layer: str, ids: torch.Tensor, rows: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Arrow routing of ``layer`` and its siblings (same input, same experts) from one matmul: indices and
        weights (blocks, t, k) of the group, and ``layer``'s block. The first sibling to see an input computes;
        the others are served while the input is the same tensor (same storage, shape, stride and version)."""
        group, block, blocks, mat = self._siblings[layer]
        key = (x.data_ptr(), tuple(x.shape), x.stride(), None if x.is_inference() else x._version)
        hit = self._sibling_hit
        if hit is not None and hit[0] == group and hit[1] == key:
            return hit[3], hit[4], block
        inv_t, allow, k = self._arrow_tables(mat.shape[1], ids, rows)
        t, E = x.shape[0], mat.shape[0] // blocks
        logits = (x.to(mat.device, torch.float32) @ mat.T).abs_().mul_(inv_t).view(t, blocks, E)
        r = top_k_softmax(logits, k if isinstance(k, int) else k.unsqueeze(1),
                          None if allow is None else allow.unsqueeze(1))
        idx, w = r.indices.transpose(0, 1).contiguous(), r.weights.transpose(0, 1).contiguous()   # (blocks, t, k)
        self._sibling_hit = (group, key, x, idx, w)           # holding x keeps its storage from being reused
        self._pending.append((self.layer_group[layer], ids, idx, w))
        return idx, w, block

    def __call__(self, x: torch.Tensor, layer: str) -> torch.Tensor | TopKRouting:
        bt = self._batch
        rows = self._rows_of(x.shape[0])
        ids = self.layer_ids[layer]
        g = self.layer_group[layer]
        if self._all_arrow and layer in self._siblings:
            idx, w, b = self._arrow_siblings(x, layer, ids, rows)
            return TopKRouting(idx[b].to(x.device), w[b].to(x.device))
        if self._all_arrow:
            arrow = self._arrow(x, layer, ids, rows)
            self._pending.append((g, ids, arrow.indices.unsqueeze(0), arrow.weights.unsqueeze(0)))
            return TopKRouting(arrow.indices.to(x.device), arrow.weights.to(x.device))
        dense = self._token_table("fixed", self._host_ids[id(ids)], lambda: bt["fixed"].index_select(1, ids).index_select(0, rows))
        if self._any_arrow:
            arrow_dense = self._arrow(x, layer, ids, rows).dense(ids.shape[0])
            is_arrow = self._token_table("is_arrow", None, lambda: bt["arrow"].index_select(0, rows).unsqueeze(1))
            dense = torch.where(is_arrow, arrow_dense, dense)
        self._pending.append((g, ids, None, dense.unsqueeze(0)))
        return dense.to(x.device)

    def _summarise(self) -> RowTelemetry:
        """Sum the weights every layer gave (kept by ``__call__``) per segment and depth group: the layers of a
        group with the same experts are stacked, so this costs a few operations per group, not per layer."""
        E, G, S = len(self.keys), self.groups, self._num_segments
        dev = self.device
        tel = RowTelemetry(torch.zeros(S, G, E, device=dev), torch.zeros(S, G, device=dev),
                           torch.zeros(S, G, device=dev))
        if not self._pending:
            return tel
        t = self._pending[0][3].shape[1]
        rows = self._rows_of(t)
        seg = rows if self._segments is None else self._segments
        if self.per_token:
            tel.token_mass, tel.token_entropy = torch.zeros(t, G, E, device=dev), torch.zeros(t, G, device=dev)
        stacks: dict[tuple[int, tuple[int, ...], bool, int],
                     list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]] = {}
        for g, ids, idx, w in self._pending:                  # w: (n, t, k) with idx, else dense (n, t, E_l)
            key = (g, self._host_ids[id(ids)], idx is None, w.shape[-1])
            stacks.setdefault(key, []).append((ids, idx, w))
        for (g, _, is_dense, _), items in stacks.items():
            ids = items[0][0]
            w = torch.cat([it[2] for it in items]).float()                            # (n, t, k) or (n, t, E_l)
            n = w.shape[0]
            ent = -(w.clamp_min(1e-30).log() * w).sum(-1).sum(0)                       # (t,)
            tel.entropy[:, g].index_add_(0, seg, ent)
            tel.tokens[:, g].index_add_(0, seg, torch.full_like(ent, float(n)))
            if is_dense:
                per_token = w.sum(0)                                                   # (t, E_l)
                tel.mass[:, g].index_add_(1, ids, torch.zeros(S, ids.shape[0], device=dev).index_add_(0, seg,
                                                                                                     per_token))
                if tel.token_mass is not None and tel.token_entropy is not None:
                    tel.token_mass[:, g].index_add_(1, ids, per_token)
            else:
                idx = torch.cat([it[1] for it in items])                               # (n, t, k) local
                glob = ids[idx]                                                        # global expert ids
                tok = torch.arange(t, device=dev)[None, :, None].expand_as(glob)
                tel.mass[:, g].index_put_((seg[tok].reshape(-1), glob.reshape(-1)), w.reshape(-1), accumulate=True)
                if tel.token_mass is not None:
                    tel.token_mass[:, g].index_put_((tok.reshape(-1), glob.reshape(-1)), w.reshape(-1),
                                                    accumulate=True)
            if tel.token_entropy is not None:
                tel.token_entropy[:, g] += ent
        self._pending = []
        self._sibling_hit = None
        return tel


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
