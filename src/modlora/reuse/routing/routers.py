"""Routers: Arrow, centroid (hidden-state prototypes), uniform and oracle weights.

A router is any object with ``__call__(x, layer) -> weights`` where ``x`` is the flattened input of one adapted
linear layer (t, in) and ``layer`` its module path; it returns a (t, E_layer) tensor of mixing weights over that
layer's experts (in the order of ``RoutedModel.layer_experts[layer]``) or a :class:`TopKRouting`. An optional
``bind(experts: ExpertSet, layers: dict[str, list[int]], device)`` is called once by :func:`route` before use.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from modlora.activations import QKV, input_group, qkv_group
from modlora.errors import RoutingError
from modlora.library.experts import ExpertSet
from modlora.reuse.arrow_defaults import ARROW_RIDGE, ARROW_TEMPERATURE, ARROW_TOP_K
from modlora.reuse.lowrank import block_factors, top_right_singular_vectors
from modlora.reuse.routing.layer import TopKRouting

Temperature = float | Literal["sqrt_d"]


MIN_TEMPERATURE = 1e-6


def resolve_temperature(value: Temperature, dim: int) -> float:
    """The routing temperature ``T``: ``√dim`` for ``"sqrt_d"``, else ``value``, which must be a finite number with
    ``T ≥ MIN_TEMPERATURE`` (1e-6). The bound keeps ``logit / T`` finite in float32: logits of unit prototypes are
    at most ``‖x‖``, so ``‖x‖ / T`` stays below float32's 3.4e38 for any ``‖x‖ < 3e32``; a smaller ``T`` (e.g.
    1e-300, whose reciprocal overflows float32) would turn routing weights into NaN."""
    if value == "sqrt_d":
        return math.sqrt(dim)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not value >= MIN_TEMPERATURE:
        raise RoutingError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} or 'sqrt_d', got {value!r} "
                           "(a smaller one overflows float32 routing logits)")
    return float(value)


def top_k_softmax(logits: torch.Tensor, k: int | torch.Tensor, allowed: torch.Tensor | None = None) -> TopKRouting:
    """Arrow's routing step on logits (…, E), ``logit_e = |x·v_e| / T`` (the caller scales by 1/T): keep the ``k``
    largest of each row, ``w = softmax`` over the kept ones, every other expert weight 0. Returns
    ``TopKRouting(indices (…, k'), weights (…, k'))`` with ``k' = min(k, E)``.

    ``k``: one number, or one per row (…,): then ``k' = min(max k, E)`` and a row's columns past its own k get
    weight 0. ``allowed`` (…, E) bool: each row routes over its allowed experts only (the others' logits are −∞
    before the top-k); a row with no allowed expert gets all-zero weights."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if isinstance(k, int):
        vals, idx = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
    else:
        width = min(int(k.max()), logits.shape[-1])
        vals, idx = torch.topk(logits, width, dim=-1)
        kept = torch.arange(width, device=vals.device) < k.to(vals.device).unsqueeze(-1)
        vals = vals.masked_fill(~kept, float("-inf"))
    weights = torch.softmax(vals, dim=-1)
    if allowed is not None:
        weights = weights.nan_to_num(0.0)
    return TopKRouting(idx, weights)


def check_ridge(ridge: float) -> float:
    """``ridge`` if it is a finite positive number (whitened Arrow's ε), else a :class:`RoutingError`."""
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not ridge > 0 or not math.isfinite(ridge):
        raise RoutingError(f"arrow ridge must be a positive number, got {ridge!r}")
    return ridge


def _whitening(cov: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, R⁻¹)`` with ``R = (Σ + ε·tr(Σ)/d·I)^½`` for a covariance Σ (d, d): float32, from one eigendecomposition
    in float64."""
    c = cov.double()
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not torch.isfinite(c).all():
        raise RoutingError(f"arrow: an input covariance must be a finite square matrix, got shape {tuple(c.shape)}")
    c = (c + c.T) / 2
    vals, vecs = torch.linalg.eigh(c + ridge * float(c.trace()) / c.shape[0] * torch.eye(c.shape[0], dtype=c.dtype))
    if float(vals.min()) <= 0:
        raise RoutingError("arrow: an input covariance is not positive semi-definite (or is zero)")
    root = (vecs * vals.sqrt()) @ vecs.T
    inverse = (vecs / vals.sqrt()) @ vecs.T
    return root.float(), inverse.float()


def _tensor_key(x: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a tensor's current contents: storage pointer, geometry and (outside inference mode, where
    tensors have one) the version counter, which in-place writes bump."""
    version = None if x.is_inference() else x._version
    return x.data_ptr(), tuple(x.shape), x.stride(), version, x.dtype, x.device


