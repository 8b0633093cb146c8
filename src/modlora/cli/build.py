"""Building commands: ``train`` (one expert), ``build`` (a whole library), ``cluster`` (MBC clustering)."""

from __future__ import annotations

import argparse
from typing import Any

from modlora.cli.common import (
    LOCATION_HELP,
    UsageError,
    add_data_arg,
    add_library_arg,
    add_model_args,
    add_task_source_args,
    add_train_args,
    check_device,
    check_task_names,
    clusters_or_auto,
    console,
    data_root,
    fraction,
    input_directory,
    input_file,
    k_or_auto,
    load_model,
    lora_spec,
    open_fraction,
    open_library,
    output_directory,
    output_file,
    positive_float,
    positive_int,
    prompt_limits,
    task_dir,
    train_config,
)
from modlora.cli.library import show_library
from modlora.reuse.methods import Registry

#: what ``build`` adds to "interrupted" (Ctrl-C): nothing stored is lost
RESUME_HINT = "every expert already stored is kept: run the same command again to train the rest"


def _build_config(args: argparse.Namespace) -> Any:
    """The :class:`~modlora.build.strategies.BuildConfig` of the options, ``--device`` checked against this machine
    first (before any data is read or model loaded)."""
    from modlora.build.strategies import BuildConfig
    check_device(args)
    return BuildConfig(model=args.model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                       data_dir=task_dir(args), flat_file=str(args.flat) if args.flat else None,
                       lora=lora_spec(args), train=train_config(args), max_examples=args.max_examples, max_val=args.max_val,
                       limits=prompt_limits(args), balanced=getattr(args, "balanced", False),
                       init=args.init,
                       **({"experts_per_job": args.experts_per_job, "shared_prefix": not args.no_shared_prefix,
                           "max_tokens_per_forward": args.max_tokens_per_forward}
                          if hasattr(args, "experts_per_job") else {}))


def _known_tasks(args: argparse.Namespace, config: Any) -> list[str]:
    """Every task name of the source; for ``--flat`` the skipped malformed lines are reported (count and lines)."""
    from modlora.data import read_flat_jsonl, sni_task_files
    if not args.flat:
        return sorted(sni_task_files(config.data_dir))
    load = read_flat_jsonl(args.flat)
    if load.report.skipped:
        console.print(f"[yellow]{args.flat}[/]: {load.report.summary()}", highlight=False)
    return sorted(load.tasks)


def cmd_train(args: argparse.Namespace) -> int:
    from modlora.build.pipeline import train_task_expert
    from modlora.build.strategies import BuildLock, load_tasks
    from modlora.errors import LibraryError
    from modlora.library.adapters import resolve_spec
    from modlora.library.store import ExpertLibrary, check_name

    config = _build_config(args)
    check_task_names(args.tasks, _known_tasks(args, config), str(args.flat or config.data_dir))
    name = args.name or (args.tasks[0] if len(args.tasks) == 1 else "+".join(t.split("_")[0] for t in args.tasks))
    try:
        check_name(name)
    except LibraryError as exc:
        raise UsageError(f"--name: {exc}" if args.name else str(exc)) from None
    tasks = load_tasks(config, args.tasks)
    lm = load_model(args)
    spec = resolve_spec(lm.model, lora_spec(args))   # targets the model lacks: refused before the library is created
    with BuildLock(args.library):   # a build filling this library refuses this one (and the reverse)
        lib = ExpertLibrary.open_or_create(args.library, lm.info)
        if name in lib and not args.overwrite:
            raise UsageError(f"expert {name!r} already exists in {args.library} (use --overwrite)")
        entry = train_task_expert(lm, lib, name, tasks, spec=spec, config=train_config(args),
                                  max_examples=args.max_examples, max_val=args.max_val,
                                  limits=prompt_limits(args), overwrite=args.overwrite, init=args.init)
    console.print(f"[green]trained expert[/] {entry.name}: val loss {entry.metrics['best_val_loss']:.4f}, "
                  f"{entry.metrics['tokens_per_second']:.0f} tokens/s → {lib.expert_dir(entry.name)}")
    return 0


