"""Poly and MHR libraries: S LoRA *skills* trained jointly on all tasks with a learned task → skill allocation.

Poly (Ponti et al. 2023). Every adapted layer holds S skills ``A_s`` (r, in), ``B_s`` (out, r). Task t owns
allocation logits ``Z[t]`` (S,); its weights are ``w_t = softmax(Z[t])`` and its adapter is the allocation-weighted
combination of the skill *factors*::

    A_t = Σ_s w_ts A_s        B_t = Σ_s w_ts B_s        ΔW_t = scaling · B_t A_t

(the paper draws ``Z`` through a Gumbel-sigmoid and normalises by the sum; we use a plain softmax: the same
simplex, no sampling noise, deterministic.)

MHR (Caccia et al. 2023): the rank is split into h heads of r/h rows; head j has its own allocation ``Z[t, j]``
(S,) and combines only the skills' j-th blocks: ``A_t[j] = Σ_s w_tjs A_s[j]`` (rows j·r/h … (j+1)·r/h of A) and
``B_t[:, j] = Σ_s w_tjs B_s[:, j]`` (the matching columns of B). Poly is MHR with h = 1.

Training (:func:`train_poly`) uses the multi-expert machinery of :mod:`modlora.build.multitrain`: the skills are the
stacked factors (S, r, in) / (S, out, r) and each forward's rows get their task's mixture through
:class:`MixtureSelector` (the row key is the task index). Skills and logits are trained by one AdamW with two
parameter groups: the skills at the build's ``lr``, the logits at ``allocation_lr`` (default 1e-2: the logits
start near 0 and must move by O(1) within the budget, whereas LoRA factors move by O(lr) per step — the reference
implementations also use a larger learning rate for the allocation). Both follow the same warm-up + linear decay.
Skills start from different seeds (``seed + s``): identical skills with near-identical logits would receive
proportional gradients and never separate. The budget is the shared expert's: ``steps_per_task · N`` optimizer
steps of ``batch_size`` examples drawn from the union of the tasks.

Storage. Skill s is expert ``skill{s}`` of rank r in PEFT format (for MHR, head j is its rank rows j·r/h …);
``meta/poly_allocation.json`` holds ``tasks``, ``skills``, ``heads`` and ``logits`` (T × h × S).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from modlora.build.multitrain import (
    InstalledFactors,
    MultiTrainOptions,
    default_init,
    mean_target_losses,
    micro_batch_stream,
    mixed_target_loss,
    pack_forwards,
)
from modlora.build.training import TrainConfig, seed_everything
from modlora.data import EncodedExample
from modlora.errors import DataError, ModloraError
from modlora.library.adapters import LoraAdapter, LoraSpec, adapted_modules
from modlora.library.skill_allocation import Allocation, mix_factors
from modlora.progress import progress_bar

DEFAULT_ALLOCATION_LR = 1e-2


@dataclass(frozen=True)
class PolyOptions:
    """S skills, h heads (1: Poly; > 1: MHR, h must divide the rank) and the allocation logits' learning rate."""

    skills: int = 4
    heads: int = 1
    allocation_lr: float = DEFAULT_ALLOCATION_LR

    def __post_init__(self) -> None:
        if self.skills < 1:
            raise ModloraError(f"skills must be >= 1, got {self.skills}")
        if self.heads < 1:
            raise ModloraError(f"heads must be >= 1, got {self.heads}")
        if not self.allocation_lr > 0:
            raise ModloraError(f"allocation_lr must be > 0, got {self.allocation_lr}")

    def check_rank(self, rank: int) -> None:
        if rank % self.heads:
            raise ModloraError(f"MHR: {self.heads} heads must divide the LoRA rank {rank}")



@dataclass(frozen=True)
class MixtureSelector:
    """Row b uses ``mix_factors(weights[b], skills)`` (a :class:`modlora.build.multitrain.FactorSelector`)."""

    weights: torch.Tensor  # (rows, h, S)

    def select(self, stacked: torch.Tensor, rank_dim: int) -> torch.Tensor:
        return mix_factors(self.weights, stacked, rank_dim)



