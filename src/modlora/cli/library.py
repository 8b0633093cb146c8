"""Library commands: ``tasks``, ``show``, ``verify``, ``import``, ``export``, ``remove``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from modlora.cli.common import UsageError, add_data_arg, add_library_arg, console, data_root, open_library
from modlora.reuse.methods import Registry
from modlora.tables import text_table


def show_library(lib: Any) -> None:
    """The table of a library's experts (names whole, never split). The tasks column is left out when every expert
    is named after its one task (a private library), as the title then says."""
    names = lib.expert_names()
    entries = [lib.entry(name) for name in names]
    own_task = all(list(e.tasks) == [name] for name, e in zip(names, entries, strict=True))
    numbers = ("r", "mods", "params", "size", "val", "steps", "tok/s")
    table = text_table(f"{getattr(lib, 'url', lib.path)} — base {lib.base_model.name} ({len(lib)} experts"
                       + (", each named after its task)" if own_task and names else ")"),
                       ("expert", *(() if own_task else ("tasks",)), *numbers), right=numbers)
    for name, e in zip(names, entries, strict=True):
        tasks = ", ".join(e.tasks[:3]) + (f" (+{len(e.tasks) - 3})" if len(e.tasks) > 3 else "")
        m = e.metrics
        val = m.get("best_val_loss")
        tps = m.get("tokens_per_second")
        table.add_row(name, *(() if own_task else (tasks,)), str(e.lora.get("r")), str(e.modules),
                      f"{e.num_parameters:,}", f"{lib.size_bytes(name) / 1024:.0f} KiB",
                      f"{val:.3f}" if isinstance(val, float) else "-", str(m.get("steps", "-")),
                      f"{tps:.0f}" if isinstance(tps, float) else "-")
    console.print(table)


def cmd_show(args: argparse.Namespace) -> int:
    lib = open_library(args.library, args.revision)
    if args.json:
        print(json.dumps({n: lib.entry(n).to_dict() for n in lib.expert_names()}, indent=2))
    else:
        show_library(lib)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from modlora.data import load_sni_task, read_index, sni_task_files
    root = data_root(args)
    directory = root / "sni" / "tasks"
    files = sni_task_files(directory)
    index = read_index(root)
    table = text_table(f"{len(files)} tasks in {directory}", ("task", "category", "instances", "median input words"),
                       right=("instances", "median input words"))
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
    lib = open_library(args.library, args.revision)
    problems = lib.verify()
    if not problems:
        against = ("the base model's layer shapes" if lib.linear_shapes is not None
                   else "each other (this library records no base-model shapes)")
        console.print(f"[green]OK[/]: {len(lib)} experts: every file matches its checksum, tensors load and are "
                      f"finite floating point, manifest fields agree, shapes checked against {against}")
        return 0
    for p in problems:
        console.print(f"[red]{p.expert}[/]: {p.problem}", highlight=False)
    return 1


def cmd_import(args: argparse.Namespace) -> int:
    lib = open_library(args.library, writes=True)
    entry = lib.import_adapter(args.adapter, args.name, tasks=args.tasks or [], overwrite=args.overwrite,
                               force_base=args.force_base)
    console.print(f"imported {args.adapter} as expert {entry.name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.overwrite:
        raise UsageError(f"{args.out} exists (use --overwrite to replace it)")
    out = open_library(args.library, args.revision).export(args.name, args.out, overwrite=args.overwrite)
    console.print(f"exported expert {args.name} to {out} (PEFT adapter directory)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    open_library(args.library, writes=True).remove(args.name)
    console.print(f"removed expert {args.name}")
    return 0


def register(sub: Any, registry: Registry) -> None:
    p = sub.add_parser("tasks", help="list available tasks with counts",
                       description="List the SNI training tasks of the data root with category and instance counts.")
    add_data_arg(p)
    p.add_argument("--filter", default=None, help="only tasks whose name contains this text")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("show", help="table of a library's experts", description="Show a library's experts: tasks, "
                       "rank, adapted modules, parameter count, size on disk and training metrics.")
    add_library_arg(p)
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("verify", help="check every expert file against the manifest",
                       description="Check every expert's files against the manifest checksums and that they load; "
                                   "exit status 1 when anything is wrong.")
    add_library_arg(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("import", help="import a PEFT LoRA adapter directory as an expert",
                       description="Import a PEFT LoRA adapter directory (adapter_config.json + "
                                   "adapter_model.safetensors) into a library.")
    add_library_arg(p, writes=True)
    p.add_argument("adapter", type=Path, help="PEFT adapter directory")
    p.add_argument("--name", required=True, help="expert name in the library")
    p.add_argument("--tasks", nargs="*", help="tasks this expert covers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing expert of that name")
    p.add_argument("--force-base", action="store_true",
                   help="import an adapter whose config names another base model (its shapes must still fit)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="export one expert as a PEFT adapter directory",
                       description="Copy one expert out of a library as a standalone PEFT adapter directory.")
    add_library_arg(p)
    p.add_argument("name", help="expert name")
    p.add_argument("out", type=Path, help="destination directory")
    p.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("remove", help="remove an expert from a library", description="Remove an expert.")
    add_library_arg(p, writes=True)
    p.add_argument("name", help="expert name")
    p.set_defaults(func=cmd_remove)
