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
