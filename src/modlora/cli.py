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
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype (default auto: float32 on CPU, bfloat16 on CUDA); bfloat16 is about 2x "
                        "faster on CPUs with AVX512-BF16/AMX")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _load_model(args: argparse.Namespace):
    """The base model of ``--model/--device/--dtype``, after applying ``--threads``."""
    import torch

    from modlora.models import load_base_model
    if getattr(args, "threads", None):
        if args.threads < 1:
            raise ModloraError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load_base_model(args.model, device=args.device, dtype=getattr(args, "dtype", None))


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
    from modlora.building import BuildConfig, load_tasks
    return load_tasks(BuildConfig(data_dir=str(args.data) if args.data else None,
                                  flat_file=str(args.flat) if args.flat else None), names)


def cmd_train(args: argparse.Namespace) -> int:
    from modlora.library import ExpertLibrary
    from modlora.pipeline import train_task_expert

    spec, cfg = _specs(args)
    tasks = _load_tasks(args, args.tasks)
    lm = _load_model(args)
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


def _build_config(args: argparse.Namespace):
    from modlora.building import BuildConfig
    return BuildConfig(model=args.model, device=args.device, data_dir=str(args.data) if args.data else None,
                       flat_file=str(args.flat) if args.flat else None, rank=args.rank, alpha=args.alpha,
                       dropout=args.dropout, target_modules=tuple(t.strip() for t in args.targets.split(",") if t),
                       steps_per_task=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, lr=args.lr, warmup_ratio=args.warmup, seed=args.seed,
                       max_examples=args.max_examples, max_val=args.max_val, max_prompt_tokens=args.max_prompt_tokens,
                       max_target_tokens=args.max_target_tokens, balanced=args.balanced)


def _task_list(args: argparse.Namespace, config) -> list[str]:
    from modlora.building import load_tasks
    from modlora.data import default_sni_dir, sni_task_files
    if args.tasks:
        return list(args.tasks)
    if args.flat:
        names = sorted(load_tasks(config, None))
    else:
        names = sorted(sni_task_files(args.data or default_sni_dir()))
    return names[: args.num_tasks] if args.num_tasks else names


def cmd_build(args: argparse.Namespace) -> int:
    from modlora import building
    cfg = _build_config(args)
    common = {"executor": args.executor, "ray_address": args.ray_address}
    if args.strategy == "random":
        if args.mbc_library is None:
            raise ModloraError("--strategy random needs --mbc-library (an MBC library whose cluster sizes to copy)")
        lib, clustering = building.build_random_library(args.library, args.mbc_library, cfg, seed=args.seed, **common)
        console.print(f"random clusters (sizes {clustering.sizes})")
    else:
        tasks = _task_list(args, cfg)
        console.print(f"{args.strategy} library over {len(tasks)} tasks → {args.library}")
        if args.strategy == "private":
            lib = building.build_private_library(args.library, tasks, cfg, **common)
        elif args.strategy == "shared":
            lib = building.build_shared_library(args.library, tasks, cfg, **common)
        else:
            k = args.k if args.k == "auto" else int(args.k)
            lib, clustering = building.build_mbc_library(
                args.library, tasks, cfg, k=k, stage1_fraction=args.stage1_fraction,
                private_library=args.private_library, k_range=(args.k_min, args.k_max) if args.k == "auto" else None,
                **common)
            _print_clusters(clustering)
    show_library(lib.path)
    return 0


def _print_clusters(clustering) -> None:
    console.print(f"K = {clustering.k} clusters (silhouette {clustering.silhouette})")
    if clustering.scores_by_k:
        console.print("silhouette by K: " + ", ".join(f"{k}: {v:.3f}" if v is not None else f"{k}: -"
                                                      for k, v in clustering.scores_by_k.items()))
    for i, members in enumerate(clustering.clusters):
        console.print(f"  cluster{i} ({len(members)}): {', '.join(members)}")


