"""``modlora demo``: the main job — a small but real run of the whole pipeline on the embedded default.

On SmolLM2-135M-Instruct with six SNI training tasks from three families (arithmetic, grammaticality, sentiment
style transfer): build a private library (one expert per task), cluster it with MBC (K = 3) and train the cluster
experts, compute Arrow prototypes, then evaluate base vs μ vs Arrow (and the oracle in distribution) on held-out SNI
tasks and on the training tasks' test split, with routing accuracy. Re-running reuses what exists (libraries and
finished result rows), so an interrupted demo resumes. Sized for ≤ 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from modlora.io import atomic_write_json
from modlora.models import DEFAULT_MODEL
from modlora.study import StudyConfig, paired_difference, run_study

DEMO_TASKS = (
    "task085_unnatural_addsub_arithmetic",
    "task087_new_operator_addsub_arithmetic",
    "task1346_glue_cola_grammatical_correctness_classification",
    "task616_cola_classification",
    "task927_yelp_negative_to_positive_style_transfer",
    "task928_yelp_positive_to_negative_style_transfer",
)
DEMO_FAMILIES = {  # the known task families the demo's MBC clustering is scored against (adjusted Rand index)
    "task085_unnatural_addsub_arithmetic": "arithmetic", "task087_new_operator_addsub_arithmetic": "arithmetic",
    "task1346_glue_cola_grammatical_correctness_classification": "grammaticality",
    "task616_cola_classification": "grammaticality",
    "task927_yelp_negative_to_positive_style_transfer": "sentiment style transfer",
    "task928_yelp_positive_to_negative_style_transfer": "sentiment style transfer",
}
DEMO_HELDOUT = (
    "task642_esnli_classification", "task1152_bard_analogical_reasoning_causation",
    "task1157_bard_analogical_reasoning_rooms_for_containers", "task670_ambigqa_question_generation",
)


def demo_config(model: str = DEFAULT_MODEL, tasks: Sequence[str] | None = None, steps: int | None = None
                ) -> StudyConfig:
    """The demo preset: 6 tasks × 8 steps (batch 8), MBC K=3, 4 held-out tasks × 4 examples, 3 test examples per
    training task. Arrow routes top-4 over the private experts and top-K over the K cluster experts (K < 4)."""
    train = list(tasks or DEMO_TASKS)
    k = 3 if len(train) > 3 else 2
    top_k = min(4, len(train))
    rows = [["-", "base"], ["private", "mu"], ["private", "arrow", {"top_k": top_k}], ["private", "oracle"],
            ["mbc", "mu"], ["mbc", "arrow", {"top_k": min(top_k, k)}]]
    return StudyConfig(name="demo", model=model, train_tasks=train, steps_per_task=steps or 8, batch_size=8, lr=1e-3,
                       max_prompt_tokens=256, max_target_tokens=48, max_val=6, libraries=["private", "mbc"], k=k,
                       rows=rows, heldout_tasks=list(DEMO_HELDOUT), heldout_limit=4, indist_limit=3,
                       max_new_tokens=20)


def heldout_summary(results: Mapping[str, Any]) -> str:
    """One line: private Arrow against the base model and against μ on held-out SNI Rouge-L, as paired differences
    across the held-out tasks (mean ± s.e.; the comparison docs/study.md makes at scale)."""
    arrow = next((k for k in results["rows"] if k.startswith("private/arrow")), "private/arrow")
    vs_base, vs_mu = (paired_difference(results, arrow, ref) for ref in ("base", "private/mu"))
    if vs_base is None or vs_mu is None:
        return "held-out SNI Rouge-L: fewer than two held-out tasks scored, no paired comparison"
    return (f"held-out SNI Rouge-L, private Arrow, paired over {vs_base.n} tasks: {vs_base.cell()} vs base, "
            f"{vs_mu.cell()} vs μ (demo scale: a few examples per task; a difference under 2 s.e. decides nothing)")


def run_demo(out_dir: Path = Path("runs/demo"), *, model: str = DEFAULT_MODEL, data: Path | None = None,
             tasks: Sequence[str] | None = None, steps: int | None = None, device: str | None = None) -> int:
    console = Console()
    console.rule("modlora demo")
    cfg = demo_config(model, tasks, steps)
    families = {t: f for t, f in DEMO_FAMILIES.items() if t in cfg.train_tasks}
    if len(set(families.values())) > 1 and len(families) == len(cfg.train_tasks):
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "families.json", families)   # the study's clustered-libraries table scores it
        cfg = dataclasses.replace(cfg, task_families=str(out_dir / "families.json"))
    data_dir = data.parent.parent if data is not None and data.name == "tasks" else data
    results = run_study(cfg, out_dir, device=device, data_dir=data_dir, console=console)
    console.print(f"libraries: {', '.join(v['path'] for v in results['libraries'].values())}")
    mbc = results.get("partitions", {}).get("mbc")
    if mbc and mbc.get("ari") is not None:
        console.print(f"MBC clusters vs the known task families: adjusted Rand index {mbc['ari']:.2f}, purity "
                      f"{mbc['purity']:.2f} (K = {mbc['k']})")
    console.print(heldout_summary(results))
    console.print(f"results: {out_dir / 'results.json'} and {out_dir / 'results.md'}; clusters plot: "
                  f"{out_dir / 'mbc_clusters.png'}  (wall time {results['wall_seconds']:.0f} s)")
    return 0
