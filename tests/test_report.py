"""Markdown report and PNG plots from results files."""

from __future__ import annotations

import json

import pytest

from modlora.errors import DataError
from modlora.evaluation.plots import write_report
from modlora.evaluation.results import EvalRun, RoutingAccuracy, RoutingTelemetry, TaskScores, save_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(method: str, acc: float, routing: RoutingTelemetry | None = None) -> EvalRun:
    tasks = {"arc_easy": TaskScores({"acc": acc, "acc_norm": acc + 0.05}, {"acc": 0.01, "acc_norm": 0.02}, 100, 3.0),
             "task020_sni": TaskScores({"rougeL": 0.4, "exact_match": 0.1}, {"rougeL": 0.03, "exact_match": 0.02}, 50)}
    return EvalRun(method=method, model="tiny", tasks=tasks, wall_s=5.0, routing=routing)


def test_report_tables_and_plots(tmp_path):
    routing = RoutingTelemetry(entropy_per_layer={"layers.0": 1.2, "layers.1": 0.7},
                               tokens_per_layer={"layers.0": 10, "layers.1": 10},
                               expert_usage={"arc_easy": {"e1": 0.7, "e2": 0.3}, "task020_sni": {"e2": 1.0}},
                               accuracy=RoutingAccuracy(0.5, {"layers.0": 0.5}, 4))
    a = save_results(_run("base", 0.50), tmp_path / "a.json")
    b = save_results(_run("arrow", 0.60, routing), tmp_path / "b.json")
    c = save_results(_run("arrow", 0.55), tmp_path / "c.json")  # same method name: disambiguated by file stem
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"similarity": [[1, 0.2, 0.9], [0.2, 1, 0.1], [0.9, 0.1, 1]], "names": ["x", "y", "z"],
                               "assignment": [0, 1, 0]}))
    report = write_report([a, b, c], tmp_path / "out", similarity_json=sim)
    text = report.read_text()
    assert "| base | 55.0 ± 2.0 | 40.0 ± 3.0 | 47.5 |" in text  # acc_norm preferred, rougeL for SNI
    assert "| arrow | 65.0 ± 2.0 |" in text and "| arrow (c) | 60.0 ± 2.0 |" in text
    assert "arc_easy<br>(acc_norm)" in text and "task020_sni<br>(rougeL)" in text
    assert "mean routing entropy 0.950" in text
    for name in ("per_task.png", "routing_entropy.png", "expert_usage_arrow.png", "similarity.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


def test_report_metric_choice_and_errors(tmp_path):
    a = save_results(_run("base", 0.5), tmp_path / "a.json")
    text = write_report([a], tmp_path / "o1", metric="acc").read_text()
    assert "arc_easy<br>(acc)" in text and "task020_sni" not in text.split("\n")[4]
    assert not (tmp_path / "o1" / "routing_entropy.png").exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    with pytest.raises(DataError, match="neither a results file"):
        write_report([bad], tmp_path / "o2")
    with pytest.raises(DataError, match="not found"):
        write_report([tmp_path / "missing.json"], tmp_path / "o3")
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"similarity": [[1, 0], [0, 1]], "names": ["x"], "assignment": [0, 0]}))
    with pytest.raises(DataError, match="n×n"):
        write_report([sim], tmp_path / "o4")
