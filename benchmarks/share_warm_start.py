"""Sharing across clusters at equal total compute: no sharing vs. warm start vs. residual (``--share-mode``).

For each seed, three semantic libraries over the same tasks and K are built one after the other (interleaved per
seed): no sharing, ``share_fraction`` g with ``share_mode="warm"`` (every cluster expert starts from the shared
factors) and with ``"residual"`` (every cluster expert is a fresh LoRA trained on top of ``W + ΔW_shared``). Each
task is then scored by the mean per-token target loss of its own cluster expert on the task's held-out *test*
split (at most ``--test`` examples), applied as reuse applies it (:func:`modlora.reuse.apply.shared_part`: the residual
library's shared update merged into the weights). Every library spends ``steps_per_task · N`` optimizer steps of
``--batch-size`` examples. Writes JSON + Markdown to ``benchmarks/results/share_warm_start.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/share_warm_start.py --tasks-from benchmarks/configs/families-demo.json \\
        --k 3 --steps 8 --max-prompt-tokens 128 --max-target-tokens 32 --test 16 --max-val 4 --eval-every 1000 \\
        --seeds 0 1 2 3

(results/share_warm_start.md; add seeds to an existing result with ``--resume``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from modlora.build.multitrain import InstalledFactors, mean_target_losses
from modlora.build.strategies import BuildConfig, build_semantic_library, load_tasks
from modlora.build.training import TrainConfig
from modlora.data import PromptLimits, encode_tasks
from modlora.io import atomic_write_bytes, atomic_write_json
from modlora.library.adapters import adapter_merged
from modlora.library.store import ExpertLibrary
from modlora.models import LoadedModel, load_base_model
from modlora.reuse.apply import shared_part

ARMS = ("none", "warm", "residual")


def test_losses(lm: LoadedModel, lib: ExpertLibrary, cfg: BuildConfig, n_test: int) -> dict[str, float]:
    """Mean target loss of each task's cluster expert on the task's test split (the residual library's shared
    update merged into the weights, as reuse applies it)."""
    names, shared = shared_part(lib, None)
    experts = names or lib.expert_names()
    modules = sorted(lib.get(experts[0]).A)
    fmt = cfg.limits.formatter(lm.tokenizer)
    out: dict[str, float] = {}
    with adapter_merged(lm.model, shared) if shared is not None else contextlib.nullcontext():
        installed = InstalledFactors(lm.model, modules, [lib.get(n) for n in experts], cfg.lora)
        try:
            for row, name in enumerate(experts):
                for task_name in lib.tasks(name):
                    exs = encode_tasks(fmt, load_tasks(cfg, [task_name]), "test", max_per_task=n_test,
                                       seed=cfg.train.seed)
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
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--max-target-tokens", type=int, default=64)
    ap.add_argument("--test", type=int, default=32)
    ap.add_argument("--max-val", type=int, default=16, help="validation examples per task")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="validate every N steps (default: the library's, total/4, keeping the best checkpoint; a "
                         "large N validates only at the end, so every expert is its final weights)")
    ap.add_argument("--dtype", default=None, help="base weights dtype (default: the device's, fp32 on CPU)")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/share_warm_start"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an existing --out JSON made with the same settings and run only the "
                         "seeds it lacks (each run's command and load are listed)")
    args = ap.parse_args()
    tasks = sorted(json.loads(args.tasks_from.read_text()))
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("seeds", "out", "resume")}
    rows: list[dict] = []
    runs: list[dict] = []
    if args.resume and args.out.with_suffix(".json").is_file():
        old = json.loads(args.out.with_suffix(".json").read_text())
        if old.get("settings") != settings:
            raise SystemExit(f"{args.out}.json was made with other settings: {old.get('settings')}")
        rows, runs = old["rows"], old["runs"]
    done = {r["seed"] for r in rows}
    run = {"command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)")
           + " python benchmarks/share_warm_start.py " + " ".join(
               f"--{k.replace('_', '-')}" + ("" if v is True else f" {' '.join(map(str, v)) if isinstance(v, list) else v}")
               for k, v in vars(args).items() if k not in ("out", "data") and v is not None and v is not False),
           "loadavg_start": os.getloadavg()}
    todo = [s for s in args.seeds if s not in done]
    if todo:  # (nothing to do: only the report is written again)
        runs.append(run)
    lm = load_base_model("smollm2-135m", device="cpu", dtype=args.dtype) if todo else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in todo:
            cfg = BuildConfig(data_dir=str(args.data / "sni" / "tasks"), device="cpu", dtype=args.dtype,
                              train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                                                eval_every=args.eval_every),
                              max_examples=args.max_examples, max_val=args.max_val,
                              limits=PromptLimits(args.max_prompt_tokens, args.max_target_tokens))
            for arm in ARMS:  # interleaved per seed
                share = None if arm == "none" else args.share_fraction
                t0 = time.perf_counter()
                lib, clustering = build_semantic_library(Path(tmp) / f"s{seed}-{arm}", tasks, cfg, k=args.k,
                                                         share_fraction=share, share_mode="warm" if arm == "none"
                                                         else arm, progress=False)
                seconds = time.perf_counter() - t0
                losses = test_losses(lm, lib, cfg, args.test)  # type: ignore[arg-type]
                steps = sum(int(lib.entry(n).metrics["steps"]) for n in lib.expert_names())
                rows.append({"seed": seed, "arm": arm, "share_fraction": share or 0.0,
                             "clusters": clustering.clusters, "total_steps": steps, "build_seconds": seconds,
                             "test_loss": losses, "mean_test_loss": statistics.fmean(losses.values())})
                print(json.dumps(rows[-1]), flush=True)
                run.update(loadavg_end=os.getloadavg(), wall_seconds=time.perf_counter() - started)
                write(args, settings, tasks, rows, runs)  # after every arm: a cut-short run keeps its rows
    write(args, settings, tasks, rows, runs)


def write(args: argparse.Namespace, settings: dict, tasks: list[str], rows: list[dict], runs: list[dict]) -> None:
    """JSON + Markdown of the rows so far: per arm the mean test loss over seeds and its paired differences from
    no sharing and from warm start (same seed: same clusters, same test examples)."""
    by = {(r["seed"], r["arm"]): r["mean_test_loss"] for r in rows}
    summary = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        secs = [r["build_seconds"] for r in mine]
        summary[arm] = {"seeds": len(mine), "mean_test_loss": statistics.fmean(r["mean_test_loss"] for r in mine),
                        "median_build_seconds": statistics.median(secs), "min_build_seconds": min(secs)}
        for ref in ("none", "warm"):
            diffs = [r["mean_test_loss"] - by[r["seed"], ref] for r in mine if (r["seed"], ref) in by]
            if diffs:
                summary[arm] |= {f"diff_vs_{ref}_mean": statistics.fmean(diffs), f"diff_vs_{ref}_min": min(diffs),
                                 f"diff_vs_{ref}_max": max(diffs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), {"settings": settings, "runs": runs, "summary": summary,
                                                      "rows": rows})
    lines = [f"# Sharing across clusters: none vs. warm start vs. residual (semantic library, K = {args.k})", ""]
    for run in runs:
        load = " / ".join(f"{x:.2f}" for x in run["loadavg_start"])
        end = " / ".join(f"{x:.2f}" for x in run.get("loadavg_end", run["loadavg_start"]))
        lines += [f"`{run['command']}`", "", f"load average (1/5/15 min, 2 shared cores) {load} at the start, {end} at "
                  f"the end; wall time {run.get('wall_seconds', 0) / 60:.1f} min", ""]
    lines += [f"Test loss = mean per-token target cross-entropy of each task's cluster expert on its test split "
              f"(≤ {args.test} examples; residual: with ΔW_shared applied, as reuse applies it); lower is better. "
              f"Every library costs {args.steps} steps × {len(tasks)} tasks × batch {args.batch_size}. Δ = arm − reference "
              "(none or warm) for the same seed (same clusters, same test examples), as mean (min … max) over the seeds.", "",
              "| arm | seeds | mean test loss | Δ vs none | Δ vs warm | median build s | min build s |",
              "|---|---:|---:|---:|---:|---:|---:|"]

    def diff(s: dict, ref: str) -> str:
        if f"diff_vs_{ref}_mean" not in s:
            return "–"
        return f"{s[f'diff_vs_{ref}_mean']:+.4f} ({s[f'diff_vs_{ref}_min']:+.4f} … {s[f'diff_vs_{ref}_max']:+.4f})"

    for arm, s in summary.items():
        lines.append(f"| {arm} | {s['seeds']} | {s['mean_test_loss']:.4f} | {diff(s, 'none')} | {diff(s, 'warm')} | "
                     f"{s['median_build_seconds']:.0f} | {s['min_build_seconds']:.0f} |")
    lines += ["", "| seed | arm | total steps | mean test loss | " + " | ".join(tasks) + " |",
              "|---|---|---:|---:|" + "---:|" * len(tasks)]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['arm']} | {r['total_steps']} | {r['mean_test_loss']:.4f} | "
                     + " | ".join(f"{r['test_loss'][t]:.3f}" for t in tasks) + " |")
    atomic_write_bytes(args.out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
