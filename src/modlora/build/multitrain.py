"""Training many LoRA experts at once on one frozen base model (mixed batches, per-example factors).

Every adapted linear layer ``y = W x`` of the base gets the factors of all N experts, stacked::

    A: (N, r, in)   B: (N, out, r)   (fp32, whatever the base dtype)
    y[b] = W x[b] + s · B[sel(b)] A[sel(b)] x[b]        for each example (row) b of the batch

where ``sel(b)`` picks the factors of row b's expert (:class:`IndexSelector`: a gather ``A[idx]``, then two
``bmm`` — no per-expert kernel launches). The frozen base runs once per token for all experts together.

Exactness. A training step of the whole set takes one micro-batch of each active expert, regroups all their examples
by length across experts into forwards (at most ``max_tokens_per_forward`` padded tokens each, widths within 25 %:
little padding) and back-propagates
``Σ_e loss_sum_e / n_target_e``. Expert e's factors only touch expert e's rows, so their gradient is exactly what
expert e alone would get from that micro-batch. :class:`StackedAdamW` then applies, row by row, the update of
``torch.optim.AdamW`` with the expert's own learning rate (warm-up + linear decay over its own budget), step count
and gradient-norm clipping. Given the same data order, seed and initial factors, an expert trained with others
ends with the factors it gets alone (float tolerance; dropout off, since dropout masks are drawn per batch).

Each expert keeps its budget (optimizer steps), validation schedule, best checkpoint and loss/token counts; when
its budget ends it leaves the batch and ``on_finished`` receives its result at once (the caller stores it).

Shared prefixes (``shared_prefix=True``): all examples of a task start with the same definition. Per expert
micro-batch the longest common token prefix ``P`` of its prompts (at most the shortest prompt minus one token) is
run once; its key/value cache is expanded over the micro-batch's rows (an index into the autograd graph, not a
detached copy, so gradients flow through the prefix) and only the suffixes run per example, at positions
``P, P+1, ...``. Loss and gradients equal the unshared computation up to float rounding.

Mixtures of experts per example (Poly/MHR: ``A_b = Σ_k w[b,k] A_k``) plug in as another selector: an object with
``select(stacked, rank_dim) -> per-row factors``, e.g. ``einsum("bk,k...->b...", w, stacked)``
(:class:`modlora.build.poly.MixtureSelector`), and ``mixed_target_loss(..., selector_for=...)`` builds it per forward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from modlora.build.training import TrainConfig, TrainResult, seed_everything
from modlora.data import EncodedExample, collate, length_grouped_batches
from modlora.errors import DataError
from modlora.library.adapters import LoraAdapter, LoraSpec, adapted_modules, resolve_spec
from modlora.progress import progress_bar


class FactorSelector(Protocol):
    """Picks each batch row's factors from the stacked factors of all experts: ``(N, ...) -> (rows, ...)``;
    ``rank_dim`` is the rank's dimension in ``stacked`` (1 for A (N, r, in), 2 for B (N, out, r))."""

    def select(self, stacked: torch.Tensor, rank_dim: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class IndexSelector:
    """Row b uses expert ``index[b]``'s factors (a gather)."""

    index: torch.Tensor  # (rows,) long

    def select(self, stacked: torch.Tensor, rank_dim: int) -> torch.Tensor:
        return stacked.index_select(0, self.index)


@dataclass
class SelectorSlot:
    """The selector of the forward pass in progress, shared by all :class:`MultiLoraLinear` layers of a model."""

    selector: FactorSelector | None = None


class MultiLoraLinear(torch.nn.Module):
    """``y = W x + s · B[sel] A[sel] dropout(x)`` with per-row factors (x: (rows, T, in) -> (rows, T, out))."""

    def __init__(self, base: torch.nn.Linear, A: torch.nn.Parameter, B: torch.nn.Parameter, scaling: float,
                 dropout: float, slot: SelectorSlot) -> None:
        super().__init__()
        self.base, self.A, self.B = base, A, B
        self.scaling, self.dropout, self.slot = scaling, dropout, slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        selector = self.slot.selector
        if selector is None:
            raise RuntimeError("MultiLoraLinear called without a factor selector")
        a, b = selector.select(self.A, 1), selector.select(self.B, 2)  # (rows, r, in), (rows, out, r)
        h = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
        if self.dropout > 0 and self.training:
            h = torch.nn.functional.dropout(h, self.dropout)
        h = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2)) * self.scaling
        return out + h.reshape(out.shape).to(out.dtype)


