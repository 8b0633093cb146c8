"""LoraHub (Huang et al. 2023): gradient-free few-shot search of per-expert combination weights.

For weights ``w ∈ [−bound, bound]^E`` (bound 1.5) the candidate adapter is LoraHub's *parameter-space* combination
(the reference code's ``get_final_weights``: the same weight multiplies each expert's ``lora_A`` and ``lora_B``)::

    A_w = Σ_e w_e A_e   (r × in),   B_w = Σ_e w_e B_e   (out × r),   ΔW_w = s · B_w A_w

(experts with different scalings ``s_e`` get ``√s_e`` folded into both factors and the result has ``s = 1``; all
experts must share the rank ``r``). Note ``ΔW_w`` is *not* ``Σ w_e ΔW_e``: it has cross terms ``w_e w_f B_e A_f``.
Each candidate is merged into the base weights ``W ← W₀ + ΔW_w``, scored, and ``W₀`` is copied back bit-exactly.

Objective (reference ``get_score``): ``L(w) + α · mean_e |w_e|`` (reference ``default_l1_regularization``, α=0.05),
where ``L`` is the mean cross-entropy over all target tokens (labels ≠ −100) of the few-shot examples. nevergrad
``NGOpt`` starts from ``w = 0`` with ``budget`` evaluations (40 in the reference).

Examples are ``(input_ids, labels)`` or ``(input_ids, labels, attention_mask)`` with tensors of shape ``(n,)`` or
``(batch, n)``; ``labels`` follow the HF convention (aligned with ``input_ids``, shifted inside the loss, −100 = ignore).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from modlora.errors import AdapterError, DataError
from modlora.library.adapters import LoraAdapter, LoraSpec
from modlora.library.experts import Experts, ExpertSet
from modlora.reuse.lowrank import common_base_model, module_shapes, union_target_modules
from modlora.reuse.merging import WeightsLike, resolve_weights

IGNORE_INDEX = -100
Example = tuple[torch.Tensor, ...]


@dataclass
class LabelledBatch:
    """``input_ids``/``labels``/``attention_mask``: (batch, n) LongTensors (mask may be ``None``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None


def normalize_examples(examples: Sequence[Example] | Example) -> list[LabelledBatch]:
    """Validate examples and give every one a batch dimension. Raises :class:`DataError` naming the example."""
    if isinstance(examples, tuple) and examples and isinstance(examples[0], torch.Tensor):
        examples = [examples]
    if not isinstance(examples, Sequence) or len(examples) == 0:
        raise DataError("no labelled examples given")
    out: list[LabelledBatch] = []
    n_targets = 0
    for i, ex in enumerate(examples):
        if not isinstance(ex, (tuple, list)) or len(ex) not in (2, 3):
            raise DataError(f"example {i}: expected (input_ids, labels[, attention_mask]), got {type(ex).__name__}")
        tensors = list(ex)
        shape = tensors[0].shape if isinstance(tensors[0], torch.Tensor) else None
        for j, (t, what) in enumerate(zip(tensors, ("input_ids", "labels", "attention_mask"), strict=False)):
            if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex:
                raise DataError(f"example {i}: {what} must be an integer tensor, got {getattr(t, 'dtype', type(t))}")
            if t.ndim not in (1, 2) or t.shape[-1] == 0:
                raise DataError(f"example {i}: {what} must have shape (n,) or (batch, n), got {tuple(t.shape)}")
            if t.shape != shape:
                raise DataError(f"example {i}: {what} shape {tuple(t.shape)} != input_ids shape {tuple(shape)}")
            tensors[j] = (t if t.ndim == 2 else t.unsqueeze(0)).long()
        ids, labels = tensors[0], tensors[1]
        if (ids < 0).any():
            raise DataError(f"example {i}: input_ids contain negative token ids")
        if ((labels < 0) & (labels != IGNORE_INDEX)).any():
            raise DataError(f"example {i}: labels must be token ids or {IGNORE_INDEX}")
        n_targets += int((labels[:, 1:] != IGNORE_INDEX).sum())
        out.append(LabelledBatch(ids, labels, tensors[2] if len(tensors) == 3 else None))
    if n_targets == 0:
        raise DataError("examples have no target tokens (every label after the first position is -100)")
    return out


def group_batches(batches: Sequence[LabelledBatch]) -> list[LabelledBatch]:
    """Concatenate batches of equal sequence length (and mask presence) along the batch dim: fewer forwards, same sums."""
    groups: dict[tuple[int, bool], list[LabelledBatch]] = {}
    for b in batches:
        groups.setdefault((b.input_ids.shape[1], b.attention_mask is not None), []).append(b)
    out = []
    for (_, has_mask), group in groups.items():
        out.append(LabelledBatch(torch.cat([b.input_ids for b in group]), torch.cat([b.labels for b in group]),
                                 torch.cat([b.attention_mask for b in group]) if has_mask else None))
    return out


def target_loss_sum(model: torch.nn.Module, batch: LabelledBatch) -> tuple[torch.Tensor, int]:
    """``(Σ CE over target tokens, #target tokens)`` for one batch; logits at ``t`` predict ``labels[t+1]``."""
    vocab = model.get_input_embeddings().num_embeddings
    if int(batch.input_ids.max()) >= vocab or int(batch.labels.max()) >= vocab:
        raise DataError(f"token id >= vocabulary size {vocab} in input_ids or labels")
    device = next(model.parameters()).device
    mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=mask).logits
    labels = batch.labels[:, 1:].to(device)
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    return ce, int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def few_shot_loss(model: torch.nn.Module, examples: Sequence[Example] | list[LabelledBatch]) -> float:
    """Mean cross-entropy per target token over all examples (the model as it currently is)."""
    batches = examples if examples and isinstance(examples[0], LabelledBatch) else normalize_examples(examples)
    total, count = 0.0, 0
    for b in batches:
        s, n = target_loss_sum(model, b)
        total += float(s)
        count += n
    return total / max(count, 1)


