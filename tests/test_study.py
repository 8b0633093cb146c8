"""The study pipeline (the demo's engine) end to end on a tiny model and tiny SNI directories; resumable."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import adjusted_rand_score

from modlora.data import default_data_dir
from modlora.errors import DataError
from modlora.library.store import ExpertLibrary
from modlora.study.config import StudyConfig
from modlora.study.report import results_markdown
from modlora.study.run import run_study
from modlora.study.stats import paired_difference

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
    families = tmp_path / "families.json"
    families.write_text(json.dumps({"task1_a": "x", "task2_b": "x", "task3_c": "y", "task4_d": "y"}))
    (data / "eval").mkdir()
    (data / "eval" / "arc_easy.jsonl").write_text("\n".join(json.dumps(
        {"query": f"Question: a{i}?", "choices": ["aa", "b", "cc"], "gold": i % 3}) for i in range(5)))
    (data / "eval" / "winogrande.jsonl").write_text("\n".join(json.dumps(
        {"context_options": ["x a", "x b"], "continuation": "c d", "gold": i % 2}) for i in range(4)))
    cfg = StudyConfig(name="t", model=str(model_dir), train_tasks=train, steps_per_task=2, batch_size=4, lr=1e-3,
                      max_prompt_tokens=48, max_target_tokens=4, k=2, heldout_limit=2, indist_limit=2,
                      max_new_tokens=3, method_options={"arrow": {"top_k": 2}},
                      libraries=["private", "mbc", "mbc-params", "shared"],
                      rows=[["-", "base"], ["private", "mu"], ["private", "arrow"], ["private", "oracle"],
                            ["mbc", "arrow"], ["mbc-params", "arrow"], ["shared", "mu"], ["private", "lorahub"],
                            ["private", "arrow", {"top_k": 1}]],
                      choice_tasks=["arc_easy", "winogrande"], choice_limit=3, lorahub_shots=2, lorahub_budget=3,
                      choice_rows=["base", "private/arrow", "private/oracle", "mbc/arrow"],
                      task_families=str(families))
    res = run_study(cfg, tmp_path / "out", device="cpu", data_dir=data)
    assert set(res["rows"]) == {"base", "private/mu", "private/arrow", "private/oracle", "mbc/arrow", "mbc-params/arrow",
                                "shared/mu", "private/lorahub", "private/arrow[top_k=1]"}
    # benchmarks only on choice_rows (and never on the oracle, which needs task labels)
    assert {k for k, r in res["rows"].items() if r["choice"]} == {"base", "private/arrow", "mbc/arrow"}
    assert "task9_z" in res["rows"]["shared/mu"]["heldout"] and "choice_acc_norm" not in res["rows"]["shared/mu"]
    # MBC on ΔW and MBC on the flattened parameters: same stage 1 (the private library), same charged compute
    features = {k: json.loads((tmp_path / "out" / f"{k}_clusters.json").read_text())["features"]
                for k in ("mbc", "mbc-params")}
    assert features == {"mbc": "delta", "mbc-params": "params"}
    assert sorted(t for ts in res["libraries"]["mbc-params"]["experts"].values() for t in ts) == train
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
    assert (tmp_path / "out" / "paired.png").read_bytes()[:4] == b"\x89PNG"
    table = results_markdown(res)
    assert "private/arrow" in table and "| arc_easy | winogrande |" in table and "average" in table
    # paired differences across tasks, against a brute-force mean and standard error
    a, b = res["rows"]["private/arrow"]["indist"], res["rows"]["base"]["indist"]
    diffs = [a[t]["rougeL"] - b[t]["rougeL"] for t in train]
    mean = sum(diffs) / 4
    stderr = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5 / 2
    paired = paired_difference(res, "private/arrow", "base", "indist")
    assert paired is not None and paired.n == 4
    assert abs(paired.mean - mean) < 1e-12 and abs(paired.stderr - stderr) < 1e-12
    assert paired_difference(res, "private/arrow", "base") is None  # one held-out task: nothing to pair over
    assert "**Paired differences**" in table and f"| private/arrow | - | - | {paired.cell()} |" in table
    # clustered libraries: K and the agreement with the task families (private and shared are not partitions)
    assert set(res["partitions"]) == {"mbc", "mbc-params"}
    for name, part in res["partitions"].items():
        expert_of = {t: e for e, ts in res["libraries"][name]["experts"].items() for t in ts}
        truth = [{"a": "x", "b": "x", "c": "y", "d": "y"}[t[-1]] for t in train]
        assert part["k"] == 2 and sorted(t for c in part["clusters"] for t in c) == train
        assert part["ari"] == adjusted_rand_score(truth, [expert_of[t] for t in train])
    assert "**Clustered libraries**" in table and "| mbc | 2 |" in table
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
    path.write_text(json.dumps({"task_families": str(tmp_path / "missing.json")}))
    with pytest.raises(ModloraError, match="task_families: cannot read label file .*missing.json"):
        StudyConfig.from_json(path)
    path.write_text(json.dumps({"share_mode": "cold"}))
    with pytest.raises(ModloraError, match="share_mode must be one of warm, residual"):
        StudyConfig.from_json(path)
    path.write_text(json.dumps({"rows": [["-", "base"], ["private", "mu"]], "choice_rows": ["base", "private/arrow"]}))
    with pytest.raises(ModloraError, match="choice_rows private/arrow"):
        StudyConfig.from_json(path)


def test_study_heldout_tasks_from_the_pool_and_paired_differences_per_group(tmp_path):
    """Held-out tasks may come from the training pool (never from the study's training tasks: refused before
    anything runs); ``heldout_groups`` splits the held-out paired differences, each equal to brute force."""
    import pytest

    from modlora.errors import ModloraError

    model_dir, data = _model_and_data(tmp_path, n=12, heldout_n=8)
    write_sni_task(data / "sni" / "heldout", "task8_y", "y", n=8)
    for t in ("task5_e", "task6_f"):
        write_sni_task(data / "sni" / "tasks", t, t[-1], n=8)
    groups = {"task5_e": "related", "task6_f": "related", "task8_y": "unrelated", "task9_z": "unrelated"}
    (tmp_path / "groups.json").write_text(json.dumps(groups))
    raw = {"name": "g", "model": str(model_dir), "train_tasks": TRAIN[:2], "steps_per_task": 1, "batch_size": 2,
           "max_prompt_tokens": 48, "max_target_tokens": 4, "libraries": ["private"], "heldout_limit": 3,
           "indist_limit": 1, "max_new_tokens": 3, "heldout_tasks": sorted(groups), "heldout_groups": "groups.json",
           "rows": [["-", "base"], ["private", "mu"], ["private", "arrow", {"top_k": 2}]]}
    (tmp_path / "cfg.json").write_text(json.dumps({**raw, "heldout_tasks": ["task1_a", "task9_z"]}))
    with pytest.raises(ModloraError, match="heldout_tasks task1_a are training tasks"):
        StudyConfig.from_json(tmp_path / "cfg.json")
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    res = run_study(StudyConfig.from_json(tmp_path / "cfg.json"), tmp_path / "out", device="cpu", data_dir=data)
    assert res["heldout_groups"] == groups
    arrow, mu = res["rows"]["private/arrow[top_k=2]"]["heldout"], res["rows"]["private/mu"]["heldout"]
    assert set(arrow) == set(groups) and all(arrow[t]["n"] == 3 for t in groups)
    for group in ("related", "unrelated"):
        tasks = [t for t, g in groups.items() if g == group]
        diffs = [arrow[t]["rougeL"] - mu[t]["rougeL"] for t in tasks]
        paired = paired_difference(res, "private/arrow[top_k=2]", "private/mu", tasks=tasks)
        assert paired is not None and paired.n == 2
        assert abs(paired.mean - sum(diffs) / 2) < 1e-12 and abs(paired.stderr - abs(diffs[0] - diffs[1]) / 2) < 1e-12
    table = results_markdown(res)
    assert "**Held-out tasks by group**" in table and "| related (2 tasks) − μ |" in table


CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"


def _sni_index() -> dict[str, dict] | None:
    """The training tasks of ``sni/index.json`` by name, or None without the shared data."""
    try:
        path = default_data_dir() / "sni" / "index.json"
    except DataError:
        return None
    return {t["task"]: t for t in json.loads(path.read_text())["train_tasks"]} if path.is_file() else None


def test_every_committed_study_config_loads_and_its_families_cover_its_tasks():
    """Each ``benchmarks/configs/*.json`` study config passes the reader's checks; a ``families-<name>.json`` next
    to it labels exactly its training tasks; every named task is in the SNI index when the data is present."""
    configs = sorted(p for p in CONFIGS.glob("*.json") if not p.name.startswith(("families-", "heldout-groups-")))
    assert {p.stem for p in configs} >= {"cpu-small", "cpu-medium", "cpu-medium-2", "gpu-full"}
    index = _sni_index()
    for path in configs:
        cfg = StudyConfig.from_json(path)
        if cfg.train_tasks == "ALL":
            continue
        families = CONFIGS / f"families-{path.stem}.json"
        if families.is_file():
            assert sorted(json.loads(families.read_text())) == sorted(cfg.train_tasks), path.name
        if index is not None:
            assert [t for t in cfg.train_tasks if t not in index] == [], path.name
            assert min(index[t]["instances"] for t in cfg.train_tasks) * 0.8 >= cfg.steps_per_task * cfg.batch_size


def test_cpu_medium_sizes_follow_the_issue():
    """cpu-medium: 6 families of 4 tasks, ≥ 96 training examples per task; the second config extends the first
    (same tasks and budget, so its rows pair with the first's and reuse its libraries)."""
    first, second = (StudyConfig.from_json(CONFIGS / f"{n}.json") for n in ("cpu-medium", "cpu-medium-2"))
    families = json.loads((CONFIGS / "families-cpu-medium.json").read_text())
    sizes = sorted(Counter(families.values()).values())
    assert sizes == [4] * 6 and first.steps_per_task * first.batch_size >= 96
    assert first.heldout_tasks is None and first.heldout_limit >= 10 and first.indist_limit >= 5
    assert first.choice_limit >= 50 and len(first.choice_tasks) == 7
    for field in ("train_tasks", "steps_per_task", "batch_size", "lr", "max_prompt_tokens", "max_target_tokens",
                  "max_val", "k", "seed", "name"):
        assert getattr(first, field) == getattr(second, field), field
    assert [r for r in second.rows if r in first.rows] == first.rows


def test_study_builds_semantic_poly_mhr_and_shared_libraries(tmp_path):
    """The round-two libraries are study rows like the others (tiny budgets, in-distribution scores only)."""
    model_dir, data = _model_and_data(tmp_path, n=12, heldout_n=4)
    train = TRAIN
    cfg = StudyConfig(name="t2", model=str(model_dir), train_tasks=train, steps_per_task=1, batch_size=4,
                      max_prompt_tokens=48, max_target_tokens=4, max_val=2, k=2, heldout_limit=1, indist_limit=1,
                      max_new_tokens=2, skills=2, method_options={"arrow": {"top_k": 2}}, share_mode="residual",
                      libraries=["semantic", "poly", "mhr", "mbc-share"],
                      rows=[["poly", "allocation"], ["mhr", "allocation"], ["poly", "mu"], ["mhr", "arrow"],
                            ["semantic", "arrow"], ["mbc-share", "mu"], ["mbc-share", "arrow"]])
    res = run_study(cfg, tmp_path / "out", device="cpu", data_dir=data)
    assert set(res["rows"]) == {"poly/allocation", "mhr/allocation", "poly/mu", "mhr/arrow", "semantic/arrow",
                                "mbc-share/mu", "mbc-share/arrow"}
    # routing accuracy needs each task's own routed expert: skills share every task (none), a --share library's
    # clusters each hold theirs (the shared expert is not routed)
    assert "routing_accuracy" not in res["rows"]["mhr/arrow"]
    assert res["rows"]["mbc-share/arrow"]["routing_accuracy"]["n"] == len(train)
    assert set(res["rows"]["poly/allocation"]["indist"]) == set(train) and res["rows"]["poly/allocation"][
        "heldout"] == {}
    assert "task9_z" in res["rows"]["poly/mu"]["heldout"]
    libs = res["libraries"]
    assert set(libs["poly"]["experts"]) == {"skill0", "skill1"} and "shared" in libs["mbc-share"]["experts"]
    assert ExpertLibrary(libs["mbc-share"]["path"]).load_meta("share")["mode"] == "residual"
    assert sorted(t for ts in libs["semantic"]["experts"].values() for t in ts) == train


def test_study_paired_script_reproduces_the_committed_cpu_small_differences():
    """``benchmarks/study_paired.py`` on the committed cpu-small results gives docs/study.md's paired figures."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "study_paired.py"),
                          str(root / "benchmarks" / "results" / "study_cpu_small.json"),
                          "private/arrow:private/mu", "private/arrow:base", "--parts", "heldout", "indist"],
                         capture_output=True, text=True, check=True).stdout
    assert "| private/arrow − private/mu | heldout | 20 | +4.5 ± 2.1 | +2.2 |" in out
    line = next(x for x in out.splitlines() if x.startswith("| private/arrow − private/mu | heldout"))
    rows = json.loads((root / "benchmarks" / "results" / "study_cpu_small.json").read_text())["rows"]
    d = [rows["private/arrow"]["heldout"][t]["rougeL"] - rows["private/mu"]["heldout"][t]["rougeL"]
         for t in rows["base"]["heldout"]]
    up, down = sum(x > 1e-9 for x in d), sum(x < -1e-9 for x in d)
    assert f"| {up} / {down} / {20 - up - down} |" in line  # brute-force counts
    assert line.endswith(f"| {binomtest(up, up + down).pvalue:.2g} |")
    assert "| private/arrow − base | indist | 24 | +12.4 ± 5.3 | +2.4 |" in out
    diffs = [rows["mbc/arrow"]["choice"][s]["acc_norm"] - rows["base"]["choice"][s]["acc_norm"]
             for s in rows["base"]["choice"]]  # brute force: mean ± sd/√n over the seven sets
    mean, stderr = float(np.mean(diffs)), float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
    choice = subprocess.run([sys.executable, str(root / "benchmarks" / "study_paired.py"),
                             str(root / "benchmarks" / "results" / "study_cpu_small.json"), "mbc/arrow:base",
                             "--parts", "choice"], capture_output=True, text=True, check=True).stdout
    assert f"| mbc/arrow − base | choice | 7 | {100 * mean:+.1f} ± {100 * stderr:.1f} |" in choice
    per_task = subprocess.run([sys.executable, str(root / "benchmarks" / "study_paired.py"),
                               str(root / "benchmarks" / "results" / "study_cpu_small.json"), "mbc/arrow:base",
                               "--parts", "choice", "--per-task"], capture_output=True, text=True, check=True).stdout
    listed = [line.split(" | ") for line in per_task.splitlines() if line.startswith(("| arc", "| b", "| h", "| o",
                                                                                      "| p", "| w"))]
    assert len(listed) == 7 and [float(c[3].rstrip(" |")) for c in listed] == sorted(
        (round(100 * d, 1) for d in diffs), reverse=True)  # every set, largest difference first
    bad = subprocess.run([sys.executable, str(root / "benchmarks" / "study_paired.py"),
                          str(root / "benchmarks" / "results" / "study_cpu_small.json"), "private/arrow:nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "nope: not rows of" in bad.stderr


def test_prototype_overlap_script_tells_a_shared_initialisation_from_independent_ones(tmp_path):
    """``benchmarks/prototype_overlap.py``: experts with one A factor and different B factors have cos(A) = 1 and
    prototypes wholly in that A's row space; independently drawn experts do not."""
    import subprocess
    import sys

    from modlora.library.adapters import LoraAdapter, LoraSpec, random_adapter
    from modlora.models import model_identity

    from .conftest import make_tiny_llama

    root = Path(__file__).resolve().parents[1]
    model = make_tiny_llama()
    spec = LoraSpec(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))
    first, other = random_adapter(model, spec, seed=1), random_adapter(model, spec, seed=2)
    shared = ExpertLibrary.create(tmp_path / "shared", model_identity(model, "tiny"))
    shared.add("e1", first)
    shared.add("e2", LoraAdapter(spec, dict(first.A), dict(other.B)))
    independent = ExpertLibrary.create(tmp_path / "independent", model_identity(model, "tiny"))
    independent.add("e1", first)
    independent.add("e2", other)

    def overlap(lib: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(root / "benchmarks" / "prototype_overlap.py"), str(lib)],
                              capture_output=True, text=True)

    same = overlap(tmp_path / "shared").stdout
    assert "| cos(A_e, A_ref), experts vs the first | 1.000 |" in same
    assert "| share of v_e in span(A_ref) | 1.000 |" in same
    apart = overlap(tmp_path / "independent").stdout
    share = float(next(x for x in apart.splitlines() if x.startswith("| share")).split("|")[2])
    assert share < 0.9  # rank 2 in a 32-dimensional input space
    missing = overlap(tmp_path / "nowhere")
    assert missing.returncode == 2 and "library directory not found" in missing.stderr


def test_plots_of_a_study_without_pairs_warn_nothing(tmp_path, recwarn):
    """A study whose rows share no tasks has no paired differences: ``paired.png`` is still written, without
    matplotlib's empty-legend warning leaking into the output."""
    from modlora.study.report import plot_paired, plot_results

    results = {"config": {"name": "t"}, "rows": {"base": {"heldout": {}}, "private/mu": {"library": "private"}}}
    assert plot_paired(results, tmp_path / "paired.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_results(results, tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert not [w for w in recwarn.list if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]
