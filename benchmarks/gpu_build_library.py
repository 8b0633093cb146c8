"""Build a 256-task private library on the embedded model in one run on a GPU; report tokens/s and wall time.

All experts train together (:func:`modlora.build.strategies.build_private_library` with ``experts_per_job`` experts per
job, default all 256): bf16 frozen base, fp32 LoRA factors and optimizer state, mixed batches of many experts with
per-example factors (a gather + two ``bmm`` per adapted layer: no per-expert kernel launches), shared-prefix KV
reuse, ``max_tokens_per_forward`` tokens per forward::

    PYTHONPATH=src python benchmarks/gpu_build_library.py --out benchmarks/results/gpu_build_library_h100

writes ``<out>.json`` (settings, wall time, tokens/s, examples/s, per-expert steps and losses) and ``<out>.log``
(the printed summary). ``--tasks N`` builds the first N tasks only (a quick check).

The ratio to today's one-at-a-time path: ``--one-at-a-time N`` (default 8) also trains the first N experts one after
the other with :func:`modlora.build.training.train_expert` (PEFT layers, same steps, batch and caps), half before and half
after the all-together build (A/B/A), and reports examples/s of both and their ratio (the target is ≥ 10×).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from modlora.build.strategies import BuildConfig, build_private_library, load_tasks
from modlora.build.training import TrainConfig, train_expert
from modlora.data import PromptLimits, default_sni_dir, encode_tasks, sni_task_files
from modlora.models import load_base_model


def one_at_a_time(cfg: BuildConfig, tasks: list[str]) -> tuple[int, float]:
    """Examples trained and seconds taken by training ``tasks``' experts one after the other (today's path)."""
    if not tasks:
        return 0, 0.0
    lm = load_base_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    fmt = cfg.limits.formatter(lm.tokenizer)
    data = load_tasks(cfg, tasks)
    encoded = {n: encode_tasks(fmt, {n: data[n]}, "train") for n in tasks}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for name in tasks:
        train_expert(lm.model, encoded[name], pad_id=lm.tokenizer.pad_token_id, spec=cfg.lora, config=cfg.train,
                     progress=False, desc=name)
    torch.cuda.synchronize()
    return len(tasks) * cfg.train.steps * cfg.train.batch_size, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per expert")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--experts-per-job", type=int, default=256)
    ap.add_argument("--max-tokens-per-forward", type=int, default=16384)
    ap.add_argument("--max-prompt-tokens", type=int, default=384)
    ap.add_argument("--max-target-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-shared-prefix", action="store_true")
    ap.add_argument("--one-at-a-time", type=int, default=8, metavar="N",
                    help="also train the first N experts one at a time (half before, half after) for the ratio")
    ap.add_argument("--library", type=Path, default=None, help="where to build (default: a temporary directory)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_build_library"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine")
    tasks = sorted(sni_task_files(default_sni_dir()))[: args.tasks]
    cfg = BuildConfig(model=args.model, device="cuda", dtype=args.dtype,
                      train=TrainConfig(steps=args.steps, batch_size=args.batch_size), limits=PromptLimits(args.max_prompt_tokens, args.max_target_tokens), experts_per_job=args.experts_per_job,
                      max_tokens_per_forward=args.max_tokens_per_forward, shared_prefix=not args.no_shared_prefix)
    reference = tasks[: args.one_at_a_time]
    alone = [one_at_a_time(cfg, reference[: len(reference) // 2])]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.library or Path(tmp) / "private"
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        lib = build_private_library(path, tasks, cfg, progress=True)
        wall = time.perf_counter() - t0
        metrics = {n: lib.entry(n).metrics for n in lib.expert_names()}
    alone.append(one_at_a_time(cfg, reference[len(reference) // 2:]))
    alone_examples, alone_seconds = sum(a[0] for a in alone), sum(a[1] for a in alone)
    tokens = sum(m["train_tokens"] for m in metrics.values())
    examples = sum(m["steps"] * args.batch_size for m in metrics.values())
    result = {"command": " ".join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(), "tasks": len(tasks),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "library")},
              "wall_seconds": wall, "train_tokens": tokens, "tokens_per_second": tokens / wall,
              "examples_per_second": examples / wall,
              "one_at_a_time": {"experts": len(reference), "examples": alone_examples, "seconds": alone_seconds,
                                "examples_per_second": alone_examples / max(alone_seconds, 1e-9)},
              "together_vs_one_at_a_time": (examples / wall) / max(alone_examples / max(alone_seconds, 1e-9), 1e-9),
              "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
              "experts": {n: {"steps": m["steps"], "final_train_loss": m["final_train_loss"],
                              "best_val_loss": m["best_val_loss"]} for n, m in metrics.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = (f"{result['command']}\n{result['gpu']}: {len(tasks)} experts × {args.steps} steps × batch "
               f"{args.batch_size} in {wall:.0f} s; {result['tokens_per_second']:.0f} tokens/s, "
               f"{result['examples_per_second']:.1f} examples/s, peak {result['peak_gpu_memory_gb']:.1f} GiB\n"
               f"one at a time ({len(reference)} experts, train_expert): "
               f"{result['one_at_a_time']['examples_per_second']:.2f} examples/s; together / one at a time = "
               f"{result['together_vs_one_at_a_time']:.1f}×\n")
    Path(f"{args.out}.log").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
