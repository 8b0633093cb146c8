"""Routed-forward throughput and peak memory: modlora Arrow vs PEFT Arrow vs one merged LoRA.

Default model: a randomly initialised Llama with SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads, 3 KV heads,
intermediate 1536, vocab 49152), so nothing is downloaded; ``--model PATH`` loads a local HF directory instead.
Experts: E synthetic rank-r LoRAs on q,k,v,o. For each E the script times ``forward`` on a (batch, seq) random batch
for: the base model with one LoRA merged into its weights (the cost floor), modlora's routed model
(``ArrowRouter(top_k)``, automatic path, and the dense-fold path forced), and PEFT's ``create_arrow_model`` (for
``--peft-experts``). Peak memory is the peak process RSS above the pre-call RSS during the timed calls (CPU, sampled
every 2 ms) or ``torch.cuda.max_memory_allocated`` above the pre-call allocation (CUDA).

    python benchmarks/routing_speed.py                       # CPU defaults, ~10 minutes on 2 cores
    python benchmarks/routing_speed.py --device cuda --batch 8 --seq 256
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from modlora.adapters import LoraAdapter, LoraSpec, adapted_modules
from modlora.routing import ArrowRouter, route


def smollm2_shaped(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    return LlamaForCausalLM(cfg).eval()


def synthetic_experts(model: torch.nn.Module, n: int, spec: LoraSpec) -> dict[str, LoraAdapter]:
    modules = dict(model.named_modules())
    names = adapted_modules(model, spec.target_modules)
    g = torch.Generator().manual_seed(1234)
    experts = {}
    for e in range(n):
        A = {m: torch.randn(spec.rank, modules[m].in_features, generator=g) * 0.05 for m in names}
        B = {m: torch.randn(modules[m].out_features, spec.rank, generator=g) * 0.05 for m in names}
        experts[f"expert{e:03d}"] = LoraAdapter(spec, A, B)
    return experts


class PeakMemory:
    """Peak memory above the starting point during a block (RSS sampling on CPU, allocator stats on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.proc = psutil.Process()
            self.start = self.proc.memory_info().rss
            self.max_rss = self.start
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.max_rss = max(self.max_rss, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.stop.set()
            self.thread.join()
            self.peak = self.max_rss - self.start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_forward(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    sync(device)
    gc.collect()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    best = min(times)
    return {"seconds": best, "median_seconds": sorted(times)[len(times) // 2], "peak_mib": mem.peak / 2**20}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local HF model directory (default: random SmolLM2-135M shapes)")
    ap.add_argument("--experts", default="8,32,128,256", help="comma-separated E values")
    ap.add_argument("--peft-experts", default="8,32,128,256", help="E values also run through PEFT Arrow")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tie-qkv", action="store_true", help="also time Arrow with q/k/v-tied prototypes")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default="benchmarks/results/routing_speed", help="output path without extension")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    base = (AutoModelForCausalLM.from_pretrained(args.model).eval() if args.model else smollm2_shaped())
    base = base.to(device=device, dtype=dtype)
    spec = LoraSpec(rank=args.rank, alpha=2.0 * args.rank, dropout=0.0)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    tokens = args.batch * args.seq
    e_values = [int(v) for v in args.experts.split(",") if v]
    peft_values = {int(v) for v in args.peft_experts.split(",") if v}
    rows: list[dict[str, Any]] = []

    def record(method: str, e: int, res: dict[str, float], extra: dict[str, Any] | None = None) -> None:
        row = {"method": method, "experts": e, "tokens": tokens, "tokens_per_s": tokens / res["seconds"], **res,
               **(extra or {})}
        rows.append(row)
        print(f"{method:>22} E={e:<4} {row['tokens_per_s']:9.1f} tok/s  {res['seconds'] * 1e3:8.1f} ms  "
              f"peak {res['peak_mib']:8.1f} MiB", flush=True)

    all_experts = synthetic_experts(base, max(e_values), spec)
    # floor: the base model with one LoRA merged into its weights
    merged = copy.deepcopy(base)
    one = next(iter(all_experts.values()))
    with torch.no_grad():
        mods = dict(merged.named_modules())
        for m in one.modules:
            mods[m].weight += one.delta_weight(m).to(device=device, dtype=dtype)
    floor = time_forward(lambda merged=merged: merged(input_ids=ids), device, args.repeats)
    del merged
    for e in e_values:
        record("merged single LoRA", e, floor)

    for e in e_values:
        experts = {k: all_experts[k] for k in list(all_experts)[:e]}
        variants = [("modlora arrow (auto)", "auto", False), ("modlora arrow (dense)", "dense", False)]
        if args.tie_qkv:
            variants.append(("modlora arrow tied qkv", "auto", True))
        for label, path, tie in variants:
            t0 = time.perf_counter()
            routed = route(base, experts, ArrowRouter(top_k=min(args.top_k, e), tie_qkv=tie), path=path)
            setup = time.perf_counter() - t0
            res = time_forward(lambda routed=routed: routed(input_ids=ids), device, args.repeats)
            routed.restore()
            del routed
            record(label, e, res, {"setup_seconds": setup})
        if e in peft_values:
            from peft import ArrowConfig, create_arrow_model

            with tempfile.TemporaryDirectory() as tmp:
                paths = []
                for name, ad in experts.items():
                    ad.save(Path(tmp) / name)
                    paths.append(str(Path(tmp) / name))
                t0 = time.perf_counter()
                peft_model = create_arrow_model(copy.deepcopy(base), paths,
                                                ArrowConfig(top_k=min(args.top_k, e), router_temperature=1.0,
                                                            rng_seed=0)).eval()
                peft_model.to(device=device, dtype=dtype)
                setup = time.perf_counter() - t0
            res = time_forward(lambda peft_model=peft_model: peft_model(input_ids=ids), device, args.repeats)
            record("peft arrow", e, res, {"setup_seconds": setup})
            del peft_model
            gc.collect()

    by = {(r["method"], r["experts"]): r for r in rows}
    summary = []
    for e in e_values:
        ours = by[("modlora arrow (auto)", e)]
        entry = {"experts": e, "vs_merged_time_ratio": ours["seconds"] / floor["seconds"]}
        if ("peft arrow", e) in by:
            entry["speedup_vs_peft"] = by[("peft arrow", e)]["seconds"] / ours["seconds"]
        summary.append(entry)
    meta = {"model": args.model or "random SmolLM2-135M-shaped Llama", "device": str(device), "dtype": args.dtype,
            "batch": args.batch, "seq": args.seq, "top_k": args.top_k, "rank": args.rank, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2) + "\n")
    lines = [f"# Routing speed ({meta['model']}, {meta['device']}, {args.dtype}, batch {args.batch} × seq {args.seq},"
             f" top-k {args.top_k}, rank {args.rank}, {meta['threads']} threads)", "",
             "| method | E | tokens/s | ms / forward | peak extra MiB | setup s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        setup = f"{r['setup_seconds']:.1f}" if "setup_seconds" in r else ""
        lines.append(f"| {r['method']} | {r['experts']} | {r['tokens_per_s']:.1f} | {r['seconds'] * 1e3:.1f} | "
                     f"{r['peak_mib']:.1f} | {setup} |")
    lines += ["", "| E | modlora time / merged time | speed-up vs PEFT Arrow |", "|---:|---:|---:|"]
    for s in summary:
        sp = f"{s['speedup_vs_peft']:.2f}×" if "speedup_vs_peft" in s else "n/a"
        lines.append(f"| {s['experts']} | {s['vs_merged_time_ratio']:.2f} | {sp} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
