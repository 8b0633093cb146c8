"""``modlora demo``: the main job on the embedded default model and data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modlora.cli.common import add_data_arg, add_model_args, data_root, positive_int
from modlora.reuse.methods import Registry


def cmd_demo(args: argparse.Namespace) -> int:
    from modlora.study.main_job import run_demo
    return run_demo(out_dir=args.out, model=args.model, data=data_root(args), tasks=args.tasks, steps=args.steps,
                    device=args.device)


def register(sub: Any, registry: Registry) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default model and data",
                       description="The whole pipeline, small: private library over six SNI tasks on the embedded "
                                   "SmolLM2-135M-Instruct, MBC clustering and cluster experts, Arrow prototypes, then "
                                   "base vs μ vs Arrow (and oracle) on in-distribution and held-out examples (related "
                                   "to the training tasks and not), with routing accuracy against chance. Re-running "
                                   "reuses what exists.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    p.add_argument("--tasks", nargs="*", default=None, help="SNI tasks to use (default: a fixed handful)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps per expert (default: demo preset)")
    add_model_args(p)
    add_data_arg(p)
    p.set_defaults(func=cmd_demo)
