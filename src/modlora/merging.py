"""Static combinations of LoRA experts in ΔW space, exported as one PEFT-format :class:`LoraAdapter`.

Every expert ``e`` contributes, per adapted module, the dense update ``ΔW_e = s_e · B_e A_e`` (out × in).
The functions here combine those updates and return a single adapter:

* :func:`weighted_combination` — ``Σ_e w_e ΔW_e`` *exactly*, as a rank-``Σ r_e`` adapter (PEFT's ``"cat"``:
  ``A = [w_1 s_1 A_1; …; w_E s_E A_E]`` (Σr × in), ``B = [B_1 … B_E]`` (out × Σr), ``alpha = r`` so ``s = 1``).
* :func:`ties_merge` — TIES (Yadav et al. 2023): trim each ``ΔW_e`` to its top-``density`` magnitudes, elect the
  sign of every entry by the sum of the trimmed values, average the agreeing entries (disjoint mean), times ``λ``.
* :func:`dare_merge` — DARE (Yu et al. 2024): drop each entry with probability ``p``, rescale by ``1/(1-p)``, then
  combine by task arithmetic (``"linear"``) or TIES sign election + disjoint mean (``"ties"``).
* :func:`subtract_general` — GenKnowSub: ``ΔW_e − mean_g ΔW_g`` exactly, as rank-``(r_e + Σ_g r_g)`` adapters.

The dense merges (TIES, DARE) follow ``peft.utils.merge_utils`` (``ties``, ``dare_linear``, ``dare_ties``) applied to
the dense ``ΔW`` as in PEFT's ``add_weighted_adapter(combination_type="ties_svd" | "dare_*_svd")``: signs are elected
on the *unweighted* trimmed tensors, per-expert weights multiply afterwards. The dense result is turned back into a
LoRA by a truncated SVD ``ΔW ≈ (U_r S_r) V_rᵀ``: ``B = U_r S_r``, ``A = V_rᵀ``, ``alpha = r`` (PEFT's convention);
the relative Frobenius reconstruction error ``‖ΔW − BA‖_F / ‖ΔW‖_F`` is reported per module in :class:`MergeResult`.

Dense merges hold ``E`` full ``out × in`` matrices of one module at a time (float32).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from modlora.adapters import LoraAdapter, LoraSpec
from modlora.errors import AdapterError

WeightsLike = Mapping[str, float] | Sequence[float] | None
SignMethod = Literal["total", "frequency"]


@dataclass
class MergeResult:
    """A merged adapter and how well its low-rank factors reproduce the dense merged ``ΔW``.

    ``relative_errors[m] = ‖ΔW_m − s·B_m A_m‖_F / ‖ΔW_m‖_F`` (0 when ``ΔW_m = 0``);
    ``total_relative_error = sqrt(Σ_m err_m²) / sqrt(Σ_m ‖ΔW_m‖²)`` over all modules (absolute errors pooled).
    ``metadata`` is JSON-serialisable (method, weights, hyper-parameters, errors) for a library to store.
    """

    adapter: LoraAdapter
    relative_errors: dict[str, float]
    total_relative_error: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)


# ----------------------------------------------------------------------------------------------- helpers


def check_experts(experts: Mapping[str, LoraAdapter]) -> list[str]:
    """Expert names in mapping order; raises when empty or when a value is not a :class:`LoraAdapter`."""
    if not isinstance(experts, Mapping) or not experts:
        raise AdapterError("no experts to combine: pass a non-empty mapping name -> LoraAdapter")
    for name, ad in experts.items():
        if not isinstance(ad, LoraAdapter):
            raise AdapterError(f"expert {name!r}: expected a LoraAdapter, got {type(ad).__name__}")
    return list(experts)


def resolve_weights(experts: Mapping[str, LoraAdapter], weights: WeightsLike, default: float | None = None) -> list[float]:
    """Per-expert weights aligned with ``experts``' order.

    ``weights`` is a mapping name -> weight (missing names get 0), a sequence of ``E`` numbers, or ``None``
    (every expert gets ``default``; ``default=None`` means ``1/E``).
    """
    names = check_experts(experts)
    if weights is None:
        w = 1.0 / len(names) if default is None else float(default)
        return [w] * len(names)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise AdapterError(f"weights given for unknown expert(s) {unknown[:5]}; experts are {names[:10]}")
        out = [weights.get(n, 0.0) for n in names]
    else:
        out = list(weights)
        if len(out) != len(names):
            raise AdapterError(f"got {len(out)} weights for {len(names)} experts {names[:10]}")
    result = []
    for n, w in zip(names, out, strict=True):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)):
            raise AdapterError(f"weight of expert {n!r} must be a finite number, got {w!r}")
        result.append(float(w))
    return result


def select_experts(experts: Mapping[str, LoraAdapter], weights: WeightsLike,
                   default: float | None = None) -> tuple[dict[str, LoraAdapter], list[float]]:
    """The experts taking part and their weights: a mapping of weights selects exactly the experts it names."""
    check_experts(experts)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(experts))
        if unknown:
            raise AdapterError(f"weights given for unknown expert(s) {unknown[:5]}; experts are {list(experts)[:10]}")
        chosen = {n: ad for n, ad in experts.items() if n in weights}
        return chosen, resolve_weights(chosen, weights, default)
    return dict(experts), resolve_weights(experts, weights, default)


def module_shapes(experts: Mapping[str, LoraAdapter]) -> dict[str, tuple[int, int]]:
    """Union of modules -> (out, in); raises when two experts disagree on a module's shape."""
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for name, ad in experts.items():
        for m in ad.modules:
            shape = (ad.B[m].shape[0], ad.A[m].shape[1])
            if m in shapes and shapes[m] != shape:
                raise AdapterError(f"module {m!r}: expert {name!r} has ΔW shape {shape} but expert "
                                   f"{owner[m]!r} has {shapes[m]}")
            shapes.setdefault(m, shape)
            owner.setdefault(m, name)
    return dict(sorted(shapes.items()))