def _print_clusters(clustering: Any, quality: Any = None) -> None:
    """K, every candidate K's score (with --k auto), a plain no-structure verdict, the clusters (names whole, never
    split) and, given reference labels, ARI and purity."""
    from modlora.tables import TextTable

    silhouette = "n/a" if clustering.silhouette is None else f"{clustering.silhouette:.3f}"
    algorithm = "spectral clustering" if clustering.algorithm == "spectral" else "k-means on the similarity rows"
    console.print(f"[bold]K = {clustering.k}[/] ({clustering.features} features, {algorithm}, silhouette {silhouette})",
                  soft_wrap=False)
    if clustering.scores_by_k:
        best = max(clustering.scores_by_k, key=lambda k: (clustering.scores_by_k[k], -k))
        scores = TextTable(title=f"--k auto: {clustering.criterion} score of every candidate K (higher is better)")
        scores.add_column("K", justify="right")
        scores.add_column(str(clustering.criterion), justify="right")
        for k, value in sorted(clustering.scores_by_k.items()):
            scores.add_row(str(k), f"{value:.3f}" + (" (best)" if k == best else ""))
        console.print(scores)
    if clustering.no_structure:
        console.print(f"[bold yellow]{clustering.message}[/]", soft_wrap=False)
    table = TextTable(title=f"{clustering.k} cluster(s) of {len(clustering.names)} experts")
    table.add_column("cluster", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("experts")
    for i, members in enumerate(clustering.clusters):
        table.add_row(str(i), str(len(members)), ", ".join(members))
    console.print(table)
    if quality is not None:
        left_out = f"; {len(quality.unlabelled)} expert(s) without a label left out" if quality.unlabelled else ""
        console.print(f"against the reference labels ({quality.n_labelled} experts, {quality.n_labels} labels): "
                      f"[bold]ARI {quality.ari:.3f}[/], purity {quality.purity:.3f}{left_out}", soft_wrap=False)


def _check_strategy_options(args: argparse.Namespace, rank: int) -> tuple[float | None, int]:
    """``--share`` (its fraction or None) and the number of heads, checked before anything loads."""
    share = args.share_fraction if args.share else None
    from modlora.build.initialisation import check_init_fits
    from modlora.errors import DataError
    try:
        check_init_fits(args.init, args.strategy)
    except DataError as exc:
        raise UsageError(f"--init: {exc}") from None
    if args.share and args.strategy not in ("mbc", "semantic"):
        raise UsageError("--share applies to --strategy mbc and semantic")
    if args.share_mode is not None and not args.share:
        raise UsageError("--share-mode applies with --share")
    if share is not None and args.strategy == "mbc" and share >= 1 - args.stage1_fraction:
        raise UsageError(f"--share-fraction {share} leaves nothing for the cluster experts after "
                         f"--stage1-fraction {args.stage1_fraction}")
    heads = args.heads or (2 if args.strategy == "mhr" else 1)
    if args.heads is not None and args.strategy not in ("poly", "mhr"):
        raise UsageError("--heads applies to --strategy mhr")
    if args.strategy == "poly" and heads != 1:
        raise UsageError("--heads > 1 is MHR: use --strategy mhr")
    if args.strategy == "mhr" and heads < 2:
        raise UsageError("--strategy mhr needs --heads >= 2 (one head is Poly)")
    if rank % heads:
        raise UsageError(f"--heads {heads} must divide the LoRA rank ({rank})")
    return share, heads


def cmd_build(args: argparse.Namespace) -> int:
    from modlora.build import strategies as building
    config = _build_config(args)
    share, heads = _check_strategy_options(args, config.lora.rank)
    on_change = "retrain-changed" if args.retrain_changed else "new-library" if args.new_library else "refuse"
    common = {"executor": args.executor, "ray_address": args.ray_address, "on_config_change": on_change}
    if args.strategy == "random":
        if args.mbc_library is None:
            raise UsageError("--strategy random needs --mbc-library (an MBC library whose cluster sizes to copy)")
        lib, clustering = building.build_random_library(args.library, args.mbc_library, config, seed=args.seed,
                                                        **common)
        console.print(f"random clusters (sizes {clustering.sizes})")
    else:
        known = _known_tasks(args, config)
        if args.tasks:
            check_task_names(args.tasks, known, str(args.flat or config.data_dir))
        tasks = list(args.tasks) if args.tasks else known[: args.num_tasks] if args.num_tasks else known
        console.print(f"{args.strategy} library over {len(tasks)} tasks → {args.library}")
        if args.strategy == "private":
            lib = building.build_private_library(args.library, tasks, config, **common)
        elif args.strategy == "shared":
            lib = building.build_shared_library(args.library, tasks, config, **common)
        elif args.strategy in ("poly", "mhr"):
            lib = building.build_poly_library(args.library, tasks, config, skills=args.skills, heads=heads,
                                              allocation_lr=args.allocation_lr, **common)
        else:
            if args.k != "auto" and args.k > len(tasks):
                raise UsageError(f"--k {args.k} exceeds the number of tasks ({len(tasks)})")
            k_range = (args.k_min, args.k_max) if args.k == "auto" else None
            sharing = {"share_fraction": share, "share_mode": args.share_mode or building.DEFAULT_SHARE_MODE}
            if args.strategy == "semantic":
                lib, clustering = building.build_semantic_library(args.library, tasks, config, k=args.k,
                                                                  k_range=k_range, **sharing, **common)
            else:
                lib, clustering = building.build_mbc_library(
                    args.library, tasks, config, k=args.k, stage1_fraction=args.stage1_fraction,
                    private_library=args.private_library, k_range=k_range, **sharing, **common)
            _print_clusters(clustering)
    show_library(lib)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from modlora.build.clustering import cluster_quality, model_based_clustering, plot_clustering, reference_labels
    if args.k == "auto" and args.k_min > args.k_max:
        raise UsageError(f"--k-min {args.k_min} is larger than --k-max {args.k_max}")
    lib = open_library(args.library, args.revision)
    if args.k != "auto" and args.k > len(lib):
        raise UsageError(f"--k {args.k} exceeds the number of experts ({len(lib)})")
    names = lib.expert_names()
    labels = None
    if args.labels is not None:  # read before any model loads: a bad label file fails fast
        labels = reference_labels(args.labels, names, tasks_of=lib.tasks, data_dir=data_root(args))
        if not labels:
            raise UsageError(f"--labels {args.labels}: none of the {len(names)} experts (or their tasks) has a label")
    lm = tasks = None
    if args.features == "semantic":
        from modlora.data import load_sni_tasks
        wanted = sorted({t for name in names for t in (lib.tasks(name) or [name])})
        tasks = load_sni_tasks(data_root(args) / "sni" / "tasks", wanted)
        lm = load_model(args)
    k_range = (args.k_min, min(args.k_max, max(2, len(lib) - 1))) if args.k == "auto" else None
    result = model_based_clustering(lib, args.k, features=args.features, sparsity=args.sparsity,
                                    n_components=args.n_components, centre=args.centre, k_range=k_range,
                                    seed=args.seed, auto_k=args.auto_k, partition=args.partition, lm=lm,
                                    tasks=tasks)
    _print_clusters(result, cluster_quality(result, labels) if labels else None)
    lib.save_meta("clustering", result.to_dict())
    if args.out:
        result.to_json(args.out)
    if args.plot:
        plot_clustering(result, args.plot)
        console.print(f"plot: {args.plot}")
    return 0


def _labels_source(text: str) -> str:
    """``--labels``: 'sni-categories' or an existing JSON/CSV file (checked at parse time)."""
    from modlora.build.clustering.choices import SNI_CATEGORIES
    if text != SNI_CATEGORIES:
        try:
            input_file(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"expected '{SNI_CATEGORIES}' or an existing JSON/CSV file ({exc})"
                                             ) from None
    return text


def _add_k_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--k", type=k_or_auto, default=k_or_auto(default),
                   help=f"number of clusters or 'auto' (spectral clustering, K by silhouette; a build with no "
                        f"cluster structure is refused; default {default})")
    p.add_argument("--k-min", type=positive_int, default=2, help="smallest K tried by --k auto (default 2)")
    p.add_argument("--k-max", type=positive_int, default=16, help="largest K tried by --k auto (default 16)")


