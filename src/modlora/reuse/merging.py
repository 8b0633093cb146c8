"""Static combinations of LoRA experts in ΔW space, exported as one PEFT-format :class:`LoraAdapter`.

Every expert ``e`` contributes, per adapted module, the task vector ``τ_e = ΔW_e = s_e · B_e A_e`` (out × in).
One parametrised merge, :class:`TaskArithmeticMerge` (mergekit's ``GeneralizedTaskArithmeticMerge``), combines them
per module in three steps:

1. *sparsify* each ``τ_e``: ``"none"``; ``"magnitude"`` (TIES, Yadav et al. 2023: keep the top-``density``
   magnitudes); ``"random"`` (DARE, Yu et al. 2024: drop each entry with probability ``p``, rescale by ``1/(1-p)``);
2. *sign consensus* (optional, TIES): elect the sign ``γ`` of every entry by the sum of the sparsified values and keep
   the entries that agree with it;
3. the *weighted sum* ``λ · Σ_e w_e τ̂_e`` — with sign consensus of the agreeing entries, divided by how many agree
   (disjoint mean).

The registry's ``linear``, ``ties``, ``dare-linear`` and ``dare-ties`` are four settings of it, and so are
:func:`ties_merge` / :func:`dare_merge` (:func:`ties_delta` / :func:`dare_delta` for one module's dense tensors).
Without sparsification, sign consensus or a rank (``linear``, :func:`weighted_combination`) the merge is exact and
never forms a dense ``ΔW``: one rank-``Σ r_e`` adapter from :mod:`modlora.reuse.lowrank` (where μ and GenKnowSub are).

The dense merges follow ``peft.utils.merge_utils`` (``ties``, ``dare_linear``, ``dare_ties``) applied to the dense
``ΔW`` as in PEFT's ``add_weighted_adapter(combination_type="ties_svd" | "dare_*_svd")``: signs are elected on the
*unweighted* sparsified tensors, per-expert weights multiply afterwards. The dense result is turned back into a
LoRA by a truncated SVD ``ΔW ≈ (U_r S_r) V_rᵀ``: ``B = U_r S_r``, ``A = V_rᵀ``, ``alpha = r`` (PEFT's convention);
the relative Frobenius reconstruction error ``‖ΔW − BA‖_F / ‖ΔW‖_F`` is reported per module in :class:`MergeResult`.

Dense merges hold ``E`` full ``out × in`` matrices of one module at a time (float32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from modlora.errors import AdapterError, ModloraError
from modlora.library.adapters import LoraAdapter, LoraSpec
from modlora.library.experts import Experts, ExpertSet
from modlora.reuse.lowrank import (
    any_fan_in_fan_out,
    common_base_model,
    module_shapes,
    union_target_modules,
    weighted_delta_sum,
)

WeightsLike = Mapping[str, float] | Sequence[float] | None
SignMethod = Literal["total", "frequency"]
Sparsify = Literal["none", "magnitude", "random"]


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

    @classmethod
    def exact(cls, adapter: LoraAdapter, metadata: dict[str, Any]) -> MergeResult:
        """An exact combination (no SVD truncation): every relative error is 0."""
        return cls(adapter, dict.fromkeys(adapter.modules, 0.0), 0.0, {**metadata, "rank": adapter.spec.rank})


# ----------------------------------------------------------------------------------------------- helpers


def resolve_weights(experts: Experts, weights: WeightsLike, default: float | None = None) -> list[float]:
    """Per-expert weights aligned with ``experts``' order.

    ``weights`` is a mapping name -> weight (missing names get 0), a sequence of ``E`` numbers, or ``None``
    (every expert gets ``default``; ``default=None`` means ``1/E``).
    """
    names = list(ExpertSet.of(experts).names)
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


def select_experts(experts: Experts, weights: WeightsLike, default: float | None = None
                   ) -> tuple[ExpertSet, list[float]]:
    """The experts taking part and their weights: a mapping of weights selects exactly the experts it names."""
    es = ExpertSet.of(experts)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(es.names))
        if unknown:
            raise AdapterError(f"weights given for unknown expert(s) {unknown[:5]}; experts are {list(es.names)[:10]}")
        chosen = es.subset([n for n in es.names if n in weights])
        return chosen, resolve_weights(chosen, weights, default)
    return es, resolve_weights(es, weights, default)


def check_fraction(value: float, name: str, *, low_open: bool, high_open: bool,
                   error: type[ModloraError] = AdapterError) -> float:
    """``value`` as a float in (0, 1] / [0, 1) / … as the flags say; else ``error`` (a method's options pass
    :class:`~modlora.errors.OptionError`) naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise error(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok_low = v > 0 if low_open else v >= 0
    ok_high = v < 1 if high_open else v <= 1
    if not (ok_low and ok_high):
        raise error(f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value!r}")
    return v


# ------------------------------------------------------------------------------- the steps of a merge


def dense_deltas(experts: Experts, module: str, shape: tuple[int, int]) -> list[torch.Tensor]:
    """``[ΔW_{e,module}]`` (each out × in, float32) in ``experts``' order; zeros for experts lacking the module."""
    return [ad.delta_weight(module) if module in ad.A else torch.zeros(shape) for ad in ExpertSet.of(experts).adapters]


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


def dense_to_adapter(deltas: Mapping[str, torch.Tensor], rank: int | None = None, *, dropout: float = 0.0,
                     target_modules: Sequence[str] | None = None, base_model_name: str | None = None,
                     rtol: float | None = None, fan_in_fan_out: bool = False) -> MergeResult:
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
    spec = LoraSpec(rank=big_r, alpha=float(big_r), dropout=dropout, target_modules=targets,
                    fan_in_fan_out=fan_in_fan_out)
    total = math.sqrt(sq_err) / math.sqrt(sq_norm) if sq_norm > 0 else 0.0
    return MergeResult(LoraAdapter(spec, A, B, base_model_name), errors, total)


@dataclass(frozen=True)
class TaskArithmeticMerge:
    """One task-arithmetic merge: per module, sparsify every ``τ_e``, optionally elect signs, weighted sum, times ``λ``.

    ``sparsify``: ``"none"``; ``"magnitude"`` keeps the top-``density`` share of ``|τ_e|`` (:func:`magnitude_trim`,
    ``density`` in (0, 1]); ``"random"`` keeps each entry with probability ``1 − drop_rate`` and rescales by
    ``1/(1 − drop_rate)`` (:func:`random_drop`, ``drop_rate`` in [0, 1)), all masks from one generator seeded with
    ``drop_seed``, drawn per module (sorted) and per expert (in order). ``sign_consensus``: TIES's elect + disjoint
    mean (:func:`sign_consensus_merge` by ``majority_sign_method``) instead of the plain weighted sum. ``scale``: ``λ``.
    ``rank``: SVD rank of the exported adapter (``None``: exact). Default weights: ``1/E`` (a mean), ``1`` with sign
    consensus (the disjoint mean averages already).
    """

    sparsify: Sparsify = "none"
    density: float = 1.0
    drop_rate: float = 0.0
    drop_seed: int = 0
    sign_consensus: bool = False
    majority_sign_method: SignMethod = "total"
    scale: float = 1.0
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.sparsify not in ("none", "magnitude", "random"):
            raise AdapterError(f"sparsify must be 'none', 'magnitude' or 'random', got {self.sparsify!r}")
        if self.sparsify == "magnitude":
            check_fraction(self.density, "TIES density", low_open=True, high_open=False)
        if self.sparsify == "random":
            check_fraction(self.drop_rate, "DARE drop rate p", low_open=False, high_open=True)
        if not math.isfinite(float(self.scale)):
            raise AdapterError(f"scale λ must be finite, got {self.scale!r}")

    def delta(self, deltas: Sequence[torch.Tensor], weights: Sequence[float],
              generator: torch.Generator | None = None) -> torch.Tensor:
        """The merged ``ΔW`` of one module from its dense task tensors (each out × in, in the experts' order) and
        per-expert ``weights``; ``generator`` draws the ``"random"`` masks (default: one seeded with ``drop_seed``)."""
        if self.sparsify == "magnitude":
            stacked = torch.stack([magnitude_trim(d, self.density) for d in deltas])
        elif self.sparsify == "random":
            generator = torch.Generator().manual_seed(int(self.drop_seed)) if generator is None else generator
            stacked = torch.stack([random_drop(d, self.drop_rate, generator) for d in deltas])
        else:
            stacked = torch.stack(list(deltas))
        w = torch.tensor(weights, dtype=stacked.dtype)
        if self.sign_consensus:
            merged = sign_consensus_merge(stacked, w, self.majority_sign_method)
        else:
            merged = (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)
        return float(self.scale) * merged

    def merge(self, experts: Experts, weights: WeightsLike = None, *, method: str = "task-arithmetic") -> MergeResult:
        """Merge every module of ``experts`` into one adapter; ``method`` names the merge in the metadata.

        Exact (no sparsification, sign consensus or rank): ``weighted_delta_sum`` with coefficients ``λ w_e``, no
        dense ``ΔW``. Else :meth:`delta` per module (sorted, one generator), then :func:`dense_to_adapter` at ``rank``.
        """
        chosen, w = select_experts(experts, weights, default=1.0 if self.sign_consensus else None)
        metadata: dict[str, Any] = {"method": method, "experts": list(chosen.names), "weights": w}
        if self.sparsify == "none" and not self.sign_consensus and self.rank is None:
            return MergeResult.exact(weighted_delta_sum(chosen, [float(self.scale) * x for x in w]), metadata)
        generator = torch.Generator().manual_seed(int(self.drop_seed))
        merged = {m: self.delta(dense_deltas(chosen, m, shape), w, generator)
                  for m, shape in module_shapes(chosen).items()}
        res = dense_to_adapter(merged, self.rank, target_modules=union_target_modules(chosen.adapters),
                               base_model_name=common_base_model(chosen),
                               fan_in_fan_out=any_fan_in_fan_out(chosen.adapters))
        settings = {k: v for k, v in asdict(self).items() if k != "rank"}
        res.metadata = {**metadata, **settings, "rank": res.adapter.spec.rank,
                        "total_relative_error": res.total_relative_error, "max_relative_error": res.max_relative_error}
        return res


# -------------------------------------------------------------------- task arithmetic, TIES, DARE: its settings


def weighted_combination(experts: Experts, weights: WeightsLike = None) -> LoraAdapter:
    """Task arithmetic ``ΔW_m = Σ_e w_e ΔW_{e,m}``, exact, as one rank-``Σ r_e`` adapter
    (:func:`modlora.reuse.lowrank.weighted_delta_sum`). ``weights=None`` averages; a mapping of weights selects the
    experts it names (in all merges here), a sequence gives one weight per expert."""
    return TaskArithmeticMerge().merge(experts, weights).adapter


def _dare(combine: str, **settings: Any) -> TaskArithmeticMerge:
    """DARE: random drop + rescale, then task arithmetic (``combine="linear"``) or TIES sign consensus (``"ties"``)."""
    if combine not in ("linear", "ties"):
        raise AdapterError(f"DARE combine must be 'linear' or 'ties', got {combine!r}")
    return TaskArithmeticMerge("random", sign_consensus=combine == "ties", **settings)


def ties_delta(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
               majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """TIES on dense task tensors (each out × in); equals ``peft.utils.merge_utils.ties``."""
    return TaskArithmeticMerge("magnitude", density=density, sign_consensus=True,
                               majority_sign_method=majority_sign_method).delta(deltas, weights)


def dare_delta(deltas: Sequence[torch.Tensor], weights: Sequence[float], drop_rate: float, generator: torch.Generator,
               combine: Literal["linear", "ties"] = "linear", majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """DARE on dense task tensors: random drop + rescale each ``τ_e`` (in order), then ``Σ w_e τ̂_e`` or TIES-combine.

    With ``torch.manual_seed(seed)`` before ``peft.utils.merge_utils.dare_linear/dare_ties(…, density=1-p)`` and
    ``generator = torch.Generator().manual_seed(seed)`` here, the masks and results are identical.
    """
    return _dare(combine, drop_rate=drop_rate, majority_sign_method=majority_sign_method).delta(deltas, weights,
                                                                                                 generator)


def ties_merge(experts: Experts, weights: WeightsLike = None, *, density: float = 0.2,
               scale: float = 1.0, majority_sign_method: SignMethod = "total", rank: int | None = None) -> MergeResult:
    """TIES: ``ΔW_m = λ · ties([ΔW_{e,m}]_e, w, density)`` with PEFT's ``ties`` semantics (trim to top-``density``
    magnitudes, elect sign on the unweighted trimmed values, weighted disjoint mean). ``weights=None`` → all 1."""
    return TaskArithmeticMerge("magnitude", density=density, sign_consensus=True, scale=scale, rank=rank,
                               majority_sign_method=majority_sign_method).merge(experts, weights, method="ties")


def dare_merge(experts: Experts, weights: WeightsLike = None, *, drop_rate: float = 0.5,
               combine: Literal["linear", "ties"] = "linear", seed: int = 0,
               majority_sign_method: SignMethod = "total", rank: int | None = None) -> MergeResult:
    """DARE: drop with probability ``p``, rescale ``1/(1-p)``, then ``combine="linear"``: ``Σ_e w_e τ̂_e``
    (``weights=None`` → ``1/E``) or ``"ties"``: sign election + weighted disjoint mean (→ all 1); masks seeded by ``seed``."""
    settings = _dare(combine, drop_rate=drop_rate, drop_seed=seed, majority_sign_method=majority_sign_method, rank=rank)
    return settings.merge(experts, weights, method=f"dare-{combine}")