def _folded_factors(experts: ExpertSet) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], LoraSpec]:
    """Per module stacked ``(A (E, r, in), B (E, out, r))`` with the scaling folded in, and the output spec."""
    ranks = {n: ad.spec.rank for n, ad in experts.items()}
    if len(set(ranks.values())) != 1:
        raise AdapterError(f"LoraHub's parameter-space combination needs experts of one rank, got {ranks}")
    r = next(iter(ranks.values()))
    scalings = [ad.spec.scaling for ad in experts.adapters]
    same_scaling = all(s == scalings[0] for s in scalings)
    first = experts.adapters[0].spec
    shapes = module_shapes(experts)
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for m, (out_f, in_f) in shapes.items():
        a = torch.zeros(len(experts), r, in_f)
        b = torch.zeros(len(experts), out_f, r)
        for i, ad in enumerate(experts.adapters):
            if m in ad.A:
                root = 1.0 if same_scaling else math.sqrt(abs(ad.spec.scaling))
                sign = 1.0 if same_scaling or ad.spec.scaling >= 0 else -1.0
                a[i] = ad.A[m].float() * (root * sign)
                b[i] = ad.B[m].float() * root
        stacked[m] = (a, b)
    alpha = first.alpha if same_scaling else float(r)
    spec = LoraSpec(rank=r, alpha=alpha, dropout=first.dropout, target_modules=union_target_modules(experts.adapters))
    return stacked, spec


def lorahub_combine(experts: Experts, weights: WeightsLike) -> LoraAdapter:
    """LoraHub's parameter-space combination ``A = Σ w_e A_e``, ``B = Σ w_e B_e`` as one adapter (see module doc)."""
    experts = ExpertSet.of(experts)
    w = torch.tensor(resolve_weights(experts, weights), dtype=torch.float32)
    stacked, spec = _folded_factors(experts)
    A = {m: torch.einsum("e,eri->ri", w, a) for m, (a, _) in stacked.items()}
    B = {m: torch.einsum("e,eor->or", w, b) for m, (_, b) in stacked.items()}
    return LoraAdapter(spec, A, B, common_base_model(experts))