def register(sub: Any, registry: Registry) -> None:
    p = sub.add_parser("train", help="train one LoRA expert on named tasks into a library",
                       description="Train one LoRA expert on one or several tasks and add it to a library "
                                   "(created if missing).")
    p.add_argument("library", type=output_directory, help="library directory (created if missing)")
    p.add_argument("tasks", nargs="+", help="task names (SNI file names without .json[.gz], or flat task_name)")
    p.add_argument("--name", help="expert name (default: the task name, or joined task ids)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing expert of that name")
    add_model_args(p)
    add_task_source_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("build", help="build a library: private, shared, mbc, random, semantic, poly or mhr",
                       description="Build a library with one strategy. Budgets are per task (--steps per task, or "
                                   "--epochs): shared gets N budgets, MBC spends --stage1-fraction of each task's "
                                   "budget on stage-1 private experts and the rest on cluster experts, so every "
                                   "strategy costs what the private library costs; semantic clusters the tasks by the "
                                   "base model's embeddings of their definitions and inputs and gives the cluster "
                                   "experts the whole budget; poly/mhr train --skills LoRA skills and a learned "
                                   "task → skill allocation jointly on all tasks (N budgets, like shared). Every task "
                                   "name is checked before "
                                   "training starts. Experts train together in chunks and each is stored when its "
                                   "budget ends; finished experts are skipped, so an interrupted build resumes. A "
                                   "re-run with other training settings on an existing library is refused "
                                   "(see --retrain-changed and --new-library).")
    p.add_argument("library", type=output_directory,
                   help="output library directory (one build at a time: a second build into it is refused)")
    p.add_argument("--strategy", choices=["private", "shared", "mbc", "random", "semantic", "poly", "mhr"],
                   default="private",
                   help="private: one expert per task; shared: one on all tasks; mbc: model-based clustering; "
                        "random: random clusters with the sizes of --mbc-library's clusters; semantic: clusters of "
                        "task descriptions; poly / mhr: skills with a learned task allocation (docs/methods.md)")
    p.add_argument("--tasks", nargs="*", help="task names (default: every task in the data directory)")
    p.add_argument("--num-tasks", type=positive_int, default=None, help="use the first N tasks (sorted by name)")
    _add_k_args(p, "10")
    p.add_argument("--stage1-fraction", type=open_fraction, default=0.4,
                   help="MBC: share of each task's budget spent on stage-1 private experts (default 0.4 = 2 of 5)")
    p.add_argument("--private-library", default=None,
                   help="MBC: reuse this private library as stage 1 instead of training one (a directory or any "
                        "library location: hf://, s3://, ...)")
    p.add_argument("--mbc-library", type=input_directory, default=None,
                   help="random: the MBC library whose sizes to copy")
    p.add_argument("--share", action="store_true",
                   help="mbc/semantic: first train one expert 'shared' on all tasks (--share-fraction of each "
                        "task's budget), then the cluster experts with the rest (--share-mode)")
    p.add_argument("--share-fraction", type=open_fraction, default=0.2,
                   help="--share: share of each task's budget spent on the shared expert (default 0.2)")
    from modlora.library.shared_expert import DEFAULT_SHARE_MODE, SHARE_MODES
    p.add_argument("--share-mode", choices=SHARE_MODES, default=None,
                   help="--share: warm = every cluster expert starts from the shared factors; residual = every "
                        "cluster expert is a fresh LoRA on top of the shared one, which reuse then applies on every "
                        f"token (default {DEFAULT_SHARE_MODE}; docs/methods.md says why)")
    p.add_argument("--skills", type=positive_int, default=4, help="poly/mhr: number of LoRA skills (default 4)")
    p.add_argument("--heads", type=positive_int, default=None,
                   help="mhr: heads the rank is split into, each allocated separately (must divide --rank; "
                        "default 2)")
    p.add_argument("--allocation-lr", type=positive_float, default=1e-2,
                   help="poly/mhr: learning rate of the allocation logits (default 1e-2; the skills use --lr)")
    p.add_argument("--balanced", action="store_true",
                   help="multi-task experts use the same number of examples from every task")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: chunks one after the other in this process; ray: one Ray task per chunk of "
                        "--experts-per-job experts (pip install modlora[ray])")
    p.add_argument("--ray-address", default=None, help="address of an existing Ray cluster (default: start one)")
    p.add_argument("--experts-per-job", type=positive_int, default=8,
                   help="experts trained together in one loop over mixed batches (default 8); an interrupted "
                        "build loses at most the unfinished experts of the running chunk")
    p.add_argument("--max-tokens-per-forward", type=positive_int, default=1024,
                   help="cap on batch rows × padded length of one forward (default 1024: about 2-3 GB of activations in fp32 on the 135M model; raise it on a GPU)")
    p.add_argument("--no-shared-prefix", action="store_true",
                   help="run every prompt in full instead of running each micro-batch's common prefix once")
    change = p.add_mutually_exclusive_group()
    change.add_argument("--retrain-changed", action="store_true",
                        help="retrain the experts of an existing library that were trained with other settings")
    change.add_argument("--new-library", action="store_true",
                        help="if the existing library was built with other settings, move it aside "
                             "(<library>.replaced-<time>) and build a new one")
    add_model_args(p)
    add_task_source_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_build, steps=100, on_interrupt=RESUME_HINT)

    from modlora.build.clustering.choices import ALGORITHMS, AUTO_K_CRITERIA, DEFAULT_AUTO_K, DEFAULT_FEATURES, FEATURES
    p = sub.add_parser("cluster", help="MBC clustering of an existing library",
                       description="Cluster a library's experts (spectral clustering of a similarity matrix, or "
                                   "k-means on its rows) and print the clusters, every candidate K's score with --k auto (or that the experts "
                                   "have no cluster structure), and ARI/purity against --labels. Features: delta = "
                                   "exact cosine of the experts' updates ΔW = B·A, from the LoRA factors; params = "
                                   "the paper's flattened, sparsified, SVD-reduced parameters; "
                                   "semantic = the base model's mean-pooled embedding of each task's definition and "
                                   "inputs (the only one that loads the model). The result is stored in the library "
                                   "(meta/clustering.json).")
    add_library_arg(p, help=f"the library to cluster (usually a private library): {LOCATION_HELP}; the clustering "
                    "is stored in it (for a remote library: in its local mirror)")
    p.add_argument("--features", choices=FEATURES, default=DEFAULT_FEATURES,
                   help=f"similarity features (default {DEFAULT_FEATURES}; docs/clustering.md says why)")
    p.add_argument("--k", type=clusters_or_auto, default="auto",
                   help="number of clusters (>= 2, never changed) or 'auto' (default auto)")
    p.add_argument("--auto-k", choices=AUTO_K_CRITERIA, default=DEFAULT_AUTO_K,
                   help=f"how --k auto chooses K (default {DEFAULT_AUTO_K}); the chosen K keeps the partition it "
                        "was scored on (spectral, eigengap: spectral clustering; silhouette, stability: k-means on "
                        "the similarity rows)")
    p.add_argument("--partition", choices=ALGORITHMS, default=None,
                   help="partitioning algorithm (default: the paper's kmeans on the similarity rows for a given "
                        "--k, the criterion's own for --k auto)")
    p.add_argument("--k-min", type=positive_int, default=2, help="smallest K tried by --k auto (default 2)")
    p.add_argument("--k-max", type=positive_int, default=16, help="largest K tried by --k auto (default 16)")
    p.add_argument("--labels", type=_labels_source, default=None,
                   help="reference labelling for ARI and purity: 'sni-categories' (the data's sni/index.json) or a "
                        "JSON {name: label} / CSV name,label file keyed by expert or task name")
    p.add_argument("--centre", action=argparse.BooleanOptionalAction, default=None,
                   help="delta/semantic: compare the differences from the mean over experts (default: off for delta, "
                        "on for semantic)")
    p.add_argument("--sparsity", type=fraction, default=0.5,
                   help="params: share of smallest-magnitude entries zeroed (0.5)")
    p.add_argument("--n-components", type=positive_int, default=64,
                   help="params: truncated-SVD components (default 64)")
    p.add_argument("--seed", type=int, default=0, help="k-means / SVD seed (default 0)")
    p.add_argument("--out", type=output_file, default=None, help="also write the clustering JSON here")
    p.add_argument("--plot", type=output_file, default=None,
                   help="write a PNG: similarity heatmap ordered by cluster + cluster sizes")
    add_data_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_cluster)
