"""Library-build throughput: the same 24 SNI experts, the same steps, built three ways, interleaved in one run.

Methods (each in its own worker process, so that peak memory is attributed to the method that used it):

* ``one_at_a_time`` — today's path before multi-expert training: :func:`modlora.build.training.train_expert` (PEFT layers,
  target-only logits, length-grouped batches), one expert after the other;
* ``together`` — :class:`modlora.build.multitrain.MultiTrainer`: all experts in one loop over mixed batches, per-example
  factors, shared-prefix KV reuse (``together_noprefix``: the same without prefix sharing);
* ``peft_trainer`` — PEFT + ``transformers.Trainer``, one adapter at a time (labels -100 on the prompt, full logits);
* ``together_2x1`` (thread layout, optional) — two 1-thread workers, each training half of the experts together,
  against ``together`` in one 2-thread process.

The build is cut into ``steps`` rounds (24 % steps == 0): in each round every method does the same share of the work
(``together``: one optimizer step of all 24 experts; the one-at-a-time methods: all steps of 24/steps experts). The
driver runs one method's chunk at a time and rotates the order every round (A B C, B C A, ...), so load changes hit
every method alike. Reported per method: examples/s and tokens/s (real, non-padding tokens of the examples trained)
over the whole build, median and min over chunks of the per-chunk examples/s, wall time, the worker's peak RSS
(``ru_maxrss``) and its RSS after loading the model, and the load average at each chunk.

    PYTHONPATH=src python benchmarks/build_throughput.py --dtype float32 --threads 1 --steps 2 --batch-size 2 \\
        --max-prompt-tokens 128 --max-target-tokens 16 --out benchmarks/results/build_throughput_float32

(the size the committed results use: it fits in about ten minutes on a shared 2-core machine). Thread layout:
``--threads 2 --methods together,together_2x1``.

writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

METHODS = ("one_at_a_time", "together", "peft_trainer")
OPTIONAL = ("together_noprefix", "together_2x1")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------------------
# worker side


class _Worker:
    """Holds the model and one method's state; ``chunk(r)`` trains round r's share of the build."""

    def __init__(self, args: argparse.Namespace) -> None:
        from modlora.data import PromptLimits, default_sni_dir, encode_tasks, load_sni_tasks, sni_task_files
        from modlora.models import load_base_model

        torch.set_num_threads(args.threads)
        self.args = args
        self.lm = load_base_model(args.model, device="cpu", dtype=args.dtype)
        names = sorted(sni_task_files(default_sni_dir()))[: args.tasks]
        if args.part is not None:  # together_2x1: this worker's half of the experts
            names = names[args.part::2]
        self.names = names
        tasks = load_sni_tasks(default_sni_dir(), names)
        fmt = PromptLimits(args.max_prompt_tokens, args.max_target_tokens).formatter(self.lm.tokenizer)
        need = args.steps * args.batch_size
        self.examples = {n: encode_tasks(fmt, {n: tasks[n]}, "train", max_per_task=need) for n in names}
        self.rss_loaded = _rss_mb()
        self.trainer: Any = None
        if args.method.startswith("together"):
            self._start_together(prefix=args.method != "together_noprefix")

    def _config(self):
        from modlora.build.training import TrainConfig

        return TrainConfig(steps=self.args.steps, batch_size=self.args.batch_size, lr=1e-4, eval_every=10**6, seed=0)

    def _start_together(self, prefix: bool) -> None:
        from modlora.build.multitrain import ExpertData, MultiTrainer, MultiTrainOptions
        from modlora.library.adapters import LoraSpec

        experts = {n: ExpertData(exs, (), self._config()) for n, exs in self.examples.items()}
        options = MultiTrainOptions(shared_prefix=prefix, max_tokens_per_forward=self.args.max_tokens_per_forward)
        self.trainer = MultiTrainer(self.lm.model, experts, pad_id=self.lm.tokenizer.pad_token_id, spec=LoraSpec(),
                                    options=options)
        self.trainer.__enter__()

    def chunk(self, r: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.trainer is not None:
            stats = self.trainer.step()
            out = {"examples": stats.examples, "tokens": stats.tokens, "loss": stats.mean_loss}
        else:
            per = len(self.names) // self.args.steps
            out = {"examples": 0, "tokens": 0, "loss": 0.0}
            losses = []
            for name in self.names[r * per:(r + 1) * per]:
                res = (self._one(name) if self.args.method == "one_at_a_time" else self._trainer(name))
                out["examples"] += res["examples"]
                out["tokens"] += res["tokens"]
                losses.append(res["loss"])
            out["loss"] = statistics.fmean(losses)
        out.update(seconds=time.perf_counter() - t0, rss_mb=_rss_mb(), rss_loaded_mb=self.rss_loaded)
        return out

    def _one(self, name: str) -> dict[str, Any]:
        from modlora.build.training import train_expert
        from modlora.library.adapters import LoraSpec

        res = train_expert(self.lm.model, self.examples[name], pad_id=self.lm.tokenizer.pad_token_id,
                           spec=LoraSpec(), config=self._config(), progress=False)
        return {"examples": self.args.steps * self.args.batch_size, "tokens": res.metrics["train_tokens"],
                "loss": res.metrics["final_train_loss"]}

    def _trainer(self, name: str) -> dict[str, Any]:
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer, TrainingArguments

        model = get_peft_model(self.lm.model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05,
                                                         task_type="CAUSAL_LM",
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        seen = {"tokens": 0, "examples": 0}
        with tempfile.TemporaryDirectory() as tmp:
            targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=self.args.batch_size,
                                      max_steps=self.args.steps, learning_rate=1e-4,
                                      warmup_steps=int(0.06 * self.args.steps),
                                      lr_scheduler_type="linear", logging_steps=10**6, save_strategy="no",
                                      report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
                                      remove_unused_columns=False, seed=0)
            rows = [{"input_ids": e.prompt_ids + e.target_ids,
                     "labels": [-100] * len(e.prompt_ids) + e.target_ids} for e in self.examples[name]]
            trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=self._collate)
            original = trainer.training_step

            def counting_step(model, inputs, *a, **k):
                seen["tokens"] += int(inputs["attention_mask"].sum())
                seen["examples"] += int(inputs["input_ids"].shape[0])
                return original(model, inputs, *a, **k)

            trainer.training_step = counting_step
            out = trainer.train()
        model.unload()
        return {"examples": seen["examples"], "tokens": seen["tokens"], "loss": float(out.training_loss)}

    def _collate(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        pad = self.lm.tokenizer.pad_token_id
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _release_memory() -> None:
    """Hand freed heap back to the OS between chunks, so that idle workers do not hold their peak (several GB)
    while another method's chunk runs; peak RSS is still reported from ``ru_maxrss``."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def worker_main(args: argparse.Namespace) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the protocol
    worker = _Worker(args)
    _release_memory()
    proto.write(json.dumps({"ready": True, "rss_loaded_mb": worker.rss_loaded}) + "\n")
    for line in sys.stdin:
        r = int(line)
        reply = worker.chunk(r)
        _release_memory()
        proto.write(json.dumps(reply) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# driver side


def _spawn(args: argparse.Namespace, method: str, threads: int, part: int | None, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", method, "--threads", str(threads), "--dtype", args.dtype,
           "--model", args.model, "--tasks", str(args.tasks), "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--max-prompt-tokens", str(args.max_prompt_tokens), "--max-target-tokens",
           str(args.max_target_tokens), "--max-tokens-per-forward", str(args.max_tokens_per_forward)]
    if part is not None:
        cmd += ["--part", str(part)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            env=env, bufsize=1)


def _read(proc: subprocess.Popen, log: Path) -> dict[str, Any]:
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"worker died; its log ({log}):\n" + log.read_text()[-3000:])
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tasks", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--max-target-tokens", type=int, default=32)
    ap.add_argument("--max-tokens-per-forward", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, from {', '.join(METHODS + OPTIONAL)}")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/build_throughput"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.method = args.worker
        worker_main(args)
        return
    if args.tasks % args.steps:
        ap.error("--tasks must be a multiple of --steps (each round trains tasks/steps experts one at a time)")
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS + OPTIONAL)
    if unknown:
        ap.error(f"unknown method(s): {', '.join(sorted(unknown))}")
    logdir = Path(tempfile.mkdtemp(prefix="build_throughput_"))
    procs: dict[str, list[tuple[subprocess.Popen, Path]]] = {}
    for m in methods:
        if m == "together_2x1":
            procs[m] = [(_spawn(args, "together", 1, p, logdir / f"{m}{p}.log"), logdir / f"{m}{p}.log")
                        for p in (0, 1)]
        else:
            procs[m] = [(_spawn(args, m, args.threads, None, logdir / f"{m}.log"), logdir / f"{m}.log")]
    ready = {m: [_read(p, log) for p, log in ps] for m, ps in procs.items()}
    chunks: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(args.steps):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            t0 = time.perf_counter()
            for p, _ in procs[m]:
                p.stdin.write(f"{r}\n")
            replies = [_read(p, log) for p, log in procs[m]]
            wall = time.perf_counter() - t0
            chunk = {"round": r, "seconds": wall, "examples": sum(x["examples"] for x in replies),
                     "tokens": sum(x["tokens"] for x in replies), "loss": statistics.fmean(x["loss"] for x in replies),
                     "rss_mb": sum(x["rss_mb"] for x in replies), "loadavg": os.getloadavg()[0]}
            chunks[m].append(chunk)
            print(f"round {r + 1}/{args.steps} {m:18s} {chunk['examples'] / wall:6.2f} ex/s "
                  f"{chunk['tokens'] / wall:7.0f} tok/s  load {chunk['loadavg']:.1f}", flush=True)
    for ps in procs.values():
        for p, _ in ps:
            p.stdin.close()
            p.wait()
    summary = {}
    for m, cs in chunks.items():
        wall = sum(c["seconds"] for c in cs)
        rates = [c["examples"] / c["seconds"] for c in cs]
        summary[m] = {"examples": sum(c["examples"] for c in cs), "tokens": sum(c["tokens"] for c in cs),
                      "seconds": wall, "examples_per_s": sum(c["examples"] for c in cs) / wall,
                      "tokens_per_s": sum(c["tokens"] for c in cs) / wall,
                      "median_chunk_examples_per_s": statistics.median(rates), "min_chunk_examples_per_s": min(rates),
                      "peak_rss_mb": max(c["rss_mb"] for c in cs),
                      "rss_after_load_mb": sum(x["rss_loaded_mb"] for x in ready[m]),
                      "final_loss": cs[-1]["loss"], "chunks": cs}
    ratios = {}
    if "together" in summary:
        for m in summary:
            if m != "together":
                ratios[f"together_vs_{m}"] = summary["together"]["examples_per_s"] / summary[m]["examples_per_s"]
    loads = [c["loadavg"] for cs in chunks.values() for c in cs]
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model, "dtype": args.dtype,
              "threads": args.threads, "tasks": args.tasks, "steps_per_task": args.steps,
              "batch_size": args.batch_size, "max_prompt_tokens": args.max_prompt_tokens,
              "max_target_tokens": args.max_target_tokens, "cpu_count": os.cpu_count(),
              "loadavg_min": min(loads), "loadavg_max": max(loads), "methods": summary, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"`{result['command']}`", "",
             f"{args.tasks} SNI tasks × {args.steps} steps × batch {args.batch_size} (prompt ≤ {args.max_prompt_tokens}, "
             f"target ≤ {args.max_target_tokens} tokens), {args.dtype}, {args.threads} threads per worker, "
             f"{args.steps} interleaved rounds; load average {min(loads):.1f}–{max(loads):.1f} on "
             f"{os.cpu_count()} CPUs.", "",
             "| method | examples/s | median chunk | min chunk | tokens/s | wall s | peak RSS MB | RSS after load MB "
             "| final loss |", "|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s['examples_per_s']:.2f} | {s['median_chunk_examples_per_s']:.2f} | "
                     f"{s['min_chunk_examples_per_s']:.2f} | {s['tokens_per_s']:.0f} | {s['seconds']:.1f} | "
                     f"{s['peak_rss_mb']:.0f} | {s['rss_after_load_mb']:.0f} | {s['final_loss']:.3f} |")
    lines += ["", *[f"- {k}: {v:.2f}×" for k, v in ratios.items()], ""]
    Path(f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
