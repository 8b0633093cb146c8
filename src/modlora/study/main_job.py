"""``modlora demo``: the main job — a small but real run of the whole pipeline on the embedded default.

On SmolLM2-135M-Instruct with six SNI training tasks from three families (arithmetic, grammaticality, sentiment
style transfer): build a private library (one expert per task, EVA-initialised, bf16), cluster it with MBC (K = 3)
and train the cluster experts, compute Arrow prototypes, then evaluate base vs μ vs Arrow and Arrow on centred
inputs (and the oracle in distribution) on the training tasks' test split, with routing accuracy, and on eight
held-out tasks: four related to the training tasks, four not. It ends with a table a newcomer can read: how often
each router sends a prompt to its own expert (against chance) and each paired difference with what it decides.
Re-running reuses what exists (libraries and finished result rows), so an interrupted demo resumes. Budget: 16
steps × batch 8 per expert, the largest measured to fit the 10-minute target with room to spare: on 2 idle cores
(``modlora demo --steps N``, the model cached, 2026-12-07) 453 s of wall time at 16 steps and 561 s at 24 (39 s
short of the target, less than the first run's model conversion and the spread between runs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from modlora.io import atomic_write_json
from modlora.models import DEFAULT_MODEL
from modlora.reuse.methods.arrow import ArrowOptions
from modlora.study.config import StudyConfig
from modlora.study.run import run_study
from modlora.study.stats import PairedDifference, heldout_group_tasks, paired_difference
from modlora.tables import print_split_table

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
DEMO_HELDOUT_GROUPS = {
    # related: pool tasks of a demo task's SNI category (arithmetic, grammaticality / text quality) that no demo
    # library trains on; unrelated: SNI test tasks of other kinds
    "task090_equation_learner_algebra": "related", "task092_check_prime_classification": "related",
    "task089_swap_words_verification": "related", "task1283_hrngo_quality_classification": "related",
    "task642_esnli_classification": "unrelated", "task1152_bard_analogical_reasoning_causation": "unrelated",
    "task1157_bard_analogical_reasoning_rooms_for_containers": "unrelated",
    "task670_ambigqa_question_generation": "unrelated",
}
DEMO_STEPS = 16
"""Training steps per expert (batch 8): the largest budget measured to fit the demo in 10 minutes on 2 idle cores."""
DEMO_INIT = "eva"
"""The demo's initialisation of A: EVA, the one that lets Arrow route (docs/study.md, "Where Arrow starts to
route")."""


def demo_config(model: str = DEFAULT_MODEL, tasks: Sequence[str] | None = None, steps: int | None = None
                ) -> StudyConfig:
    """The demo preset: 6 tasks × 16 steps (batch 8, bf16, EVA init), MBC K=3, 8 held-out tasks (4 related to the
    training tasks, 4 not) × 4 examples, 4 test examples per training task. Arrow and Arrow on centred inputs route
    top-k over the private experts, k = Arrow's default (4; at most the number of tasks); Arrow routes top-K over the
    K cluster experts (K < 4)."""
    train = list(tasks or DEMO_TASKS)
    k = 3 if len(train) > 3 else 2
    top_k = min(ArrowOptions.top_k, len(train))
    rows = [["-", "base"], ["private", "mu"], ["private", "arrow", {"top_k": top_k}],
            ["private", "arrow-centred", {"top_k": top_k}], ["private", "oracle"],
            ["mbc", "mu"], ["mbc", "arrow", {"top_k": min(top_k, k)}]]
    return StudyConfig(name="demo", model=model, dtype="bfloat16", train_tasks=train, steps_per_task=steps or DEMO_STEPS,
                       batch_size=8, lr=1e-3, max_prompt_tokens=256, max_target_tokens=48, max_val=6,
                       libraries=["private", "mbc"], k=k, rows=rows, heldout_tasks=list(DEMO_HELDOUT_GROUPS),
                       heldout_limit=4, indist_limit=4, max_new_tokens=20, examples_per_expert=8, init=DEMO_INIT)


