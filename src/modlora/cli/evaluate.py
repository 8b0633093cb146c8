"""Evaluation commands: ``eval`` (a suite on the base model or a library + method) and ``report``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from modlora.cli.common import (
    LOCATION_HELP,
    UsageError,
    add_data_arg,
    add_library_arg,
    add_method_args,
    add_model_args,
    console,
    data_root,
    directory_name,
    input_file,
    load_model,
    method_options,
    open_library,
    output_directory,
    output_file,
    positive_int,
)
from modlora.reuse.methods import Registry

SUITES = ("choice", "sni", "code", "indist")


def _print_task_done(task: str, scores: Any) -> None:
    """``on_task_done`` callback: print each task's scores as soon as it is done."""
    from modlora.evaluation.results import format_metrics
    console.print(f"{task}: {format_metrics(scores)}  (n={scores.n}, {scores.wall_s:.0f} s)", highlight=False)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from modlora.evaluation import (
        evaluate_choice_tasks,
        evaluate_code,
        evaluate_indist,
        evaluate_sni,
        results_table,
        save_results,
    )
    from modlora.evaluation.rank_classification import DEFAULT_CHOICE_TASKS
    from modlora.reuse.prepare import prepare_model

    name = args.method or ("arrow" if args.library else "base")
    method = args.registry.get(name)
    if method.capabilities.uses_experts and args.library is None:
        raise UsageError(f"--method {name} needs --library")
    if args.suite == "indist" and args.library is None:
        raise UsageError("--suite indist needs --library (its tasks' test splits are evaluated)")
    if method.capabilities.needs_task_labels and args.suite != "indist":
        raise UsageError(f"the {name} router needs each example's task: it only applies to --suite indist")
    opts = method_options(args, args.registry, name, args.registry.names())
    root = data_root(args)
    if args.suite == "sni" and not (root / "sni" / args.sni_split).is_dir():
        raise UsageError(f"--sni-split {args.sni_split}: no directory {root / 'sni' / args.sni_split}")
    lib = open_library(args.library, args.revision) if args.library else None
    lm = load_model(args)
    rm = prepare_model(lm, lib, name, opts, registry=args.registry)
    common = {"limit": args.limit, "seed": args.seed, "batch_size": args.batch_size, "method": name,
              "model_name": lm.info.name}
    try:
        if args.suite == "choice":
            run = evaluate_choice_tasks(rm, lm.tokenizer, args.tasks or DEFAULT_CHOICE_TASKS, data_dir=root,
                                        prefix_reuse=not method.capabilities.per_example, progress=True,
                                        on_task_done=_print_task_done, **common)
        elif args.suite == "sni":
            run = evaluate_sni(rm, lm.tokenizer, args.tasks or None, data_dir=root, split=args.sni_split,
                               max_new_tokens=args.max_new_tokens, on_task_done=_print_task_done, **common)
        elif args.suite == "code":
            run = evaluate_code(rm, lm.tokenizer, args.tasks or ("humaneval", "mbpp"), data_dir=root,
                                max_new_tokens=args.max_new_tokens, **common)
        else:
            run = evaluate_indist(rm, lm, lib, task_dir=str(root / "sni" / "tasks"), limit=args.limit or 10,
                                  seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    finally:
        rm.restore()
    run.config.update({"router": name, "method_options": dataclasses.asdict(opts),
                       "library": str(args.library) if args.library else None,
                       "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                       "threads": torch.get_num_threads()})
    console.print(results_table([run], title=f"{args.suite} — {name}"))
    if args.out:
        save_results(run, args.out)
        console.print(f"results: {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from modlora.evaluation.plots import write_report
    path = write_report(args.results, args.out, similarity_json=args.similarity, metric=args.metric)
    console.print(f"report: {path}")
    return 0


def register(sub: Any, registry: Registry) -> None:
    p = sub.add_parser("eval", help="evaluate the base model or a library + method on a suite",
                       description="Zero-shot evaluation. Suites: choice (ARC-e/c, BoolQ, HellaSwag, OBQA, PIQA, "
                                   "WinoGrande by log-likelihood rank classification: acc and per-character acc_norm), "
                                   "sni (greedy generation on held-out SNI tasks: Rouge-L, exact match), code "
                                   "(HumanEval/MBPP pass@1 in a sandbox), indist (the library's own tasks' test "
                                   "splits: loss, Rouge-L and routing accuracy). Results are written as JSON.")
    p.add_argument("--suite", choices=SUITES, required=True, help="which suite")
    add_library_arg(p, option=True, help=f"library to apply (default: the base model alone): {LOCATION_HELP}")
    p.add_argument("--tasks", nargs="*", help="tasks of the suite (default: all of them)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="examples per task: a fixed seeded subset (default: all; indist: 10)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="batch size (default 8)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="generation length for sni/code/indist (128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset (default 0)")
    p.add_argument("--sni-split", type=directory_name, default="heldout",
                   help="SNI directory under <data>/sni for --suite sni")
    p.add_argument("--out", type=output_file, default=None, help="write the results JSON here")
    add_model_args(p)
    add_data_arg(p)
    add_method_args(p, registry, registry.names(), default=None,
                    help="how to apply --library (default: arrow with a library, else base): "
                         + ", ".join(registry.names()))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="Markdown table + plots comparing result files",
                       description="Compare results JSON files (methods × tasks) in a Markdown table and PNG plots: "
                                   "per-task bars, routing entropy per layer, expert usage, and the library's "
                                   "similarity matrix with clusters (--similarity).")
    p.add_argument("results", nargs="+", type=input_file, help="results JSON files from `modlora eval`")
    p.add_argument("--out", type=output_directory, required=True, help="output directory")
    p.add_argument("--similarity", type=input_file, default=None,
                   help="a clustering JSON (library meta/clustering.json) for the similarity plot")
    p.add_argument("--metric", default=None, help="metric to compare (default: each suite's main metric)")
    p.set_defaults(func=cmd_report)
