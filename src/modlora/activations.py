"""The base model's layer inputs: which adapted layers read one input (q/k/v, gate/up) and the mean and covariance
of those inputs over some batches. EVA's initialisation (:mod:`modlora.build.initialisation`) and whitened Arrow
(:mod:`modlora.reuse.methods.arrow`) use them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from modlora.errors import RoutingError

QKV = ("q_proj", "k_proj", "v_proj")


def qkv_group(layer: str) -> str | None:
    """``model.layers.0.self_attn.q_proj`` → ``model.layers.0.self_attn.qkv``; ``None`` for other layers."""
    parent, _, leaf = layer.rpartition(".")
    return f"{parent}.qkv" if leaf in QKV else None


SIBLINGS = {leaf: "qkv" for leaf in QKV} | {"gate_proj": "gate_up", "up_proj": "gate_up"}


def input_group(layer: str) -> str:
    """Layers that read the same input tensor in a decoder block: q/k/v (→ ``….qkv``) and gate/up (→ ``….gate_up``);
    any other layer is its own group."""
    parent, _, leaf = layer.rpartition(".")
    sib = SIBLINGS.get(leaf)
    return f"{parent}.{sib}" if sib else layer


@dataclass(frozen=True)
class InputMoments:
    """The token inputs x (d,) of one input group over some batches: ``mean = Σx/n`` (d,), ``cov = Σxxᵀ/n − μμᵀ``
    (d, d; population covariance) in float64, and ``count`` = n non-padding tokens."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int


def input_moments(model: torch.nn.Module, layers: Iterable[str],
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, InputMoments]:
    """Mean and covariance of the inputs of ``layers`` over the non-padding tokens of ``batches`` (``(input_ids
    (b, s), attention_mask (b, s) or None)``), one pass of the model's decoder (no LM head), keyed by
    :func:`input_group` (q/k/v and gate/up read one input and share one accumulation). Per batch the sums are a
    float32 GEMM ``xᵀx``, accumulated over batches in float64. Used by EVA's initialisation and by whitened Arrow."""
    named = dict(model.named_modules())
    first: dict[str, str] = {}
    for layer in layers:
        if layer not in named:
            raise RoutingError(f"input moments: the model has no module {layer}")
        first.setdefault(input_group(layer), layer)
    sums: dict[str, list[torch.Tensor]] = {}
    mask: list[torch.Tensor] = []

    def accumulate(group: str) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0][mask[0]].float()                                    # (tokens, d_in), padding left out
            acc = sums.setdefault(group, [torch.zeros(x.shape[1], dtype=torch.float64),
                                          torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)])
            acc[0] += x.sum(0).double().cpu()
            acc[1] += (x.T @ x).double().cpu()
        return hook

    device = next(model.parameters()).device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    handles = [named[layer].register_forward_pre_hook(accumulate(g)) for g, layer in first.items()]
    was_training = model.training
    count = 0
    try:
        model.eval()
        with torch.no_grad():
            for ids, attention in batches:
                attention = (torch.ones_like(ids) if attention is None else attention).to(device)
                mask[:] = [attention.bool()]
                count += int(attention.sum())
                decoder(input_ids=ids.to(device), attention_mask=attention)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise RoutingError("input moments: every token is padding (or there are no batches)")
    out = {}
    for g, (total, outer) in sums.items():
        mean = total / count
        out[g] = InputMoments(mean, outer / count - torch.outer(mean, mean), count)
    return out
