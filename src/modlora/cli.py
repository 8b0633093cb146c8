"""The ``modlora`` command line. ``modlora COMMAND --help`` explains every option."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from modlora.errors import ModloraError

console = Console(soft_wrap=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="base model: 'smollm2-135m' (embedded default), an HF id, a local HF directory or a .gguf file")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="directory of SNI task files (*.json / *.json.gz); default $MODLORA_DATA/sni/tasks or "
                        "../shared/data/sni/tasks")
    p.add_argument("--flat", type=Path, default=None,
                   help="read tasks from a flat JSONL file {task_name, source, target} instead of SNI files")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA and optimisation (paper defaults)")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha/r (default 16)")
    g.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    g.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated linear-layer names to adapt (default attention q,k,v,o; add "
                        "gate_proj,up_proj,down_proj for the MLP)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="epochs over the training split (default 1)")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--warmup", type=float, default=0.06, help="linear warm-up fraction of steps (default 0.06)")
    g.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: 4 times per run)")
    g.add_argument("--max-examples", type=int, default=None, help="cap on training examples per task")
    g.add_argument("--max-val", type=int, default=32, help="validation examples per task (default 32)")
    g.add_argument("--max-prompt-tokens", type=int, default=384,
                   help="prompts longer than this are truncated from the left (default 384)")
    g.add_argument("--max-target-tokens", type=int, default=128, help="targets are cut to this length (default 128)")
    g.add_argument("--seed", type=int, default=0, help="seed for the split, sampling and initialisation (default 0)")


def _specs(args: argparse.Namespace):
    from modlora.adapters import LoraSpec
    from modlora.training import TrainConfig
    spec = LoraSpec(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                    target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()))
    cfg = TrainConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=args.lr, warmup_ratio=args.warmup, eval_every=args.eval_every, seed=args.seed)
    return spec, cfg


def _load_tasks(args: argparse.Namespace, names: Sequence[str] | None):
    from modlora.data import default_sni_dir, load_flat_jsonl, load_sni_tasks
    if args.flat is not None:
        tasks = load_flat_jsonl(args.flat)
        if names:
            missing = [n for n in names if n not in tasks]
            if missing:
                raise ModloraError(f"task(s) not in {args.flat}: {', '.join(missing)}")
            tasks = {n: tasks[n] for n in names}
        return tasks
    return load_sni_tasks(args.data or default_sni_dir(), names)


def cmd_train(args: argparse.Namespace) -> int:
    from modlora.library import ExpertLibrary
    from modlora.models import load_base_model
    from modlora.pipeline import train_task_expert

    spec, cfg = _specs(args)
    tasks = _load_tasks(args, args.tasks)
    lm = load_base_model(args.model, device=args.device)
    lib = ExpertLibrary.open_or_create(args.library, lm.info)
    name = args.name or (args.tasks[0] if len(args.tasks) == 1 else "+".join(t.split("_")[0] for t in args.tasks))
    if name in lib and not args.overwrite:
        raise ModloraError(f"expert {name!r} already exists in {args.library} (use --overwrite)")
    entry = train_task_expert(lm, lib, name, tasks, spec=spec, config=cfg, max_examples=args.max_examples,
                              max_val=args.max_val, max_prompt_tokens=args.max_prompt_tokens,
                              max_target_tokens=args.max_target_tokens, overwrite=args.overwrite)
    console.print(f"[green]trained expert[/] {entry.name}: val loss {entry.metrics['best_val_loss']:.4f}, "
                  f"{entry.metrics['tokens_per_second']:.0f} tokens/s → {lib.expert_dir(entry.name)}")
    return 0


def show_library(lib_path: Path) -> None:
    from modlora.library import ExpertLibrary
    lib = ExpertLibrary(lib_path)
    table = Table(title=f"{lib_path} — base {lib.base_model.name} ({len(lib)} experts)")
    for col in ("expert", "tasks", "rank", "modules", "params", "size", "val loss", "steps", "tokens/s"):
        table.add_column(col, justify="right" if col not in ("expert", "tasks") else "left")
    for name in lib.expert_names():
        e = lib.entry(name)
        tasks = ", ".join(e.tasks[:3]) + (f" (+{len(e.tasks) - 3})" if len(e.tasks) > 3 else "")
        m = e.metrics
        val = m.get("best_val_loss")
        tps = m.get("tokens_per_second")
        table.add_row(name, tasks, str(e.lora.get("r")), str(e.modules), f"{e.num_parameters:,}",
                      f"{lib.size_bytes(name) / 1024:.0f} KiB", f"{val:.3f}" if isinstance(val, float) else "-",
                      str(m.get("steps", "-")), f"{tps:.0f}" if isinstance(tps, float) else "-")
    console.print(table)


def cmd_show(args: argparse.Namespace) -> int:
    if args.json:
        from modlora.library import ExpertLibrary
        lib = ExpertLibrary(args.library)
        print(json.dumps({n: lib.entry(n).to_dict() for n in lib.expert_names()}, indent=2))
    else:
        show_library(args.library)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from modlora.data import default_data_dir, default_sni_dir, load_sni_task, read_index, sni_task_files
    directory = args.data or default_sni_dir()
    files = sni_task_files(directory)
    index = read_index(default_data_dir()) if args.data is None else {}
    table = Table(title=f"{len(files)} tasks in {directory}")
    for col in ("task", "category", "instances", "median input words"):
        table.add_column(col)
    for name, path in files.items():
        if args.filter and args.filter not in name:
            continue
        meta = index.get(name)
        if meta is None:
            t = load_sni_task(path)
            meta = {"category": t.category, "instances": len(t), "median_input_words": "-"}
        table.add_row(name, str(meta.get("category", "")), str(meta.get("instances", "")),
                      str(meta.get("median_input_words", "")))
    console.print(table)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from modlora.library import ExpertLibrary
    lib = ExpertLibrary(args.library)
    problems = lib.verify()
    if not problems:
        console.print(f"[green]OK[/]: {len(lib)} experts, every file matches its checksum")
        return 0
    for p in problems:
        console.print(f"[red]{p.expert}[/]: {p.problem}")
    return 1


def cmd_import(args: argparse.Namespace) -> int:
    from modlora.library import ExpertLibrary
    lib = ExpertLibrary(args.library)
    entry = lib.import_adapter(args.adapter, args.name, tasks=args.tasks or [], overwrite=args.overwrite)
    console.print(f"imported {args.adapter} as expert {entry.name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from modlora.library import ExpertLibrary
    out = ExpertLibrary(args.library).export(args.name, args.out, overwrite=args.overwrite)
    console.print(f"exported expert {args.name} to {out} (PEFT adapter directory)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from modlora.library import ExpertLibrary
    ExpertLibrary(args.library).remove(args.name)
    console.print(f"removed expert {args.name}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from modlora.demo import run_demo
    return run_demo(out_dir=args.out, model=args.model, data=args.data, tasks=args.tasks, steps=args.steps,
                    device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modlora", description="Build and reuse libraries of LoRA experts (private, shared and MBC libraries; "
        "Arrow routing and baselines). `modlora COMMAND --help` explains every option.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one LoRA expert on named tasks into a library",
                       description="Train one LoRA expert on one or several tasks and add it to a library "
                                   "(created if missing).")
    p.add_argument("library", type=Path, help="library directory (created if missing)")
    p.add_argument("tasks", nargs="+", help="task names (SNI file names without .json[.gz], or flat task_name)")
    p.add_argument("--name", help="expert name (default: the task name, or joined task ids)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing expert of that name")
    _add_model_args(p)
    _add_data_args(p)
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("show", help="table of a library's experts", description="Show a library's experts: tasks, "
                       "rank, adapted modules, parameter count, size on disk and training metrics.")
    p.add_argument("library", type=Path, help="library directory")
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("tasks", help="list available tasks with counts",
                       description="List the SNI tasks in a directory with category and instance counts.")
    p.add_argument("--data", type=Path, default=None, help="SNI task directory (default ../shared/data/sni/tasks)")
    p.add_argument("--filter", default=None, help="only tasks whose name contains this text")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("verify", help="check every expert file against the manifest",
                       description="Check every expert's files against the manifest checksums and that they load; "
                                   "exit status 1 when anything is wrong.")
    p.add_argument("library", type=Path, help="library directory")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("import", help="import a PEFT LoRA adapter directory as an expert",
                       description="Import a PEFT LoRA adapter directory (adapter_config.json + "
                                   "adapter_model.safetensors) into a library.")
    p.add_argument("library", type=Path, help="library directory")
    p.add_argument("adapter", type=Path, help="PEFT adapter directory")
    p.add_argument("--name", required=True, help="expert name in the library")
    p.add_argument("--tasks", nargs="*", help="tasks this expert covers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing expert of that name")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="export one expert as a PEFT adapter directory",
                       description="Copy one expert out of a library as a standalone PEFT adapter directory.")
    p.add_argument("library", type=Path, help="library directory")
    p.add_argument("name", help="expert name")
    p.add_argument("out", type=Path, help="destination directory")
    p.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("remove", help="remove an expert from a library", description="Remove an expert.")
    p.add_argument("library", type=Path, help="library directory")
    p.add_argument("name", help="expert name")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("demo", help="the main job on the embedded default model and data",
                       description="Train small private experts for a handful of SNI tasks on the embedded "
                                   "SmolLM2-135M-Instruct and show the library. Re-running reuses finished experts.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    p.add_argument("--tasks", nargs="*", default=None, help="SNI tasks to use (default: a fixed handful)")
    p.add_argument("--steps", type=int, default=None, help="training steps per expert (default: demo preset)")
    _add_model_args(p)
    p.add_argument("--data", type=Path, default=None, help="SNI task directory (default ../shared/data/sni/tasks)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ModloraError as exc:
        print(f"modlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
