"""Library building end to end on a tiny random model: private, shared, MBC, random; resume; Ray == local."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import modlora.build.clustering as clustering_module
import modlora.build.strategies as building
from modlora.build.clustering import cluster_experts as real_cluster_experts
from modlora.build.executors import JobError
from modlora.build.strategies import (
    BuildConfig,
    build_mbc_library,
    build_private_library,
    build_random_library,
    build_shared_library,
    expected_total_steps,
)
from modlora.build.training import TrainConfig
from modlora.data import PromptLimits
from modlora.errors import ModloraError
from modlora.library.adapters import LoraSpec
from modlora.library.store import ExpertLibrary

from .conftest import make_char_tokenizer, make_tiny_llama

TASKS = ["upper", "lower", "first", "last", "double", "reverse"]


def _rules(task: str, word: str) -> str:
    return {"upper": word.upper(), "lower": word.lower(), "first": word[0], "last": word[-1],
            "double": word + word, "reverse": word[::-1]}[task]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("build")
    model_dir = root / "tiny"
    make_tiny_llama(seed=0).save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    words = ["ab", "cd", "Ef", "gh", "iJ", "kl", "mn", "Op", "qr", "st", "uv", "wX", "yz", "AB", "cD", "eF"]
    flat = root / "flat.jsonl"
    with open(flat, "w") as fh:
        for t in TASKS:
            for i, w in enumerate(words * 2):
                fh.write(json.dumps({"task_name": t, "source": w + str(i % 3), "target": _rules(t, w),
                                     "id": f"{t}-{i}"}) + "\n")
    return model_dir, flat


def _config(setup, **kw) -> BuildConfig:
    """The tests' build config; LoRA (rank, dropout) and optimisation (steps per task) keys go to their dataclasses."""
    model_dir, flat = setup
    lora = LoraSpec(**{k: kw.pop(k) for k in ("rank", "alpha", "dropout") if k in kw})
    train = TrainConfig(**{"steps": 3, "batch_size": 4, "lr": 1e-3, **{k: kw.pop(k) for k in ("steps",) if k in kw}})
    base = dict(model=str(model_dir), device="cpu", flat_file=str(flat), lora=lora, train=train, max_val=4,
                limits=PromptLimits(64, 8))
    base.update(kw)
    return BuildConfig(**base)


def _content(lib: ExpertLibrary) -> dict[str, list[str]]:
    return {n: lib.tasks(n) for n in lib.expert_names()}


def test_all_strategies_end_to_end(tmp_path, setup):
    cfg = _config(setup)
    private = build_private_library(tmp_path / "private", TASKS, cfg, progress=False)
    assert _content(private) == {t: [t] for t in TASKS}
    assert all(private.entry(t).metrics["steps"] == 3 for t in TASKS)
    assert all(PromptLimits.from_record(private.entry(t).training) == cfg.limits for t in TASKS)

    shared = build_shared_library(tmp_path / "shared", TASKS, cfg, progress=False)
    assert _content(shared) == {"shared": TASKS} and shared.entry("shared").metrics["steps"] == 18

    mbc, clustering = build_mbc_library(tmp_path / "mbc", TASKS, cfg, k=2, stage1_fraction=0.4, progress=False)
    stage1 = ExpertLibrary(tmp_path / "mbc-stage1")
    assert len(stage1) == 6 and all(stage1.entry(t).metrics["steps"] == 1 for t in TASKS)
    assert clustering.k == 2 and sorted(sum(clustering.clusters, [])) == sorted(TASKS)
    assert sorted(sum(_content(mbc).values(), [])) == sorted(TASKS)
    for name in mbc.expert_names():  # stage 2 budget: (1 - f) · B · |cluster|
        assert mbc.entry(name).metrics["steps"] == max(1, round(3 * 0.6 * len(mbc.tasks(name))))
    assert mbc.load_meta("clustering")["assignment"] == clustering.assignment

    rnd, rclust = build_random_library(tmp_path / "random", tmp_path / "mbc", cfg, seed=1, progress=False)
    assert sorted(len(v) for v in _content(rnd).values()) == sorted(clustering.sizes)
    assert rclust.method == "random"

    # reuse an existing private library for MBC with automatic K: these six toy experts have no cluster structure,
    # so the build refuses (a K = 1 "MBC" library would be a shared one) and keeps the private library as it was
    before = {n: private.entry(n).to_dict() for n in private.expert_names()}
    with pytest.raises(ModloraError, match=r"no cluster structure.*--k N.*--strategy shared"):
        build_mbc_library(tmp_path / "mbc2", TASKS, cfg, k="auto", private_library=tmp_path / "private",
                          progress=False)
    assert not (tmp_path / "mbc2").exists() and not (tmp_path / "mbc2-stage1").exists()
    reopened = ExpertLibrary(tmp_path / "private")
    assert {n: reopened.entry(n).to_dict() for n in reopened.expert_names()} == before
    total = expected_total_steps("mbc", 6, 3, clustering.sizes, 0.4)
    assert total == 6 * 1 + sum(mbc.entry(n).metrics["steps"] for n in mbc.expert_names())