def cmd_cluster(args: argparse.Namespace) -> int:
    from modlora.clustering import model_based_clustering, plot_clustering
    from modlora.library import ExpertLibrary
    lib = ExpertLibrary(args.library)
    k = args.k if args.k == "auto" else int(args.k)
    result = model_based_clustering(lib, k, sparsity=args.sparsity, n_components=args.n_components,
                                    k_range=(args.k_min, min(args.k_max, len(lib) - 1)) if k == "auto" else None,
                                    seed=args.seed)
    _print_clusters(result)
    lib.save_meta("clustering", result.to_dict())
    if args.out:
        result.to_json(args.out)
    if args.plot:
        plot_clustering(result, args.plot)
        console.print(f"plot: {args.plot}")
    return 0


def _router_options(args: argparse.Namespace):
    from modlora.reuse import RouterOptions
    temp = args.temperature if args.temperature == "sqrt_d" else float(args.temperature)
    return RouterOptions(top_k=args.top_k, temperature=temp, tie_qkv=args.tie_qkv,
                         normalize_inputs=args.normalize_inputs, mixing=args.mixing, path=args.path,
                         sparse_kernel=args.sparse_kernel,
                         general=tuple(args.general or ()), gks_space=args.gks_space,
                         experts=tuple(args.experts or ()), data_dir=str(args.data) if args.data else None)


def _add_router_args(p: argparse.ArgumentParser, default: str = "arrow") -> None:
    from modlora.reuse import METHODS
    g = p.add_argument_group("routing")
    g.add_argument("--router", choices=METHODS, default=default,
                   help=f"how to apply the library (default {default}); see `modlora.reuse` for each method")
    g.add_argument("--top-k", type=int, default=4, help="Arrow: experts per token (default 4)")
    g.add_argument("--temperature", default="1.0", help="Arrow: logit temperature, a number or 'sqrt_d' (default 1)")
    g.add_argument("--tie-qkv", action="store_true", help="Arrow: one prototype for q,k,v of a block")
    g.add_argument("--normalize-inputs", action="store_true", help="Arrow: L2-normalise x before |x·v|")
    g.add_argument("--mixing", choices=["outputs", "parameters"], default="outputs",
                   help="mix expert outputs (default) or parameters (the reference code's default)")
    g.add_argument("--path", choices=["auto", "dense", "sparse"], default="auto",
                   help="routed-layer kernel: dense fold, sparse top-k or automatic (default)")
    g.add_argument("--sparse-kernel", choices=["auto", "sddmm", "blocks"], default="auto",
                   help="sparse-path kernel: sampled matmul + embedding bag (CPU fp32), expert blocks (any device/"
                        "dtype) or automatic (default)")
    g.add_argument("--general", nargs="*", help="GenKnowSub: subtract the mean of these experts before routing")
    g.add_argument("--gks-space", choices=["factors", "delta"], default="factors",
                   help="GenKnowSub in LoRA-factor space (like PEFT) or exact ΔW space")
    g.add_argument("--experts", nargs="*", help="use only these experts (default: all)")
    g.add_argument("--data", type=Path, default=None,
                   help="SNI task directory for data-dependent routers (centroid, phatgoose, tp)")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from modlora.data import PromptFormatter
    from modlora.library import ExpertLibrary
    from modlora.reuse import prepare_model
    from modlora.routing import explain

    lm = _load_model(args)
    lib = ExpertLibrary(args.library)
    rm = prepare_model(lm, lib, args.router, _router_options(args))
    fmt = PromptFormatter(lm.tokenizer, max_prompt_tokens=4096)
    prompt = fmt.prompt_text(args.definition or "", args.prompt) if not args.raw else args.prompt
    enc = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(rm.device)
    with torch.inference_mode():
        out = rm.generate(enc.input_ids, enc.attention_mask, max_new_tokens=args.max_new_tokens, do_sample=False,
                          pad_token_id=lm.tokenizer.pad_token_id)
    console.print(lm.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True), highlight=False)
    if getattr(args, "explain", False):
        if rm.routed is None or args.router in ("tp", "oracle"):
            raise ModloraError(f"--explain needs a per-token router (arrow, centroid, phatgoose), not {args.router}")
        console.print(explain(rm.routed, lm.tokenizer, prompt), highlight=False)
    rm.restore()
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from modlora import merging
    from modlora.library import ExpertLibrary
    from modlora.routing import mu_delta_average, mu_parameter_average

    lib = ExpertLibrary(args.library)
    experts = lib.experts(args.experts or None)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    meta: dict = {}
    if args.method == "mu-params":
        adapter = mu_parameter_average(experts)
    elif args.method == "mu-delta":
        adapter = mu_delta_average(experts)
    elif args.method == "linear":
        adapter = merging.weighted_combination(experts, weights)
    elif args.method == "ties":
        res = merging.ties_merge(experts, weights, density=args.density, scale=args.scale, rank=args.rank)
        adapter, meta = res.adapter, res.metadata
    else:
        res = merging.dare_merge(experts, weights, drop_rate=args.drop_rate, seed=args.seed, rank=args.rank,
                                 combine="ties" if args.method == "dare-ties" else "linear")
        adapter, meta = res.adapter, res.metadata
    adapter.base_model_name = lib.base_model.name
    adapter.save(args.out, overwrite=args.overwrite)
    if meta:
        (Path(args.out) / "modlora_merge.json").write_text(json.dumps(meta, indent=2) + "\n")
    console.print(f"{args.method} of {len(experts)} experts → {args.out} (PEFT adapter, rank "
                  f"{adapter.spec.rank}, {adapter.num_parameters():,} parameters)")
    return 0


