"""PhatGOOSE (Muqeeth et al. 2024): per-expert sigmoid gates, then per-token top-k routing.

Gate training (per expert, post hoc): with the expert's LoRA applied and frozen, every adapted linear layer becomes::

    y = W x + b + σ(g · x) · s · B A x          x: (…, in), g: (in,), σ = sigmoid

and only the gates ``g`` (initialised to 0) are trained with Adam (reference: 100 steps, lr 1e-3) on the expert's own
data, loss = LM cross-entropy on target tokens. The base model is left exactly as it was afterwards.

Routing (as in the reference implementation, mttl ``PhatgooseSelector`` with ``norm_d`` normalisation): for the layer
input ``x_t`` (in,) and the gates ``G`` (E × in) of that layer, standardise both over the feature dimension
(``LN(v) = (v − mean(v)) / sqrt(var(v) + 1e-5)``, biased variance), score ``z_{t,e} = LN(x_t) · LN(g_e) / τ`` with
``τ = sqrt(in)``, keep the ``top_k`` (2) highest scores and softmax over them; other experts get weight 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modlora.errors import AdapterError, DataError, RoutingError
from modlora.library.adapters import LoraAdapter
from modlora.reuse.learned.lorahub import Example, normalize_examples, target_loss_sum

LN_EPS = 1e-5
ARTIFACT_VERSION = "phatgoose-v1"


class GatedLoraLinear(nn.Module):
    """``W x + b + σ(x · g) · s · (x Aᵀ) Bᵀ`` around a frozen ``nn.Linear``; only ``gate`` (in,) is trainable."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        self.register_buffer("lora_a", lora_a.detach().to(device=w.device, dtype=w.dtype))
        self.register_buffer("lora_b", lora_b.detach().to(device=w.device, dtype=w.dtype))
        self.scaling = float(scaling)
        self.gate = nn.Parameter(torch.zeros(base.in_features, device=w.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(x.float() @ self.gate).unsqueeze(-1).to(x.dtype)  # (…, 1)
        return self.base(x) + gate * (self.scaling * ((x @ self.lora_a.T) @ self.lora_b.T))


def _swap_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def train_phatgoose_gates(model: nn.Module, adapter: LoraAdapter, batches: Sequence[Example] | Example,
                          steps: int = 100, lr: float = 1e-3, *, loss_log: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Train one gate vector per adapted module of ``adapter`` (see module doc); returns ``{module: gate (in,)}``.

    ``batches`` are ``(input_ids, labels[, attention_mask])`` (shapes (n,) or (b, n), labels −100 off target);
    step ``i`` uses ``batches[i % len(batches)]``. Per-step losses are appended to ``loss_log`` when given.
    The model's original linear layers, their weights and ``requires_grad`` flags are restored afterwards.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AdapterError(f"PhatGOOSE steps must be a positive integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise AdapterError(f"PhatGOOSE learning rate must be a positive number, got {lr!r}")
    data = normalize_examples(batches)
    named = dict(model.named_modules())
    for m in adapter.modules:
        lin = named.get(m)
        if not isinstance(lin, nn.Linear):
            raise AdapterError(f"adapter module {m!r} is not a linear layer of the model")
        if (lin.out_features, lin.in_features) != (adapter.B[m].shape[0], adapter.A[m].shape[1]):
            raise AdapterError(f"adapter module {m!r}: LoRA shapes {tuple(adapter.B[m].shape)} / "
                               f"{tuple(adapter.A[m].shape)} do not fit layer {lin.out_features}×{lin.in_features}")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    wrapped: dict[str, GatedLoraLinear] = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in adapter.modules:
            wrapped[m] = GatedLoraLinear(named[m], adapter.A[m].float(), adapter.B[m].float(), adapter.spec.scaling)
            _swap_module(model, m, wrapped[m])
        model.eval()  # no dropout: the gates see the deterministic expert
        opt = torch.optim.Adam([g.gate for g in wrapped.values()], lr=lr)
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            total, count = target_loss_sum(model, data[step % len(data)])
            if count == 0:
                continue
            loss = total / count
            if not torch.isfinite(loss):
                raise DataError(f"PhatGOOSE gate training: non-finite loss at step {step}")
            loss.backward()
            opt.step()
            if loss_log is not None:
                loss_log.append(float(loss.detach()))
    finally:
        for m, g in wrapped.items():
            _swap_module(model, m, g.base)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return {m: g.gate.detach().float().cpu().clone() for m, g in wrapped.items()}


def standardize(v: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """``(v − mean) / sqrt(var + eps)`` over the last dimension (biased variance; LayerNorm without affine)."""
    return F.layer_norm(v, v.shape[-1:], eps=eps)


def phatgoose_weights(x: torch.Tensor, gates: torch.Tensor, top_k: int = 2,
                      temperature: float | None = None) -> torch.Tensor:
    """Per-token routing weights (t, E) from layer inputs ``x`` (t, in) and stacked gates ``gates`` (E, in).

    ``z = LN(x) LN(G)ᵀ / τ`` (τ = sqrt(in) by default); softmax over each row's ``top_k`` largest scores, zeros
    elsewhere (``top_k ≥ E`` → full softmax). Leading dims of ``x`` beyond the last are kept: (…, in) → (…, E).
    """
    if gates.ndim != 2 or x.shape[-1] != gates.shape[1]:
        raise RoutingError(f"PhatGOOSE: input size {x.shape[-1]} does not match gates of shape {tuple(gates.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise RoutingError(f"PhatGOOSE top_k must be a positive integer, got {top_k!r}")
    tau = math.sqrt(x.shape[-1]) if temperature is None else float(temperature)
    if not tau > 0:
        raise RoutingError(f"PhatGOOSE temperature must be positive, got {temperature!r}")
    scores = standardize(x.float()) @ standardize(gates.float()).T / tau
    k = min(top_k, gates.shape[0])
    top, idx = torch.topk(scores, k, dim=-1)
    return torch.zeros_like(scores).scatter(-1, idx, torch.softmax(top, dim=-1))


class PhatgooseRouter:
    """A per-layer router over stacked gates ``{module: (E, in)}``: :func:`phatgoose_weights` with ``top_k``."""

    def __init__(self, gates: Mapping[str, torch.Tensor], top_k: int = 2) -> None:
        self.gates = dict(gates)
        self.top_k = top_k

    def __call__(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        return phatgoose_weights(x, self.gates[layer].to(x.device), top_k=self.top_k)


def stack_gates(gates_by_expert: Mapping[str, Mapping[str, torch.Tensor]],
                expert_names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``{expert: {module: (in,)}}`` → ``{module: (E, in)}`` with rows in ``expert_names`` order.

    Every expert must have a gate for every module (experts not adapting a module cannot be routed to there).
    """
    names = list(expert_names) if expert_names is not None else list(gates_by_expert)
    if not names:
        raise RoutingError("no experts given to stack PhatGOOSE gates")
    missing = [n for n in names if n not in gates_by_expert]
    if missing:
        raise RoutingError(f"no PhatGOOSE gates for expert(s) {missing[:5]}")
    modules = sorted(gates_by_expert[names[0]])
    for n in names:
        if sorted(gates_by_expert[n]) != modules:
            diff = sorted(set(gates_by_expert[n]) ^ set(modules))[:3]
            raise RoutingError(f"expert {n!r} has PhatGOOSE gates for different modules than {names[0]!r} (e.g. {diff})")
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        rows = [gates_by_expert[n][m].float().reshape(-1) for n in names]
        if len({r.shape[0] for r in rows}) != 1:
            raise RoutingError(f"module {m!r}: PhatGOOSE gates have different sizes across experts")
        out[m] = torch.stack(rows)
    return out


def artifact_kind(steps: int, lr: float) -> str:
    """Artifact name encoding the method and its config, e.g. ``phatgoose-v1-steps100-lr0.001``."""
    return f"{ARTIFACT_VERSION}-steps{steps}-lr{lr:g}"


def phatgoose_gates_for_experts(model: nn.Module, experts: Mapping[str, LoraAdapter],
                                batches_by_expert: Mapping[str, Sequence[Example]], steps: int = 100, lr: float = 1e-3,
                                *, cache: object | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Gates for every expert, ``{expert: {module: (in,)}}``; uses/fills ``cache`` when it offers
    ``load_artifact(expert, kind)`` / ``save_artifact(expert, kind, tensors)`` (an ``ExpertLibrary``)."""
    kind = artifact_kind(steps, lr)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, adapter in experts.items():
        cached = cache.load_artifact(name, kind) if cache is not None and hasattr(cache, "load_artifact") else None
        if cached is not None and sorted(cached) == adapter.modules:
            out[name] = {m: t.float() for m, t in cached.items()}
            continue
        batches = batches_by_expert.get(name)
        if not batches:
            raise DataError(f"PhatGOOSE: no training batches for expert {name!r}")
        try:
            out[name] = train_phatgoose_gates(model, adapter, batches, steps=steps, lr=lr)
        except (DataError, AdapterError) as exc:
            raise type(exc)(f"PhatGOOSE: expert {name!r}: {exc}") from None
        if cache is not None and hasattr(cache, "save_artifact"):
            cache.save_artifact(name, kind, out[name])
    return out
