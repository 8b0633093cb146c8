"""The study pipeline (the demo's engine) end to end on a tiny model and tiny SNI directories; resumable."""

from __future__ import annotations

import json

from modlora.study import StudyConfig, results_markdown, run_study

from .conftest import make_char_tokenizer, make_tiny_llama


def _sni(directory, name, letter, n=20):
    inst = [{"id": f"{name}-{j}", "input": f"{letter}{j}", "output": [letter * 2]} for j in range(n)]
    (directory / f"{name}.json").write_text(json.dumps({"Definition": [f"Do {letter}."], "Instances": inst}))


def test_study_end_to_end_and_resume(tmp_path):
    model_dir = tmp_path / "tiny"
    make_tiny_llama(seed=0).save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data"
    (data / "sni" / "tasks").mkdir(parents=True)
    (data / "sni" / "heldout").mkdir(parents=True)
    train = ["task1_a", "task2_b", "task3_c", "task4_d"]
    for t in train:
        _sni(data / "sni" / "tasks", t, t[-1])
    _sni(data / "sni" / "heldout", "task9_z", "z")
    cfg = StudyConfig(name="t", model=str(model_dir), train_tasks=train, steps_per_task=2, batch_size=4, lr=1e-3,
                      max_prompt_tokens=48, max_target_tokens=4, k=2, heldout_limit=2, indist_limit=2,
                      max_new_tokens=3, top_k=2, libraries=["private", "mbc", "shared"],
                      rows=[["-", "base"], ["private", "mu"], ["private", "arrow"], ["private", "oracle"],
                            ["mbc", "arrow"], ["shared", "mu"]])
    res = run_study(cfg, tmp_path / "out", device="cpu", data_dir=data)
    assert set(res["rows"]) == {"base", "private/mu", "private/arrow", "private/oracle", "mbc/arrow", "shared/mu"}
    arrow = res["rows"]["private/arrow"]
    assert 0.0 <= arrow["routing_accuracy"]["accuracy"] <= 1.0 and arrow["routing_accuracy"]["n"] == 8
    assert "task9_z" in arrow["heldout"] and set(arrow["indist"]) == set(train)
    assert res["rows"]["private/oracle"]["heldout"] == {}
    assert res["libraries"]["mbc"]["train_tokens"] > 0
    assert (tmp_path / "out" / "mbc_clusters.png").stat().st_size > 0
    assert "private/arrow" in results_markdown(res)
    # resume: every row and expert is reused
    again = run_study(cfg, tmp_path / "out", device="cpu", data_dir=data)
    assert again["rows"]["private/arrow"] == arrow
