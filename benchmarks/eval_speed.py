"""Rank-classification scoring speed: tokens/s of ``score_choices`` on a seeded subset of a benchmark.

Times prefix-reuse scoring (the default) against naive per-option full-sequence scoring, for each dtype given,
on the embedded model (or ``--model``); the accuracies are printed next to the timings so that a faster path that
changes the scores would show. Tokens = context tokens once per example + every option's continuation tokens.

    python benchmarks/eval_speed.py --task hellaswag --limit 64 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from modlora.data import default_data_dir
from modlora.evaluation.rank_classification import (
    CHOICE_TASKS,
    _tokenize_options,
    choice_correctness,
    load_choice_task,
    score_choices,
)
from modlora.evaluation.results import mean_and_stderr
from modlora.models import DEFAULT_MODEL, load_base_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--task", default="hellaswag", choices=sorted(CHOICE_TASKS))
    ap.add_argument("--limit", type=int, default=64, help="examples (a fixed seeded subset)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    ap.add_argument("--no-naive", action="store_true", help="skip the per-option full-sequence baseline")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/eval_speed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    filename, delimiter = CHOICE_TASKS[args.task]
    examples = load_choice_task(default_data_dir() / "eval" / filename, delimiter, limit=args.limit, seed=0)
    rows = []
    for dt in args.dtypes.split(","):
        lm = load_base_model(args.model, dtype=dt)
        opts = _tokenize_options(lm.tokenizer, examples, False)
        tokens = sum(len(o[0].ctx_ids) + sum(len(x.cont_ids) for x in o) for o in opts)
        modes = [("prefix reuse", True)] + ([] if args.no_naive else [("full sequences", False)])
        for label, reuse in modes:
            t0 = time.perf_counter()
            scores = score_choices(lm.model, lm.tokenizer, examples, batch_size=args.batch_size, prefix_reuse=reuse)
            wall = time.perf_counter() - t0
            acc = choice_correctness(examples, scores)
            row = {"dtype": dt, "mode": label, "examples": len(examples), "tokens": tokens, "seconds": wall,
                   "tokens_per_s": tokens / wall, "acc": mean_and_stderr(acc["acc"])[0],
                   "acc_norm": mean_and_stderr(acc["acc_norm"])[0]}
            rows.append(row)
            print(f"{dt:>9} {label:>15}: {wall:6.1f} s  {row['tokens_per_s']:6.0f} tok/s  acc {row['acc']:.3f}  "
                  f"acc_norm {row['acc_norm']:.3f}", flush=True)
        del lm
    meta = {"model": args.model, "task": args.task, "limit": args.limit, "batch_size": args.batch_size,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "loadavg_after": os.getloadavg()[0]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Rank-classification scoring speed ({args.task}, {len(examples)} examples, batch {args.batch_size}, "
             f"{meta['threads']} threads)", "", "`python benchmarks/eval_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
             "| dtype | scoring | seconds | tokens/s | acc | acc_norm |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['mode']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {100 * r['acc']:.1f} | "
              f"{100 * r['acc_norm']:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
