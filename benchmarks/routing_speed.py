"""Routed-forward throughput and peak memory: modlora Arrow vs PEFT Arrow vs one merged LoRA.

Default model: a randomly initialised Llama with SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads, 3 KV heads,
intermediate 1536, vocab 49152), so nothing is downloaded; ``--model PATH`` loads a local HF directory instead.
Experts: E synthetic rank-r LoRAs on q,k,v,o. For each E the script times ``forward`` (under
``torch.inference_mode``) on a (batch, seq) random batch for:

* ``merged single LoRA`` — the base model with one LoRA merged into its weights (the cost floor);
* ``modlora arrow (auto)`` — ``route(model, experts, ArrowRouter(top_k))`` with the automatic compute path;
* ``modlora arrow (dense)`` — the same routed model forced onto the dense-fold path (``--no-dense`` skips it);
* ``peft arrow`` — PEFT's ``create_arrow_model`` (for E in ``--peft-experts``, ``--peft-repeats`` calls).

PEFT loads adapters one at a time and each load walks every module, so building its Arrow model costs ~E²·layers
(measured on 2 cores: 6 s at E=8, 22 s at E=32, 75 s at E=64 for 30 layers; E=256 would take ~20 minutes). So the
full-depth run compares with PEFT at small E, and a second, **shallow** run (``--shallow-experts`` on the first
``--shallow-layers`` decoder layers of the same model, lm_head included) times merged / modlora / PEFT side by side
at E=32, 128, 256 on the decoder stack only (no lm_head, which would otherwise dominate a 2-layer model). The
summary also gives a full-depth estimate, ``T_full ≈ T_full(merged) + (30/2)·(T_shallow − T_shallow(merged))`` per
method; E=32 is measured at both depths to check that estimate.

Measurement discipline (the machine may be shared): the methods are interleaved call by call (A/B/C/A/B/C…) so
that contention hits them alike; each call is timed on its own; the table gives the median and the minimum; the
ratios are taken from the medians and from the minima; ``os.getloadavg()`` is recorded before and after each E.
Peak memory is the peak process RSS above the pre-call RSS during one extra call per method (sampled every 1 ms,
after ``malloc_trim`` so that memory kept by the allocator from earlier calls does not hide it).

    python benchmarks/routing_speed.py                       # CPU defaults (2 threads), writes *_cpu.{json,md}
    python benchmarks/routing_speed.py --threads 1 --out benchmarks/results/routing_speed_cpu_1thread
    python benchmarks/routing_speed.py --device cuda --batch 8 --seq 256 --threads 0 --shallow-experts ""
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modlora.library.adapters import LoraAdapter, LoraSpec, adapted_modules
from modlora.models import load_base_model
from modlora.reuse.routing import ArrowRouter, route

MERGED, AUTO, DENSE, PEFT = "merged single LoRA", "modlora arrow (auto)", "modlora arrow (dense)", "peft arrow"
TIED = "modlora arrow (auto, tied q/k/v)"


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
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.stop.set()
            self.thread.join()
            self.max_rss = max(self.max_rss, self.proc.memory_info().rss)
            self.peak = self.max_rss - self.start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call. On a shared CPU the CPU time is the steadier of the two: it
    leaves out the time the process waited for a core (it still pays for caches shared with other jobs)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``) so that RSS growth during a call reflects what
    that call allocates rather than being hidden by memory freed earlier and kept by the allocator."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_of(fn: Callable[[], Any], device: torch.device) -> float:
    release_free_memory()
    with PeakMemory(device) as mem, torch.inference_mode():
        fn()
    return mem.peak / 2**20


def interleaved(fns: dict[str, Callable[[], Any]], repeats: dict[str, int], device: torch.device
                ) -> dict[str, list[tuple[float, float]]]:
    """One warm-up call each, then rounds of one call per method (a method drops out after its ``repeats``);
    (wall, CPU) seconds per call."""
    for fn in fns.values():
        timed_call(fn, device)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for i in range(max(repeats.values())):
        for name, fn in fns.items():
            if i < repeats[name]:
                times[name].append(timed_call(fn, device))
    return times


def merged_copy(model: torch.nn.Module, adapter: LoraAdapter) -> torch.nn.Module:
    """A copy of ``model`` with ``adapter``'s ΔW added to its weights (the cost floor: no adapter at run time)."""
    merged = copy.deepcopy(model)
    weight = next(merged.parameters())
    with torch.no_grad():
        mods = dict(merged.named_modules())
        for m in adapter.modules:
            if m in mods:
                mods[m].weight += adapter.delta_weight(m).to(device=weight.device, dtype=weight.dtype)
    return merged


