"""``route()``: put a routed mixture of LoRA experts into a Hugging Face causal LM, and read what it did.

:class:`RoutedModel` wraps the model in place (every adapted ``nn.Linear`` becomes a
:class:`~modlora.reuse.routing.layer.RoutedLoraLinear` that holds the original linear as ``.base``) and puts it back
with :meth:`RoutedModel.restore` (or on leaving a ``with`` block): the very same module objects return, so weights
are bit-identical. Routing is per token on each layer's input, so ``generate`` with a KV cache routes every new
token afresh and padding tokens never influence real tokens (nothing pools over the sequence).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from modlora.errors import RoutingError
from modlora.library.adapters import LoraAdapter
from modlora.library.experts import Experts, ExpertSet
from modlora.reuse.lowrank import genknowsub, stack_factors
from modlora.reuse.routing.layer import (
    LayerRouter,
    Mixing,
    Path,
    RoutedLoraLinear,
    RoutingState,
    SparseKernel,
    TopKRouting,
)
from modlora.reuse.routing.routers import ArrowRouter, UniformRouter


class RoutingRecorder:
    """Accumulates, per layer, the routing entropy and the expert-selection histogram over real (unpadded) tokens.

    Entropy of a token: ``H = −Σ_e w_e log w_e`` (nats). ``selected[layer][e]``: tokens that gave expert ``e`` a
    non-zero weight; ``mass[layer][e]``: the sum of its weights. With ``per_token=True`` the (t, E) weights of each
    call are also kept (for :func:`explain_routing`).
    """

    def __init__(self, expert_names: Sequence[str], per_token: bool = False) -> None:
        self.expert_names = list(expert_names)
        self.per_token = per_token
        self.entropy_sum: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.selected: dict[str, torch.Tensor] = {}
        self.mass: dict[str, torch.Tensor] = {}
        self.weights: dict[str, list[torch.Tensor]] = {}

    def add(self, layer: str, expert_ids: torch.Tensor, routing: torch.Tensor | TopKRouting, num_experts: int,
            shape: torch.Size, state: RoutingState) -> None:
        w = routing.dense(num_experts) if isinstance(routing, TopKRouting) else routing
        w = w.detach().float().cpu()
        mask = state.token_mask
        if mask is not None and len(shape) >= 3 and mask.shape[0] == shape[0] and mask.shape[1] >= shape[-2]:
            keep = mask[:, -shape[-2]:].reshape(-1).bool().cpu()
            if keep.numel() == w.shape[0]:
                w = w[keep]
        full = torch.zeros(w.shape[0], len(self.expert_names))
        full[:, expert_ids.cpu()] = w
        ent = -(full.clamp_min(1e-30).log() * full).sum(1)
        self.entropy_sum[layer] = self.entropy_sum.get(layer, 0.0) + float(ent.sum())
        self.tokens[layer] = self.tokens.get(layer, 0) + full.shape[0]
        self.selected[layer] = self.selected.get(layer, torch.zeros(len(self.expert_names))) + (full > 0).sum(0)
        self.mass[layer] = self.mass.get(layer, torch.zeros(len(self.expert_names))) + full.sum(0)
        if self.per_token:
            self.weights.setdefault(layer, []).append(full)

    def entropy(self) -> dict[str, float]:
        """Mean per-token routing entropy (nats) per layer."""
        return {lay: self.entropy_sum[lay] / max(self.tokens[lay], 1) for lay in self.entropy_sum}

    def histogram(self) -> dict[str, dict[str, int]]:
        """Per layer: expert name → number of tokens that selected it (non-zero weight)."""
        return {lay: {n: int(c) for n, c in zip(self.expert_names, cnt.tolist(), strict=True)}
                for lay, cnt in self.selected.items()}

    def summary(self) -> dict[str, Any]:
        """JSON-able: per layer entropy, tokens, selection counts and mean weight per expert."""
        ent = self.entropy()
        return {lay: {"entropy": ent[lay], "tokens": self.tokens[lay],
                      "selected": self.histogram()[lay],
                      "mean_weight": {n: float(m) / max(self.tokens[lay], 1)
                                      for n, m in zip(self.expert_names, self.mass[lay].tolist(), strict=True)}}
                for lay in ent}


class RoutedModel:
    """A causal LM whose adapted linears are routed LoRA layers. Call it like the model; ``generate`` too.

    ``layer_experts[layer]``: global expert indices (into ``expert_names``) adapting ``layer``, in router order.
    """

    def __init__(self, model: nn.Module, experts: ExpertSet, router: LayerRouter, state: RoutingState,
                 layers: dict[str, RoutedLoraLinear], originals: dict[str, nn.Module],
                 layer_experts: dict[str, list[int]], hook: Any) -> None:
        self.model = model
        self.experts = experts
        self.router = router
        self.state = state
        self.layers = layers
        self.layer_experts = layer_experts
        self._originals = originals
        self._hook = hook
        self.restored = False

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts.names)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check_live()
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._check_live()
        return self.model.generate(*args, **kwargs)

    def _check_live(self) -> None:
        if self.restored:
            raise RoutingError("this RoutedModel was restored; call route() again")

    def restore(self) -> nn.Module:
        """Put the original linear modules back (same objects, so identical weights) and return the model."""
        if not self.restored:
            for path, original in self._originals.items():
                parent_name, _, leaf = path.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, leaf, original)
            self._hook.remove()
            self.state.example_weights = None
            self.state.recorder = None
            self.restored = True
        return self.model

    def __enter__(self) -> RoutedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def set_path(self, path: Path) -> None:
        """Force the ``"dense"`` (dense-fold) or ``"sparse"`` (top-k) compute path, or ``"auto"``."""
        self.state.path = _checked_path(path)

    def set_sparse_kernel(self, kernel: SparseKernel) -> None:
        """Kernel of the sparse path: ``"sddmm"`` (CPU, float32/64), ``"blocks"`` (any device/dtype) or ``"auto"``."""
        self.state.sparse_kernel = _checked_kernel(kernel)

    @contextlib.contextmanager
    def example_weights(self, weights: torch.Tensor | Mapping[str, float] | Sequence[Mapping[str, float]]
                        ) -> Iterator[None]:
        """Route every token of example ``b`` with the fixed weights ``weights[b]`` (batch, E) instead of the router.

        This is the oracle / task-predictor hook. ``weights`` may also be one ``{expert: weight}`` dict per example.
        """
        w = self._weights_tensor(weights)
        previous = self.state.example_weights
        self.state.example_weights = w
        try:
            yield
        finally:
            self.state.example_weights = previous

    def _weights_tensor(self, weights: Any) -> torch.Tensor:
        if isinstance(weights, Mapping):
            weights = [weights]
        if not isinstance(weights, torch.Tensor):
            rows = []
            for row in weights:
                vec = torch.zeros(len(self.experts))
                for name, val in row.items():
                    vec[self.experts.index(name)] = float(val)
                rows.append(vec)
            weights = torch.stack(rows)
        if weights.ndim != 2 or weights.shape[1] != len(self.experts):
            raise RoutingError(f"example weights must be (batch, {len(self.experts)}), got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all():
            raise RoutingError("example weights contain NaN or Inf")
        return weights.float()

    @contextlib.contextmanager
    def record(self, per_token: bool = False) -> Iterator[RoutingRecorder]:
        """Record routing entropy and expert histograms of the calls inside the block."""
        rec = RoutingRecorder(self.experts.names, per_token)
        previous = self.state.recorder
        self.state.recorder = rec
        try:
            yield rec
        finally:
            self.state.recorder = previous

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the bare base model (LoRA parts off) inside the block."""
        self.state.enabled = False
        try:
            yield
        finally:
            self.state.enabled = True


