"""In-distribution suite: a library's own tasks, on their *test* split (never seen in training).

Per task: greedy Rouge-L and exact match, and the target loss (mean negative log-likelihood per target token) of
each instance. Per-token routers also get their routing telemetry and the routing accuracy: the share of examples
whose routing mass, summed over the prompt's tokens, is largest on the expert trained on their task — overall (mass
averaged over layers) and per layer (:func:`~modlora.evaluation.results.routing_accuracy`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from modlora.build.training import target_loss
from modlora.data import EncodedExample, PromptLimits, collate, default_sni_dir, load_sni_tasks, split_instances
from modlora.errors import DataError
from modlora.evaluation.generation import generate_and_score
from modlora.evaluation.results import (
    EvalRun,
    RoutingAccuracy,
    TaskScores,
    recording_routing,
    routing_accuracy,
    routing_telemetry,
)
from modlora.library.experts import ExpertSource
from modlora.models import LoadedModel
from modlora.reuse.apply import ReuseModel


def own_routed_expert(library: ExpertSource, names: Sequence[str]) -> dict[str, str]:
    """Each task that exactly one of the routed experts ``names`` was trained on → that expert. Tasks held by several
    (Poly/MHR skills all hold every task) have no own expert, nor do tasks held only by a ``--share`` library's
    shared expert, which is not routed."""
    holders: dict[str, list[str]] = {}
    for name in names:
        for task in library.tasks(name):
            holders.setdefault(task, []).append(name)
    return {task: held[0] for task, held in holders.items() if len(held) == 1}


def prompt_routing_accuracy(rm: ReuseModel, examples: Sequence[EncodedExample], library: ExpertSource, *,
                            batch_size: int = 8) -> RoutingAccuracy:
    """Routing accuracy of ``rm``'s router on the prompts of ``examples``: each example's own expert is
    :func:`own_routed_expert` of its task; examples of tasks without one are skipped. A per-token router's mass is
    its weights averaged over the prompt's tokens, per layer (prompts of similar length run ``batch_size`` at a
    time, right-padded; padding is not routed mass); a per-example router's (task predictor) is its weights for the
    prompt, one "layer" named ``example``."""
    if rm.routed is None:
        raise DataError(f"routing accuracy needs a routing method, not {rm.method!r}")
    names = rm.routed.expert_names
    expert_of_task = own_routed_expert(library, names)
    scored = sorted((ex for ex in examples if ex.task in expert_of_task), key=lambda ex: len(ex.prompt_ids))
    if not scored:
        raise DataError("routing accuracy: no example belongs to a task that exactly one routed expert was trained on")
    masses: dict[str, list[torch.Tensor]] = {}
    truth: list[int] = []
    pad = 0
    for start in range(0, len(scored), batch_size):
        batch = scored[start:start + batch_size]
        lengths = [len(ex.prompt_ids) for ex in batch]
        ids = torch.full((len(batch), max(lengths)), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, ex in enumerate(batch):
            ids[i, : lengths[i]] = torch.tensor(ex.prompt_ids)
            mask[i, : lengths[i]] = 1
        ids, mask = ids.to(rm.device), mask.to(rm.device)
        if rm.example_router is not None:
            with torch.inference_mode(), rm.routed.disabled():
                weights = rm.example_router(ids, mask, None, False).float().cpu()
            masses.setdefault("example", []).extend(weights)
        else:
            with torch.inference_mode(), rm.routed.record(per_token=True) as rec:
                rm.model(input_ids=ids, attention_mask=mask)
            for layer, calls in rec.weights.items():
                per_token = torch.cat(calls)                                   # (Σ lengths, E), row-major
                masses.setdefault(layer, []).extend(w.mean(0) for w in per_token.split(lengths))
        truth += [names.index(expert_of_task[ex.task]) for ex in batch]
    return routing_accuracy({layer: torch.stack(rows) for layer, rows in sorted(masses.items())}, truth)


def recorded_limits(library: ExpertSource) -> PromptLimits:
    """The prompt limits ``library``'s first expert was trained with (its training record); the defaults for a
    source that keeps no records."""
    entry = getattr(library, "entry", None)
    return PromptLimits.from_record(entry(library.expert_names()[0]).training) if entry else PromptLimits()


def evaluate_indist(rm: ReuseModel, lm: LoadedModel, library: ExpertSource, *, task_dir: str | None = None,
                    limit: int = 10, seed: int = 0, max_new_tokens: int = 64, batch_size: int = 8,
                    limits: PromptLimits | None = None, routing_examples: int | None = None) -> EvalRun:
    """Evaluate ``rm`` on the test split of every task of ``library`` (``limit`` instances each, split with
    ``seed``); ``task_dir`` holds the SNI task files (default ``<data>/sni/tasks``). Prompts are cut as ``limits``
    says (default: as the library's first expert was trained). ``routing_examples``: prompts per task for the
    routing accuracy (default ``limit``)."""
    if limit < 1:
        raise DataError(f"limit must be a positive integer, got {limit}")
    expert_of_task = {t: n for n in library.expert_names() for t in library.tasks(n)}
    if not expert_of_task:
        raise DataError("the library's experts record no training tasks: nothing to evaluate in distribution")
    tasks = load_sni_tasks(task_dir or default_sni_dir(), sorted(expert_of_task))
    limits = limits or recorded_limits(library)
    fmt = limits.formatter(lm.tokenizer)
    run = EvalRun(method=rm.method, model=lm.info.name,
                  config={"kind": "indist", "limit": limit, "seed": seed, "max_new_tokens": max_new_tokens,
                          **limits.record(),
                          "library": str(getattr(library, "path", "?"))})
    run.routing = routing_telemetry(rm)
    t_all = time.perf_counter()
    routing_prompts: list[EncodedExample] = []
    for name, task in tasks.items():
        t0 = time.perf_counter()
        insts = split_instances(task, seed=seed)["test"][:limit]
        model: Any = rm.for_task(name) if rm.example_router is not None else rm
        with recording_routing(rm, run.routing, name):
            scores, _ = generate_and_score(model, lm.tokenizer, fmt, task, insts, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size)
        losses = []
        for inst in insts:
            ex = fmt.encode(task, inst)
            batch = collate([ex], lm.tokenizer.pad_token_id).to(rm.device)
            with torch.inference_mode(), rm.per_example_routing(batch.input_ids, batch.attention_mask, [name]):
                loss, n = target_loss(rm.model, batch)
            losses.append(float(loss) / max(n, 1))
        scores["loss"] = losses
        run.tasks[name] = TaskScores.from_per_example(scores, wall_s=time.perf_counter() - t0)
        routing_prompts += [fmt.encode(task, inst) for inst in insts[: routing_examples or limit]]
    if run.routing is not None and rm.routed is not None and own_routed_expert(library, rm.routed.expert_names):
        run.routing.accuracy = prompt_routing_accuracy(rm, routing_prompts, library)
    run.wall_s = time.perf_counter() - t_all
    return run