def build_peft_arrow(base: torch.nn.Module, experts: dict[str, LoraAdapter], top_k: int,
                     cache: Path | None = None, tag: str = "") -> tuple[Any, float]:
    """PEFT's ``create_arrow_model`` over ``experts`` (saved to a temporary directory first); returns the model and
    the seconds ``create_arrow_model`` took (PEFT loads adapters one by one; its cost grows ~E²·layers).

    With ``cache`` the built PEFT model is kept there (``torch.save`` of the module, a benchmark-only cache keyed by
    model, depth, E, rank and top-k) together with its measured build time, so that the ~20-minute E=256 build is
    paid once; the timed forward is PEFT's own module either way.
    """
    from peft import ArrowConfig, create_arrow_model

    weight = next(base.parameters())
    first = next(iter(experts.values()))
    key = (f"peft_arrow_{tag}_L{base.config.num_hidden_layers}_E{len(experts)}_r{first.spec.rank}_k{top_k}_"
           f"{str(weight.dtype).removeprefix('torch.')}")
    if cache is not None and (cache / f"{key}.pt").is_file():
        model = torch.load(cache / f"{key}.pt", weights_only=False, map_location=weight.device)
        return model.eval(), json.loads((cache / f"{key}.json").read_text())["setup_s"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, ad in experts.items():
            ad.save(Path(tmp) / name)
            paths.append(str(Path(tmp) / name))
        t0 = time.perf_counter()
        model = create_arrow_model(copy.deepcopy(base), paths,
                                   ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)).eval()
        model.to(device=weight.device, dtype=weight.dtype)
        setup = time.perf_counter() - t0
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model, cache / f"{key}.pt.tmp")
        os.replace(cache / f"{key}.pt.tmp", cache / f"{key}.pt")
        (cache / f"{key}.json").write_text(json.dumps({"setup_s": setup}))
    return model, setup