def common_base_model(experts: Mapping[str, LoraAdapter]) -> str | None:
    names = {ad.base_model_name for ad in experts.values() if ad.base_model_name}
    if len(names) > 1:
        raise AdapterError(f"experts were trained on different base models: {sorted(names)}")
    return next(iter(names), None)


def union_target_modules(experts: Iterable[LoraAdapter]) -> tuple[str, ...]:
    return tuple(sorted({t for ad in experts for t in ad.spec.target_modules}))


def _first_dropout(experts: Mapping[str, LoraAdapter]) -> float:
    return float(next(iter(experts.values())).spec.dropout)


def _cat_adapter(parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], shapes: dict[str, tuple[int, int]],
                 experts: Mapping[str, LoraAdapter]) -> LoraAdapter:
    """Concatenate per-module factor lists ``[(A_i (r_i, in), B_i (out, r_i))]`` into one scaling-1 adapter.

    All modules get the same rank ``R = max_m Σ_i r_i``; shorter modules are padded with zero rows/columns.
    """
    rank = max(sum(a.shape[0] for a, _ in pl) for pl in parts.values())
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for m, pl in parts.items():
        out_f, in_f = shapes[m]
        a = torch.zeros(rank, in_f)
        b = torch.zeros(out_f, rank)
        row = 0
        for ai, bi in pl:
            r = ai.shape[0]
            a[row:row + r] = ai
            b[:, row:row + r] = bi
            row += r
        A[m], B[m] = a, b
    spec = LoraSpec(rank=rank, alpha=float(rank), dropout=_first_dropout(experts), target_modules=union_target_modules(experts.values()))
    return LoraAdapter(spec, A, B, common_base_model(experts))


# ------------------------------------------------------------------------------------- exact combinations