class StackedAdamW:
    """AdamW on parameters stacked along dim 0, one row per expert: per-row learning rate, step count and
    gradient-norm clipping; the same arithmetic as one ``torch.optim.AdamW`` + ``clip_grad_norm_`` per expert.
    Rows not in ``rows`` are left untouched (finished experts)."""

    def __init__(self, params: Sequence[torch.Tensor], *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(self.params[0].shape[0], dtype=torch.float64)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norms: Sequence[float]) -> torch.Tensor:
        """Scale row e's gradient (over all parameters) to norm <= ``max_norms[e]``; returns the norms (N,)."""
        sq = sum(p.grad.float().pow(2).flatten(1).sum(1) for p in self.params if p.grad is not None)
        norms = torch.as_tensor(sq).sqrt()
        coef = (torch.as_tensor(max_norms, dtype=norms.dtype, device=norms.device) / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))
        return norms

    @torch.no_grad()
    def step(self, lr: Sequence[float], rows: Sequence[int]) -> None:
        """One AdamW step with learning rate ``lr[e]`` for each row e in ``rows``."""
        if not rows:
            return
        beta1, beta2 = self.betas
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        self.steps[idx] += 1
        step = self.steps[idx]
        lr_rows = torch.as_tensor([lr[e] for e in rows], dtype=torch.float64)
        step_size = (lr_rows / (1 - beta1 ** step)).float()
        bc2_sqrt = (1 - beta2 ** step).sqrt().float()
        decay = (1 - lr_rows * self.weight_decay).float()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            shape = (-1, *([1] * (p.dim() - 1)))
            dev_idx = idx.to(p.device)
            g = p.grad.index_select(0, dev_idx) if p.grad is not None else torch.zeros_like(p[dev_idx])
            pr, mr, vr = p.index_select(0, dev_idx), m.index_select(0, dev_idx), v.index_select(0, dev_idx)
            pr.mul_(decay.to(p.device).view(shape))
            mr.lerp_(g, 1 - beta1)
            vr.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (vr.sqrt() / bc2_sqrt.to(p.device).view(shape)).add_(self.eps)
            pr.sub_(step_size.to(p.device).view(shape) * mr / denom)
            p.index_copy_(0, dev_idx, pr)
            m.index_copy_(0, dev_idx, mr)
            v.index_copy_(0, dev_idx, vr)


@dataclass
class ExpertData:
    """One expert's training input: examples, validation examples, budget/optimiser settings, optional init."""

    train: Sequence[EncodedExample]
    val: Sequence[EncodedExample] = ()
    config: TrainConfig = field(default_factory=TrainConfig)
    init: LoraAdapter | None = None


@dataclass(frozen=True)
class MultiTrainOptions:
    """How the experts share forwards: prefix sharing and the size cap (rows × padded length) of one forward."""

    shared_prefix: bool = False
    max_tokens_per_forward: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens_per_forward is not None and self.max_tokens_per_forward < 1:
            raise DataError("max_tokens_per_forward must be >= 1")


@dataclass
class _ExpertState:
    name: str
    row: int
    data: ExpertData
    total_steps: int
    warmup_steps: int
    eval_every: int
    stream: Iterator[list[EncodedExample]]
    step: int = 0
    best_val: float = math.inf
    best_step: int = 0
    best_adapter: LoraAdapter | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    target_tokens: int = 0
    seconds: float = 0.0
    running: float | None = None

    def lr(self) -> float:
        """The learning rate of the coming step: ``get_linear_schedule_with_warmup`` at the current step."""
        cfg, s = self.data.config, self.step
        if s < self.warmup_steps:
            return cfg.lr * s / max(1, self.warmup_steps)
        return cfg.lr * max(0.0, (self.total_steps - s) / max(1, self.total_steps - self.warmup_steps))


def micro_batch_stream(examples: Sequence[EncodedExample], config: TrainConfig) -> Iterator[list[EncodedExample]]:
    """The same micro-batch stream as :func:`modlora.build.training.train_expert` (length-grouped, reshuffled per epoch)."""
    epoch = 0
    while True:
        yield from length_grouped_batches(examples, config.batch_size, seed=config.seed + epoch)
        epoch += 1


