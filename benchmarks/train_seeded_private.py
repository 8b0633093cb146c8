"""Train a private library whose experts each get their own seed (issue 15 item 7's measurement).

``modlora build --strategy private`` starts every expert from one initialisation of A (``--seed`` for all). This
script trains the same experts with the same data split (``split_seed``) but ``TrainConfig.seed = crc32(task)``
per expert, so A's initialisation (and the batch order) differ between experts. Compare the two libraries with
``benchmarks/cluster_recovery.py --real``.

    PYTHONPATH=src python benchmarks/train_seeded_private.py runs/cpu24-seeded --tasks ... --steps 12 \
        --batch-size 4 --max-prompt-tokens 192 --max-target-tokens 32 --max-val 4 --lr 1e-3 --threads 1
"""

from __future__ import annotations

import argparse
import zlib

import torch

from modlora.build.pipeline import train_task_expert
from modlora.build.training import TrainConfig
from modlora.data import PromptLimits, default_sni_dir, load_sni_tasks
from modlora.library.adapters import LoraSpec
from modlora.library.store import ExpertLibrary
from modlora.models import DEFAULT_MODEL, load_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library")
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-val", type=int, default=4)
    parser.add_argument("--max-prompt-tokens", type=int, default=192)
    parser.add_argument("--max-target-tokens", type=int, default=32)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_base_model(args.model)
    lib = ExpertLibrary.open_or_create(args.library, lm.info)
    tasks = load_sni_tasks(default_sni_dir(), args.tasks)
    for name in args.tasks:
        if name in lib:
            continue
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=zlib.crc32(name.encode()))
        train_task_expert(lm, lib, name, {name: tasks[name]}, spec=LoraSpec(), config=config, max_val=args.max_val,
                          limits=PromptLimits(args.max_prompt_tokens, args.max_target_tokens),
                          split_seed=args.split_seed, progress=False,
                          extra_training={"stage": "private", "per_expert_seed": True})
        print(f"trained {name}", flush=True)


if __name__ == "__main__":
    main()
