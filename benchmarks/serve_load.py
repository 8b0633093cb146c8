"""Load test of ``modlora serve`` on loopback against a sequential ``prepare_model(...).generate`` loop, interleaved.

Setup: the base model (default the embedded ``smollm2-135m``) and a library of ``--experts`` synthetic rank-4 LoRA
experts on q,k,v,o (in a temporary directory); ``modlora serve`` runs as a subprocess (the real CLI) with Arrow
routing, top-k ``--top-k``, ``--max-batch`` the largest concurrency. Every request is greedy and streamed
(``/v1/completions``, SSE), the prompt formatted with the model's chat template.

Two workloads:

* ``sni``: held-out SNI instances (``../shared/data/sni/heldout``) whose formatted prompt has at most
  ``--max-prompt-tokens`` tokens (never cut: a cut prompt would lose its task definition), answers as the model
  produces them (up to ``--sni-max-tokens``, ending at its end-of-sequence token). Request j of an arm takes the next
  unused instance of task ``j mod tasks``: every arm sees the same tasks, and no prompt is ever sent twice (prompts
  of one task share their definition, as in production; an exact repeat would flatter the prefix cache).
* ``short``: distinct one-line story prompts, ``--short-max-tokens`` (64) answer tokens.

Arms, in ``--rounds`` rounds, interleaved (round 1: sni loop, sni c=1, …, short loop, …; round 2: …):
``generate loop`` (this process, one request at a time, in a worker thread as the server's model runs in its
engine thread) and ``serve c=N`` (N requests in flight). An arm sends ``max(--requests, N)`` requests per round.

Reported per arm: completion tokens/s (tokens ÷ the round's wall time; median and minimum over rounds) and its ratio
to the loop's, time to first token and request latency (p50/p95 over all rounds), errors, and the load average
around each arm. Before the rounds, ``--check`` prompts of each workload are served and compared with the loop's
greedy text (they must be identical). Results: ``--out``.json and .md (with the command).

    python benchmarks/serve_load.py --rounds 2 --requests 8 --concurrency 1,4,16,64 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers.generation.streamers import BaseStreamer

from modlora.data import PromptLimits, load_sni_tasks
from modlora.library.adapters import LoraSpec, random_adapter
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.reuse.prepare import prepare_model
from modlora.serve.server import free_port

ROOT = Path(__file__).resolve().parents[1]
LOOP = "generate loop"
SUBJECTS = ["a lighthouse keeper", "a lost robot", "two rival bakers", "a dragon who fears fire", "a tiny island",
            "a forgotten library", "a winter fox", "a clockmaker", "a river that talks", "a shy astronaut",
            "a haunted violin", "a garden on the moon", "a detective cat", "an old sailor", "a paper boat",
            "a city under the sea", "a brave snail", "a broken umbrella", "a singing whale", "a desert train",
            "a retired wizard", "a curious owl", "a mountain village", "a stolen painting"]
STYLES = ["a short story", "a bedtime story", "a funny story", "a sad story", "a mystery story", "a fable",
          "a fairy tale", "an adventure story", "a love story", "a science fiction story"]

@dataclass
class Outcome:
    """One request: ``latency`` and time to first token ``ttft`` (s), completion ``tokens``, its ``text``, error."""

    latency: float
    ttft: float | None
    tokens: int
    text: str = ""
    error: str | None = None


class PromptSource:
    """Distinct prompts of one workload, drawn in order (never one twice)."""

    def __init__(self, name: str, tokenizer: Any, args: argparse.Namespace) -> None:
        self.name = name
        self.tokenizer = tokenizer
        if name == "sni":
            tasks = load_sni_tasks(args.data)
            fmt = PromptLimits(max(args.max_prompt_tokens, 8)).formatter(tokenizer)
            self.pool: list[list[str]] = []
            for task_name in sorted(tasks):
                task = tasks[task_name]
                texts = [fmt.prompt_text(task.definition, inst.input) for inst in task.instances]
                fitting = [t for t in texts if len(tokenizer(t)["input_ids"]) <= args.max_prompt_tokens]
                if fitting:
                    self.pool.append(fitting)
            self.max_tokens = args.sni_max_tokens
        else:
            fmt = PromptLimits().formatter(tokenizer)
            texts = [f"Write {style} about {subject}." for style in STYLES for subject in SUBJECTS]
            self.pool = [[fmt.prompt_text("", t) for t in texts]]
            self.max_tokens = args.short_max_tokens
        self.used = [0] * len(self.pool)

    def check_enough(self, counts: Sequence[int]) -> None:
        """Refuse, before any arm runs, a plan of ``take(n)`` calls (``counts``) that would run out of prompts: a dry
        run of :meth:`take` (which exits naming the task), the prompts then given back."""
        used = list(self.used)
        for n in counts:
            self.take(n)
        self.used = used

    def take(self, count: int) -> list[str]:
        out = []
        for j in range(count):
            t = j % len(self.pool)
            if self.used[t] >= len(self.pool[t]):
                raise SystemExit(f"{self.name}: task {t} ran out of prompts; use fewer --requests or --rounds")
            out.append(self.pool[t][self.used[t]])
            self.used[t] += 1
        return out

    def prompt_tokens(self, prompts: list[str]) -> list[int]:
        return [len(self.tokenizer(p)["input_ids"]) for p in prompts]


def build_library(lm: Any, path: Path, experts: int) -> ExpertLibrary:
    lib = ExpertLibrary.create(path, lm.info)
    spec = LoraSpec(rank=4, alpha=16, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    for i in range(experts):
        lib.add(f"synthetic{i}", random_adapter(lm.model, spec, seed=i, std=0.02), tasks=[f"synthetic{i}"])
    return lib


def start_server(lib: Path, args: argparse.Namespace, port: int) -> tuple[subprocess.Popen, float]:
    """The ``modlora serve`` subprocess and the seconds until ``/health`` answered."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = ["nice", "-n", str(args.nice), sys.executable, "-m", "modlora.cli", "serve", str(lib), "--model",
           args.model, "--port", str(port), "--threads", str(args.threads), "--route-top-k", str(args.top_k),
           "--max-batch", str(max(args.concurrency)), "--max-queue", str(4 * max(args.concurrency)),
           "--prefill-tokens", str(args.prefill_tokens)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = t0 + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"modlora serve exited: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("modlora serve did not come up in 300 s")
        time.sleep(0.5)


