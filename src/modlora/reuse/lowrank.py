"""Exact low-rank algebra on LoRA factors: the one toolkit that merging, routing and the reuse methods share.

Every function takes experts as :data:`~modlora.library.experts.Experts`, never mutates them, never forms a dense ``ΔW``
(out × in) and raises :class:`~modlora.errors.AdapterError` on bad input.

* :func:`stack_factors` — per module, concatenate factor pairs ``[(A_i (r_i, in), B_i (out, r_i))]`` into one
  scaling-1 adapter ``A = [A_1; A_2; …]`` (Σr × in), ``B = [B_1 … B_E]`` (out × Σr), zero-padded to one rank
  ``R = max_m Σ_i r_i`` (a PEFT file has a single ``r``). ``B A = Σ_i B_i A_i`` exactly.
* :func:`weighted_delta_sum` — ``ΔW_m = Σ_e c_e s_e B_e A_e`` exactly (PEFT's ``"cat"``); ``c_e = 1/E`` is μ by
  ΔW averaging.
* :func:`parameter_average` — μ by parameter averaging (the reference's μ): ``Ā = mean_e A_e``, ``B̄ = mean_e B_e``,
  ``ΔW = s · B̄ Ā`` (equal ranks and scalings).
* :func:`genknowsub` — subtract the mean of "general" experts, in factor space (PEFT's ``use_gks``) or exactly in
  ΔW space (rank ``r_e + Σ_g r_g``).
* :func:`top_right_singular_vectors` — the top right singular vector of ``ΔW = B A`` from the factors: thin QRs
  ``Aᵀ = Q_A R_A``, ``B = Q_B R_B`` give ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``; the SVD of the small core ``R_B R_Aᵀ = U S Vᵀ``
  gives ``v = Q_A V[:, 0]``. Float64, sign fixed (largest-|component| positive), batched over N factor pairs.
* :func:`block_factors` — factors of the row-stacked ``[s_1 B_1 A_1; s_2 B_2 A_2; …]`` (same ``in``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from modlora.errors import AdapterError
from modlora.library.adapters import LoraAdapter, LoraSpec
from modlora.library.experts import Experts, ExpertSet

FactorPair = tuple[torch.Tensor, torch.Tensor]


def module_shapes(experts: Experts) -> dict[str, tuple[int, int]]:
    """Union of modules → ``(out, in)``, sorted; raises when two experts disagree on a module's shape."""
    es = ExpertSet.of(experts)
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for name, ad in es.items():
        for m in ad.modules:
            shape = (ad.B[m].shape[0], ad.A[m].shape[1])
            if m in shapes and shapes[m] != shape:
                raise AdapterError(f"module {m!r}: expert {name!r} has ΔW shape {shape} but expert "
                                   f"{owner[m]!r} has {shapes[m]}")
            shapes.setdefault(m, shape)
            owner.setdefault(m, name)
    return dict(sorted(shapes.items()))


def common_base_model(experts: Experts) -> str | None:
    """The base model every expert names (``None`` when none does); raises when they name different ones."""
    names = {ad.base_model_name for ad in ExpertSet.of(experts).adapters if ad.base_model_name}
    if len(names) > 1:
        raise AdapterError(f"experts were trained on different base models: {sorted(names)}")
    return next(iter(names), None)


def union_target_modules(adapters: Sequence[LoraAdapter]) -> tuple[str, ...]:
    return tuple(sorted({t for ad in adapters for t in ad.spec.target_modules}))


def any_fan_in_fan_out(adapters: Sequence[LoraAdapter]) -> bool:
    """Whether some adapter's layers are ``Conv1D`` in the checkpoint (``fan_in_fan_out``): a merge of them says so
    in its PEFT config too (the factors are the same either way, see :mod:`modlora.library.adapters`)."""
    return any(ad.spec.fan_in_fan_out for ad in adapters)


