"""``modlora demo``: the main job on the embedded default model and data.

Trains small private experts (one per task) for a handful of SNI tasks on SmolLM2-135M-Instruct into
``<out>/library`` and shows the library. Re-running skips experts that are already in the library.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from modlora.adapters import LoraSpec
from modlora.data import default_sni_dir, load_sni_tasks
from modlora.library import ExpertLibrary
from modlora.models import DEFAULT_MODEL, load_base_model
from modlora.pipeline import train_task_expert
from modlora.training import TrainConfig

DEMO_TASKS = (
    "task085_unnatural_addsub_arithmetic",
    "task1346_glue_cola_grammatical_correctness_classification",
    "task927_yelp_negative_to_positive_style_transfer",
    "task1336_peixian_equity_evaluation_corpus_gender_classifier",
)
DEMO_STEPS = 30
DEMO_BATCH = 8
DEMO_LR = 1e-3  # short budgets need a larger step than the paper's 1e-4 to move at all


def run_demo(out_dir: Path = Path("runs/demo"), *, model: str = DEFAULT_MODEL, data: Path | None = None,
             tasks: Sequence[str] | None = None, steps: int | None = None, device: str | None = None) -> int:
    console = Console()
    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = list(tasks or DEMO_TASKS)
    console.rule("modlora demo")
    console.print(f"base model: {model}; tasks: {len(names)}; output: {out_dir}")
    lm = load_base_model(model, device=device)
    console.print(f"loaded {lm.info.name} from {lm.source} ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.0f}M "
                  f"parameters, {next(lm.model.parameters()).dtype}, {next(lm.model.parameters()).device})")
    task_data = load_sni_tasks(data or default_sni_dir(), names)
    lib = ExpertLibrary.open_or_create(out_dir / "library", lm.info)
    spec = LoraSpec()
    config = TrainConfig(steps=steps or DEMO_STEPS, batch_size=DEMO_BATCH, lr=DEMO_LR, seed=0)
    for name in names:
        if name in lib:
            console.print(f"[dim]expert {name} already in the library: skipped[/]")
            continue
        entry = train_task_expert(lm, lib, name, {name: task_data[name]}, spec=spec, config=config,
                                  max_val=16, max_prompt_tokens=256, max_target_tokens=64)
        m = entry.metrics
        console.print(f"expert [bold]{name}[/]: val loss {m['best_val_loss']:.3f} (step {m['best_step']}), "
                      f"{m['train_tokens']} tokens in {m['train_seconds']:.0f} s = {m['tokens_per_second']:.0f} tok/s")
    from modlora.cli import show_library
    show_library(out_dir / "library")
    console.print(f"library: {out_dir / 'library'}  (wall time {time.perf_counter() - start:.0f} s)")
    return 0
