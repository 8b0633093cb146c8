"""Library building end to end on a tiny random model: private, shared, MBC, random; resume; Ray == local."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import modlora.building as building
from modlora.building import (
    BuildConfig,
    build_mbc_library,
    build_private_library,
    build_random_library,
    build_shared_library,
    expected_total_steps,
)
from modlora.errors import ModloraError
from modlora.executors import JobError
from modlora.library import ExpertLibrary

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
    model_dir, flat = setup
    base = dict(model=str(model_dir), device="cpu", flat_file=str(flat), steps_per_task=3, batch_size=4, lr=1e-3,
                max_val=4, max_prompt_tokens=64, max_target_tokens=8)
    base.update(kw)
    return BuildConfig(**base)


def _content(lib: ExpertLibrary) -> dict[str, list[str]]:
    return {n: lib.tasks(n) for n in lib.expert_names()}


def test_all_strategies_end_to_end(tmp_path, setup):
    cfg = _config(setup)
    private = build_private_library(tmp_path / "private", TASKS, cfg, progress=False)
    assert _content(private) == {t: [t] for t in TASKS}
    assert all(private.entry(t).metrics["steps"] == 3 for t in TASKS)

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

    # reuse an existing private library for MBC with automatic K
    mbc2, auto = build_mbc_library(tmp_path / "mbc2", TASKS, cfg, k="auto", private_library=tmp_path / "private",
                                   progress=False)
    # k=2 is honoured; auto either finds K in range or says plainly that there is no structure (then K = 1)
    assert auto.scores_by_k and (2 <= auto.k <= 5 or (auto.no_structure and auto.k == 1 and auto.message))
    assert not (tmp_path / "mbc2-stage1").exists()
    total = expected_total_steps("mbc", 6, 3, clustering.sizes, 0.4)
    assert total == 6 * 1 + sum(mbc.entry(n).metrics["steps"] for n in mbc.expert_names())


def test_resume_after_injected_failure(tmp_path, setup, monkeypatch):
    cfg = _config(setup)
    real = building.train_task_expert
    calls = []

    def flaky(lm, lib, name, *args, **kwargs):
        calls.append(name)
        if name == "first":
            raise RuntimeError("injected failure")
        return real(lm, lib, name, *args, **kwargs)

    monkeypatch.setattr(building, "train_task_expert", flaky)
    with pytest.raises(JobError, match="first"):
        build_private_library(tmp_path / "lib", TASKS, cfg, progress=False)
    lib = ExpertLibrary(tmp_path / "lib")
    assert lib.expert_names() == ["lower", "upper"]
    created = {n: lib.entry(n).created for n in lib.expert_names()}
    monkeypatch.setattr(building, "train_task_expert", real)
    lib = build_private_library(tmp_path / "lib", TASKS, cfg, progress=False)
    assert lib.expert_names() == sorted(TASKS)
    assert all(lib.entry(n).created == t for n, t in created.items())  # finished experts were not retrained
    assert lib.verify() == []


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
    cfg = _config(setup, steps_per_task=2)
    tasks = TASKS[:3]
    local = build_private_library(tmp_path / "local", tasks, cfg, progress=False)
    ray_lib = build_private_library(tmp_path / "ray", tasks, cfg, executor="ray", progress=False)
    assert _content(local) == _content(ray_lib)
    for name in local.expert_names():  # same training; only float summation order may differ across processes
        a, b = local.get(name), ray_lib.get(name)
        for m in a.modules:
            torch.testing.assert_close(a.B[m], b.B[m], rtol=1e-3, atol=1e-5)