def stack_factors(parts: Mapping[str, Sequence[FactorPair]], *, target_modules: Sequence[str],
                  base_model_name: str | None, dropout: float = 0.0, fan_in_fan_out: bool = False) -> LoraAdapter:
    """One scaling-1 adapter with ``B_m A_m = Σ_i B_i A_i`` for the pairs ``parts[m]`` (see module docstring)."""
    if not parts or any(not pl for pl in parts.values()):
        raise AdapterError("no factors to stack")
    rank = max(sum(int(a.shape[0]) for a, _ in pl) for pl in parts.values())
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for m, pl in parts.items():
        a = torch.cat([a.float() for a, _ in pl], 0)
        b = torch.cat([b.float() for _, b in pl], 1)
        pad = rank - a.shape[0]
        A[m] = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0) if pad else a
        B[m] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1) if pad else b
    spec = LoraSpec(rank=rank, alpha=float(rank), dropout=dropout, target_modules=tuple(target_modules),
                    fan_in_fan_out=fan_in_fan_out)
    return LoraAdapter(spec, A, B, base_model_name)


def weighted_delta_sum(experts: Experts, coefficients: Sequence[float] | None = None) -> LoraAdapter:
    """``ΔW_m = Σ_e c_e s_e B_e A_e`` exactly, as a rank-``Σ r_e`` adapter with scaling 1 (``A`` = stacked ``A_e``,
    ``B = [c_e s_e B_e]``); experts lacking a module contribute zero there. ``coefficients=None``: ``c_e = 1/E``."""
    es = ExpertSet.of(experts)
    coef = [1.0 / len(es)] * len(es) if coefficients is None else [float(c) for c in coefficients]
    if len(coef) != len(es):
        raise AdapterError(f"{len(coef)} coefficients for {len(es)} experts {list(es.names)[:10]}")
    parts: dict[str, list[FactorPair]] = {m: [] for m in module_shapes(es)}
    for ad, c in zip(es.adapters, coef, strict=True):
        for m in ad.modules:
            parts[m].append((ad.A[m], (c * ad.spec.scaling) * ad.B[m].float()))
    return stack_factors(parts, target_modules=union_target_modules(es.adapters),
                         base_model_name=common_base_model(es), fan_in_fan_out=any_fan_in_fan_out(es.adapters))


def parameter_average(experts: Experts) -> LoraAdapter:
    """μ by parameter averaging: ``Ā[m] = mean_e A_e[m]``, ``B̄[m] = mean_e B_e[m]`` over the experts adapting ``m``,
    ``ΔW = s · B̄ Ā``. Ranks and scalings must agree."""
    es = ExpertSet.of(experts)
    ranks = {a.spec.rank for a in es.adapters}
    scalings = {a.spec.scaling for a in es.adapters}
    if len(ranks) > 1 or len(scalings) > 1:
        raise AdapterError(f"parameter averaging needs equal ranks and scalings across experts, got ranks "
                           f"{sorted(ranks)} and scalings {sorted(scalings)}; use ΔW averaging (mu-delta) instead")
    module_shapes(es)
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for m in es.modules():
        idx = es.experts_of(m)
        A[m] = torch.stack([es.adapters[i].A[m].float() for i in idx]).mean(0)
        B[m] = torch.stack([es.adapters[i].B[m].float() for i in idx]).mean(0)
    s0 = es.adapters[0].spec
    spec = LoraSpec(rank=s0.rank, alpha=s0.alpha, dropout=s0.dropout, target_modules=union_target_modules(es.adapters),
                    fan_in_fan_out=any_fan_in_fan_out(es.adapters))
    return LoraAdapter(spec, A, B, common_base_model(es))