def weighted_combination(experts: Mapping[str, LoraAdapter], weights: WeightsLike = None) -> LoraAdapter:
    """Exactly ``ΔW_m = Σ_e w_e ΔW_{e,m}`` for every module, as one rank-``Σ_e r_e`` adapter (``alpha = r``, ``s = 1``).

    Factors (PEFT ``combination_type="cat"``): ``A_m = [w_1 s_1 A_1; …]`` (Σr × in), ``B_m = [B_1 … B_E]`` (out × Σr).
    Experts lacking a module contribute zero there. ``weights=None`` averages (``w_e = 1/E``); a mapping of weights
    selects the experts it names (in all merges here), a sequence gives one weight per expert.
    """
    experts, w = select_experts(experts, weights)
    names = list(experts)
    shapes = module_shapes(experts)
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in shapes}
    for name, we in zip(names, w, strict=True):
        ad = experts[name]
        for m in ad.modules:
            parts[m].append((ad.A[m].float() * (we * ad.spec.scaling), ad.B[m].float()))
    return _cat_adapter(parts, shapes, experts)


def subtract_general(experts: Mapping[str, LoraAdapter], general_names: Sequence[str]) -> dict[str, LoraAdapter]:
    """GenKnowSub in ΔW space: for each non-general expert ``e``, ``ΔW'_e = ΔW_e − (1/G) Σ_g ΔW_g`` exactly.

    Returned adapters have rank ``r_e + Σ_g r_g`` (``alpha = rank``, ``s = 1``) with
    ``A' = [s_e A_e; −(s_g/G) A_g …]`` and ``B' = [B_e, B_g …]``. Inputs are not modified. Returns a new dict
    name -> adapter over the experts not listed in ``general_names`` (in mapping order).
    """
    check_experts(experts)
    general = list(dict.fromkeys(general_names))
    if not general:
        raise AdapterError("subtract_general needs at least one general expert name")
    missing = [g for g in general if g not in experts]
    if missing:
        raise AdapterError(f"general expert(s) {missing} not among the experts {list(experts)[:10]}")
    targets = [n for n in experts if n not in set(general)]
    if not targets:
        raise AdapterError("every expert is listed as general; nothing to subtract from")
    shapes = module_shapes(experts)
    g_count = len(general)
    out: dict[str, LoraAdapter] = {}
    for name in targets:
        ad = experts[name]
        sub = {name: ad, **{g: experts[g] for g in general}}
        mods = {m: shapes[m] for m in sorted(set(ad.modules).union(*(experts[g].modules for g in general)))}
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in mods}
        for m in mods:
            out_f, in_f = mods[m]
            # keep the block layout fixed (expert first, then each general) so the rank is r_e + Σ r_g everywhere
            if m in ad.A:
                parts[m].append((ad.A[m].float() * ad.spec.scaling, ad.B[m].float()))
            else:
                parts[m].append((torch.zeros(ad.spec.rank, in_f), torch.zeros(out_f, ad.spec.rank)))
            for g in general:
                ga = experts[g]
                if m in ga.A:
                    parts[m].append((ga.A[m].float() * (-ga.spec.scaling / g_count), ga.B[m].float()))
                else:
                    parts[m].append((torch.zeros(ga.spec.rank, in_f), torch.zeros(out_f, ga.spec.rank)))
        merged = _cat_adapter(parts, mods, sub)
        out[name] = LoraAdapter(merged.spec, merged.A, merged.B, ad.base_model_name or merged.base_model_name,
                                dict(ad.extra_config))
    return out


# ------------------------------------------------------------------------------------------ dense merges