def default_init(model: torch.nn.Module, modules: Sequence[str], spec: LoraSpec, seed: int) -> LoraAdapter:
    """PEFT's initialisation, drawn from a generator seeded with ``seed``: ``A ~ U(±1/√in)``
    (``kaiming_uniform_(a=√5)``), ``B = 0``."""
    g = torch.Generator().manual_seed(seed)
    named = dict(model.named_modules())
    A, B = {}, {}
    for m in modules:
        lin = named[m]
        bound = 1.0 / math.sqrt(lin.in_features)
        A[m] = (torch.rand(spec.rank, lin.in_features, generator=g) * 2 - 1) * bound
        B[m] = torch.zeros(lin.out_features, spec.rank)
    return LoraAdapter(spec, A, B)


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def shared_prefix_length(examples: Sequence[EncodedExample]) -> int:
    """Tokens the prompts of ``examples`` share from the start, leaving each at least its last prompt token."""
    if len(examples) < 2:
        return 0
    return max(0, min(_common_prefix([e.prompt_ids for e in examples]),
                      min(len(e.prompt_ids) for e in examples) - 1))


@dataclass
class MixedLoss:
    """Per-part (expert micro-batch) summed target cross-entropy (P,), target counts (P,) and real tokens (P,)."""

    loss_sums: torch.Tensor
    target_counts: list[int]
    tokens: list[int]


SelectorFor = Callable[[torch.Tensor], FactorSelector]
"""Builds the selector of a forward from its rows' keys (rows,) long: :class:`IndexSelector` (a key is an expert's
row), or a mixture selector (a key is, e.g., a task whose allocation over skills gives the row's factors)."""


def mixed_target_loss(model: torch.nn.Module, slot: SelectorSlot, parts: Sequence[tuple[int, Sequence[EncodedExample]]],
                      *, pad_id: int, shared_prefix: bool = False,
                      selector_for: SelectorFor = IndexSelector) -> MixedLoss:
    """Summed target cross-entropy of each part ``(key, examples)``, all parts in one forward.

    Logits only at target positions (as :func:`modlora.build.training.target_loss`). With ``shared_prefix`` each part's
    common prompt prefix runs once and its KV cache is indexed out to the part's rows (gradients flow through it).
    ``selector_for(keys)`` gives the factors of rows with those keys (default: the key is the expert's row).
    """
    device = next(model.parameters()).device
    examples = [e for _, exs in parts for e in exs]
    part_of = torch.tensor([p for p, (_, exs) in enumerate(parts) for _ in exs], device=device)
    rows = torch.tensor([row for row, exs in parts for _ in exs], device=device)
    prefix = [shared_prefix_length(exs) if shared_prefix else 0 for _, exs in parts]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    batch = collate(examples, pad_id).to(device)
    if max(prefix) == 0:
        slot.selector = selector_for(rows)
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        ids, loss_mask = batch.input_ids, batch.loss_mask
    else:
        hidden, ids, loss_mask = _prefix_shared_hidden(decoder, slot, parts, prefix, rows, part_of, batch, pad_id,
                                                       selector_for)
    labels = torch.roll(ids, shifts=-1, dims=1)[loss_mask]
    logits = head(hidden[loss_mask]).float()
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    token_part = part_of.unsqueeze(1).expand_as(loss_mask)[loss_mask]
    sums = torch.zeros(len(parts), device=device, dtype=ce.dtype).index_add(0, token_part, ce)
    counts = torch.bincount(token_part, minlength=len(parts)).tolist()
    real = batch.attention_mask.sum(1)
    tokens = torch.zeros(len(parts), dtype=real.dtype, device=device).index_add(0, part_of, real).tolist()
    return MixedLoss(sums, counts, tokens)