async def _one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> Outcome:
    body = {"model": "lib", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, parts = None, 0, []
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return Outcome(time.perf_counter() - t0, None, 0, error=f"HTTP {r.status_code}: "
                               f"{(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome(time.perf_counter() - t0, ttft, tokens, error=str(chunk["error"])[:200])
                for choice in chunk.get("choices", []):
                    if choice.get("text"):
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        parts.append(choice["text"])
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
    except httpx.HTTPError as exc:
        return Outcome(time.perf_counter() - t0, ttft, tokens, error=f"{type(exc).__name__}: {exc}")
    return Outcome(time.perf_counter() - t0, ttft, tokens, "".join(parts))


def serve_round(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """``prompts`` with at most ``concurrency`` requests in flight (asyncio, one client thread)."""
    async def run() -> list[Outcome]:
        gate = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=1200, limits=limits) as client:
            async def gated(p: str) -> Outcome:
                async with gate:
                    return await _one(client, url, p, max_tokens)
            return list(await asyncio.gather(*(gated(p) for p in prompts)))

    t0 = time.perf_counter()
    outcomes = asyncio.run(run())
    return {"wall_s": time.perf_counter() - t0, "outcomes": outcomes}


class _FirstToken(BaseStreamer):
    """Records when ``generate`` produced its first new token (its first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


@torch.inference_mode()
def loop_round(reuse: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """The baseline: ``generate`` on one request at a time."""
    outcomes = []
    t0 = time.perf_counter()
    for prompt in prompts:
        t = time.perf_counter()
        enc = tokenizer(prompt, return_tensors="pt")
        first = _FirstToken()
        out = reuse.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, streamer=first)
        new = out[0, enc["input_ids"].shape[1]:]
        outcomes.append(Outcome(time.perf_counter() - t, None if first.at is None else first.at - t, len(new),
                                tokenizer.decode(new, skip_special_tokens=True)))
    return {"wall_s": time.perf_counter() - t0, "outcomes": outcomes}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarise(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm, rs in rounds.items():
        tps = [sum(o.tokens for o in r["outcomes"]) / r["wall_s"] for r in rs]
        oks = [o for r in rs for o in r["outcomes"] if o.error is None]
        errors = [o.error for r in rs for o in r["outcomes"] if o.error]
        lat = [o.latency for o in oks]
        ttft = [o.ttft for o in oks if o.ttft is not None]
        out[arm] = {"requests": sum(len(r["outcomes"]) for r in rs), "errors": len(errors),
                    "error_samples": errors[:3], "completion_tokens": sum(o.tokens for o in oks),
                    "tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps),
                    "tokens_per_s_rounds": [round(x, 3) for x in tps],
                    "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
                    "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95)}
    base = out[LOOP]["tokens_per_s_median"]
    for arm in out:
        out[arm]["speedup_vs_loop"] = out[arm]["tokens_per_s_median"] / base
        per_round = [a / b for a, b in zip(out[arm]["tokens_per_s_rounds"], out[LOOP]["tokens_per_s_rounds"],
                                           strict=True)]
        out[arm]["speedup_rounds"] = [round(x, 3) for x in per_round]
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    cfg, machine = result["config"], result["machine"]
    lines = [f"# `modlora serve` under load vs a sequential `generate` loop ({cfg['model']})", "",
             f"Command: `{result['command']}`", "",
             f"Library: {cfg['experts']} synthetic rank-4 experts (q,k,v,o), Arrow top-{cfg['top_k']}; greedy, "
             f"streamed; torch threads {cfg['threads']} in the server and in the loop; {cfg['rounds']} interleaved "
             f"rounds; an arm sends max({cfg['requests']}, concurrency) requests per round. Machine: "
             f"{machine['cpus']} CPUs shared with other jobs, load average (1 min) {machine['loadavg_start'][0]} at "
             f"the start, {machine['loadavg_end'][0]} at the end, per arm between "
             f"{machine['loadavg_min']} and {machine['loadavg_max']}. Server start-up: {result['server_start_s']:.1f} s "
             f"to /health.", ""]
    for name, wl in result["workloads"].items():
        lines += [f"## {name}: {wl['description']}", "",
                  f"Greedy check: {wl['check']['identical']} of {wl['check']['compared']} served texts identical to "
                  "the loop's.", "",
                  "| arm | requests | errors | tokens | tok/s median | tok/s min | × loop (median) | × loop per round "
                  "| TTFT p50 s | TTFT p95 s | latency p50 s | latency p95 s |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for arm, s in wl["summary"].items():
            lines.append(f"| {arm} | {s['requests']} | {s['errors']} | {s['completion_tokens']} | "
                         f"{s['tokens_per_s_median']:.1f} | {s['tokens_per_s_min']:.1f} | "
                         f"{s['speedup_vs_loop']:.2f} | {', '.join(f'{x:.2f}' for x in s['speedup_rounds'])} | "
                         f"{_fmt(s['ttft_p50_s'])} | {_fmt(s['ttft_p95_s'])} | {_fmt(s['latency_p50_s'])} | "
                         f"{_fmt(s['latency_p95_s'])} |")
        lines.append("")
    lines += ["Tokens/s of an arm in one round: the completion tokens it produced ÷ the round's wall time; median "
              "and minimum over rounds; × loop: ratio of the medians (and per round, against the same round's "
              "loop). TTFT: request sent → first text chunk (loop: → first new token of `generate`). Latency: "
              "request sent → last chunk.", "",
              f"Server counters at the end: {result['server_stats']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workloads", default="sni,short", help="comma-separated: sni, short")
    ap.add_argument("--requests", type=int, default=8, help="requests per arm and round, at least the concurrency")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--concurrency", default="1,4,16,64", help="requests in flight of the server arms")
    ap.add_argument("--sni-max-tokens", type=int, default=128, help="cap on SNI answers (they end at EOS)")
    ap.add_argument("--short-max-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=384)
    ap.add_argument("--check", type=int, default=3, help="prompts per workload checked against the loop's text")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill-tokens", type=int, default=256, help="the server's --prefill-tokens (default 256)")
    ap.add_argument("--nice", type=int, default=0, help="niceness of the server subprocess (run the script under "
                                                        "the same `nice`)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sni" / "heldout")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))          # so that the server subprocess is stopped
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    torch.set_num_threads(args.threads)
    lm = load_base_model(args.model, device="cpu")
    sources = {w: PromptSource(w, lm.tokenizer, args) for w in workloads}
    plan = [args.check] + args.rounds * [max(args.requests, c) for c in [1, *args.concurrency]]   # loop, then arms
    for src in sources.values():
        src.check_enough(plan)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        lib_dir = Path(tmp) / "lib"
        lib = build_library(lm, lib_dir, args.experts)
        port = free_port()
        proc, start_s = start_server(lib_dir, args, port)
        try:
            reuse = prepare_model(lm, lib, "arrow", {"top_k": args.top_k})
            url = f"http://127.0.0.1:{port}/v1/completions"
            loop_thread = concurrent.futures.ThreadPoolExecutor(1)
            checks = {}
            for w, src in sources.items():      # greedy identity, and a warm-up of both sides
                prompts = src.take(args.check)
                served = serve_round(url, prompts, 1, src.max_tokens)["outcomes"]
                looped = loop_thread.submit(loop_round, reuse, lm.tokenizer, prompts, src.max_tokens).result()
                same = sum(a.text == b.text and a.error is None for a, b in zip(served, looped["outcomes"],
                                                                                 strict=True))
                checks[w] = {"compared": len(prompts), "identical": same}
                print(f"{w}: greedy check {same}/{len(prompts)} identical", flush=True)
            arms = [LOOP] + [f"serve c={c}" for c in args.concurrency]
            rounds = {w: {a: [] for a in arms} for w in workloads}
            loads = []
            for r in range(args.rounds):
                for w, src in sources.items():
                    for arm in arms:
                        c = 1 if arm == LOOP else int(arm.split("=")[1])
                        prompts = src.take(max(args.requests, c))
                        before = os.getloadavg()
                        if arm == LOOP:   # in a worker thread, like the server's engine thread
                            res = loop_thread.submit(loop_round, reuse, lm.tokenizer, prompts, src.max_tokens).result()
                        else:
                            res = serve_round(url, prompts, c, src.max_tokens)
                        res["prompt_tokens"] = sum(src.prompt_tokens(prompts))
                        loads.append({"round": r, "workload": w, "arm": arm, "before": before,
                                      "after": os.getloadavg()})
                        rounds[w][arm].append(res)
                        tokens = sum(o.tokens for o in res["outcomes"])
                        errs = sum(o.error is not None for o in res["outcomes"])
                        print(f"round {r} {w} {arm}: {len(prompts)} requests, {tokens} tokens in "
                              f"{res['wall_s']:.1f} s ({tokens / res['wall_s']:.1f} tok/s), errors {errs}, "
                              f"load {before[0]:.1f}", flush=True)
            stats = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        finally:
            proc.kill()
            proc.wait()
    descriptions = {"sni": f"held-out SNI prompts (≤ {args.max_prompt_tokens} tokens, never cut), answers as the "
                           f"model produces them (≤ {args.sni_max_tokens} tokens)",
                    "short": f"one-line story prompts, {args.short_max_tokens}-token answers"}
    all_loads = [x for entry in loads for x in (entry["before"][0], entry["after"][0])]
    result = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "config": {"model": args.model, "requests": args.requests, "rounds": args.rounds,
                   "concurrency": args.concurrency, "sni_max_tokens": args.sni_max_tokens,
                   "short_max_tokens": args.short_max_tokens, "max_prompt_tokens": args.max_prompt_tokens,
                   "experts": args.experts, "top_k": args.top_k, "threads": args.threads},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "loadavg_min": round(min(all_loads), 2), "loadavg_max": round(max(all_loads), 2)},
        "server_start_s": round(start_s, 2),
        "workloads": {w: {"description": descriptions[w], "check": checks[w], "summary": summarise(rounds[w]),
                          "prompt_tokens_per_round": {a: [res["prompt_tokens"] for res in rs]
                                                      for a, rs in rounds[w].items()}}
                      for w in workloads},
        "loadavg": loads, "server_stats": stats.get("stats", {}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