def test_resume_after_injected_failure(tmp_path, setup, monkeypatch):
    cfg = _config(setup, experts_per_job=2)  # chunks: (upper, lower), (first, last), (double, reverse)
    real = building.train_task_experts
    calls = []

    def flaky(lm, lib, plans, **kwargs):
        calls.append(list(plans))
        if "first" in plans:
            raise RuntimeError("injected failure")
        return real(lm, lib, plans, **kwargs)

    monkeypatch.setattr(building, "train_task_experts", flaky)
    with pytest.raises(JobError, match="first"):
        build_private_library(tmp_path / "lib", TASKS, cfg, progress=False)
    lib = ExpertLibrary(tmp_path / "lib")
    assert lib.expert_names() == ["lower", "upper"]
    created = {n: lib.entry(n).created for n in lib.expert_names()}
    monkeypatch.setattr(building, "train_task_experts", real)
    lib = build_private_library(tmp_path / "lib", TASKS, cfg, progress=False)
    assert lib.expert_names() == sorted(TASKS)
    assert all(lib.entry(n).created == t for n, t in created.items())  # finished experts were not retrained
    assert lib.verify() == []


def test_chunking_does_not_change_experts(tmp_path, setup):
    """Experts trained in chunks of 1, 3 or all together are the same (only float summation order differs; dropout
    masks depend on which experts share a batch, so dropout is off)."""
    libs = [build_private_library(tmp_path / f"lib{n}", TASKS[:4], _config(setup, experts_per_job=n, dropout=0.0,
                                                                          shared_prefix=n != 1), progress=False)
            for n in (1, 3, 8)]
    for name in TASKS[:4]:
        ref = libs[0].get(name)
        for lib in libs[1:]:
            other = lib.get(name)
            for m in ref.modules:
                torch.testing.assert_close(other.A[m], ref.A[m], rtol=1e-3, atol=1e-5)
                torch.testing.assert_close(other.B[m], ref.B[m], rtol=1e-3, atol=1e-5)