def _prefix_shared_hidden(decoder: torch.nn.Module, slot: SelectorSlot,
                          parts: Sequence[tuple[int, Sequence[EncodedExample]]], prefix: list[int],
                          rows: torch.Tensor, part_of: torch.Tensor, batch, pad_id: int,
                          selector_for: SelectorFor = IndexSelector) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states of the suffixes (rows, S, d), their ids and loss mask, after a prefix pass per part."""
    device = rows.device
    width = max(prefix) if max(prefix) > 0 else 1
    pre_ids = torch.full((len(parts), width), pad_id, dtype=torch.long, device=device)
    pre_mask = torch.zeros((len(parts), width), dtype=torch.long, device=device)
    for p, ((_, exs), n) in enumerate(zip(parts, prefix, strict=True)):
        if n:
            pre_ids[p, :n] = torch.tensor(exs[0].prompt_ids[:n], device=device)
            pre_mask[p, :n] = 1
    slot.selector = selector_for(torch.tensor([row for row, _ in parts], device=device))
    cache = decoder(input_ids=pre_ids, attention_mask=pre_mask, use_cache=True).cache
    for layer in cache.layers:  # (parts, H, P, d) -> (rows, H, P, d): still in the autograd graph
        layer.batch_select_indices(part_of)
    offsets = torch.tensor(prefix, device=device).index_select(0, part_of)  # (rows,)
    lengths = batch.attention_mask.sum(1)
    suffix_width = int((lengths - offsets).max())
    gather = (offsets.unsqueeze(1) + torch.arange(suffix_width, device=device)).clamp(max=batch.input_ids.shape[1] - 1)
    suf_ids = batch.input_ids.gather(1, gather)
    valid = torch.arange(suffix_width, device=device).unsqueeze(0) < (lengths - offsets).unsqueeze(1)
    suf_ids = torch.where(valid, suf_ids, torch.full_like(suf_ids, pad_id))
    suf_loss = batch.loss_mask.gather(1, gather) & valid
    mask = torch.cat([pre_mask.index_select(0, part_of), valid.long()], dim=1)
    positions = offsets.unsqueeze(1) + torch.arange(suffix_width, device=device)
    slot.selector = selector_for(rows)
    hidden = decoder(input_ids=suf_ids, attention_mask=mask, position_ids=positions, cache=cache,
                     use_cache=True).last_hidden_state
    return hidden, suf_ids, suf_loss


def pack_forwards(parts: list[tuple[int, list[EncodedExample]]], max_tokens: int | None, slack: float = 0.25, *,
                  shared_prefix: bool = False) -> list[list[tuple[int, list[EncodedExample]]]]:
    """Cut one step's parts (expert micro-batches) into forwards of at most ``max_tokens`` padded tokens whose
    widths differ by at most ``slack`` (little padding). Exact either way: each expert's loss is summed over forwards.

    Without ``shared_prefix`` lengths are grouped across experts: all examples sorted by length, and within a forward
    the examples of one expert form one part. With it, parts stay whole (their common prefix runs once per part, so
    splitting a part would run it again): parts sorted by suffix width ``w_p`` (longest example minus the prefix
    ``P_p``), and a forward of parts F costs ``|F|·max P + Σ_F n_p · max w`` padded tokens (prefix pass + suffix
    pass). A part over ``max_tokens`` on its own still gets a forward of its own."""
    if shared_prefix:
        return _pack_whole_parts(parts, max_tokens, slack)
    items = sorted(((row, e) for row, exs in parts for e in exs), key=lambda item: item[1].length)
    forwards: list[list[tuple[int, EncodedExample]]] = [[]]
    for row, e in items:
        cur = forwards[-1]
        if cur and ((max_tokens is not None and (len(cur) + 1) * e.length > max_tokens)
                    or e.length > (1 + slack) * cur[0][1].length):
            forwards.append(cur := [])
        cur.append((row, e))
    out = []
    for fwd in forwards:
        by_row: dict[int, list[EncodedExample]] = {}
        for row, e in fwd:
            by_row.setdefault(row, []).append(e)
        out.append(list(by_row.items()))
    return out


def _pack_whole_parts(parts: list[tuple[int, list[EncodedExample]]], max_tokens: int | None, slack: float
                      ) -> list[list[tuple[int, list[EncodedExample]]]]:
    shapes = []  # (suffix width, prefix, rows, part)
    for part in parts:
        prefix = shared_prefix_length(part[1])
        shapes.append((max(e.length for e in part[1]) - prefix, prefix, len(part[1]), part))
    shapes.sort(key=lambda shape: shape[0])
    forwards: list[list[tuple[int, int, int, tuple[int, list[EncodedExample]]]]] = [[]]
    for shape in shapes:
        cur = forwards[-1]
        if cur:
            grown = [*cur, shape]
            cost = len(grown) * max(p for _, p, _, _ in grown) + sum(n for _, _, n, _ in grown) * shape[0]
            if (max_tokens is not None and cost > max_tokens) or shape[0] > (1 + slack) * cur[0][0]:
                forwards.append(cur := [])
        cur.append(shape)
    return [[part for *_, part in fwd] for fwd in forwards]


@torch.no_grad()
def mean_target_losses(model: torch.nn.Module, slot: SelectorSlot, val: Mapping[int, Sequence[EncodedExample]], *,
                       pad_id: int, batch_size: int = 16, shared_prefix: bool = False,
                       selector_for: SelectorFor = IndexSelector) -> dict[int, float]:
    """Mean per-token target cross-entropy of each key (expert row) over its examples, in mixed batches."""
    was_training = model.training
    model.eval()
    parts = [(row, group) for row, exs in val.items() for group in length_grouped_batches(exs, batch_size,
                                                                                             shuffle=False)]
    total = dict.fromkeys(val, 0.0)
    count = dict.fromkeys(val, 0)
    per_forward = max(1, 64 // batch_size)
    parts.sort(key=lambda p: max(e.length for e in p[1]))
    for i in range(0, len(parts), per_forward):
        chunk = parts[i:i + per_forward]
        res = mixed_target_loss(model, slot, chunk, pad_id=pad_id, shared_prefix=shared_prefix,
                                selector_for=selector_for)
        for (row, _), s, n in zip(chunk, res.loss_sums.tolist(), res.target_counts, strict=True):
            total[row] += s
            count[row] += n
    model.train(was_training)
    return {row: total[row] / max(count[row], 1) if val[row] else math.nan for row in val}


class InstalledFactors:
    """The stacked factors installed into ``model`` (replacing its target linears); ``remove()`` restores it."""

    def __init__(self, model: torch.nn.Module, modules: Sequence[str], inits: Sequence[LoraAdapter], spec: LoraSpec):
        self.model, self.modules = model, list(modules)
        self.slot = SelectorSlot()
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        device = next(model.parameters()).device
        named = dict(model.named_modules())
        self.originals: dict[str, torch.nn.Linear] = {}
        self.A: dict[str, torch.nn.Parameter] = {}
        self.B: dict[str, torch.nn.Parameter] = {}
        for m in self.modules:
            lin = named[m]
            for init in inits:
                if m not in init.A or tuple(init.A[m].shape) != (spec.rank, lin.in_features):
                    raise DataError(f"initial adapter has no rank-{spec.rank} factors for module {m!r}")
            self.A[m] = torch.nn.Parameter(torch.stack([i.A[m].float() for i in inits]).to(device))
            self.B[m] = torch.nn.Parameter(torch.stack([i.B[m].float() for i in inits]).to(device))
            parent_name, _, child = m.rpartition(".")
            parent = named[parent_name] if parent_name else model
            self.originals[m] = lin
            setattr(parent, child, MultiLoraLinear(lin, self.A[m], self.B[m], spec.scaling, spec.dropout, self.slot))

    def params(self) -> list[torch.nn.Parameter]:
        return [t for m in self.modules for t in (self.A[m], self.B[m])]

    def adapter(self, row: int, spec: LoraSpec, base_name: str | None) -> LoraAdapter:
        return LoraAdapter(spec, {m: self.A[m][row].detach().float().cpu().clone() for m in self.modules},
                           {m: self.B[m][row].detach().float().cpu().clone() for m in self.modules}, base_name)

    def remove(self) -> None:
        named = dict(self.model.named_modules())
        for m, lin in self.originals.items():
            parent_name, _, child = m.rpartition(".")
            setattr(named[parent_name] if parent_name else self.model, child, lin)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad.get(n, p.requires_grad))
        self.model.eval()


FinishedCallback = Callable[[str, TrainResult], None]


@dataclass(frozen=True)
class StepStats:
    """What one step of the whole set did: experts stepped, examples, real tokens, target tokens, seconds, and
    the mean over the stepped experts of their step's target loss."""

    experts: int
    examples: int
    tokens: int
    target_tokens: int
    seconds: float
    mean_loss: float


