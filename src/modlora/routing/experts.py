"""Expert sets, exact low-rank linear algebra, μ (uniform merges) and GenKnowSub.

All functions here work on the factors of LoRA experts and never mutate the experts they get.

* :func:`top_right_singular_vector` — the top right singular vector of ``ΔW = B A`` computed exactly
  from the factors: ``Aᵀ = Q_A R_A``, ``B = Q_B R_B`` (thin QR), so ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``; the SVD of the
  small ``R × R`` core ``R_B R_Aᵀ = U S Vᵀ`` gives ``v = Q_A V[:, 0]``. Done in float64, sign fixed so that
  the largest-magnitude component is positive. No ΔW (out × in) and no power iteration.
* μ, two uniform merges of E experts, each returned as a static :class:`LoraAdapter`:
  - **parameter averaging** (the reference implementation's μ): ``Ā = mean_e A_e``, ``B̄ = mean_e B_e``,
    ``ΔW = s · B̄ Ā`` (needs equal ranks and scalings);
  - **ΔW averaging**: ``ΔW = mean_e s_e B_e A_e``, exact as a rank-``Σ r_e`` adapter with
    ``A = [A_1; …; A_E]`` (Σr × in), ``B = [s_1 B_1/E, …, s_E B_E/E]`` (out × Σr) and scaling 1.
* GenKnowSub: subtract the mean of "general" experts from every task expert, in factor space (as PEFT does:
  ``A_e − mean_g A_g``, ``B_e − mean_g B_g``) or exactly in ΔW space (``ΔW_e − mean_g ΔW_g`` as a low-rank
  adapter of rank ``r_e + Σ_g r_g``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from modlora.adapters import LoraAdapter, LoraSpec
from modlora.errors import RoutingError


@dataclass(frozen=True)
class ExpertSet:
    """An ordered, validated view of the experts to route over.

    ``names[i]`` is expert ``i``; ``adapters[i]`` its factors. ``library`` is the object the experts came from when
    it offers ``load_artifact``/``save_artifact`` (used to cache prototypes), else ``None``; ``tag`` is appended to
    artifact kinds so that derived experts (GenKnowSub) never share a cache entry with the stored ones.
    """

    names: tuple[str, ...]
    adapters: tuple[LoraAdapter, ...]
    library: Any = None
    tag: str = ""          # appended to artifact kinds (e.g. after GenKnowSub, whose experts differ from stored ones)

    def __len__(self) -> int:
        return len(self.names)

    def modules(self) -> list[str]:
        """Union of module paths adapted by any expert, sorted."""
        return sorted({m for a in self.adapters for m in a.A})

    def experts_of(self, module: str) -> list[int]:
        """Indices of the experts that adapt ``module``."""
        return [i for i, a in enumerate(self.adapters) if module in a.A]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise RoutingError(f"unknown expert {name!r}; known: {list(self.names)[:10]}") from None


def as_expert_set(experts: Any) -> ExpertSet:
    """Accept a ``Mapping[str, LoraAdapter]``, an :class:`ExpertSet` or a library with ``expert_names()``/``get()``."""
    if isinstance(experts, ExpertSet):
        return experts
    library = None
    if isinstance(experts, Mapping):
        names = list(experts.keys())
        adapters = [experts[n] for n in names]
    elif hasattr(experts, "expert_names") and hasattr(experts, "get"):
        names = list(experts.expert_names())
        adapters = [experts.get(n) for n in names]
        if hasattr(experts, "load_artifact") and hasattr(experts, "save_artifact"):
            library = experts
    else:
        raise RoutingError(f"experts must be a mapping name -> LoraAdapter or an expert library, got {type(experts)}")
    if not names:
        raise RoutingError("no experts to route over")
    for n, a in zip(names, adapters, strict=True):
        if not isinstance(a, LoraAdapter):
            raise RoutingError(f"expert {n!r} is a {type(a).__name__}, not a LoraAdapter")
    return ExpertSet(tuple(str(n) for n in names), tuple(adapters), library)


def _sign_fix(v: torch.Tensor) -> torch.Tensor:
    """Flip ``v`` so that its largest-|component| entry (first one on ties) is positive."""
    i = int(torch.argmax(v.abs()))
    return -v if v[i] < 0 else v


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Top right singular vector and singular value of ``ΔW = B @ A``, exactly, from the factors.

    ``A``: (R, in), ``B``: (out, R). Returns ``(v, σ₁)`` with ``v``: (in,) float32, unit norm, sign-normalised
    (largest-|component| positive). Computed in float64 via thin QRs and an R × R SVD (see module docstring).
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise RoutingError(f"factors must be A (R, in) and B (out, R); got {tuple(A.shape)} and {tuple(B.shape)}")
    a64 = A.detach().to("cpu", torch.float64)
    b64 = B.detach().to("cpu", torch.float64)
    q_a, r_a = torch.linalg.qr(a64.T)          # (in, R'), (R', R)
    q_b, r_b = torch.linalg.qr(b64)            # (out, R''), (R'', R)
    core = r_b @ r_a.T                          # (R'', R')
    _, s, vh = torch.linalg.svd(core)
    v = q_a @ vh[0]                             # (in,)
    v = v / v.norm().clamp_min(1e-300)
    return _sign_fix(v).to(torch.float32), float(s[0])


def top_right_singular_vectors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched :func:`top_right_singular_vector`: ``A`` (N, R, in), ``B`` (N, out, R) → ``v`` (N, in) float32 (unit
    norm, sign-normalised) and ``σ₁`` (N,) float64. Same maths (float64 thin QRs, N small R × R SVDs), one LAPACK
    call per step instead of N, which is what makes binding hundreds of experts × layers fast."""
    if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise RoutingError(f"batched factors must be A (N, R, in) and B (N, out, R); got {tuple(A.shape)} and "
                           f"{tuple(B.shape)}")
    a64 = A.detach().to("cpu", torch.float64)
    b64 = B.detach().to("cpu", torch.float64)
    q_a, r_a = torch.linalg.qr(a64.transpose(1, 2))     # (N, in, R'), (N, R', R)
    q_b, r_b = torch.linalg.qr(b64)                      # (N, out, R''), (N, R'', R)
    core = r_b @ r_a.transpose(1, 2)                     # (N, R'', R')
    _, s, vh = torch.linalg.svd(core)
    v = (q_a @ vh[:, 0, :].unsqueeze(2)).squeeze(2)     # (N, in)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    lead = v.gather(1, v.abs().argmax(dim=1, keepdim=True))   # first largest-|component| entry (ties: first)
    v = torch.where(lead < 0, -v, v)
    return v.to(torch.float32), s[:, 0]