def _resolve_router(router: Any) -> Any:
    if router is None or router == "arrow":
        return ArrowRouter()
    if router == "uniform":
        return UniformRouter()
    if isinstance(router, str):
        raise RoutingError(f"unknown router {router!r}; use 'arrow', 'uniform' or a router object")
    if not callable(router):
        raise RoutingError(f"router must be callable (x, layer) -> weights, got {type(router).__name__}")
    return router


def _checked_path(path: str) -> Path:
    if path not in ("auto", "dense", "sparse"):
        raise RoutingError(f"path must be 'auto', 'dense' or 'sparse', got {path!r}")
    return path


def _checked_kernel(kernel: str) -> SparseKernel:
    if kernel not in ("auto", "sddmm", "blocks"):
        raise RoutingError(f"sparse_kernel must be 'auto', 'sddmm' or 'blocks', got {kernel!r}")
    return kernel


def route(model: nn.Module, experts: Experts, router: Any = "arrow", *, mixing: Mixing = "outputs",
          path: Path = "auto", general_experts: Experts | None = None,
          gks_space: Literal["factors", "delta"] = "factors", sparse_kernel: SparseKernel = "auto") -> RoutedModel:
    """Replace every linear adapted by any expert with a routed LoRA layer; returns the :class:`RoutedModel`.

    ``experts``: a library, a ``Mapping[str, LoraAdapter]`` or an :class:`~modlora.library.experts.ExpertSet` (derived
    tensors are cached in the source's artifacts). ``router``: ``"arrow"`` (default :class:`ArrowRouter`),
    ``"uniform"`` (every expert ``1/E``), or any router object.
    ``general_experts``: if given, GenKnowSub subtracts their mean from every expert first (``gks_space``:
    ``"factors"`` like PEFT, or exact ``"delta"``); the stored experts are not modified. ``path`` and
    ``sparse_kernel`` pick the routed layers' compute path and sparse kernel (see :mod:`modlora.reuse.routing.layer`).
    """
    es = ExpertSet.of(experts)
    if general_experts is not None:
        gs = ExpertSet.of(general_experts)
        tag = hashlib.sha256("\0".join(gs.names).encode()).hexdigest()[:10]
        es = ExpertSet(es.names, tuple(genknowsub(es, gs, gks_space).values()), es.source,
                       f"{es.tag}-gks-{gks_space}-{tag}")
    path, sparse_kernel = _checked_path(path), _checked_kernel(sparse_kernel)
    if any(isinstance(m, RoutedLoraLinear) for m in model.modules()):
        raise RoutingError("model is already routed; restore() it first")
    named = dict(model.named_modules())
    layer_experts: dict[str, list[int]] = {}
    for layer in es.modules():
        if not isinstance(named.get(layer), nn.Linear):
            owners = [es.names[i] for i in es.experts_of(layer)][:3]
            raise RoutingError(f"module {layer} of experts {owners} is not a linear layer of the model")
        layer_experts[layer] = es.experts_of(layer)
    router = _resolve_router(router)
    device = next(model.parameters()).device
    if hasattr(router, "bind"):
        router.bind(es, layer_experts, device)
    state = RoutingState(path=path, sparse_kernel=sparse_kernel, expert_names=tuple(es.names))
    layers: dict[str, RoutedLoraLinear] = {}
    originals: dict[str, nn.Module] = {}
    for layer, ids in layer_experts.items():
        base = named[layer]
        adapters = [es.adapters[i] for i in ids]
        layers[layer] = RoutedLoraLinear(base, layer, ids, [a.A[layer] for a in adapters],
                                         [a.B[layer] for a in adapters], [a.spec.scaling for a in adapters],
                                         router, state, mixing)
    for layer, routed in layers.items():
        parent_name, _, leaf = layer.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        originals[layer] = getattr(parent, leaf)
        setattr(parent, leaf, routed)

    def capture_mask(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        state.token_mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None

    hook = model.register_forward_pre_hook(capture_mask, with_kwargs=True)
    return RoutedModel(model, es, router, state, layers, originals, layer_experts, hook)


# ------------------------------------------------------------------------------------------- explain / export
@torch.no_grad()
def _record_prompt(routed: RoutedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                   ) -> RoutingRecorder:
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[0] != 1:
        raise RoutingError(f"explain/export take one prompt, got a batch of {input_ids.shape[0]}")
    device = next(routed.model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device)}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.reshape(1, -1).to(device)
    with routed.record(per_token=True) as rec:
        routed(**kwargs)
    return rec