def genknowsub(experts: Experts, general: Experts, space: Literal["factors", "delta"] = "factors"
               ) -> dict[str, LoraAdapter]:
    """General-knowledge subtraction; returns new experts by name (the inputs are untouched).

    ``space="factors"`` (PEFT's ``use_gks``): ``A_e ← A_e − mean_g A_g``, ``B_e ← B_e − mean_g B_g`` (one rank).
    ``space="delta"``: ``ΔW_e ← ΔW_e − mean_g ΔW_g`` exactly, as an adapter of rank ``r_e + Σ_g r_g``.
    """
    es, gs = ExpertSet.of(experts), ExpertSet.of(general)
    out: dict[str, LoraAdapter] = {}
    if space == "factors":
        ranks = {a.spec.rank for a in es.adapters + gs.adapters}
        if len(ranks) > 1:
            raise AdapterError(f"GenKnowSub in factor space needs one rank for task and general experts, got "
                               f"{sorted(ranks)}; use space='delta'")
        mean_a = {m: torch.stack([gs.adapters[i].A[m].float() for i in gs.experts_of(m)]).mean(0)
                  for m in gs.modules()}
        mean_b = {m: torch.stack([gs.adapters[i].B[m].float() for i in gs.experts_of(m)]).mean(0)
                  for m in gs.modules()}
        for name, a in es.items():
            A = {m: t.float() - mean_a[m] if m in mean_a else t.float().clone() for m, t in a.A.items()}
            B = {m: t.float() - mean_b[m] if m in mean_b else t.float().clone() for m, t in a.B.items()}
            out[name] = LoraAdapter(a.spec, A, B, a.base_model_name, dict(a.extra_config))
    elif space == "delta":
        g = len(gs)
        for name, a in es.items():
            terms = ExpertSet((name, *gs.names), (a, *gs.adapters))
            merged = weighted_delta_sum(terms, [1.0] + [-1.0 / g] * g)
            out[name] = LoraAdapter(LoraSpec(merged.spec.rank, merged.spec.alpha, 0.0, a.spec.target_modules,
                                             a.spec.fan_in_fan_out),
                                    merged.A, merged.B, a.base_model_name, dict(a.extra_config))
    else:
        raise AdapterError(f"GenKnowSub space must be 'factors' or 'delta', got {space!r}")
    return out


def _sign_fix(v: torch.Tensor) -> torch.Tensor:
    """Flip each row of ``v`` (N, in) so that its first largest-|component| entry is positive."""
    lead = v.gather(1, v.abs().argmax(dim=1, keepdim=True))
    return torch.where(lead < 0, -v, v)


def top_right_singular_vectors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (N, R, in), ``B`` (N, out, R) → top right singular vectors ``v`` (N, in) of ``B_n A_n`` (float32, unit
    norm, sign-normalised) and ``σ₁`` (N,) float64; one LAPACK call per step for all N (see module docstring)."""
    if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise AdapterError(f"batched factors must be A (N, R, in) and B (N, out, R); got {tuple(A.shape)} and "
                           f"{tuple(B.shape)}")
    a64 = A.detach().to("cpu", torch.float64)
    b64 = B.detach().to("cpu", torch.float64)
    q_a, r_a = torch.linalg.qr(a64.transpose(1, 2))     # (N, in, R'), (N, R', R)
    q_b, r_b = torch.linalg.qr(b64)                      # (N, out, R''), (N, R'', R)
    core = r_b @ r_a.transpose(1, 2)                     # (N, R'', R')
    _, s, vh = torch.linalg.svd(core)
    v = (q_a @ vh[:, 0, :].unsqueeze(2)).squeeze(2)     # (N, in)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return _sign_fix(v).to(torch.float32), s[:, 0]


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Top right singular vector (in,) and singular value of ``ΔW = B A`` for one pair ``A`` (R, in), ``B`` (out, R)."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise AdapterError(f"factors must be A (R, in) and B (out, R); got {tuple(A.shape)} and {tuple(B.shape)}")
    v, s = top_right_singular_vectors(A.unsqueeze(0), B.unsqueeze(0))
    return v[0], float(s[0])


def block_factors(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> FactorPair:
    """Factors of the row-stacked ``[s_1 B_1 A_1; s_2 B_2 A_2; …]``: ``B = blockdiag(s_i B_i)``, ``A = [A_1; A_2; …]``.
    Used for the q/k/v-tied Arrow prototype."""
    A = torch.cat([a.float() for a, _, _ in parts], dim=0)
    B = torch.block_diag(*[s * b.float() for _, b, s in parts])
    return A, B