class _GroupCache:
    """Routing of the last input of each sibling group (q/k/v, gate/up): the first member to see an input computes
    the routing of every member in one matmul; each other member is served once if it sees the same tensor
    (same storage, geometry and version — holding a reference keeps the storage from being reused). A member that
    comes back, or a different input, recomputes. The entry is dropped once every member has been served."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tuple[Any, ...], torch.Tensor, dict[str, Any], set[str]]] = {}

    def get(self, group: str, layer: str, x: torch.Tensor) -> Any:
        entry = self.entries.get(group)
        if entry is None or layer in entry[3] or entry[0] != _tensor_key(x):
            return None
        entry[3].add(layer)
        if entry[3].issuperset(entry[2]):
            del self.entries[group]
        return entry[2][layer]

    def put(self, group: str, layer: str, x: torch.Tensor, values: dict[str, Any]) -> None:
        self.entries[group] = (_tensor_key(x), x, values, {layer})

    def clear(self) -> None:
        self.entries.clear()


class _RoutingGroup:
    """Layers of one input group and their stacked, temperature-scaled prototypes ``[P_1/T_1; P_2/T_2; …]``
    (Σ E_b, in). ``blocks``: distinct prototype keys (tied q/k/v share one); ``member_block[layer]``: its block."""

    def __init__(self, members: list[str], member_block: dict[str, int], matrix: torch.Tensor,
                 sizes: list[int]) -> None:
        self.members = members
        self.member_block = member_block
        self.matrix = matrix
        self.sizes = sizes
        self.uniform = len(set(sizes)) == 1


class ArrowRouter:
    """Arrow (Ostapenko et al. 2024): route each token by its alignment with each expert's top singular direction.

    Prototype of expert e at a layer: ``v_e`` = top right singular vector of ``ΔW_e = s_e B_e A_e`` (exact, see
    :func:`~modlora.reuse.lowrank.top_right_singular_vectors`), unit norm (or scaled by σ₁ with ``normalize_prototypes=False``). With
    ``tie_qkv`` the q/k/v layers of one attention block share the top right singular vector of the row-stacked
    ``[ΔW_q; ΔW_k; ΔW_v]`` (they read the same input). Per token: ``logit_e = |x·v_e| / T`` (x optionally unit
    normalised), keep the ``top_k`` largest, softmax over them (others get weight 0): :func:`top_k_softmax`.

    Whitened (``input_covariance`` Σ per input group, with ``input_mean`` μ): with ``R = (Σ + ε·tr(Σ)/d·I)^½``, the
    prototype is the top right singular vector ṽ of ``ΔW_e R`` (the expert's map on whitened inputs
    ``x̃ = R⁻¹(x − μ)``, whose covariance is ≈ I) and the logit ``|x̃·ṽ| = |(x − μ)·R⁻¹ṽ|``, so the stored prototype
    is ``R⁻¹ṽ`` (not unit norm). Directions in which every token's input varies a lot no longer dominate.

    Speed: layers that read the same input (q/k/v, gate/up) get their logits from ONE matmul of ``x`` (t, in)
    against their stacked prototypes (Σ E, in) and one ``topk`` over the (t, layers, E) view; the softmax only runs
    over the k kept logits. Prototypes are cached as library artifacts of kind :attr:`artifact_kind` when the
    experts come from a library.
    """

    def __init__(self, top_k: int = ARROW_TOP_K, temperature: Temperature = ARROW_TEMPERATURE, *,
                 normalize_inputs: bool = False, normalize_prototypes: bool = True, tie_qkv: bool = False,
                 cache: bool = True, remove_common: int = 0, input_mean: Mapping[str, torch.Tensor] | None = None,
                 input_covariance: Mapping[str, torch.Tensor] | None = None, ridge: float = ARROW_RIDGE) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise RoutingError(f"arrow top_k must be a positive integer, got {top_k!r}")
        if isinstance(remove_common, bool) or not isinstance(remove_common, int) or remove_common < 0:
            raise RoutingError(f"arrow remove_common must be a non-negative integer, got {remove_common!r}")
        if temperature != "sqrt_d":
            resolve_temperature(temperature, 1)
        if input_covariance and not input_mean:
            raise RoutingError("arrow: whitening (input_covariance) needs the input mean it was measured around")
        check_ridge(ridge)
        self.top_k = top_k
        self.temperature = temperature
        self.normalize_inputs = normalize_inputs
        self.normalize_prototypes = normalize_prototypes
        self.tie_qkv = tie_qkv
        self.cache = cache
        self.remove_common = remove_common
        self.input_mean = dict(input_mean or {})           # layer -> (in,): subtracted from x before |x·v|
        self._whiten = {g: _whitening(c, ridge) for g, c in (input_covariance or {}).items()}  # group -> (R, R⁻¹)
        self.prototypes: dict[str, torch.Tensor] = {}     # layer -> (E_layer, in) float32
        self.singular_values: dict[str, torch.Tensor] = {}  # layer -> (E_layer,)
        self._temps: dict[str, float] = {}
        self._groups: dict[str, _RoutingGroup] = {}       # layer -> its input group
        self._cache = _GroupCache()

    @property
    def artifact_kind(self) -> str:
        return f"arrow-v1-{'tiedqkv' if self.tie_qkv else 'untied'}"

    def _whitening_of(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._whiten.get(input_group(key))
        if pair is None:
            raise RoutingError(f"arrow: no input covariance for {key} (input group {input_group(key)})")
        return pair

    def _key(self, layer: str) -> str:
        return (qkv_group(layer) or layer) if self.tie_qkv else layer

    def expert_prototypes(self, experts: ExpertSet, i: int, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        """Prototype tensors of expert ``i``: ``{key: v}`` and ``{key + "::sigma": σ₁}`` for every routing key.

        The factor pairs of all keys are grouped by shape and solved with one batched QR/SVD per shape."""
        adapter = experts.adapters[i]
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in sorted({self._key(lay) for lay in layers if lay in adapter.A}):
            if self.tie_qkv and key.endswith(".qkv"):
                parent = key[: -len(".qkv")]
                members = [f"{parent}.{leaf}" for leaf in QKV if f"{parent}.{leaf}" in adapter.A]
                factors[key] = block_factors([(adapter.A[m], adapter.B[m], adapter.spec.scaling) for m in members])
            else:
                factors[key] = adapter.A[key].float(), adapter.spec.scaling * adapter.B[key].float()
            if self._whiten:
                a, b = factors[key]
                factors[key] = a @ self._whitening_of(key)[0], b                    # ΔW R = B (A R)
        by_shape: dict[tuple[Any, ...], list[str]] = {}
        for key, (a, b) in factors.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise RoutingError(f"expert {experts.names[i]!r}, module {key}: factors must be A (r, in) and "
                                   f"B (out, r); got {tuple(a.shape)} and {tuple(b.shape)}")
            by_shape.setdefault((tuple(a.shape), tuple(b.shape)), []).append(key)
        out: dict[str, torch.Tensor] = {}
        for keys in by_shape.values():
            v, sigma = top_right_singular_vectors(torch.stack([factors[k][0] for k in keys]),
                                                  torch.stack([factors[k][1] for k in keys]))
            for j, key in enumerate(keys):
                out[key] = self._whitening_of(key)[1] @ v[j] if self._whiten else v[j].clone()   # R⁻¹ṽ
                out[key + "::sigma"] = sigma[j : j + 1].to(torch.float32)
        return dict(sorted(out.items()))

    def bind(self, experts: ExpertSet, layers: Mapping[str, list[int]], device: torch.device | str = "cpu") -> None:
        """Compute (or load from the library cache) every expert's prototypes for ``layers``."""
        # top_k is checked against the library; a layer adapted by fewer experts (experts with different target
        # modules) routes among all of its own experts (k capped per layer).
        if self.top_k > len(experts.names):
            raise RoutingError(f"arrow top_k={self.top_k} exceeds the number of experts ({len(experts.names)})")
        if self.remove_common >= len(experts.names):
            raise RoutingError(f"arrow remove_common={self.remove_common} must be below the number of experts "
                               f"({len(experts.names)}): removing every direction the prototypes span leaves nothing")
        if self.tie_qkv:
            for layer, ids in layers.items():
                g = qkv_group(layer)
                if g is None:
                    continue
                for other in layers:
                    if qkv_group(other) == g and layers[other] != ids:
                        raise RoutingError(f"tie_qkv: layers {layer} and {other} are adapted by different experts")
        per_expert: dict[int, dict[str, torch.Tensor]] = {}
        lib = experts.artifacts if self.cache and not self._whiten else None   # whitened: depends on the data
        kind = self.artifact_kind + experts.tag
        for i, name in enumerate(experts.names):
            needed = {self._key(lay) for lay, ids in layers.items() if i in ids}
            tensors = None
            if lib is not None:
                tensors = lib.load_artifact(name, kind)
                if tensors is not None and not needed <= set(tensors):
                    tensors = None
            if tensors is None:
                tensors = self.expert_prototypes(experts, i, layers)
                if lib is not None:
                    lib.save_artifact(name, kind, tensors)
            per_expert[i] = tensors
        for layer, ids in layers.items():
            key = self._key(layer)
            missing = [experts.names[i] for i in ids if key not in per_expert[i]]
            if missing:
                raise RoutingError(f"arrow: no prototype for layer {layer} of experts {missing}")
            protos = torch.stack([per_expert[i][key].float().reshape(-1) for i in ids])
            sigmas = torch.stack([per_expert[i][key + "::sigma"].float().reshape(()) for i in ids])
            if self.remove_common and len(ids) > self.remove_common:
                protos = without_common_directions(protos, self.remove_common)
            if not self.normalize_prototypes:
                protos = protos * sigmas.unsqueeze(1)
            bad = (~torch.isfinite(protos).all(dim=1)).nonzero().flatten().tolist()
            if bad:
                raise RoutingError(f"arrow: the prototypes of expert(s) {[experts.names[ids[j]] for j in bad]} at layer "
                                   f"{layer} are not finite (their weights overflow float32)")
            self.prototypes[layer] = protos.to(device)
            if self.input_mean:
                if layer not in self.input_mean:
                    raise RoutingError(f"arrow: no input mean for layer {layer}")
                self.input_mean[layer] = self.input_mean[layer].to(device, torch.float32).reshape(-1)
            self.singular_values[layer] = sigmas
            self._temps[layer] = resolve_temperature(self.temperature, protos.shape[1])
        self._build_groups(list(layers))
        self._cache.clear()

    def _build_groups(self, layers: list[str]) -> None:
        by_group: dict[str, list[str]] = {}
        for layer in layers:
            by_group.setdefault(input_group(layer), []).append(layer)
        self._groups = {}
        for members in by_group.values():
            if len({self.prototypes[m].shape[1] for m in members}) > 1:   # not one input after all
                for m in members:
                    self._build_group([m])
            else:
                self._build_group(members)

    def _build_group(self, members: list[str]) -> None:
        blocks: dict[str, int] = {}
        parts: list[torch.Tensor] = []
        for m in members:
            key = self._key(m)
            if key not in blocks:
                blocks[key] = len(parts)
                parts.append(self.prototypes[m] / self._temps[m])
        group = _RoutingGroup(members, {m: blocks[self._key(m)] for m in members}, torch.cat(parts).contiguous(),
                              [p.shape[0] for p in parts])
        for m in members:
            self._groups[m] = group

    def logits(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """``|x·v_e| / T`` for every expert of ``layer``: (t, E_layer), float32."""
        protos = self.prototypes.get(layer)
        if protos is None:
            raise RoutingError(f"arrow router has no prototypes for layer {layer}; was it bound by route()?")
        xf = self._prepared(x.to(protos.device, torch.float32), layer)
        return (xf @ protos.T).abs_() / self._temps[layer]

    def _prepared(self, xf: torch.Tensor, layer: str) -> torch.Tensor:
        """The token inputs as routed: minus the layer's input mean (if given), then unit-normalised (if asked)."""
        if self.input_mean:
            xf = xf - self.input_mean[layer]
        if self.normalize_inputs:
            xf = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return xf

    def _route_group(self, x: torch.Tensor, group: _RoutingGroup) -> list[TopKRouting]:
        """Top-k routing of every block of ``group``: logits ``|x·[P/T]ᵀ|`` (t, Σ E) from one matmul, then
        :func:`top_k_softmax` per block (one call over the (t, blocks, E) view when the blocks are equal)."""
        xf = self._prepared(x.to(group.matrix.device, torch.float32), group.members[0])   # members share x
        logits = (xf @ group.matrix.T).abs_()                                   # (t, Σ E)
        t, nb = logits.shape[0], len(group.sizes)
        if group.uniform and nb > 1:
            r = top_k_softmax(logits.view(t, nb, group.sizes[0]), self.top_k)               # (t, nb, k)
            w = r.weights.transpose(0, 1).contiguous().to(x.device)                          # (nb, t, k)
            idx = r.indices.transpose(0, 1).contiguous().to(x.device)
            return [TopKRouting(idx[b], w[b]) for b in range(nb)]
        out = []
        for part in logits.split(group.sizes, dim=1):
            r = top_k_softmax(part, self.top_k)
            out.append(TopKRouting(r.indices.to(x.device), r.weights.to(x.device)))
        return out

    def __call__(self, x: torch.Tensor, layer: str) -> TopKRouting:
        group = self._groups.get(layer)
        if group is None:
            raise RoutingError(f"arrow router has no prototypes for layer {layer}; was it bound by route()?")
        if len(group.members) == 1:
            return self._route_group(x, group)[0]
        gname = group.members[0]
        hit = self._cache.get(gname, layer, x)
        if hit is not None:
            return hit
        per_block = self._route_group(x, group)
        values = {m: per_block[b] for m, b in group.member_block.items()}
        self._cache.put(gname, layer, x, values)
        return values[layer]


def without_common_directions(protos: torch.Tensor, c: int) -> torch.Tensor:
    """Unit prototypes (E, in) with the ``c`` directions they share most removed: ``U`` = the top-c right singular
    vectors of the (uncentred) stack, each ``v_e ← (I − U Uᵀ) v_e / ‖·‖``. Sign-free (``VᵀV`` does not see a row's
    sign), so it suits Arrow's sign-ambiguous prototypes. A prototype that lies inside ``span(U)`` keeps a zero
    residual and is left as zero (it cannot win a token)."""
    p = protos.double()
    u = torch.linalg.svd(p, full_matrices=False).Vh[:c]                     # (c, in)
    residual = p - (p @ u.T) @ u
    norms = residual.norm(dim=1, keepdim=True)
    return torch.where(norms > 1e-9, residual / norms.clamp_min(1e-30), torch.zeros_like(residual)).float()


class UniformRouter:
    """Every expert weight ``1/E_layer`` (route(..., "uniform")). With mixing "outputs" this equals μ by ΔW averaging,
    with "parameters" μ by parameter averaging; per-example routers (oracle, task predictor) start from it."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def bind(self, experts: ExpertSet, layers: Mapping[str, list[int]], device: torch.device | str = "cpu") -> None:
        self.sizes = {layer: len(ids) for layer, ids in layers.items()}

    def __call__(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        e = self.sizes[layer]
        return x.new_full((x.shape[0], e), 1.0 / e, dtype=torch.float32)


class CentroidRouter:
    """Route by similarity to per-expert mean layer inputs ("hidden-state prototypes").

    ``centroids[expert][layer]``: (in,) mean input of ``layer`` over that expert's training tokens (see
    :func:`compute_centroids`). Per token: ``logit_e = sim(x, c_e) / T`` with ``sim`` the dot product (default) or
    cosine, ``T = √in`` by default; weights ``softmax`` over all experts (or over the ``top_k`` largest if given).
    """

    def __init__(self, centroids: Mapping[str, Mapping[str, torch.Tensor]], *,
                 similarity: Literal["dot", "cosine"] = "dot", temperature: Temperature = "sqrt_d",
                 top_k: int | None = None) -> None:
        if similarity not in ("dot", "cosine"):
            raise RoutingError(f"centroid similarity must be 'dot' or 'cosine', got {similarity!r}")
        self.centroids = centroids
        self.similarity = similarity
        self.temperature = temperature
        self.top_k = top_k
        self.matrices: dict[str, torch.Tensor] = {}
        self._temps: dict[str, float] = {}

    def bind(self, experts: ExpertSet, layers: Mapping[str, list[int]], device: torch.device | str = "cpu") -> None:
        for layer, ids in layers.items():
            rows = []
            for i in ids:
                name = experts.names[i]
                c = self.centroids.get(name, {}).get(layer)
                if c is None:
                    raise RoutingError(f"centroid router: no centroid for expert {name!r} at layer {layer}")
                rows.append(c.float().reshape(-1))
            mat = torch.stack(rows)
            if self.similarity == "cosine":
                mat = mat / mat.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if self.top_k is not None and self.top_k > len(ids):
                raise RoutingError(f"centroid top_k={self.top_k} exceeds the {len(ids)} experts of layer {layer}")
            self.matrices[layer] = mat.to(device)
            self._temps[layer] = resolve_temperature(self.temperature, mat.shape[1])

    def __call__(self, x: torch.Tensor, layer: str) -> torch.Tensor | TopKRouting:
        mat = self.matrices[layer]
        xf = x.to(mat.device, torch.float32)
        if self.similarity == "cosine":
            xf = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        logits = (xf @ mat.T) / self._temps[layer]
        if self.top_k is None:
            return torch.softmax(logits, dim=-1)
        vals, idx = torch.topk(logits, self.top_k, dim=-1)
        return TopKRouting(idx, torch.softmax(vals, dim=-1))


def _data_fingerprint(batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> str:
    h = hashlib.sha256()
    for ids, mask in batches:
        h.update(ids.detach().to("cpu", torch.int64).numpy().tobytes())
        h.update(b"|" if mask is None else mask.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_centroids(model: torch.nn.Module, batches: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor | None]]],
                      layers: Iterable[str], *, library: Any = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per expert and layer, the mean input of that linear layer over the expert's non-padding tokens.

    ``batches[expert]``: list of ``(input_ids (b, s), attention_mask (b, s) or None)``; the (unrouted) base model runs
    on them with forward hooks; ``c[expert][layer] = Σ_{mask=1} x_tok / #tokens`` (float32, (in,)). With a
    ``library`` (``load_artifact``/``save_artifact``), results are cached under kind ``centroid-v1-<data hash>``
    and only computed for experts without them.
    """
    layers = list(layers)
    modules = dict(model.named_modules())
    for layer in layers:
        if not isinstance(modules.get(layer), torch.nn.Linear):
            raise RoutingError(f"centroids: {layer} is not a linear layer of the model")
    device = next(model.parameters()).device
    out: dict[str, dict[str, torch.Tensor]] = {}
    for expert, expert_batches in batches.items():
        if not expert_batches:
            raise RoutingError(f"centroids: expert {expert!r} has no batches")
        kind = f"centroid-v1-{_data_fingerprint(expert_batches)}"
        if library is not None:
            cached = library.load_artifact(expert, kind)
            if cached is not None and set(layers) <= set(cached):
                out[expert] = {lay: cached[lay] for lay in layers}
                continue
        sums = {lay: torch.zeros(modules[lay].in_features, dtype=torch.float64) for lay in layers}
        count = 0
        current: dict[str, torch.Tensor] = {}

        def make_hook(lay: str, sums: dict[str, torch.Tensor] = sums, current: dict[str, torch.Tensor] = current) -> Any:
            def hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0].double()
                m = current["mask"].to(x.device, torch.float64).unsqueeze(-1)
                sums[lay] += (x * m).sum(dim=(0, 1)).cpu()
            return hook

        handles = [modules[lay].register_forward_pre_hook(make_hook(lay)) for lay in layers]
        try:
            for ids, mask in expert_batches:
                if ids.ndim != 2:
                    raise RoutingError(f"centroids: expert {expert!r}: input_ids must be (batch, seq), got "
                                       f"{tuple(ids.shape)}")
                mask = torch.ones_like(ids) if mask is None else mask
                if mask.shape != ids.shape:
                    raise RoutingError(f"centroids: expert {expert!r}: attention_mask {tuple(mask.shape)} does not "
                                       f"match input_ids {tuple(ids.shape)}")
                current["mask"] = mask
                count += int(mask.sum())
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
        finally:
            for h in handles:
                h.remove()
        if count == 0:
            raise RoutingError(f"centroids: expert {expert!r}: all tokens are padding")
        out[expert] = {lay: (s / count).float() for lay, s in sums.items()}
        if library is not None:
            library.save_artifact(expert, kind, out[expert])
    return out



def oracle_weights(example_tasks: Sequence[str], experts: ExpertSet,
                   expert_tasks: Mapping[str, Sequence[str]] | None = None) -> torch.Tensor:
    """Per-example weights (batch, E): each example uses the expert(s) trained on its task, uniformly.

    ``expert_tasks[name]``: tasks of expert ``name`` (default: the source's ``tasks(name)``, else ``[name]``).
    """
    tasks_of: dict[str, list[str]] = {}
    for name in experts.names:
        if expert_tasks is not None:
            tasks_of[name] = list(expert_tasks.get(name, []))
        else:
            tasks_of[name] = experts.tasks_of(name) if experts.source is not None else [name]
    w = torch.zeros(len(example_tasks), len(experts))
    for b, task in enumerate(example_tasks):
        for i, name in enumerate(experts.names):
            if task in tasks_of[name]:
                w[b, i] = 1.0
        if w[b].sum() == 0:
            raise RoutingError(f"oracle: no expert was trained on task {task!r} (example {b})")
        w[b] /= w[b].sum()
    return w