def test_changed_config_is_refused_or_retrained(tmp_path, setup):
    cfg = _config(setup)
    build_private_library(tmp_path / "lib", TASKS[:2], cfg, progress=False)
    created = {n: ExpertLibrary(tmp_path / "lib").entry(n).created for n in TASKS[:2]}
    # execution-only settings do not count as a change: a finished library resumes as done
    same = build_private_library(tmp_path / "lib", TASKS[:2], _config(setup, experts_per_job=1, shared_prefix=False),
                                 progress=False)
    assert {n: same.entry(n).created for n in TASKS[:2]} == created
    changed = _config(setup, steps=4, rank=2)
    with pytest.raises(ModloraError, match=r"(?s)upper, lower.*lora.rank: 4 -> 2.*train.steps: 3 -> 4.*--retrain-changed"):
        build_private_library(tmp_path / "lib", TASKS[:2], changed, progress=False)
    assert {n: ExpertLibrary(tmp_path / "lib").entry(n).created for n in TASKS[:2]} == created  # nothing lost
    with pytest.raises(ModloraError, match=r"(?s)max_prompt_tokens: 64 -> 32.*truncate: 'left' -> 'input'"):
        build_private_library(tmp_path / "lib", TASKS[:2], _config(setup, limits=PromptLimits(32, 8, "input")),
                              progress=False)
    # adding a task with the old settings is fine; retrain-changed retrains exactly the changed experts
    lib = build_private_library(tmp_path / "lib", TASKS[:3], cfg, progress=False)
    assert lib.expert_names() == sorted(TASKS[:3])
    lib = build_private_library(tmp_path / "lib", TASKS[:2], changed, progress=False,
                                on_config_change="retrain-changed")
    assert all(lib.entry(n).metrics["steps"] == 4 and lib.get(n).spec.rank == 2 for n in TASKS[:2])
    assert lib.entry(TASKS[2]).metrics["steps"] == 3  # not part of this build: left alone
    # new-library moves the old one aside, nothing is deleted
    lib = build_private_library(tmp_path / "lib", TASKS[:1], cfg, progress=False, on_config_change="new-library")
    assert lib.expert_names() == [TASKS[0]] and lib.entry(TASKS[0]).metrics["steps"] == 3
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("lib.replaced-")]
    assert len(moved) == 1 and ExpertLibrary(moved[0]).expert_names() == sorted(TASKS[:3])
    with pytest.raises(ModloraError, match="on_config_change"):
        build_private_library(tmp_path / "lib", TASKS[:1], cfg, progress=False, on_config_change="maybe")


def test_build_settings_keep_the_prompt_limits_under_their_record_keys():
    """Libraries built before BuildConfig carried a PromptLimits stored these flat keys: their settings still match."""
    settings = BuildConfig(limits=PromptLimits(64, 8, "input")).training_settings()
    assert {k: settings[k] for k in PromptLimits.RECORD_KEYS} == PromptLimits(64, 8, "input").record()
    assert not [k for k in settings if k.startswith("limits")]
    assert BuildConfig().training_settings()["max_prompt_tokens"] == PromptLimits().max_prompt_tokens


def test_bad_build_arguments(tmp_path, setup):
    cfg = _config(setup)
    with pytest.raises(ModloraError, match="stage1_fraction"):
        build_mbc_library(tmp_path / "m", TASKS, cfg, stage1_fraction=1.5)
    with pytest.raises(ModloraError, match="not in"):
        build_private_library(tmp_path / "p", ["nope"], cfg, progress=False)
    with pytest.raises(ModloraError, match="no MBC clustering"):
        ExpertLibrary.create(tmp_path / "empty", building._base_info(cfg))
        build_random_library(tmp_path / "r", tmp_path / "empty", cfg)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")
def test_ray_executor_matches_local(tmp_path, setup):
    cfg = _config(setup, steps=2, experts_per_job=2)  # two chunks, spread over the Ray workers
    tasks = TASKS[:3]
    local = build_private_library(tmp_path / "local", tasks, cfg, progress=False)
    ray_lib = build_private_library(tmp_path / "ray", tasks, cfg, executor="ray", progress=False)
    assert _content(local) == _content(ray_lib)
    for name in local.expert_names():  # same training; only float summation order may differ across processes
        a, b = local.get(name), ray_lib.get(name)
        for m in a.modules:
            torch.testing.assert_close(a.B[m], b.B[m], rtol=1e-3, atol=1e-5)


