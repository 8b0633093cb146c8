"""Training throughput: modlora's trainer vs a plain PEFT + ``transformers.Trainer`` loop, same data and settings.

Both train a rank-4 LoRA on attention q,k,v,o of the same model, on the same encoded SNI examples (prompt + target,
loss on target tokens only), batch size 8, AdamW lr 1e-4, for the same number of steps. Throughput counts real
(non-padding) tokens per second of training time. The Trainer baseline uses labels = -100 on prompt tokens and
computes full-vocabulary logits at every position (the usual recipe); modlora computes logits only at target
positions and groups batches by length.

    python benchmarks/train_throughput.py --steps 12 --out benchmarks/results/train_throughput

writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from modlora.adapters import LoraSpec
from modlora.data import PromptFormatter, default_sni_dir, encode_tasks, load_sni_tasks
from modlora.models import load_base_model
from modlora.training import TrainConfig, train_expert

TASKS = ["task085_unnatural_addsub_arithmetic", "task1346_glue_cola_grammatical_correctness_classification",
         "task927_yelp_negative_to_positive_style_transfer", "task1336_peixian_equity_evaluation_corpus_gender_classifier"]


class _Encoded(Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        e = self.examples[i]
        ids = e.prompt_ids + e.target_ids
        return {"input_ids": ids, "labels": [-100] * len(e.prompt_ids) + e.target_ids}


def _collate(pad_id: int):
    def fn(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return fn


def run_trainer(lm, examples, steps: int, batch_size: int, out_dir: Path) -> dict:
    model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=1e-4, warmup_steps=max(1, round(0.06 * steps)), lr_scheduler_type="linear", logging_steps=10**6,
                             save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                             dataloader_num_workers=0, remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Encoded(examples),
                      data_collator=_collate(lm.tokenizer.pad_token_id))
    seen = {"tokens": 0}
    original = trainer.training_step

    def counting_step(model, inputs, *a, **k):
        seen["tokens"] += int(inputs["attention_mask"].sum())
        return original(model, inputs, *a, **k)

    trainer.training_step = counting_step
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    model.unload()
    return {"tokens": seen["tokens"], "seconds": wall, "tokens_per_second": seen["tokens"] / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples-per-task", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput"))
    args = ap.parse_args()
    lm = load_base_model(args.model)
    tasks = load_sni_tasks(default_sni_dir(), TASKS)
    fmt = PromptFormatter(lm.tokenizer, max_prompt_tokens=256, max_target_tokens=64)
    examples = encode_tasks(fmt, tasks, "train", max_per_task=args.examples_per_task)
    ours_res = train_expert(lm.model, examples, pad_id=lm.tokenizer.pad_token_id, spec=LoraSpec(),
                            config=TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=10**6),
                            progress=False)
    ours = {"tokens": ours_res.metrics["train_tokens"], "seconds": ours_res.metrics["train_seconds"],
            "tokens_per_second": ours_res.metrics["tokens_per_second"]}
    base = run_trainer(lm, examples, args.steps, args.batch_size, args.out.parent / "trainer_tmp")
    result = {"model": lm.info.name, "device": str(next(lm.model.parameters()).device), "threads":
              torch.get_num_threads(), "steps": args.steps, "batch_size": args.batch_size,
              "examples": len(examples), "modlora": ours, "peft_trainer": base,
              "speedup": ours["tokens_per_second"] / base["tokens_per_second"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ("| trainer | tokens | seconds | tokens/s |\n|---|---|---|---|\n"
             f"| modlora (target-only logits, length-grouped) | {ours['tokens']} | {ours['seconds']:.1f} | "
             f"{ours['tokens_per_second']:.0f} |\n"
             f"| PEFT + transformers.Trainer | {base['tokens']} | {base['seconds']:.1f} | "
             f"{base['tokens_per_second']:.0f} |\n\nspeed-up: {result['speedup']:.2f}x "
             f"({result['device']}, {result['threads']} threads, {args.steps} steps × batch {args.batch_size})\n")
    Path(f"{args.out}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
