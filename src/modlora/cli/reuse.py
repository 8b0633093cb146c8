"""Reuse commands: ``generate`` / ``route`` (apply a library and generate), ``merge`` (one static adapter),
``export-arrow`` (Arrow restricted to a prompt, as one adapter), ``lorahub`` (few-shot weights, as one adapter)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modlora.cli.common import (
    UsageError,
    add_data_arg,
    add_library_arg,
    add_method_args,
    add_model_args,
    console,
    data_root,
    load_model,
    method_options,
    open_library,
    output_directory,
    positive_int,
)
from modlora.io import atomic_write_json
from modlora.reuse.methods import Registry


def prompt_text(args: argparse.Namespace) -> str:
    """``--prompt`` checked: non-empty text that can be tokenised (an argv with undecodable bytes arrives as
    surrogates)."""
    from modlora.data import check_text
    check_text(args.definition, "--definition")
    if not check_text(args.prompt, "--prompt").strip():
        raise UsageError("--prompt is empty")
    return args.prompt


def encode_prompt(lm: Any, text: str, max_new_tokens: int) -> Any:
    """Token ids of ``text``; refuses a prompt that does not fit the model's context with the tokens to generate."""
    enc = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    context = int(getattr(lm.model.config, "max_position_embeddings", 0) or 0)
    n = enc.input_ids.shape[1]
    if context and n + max_new_tokens > context:
        raise UsageError(f"the prompt is {n} tokens; with --max-new-tokens {max_new_tokens} it exceeds the model's "
                         f"context of {context} tokens")
    return enc.to(next(lm.model.parameters()).device)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from modlora.data import PromptFormatter
    from modlora.reuse.prepare import prepare_model
    from modlora.reuse.routing import explain

    text = prompt_text(args)
    method = args.registry.get(args.method)
    if args.explain and not method.capabilities.per_token:
        raise UsageError(f"--explain needs a per-token router ({', '.join(args.registry.names(per_token=True))}), "
                         f"not {args.method}")
    opts = method_options(args, args.registry, args.method, args.registry.names())
    lib = open_library(args.library, args.revision) if method.capabilities.uses_experts else None
    lm = load_model(args)
    prompt = text if args.raw else PromptFormatter(lm.tokenizer).prompt_text(args.definition, text)
    enc = encode_prompt(lm, prompt, args.max_new_tokens)
    rm = prepare_model(lm, lib, args.method, opts, registry=args.registry)
    try:
        with torch.inference_mode():
            out = rm.generate(enc.input_ids, enc.attention_mask, max_new_tokens=args.max_new_tokens,
                              do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        console.print(lm.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True), highlight=False)
        if args.explain:
            console.print(explain(rm.routed, lm.tokenizer, prompt), highlight=False)
    finally:
        rm.restore()
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from modlora.library.experts import ExpertSet
    from modlora.reuse.apply import shared_part, with_shared_part

    static = args.registry.names(static=True)
    opts = method_options(args, args.registry, args.method, static)
    if args.out.exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} exists (use --overwrite to replace it)")
    lib = open_library(args.library, args.revision)
    names, _ = shared_part(lib, list(opts.experts) or None)
    experts = ExpertSet.of(lib, names)
    method = args.registry.get(args.method)(opts)
    result = method.combine(experts)
    adapter = with_shared_part(lib, result.adapter)  # a residual library: ΔW_shared is exported with the merge
    adapter.base_model_name = lib.base_model.name
    adapter.save(args.out, overwrite=args.overwrite)
    atomic_write_json(Path(args.out) / "modlora_merge.json", result.metadata)
    console.print(f"{args.method} of {len(experts)} experts → {args.out} (PEFT adapter, rank {adapter.spec.rank}, "
                  f"{adapter.num_parameters():,} parameters, relative error {result.total_relative_error:.2g})")
    return 0


def cmd_export_arrow(args: argparse.Namespace) -> int:
    import torch

    from modlora.data import PromptFormatter
    from modlora.reuse.apply import with_shared_part
    from modlora.reuse.prepare import prepare_model
    from modlora.reuse.routing import export_prompt_adapter

    text = prompt_text(args)
    opts = method_options(args, args.registry, "arrow", ["arrow"])
    if args.out.exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} exists (use --overwrite to replace it)")
    lib = open_library(args.library, args.revision)
    lm = load_model(args)
    prompt = PromptFormatter(lm.tokenizer).prompt_text(args.definition, text)
    enc = encode_prompt(lm, prompt, 0)
    rm = prepare_model(lm, lib, "arrow", opts, registry=args.registry)
    try:
        with torch.inference_mode():
            adapter = export_prompt_adapter(rm.routed, enc.input_ids, enc.attention_mask,
                                            top_experts=args.top_experts)
    finally:
        rm.restore()
    adapter = with_shared_part(lib, adapter)
    adapter.base_model_name = lib.base_model.name
    adapter.save(args.out, overwrite=args.overwrite)
    console.print(f"Arrow restricted to the prompt's top {args.top_experts} experts per layer → {args.out}")
    return 0