class MultiTrainer:
    """Trains experts together one step at a time (``with MultiTrainer(...) as t: while t.active: t.step()``).

    Entering installs the stacked factors into ``model``; leaving restores the model as it was. ``results`` holds
    the finished experts' :class:`TrainResult`; ``on_finished(name, result)`` is called as each one finishes.
    """

    def __init__(self, model: torch.nn.Module, experts: Mapping[str, ExpertData], *, pad_id: int,
                 spec: LoraSpec | None = None, options: MultiTrainOptions | None = None,
                 base_model_name: str | None = None, desc: str = "train",
                 on_finished: FinishedCallback | None = None) -> None:
        self.model, self.pad_id, self.desc = model, pad_id, desc
        self.spec = resolve_spec(model, spec or LoraSpec())   # targets checked against the model before any step
        self.options = options or MultiTrainOptions()
        self.base_name, self.on_finished = base_model_name, on_finished
        if not experts:
            raise DataError(f"{desc}: no experts to train")
        for name, data in experts.items():
            if not data.train:
                raise DataError(f"{desc}: expert {name!r} has no training examples")
        decays = {d.config.weight_decay for d in experts.values()}
        if len(decays) > 1:
            raise DataError(f"{desc}: experts trained together must share weight_decay (got {sorted(decays)})")
        self.weight_decay = decays.pop()
        self.modules = adapted_modules(model, self.spec.target_modules)
        self.experts = experts
        self.states: list[_ExpertState] = []
        for row, (name, data) in enumerate(experts.items()):
            total = data.config.total_steps(len(data.train))
            self.states.append(_ExpertState(name, row, data, total, int(data.config.warmup_ratio * total),
                                            data.config.eval_every or max(1, total // 4),
                                            micro_batch_stream(data.train, data.config)))
        self.active = list(self.states)
        self.results: dict[str, TrainResult] = {}
        self._installed: InstalledFactors | None = None
        self._optimizer: StackedAdamW | None = None

    @property
    def total_steps(self) -> int:
        """Expert-steps of the whole set (the progress bar's total)."""
        return sum(s.total_steps for s in self.states)

    def __enter__(self) -> MultiTrainer:
        seeds = {d.config.seed for d in self.experts.values()}
        seed_everything(min(seeds))
        by_seed = {s: default_init(self.model, self.modules, self.spec, s) for s in seeds if any(
            d.init is None and d.config.seed == s for d in self.experts.values())}
        inits = [d.init if d.init is not None else by_seed[d.config.seed] for d in self.experts.values()]
        self._installed = InstalledFactors(self.model, self.modules, inits, self.spec)
        self._optimizer = StackedAdamW(self._installed.params(), weight_decay=self.weight_decay)
        self.model.train()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed is not None:
            self._installed.remove()
            self._installed = None

    def step(self) -> StepStats:
        """One optimizer step of every active expert; validates, checkpoints and retires experts as due."""
        installed, optimizer, model = self._installed, self._optimizer, self.model
        if installed is None or optimizer is None:
            raise RuntimeError("MultiTrainer.step() outside its 'with' block")
        active = self.active
        t0 = time.perf_counter()
        optimizer.zero_grad()
        micro = {s.row: [next(s.stream) for _ in range(s.data.config.grad_accum)] for s in active}
        denom = {row: sum(len(e.target_ids) for b in mbs for e in b) for row, mbs in micro.items()}
        step_loss = dict.fromkeys(micro, 0.0)
        step_tokens = dict.fromkeys(micro, 0)
        step_targets = dict.fromkeys(micro, 0)
        for k in range(max(len(m) for m in micro.values())):
            parts = [(row, mbs[k]) for row, mbs in micro.items() if k < len(mbs)]
            for group in pack_forwards(parts, self.options.max_tokens_per_forward,
                                       shared_prefix=self.options.shared_prefix):
                res = mixed_target_loss(model, installed.slot, group, pad_id=self.pad_id,
                                        shared_prefix=self.options.shared_prefix)
                weights = torch.tensor([1.0 / max(denom[row], 1) for row, _ in group], device=res.loss_sums.device)
                (res.loss_sums * weights).sum().backward()
                for (row, _), s, n, t in zip(group, res.loss_sums.tolist(), res.target_counts, res.tokens,
                                             strict=True):
                    step_loss[row] += s
                    step_targets[row] += n
                    step_tokens[row] += t
        optimizer.clip_grad_norm_([s.data.config.max_grad_norm for s in self.states])
        lrs = {s.row: s.lr() for s in active}
        optimizer.step([lrs.get(r, 0.0) for r in range(len(self.states))], [s.row for s in active])
        elapsed = time.perf_counter() - t0
        all_tokens = max(sum(step_tokens.values()), 1)
        for s in active:
            s.step += 1
            s.tokens += step_tokens[s.row]
            s.target_tokens += step_targets[s.row]
            s.seconds += elapsed * step_tokens[s.row] / all_tokens
            loss_value = step_loss[s.row] / max(step_targets[s.row], 1)
            s.running = loss_value if s.running is None else 0.9 * s.running + 0.1 * loss_value
            s.history.append({"step": s.step, "train_loss": loss_value})
        self._validate([s for s in active if s.step % s.eval_every == 0 or s.step == s.total_steps])
        for s in active:
            if s.step >= s.total_steps:
                self.results[s.name] = _result(s)
                if self.on_finished is not None:
                    self.on_finished(s.name, self.results[s.name])
        self.active = [s for s in active if s.step < s.total_steps]
        return StepStats(len(active), sum(len(mbs[k]) for mbs in micro.values() for k in range(len(mbs))),
                         sum(step_tokens.values()), sum(step_targets.values()), time.perf_counter() - t0,
                         sum(step_loss[r] / max(step_targets[r], 1) for r in micro) / len(micro))

    def _validate(self, due: list[_ExpertState]) -> None:
        if not due:
            return
        assert self._installed is not None
        with_val = {s.row: s.data.val for s in due if s.data.val}
        vals = mean_target_losses(self.model, self._installed.slot, with_val, pad_id=self.pad_id,
                                  shared_prefix=self.options.shared_prefix) if with_val else {}
        for s in due:
            val = vals.get(s.row, s.history[-1]["train_loss"])
            s.history[-1]["val_loss"] = val
            if val < s.best_val:
                s.best_val, s.best_step = val, s.step
                s.best_adapter = self._installed.adapter(s.row, self.spec, self.base_name)

    def mean_running_loss(self) -> float:
        return sum(s.running or 0.0 for s in self.active) / max(len(self.active), 1)


def train_experts(model: torch.nn.Module, experts: Mapping[str, ExpertData], *, pad_id: int,
                  spec: LoraSpec | None = None, options: MultiTrainOptions | None = None,
                  base_model_name: str | None = None, progress: bool = True, desc: str = "train",
                  on_finished: FinishedCallback | None = None) -> dict[str, TrainResult]:
    """Train one LoRA expert per entry of ``experts`` together (see the module docstring); returns each expert's
    best-validation adapter and metrics, in the same form as :func:`modlora.build.training.train_expert`.

    ``on_finished(name, result)`` is called as soon as an expert's budget ends. The base ``model`` is left as it
    was (layers restored, ``requires_grad`` flags restored, eval mode).
    """
    trainer = MultiTrainer(model, experts, pad_id=pad_id, spec=spec, options=options,
                           base_model_name=base_model_name, desc=desc, on_finished=on_finished)
    tokens, seconds = 0, 0.0
    with trainer, progress_bar(total=trainer.total_steps, desc=desc, unit="step", enabled=progress) as bar:
        while trainer.active:
            stats = trainer.step()
            tokens += stats.tokens
            seconds += stats.seconds
            if trainer.active:                          # the last step's postfix stays (no "experts=0, loss=0")
                bar.set_postfix(experts=len(trainer.active), loss=f"{trainer.mean_running_loss():.3f}",
                                tok_s=f"{tokens / max(seconds, 1e-9):.0f}", refresh=False)
            bar.update(stats.experts)
    return {name: trainer.results[name] for name in experts}


def _result(s: _ExpertState) -> TrainResult:
    assert s.best_adapter is not None
    metrics = {
        "steps": s.total_steps, "best_step": s.best_step, "best_val_loss": s.best_val,
        "final_train_loss": s.running if s.running is not None else float("nan"),
        "train_tokens": s.tokens, "target_tokens": s.target_tokens, "train_seconds": s.seconds,
        "tokens_per_second": s.tokens / max(s.seconds, 1e-9), "train_examples": len(s.data.train),
    }
    return TrainResult(s.best_adapter, metrics, s.history)
