"""benchmarks/routing_accuracy.py end to end on a tiny model: every router's figures equal a direct computation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modlora.data import PromptFormatter, PromptLimits, load_sni_tasks, split_instances
from modlora.evaluation.indist import prompt_routing_accuracy
from modlora.evaluation.results import EvalRun, TaskScores, mean_and_stderr
from modlora.library.adapters import LoraSpec, random_adapter
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.reuse.prepare import prepare_model

from .conftest import save_tiny_model, write_sni_task

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"task1_alpha": "a", "task2_beta": "b", "task3_gamma": "g", "task4_delta": "d"}


def test_routing_benchmark_matches_direct_computation(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "tasks"
    data.mkdir()
    for name, letter in TASKS.items():
        write_sni_task(data, name, letter, n=40)
    lm = load_base_model(str(model_dir), device="cpu")
    lib = ExpertLibrary.create(tmp_path / "lib", lm.info)
    spec = LoraSpec(rank=2, alpha=4, dropout=0.0)
    for i, name in enumerate(TASKS):
        lib.add(f"e{i}", random_adapter(lm.model, spec, seed=i, std=0.2), tasks=[name],
                training={"max_prompt_tokens": 48, "max_target_tokens": 4})
    families = tmp_path / "families.json"
    families.write_text(json.dumps({"task1_alpha": "x", "task2_beta": "x", "task3_gamma": "y", "task4_delta": "y"}))
    out = tmp_path / "routing"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "routing_accuracy.py"), str(lib.path),
                           "--routers", "arrow:top_k=2", "arrow:top_k=2,remove_common=1", "centroid", "tp",
                           "--per-task", "3", "--model", str(model_dir), "--dtype",
                           "float32", "--data", str(data), "--families", str(families), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    scores = {s["router"]: s["accuracy"] for s in result["scores"]}
    assert set(scores) == {"arrow:top_k=2", "arrow:top_k=2,remove_common=1", "centroid", "tp"}
    assert all(s["n"] == 12 and s["experts"] == 4 for s in scores.values())
    assert set(scores["tp"]["per_layer"]) == {"example"}
    assert -1.0 <= result["ari"][str(lib.path)] <= 1.0
    assert sorted(e for c in result["clusters"][str(lib.path)] for e in c) == ["e0", "e1", "e2", "e3"]
    assert result["meta"]["prompt_limits"][str(lib.path)] == {"max_prompt_tokens": 48, "max_target_tokens": 4,
                                                             "truncate": "left"}  # the library's own limits
    assert result["meta"]["budgets"][str(lib.path)] == {"steps": None, "batch_size": None, "init": "shared"}
    table = out.with_suffix(".md").read_text()
    assert "| library | router | E | top-1 |" in table and "ΔW-MBC ARI" in table

    fmt = PromptFormatter(lm.tokenizer, PromptLimits(48))
    prompts = [fmt.encode(task, inst) for name, task in load_sni_tasks(str(data), list(TASKS)).items()
               for inst in split_instances(task, seed=0)["test"][:3]]
    rm = prepare_model(lm, lib, "arrow", {"top_k": 2})
    with torch.no_grad():
        one_by_one = prompt_routing_accuracy(rm, prompts, lib, batch_size=1)     # no padding at all
    rm.restore()
    assert scores["arrow:top_k=2"]["overall"] == one_by_one.overall
    assert scores["arrow:top_k=2"]["own_mass"] == pytest.approx(one_by_one.own_mass, abs=1e-6)
    for layer, value in one_by_one.per_layer.items():
        assert scores["arrow:top_k=2"]["per_layer"][layer] == value


def test_routing_benchmark_refuses_bad_routers_before_loading(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "routing_accuracy.py"), str(tmp_path),
                           "--routers", "arrow:remove_common=-1", "--out", str(tmp_path / "x"), "--model",
                           "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "remove_common" in proc.stderr and "Traceback" not in proc.stderr


def _routing_result(library: str, top1: float, budget: dict | None) -> dict:
    accuracy = {"overall": top1, "top2": top1, "own_mass": 0.5, "experts": 4, "n": 8, "per_layer": {}}
    meta = {"budgets": {library: budget}} if budget else {}
    return {"meta": meta, "ari": {library: 0.5}, "scores": [{"library": library, "router": "arrow",
                                                             "accuracy": accuracy}]}


def _indist_result(library: str, method: str, rouge: dict[str, float]) -> dict:
    tasks = {t: TaskScores.from_per_example({"rougeL": [v, v]}) for t, v in rouge.items()}
    return EvalRun(method=method, model="m", config={"library": library, "router": method}, tasks=tasks).to_dict()


def test_budget_curve_budgets_and_paired_indist_differences(tmp_path: Path) -> None:
    """benchmarks/budget_curve.py: budgets come from the routing results' record or from --budget (the libraries are
    gone); the in-distribution table holds each method's mean Rouge-L and the paired differences across tasks."""
    gone12, gone48 = str(tmp_path / "gone-s12"), str(tmp_path / "gone-s48")
    (tmp_path / "r12.json").write_text(json.dumps(_routing_result(gone12, 0.75, {"steps": 12, "batch_size": 8,
                                                                                 "init": "eva"})))
    (tmp_path / "r48.json").write_text(json.dumps(_routing_result(gone48, 0.5, None)))   # written before the record
    arrow = {"t1": 0.5, "t2": 0.25, "t3": 0.75}
    mu = {"t1": 0.25, "t2": 0.25, "t3": 0.5}
    oracle = {"t1": 0.75, "t2": 0.5, "t3": 0.5}
    for method, rouge in (("arrow", arrow), ("mu", mu), ("oracle", oracle)):
        (tmp_path / f"i-{method}.json").write_text(json.dumps(_indist_result(gone12, method, rouge)))
    script = [sys.executable, str(ROOT / "benchmarks" / "budget_curve.py"), str(tmp_path / "r12.json"),
              str(tmp_path / "r48.json"), "--indist", *(str(tmp_path / f"i-{m}.json") for m in ("arrow", "mu", "oracle")),
              "--out", str(tmp_path / "curve")]
    refused = subprocess.run(script, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--budget" in refused.stderr and "Traceback" not in refused.stderr
    proc = subprocess.run([*script, "--budget", f"{gone48}=48x8:eva"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "curve.md").read_text()
    assert f"| {gone12} | eva | 12 × 8 | 4 | arrow | 75.0% |" in table
    assert f"| {gone48} | eva | 48 × 8 | 4 | arrow | 50.0% |" in table
    mean_a, se_a = mean_and_stderr(list(arrow.values()))
    assert f"| {100 * mean_a:.1f} ± {100 * se_a:.1f} |" in table
    diff, se = mean_and_stderr([arrow[t] - oracle[t] for t in arrow])
    assert f"arrow − oracle {100 * diff:+.1f} ± {100 * se:.1f} ({diff / se:+.1f} s.e.)" in table
    diff, se = mean_and_stderr([arrow[t] - mu[t] for t in arrow])
    assert f"arrow − mu {100 * diff:+.1f} ± {100 * se:.1f} ({diff / se:+.1f} s.e.)" in table
    assert (tmp_path / "curve.png").stat().st_size > 0