def block_factors(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the row-stacked ``[s_1 B_1 A_1; s_2 B_2 A_2; …]`` (same ``in``): ``B = blockdiag(s_i B_i)``,
    ``A = [A_1; A_2; …]``. Used for the q/k/v-tied Arrow prototype."""
    A = torch.cat([a.float() for a, _, _ in parts], dim=0)
    B = torch.block_diag(*[s * b.float() for _, b, s in parts])
    return A, B


def _common_modules(adapters: Sequence[LoraAdapter]) -> list[str]:
    return sorted({m for a in adapters for m in a.A})


def _lowrank_sum(terms: Iterable[tuple[LoraAdapter, float]], base_model_name: str | None,
                 target_modules: tuple[str, ...]) -> LoraAdapter:
    """Exact ``Σ c_i · s_i B_i A_i`` as one adapter (scaling 1): factors concatenated, zero-padded per module to the
    largest total rank so that one ``LoraSpec.rank`` fits every module."""
    terms = list(terms)
    modules = _common_modules([a for a, _ in terms])
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for m in modules:
        a_parts = [a.A[m].float() for a, _ in terms if m in a.A]
        b_parts = [(c * a.spec.scaling) * a.B[m].float() for a, c in terms if m in a.A]
        A[m] = torch.cat(a_parts, 0)
        B[m] = torch.cat(b_parts, 1)
    rank = max(t.shape[0] for t in A.values())
    for m in modules:
        pad = rank - A[m].shape[0]
        if pad:
            A[m] = torch.cat([A[m], A[m].new_zeros(pad, A[m].shape[1])], 0)
            B[m] = torch.cat([B[m], B[m].new_zeros(B[m].shape[0], pad)], 1)
    spec = LoraSpec(rank=rank, alpha=float(rank), dropout=0.0, target_modules=target_modules)
    return LoraAdapter(spec, A, B, base_model_name)


def _targets(adapters: Sequence[LoraAdapter]) -> tuple[str, ...]:
    return tuple(sorted({t for a in adapters for t in a.spec.target_modules}))


def mu_delta_average(experts: Any, weights: Sequence[float] | None = None) -> LoraAdapter:
    """μ by **ΔW averaging**: ``ΔW[m] = Σ_e c_e s_e B_e A_e`` with ``c_e = 1/E`` (or ``weights``), exact, as a
    rank-``Σ r_e`` adapter with scaling 1 (``A`` = stacked ``A_e``, ``B`` = ``[c_e s_e B_e]``)."""
    es = as_expert_set(experts)
    coef = [1.0 / len(es)] * len(es) if weights is None else [float(w) for w in weights]
    if len(coef) != len(es):
        raise RoutingError(f"mu_delta_average: {len(coef)} weights for {len(es)} experts")
    return _lowrank_sum(zip(es.adapters, coef, strict=True), es.adapters[0].base_model_name, _targets(es.adapters))


def mu_parameter_average(experts: Any) -> LoraAdapter:
    """μ by **parameter averaging** (the reference's μ): ``Ā[m] = mean_e A_e[m]``, ``B̄[m] = mean_e B_e[m]``,
    ``ΔW = s · B̄ Ā``. Means run over the experts that adapt ``m``. Ranks and scalings must agree."""
    es = as_expert_set(experts)
    ranks = {a.spec.rank for a in es.adapters}
    scalings = {a.spec.scaling for a in es.adapters}
    if len(ranks) > 1 or len(scalings) > 1:
        raise RoutingError(f"mu parameter averaging needs equal ranks and scalings across experts, got ranks "
                           f"{sorted(ranks)} and scalings {sorted(scalings)}; use ΔW averaging instead")
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for m in es.modules():
        idx = es.experts_of(m)
        A[m] = torch.stack([es.adapters[i].A[m].float() for i in idx]).mean(0)
        B[m] = torch.stack([es.adapters[i].B[m].float() for i in idx]).mean(0)
    s0 = es.adapters[0].spec
    spec = LoraSpec(rank=s0.rank, alpha=s0.alpha, dropout=s0.dropout, target_modules=_targets(es.adapters))
    return LoraAdapter(spec, A, B, es.adapters[0].base_model_name)


def genknowsub(experts: Any, general: Any, space: Literal["factors", "delta"] = "factors") -> dict[str, LoraAdapter]:
    """General-knowledge subtraction, returning new experts (the inputs are untouched).

    ``space="factors"`` (PEFT's ``use_gks``): ``A_e ← A_e − mean_g A_g``, ``B_e ← B_e − mean_g B_g`` (equal ranks
    needed). ``space="delta"``: ``ΔW_e ← ΔW_e − mean_g ΔW_g`` exactly, as an adapter of rank ``r_e + Σ_g r_g``.
    """
    es, gs = as_expert_set(experts), as_expert_set(general)
    out: dict[str, LoraAdapter] = {}
    if space == "factors":
        ranks = {a.spec.rank for a in es.adapters + gs.adapters}
        if len(ranks) > 1:
            raise RoutingError(f"GenKnowSub in factor space needs one rank for task and general experts, got "
                               f"{sorted(ranks)}; use space='delta'")
        mean_a = {m: torch.stack([gs.adapters[i].A[m].float() for i in gs.experts_of(m)]).mean(0)
                  for m in gs.modules()}
        mean_b = {m: torch.stack([gs.adapters[i].B[m].float() for i in gs.experts_of(m)]).mean(0)
                  for m in gs.modules()}
        for name, a in zip(es.names, es.adapters, strict=True):
            A = {m: t.float() - mean_a[m] if m in mean_a else t.float().clone() for m, t in a.A.items()}
            B = {m: t.float() - mean_b[m] if m in mean_b else t.float().clone() for m, t in a.B.items()}
            out[name] = LoraAdapter(a.spec, A, B, a.base_model_name, dict(a.extra_config))
    elif space == "delta":
        g = len(gs)
        for name, a in zip(es.names, es.adapters, strict=True):
            terms = [(a, 1.0)] + [(ga, -1.0 / g) for ga in gs.adapters]
            out[name] = _lowrank_sum(terms, a.base_model_name, _targets([a]))
    else:
        raise RoutingError(f"GenKnowSub space must be 'factors' or 'delta', got {space!r}")
    return out