def dense_deltas(experts: Mapping[str, LoraAdapter], module: str, shape: tuple[int, int]) -> list[torch.Tensor]:
    """``[ΔW_{e,module}]`` (each out × in, float32) in ``experts``' order; zeros for experts lacking the module."""
    return [ad.delta_weight(module) if module in ad.A else torch.zeros(shape) for ad in experts.values()]


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = int(density · numel)`` largest-magnitude entries of ``delta``, zero the rest (PEFT's rule)."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def random_drop(delta: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: ``m ~ Bernoulli(1 − p)`` per entry, return ``m ⊙ delta / (1 − p)`` (same draw as PEFT's ``random_pruning``)."""
    keep = 1.0 - drop_rate
    mask = torch.bernoulli(torch.full_like(delta, keep), generator=generator)
    return delta * mask / keep


def sign_consensus_merge(stacked: torch.Tensor, weights: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """TIES elect + disjoint merge of ``stacked`` (E, out, in) with per-expert ``weights`` (E,).

    ``γ = sign(Σ_e τ_e)`` (``"total"``) or ``sign(Σ_e sign τ_e)`` (``"frequency"``), ties → +1;
    result ``= Σ_e [sign τ_e = γ] w_e τ_e / max(1, Σ_e [sign τ_e = γ])``.
    """
    if method == "total":
        elected = stacked.sum(dim=0)
    elif method == "frequency":
        elected = stacked.sign().sum(dim=0)
    else:
        raise AdapterError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    gamma = torch.where(elected >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = stacked.sign() == gamma
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def ties_delta(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
               majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """TIES on dense task tensors (each out × in); equals ``peft.utils.merge_utils.ties``."""
    stacked = torch.stack([magnitude_trim(d, density) for d in deltas])
    return sign_consensus_merge(stacked, torch.tensor(weights, dtype=stacked.dtype), majority_sign_method)


def dare_delta(deltas: Sequence[torch.Tensor], weights: Sequence[float], drop_rate: float, generator: torch.Generator,
               combine: Literal["linear", "ties"] = "linear", majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """DARE on dense task tensors: random drop + rescale each ``τ_e`` (in order), then ``Σ w_e τ̂_e`` or TIES-combine.

    With ``torch.manual_seed(seed)`` before ``peft.utils.merge_utils.dare_linear/dare_ties(…, density=1-p)`` and
    ``generator = torch.Generator().manual_seed(seed)`` here, the masks and results are identical.
    """
    stacked = torch.stack([random_drop(d, drop_rate, generator) for d in deltas])
    w = torch.tensor(weights, dtype=stacked.dtype)
    if combine == "linear":
        return (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)
    if combine == "ties":
        return sign_consensus_merge(stacked, w, majority_sign_method)
    raise AdapterError(f"DARE combine must be 'linear' or 'ties', got {combine!r}")


def dense_to_adapter(deltas: Mapping[str, torch.Tensor], rank: int | None = None, *, dropout: float = 0.0,
                     target_modules: Sequence[str] | None = None, base_model_name: str | None = None,
                     rtol: float | None = None) -> MergeResult:
    """Factor dense updates ``ΔW_m`` (out × in) as a LoRA by truncated SVD: ``B_m = U_r S_r``, ``A_m = V_rᵀ``, ``s = 1``.

    ``rank=None`` keeps the exact (numerical) rank: ``R = max_m #{σ_i > rtol · σ_max}``, capped at ``min(out, in)``
    (``rtol`` default ``max(out, in) · eps_float32``), so the reconstruction is exact up to float rounding. A given
    ``rank`` truncates every module to ``min(rank, min(out, in))`` singular triplets. All modules share rank ``R``
    (padded with zeros) because the PEFT file has a single ``r``.
    """
    if not deltas:
        raise AdapterError("no modules to factor")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"merge rank must be a positive integer or None, got {rank!r}")
    svds: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    keep: dict[str, int] = {}
    for m, dw in deltas.items():
        if dw.ndim != 2:
            raise AdapterError(f"module {m!r}: dense ΔW must be 2-D, got shape {tuple(dw.shape)}")
        if not torch.isfinite(dw).all():
            raise AdapterError(f"module {m!r}: merged ΔW contains NaN or Inf")
        u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
        svds[m] = (u, s, vh)
        if rank is None:
            rel = rtol if rtol is not None else max(dw.shape) * torch.finfo(torch.float32).eps
            keep[m] = int((s > rel * float(s[0])).sum()) if float(s[0]) > 0 else 0
        else:
            keep[m] = min(rank, s.numel())
    big_r = max(1, max(keep.values())) if rank is None else rank
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    sq_err = sq_norm = 0.0
    for m, (u, s, vh) in svds.items():
        k = keep[m]
        out_f, in_f = deltas[m].shape
        a = torch.zeros(big_r, in_f, dtype=torch.float64)
        b = torch.zeros(out_f, big_r, dtype=torch.float64)
        a[:k] = vh[:k]
        b[:, :k] = u[:, :k] * s[:k]
        A[m], B[m] = a.float(), b.float()
        dense = deltas[m].double()
        norm = float(torch.linalg.matrix_norm(dense))
        err = float(torch.linalg.matrix_norm(dense - B[m].double() @ A[m].double()))
        errors[m] = err / norm if norm > 0 else 0.0
        sq_err += err * err
        sq_norm += norm * norm
    targets = tuple(target_modules) if target_modules else tuple(sorted({m.rsplit(".", 1)[-1] for m in deltas}))
    spec = LoraSpec(rank=big_r, alpha=float(big_r), dropout=dropout, target_modules=targets)
    total = math.sqrt(sq_err) / math.sqrt(sq_norm) if sq_norm > 0 else 0.0
    return MergeResult(LoraAdapter(spec, A, B, base_model_name), errors, total)


def _check_fraction(name: str, value: float, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise AdapterError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok_low = v > 0 if low_open else v >= 0
    ok_high = v < 1 if high_open else v <= 1
    if not (ok_low and ok_high):
        raise AdapterError(f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value!r}")
    return v


def _dense_merge(experts: Mapping[str, LoraAdapter], combine_module, rank: int | None, metadata: dict[str, Any]) -> MergeResult:
    shapes = module_shapes(experts)
    merged = {m: combine_module(dense_deltas(experts, m, shape)) for m, shape in shapes.items()}
    res = dense_to_adapter(merged, rank, dropout=_first_dropout(experts), target_modules=union_target_modules(experts.values()),
                           base_model_name=common_base_model(experts))
    res.metadata = {**metadata, "rank": res.adapter.spec.rank, "total_relative_error": res.total_relative_error,
                    "max_relative_error": res.max_relative_error}
    return res


def ties_merge(experts: Mapping[str, LoraAdapter], weights: WeightsLike = None, *, density: float = 0.2,
               scale: float = 1.0, majority_sign_method: SignMethod = "total", rank: int | None = None) -> MergeResult:
    """TIES-merge the experts' dense ``ΔW`` per module, times ``λ = scale``, factored back to a LoRA.

    ``ΔW_m = λ · ties([ΔW_{e,m}]_e, w, density)`` with PEFT's ``ties`` semantics (trim to top-``density``
    magnitudes, elect sign on the unweighted trimmed values, weighted disjoint mean). ``weights=None`` → all 1.
    """
    experts, w = select_experts(experts, weights, default=1.0)
    names = list(experts)
    density = _check_fraction("TIES density", density, low_open=True, high_open=False)
    if not math.isfinite(float(scale)):
        raise AdapterError(f"TIES scale λ must be finite, got {scale!r}")
    meta = {"method": "ties", "experts": names, "weights": w, "density": density, "scale": float(scale),
            "majority_sign_method": majority_sign_method}
    return _dense_merge(experts, lambda ds: float(scale) * ties_delta(ds, w, density, majority_sign_method), rank, meta)


def dare_merge(experts: Mapping[str, LoraAdapter], weights: WeightsLike = None, *, drop_rate: float = 0.5,
               combine: Literal["linear", "ties"] = "linear", seed: int = 0,
               majority_sign_method: SignMethod = "total", rank: int | None = None) -> MergeResult:
    """DARE-merge: per module (sorted order) and expert (mapping order), drop with prob ``p``, rescale ``1/(1-p)``.

    ``combine="linear"``: ``Σ_e w_e τ̂_e`` (``weights=None`` → ``1/E``, a mean); ``"ties"``: sign election + weighted
    disjoint mean (``weights=None`` → all 1). One ``torch.Generator`` seeded with ``seed`` draws all masks.
    """
    check_experts(experts)
    if combine not in ("linear", "ties"):
        raise AdapterError(f"DARE combine must be 'linear' or 'ties', got {combine!r}")
    experts, w = select_experts(experts, weights, default=None if combine == "linear" else 1.0)
    names = list(experts)
    drop_rate = _check_fraction("DARE drop rate p", drop_rate, low_open=False, high_open=True)
    gen = torch.Generator().manual_seed(int(seed))
    meta = {"method": f"dare_{combine}", "experts": names, "weights": w, "drop_rate": drop_rate, "seed": int(seed),
            "majority_sign_method": majority_sign_method}
    return _dense_merge(experts, lambda ds: dare_delta(ds, w, drop_rate, gen, combine, majority_sign_method), rank, meta)
