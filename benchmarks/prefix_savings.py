"""Share of prompt tokens that shared-prefix training saves on the SNI tasks (no training, tokenizer only).

For every task, its training examples are encoded with the project's prompt template and cut into length-grouped
micro-batches as the trainer does; in each micro-batch the longest common token prefix ``P`` of the prompts
(:func:`modlora.build.multitrain.shared_prefix_length`) runs once instead of ``n`` times, saving ``(n-1)·P`` tokens::

    PYTHONPATH=src python benchmarks/prefix_savings.py --out benchmarks/results/prefix_savings

writes ``<out>.json`` and ``<out>.md``: the share of prompt tokens and of all tokens saved, overall and the median
over tasks, and the tokens per example (prompt + target) before and after sharing, for several batch sizes and
prompt caps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from transformers import AutoTokenizer

from modlora.build.multitrain import shared_prefix_length
from modlora.data import PromptLimits, default_sni_dir, encode_tasks, length_grouped_batches, load_sni_tasks
from modlora.models import resolve_model_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples-per-task", type=int, default=64)
    ap.add_argument("--batch-sizes", default="4,8,16")
    ap.add_argument("--max-prompt-tokens", default="128,384")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prefix_savings"))
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(args.model)[0])
    tasks = load_sni_tasks(default_sni_dir())
    rows = []
    for cap in [int(x) for x in args.max_prompt_tokens.split(",")]:
        fmt = PromptLimits(cap, 128).formatter(tokenizer)
        encoded = {n: encode_tasks(fmt, {n: t}, "train", max_per_task=args.examples_per_task)
                   for n, t in tasks.items()}
        for bs in [int(x) for x in args.batch_sizes.split(",")]:
            per_task, saved_all, prompt_all, tokens_all, examples = [], 0, 0, 0, 0
            for exs in encoded.values():
                saved = sum((len(b) - 1) * shared_prefix_length(b) for b in length_grouped_batches(exs, bs, seed=0))
                prompt = sum(len(e.prompt_ids) for e in exs)
                per_task.append(saved / prompt)
                saved_all += saved
                prompt_all += prompt
                tokens_all += sum(e.length for e in exs)
                examples += len(exs)
            rows.append({"max_prompt_tokens": cap, "batch_size": bs, "tasks": len(encoded),
                         "prompt_tokens_saved": saved_all / prompt_all, "all_tokens_saved": saved_all / tokens_all,
                         "median_task_prompt_tokens_saved": statistics.median(per_task),
                         "tokens_per_example": tokens_all / examples,
                         "computed_tokens_per_example": (tokens_all - saved_all) / examples})
    command = " ".join(["python", *sys.argv])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [f"`{command}`", "", f"{rows[0]['tasks']} SNI tasks, {args.examples_per_task} training examples each.", "",
             "| max prompt tokens | batch per expert | prompt tokens saved | median over tasks | all tokens saved "
             "| tokens per example | computed per example |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['max_prompt_tokens']} | {r['batch_size']} | {100 * r['prompt_tokens_saved']:.1f} % | "
              f"{100 * r['median_task_prompt_tokens_saved']:.1f} % | {100 * r['all_tokens_saved']:.1f} % | "
              f"{r['tokens_per_example']:.0f} | {r['computed_tokens_per_example']:.0f} |" for r in rows]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