def explain_routing(routed: RoutedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    top: int = 3) -> dict[str, Any]:
    """Which experts each token of one prompt used: per token the top experts by weight averaged over layers, and
    per layer the top experts by mean weight over tokens plus the mean routing entropy."""
    rec = _record_prompt(routed, input_ids, attention_mask)
    names = rec.expert_names
    per_layer_w = {lay: torch.cat(ws) for lay, ws in rec.weights.items()}      # (t, E) each
    avg = torch.stack(list(per_layer_w.values())).mean(0)                      # (t, E)
    top = min(top, len(names))
    tokens = []
    for t in range(avg.shape[0]):
        vals, idx = torch.topk(avg[t], top)
        tokens.append([(names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist(), strict=True) if v > 0])
    layers = {}
    ent = rec.entropy()
    for lay, w in per_layer_w.items():
        vals, idx = torch.topk(w.mean(0), top)
        layers[lay] = {"entropy": ent[lay],
                       "top": [(names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]}
    overall_vals, overall_idx = torch.topk(avg.mean(0), top)
    return {"tokens": tokens, "layers": layers,
            "overall": [(names[i], float(v)) for v, i in zip(overall_vals.tolist(), overall_idx.tolist(), strict=True)]}


def explain(routed: RoutedModel, tokenizer: Any, prompt: str, top: int = 3) -> str:
    """Human-readable routing summary of one prompt (tokens → top experts; layers → top experts, entropy)."""
    enc = tokenizer(prompt, return_tensors="pt")
    info = explain_routing(routed, enc["input_ids"], enc.get("attention_mask"), top)
    ids = enc["input_ids"][0].tolist()
    lines = ["overall: " + ", ".join(f"{n} {w:.2f}" for n, w in info["overall"]), "", "per token:"]
    for tok_id, experts in zip(ids, info["tokens"], strict=True):
        lines.append(f"  {tokenizer.decode([tok_id])!r:>12}  " + ", ".join(f"{n} {w:.2f}" for n, w in experts))
    lines += ["", "per layer (mean entropy, top experts):"]
    for lay, d in info["layers"].items():
        lines.append(f"  {lay}  H={d['entropy']:.3f}  " + ", ".join(f"{n} {w:.2f}" for n, w in d["top"]))
    return "\n".join(lines)


def export_prompt_adapter(routed: RoutedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          top_experts: int = 2) -> LoraAdapter:
    """A static adapter for one request: per layer, average the routing weights over the prompt's real tokens,
    keep the ``top_experts`` largest, renormalise to ``c_e`` and return ``ΔW = Σ_e c_e s_e B_e A_e`` exactly as a
    rank-``top_experts·r`` adapter (scaling 1, zero-padded to one rank) that PEFT can load."""
    if top_experts < 1:
        raise RoutingError(f"top_experts must be >= 1, got {top_experts}")
    rec = _record_prompt(routed, input_ids, attention_mask)
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lay, ws in rec.weights.items():
        mean_w = torch.cat(ws).mean(0)                      # (E,) over all experts
        k = min(top_experts, len(routed.layer_experts[lay]))
        vals, idx = torch.topk(mean_w, k)
        keep = [(int(i), float(v)) for v, i in zip(vals.tolist(), idx.tolist(), strict=True) if v > 0]
        total = sum(v for _, v in keep)
        parts[lay] = [(routed.experts.adapters[i].A[lay],
                       (v / total) * routed.experts.adapters[i].spec.scaling * routed.experts.adapters[i].B[lay].float())
                      for i, v in keep]
    return stack_factors(parts, target_modules=tuple(sorted({lay.rsplit(".", 1)[-1] for lay in parts})),
                         base_model_name=routed.experts.adapters[0].base_model_name)