def cmd_lorahub(args: argparse.Namespace) -> int:
    from modlora.data import encode_tasks, load_sni_tasks
    from modlora.evaluation.indist import recorded_limits
    from modlora.library.experts import ExpertSet
    from modlora.reuse.learned.lorahub import lorahub_search
    from modlora.tables import text_table

    if args.out.exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} exists (use --overwrite to replace it)")
    lib = open_library(args.library, args.revision)
    experts = ExpertSet.of(lib, args.experts or None)
    tasks = load_sni_tasks(data_root(args) / "sni" / "tasks", [args.task])
    lm = load_model(args)
    lib.check_base_model(lm.info)
    fmt = recorded_limits(lib).formatter(lm.tokenizer)          # the shots cut as the experts' training prompts
    examples = [e.labelled() for e in encode_tasks(fmt, tasks, "train", max_per_task=args.shots)]
    res = lorahub_search(lm.model, experts, examples, budget=args.budget, l1_alpha=args.l1, seed=args.seed)
    res.adapter.base_model_name = lib.base_model.name
    res.adapter.save(args.out, overwrite=args.overwrite)
    atomic_write_json(Path(args.out) / "lorahub_weights.json",
                      {"task": args.task, "shots": len(examples), "loss": res.loss, "weights": res.weights})
    console.print(f"LoraHub on {len(examples)} shots of {args.task}: loss {res.loss:.4f} → {args.out}")
    table = text_table("largest weights", ("expert", "weight"), right=("weight",))
    for name, w in sorted(res.weights.items(), key=lambda kv: -abs(kv[1]))[:10]:
        table.add_row(name, f"{w:+.3f}")
    console.print(table)
    return 0


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    add_library_arg(p)
    p.add_argument("--prompt", required=True, help="the input text")
    p.add_argument("--definition", default="", help="task instruction placed before the input")


def register(sub: Any, registry: Registry) -> None:
    method_help = "how to apply the library (default arrow): " + ", ".join(registry.names())
    for cmd, text in (("generate", "generate text with a library applied (Arrow by default)"),
                      ("route", "route a prompt through a library; --explain shows which experts each token used")):
        p = sub.add_parser(cmd, help=text, description=text[0].upper() + text[1:] + ". The prompt is formatted "
                           "with the training template (chat template, definition + input) unless --raw.")
        _add_prompt_args(p)
        p.add_argument("--raw", action="store_true", help="use --prompt verbatim (no template)")
        p.add_argument("--max-new-tokens", type=positive_int, default=64, help="greedy tokens to generate (default 64)")
        p.add_argument("--explain", action="store_true",
                       help="print the experts each token used and a per-layer summary (per-token routers only)")
        add_model_args(p)
        add_data_arg(p)
        add_method_args(p, registry, registry.names(), default="arrow", help=method_help)
        p.set_defaults(func=cmd_generate)

    static = registry.names(static=True)
    p = sub.add_parser("merge", help="export a static combination of experts as one PEFT adapter",
                       description="Combine experts into one PEFT adapter with a static method of the registry: "
                                   + "; ".join(f"{n}: {registry.get(n).summary}" for n in static) + ".")
    add_library_arg(p)
    p.add_argument("--out", type=output_directory, required=True, help="output PEFT adapter directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_method_args(p, registry, static, default=None, required=True,
                    help="combination method (required): " + ", ".join(static))
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export-arrow", help="export Arrow restricted to a prompt's top experts as one adapter",
                       description="Route a prompt with Arrow, keep each layer's top experts by mean routing weight, "
                                   "and export their weighted ΔW average as one static PEFT adapter (vLLM/PEFT).")
    _add_prompt_args(p)
    p.add_argument("--top-experts", type=positive_int, default=2, help="experts kept per layer (default 2)")
    p.add_argument("--out", type=output_directory, required=True, help="output PEFT adapter directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_model_args(p)
    add_method_args(p, registry, ["arrow"], default="arrow", help="arrow (the only choice here)")
    p.set_defaults(func=cmd_export_arrow)

    p = sub.add_parser("lorahub", help="few-shot LoraHub weights for a task, exported as one adapter",
                       description="Gradient-free search (nevergrad NGOpt) of per-expert weights in [-1.5, 1.5] that "
                                   "minimise few-shot loss + L1 on a task's first N training examples.")
    add_library_arg(p)
    p.add_argument("--task", required=True, help="SNI task supplying the few-shot examples")
    p.add_argument("--shots", type=positive_int, default=5, help="labelled examples (default 5)")
    p.add_argument("--budget", type=positive_int, default=40, help="nevergrad evaluations (default 40)")
    p.add_argument("--l1", type=float, default=0.05, help="L1 penalty on the weights (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--experts", nargs="*", help="experts to combine (default: all)")
    p.add_argument("--out", type=output_directory, required=True, help="output PEFT adapter directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_model_args(p)
    add_data_arg(p)
    p.set_defaults(func=cmd_lorahub)
