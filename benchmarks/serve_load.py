"""Load test of ``modlora serve`` on loopback against a plain transformers ``generate`` loop, interleaved.

Setup: the base model (default the embedded ``smollm2-135m``) and a small library of ``--experts`` synthetic rank-4
LoRA experts on q,k,v,o (written to a temporary directory); ``modlora serve`` runs as a subprocess (the real CLI)
with Arrow routing, top-k ``--top-k``. Prompts: the held-out SNI tasks (``../shared/data/sni/heldout``), one instance
per task in turn, formatted with the model's chat template and sent to ``/v1/completions`` with greedy decoding and
``max_tokens=--max-tokens``.

Arms, run in ``--rounds`` rounds, interleaved (loop, c=1, c=4, c=16, loop, c=1, …), each round serving the next
``requests / rounds`` prompts:

* ``generate loop``: in this process, ``prepare_model(lm, library, "arrow")`` + HF ``generate`` (greedy, same
  ``max_new_tokens``), one request at a time: the sequential baseline;
* ``serve c=N``: N client threads each sending one request at a time to the server until the round's prompts are
  served.

Reported per arm: errors, completion tokens, tokens/s (median and minimum over rounds), request latency p50/p95,
and the speed-up of each server arm over the loop (ratio of the median tokens/s). ``os.getloadavg()`` is recorded
around each round. Results: ``--out``.json and .md.

The loop runs in a worker thread, as the server's model runs in its engine thread: on the shared 2-core machine a
64-token forward at 2 torch threads measured 0.7 s in a fresh thread and 9 s in the main thread (OpenMP teams
under oversubscription), which would have flattered the server.

    python benchmarks/serve_load.py --requests 32 --rounds 2 --concurrency 4,16 --max-tokens 64 --threads 1
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

import httpx
import torch

from modlora.data import PromptLimits, load_sni_tasks
from modlora.library.adapters import LoraSpec, random_adapter
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.reuse.prepare import prepare_model
from modlora.serve.server import free_port

ROOT = Path(__file__).resolve().parents[1]
LOOP = "generate loop"


def heldout_prompts(tokenizer: Any, data: Path, count: int, max_prompt_tokens: int) -> list[str]:
    """``count`` prompts cycling over the held-out tasks (instance i of every task, then i+1, …)."""
    tasks = load_sni_tasks(data)
    fmt = PromptLimits(max_prompt_tokens).formatter(tokenizer)
    names = sorted(tasks)
    prompts: list[str] = []
    i = 0
    while len(prompts) < count:
        for name in names:
            task = tasks[name]
            if i < len(task.instances) and len(prompts) < count:
                ids = fmt.prompt_ids(task.definition, task.instances[i].input)     # truncated from the left
                prompts.append(tokenizer.decode(ids))
        i += 1
    return prompts


def build_library(lm: Any, path: Path, experts: int) -> ExpertLibrary:
    lib = ExpertLibrary.create(path, lm.info)
    spec = LoraSpec(rank=4, alpha=16, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    for i in range(experts):
        lib.add(f"synthetic{i}", random_adapter(lm.model, spec, seed=i, std=0.02), tasks=[f"synthetic{i}"])
    return lib


def start_server(lib: Path, args: argparse.Namespace, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "modlora.cli", "serve", str(lib), "--model", args.model, "--port", str(port),
           "--threads", str(args.threads), "--route-top-k", str(args.top_k), "--max-batch", str(max(args.concurrency)),
           "--max-queue", str(4 * max(args.concurrency))]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"modlora serve exited: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("modlora serve did not come up in 300 s")
        time.sleep(0.5)


def serve_round(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """Send ``prompts`` with ``concurrency`` client threads; per-request latency, tokens and errors."""
    def one(prompt: str) -> tuple[float, int, str | None]:
        t0 = time.perf_counter()
        try:
            r = httpx.post(url, json={"model": "lib", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                           timeout=600)
        except httpx.HTTPError as exc:
            return time.perf_counter() - t0, 0, f"{type(exc).__name__}: {exc}"
        if r.status_code != 200:
            return time.perf_counter() - t0, 0, f"HTTP {r.status_code}: {r.text[:200]}"
        return time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"]), None

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "latencies": [r[0] for r in results], "tokens": sum(r[1] for r in results),
            "errors": [r[2] for r in results if r[2]]}


@torch.inference_mode()
def loop_round(reuse: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """The baseline: HF ``generate`` on one request at a time."""
    latencies, tokens = [], 0
    t0 = time.perf_counter()
    for prompt in prompts:
        t = time.perf_counter()
        enc = tokenizer(prompt, return_tensors="pt")
        out = reuse.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        tokens += int(out.shape[1] - enc["input_ids"].shape[1])
        latencies.append(time.perf_counter() - t)
    return {"wall_s": time.perf_counter() - t0, "latencies": latencies, "tokens": tokens, "errors": []}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarise(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm, rs in rounds.items():
        tps = [r["tokens"] / r["wall_s"] for r in rs]
        lat = [x for r in rs for x in r["latencies"]]
        out[arm] = {"requests": len(lat), "errors": sum(len(r["errors"]) for r in rs),
                    "error_samples": [e for r in rs for e in r["errors"]][:3],
                    "completion_tokens": sum(r["tokens"] for r in rs),
                    "tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps),
                    "tokens_per_s_overall": sum(r["tokens"] for r in rs) / sum(r["wall_s"] for r in rs),
                    "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
                    "latency_min_s": min(lat)}
    base = out[LOOP]["tokens_per_s_median"]
    for arm in out:
        out[arm]["speedup_vs_loop"] = out[arm]["tokens_per_s_median"] / base
    return out


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"# `modlora serve` under load vs a sequential `generate` loop ({cfg['model']})", "",
             f"Command: `{result['command']}`", "",
             f"{cfg['requests']} requests per arm over {cfg['rounds']} interleaved rounds; greedy, max_tokens "
             f"{cfg['max_tokens']}; prompts from {cfg['prompt_tasks']} held-out SNI tasks (≤ {cfg['max_prompt_tokens']}"
             f" prompt tokens); library: {cfg['experts']} synthetic rank-4 experts (q,k,v,o), Arrow top-{cfg['top_k']};"
             f" torch threads {cfg['threads']} (server and loop); machine: {result['machine']['cpus']} CPUs, "
             f"load average {result['machine']['loadavg_start']} → {result['machine']['loadavg_end']}.", "",
             "| arm | requests | errors | tokens | tok/s median | tok/s min | × loop (median) | p50 latency s | "
             "p95 latency s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, s in result["summary"].items():
        lines.append(f"| {arm} | {s['requests']} | {s['errors']} | {s['completion_tokens']} | "
                     f"{s['tokens_per_s_median']:.1f} | {s['tokens_per_s_min']:.1f} | {s['speedup_vs_loop']:.2f} | "
                     f"{s['latency_p50_s']:.2f} | {s['latency_p95_s']:.2f} |")
    lines += ["", "Tokens/s of an arm in one round: completion tokens it produced ÷ the round's wall time; median and "
              "minimum over rounds. Latency: request sent → full response received (non-streaming).",
              f"Server batching: {result['server_stats']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=96, help="requests per arm (default 96)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    ap.add_argument("--concurrency", default="1,4,16", help="client concurrencies of the server arms")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sni" / "heldout")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))          # so that the server subprocess is stopped
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.requests % args.rounds:
        raise SystemExit("--requests must be a multiple of --rounds")
    torch.set_num_threads(args.threads)
    lm = load_base_model(args.model, device="cpu")
    prompts = heldout_prompts(lm.tokenizer, args.data, args.requests, args.max_prompt_tokens)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        lib_dir = Path(tmp) / "lib"
        lib = build_library(lm, lib_dir, args.experts)
        port = free_port()
        proc = start_server(lib_dir, args, port)
        try:
            reuse = prepare_model(lm, lib, "arrow", {"top_k": args.top_k})
            url = f"http://127.0.0.1:{port}/v1/completions"
            serve_round(url, prompts[:2], 2, 4)                                  # warm-up
            arms = [LOOP] + [f"serve c={c}" for c in args.concurrency]
            rounds: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
            loop_thread = concurrent.futures.ThreadPoolExecutor(1)
            loads = []
            per = args.requests // args.rounds
            for r in range(args.rounds):
                chunk = prompts[r * per:(r + 1) * per]
                for arm in arms:
                    before = os.getloadavg()
                    if arm == LOOP:   # in a worker thread, like the server's engine thread (see the docstring)
                        res = loop_thread.submit(loop_round, reuse, lm.tokenizer, chunk, args.max_tokens).result()
                    else:
                        res = serve_round(url, chunk, int(arm.split("=")[1]), args.max_tokens)
                    loads.append({"round": r, "arm": arm, "before": before, "after": os.getloadavg()})
                    rounds[arm].append(res)
                    print(f"round {r} {arm}: {res['tokens']} tokens in {res['wall_s']:.1f} s "
                          f"({res['tokens'] / res['wall_s']:.1f} tok/s), errors {len(res['errors'])}", flush=True)
            stats = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        finally:
            proc.kill()
            proc.wait()
    result = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "config": {"model": args.model, "requests": args.requests, "rounds": args.rounds,
                   "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                   "max_prompt_tokens": args.max_prompt_tokens, "experts": args.experts, "top_k": args.top_k,
                   "threads": args.threads, "prompt_tasks": len(load_sni_tasks(args.data))},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "summary": summarise(rounds), "loadavg": loads, "server_stats": stats.get("stats", {}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
