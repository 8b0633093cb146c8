"""Sharing across clusters: warm start from a shared expert (``--share``) vs. no sharing, at equal total compute.

For each seed, two semantic libraries over the same tasks and K are built (``share_fraction`` 0 and g); each task is
then scored by the mean per-token target loss of its own cluster expert on the task's *test* split (at most
``--test`` examples). Both libraries spend ``steps_per_task · N`` optimizer steps in total. Writes JSON + Markdown
to ``benchmarks/results/share_warm_start.{json,md}``.

    python benchmarks/share_warm_start.py --tasks-from benchmarks/configs/families-demo.json --k 3 --steps 16

Not run to completion yet: on the shared 2-core CPU machine one build of the six demo tasks at 16 steps per task
had stored no expert after 18 minutes, so the comparison needs a GPU or a quieter machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from modlora.building import BuildConfig, build_semantic_library, load_tasks
from modlora.data import PromptFormatter, encode_tasks
from modlora.io import atomic_write_bytes, atomic_write_json
from modlora.library import ExpertLibrary
from modlora.models import LoadedModel, load_base_model
from modlora.multitrain import InstalledFactors, mean_target_losses
from modlora.training import TrainConfig


def test_losses(lm: LoadedModel, lib: ExpertLibrary, cfg: BuildConfig, n_test: int) -> dict[str, float]:
    """Mean target loss of each task's cluster expert on the task's test split."""
    experts = [n for n in lib.expert_names() if n != "shared"]
    modules = sorted(lib.get(experts[0]).A)
    installed = InstalledFactors(lm.model, modules, [lib.get(n) for n in experts], cfg.lora)
    fmt = PromptFormatter(lm.tokenizer, max_prompt_tokens=cfg.max_prompt_tokens,
                          max_target_tokens=cfg.max_target_tokens)
    out: dict[str, float] = {}
    try:
        for row, name in enumerate(experts):
            for task_name in lib.tasks(name):
                task = load_tasks(cfg, [task_name])
                exs = encode_tasks(fmt, task, "test", max_per_task=n_test, seed=cfg.train.seed)
                out[task_name] = mean_target_losses(lm.model, installed.slot, {row: exs},
                                                    pad_id=lm.tokenizer.pad_token_id)[row]
    finally:
        installed.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks-from", type=Path, required=True, help="JSON {task: family} (its keys are the tasks)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="steps per task")
    ap.add_argument("--share-fraction", type=float, default=0.25)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-examples", type=int, default=128)
    ap.add_argument("--test", type=int, default=32)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/share_warm_start"))
    args = ap.parse_args()
    tasks = sorted(json.loads(args.tasks_from.read_text()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = BuildConfig(data_dir=str(args.data / "sni" / "tasks"), device="cpu",
                              train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed),
                              max_examples=args.max_examples, max_val=16, max_prompt_tokens=256, max_target_tokens=64)
            lm = load_base_model(cfg.model, device="cpu")
            for share in (None, args.share_fraction):  # interleaved per seed
                t0 = time.perf_counter()
                lib, clustering = build_semantic_library(Path(tmp) / f"s{seed}-{share}", tasks, cfg, k=args.k,
                                                         share_fraction=share, progress=False)
                seconds = time.perf_counter() - t0
                losses = test_losses(lm, lib, cfg, args.test)
                steps = sum(int(lib.entry(n).metrics["steps"]) for n in lib.expert_names())
                rows.append({"seed": seed, "share_fraction": share or 0.0, "clusters": clustering.clusters,
                             "total_steps": steps, "build_seconds": seconds, "test_loss": losses,
                             "mean_test_loss": statistics.fmean(losses.values())})
                print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python benchmarks/share_warm_start.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("out", "data")), "loadavg": os.getloadavg(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    lines = [f"# Warm start from a shared expert vs. no sharing (semantic library, K = {args.k})", "",
             f"`{result['command']}` — load average {result['loadavg'][0]:.2f}; test loss = mean per-token target "
             f"cross-entropy of each task's cluster expert on its test split (≤ {args.test} examples); lower is "
             "better.", "",
             "| seed | share fraction | total steps | mean test loss | " + " | ".join(tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['share_fraction']:g} | {r['total_steps']} | {r['mean_test_loss']:.4f} | "
                     + " | ".join(f"{r['test_loss'][t]:.3f}" for t in tasks) + " |")
    atomic_write_bytes(args.out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
