"""Token counts that size a study config, without loading the model (tokenizer only): how many tokens each library's
build and each result row's evaluation process, so wall time = tokens / a measured throughput.

    python benchmarks/study_cost.py benchmarks/configs/cpu-medium-2.json --families \
        benchmarks/configs/families-cpu-medium.json

Training, per library (the build rules of :mod:`modlora.build.strategies`, ``mbc_reuses_private``: MBC's stage 1 is the
private library, so only stage 2 is trained; MBC / semantic clusters are taken to be the families, random clusters
a seeded random partition with the same sizes; Poly/MHR train like the shared expert): each expert's micro-batches
come from :func:`modlora.build.multitrain.micro_batch_stream` (the trainer's own stream) over the prompts of
:class:`modlora.data.PromptFormatter` (the config's caps), and

* ``counted`` = Σ real tokens of the examples (what the trainer reports as ``train_tokens``);
* ``computed`` = what the forwards run with shared prefixes: per step, the active experts' micro-batches packed by
  :func:`modlora.build.multitrain.pack_forwards`, a forward of parts F costing ``|F|·max P + Σ_F n_p · max w`` padded
  tokens (prefix pass + suffix pass; ``P`` a part's common prefix, ``w`` its widest suffix);
* ``validation``: the ``max_val`` validation examples of each of an expert's tasks, scored every ``total // 4``
  steps and at the end (:func:`validations`), forward only.

Evaluation, per example: the capped prompt + ``max_new_tokens`` (held-out SNI: the first ``heldout_limit`` of each
held-out task; in distribution: ``indist_limit`` of each training task's test split).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer

from modlora.build.multitrain import micro_batch_stream, pack_forwards, shared_prefix_length
from modlora.build.training import TrainConfig
from modlora.data import (
    EncodedExample,
    default_data_dir,
    encode_tasks,
    load_sni_tasks,
    sni_task_files,
    split_instances,
)
from modlora.models import resolve_model_source
from modlora.study.config import StudyConfig


def validations(total_steps: int) -> int:
    """How often the trainer scores an expert's validation set: every ``max(1, total // 4)`` steps and at the end."""
    every = max(1, total_steps // 4)
    return sum(1 for step in range(1, total_steps + 1) if step % every == 0 or step == total_steps)


def forward_cost(forward: Sequence[tuple[int, list[EncodedExample]]]) -> int:
    """Padded tokens of one shared-prefix forward: ``|F|·max P + Σ_F n_p · max w``."""
    prefixes = [shared_prefix_length(exs) for _, exs in forward]
    widths = [max(e.length for e in exs) - p for (_, exs), p in zip(forward, prefixes, strict=True)]
    return len(forward) * max(prefixes) + sum(len(exs) for _, exs in forward) * max(widths)


def library_cost(experts: Sequence[tuple[tuple[str, ...], int]], train: dict[str, list[EncodedExample]],
                 val: dict[str, list[EncodedExample]], cfg: StudyConfig, per_job: int = 8) -> dict[str, int]:
    """Counted, computed and validation tokens of training ``experts`` ((tasks, steps) each) ``per_job`` at a time."""
    counted = computed = validation = 0
    for start in range(0, len(experts), per_job):
        chunk = experts[start:start + per_job]
        streams = [micro_batch_stream([e for t in tasks for e in train[t]],
                                      TrainConfig(steps=steps, batch_size=cfg.batch_size, seed=cfg.seed))
                   for tasks, steps in chunk]
        for step in range(max(steps for _, steps in chunk)):
            parts = [(row, next(stream)) for row, (stream, (_, steps)) in enumerate(zip(streams, chunk, strict=True))
                     if step < steps]
            counted += sum(e.length for _, exs in parts for e in exs)
            computed += sum(forward_cost(f) for f in pack_forwards(parts, 1024, shared_prefix=True))
        validation += sum(validations(steps) * e.length for tasks, steps in chunk for t in tasks for e in val[t])
    return {"counted": counted, "computed": computed, "validation": validation}


def planned_experts(cfg: StudyConfig, families: dict[str, list[str]]) -> dict[str, list[tuple[tuple[str, ...], int]]]:
    """(tasks, optimizer steps) of every expert each library of ``cfg`` trains (MBC: stage 2 only)."""
    s, tasks = cfg.steps_per_task, tuple(cfg.train_tasks)
    clusters = [tuple(ts) for ts in families.values()]
    shuffled = list(tasks)
    random.Random(cfg.seed + 1).shuffle(shuffled)
    sizes = [len(c) for c in clusters]
    rnd = [tuple(shuffled[sum(sizes[:i]):sum(sizes[:i + 1])]) for i in range(len(sizes))]
    stage2 = 1.0 - cfg.stage1_fraction
    plans = {
        "private": [((t,), s) for t in tasks],
        "mbc": [(c, max(1, round(s * stage2 * len(c)))) for c in clusters],
        "mbc-params": [(c, max(1, round(s * stage2 * len(c)))) for c in clusters],
        "random": [(c, s * len(c)) for c in rnd],
        "shared": [(tasks, s * len(tasks))],
        "semantic": [(c, s * len(c)) for c in clusters],
        "poly": [(tasks, s * len(tasks))],
        "mhr": [(tasks, s * len(tasks))],
        "mbc-share": [(tasks, round(s * cfg.share_fraction * len(tasks)))]
        + [(c, max(1, round(s * (stage2 - cfg.share_fraction) * len(c)))) for c in clusters],
    }
    return {name: plans[name] for name in cfg.libraries}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--families", type=Path, required=True, help="task → family JSON (the assumed clusters)")
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args()
    cfg = StudyConfig.from_json(args.config)
    data = default_data_dir(args.data)
    families: dict[str, list[str]] = {}
    for task, family in json.loads(args.families.read_text()).items():
        families.setdefault(family, []).append(task)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(cfg.model)[0])
    fmt = cfg.limits.formatter(tokenizer)
    tasks = load_sni_tasks(data / "sni" / "tasks", cfg.train_tasks)
    train = {t: encode_tasks(fmt, {t: task}, "train", seed=cfg.seed) for t, task in tasks.items()}
    val = {t: encode_tasks(fmt, {t: task}, "validation", max_per_task=cfg.max_val, seed=cfg.seed)
           for t, task in tasks.items()}
    capped = sum(len(e.prompt_ids) == cfg.max_prompt_tokens for ex in train.values() for e in ex)
    print(f"{args.config}: {len(tasks)} tasks, {cfg.steps_per_task} steps × batch {cfg.batch_size}, prompts ≤ "
          f"{cfg.max_prompt_tokens} ({100 * capped / sum(map(len, train.values())):.0f}% of training prompts cut)")
    print("| library | experts | counted tokens | computed tokens | computed / counted | validation tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, experts in planned_experts(cfg, families).items():
        c = library_cost(experts, train, val, cfg)
        print(f"| {name} | {len(experts)} | {c['counted'] / 1000:.0f}k | {c['computed'] / 1000:.0f}k | "
              f"{c['computed'] / c['counted']:.2f} | {c['validation'] / 1000:.0f}k |")
    heldout_dir = data / "sni" / "heldout"
    heldout = load_sni_tasks(heldout_dir, cfg.heldout_tasks or sorted(sni_task_files(heldout_dir)))
    per_example = [len(fmt.encode(t, i).prompt_ids) + cfg.max_new_tokens
                   for t in heldout.values() for i in t.instances[: cfg.heldout_limit]]
    indist = [len(fmt.encode(t, i).prompt_ids) + cfg.max_new_tokens
              for t in tasks.values() for i in split_instances(t, seed=cfg.seed)["test"][: cfg.indist_limit]]
    print(f"evaluation per row: held-out {len(per_example)} examples, {sum(per_example) / 1000:.1f}k tokens; "
          f"in distribution {len(indist)} examples, {sum(indist) / 1000:.1f}k tokens (capped prompt + "
          f"{cfg.max_new_tokens} new tokens each)")


if __name__ == "__main__":
    main()
