"""The study pipeline (the demo's engine) end to end on a tiny model and tiny SNI directories; resumable."""

from __future__ import annotations

import json

from modlora.library import ExpertLibrary
from modlora.study import StudyConfig, results_markdown, run_study

from .conftest import save_tiny_model, write_sni_task

TRAIN = ["task1_a", "task2_b", "task3_c", "task4_d"]


def _model_and_data(tmp_path, n: int = 20, heldout_n: int = 20):
    """A saved tiny model and a data root with the four training tasks and one held-out task."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "data"
    (data / "sni" / "tasks").mkdir(parents=True)
    (data / "sni" / "heldout").mkdir(parents=True)
    for t in TRAIN:
        write_sni_task(data / "sni" / "tasks", t, t[-1], n=n)
    write_sni_task(data / "sni" / "heldout", "task9_z", "z", n=heldout_n)
    return model_dir, data


def test_study_end_to_end_and_resume(tmp_path):
    model_dir, data = _model_and_data(tmp_path)
    train = TRAIN
    (data / "eval").mkdir()
    (data / "eval" / "arc_easy.jsonl").write_text("\n".join(json.dumps(
        {"query": f"Question: a{i}?", "choices": ["aa", "b", "cc"], "gold": i % 3}) for i in range(5)))
    (data / "eval" / "winogrande.jsonl").write_text("\n".join(json.dumps(
        {"context_options": ["x a", "x b"], "continuation": "c d", "gold": i % 2}) for i in range(4)))
    cfg = StudyConfig(name="t", model=str(model_dir), train_tasks=train, steps_per_task=2, batch_size=4, lr=1e-3,
                      max_prompt_tokens=48, max_target_tokens=4, k=2, heldout_limit=2, indist_limit=2,
                      max_new_tokens=3, method_options={"arrow": {"top_k": 2}}, libraries=["private", "mbc", "shared"],
                      rows=[["-", "base"], ["private", "mu"], ["private", "arrow"], ["private", "oracle"],
                            ["mbc", "arrow"], ["shared", "mu"], ["private", "lorahub"],
                            ["private", "arrow", {"top_k": 1}]],
                      choice_tasks=["arc_easy", "winogrande"], choice_limit=3, lorahub_shots=2, lorahub_budget=3)
    res = run_study(cfg, tmp_path / "out", device="cpu", data_dir=data)
    assert set(res["rows"]) == {"base", "private/mu", "private/arrow", "private/oracle", "mbc/arrow", "shared/mu",
                                "private/lorahub", "private/arrow[top_k=1]"}
    hub = res["rows"]["private/lorahub"]
    assert set(hub["heldout"]) == {"task9_z"} and hub["indist"] == {} and "heldout_rougeL" in hub
    assert set(hub["lorahub_weights"]["task9_z"]) == {"task1_a", "task2_b", "task3_c", "task4_d"}
    arrow = res["rows"]["private/arrow"]
    assert 0.0 <= arrow["routing_accuracy"]["overall"] <= 1.0 and arrow["routing_accuracy"]["n"] == 8
    assert "task9_z" in arrow["heldout"] and set(arrow["indist"]) == set(train)
    assert res["rows"]["private/oracle"]["heldout"] == {} and res["rows"]["private/oracle"]["choice"] == {}
    assert {t: d["n"] for t, d in arrow["choice"].items()} == {"arc_easy": 3, "winogrande": 3}
    assert 0.0 <= arrow["choice_acc_norm"]["mean"] <= 1.0
    assert res["libraries"]["mbc"]["train_tokens"] > 0
    assert (tmp_path / "out" / "mbc_clusters.png").stat().st_size > 0
    assert (tmp_path / "out" / "results.png").read_bytes()[:4] == b"\x89PNG"
    table = results_markdown(res)
    assert "private/arrow" in table and "| arc_easy | winogrande |" in table and "average" in table
    # resume: every row and expert is reused
    again = run_study(cfg, tmp_path / "out", device="cpu", data_dir=data)
    assert again["rows"]["private/arrow"] == arrow


def test_study_config_rows_are_checked_before_anything_runs(tmp_path):
    import pytest

    from modlora.errors import ModloraError

    bad_rows = ([["private", "magic"]], [["private", "arrow", {"top_k": 0}]], [["private", "mu", {"top_k": 2}]])
    for rows in bad_rows:
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps({"rows": rows}))
        with pytest.raises(ModloraError, match="row"):
            StudyConfig.from_json(path)
    path.write_text(json.dumps({"share_mode": "cold"}))
    with pytest.raises(ModloraError, match="share_mode must be one of warm, residual"):
        StudyConfig.from_json(path)


def test_study_builds_semantic_poly_mhr_and_shared_libraries(tmp_path):
    """The round-two libraries are study rows like the others (tiny budgets, in-distribution scores only)."""
    model_dir, data = _model_and_data(tmp_path, n=12, heldout_n=4)
    train = TRAIN
    cfg = StudyConfig(name="t2", model=str(model_dir), train_tasks=train, steps_per_task=1, batch_size=4,
                      max_prompt_tokens=48, max_target_tokens=4, max_val=2, k=2, heldout_limit=1, indist_limit=1,
                      max_new_tokens=2, skills=2, method_options={"arrow": {"top_k": 2}}, share_mode="residual",
                      libraries=["semantic", "poly", "mhr", "mbc-share"],
                      rows=[["poly", "allocation"], ["mhr", "allocation"], ["poly", "mu"], ["mhr", "arrow"],
                            ["semantic", "arrow"], ["mbc-share", "mu"]])
    res = run_study(cfg, tmp_path / "out", device="cpu", data_dir=data)
    assert set(res["rows"]) == {"poly/allocation", "mhr/allocation", "poly/mu", "mhr/arrow", "semantic/arrow",
                                "mbc-share/mu"}
    assert set(res["rows"]["poly/allocation"]["indist"]) == set(train) and res["rows"]["poly/allocation"][
        "heldout"] == {}
    assert "task9_z" in res["rows"]["poly/mu"]["heldout"]
    libs = res["libraries"]
    assert set(libs["poly"]["experts"]) == {"skill0", "skill1"} and "shared" in libs["mbc-share"]["experts"]
    assert ExpertLibrary(libs["mbc-share"]["path"]).load_meta("share")["mode"] == "residual"
    assert sorted(t for ts in libs["semantic"]["experts"].values() for t in ts) == train