@dataclass
class PolyResult:
    """Trained skills (best validation step), their allocation, metrics and the per-step history."""

    skills: dict[str, LoraAdapter]
    allocation: Allocation
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def _schedule(step: int, total: int, warmup: int) -> float:
    """``get_linear_schedule_with_warmup``'s factor at ``step`` (as :class:`modlora.build.multitrain.MultiTrainer`)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def train_poly(model: torch.nn.Module, train: Mapping[str, Sequence[EncodedExample]],
               val: Mapping[str, Sequence[EncodedExample]], *, pad_id: int, spec: LoraSpec, config: TrainConfig,
               options: PolyOptions, train_options: MultiTrainOptions | None = None,
               base_model_name: str | None = None, progress: bool = True, desc: str = "poly") -> PolyResult:
    """Train S skills and the T × h × S allocation logits jointly on the union of ``train`` (task → examples).

    ``config.total_steps(Σ examples)`` optimizer steps (``config.steps`` when set); every ``eval_every`` steps the
    mean over tasks of the validation loss is computed and the best skills + logits are kept. The base ``model``
    is left as it was."""
    train_options = train_options or MultiTrainOptions()
    options.check_rank(spec.rank)
    tasks = sorted(train)
    if not tasks or any(not train[t] for t in tasks):
        raise DataError(f"{desc}: every task needs training examples ({[t for t in tasks if not train[t]]} have none)")
    modules = adapted_modules(model, spec.target_modules)
    if not modules:
        raise DataError(f"{desc}: the model has no linear layer named {', '.join(spec.target_modules)}")
    seed_everything(config.seed)
    names = [f"skill{s}" for s in range(options.skills)]
    inits = [default_init(model, modules, spec, config.seed + s) for s in range(options.skills)]
    examples = [e for t in tasks for e in train[t]]
    key_of = {t: i for i, t in enumerate(tasks)}
    total = config.total_steps(len(examples))
    warmup = int(config.warmup_ratio * total)
    eval_every = config.eval_every or max(1, total // 4)
    stream = micro_batch_stream(examples, config)
    installed = InstalledFactors(model, modules, inits, spec)
    device = next(iter(installed.params())).device
    g = torch.Generator().manual_seed(config.seed)
    logits = torch.nn.Parameter((torch.rand(len(tasks), options.heads, options.skills, generator=g) * 2 - 1)
                                .mul_(1e-3).to(device))

    def selector_for(keys: torch.Tensor) -> MixtureSelector:
        return MixtureSelector(torch.softmax(logits.index_select(0, keys), dim=-1))

    optimizer = torch.optim.AdamW([{"params": installed.params(), "lr": config.lr},
                                   {"params": [logits], "lr": options.allocation_lr}],
                                  weight_decay=config.weight_decay)
    base_lrs = [config.lr, options.allocation_lr]
    val_by_key = {key_of[t]: list(val.get(t, ())) for t in tasks if val.get(t)}
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, LoraAdapter], np.ndarray] | None = None
    tokens = targets = 0
    running: float | None = None
    t0 = time.perf_counter()
    try:
        model.train()
        for step in progress_bar(range(1, total + 1), desc=desc, unit="step", enabled=progress):
            factor = _schedule(step - 1, total, warmup)
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * factor
            optimizer.zero_grad()
            micro = [next(stream) for _ in range(config.grad_accum)]
            denom = max(1, sum(len(e.target_ids) for b in micro for e in b))
            step_loss = 0.0
            for batch in micro:
                by_task: dict[int, list[EncodedExample]] = {}
                for e in batch:
                    by_task.setdefault(key_of[e.task], []).append(e)
                for fwd in pack_forwards(list(by_task.items()), train_options.max_tokens_per_forward,
                                         shared_prefix=train_options.shared_prefix):
                    res = mixed_target_loss(model, installed.slot, fwd, pad_id=pad_id,
                                            shared_prefix=train_options.shared_prefix, selector_for=selector_for)
                    (res.loss_sums.sum() / denom).backward()
                    step_loss += float(res.loss_sums.detach().sum())
                    tokens += sum(res.tokens)
                    targets += sum(res.target_counts)
            torch.nn.utils.clip_grad_norm_([*installed.params(), logits], config.max_grad_norm)
            optimizer.step()
            loss_value = step_loss / denom
            running = loss_value if running is None else 0.9 * running + 0.1 * loss_value
            history.append({"step": step, "train_loss": loss_value})
            if step % eval_every == 0 or step == total:
                vals = mean_target_losses(model, installed.slot, val_by_key, pad_id=pad_id,
                                          shared_prefix=train_options.shared_prefix,
                                          selector_for=selector_for) if val_by_key else {}
                score = float(np.mean(list(vals.values()))) if vals else loss_value
                history[-1]["val_loss"] = score
                if best is None or score < best[0]:
                    best = (score, step, {n: installed.adapter(i, spec, base_model_name) for i, n in enumerate(names)},
                            logits.detach().double().cpu().numpy().copy())
    finally:
        installed.remove()
    assert best is not None
    seconds = time.perf_counter() - t0
    metrics = {"steps": total, "best_step": best[1], "best_val_loss": best[0],
               "final_train_loss": running if running is not None else math.nan, "train_tokens": tokens,
               "target_tokens": targets, "train_seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9),
               "train_examples": len(examples)}
    return PolyResult(best[2], Allocation(tasks, names, options.heads, best[3]), metrics, history)