def test_semantic_strategy_and_shared_warm_start(tmp_path, setup, monkeypatch):
    flat = tmp_path / "described.jsonl"  # the tasks' inputs say what they ask: the semantic embedding sees it
    with open(flat, "w") as fh:
        for t in TASKS:
            for i, w in enumerate(["ab", "cd", "Ef", "gh", "iJ", "kl", "mn", "Op"] * 2):
                fh.write(json.dumps({"task_name": t, "source": f"{t} of {w}", "target": _rules(t, w),
                                     "id": f"{t}-{i}"}) + "\n")
    cfg = _config(setup, flat_file=str(flat))
    sem, clustering = building.build_semantic_library(tmp_path / "sem", TASKS, cfg, k=2, progress=False)
    with monkeypatch.context() as patch:  # automatic K that finds no structure refuses instead of building K = 1
        patch.setattr(clustering_module, "cluster_experts", lambda sim, *a, **kw: dataclasses.replace(
            real_cluster_experts(sim, 1), no_structure=True, message="no cluster structure: (test)"))
        with pytest.raises(ModloraError, match=r"no cluster structure in the tasks' embeddings.*--k N"):
            building.build_semantic_library(tmp_path / "sem-auto", TASKS, cfg, k="auto", progress=False)
    assert not (tmp_path / "sem-auto").exists()
    assert clustering.k == 2 and clustering.method == "semantic" and clustering.features == "semantic"
    assert sorted(sum(_content(sem).values(), [])) == sorted(TASKS)
    for name in sem.expert_names():  # no stage 1: each task's whole budget goes to its cluster expert
        assert sem.entry(name).metrics["steps"] == 3 * len(sem.tasks(name))
    assert sem.load_meta("clustering")["method"] == "semantic"
    assert expected_total_steps("semantic", 6, 3, clustering.sizes) == 18

    inits: dict[str, object] = {}
    real = building.train_task_experts

    def spy(lm, lib, plans, **kw):
        inits.update({n: p.init for n, p in plans.items()})
        return real(lm, lib, plans, **kw)

    monkeypatch.setattr(building, "train_task_experts", spy)
    shared, _ = building.build_semantic_library(tmp_path / "sem-share", TASKS, cfg, k=2, share_fraction=0.5,
                                                share_mode="warm", progress=False)
    assert shared.tasks("shared") == sorted(TASKS) and shared.entry("shared").metrics["steps"] == 9  # 0.5 · 6 · 3
    clusters = [n for n in shared.expert_names() if n != "shared"]
    assert shared.load_meta("share") == {"expert": "shared", "mode": "warm", "fraction": 0.5,
                                         "experts": clusters}
    stored = shared.get("shared")
    for name in clusters:  # warm start from the stored shared expert, with the rest of the budget
        assert shared.entry(name).training["init_from"] == "shared"
        assert shared.entry(name).metrics["steps"] == max(1, round(3 * 0.5 * len(shared.tasks(name))))
        assert all(torch.equal(inits[name].A[m], stored.A[m]) for m in stored.A)
    assert inits["shared"] is None

    mbc, _ = build_mbc_library(tmp_path / "mbc-share", TASKS, cfg, k=2, share_fraction=0.2, progress=False)
    assert "shared" in mbc and mbc.load_meta("share")["fraction"] == 0.2
    with pytest.raises(ModloraError, match="share_fraction"):
        build_mbc_library(tmp_path / "mbc-bad", TASKS, cfg, k=2, share_fraction=0.6, progress=False)