def cmd_export_arrow(args: argparse.Namespace) -> int:
    import torch

    from modlora.data import PromptFormatter
    from modlora.library import ExpertLibrary
    from modlora.reuse import prepare_model
    from modlora.routing import export_prompt_adapter

    lm = _load_model(args)
    lib = ExpertLibrary(args.library)
    rm = prepare_model(lm, lib, "arrow", _router_options(args))
    prompt = PromptFormatter(lm.tokenizer, max_prompt_tokens=4096).prompt_text(args.definition or "", args.prompt)
    enc = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(rm.device)
    with torch.inference_mode():
        adapter = export_prompt_adapter(rm.routed, enc.input_ids, enc.attention_mask, top_experts=args.top_experts)
    rm.restore()
    adapter.base_model_name = lib.base_model.name
    adapter.save(args.out, overwrite=args.overwrite)
    console.print(f"Arrow restricted to the prompt's top {args.top_experts} experts per layer → {args.out}")
    return 0


def cmd_lorahub(args: argparse.Namespace) -> int:
    from modlora.data import PromptFormatter, default_sni_dir, encode_tasks, load_sni_tasks
    from modlora.library import ExpertLibrary
    from modlora.lorahub import lorahub_search

    lm = _load_model(args)
    lib = ExpertLibrary(args.library)
    lib.check_base_model(lm.info)
    tasks = load_sni_tasks(args.data or default_sni_dir(), [args.task])
    fmt = PromptFormatter(lm.tokenizer, max_prompt_tokens=384, max_target_tokens=128)
    shots = encode_tasks(fmt, tasks, "train", max_per_task=args.shots)
    examples = [e.labelled() for e in shots]
    experts = lib.experts(args.experts or None)
    res = lorahub_search(lm.model, experts, examples, budget=args.budget, l1_alpha=args.l1, seed=args.seed)
    res.adapter.base_model_name = lib.base_model.name
    res.adapter.save(args.out, overwrite=args.overwrite)
    weights = dict(zip(experts, [float(w) for w in res.weights], strict=True))
    (Path(args.out) / "lorahub_weights.json").write_text(json.dumps(
        {"task": args.task, "shots": len(examples), "loss": res.loss, "weights": weights}, indent=2) + "\n")
    console.print(f"LoraHub on {len(examples)} shots of {args.task}: loss {res.loss:.4f} → {args.out}")
    for name, w in sorted(weights.items(), key=lambda kv: -abs(kv[1]))[:10]:
        console.print(f"  {name}: {w:+.3f}")
    return 0