def run_depth(base: torch.nn.Module, all_experts: dict[str, LoraAdapter], e_values: list[int], peft_values: set[int],
              args: argparse.Namespace, ids: torch.Tensor, label: str) -> list[dict[str, Any]]:
    """Interleaved timings of merged / modlora auto / (modlora dense) / (PEFT) on ``base`` for every E. The full
    run times the whole causal LM; the shallow run times the decoder stack only (``lm.model``, no lm_head)."""
    device = ids.device

    def decoder(lm: torch.nn.Module) -> torch.nn.Module:
        return lm if label == "full" else lm.model
    layers = base.config.num_hidden_layers
    tokens = ids.numel()
    present = set(dict(base.named_modules()))          # a shallow model keeps only its layers' modules
    experts_here = {n: LoraAdapter(a.spec, {m: t for m, t in a.A.items() if m in present},
                                   {m: t for m, t in a.B.items() if m in present})
                    for n, a in all_experts.items()}
    merged = merged_copy(base, next(iter(experts_here.values())))
    tied_base = copy.deepcopy(base) if args.tied_variant and label == "full" else None
    rows = []
    for e in e_values:
        experts = {k: experts_here[k] for k in list(experts_here)[:e]}
        load_before = os.getloadavg()
        setup: dict[str, float] = {}
        peft_model = None   # built before route(), which swaps the base model's linears
        if e in peft_values:
            peft_model, setup[PEFT] = build_peft_arrow(base, experts, min(args.top_k, e), args.peft_cache,
                                                       args.model_tag)
        t0 = time.perf_counter()
        routed = route(base, experts, ArrowRouter(top_k=min(args.top_k, e), tie_qkv=args.tie_qkv))
        setup[AUTO] = setup[DENSE] = time.perf_counter() - t0

        def run_routed(path: str, routed: Any = routed) -> Any:
            routed.set_path(path)
            return decoder(routed.model)(input_ids=ids)

        fns: dict[str, Callable[[], Any]] = {MERGED: lambda: decoder(merged)(input_ids=ids),
                                             AUTO: lambda: run_routed("auto")}
        tied = None
        if args.tied_variant and label == "full" and not args.tie_qkv:
            t0 = time.perf_counter()
            tied = route(tied_base, experts, ArrowRouter(top_k=min(args.top_k, e), tie_qkv=True))
            setup[TIED] = time.perf_counter() - t0
            fns[TIED] = lambda tied=tied: decoder(tied.model)(input_ids=ids)
        if not args.no_dense and label == "full":
            fns[DENSE] = lambda: run_routed("dense")
        if peft_model is not None:
            fns[PEFT] = lambda lm=peft_model.base_model.model: decoder(lm)(input_ids=ids)
        ours_repeats = args.repeats if label == "full" else args.shallow_repeats
        repeats = {name: (args.peft_repeats if name == PEFT else ours_repeats) for name in fns}
        times = interleaved(fns, repeats, device)
        peaks = {name: peak_of(fn, device) for name, fn in fns.items()}
        routed.restore()
        if tied is not None:
            tied.restore()
        del routed, peft_model, fns, tied
        gc.collect()
        load_after = os.getloadavg()
        for name, pairs in times.items():
            ts, cpu = [w for w, _ in pairs], [c for _, c in pairs]
            med, best = statistics.median(ts), min(ts)
            row = {"method": name, "experts": e, "layers": layers, "depth": label, "tokens": tokens,
                   "calls": len(ts), "median_ms": med * 1e3, "min_ms": best * 1e3,
                   "cpu_median_ms": statistics.median(cpu) * 1e3, "cpu_min_ms": min(cpu) * 1e3,
                   "tokens_per_s_median": tokens / med, "tokens_per_s_best": tokens / best,
                   "peak_extra_mib": peaks[name], "setup_s": setup.get(name), "loadavg_before": load_before[0],
                   "loadavg_after": load_after[0], "times_ms": [t * 1e3 for t in ts],
                   "cpu_times_ms": [c * 1e3 for c in cpu]}
            rows.append(row)
            print(f"[{layers} layers] {name:>22} E={e:<4} {row['tokens_per_s_median']:9.1f} tok/s (median; best "
                  f"{row['tokens_per_s_best']:.1f})  {row['median_ms']:8.1f} ms  min {row['min_ms']:8.1f} ms  "
                  f"cpu {row['cpu_median_ms']:8.1f} ms  "
                  f"peak {peaks[name]:7.1f} MiB  load {load_before[0]:.1f}->{load_after[0]:.1f}", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (depth, E): modlora/merged time ratio and modlora/PEFT throughput ratio (median; min). For shallow rows
    also a full-depth estimate: ``T_full(method) ≈ T_full(merged) + (L_full / L_shallow)·(T_sh(method) −
    T_sh(merged))`` (the decoder layers are identical, so a method's extra cost scales with depth)."""
    by = {(r["depth"], r["method"], r["experts"]): r for r in rows}
    full_merged = [r for r in rows if r["depth"] == "full" and r["method"] == MERGED]
    summary = []
    for depth, method, e in by:
        if method != AUTO:
            continue
        ours, floor = by[(depth, AUTO, e)], by[(depth, MERGED, e)]
        entry: dict[str, Any] = {"depth": depth, "layers": ours["layers"], "experts": e,
                                 "vs_merged_time_ratio_median": ours["median_ms"] / floor["median_ms"],
                                 "vs_merged_time_ratio_min": ours["min_ms"] / floor["min_ms"],
                                 "vs_merged_cpu_ratio_median": ours["cpu_median_ms"] / floor["cpu_median_ms"]}
        if (depth, TIED, e) in by:
            tied = by[(depth, TIED, e)]
            entry["tied_vs_merged_time_ratio_median"] = tied["median_ms"] / floor["median_ms"]
            entry["tied_vs_merged_time_ratio_min"] = tied["min_ms"] / floor["min_ms"]
            entry["tied_vs_merged_cpu_ratio_median"] = tied["cpu_median_ms"] / floor["cpu_median_ms"]
            if (depth, PEFT, e) in by:
                entry["tied_speedup_vs_peft_median"] = tied["tokens_per_s_median"] / by[(depth, PEFT, e)][
                    "tokens_per_s_median"]
        if (depth, PEFT, e) in by:
            peft_row = by[(depth, PEFT, e)]
            entry["speedup_vs_peft_median"] = ours["tokens_per_s_median"] / peft_row["tokens_per_s_median"]
            entry["speedup_vs_peft_min"] = ours["tokens_per_s_best"] / peft_row["tokens_per_s_best"]
            if depth == "shallow" and full_merged:
                m_full = statistics.median(r["median_ms"] for r in full_merged)
                scale = full_merged[0]["layers"] / ours["layers"]
                est_ours = m_full + scale * (ours["median_ms"] - floor["median_ms"])
                est_peft = m_full + scale * (peft_row["median_ms"] - floor["median_ms"])
                entry["full_depth_estimate"] = {"merged_ms": m_full, "modlora_ms": est_ours, "peft_ms": est_peft,
                                                "vs_merged_time_ratio": est_ours / m_full,
                                                "speedup_vs_peft": est_peft / est_ours}
        summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="'smollm2-135m' (the embedded default), an HF id or a local HF "
                    "directory (default: a random Llama with SmolLM2-135M's shapes)")
    ap.add_argument("--experts", default="8,32,128,256", help="comma-separated E values")
    ap.add_argument("--peft-experts", default="8,32", help="E values also run through PEFT Arrow at full depth")
    ap.add_argument("--shallow-experts", default="32,128,256",
                    help="E values for the shallow comparison (merged, modlora, PEFT on the first --shallow-layers "
                         "layers; '' to skip)")
    ap.add_argument("--shallow-layers", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per modlora/merged method and E")
    ap.add_argument("--peft-repeats", type=int, default=5, help="timed calls of PEFT per E")
    ap.add_argument("--shallow-repeats", type=int, default=15, help="timed calls per method in the shallow run")
    ap.add_argument("--no-dense", action="store_true", help="skip the forced dense-fold variant")
    ap.add_argument("--tie-qkv", action="store_true", help="route with q/k/v-tied Arrow prototypes")
    ap.add_argument("--tied-variant", action="store_true",
                    help="also time Arrow with q/k/v-tied prototypes (the reference's choice for fused QKV) next to "
                         "the default untied one, on a copy of the model")
    ap.add_argument("--peft-cache", type=Path, default=None,
                    help="keep built PEFT Arrow models here and reuse them (E=256 takes ~20 min to build)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's choice)")
    ap.add_argument("--out", default=None,
                    help="output path without extension (default: benchmarks/results/routing_speed_<device>)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    base = load_base_model(args.model, device=device, dtype=dtype).model if args.model else smollm2_shaped()
    base = base.to(device=device, dtype=dtype)
    args.model_tag = (args.model or "random").replace("/", "_")
    spec = LoraSpec(rank=args.rank, alpha=2.0 * args.rank, dropout=0.0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(device)
    e_values = [int(v) for v in args.experts.split(",") if v]
    shallow_values = [int(v) for v in args.shallow_experts.split(",") if v]
    all_experts = synthetic_experts(base, max(e_values + shallow_values), spec)
    rows = run_depth(base, all_experts, e_values, {int(v) for v in args.peft_experts.split(",") if v}, args, ids,
                     "full")
    if shallow_values:
        shallow = copy.deepcopy(base)
        shallow.model.layers = shallow.model.layers[: args.shallow_layers]
        shallow.config.num_hidden_layers = args.shallow_layers
        rows += run_depth(shallow, all_experts, shallow_values, set(shallow_values), args, ids, "shallow")
        del shallow
    summary = summarise(rows)
    meta = {"model": args.model or "random SmolLM2-135M-shaped Llama", "device": str(device), "dtype": args.dtype,
            "batch": args.batch, "seq": args.seq, "top_k": args.top_k, "rank": args.rank, "repeats": args.repeats,
            "peft_repeats": args.peft_repeats,
            "shallow_repeats": args.shallow_repeats, "tie_qkv": args.tie_qkv, "threads": torch.get_num_threads(),
            "layers": base.config.num_hidden_layers, "shallow_layers": args.shallow_layers,
            "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    out = Path(args.out or f"benchmarks/results/routing_speed_{device.type}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2) + "\n")
    lines = [f"# Routing speed ({meta['model']}, {meta['device']}, {args.dtype}, batch {args.batch} × seq {args.seq},"
             f" top-k {args.top_k}, rank {args.rank}, {meta['threads']} threads)", "",
             "Methods interleaved call by call; median and min over the timed calls (wall clock), and the median "
             "process CPU time per call (steadier on a shared machine); load = 1-min load average "
             "before → after each E. PEFT's `create_arrow_model` loads adapters one by one at a cost ~E²·layers (its "
             "setup column); `--peft-cache` keeps a built PEFT model so that the E = 256 build is paid once. Rows "
             "with `layers` < full depth (`--shallow-experts`) time the decoder stack only (no lm_head) of the first "
             "layers, and the full-depth estimate scales each method's extra time over merged by the depth ratio.", "",
             "| layers | method | E | tokens/s (median) | ms / forward (median) | ms (min) | CPU ms (median) | calls "
             "| peak extra RSS MiB | setup s | load |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        setup_s = f"{r['setup_s']:.1f}" if r["setup_s"] is not None else ""
        lines.append(f"| {r['layers']} | {r['method']} | {r['experts']} | {r['tokens_per_s_median']:.1f} | "
                     f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['cpu_median_ms']:.1f} | {r['calls']} | "
                     f"{r['peak_extra_mib']:.1f} | "
                     f"{setup_s} | {r['loadavg_before']:.1f}→{r['loadavg_after']:.1f} |")
    lines += ["", "| layers | E | modlora time / merged time (median; min) | CPU time / merged (median) | modlora "
              "throughput / PEFT throughput (median; min) | full-depth estimate: modlora / merged, speed-up vs PEFT | "
              "tied q/k/v: time / merged (median; min; CPU), speed-up vs PEFT |", "|---:|---:|---:|---:|---:|---|---|"]
    for s in summary:
        sp = (f"{s['speedup_vs_peft_median']:.2f}× ; {s['speedup_vs_peft_min']:.2f}×"
              if "speedup_vs_peft_median" in s else "n/a")
        est = s.get("full_depth_estimate")
        est_s = f"{est['vs_merged_time_ratio']:.2f} , {est['speedup_vs_peft']:.2f}×" if est else ""
        tied_s = (f"{s['tied_vs_merged_time_ratio_median']:.2f} ; {s['tied_vs_merged_time_ratio_min']:.2f} ; "
                  f"{s['tied_vs_merged_cpu_ratio_median']:.2f}" if "tied_vs_merged_time_ratio_median" in s else "")
        if "tied_speedup_vs_peft_median" in s:
            tied_s += f" , {s['tied_speedup_vs_peft_median']:.2f}×"
        lines.append(f"| {s['layers']}{' (decoder only)' if s['depth'] == 'shallow' else ''} | {s['experts']} | "
                     f"{s['vs_merged_time_ratio_median']:.2f} ; {s['vs_merged_time_ratio_min']:.2f} | "
                     f"{s['vs_merged_cpu_ratio_median']:.2f} | {sp} | {est_s} | "
                     f"{tied_s} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