def test_residual_share_trains_on_the_shared_base_and_resumes(tmp_path, setup, monkeypatch):
    """``share_mode="residual"``: the cluster experts are fresh LoRAs trained while the base holds W + ΔW_shared
    (restored bit-exactly after); the mode is recorded and fingerprinted; a build interrupted between chunks
    resumes to the uninterrupted library."""
    cfg = _config(setup, experts_per_job=1, dropout=0.0)
    clusters = [["double", "last", "reverse"], ["first", "lower", "upper"]]
    clustering = building.ClusteringResult(sorted(TASKS), {t: j for j, c in enumerate(clusters) for t in c}, clusters,
                                           2, None, method="test")
    tasks_of = {t: [t] for t in TASKS}
    lm = building._process_model(cfg.model, cfg.device, cfg.dtype)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    seen: dict[str, dict[str, torch.Tensor]] = {}
    real = building.train_task_experts

    def spy(lm_, lib, plans, **kw):
        for name, plan in plans.items():
            assert plan.init is None  # a residual starts fresh
            seen[name] = {k: v.clone() for k, v in lm_.model.state_dict().items()}
        return real(lm_, lib, plans, **kw)

    monkeypatch.setattr(building, "train_task_experts", spy)
    ref = building.build_cluster_library(tmp_path / "ref", clustering, tasks_of, cfg, budget_per_task=1.0,
                                         stage="test", progress=False, share_fraction=0.5, share_mode="residual")
    assert ref.load_meta("share") == {"expert": "shared", "mode": "residual", "fraction": 0.5,
                                      "experts": ["cluster0", "cluster1"]}
    assert ref.load_meta("build_config")["share.mode"] == "residual"
    shared = ref.get("shared")
    for name in ("cluster0", "cluster1"):
        assert ref.entry(name).training["residual_on"] == "shared" and "init_from" not in ref.entry(name).training
        assert ref.entry(name).metrics["steps"] == max(1, round(3 * 0.5 * 3))
        for m in shared.modules:  # trained on W + ΔW_shared
            torch.testing.assert_close(seen[name][f"{m}.weight"], before[f"{m}.weight"] + shared.delta_weight(m))
    assert torch.equal(seen["shared"][f"{shared.modules[0]}.weight"], before[f"{shared.modules[0]}.weight"])
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())  # restored bit-exactly

    def flaky(lm_, lib, plans, **kw):
        if "cluster1" in plans:
            raise RuntimeError("injected failure")
        return real(lm_, lib, plans, **kw)

    monkeypatch.setattr(building, "train_task_experts", flaky)
    with pytest.raises(JobError, match="cluster1"):
        building.build_cluster_library(tmp_path / "lib", clustering, tasks_of, cfg, budget_per_task=1.0, stage="test",
                                       progress=False, share_fraction=0.5, share_mode="residual")
    assert ExpertLibrary(tmp_path / "lib").expert_names() == ["cluster0", "shared"]
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())  # restored after a failure too
    monkeypatch.setattr(building, "train_task_experts", real)
    lib = building.build_cluster_library(tmp_path / "lib", clustering, tasks_of, cfg, budget_per_task=1.0,
                                         stage="test", progress=False, share_fraction=0.5, share_mode="residual")
    for name in ref.expert_names():
        a, b = ref.get(name), lib.get(name)
        for m in a.modules:
            torch.testing.assert_close(b.A[m], a.A[m], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(b.B[m], a.B[m], rtol=1e-4, atol=1e-6)

    # switching the mode is a change of settings: refused with the difference named, or only the cluster
    # experts retrained (the shared expert's training is the same in both modes)
    created = lib.entry("shared").created
    with pytest.raises(ModloraError, match=r"(?s)cluster0, cluster1.*share.mode: 'residual' -> 'warm'"):
        building.build_cluster_library(tmp_path / "lib", clustering, tasks_of, cfg, budget_per_task=1.0,
                                       stage="test", progress=False, share_fraction=0.5, share_mode="warm")
    warm = building.build_cluster_library(tmp_path / "lib", clustering, tasks_of, cfg, budget_per_task=1.0,
                                          stage="test", progress=False, share_fraction=0.5, share_mode="warm",
                                          on_config_change="retrain-changed")
    assert warm.entry("shared").created == created and warm.load_meta("share")["mode"] == "warm"
    assert all(warm.entry(n).training["init_from"] == "shared" for n in ("cluster0", "cluster1"))
    with pytest.raises(ModloraError, match="share_mode"):
        building.build_cluster_library(tmp_path / "bad", clustering, tasks_of, cfg, budget_per_task=1.0,
                                       stage="test", progress=False, share_fraction=0.5, share_mode="cold")


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")
def test_residual_share_on_ray_matches_local(tmp_path, setup):
    """The Ray workers load the stored shared expert and train the residuals on W + ΔW_shared, as local does."""
    cfg = _config(setup, steps=2, dropout=0.0)
    clusters = [["first", "last"], ["lower", "upper"]]
    clustering = building.ClusteringResult(sorted(TASKS[:4]), {t: j for j, c in enumerate(clusters) for t in c},
                                           clusters, 2, None, method="test")
    libs = [building.build_cluster_library(tmp_path / executor, clustering, {t: [t] for t in TASKS[:4]}, cfg,
                                           budget_per_task=1.0, stage="test", executor=executor, progress=False,
                                           share_fraction=0.5, share_mode="residual")
            for executor in ("local", "ray")]
    assert libs[1].load_meta("share")["mode"] == "residual"
    for name in libs[0].expert_names():
        a, b = libs[0].get(name), libs[1].get(name)
        for m in a.modules:
            torch.testing.assert_close(b.B[m], a.B[m], rtol=1e-3, atol=1e-5)