def _print_task_done(task: str, scores) -> None:
    """``on_task_done`` callback: print each task's scores as soon as it is done."""
    from modlora.evaluation.results import format_metrics
    console.print(f"{task}: {format_metrics(scores)}  (n={scores.n}, {scores.wall_s:.0f} s)")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from modlora.evaluation import evaluate_choice_tasks, evaluate_code, evaluate_sni, print_results, save_results
    from modlora.evaluation.rank_classification import DEFAULT_CHOICE_TASKS
    from modlora.library import ExpertLibrary
    from modlora.reuse import ReuseModel, prepare_model

    lm = _load_model(args)
    lib = ExpertLibrary(args.library) if args.library else None
    if lib is None and args.router != "base":
        raise ModloraError(f"--router {args.router} needs --library")
    if args.router in ("oracle",) and args.suite != "indist":
        raise ModloraError("the oracle router only applies to the in-distribution suite (--suite indist)")
    rm = prepare_model(lm, lib, args.router, _router_options(args)) if lib else ReuseModel("base", lm.model)
    method = args.router if lib else "base"
    common = {"limit": args.limit, "seed": args.seed, "batch_size": args.batch_size, "method": method,
              "model_name": lm.info.name}
    data_root = args.data_root
    try:
        if args.suite == "choice":
            # a task predictor pools over the whole input, so the context must not be scored separately
            run = evaluate_choice_tasks(rm, lm.tokenizer, args.tasks or DEFAULT_CHOICE_TASKS, data_dir=data_root,
                                        prefix_reuse=args.router != "tp", progress=True,
                                        on_task_done=_print_task_done, **common)
        elif args.suite == "sni":
            run = evaluate_sni(rm, lm.tokenizer, args.tasks or None, data_dir=data_root, split=args.sni_split,
                               max_new_tokens=args.max_new_tokens, **common)
        elif args.suite == "code":
            run = evaluate_code(rm, lm.tokenizer, args.tasks or ("humaneval", "mbpp"), data_dir=data_root,
                                max_new_tokens=args.max_new_tokens, **common)
        else:
            if lib is None:
                raise ModloraError("--suite indist needs --library (its tasks' test splits are evaluated)")
            from modlora.data import default_data_dir
            from modlora.study import evaluate_indist
            run = evaluate_indist(rm, lm, lib, data_dir=Path(data_root) if data_root else default_data_dir(),
                                  limit=args.limit or 10, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size)
    finally:
        rm.restore()
    run.config.update({"router": args.router, "library": str(args.library) if args.library else None,
                       "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                       "threads": torch.get_num_threads()})
    print_results([run], title=f"{args.suite} — {method}")
    if args.out:
        save_results(run, args.out)
        console.print(f"results: {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from modlora.report import write_report
    path = write_report(args.results, args.out, similarity_json=args.similarity, metric=args.metric)
    console.print(f"report: {path}")
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

    p = sub.add_parser("build", help="build a library: private, shared, mbc or random",
                       description="Build a library with one strategy. Budgets are per task (--steps per task, or "
                                   "--epochs): shared gets N budgets, MBC spends --stage1-fraction of each task's "
                                   "budget on stage-1 private experts and the rest on cluster experts, so every "
                                   "strategy costs what the private library costs. Finished experts are skipped, "
                                   "so an interrupted build resumes.")
    p.add_argument("library", type=Path, help="output library directory")
    p.add_argument("--strategy", choices=["private", "shared", "mbc", "random"], default="private",
                   help="private: one expert per task; shared: one on all tasks; mbc: model-based clustering; "
                        "random: random clusters with the sizes of --mbc-library's clusters")
    p.add_argument("--tasks", nargs="*", help="task names (default: every task in the data directory)")
    p.add_argument("--num-tasks", type=int, default=None, help="use the first N tasks (sorted by name)")
    p.add_argument("--k", default="10", help="MBC clusters: an integer or 'auto' (silhouette; default 10)")
    p.add_argument("--k-min", type=int, default=2, help="smallest K tried by --k auto (default 2)")
    p.add_argument("--k-max", type=int, default=16, help="largest K tried by --k auto (default 16)")
    p.add_argument("--stage1-fraction", type=float, default=0.4,
                   help="MBC: share of each task's budget spent on stage-1 private experts (default 0.4 = 2 of 5)")
    p.add_argument("--private-library", type=Path, default=None,
                   help="MBC: reuse this private library as stage 1 instead of training one")
    p.add_argument("--mbc-library", type=Path, default=None, help="random: the MBC library whose sizes to copy")
    p.add_argument("--balanced", action="store_true",
                   help="multi-task experts use the same number of examples from every task")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: sequential in this process; ray: one Ray task per expert (pip install modlora[ray])")
    p.add_argument("--ray-address", default=None, help="address of an existing Ray cluster (default: start one)")
    _add_model_args(p)
    _add_data_args(p)
    _add_train_args(p)
    p.set_defaults(func=cmd_build, steps=100)

    p = sub.add_parser("cluster", help="MBC clustering of an existing library",
                       description="Cluster a library's experts by their LoRA weights (sparsify, truncated SVD, "
                                   "cosine similarity, k-means on similarity rows) and print the clusters; the "
                                   "result is stored in the library (meta/clustering.json).")
    p.add_argument("library", type=Path, help="library directory (usually a private library)")
    p.add_argument("--k", default="auto", help="number of clusters or 'auto' (silhouette; default auto)")
    p.add_argument("--k-min", type=int, default=2, help="smallest K tried by --k auto (default 2)")
    p.add_argument("--k-max", type=int, default=16, help="largest K tried by --k auto (default 16)")
    p.add_argument("--sparsity", type=float, default=0.5, help="share of smallest-magnitude entries zeroed (0.5)")
    p.add_argument("--n-components", type=int, default=64, help="truncated-SVD components (default 64)")
    p.add_argument("--seed", type=int, default=0, help="k-means / SVD seed (default 0)")
    p.add_argument("--out", type=Path, default=None, help="also write the clustering JSON here")
    p.add_argument("--plot", type=Path, default=None,
                   help="write a PNG: similarity heatmap ordered by cluster + cluster sizes")
    p.set_defaults(func=cmd_cluster)

    for cmd, text in (("generate", "generate text with a library applied (Arrow by default)"),
                      ("route", "route a prompt through a library; --explain shows which experts each token used")):
        p = sub.add_parser(cmd, help=text, description=text[0].upper() + text[1:] + ". The prompt is formatted "
                           "with the training template (chat template, definition + input) unless --raw.")
        p.add_argument("library", type=Path, help="library directory")
        p.add_argument("--prompt", required=True, help="the input text")
        p.add_argument("--definition", default="", help="task instruction placed before the input")
        p.add_argument("--raw", action="store_true", help="use --prompt verbatim (no template)")
        p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens to generate (default 64)")
        if cmd == "route":
            p.add_argument("--explain", action="store_true",
                           help="print the experts each token used and a per-layer summary (entropy, usage)")
        _add_model_args(p)
        _add_router_args(p)
        p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="export a static combination of experts as one PEFT adapter",
                       description="Combine experts into one PEFT adapter: mu-params (mean A, mean B: the "
                                   "reference's μ), mu-delta (exact mean of B·A, rank Σr), linear (Σ w_e ΔW_e), ties, "
                                   "dare-linear, dare-ties (dense ΔW merges factored back by SVD).")
    p.add_argument("library", type=Path, help="library directory")
    p.add_argument("--method", required=True, choices=["mu-params", "mu-delta", "linear", "ties", "dare-linear",
                                                       "dare-ties"], help="combination method")
    p.add_argument("--out", type=Path, required=True, help="output PEFT adapter directory")
    p.add_argument("--experts", nargs="*", help="experts to combine (default: all)")
    p.add_argument("--weights", default=None, help="comma-separated weights for linear/ties/dare (default 1/E each)")
    p.add_argument("--density", type=float, default=0.2, help="TIES: share of entries kept per expert (0.2)")
    p.add_argument("--scale", type=float, default=1.0, help="TIES: λ applied to the merged ΔW (1.0)")
    p.add_argument("--drop-rate", type=float, default=0.5, help="DARE: drop probability p (0.5)")
    p.add_argument("--rank", type=int, default=None,
                   help="TIES/DARE: SVD rank of the exported adapter (default: exact, can be large)")
    p.add_argument("--seed", type=int, default=0, help="DARE: seed of the drop masks")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export-arrow", help="export Arrow restricted to a prompt's top experts as one adapter",
                       description="Route a prompt with Arrow, keep each layer's top experts by mean routing weight, "
                                   "and export their weighted ΔW average as one static PEFT adapter (vLLM/PEFT).")
    p.add_argument("library", type=Path, help="library directory")
    p.add_argument("--prompt", required=True, help="the prompt that selects the experts")
    p.add_argument("--definition", default="", help="task instruction placed before the prompt")
    p.add_argument("--top-experts", type=int, default=2, help="experts kept per layer (default 2)")
    p.add_argument("--out", type=Path, required=True, help="output PEFT adapter directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_model_args(p)
    _add_router_args(p)
    p.set_defaults(func=cmd_export_arrow)

    p = sub.add_parser("lorahub", help="few-shot LoraHub weights for a task, exported as one adapter",
                       description="Gradient-free search (nevergrad NGOpt) of per-expert weights in [-1.5, 1.5] that "
                                   "minimise few-shot loss + L1 on a task's first N training examples.")
    p.add_argument("library", type=Path, help="library directory")
    p.add_argument("--task", required=True, help="SNI task supplying the few-shot examples")
    p.add_argument("--shots", type=int, default=5, help="labelled examples (default 5)")
    p.add_argument("--budget", type=int, default=40, help="nevergrad evaluations (default 40)")
    p.add_argument("--l1", type=float, default=0.05, help="L1 penalty on the weights (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--experts", nargs="*", help="experts to combine (default: all)")
    p.add_argument("--data", type=Path, default=None, help="SNI task directory")
    p.add_argument("--out", type=Path, required=True, help="output PEFT adapter directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_model_args(p)
    p.set_defaults(func=cmd_lorahub)

    p = sub.add_parser("eval", help="evaluate the base model or a library + router on a suite",
                       description="Zero-shot evaluation. Suites: choice (ARC-e/c, BoolQ, HellaSwag, OBQA, PIQA, "
                                   "WinoGrande by log-likelihood rank classification: acc and per-character acc_norm), "
                                   "sni (greedy generation on held-out SNI tasks: Rouge-L, exact match), code "
                                   "(HumanEval/MBPP pass@1 in a sandbox), indist (the library's own tasks' test "
                                   "splits: loss, Rouge-L and routing accuracy). Results are written as JSON.")
    p.add_argument("--suite", choices=["choice", "sni", "code", "indist"], required=True, help="which suite")
    p.add_argument("--library", type=Path, default=None, help="library to apply (default: the base model alone)")
    p.add_argument("--tasks", nargs="*", help="tasks of the suite (default: all of them)")
    p.add_argument("--limit", type=int, default=None, help="examples per task: a fixed seeded subset (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length for sni/code/indist (128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset (default 0)")
    p.add_argument("--sni-split", default="heldout", help="SNI directory under <data>/sni for --suite sni")
    p.add_argument("--data-root", default=None, help="data directory with eval/ and sni/ (default ../shared/data)")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    _add_model_args(p)
    _add_router_args(p, default="arrow")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="Markdown table + plots comparing result files",
                       description="Compare results JSON files (methods × tasks) in a Markdown table and PNG plots: "
                                   "per-task bars, routing entropy per layer, expert usage, and the library's "
                                   "similarity matrix with clusters (--similarity).")
    p.add_argument("results", nargs="+", type=Path, help="results JSON files from `modlora eval`")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--similarity", type=Path, default=None,
                   help="a clustering JSON (library meta/clustering.json) for the similarity plot")
    p.add_argument("--metric", default=None, help="metric to compare (default: each suite's main metric)")
    p.set_defaults(func=cmd_report)

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
                       description="The whole pipeline, small: private library over six SNI tasks on the embedded "
                                   "SmolLM2-135M-Instruct, MBC clustering and cluster experts, Arrow prototypes, then "
                                   "base vs μ vs Arrow (and oracle) on held-out and in-distribution examples with "
                                   "routing accuracy. Re-running reuses what exists.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    p.add_argument("--tasks", nargs="*", default=None, help="SNI tasks to use (default: a fixed handful)")
    p.add_argument("--steps", type=int, default=None, help="training steps per expert (default: demo preset)")
    _add_model_args(p)
    p.add_argument("--data", type=Path, default=None,
                   help="data directory holding sni/tasks and sni/heldout (default $MODLORA_DATA or ../shared/data)")
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