def _cell(d: PairedDifference | None) -> str:
    """``+1.2 ± 3.4`` (Rouge-L points), with ``*`` when the difference is more than 2 s.e. from 0."""
    if d is None:
        return "-"
    decided = not math.isnan(d.z) and abs(d.z) > 2
    return f"{100 * d.mean:+.1f} ± {100 * d.stderr:.1f}{' *' if decided else ''}"


def summary_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The newcomer's table, one column per Arrow row: how often it routes a test prompt to its own expert (top-1,
    against chance), its in-distribution Rouge-L against μ and (private library) the oracle, and its held-out
    Rouge-L against the base model and μ per group of held-out tasks (paired across tasks)."""
    routed = [k for k in results["rows"] if k.partition("/")[2].startswith("arrow")]
    groups = heldout_group_tasks(results)
    headers = ["", *(k.split("[")[0].replace("/", " ") for k in routed)]
    rows: list[list[str]] = [["own expert top-1 (chance)"], ["in-dist − μ"], ["in-dist − oracle"]]
    rows += [[f"held-out {g} − {ref}"] for g in groups for ref in ("base", "μ")]
    for key in routed:
        row = results["rows"][key]
        acc, mu = row.get("routing_accuracy") or {}, f"{row.get('library')}/mu"
        rows[0].append(f"{100 * acc['overall']:.0f} % ({100 / acc['experts']:.0f} %)" if acc.get("experts") else "-")
        rows[1].append(_cell(paired_difference(results, key, mu, "indist")))
        rows[2].append(_cell(paired_difference(results, key, "private/oracle", "indist"))
                       if row.get("library") == "private" else "-")
        cells = [_cell(paired_difference(results, key, ref, tasks=t)) for t in groups.values() for ref in ("base", mu)]
        for r, cell in zip(rows[3:], cells, strict=True):
            r.append(cell)
    return headers, rows


def run_demo(out_dir: Path = Path("runs/demo"), *, model: str = DEFAULT_MODEL, data: Path | None = None,
             tasks: Sequence[str] | None = None, steps: int | None = None, device: str | None = None) -> int:
    console = Console()
    console.rule("modlora demo")
    cfg = demo_config(model, tasks, steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "heldout_groups.json", DEMO_HELDOUT_GROUPS)
    cfg = dataclasses.replace(cfg, heldout_groups=str(out_dir / "heldout_groups.json"))
    families = {t: f for t, f in DEMO_FAMILIES.items() if t in cfg.train_tasks}
    if len(set(families.values())) > 1 and len(families) == len(cfg.train_tasks):
        atomic_write_json(out_dir / "families.json", families)   # the study's clustered-libraries table scores it
        cfg = dataclasses.replace(cfg, task_families=str(out_dir / "families.json"))
    data_dir = data.parent.parent if data is not None and data.name == "tasks" else data
    results = run_study(cfg, out_dir, device=device, data_dir=data_dir, console=console)
    console.print(f"libraries: {', '.join(v['path'] for v in results['libraries'].values())}")
    mbc = results.get("partitions", {}).get("mbc")
    if mbc and mbc.get("ari") is not None:
        console.print(f"MBC clusters vs the known task families: adjusted Rand index {mbc['ari']:.2f}, purity "
                      f"{mbc['purity']:.2f} (K = {mbc['k']})")
    headers, rows = summary_table(results)
    print_split_table(console, "what this run shows (Rouge-L points, paired across tasks, mean ± s.e.)", headers,
                      rows, right=headers[1:])
    groups = heldout_group_tasks(results)
    console.print(f"held-out tasks: {', '.join(f'{len(t)} {g}' for g, t in groups.items())} (related: the SNI category "
                  "of a training task). * more than 2 s.e. from 0; anything else decides nothing at this scale (a few "
                  "examples per task): docs/study.md makes the same comparisons on 83 held-out tasks.")
    console.print(f"results: {out_dir / 'results.json'} and {out_dir / 'results.md'}; clusters plot: "
                  f"{out_dir / 'mbc_clusters.png'}  (wall time {results['wall_seconds']:.0f} s)")
    return 0