@contextlib.contextmanager
def restored_weights(model: torch.nn.Module,
                     modules: Sequence[str]) -> Iterator[dict[str, tuple[torch.nn.Linear, torch.Tensor]]]:
    """Yield ``{module path: (nn.Linear, copy of its original weight)}``; on exit copy the originals back (bit-exact)."""
    named = dict(model.named_modules())
    layers: dict[str, torch.nn.Linear] = {}
    for m in modules:
        lin = named.get(m)
        if not isinstance(lin, torch.nn.Linear):
            raise AdapterError(f"adapter module {m!r} is not a linear layer of the model")
        layers[m] = lin
    saved = {m: lin.weight.detach().clone() for m, lin in layers.items()}
    try:
        yield {m: (lin, saved[m]) for m, lin in layers.items()}
    finally:
        with torch.no_grad():
            for m, lin in layers.items():
                lin.weight.copy_(saved[m])


@dataclass
class LoraHubResult:
    """Best weights found (``weights``: name → w), the static ``adapter`` they give, its few-shot ``loss`` and
    ``objective = loss + α·mean|w|``; ``history`` lists every evaluated ``(weights, loss, objective)``."""

    weights: dict[str, float]
    adapter: LoraAdapter
    loss: float
    objective: float
    history: list[tuple[list[float], float, float]] = field(default_factory=list)


def l1_penalty(weights: Sequence[float], alpha: float = 0.05) -> float:
    """LoraHub's regulariser ``α · mean_e |w_e|``."""
    return alpha * sum(abs(x) for x in weights) / len(weights)


def lorahub_search(model: torch.nn.Module, experts: Experts, examples: Sequence[Example] | Example, *,
                   budget: int = 40, l1_alpha: float = 0.05, bound: float = 1.5, seed: int = 0,
                   init: WeightsLike = None, on_eval: Callable[[list[float], float], None] | None = None) -> LoraHubResult:
    """Search LoraHub weights with nevergrad ``NGOpt`` (``budget`` evaluations, box ``[−bound, bound]^E``).

    Each evaluation merges ``ΔW_w = s · B_w A_w`` into the base weights, computes the few-shot loss, and restores the
    original weights bit-exactly (also on error). Returns the best *evaluated* candidate (lowest objective).
    ``init=None`` starts at ``w = 0`` like the reference.
    """
    import nevergrad as ng

    experts = ExpertSet.of(experts)
    names = list(experts.names)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise AdapterError(f"LoraHub budget must be a positive integer, got {budget!r}")
    if not (math.isfinite(bound) and bound > 0):
        raise AdapterError(f"LoraHub bound must be a positive number, got {bound!r}")
    batches = group_batches(normalize_examples(examples))
    stacked, spec = _folded_factors(experts)
    named = dict(model.named_modules())
    for m, (a, b) in list(stacked.items()):  # combine on the weights' device
        w = getattr(named.get(m), "weight", None)
        if isinstance(w, torch.Tensor):
            stacked[m] = (a.to(w.device), b.to(w.device))
    start = np.zeros(len(names)) if init is None else np.clip(np.array(resolve_weights(experts, init)), -bound, bound)
    param = ng.p.Array(init=start, lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    history: list[tuple[list[float], float, float]] = []
    was_training = model.training
    model.eval()
    try:
        with restored_weights(model, list(stacked)) as layers, torch.no_grad():

            def objective(w: np.ndarray) -> float:
                wt = torch.as_tensor(np.asarray(w, dtype=np.float32))
                try:
                    for m, (a, b) in stacked.items():
                        lin, original = layers[m]
                        delta = spec.scaling * (torch.einsum("e,eor->or", wt, b) @ torch.einsum("e,eri->ri", wt, a))
                        lin.weight.copy_(original + delta.to(lin.weight))
                    loss = few_shot_loss(model, batches)
                finally:
                    for lin, original in layers.values():
                        lin.weight.copy_(original)
                wl = [float(x) for x in w]
                score = loss + l1_penalty(wl, l1_alpha) if math.isfinite(loss) else float("inf")
                history.append((wl, loss, score))
                if on_eval is not None:
                    on_eval(wl, loss)
                return score

            with warnings.catch_warnings():  # scipy's COBYLA (inside NGOpt) warns about its own defaults
                warnings.filterwarnings("ignore", message=".*COBYLA.*", category=UserWarning)
                optimizer.minimize(objective)
    finally:
        model.train(was_training)
    best_w, best_loss, best_obj = min(history, key=lambda h: h[2])
    adapter = lorahub_combine(experts, best_w)
    return LoraHubResult(dict(zip(names, best_w, strict=True)), adapter, best_loss, best_obj, history)
