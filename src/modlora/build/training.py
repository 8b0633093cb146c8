"""Training one LoRA expert on one or several tasks, with PEFT layers (the single-expert reference path).

Library builds train many experts together with :mod:`modlora.build.multitrain`, which reproduces this trainer's
arithmetic (batches, loss, AdamW, schedule, clipping, best checkpoint) for each expert; this module keeps the
one-expert PEFT path as the reference it is tested against and as the benchmarks' "one at a time" baseline.

The LoRA layers are injected with PEFT (``get_peft_model``) and removed again afterwards (``unload``), so the base
model object is shared by all experts a process trains. The loss is the mean cross-entropy over *target tokens only*,
and — the main cost saving on CPU — the LM head runs only on the hidden states at target positions::

    h = decoder(input_ids).last_hidden_state          # (B, T, d)
    logits = lm_head(h[loss_mask])                      # (N_target, V) instead of (B, T, V)
    loss = CE(logits, input_ids shifted left [loss_mask])

Batches are length-grouped (little padding). Defaults follow the paper: r=4, alpha=16, dropout 0.05, AdamW, lr 1e-4,
linear warm-up over 6% of the steps then linear decay. The checkpoint with the best validation loss is kept.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import get_linear_schedule_with_warmup

from modlora.data import Batch, EncodedExample, collate, length_grouped_batches
from modlora.errors import DataError
from modlora.library.adapters import LoraAdapter, LoraSpec, resolve_spec
from modlora.progress import progress_bar

_LORA_PARAM = ".lora_{}.default.weight"


@dataclass
class TrainConfig:
    """Optimisation settings. ``steps`` (optimizer steps) wins over ``epochs`` when both are set."""

    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    eval_every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise DataError("steps must be >= 1")
        if self.epochs <= 0 or self.batch_size < 1 or self.grad_accum < 1 or self.lr <= 0:
            raise DataError("epochs, batch_size, grad_accum and lr must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(n_examples / (self.batch_size * self.grad_accum))
        return max(1, math.ceil(per_epoch * self.epochs))


@dataclass
class TrainResult:
    """The best adapter and metrics: losses, tokens seen, wall time and throughput."""

    adapter: LoraAdapter
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def target_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over target tokens and their count; logits only at target positions."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    labels = torch.roll(batch.input_ids, shifts=-1, dims=1)[batch.loss_mask]
    logits = head(hidden[batch.loss_mask]).float()
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum"), int(labels.numel())


@torch.no_grad()
def mean_target_loss(model: torch.nn.Module, examples: Sequence[EncodedExample], *, pad_id: int,
                     batch_size: int = 16) -> float:
    """Mean per-token target cross-entropy of ``model`` over ``examples`` (eval mode)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for group in length_grouped_batches(examples, batch_size, shuffle=False):
        loss, n = target_loss(model, collate(group, pad_id).to(device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _extract_adapter(peft_model: torch.nn.Module, spec: LoraSpec, base_name: str | None) -> LoraAdapter:
    A, B = {}, {}
    prefix = "base_model.model."
    for name, p in peft_model.named_parameters():
        for which, store in (("A", A), ("B", B)):
            suffix = _LORA_PARAM.format(which)
            if name.endswith(suffix):
                store[name[len(prefix):-len(suffix)]] = p.detach().float().cpu().clone()
    return LoraAdapter(spec, A, B, base_name)


def train_expert(model: torch.nn.Module, train_examples: Sequence[EncodedExample],
                 val_examples: Sequence[EncodedExample] = (), *, pad_id: int, spec: LoraSpec | None = None,
                 config: TrainConfig | None = None, base_model_name: str | None = None, progress: bool = True,
                 desc: str = "train") -> TrainResult:
    """Train one LoRA expert on ``train_examples``; returns the adapter with the best validation loss.

    The base ``model`` is left exactly as it was (PEFT layers are unloaded, ``requires_grad`` flags restored).
    """
    spec = resolve_spec(model, spec or LoraSpec())   # targets checked against the model before training
    config = config or TrainConfig()
    if not train_examples:
        raise DataError(f"{desc}: no training examples")
    seed_everything(config.seed)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    lcfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.target_modules), task_type="CAUSAL_LM", bias="none")
    peft_model = get_peft_model(model, lcfg)
    try:
        return _train_loop(peft_model, train_examples, val_examples, pad_id, spec, config, base_model_name,
                           progress, desc)
    finally:
        peft_model.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
        model.eval()


def _train_loop(peft_model: Any, train_examples: Sequence[EncodedExample], val_examples: Sequence[EncodedExample],
                pad_id: int, spec: LoraSpec, config: TrainConfig, base_name: str | None, progress: bool,
                desc: str) -> TrainResult:
    lm = peft_model.get_base_model()
    device = next(lm.parameters()).device
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.total_steps(len(train_examples))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    eval_every = config.eval_every or max(1, total_steps // 4)

    def micro_batches():
        epoch = 0
        while True:
            for group in length_grouped_batches(train_examples, config.batch_size, seed=config.seed + epoch):
                yield collate(group, pad_id).to(device)
            epoch += 1

    stream = micro_batches()
    best_val, best_step = float("inf"), 0
    best_adapter: LoraAdapter | None = None
    history: list[dict[str, float]] = []
    tokens, target_tokens, train_time = 0, 0, 0.0
    running = None
    bar = progress_bar(total=total_steps, desc=desc, unit="step", enabled=progress)
    lm.train()
    for step in range(1, total_steps + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_count = 0.0, 0
        micro = [next(stream) for _ in range(config.grad_accum)]
        denom = sum(b.num_target_tokens for b in micro)
        for batch in micro:
            loss_sum, n = target_loss(lm, batch)
            (loss_sum / max(denom, 1)).backward()
            step_loss += float(loss_sum.detach())
            step_count += n
            tokens += batch.num_tokens
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        train_time += time.perf_counter() - t0
        target_tokens += step_count
        loss_value = step_loss / max(step_count, 1)
        running = loss_value if running is None else 0.9 * running + 0.1 * loss_value
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}", tok_s=f"{tokens / max(train_time, 1e-9):.0f}")
        record = {"step": step, "train_loss": loss_value}
        if step % eval_every == 0 or step == total_steps:
            val = mean_target_loss(lm, val_examples, pad_id=pad_id) if val_examples else loss_value
            record["val_loss"] = val
            if val < best_val:
                best_val, best_step = val, step
                best_adapter = _extract_adapter(peft_model, spec, base_name)
        history.append(record)
    bar.close()
    lm.eval()
    assert best_adapter is not None
    metrics = {
        "steps": total_steps, "best_step": best_step, "best_val_loss": best_val,
        "final_train_loss": running if running is not None else float("nan"),
        "train_tokens": tokens, "target_tokens": target_tokens, "train_seconds": train_time,
        "tokens_per_second": tokens / max(train_time, 1e-9), "train_examples": len(train_examples),
    }
    return TrainResult(best_adapter, metrics, history)
