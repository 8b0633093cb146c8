"""Poly/MHR libraries on a tiny random model: the mixture algebra, training, storage and the three reuse paths."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import modlora.build.strategies as building
from modlora.build.multitrain import IndexSelector
from modlora.build.poly import MixtureSelector
from modlora.build.strategies import BuildConfig, build_poly_library
from modlora.build.training import TrainConfig
from modlora.data import PromptLimits
from modlora.errors import LibraryError, ModloraError, RoutingError
from modlora.library.adapters import LoraAdapter, LoraSpec, merge_adapter
from modlora.library.skill_allocation import ALLOCATION_META, Allocation, mix_factors
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.reuse.prepare import prepare_model

from .conftest import make_char_tokenizer, make_tiny_llama

TASKS = ["upper", "reverse"]


def test_mixture_selector_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    S, h, r = 3, 2, 4
    A, B = torch.randn(S, r, 5, generator=g), torch.randn(S, 6, r, generator=g)
    w = torch.softmax(torch.randn(2, h, S, generator=g), -1)
    a, b = MixtureSelector(w).select(A, 1), MixtureSelector(w).select(B, 2)
    for row in range(2):
        for j in range(h):
            blk = slice(j * r // h, (j + 1) * r // h)
            torch.testing.assert_close(a[row, blk], sum(w[row, j, s] * A[s, blk] for s in range(S)))
            torch.testing.assert_close(b[row, :, blk], sum(w[row, j, s] * B[s, :, blk] for s in range(S)))
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 0]), S).float().unsqueeze(1)  # Poly, h = 1
    torch.testing.assert_close(mix_factors(one_hot, A, 1), IndexSelector(torch.tensor([2, 0])).select(A, 1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("poly")
    model_dir = root / "tiny"
    make_tiny_llama(seed=0).save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx"]
    flat = root / "flat.jsonl"
    with open(flat, "w") as fh:
        for t in TASKS:
            for i, w in enumerate(words * 2):
                fh.write(json.dumps({"task_name": t, "source": w, "id": f"{t}-{i}",
                                     "target": w.upper() if t == "upper" else w[::-1]}) + "\n")
    return model_dir, flat


def _config(setup, **kw) -> BuildConfig:
    model_dir, flat = setup
    base = dict(model=str(model_dir), device="cpu", flat_file=str(flat), lora=LoraSpec(dropout=0.0),
                train=TrainConfig(steps=6, batch_size=4, lr=1e-2), max_val=4,
                limits=PromptLimits(48, 6))
    base.update(kw)
    return BuildConfig(**base)


@pytest.mark.parametrize("heads", [1, 2])
def test_poly_and_mhr_library(tmp_path, setup, heads, monkeypatch):
    cfg = _config(setup)
    lib = build_poly_library(tmp_path / "lib", TASKS, cfg, skills=3, heads=heads, allocation_lr=0.5, progress=False)
    assert lib.expert_names() == ["skill0", "skill1", "skill2"]
    assert all(lib.tasks(n) == sorted(TASKS) for n in lib.expert_names())
    assert lib.entry("skill0").training["stage"] == ("poly" if heads == 1 else "mhr")
    alloc = Allocation.from_dict(ExpertLibrary(tmp_path / "lib").load_meta(ALLOCATION_META))
    assert alloc.tasks == sorted(TASKS) and alloc.skills == lib.expert_names() and alloc.heads == heads
    w = alloc.weights()
    assert w.shape == (2, heads, 3)
    assert abs(w - w[:, :, ::-1]).max() > 0.02  # moved away from the uniform start
    assert abs(w[0] - w[1]).max() > 0.02, "the two tasks learned different allocations"
    # a finished build is skipped (resumable): training is not called again
    monkeypatch.setattr(building, "train_poly_job", lambda job: pytest.fail("retrained a finished build"))
    build_poly_library(tmp_path / "lib", TASKS, cfg, skills=3, heads=heads, allocation_lr=0.5, progress=False)
    # other skills/heads on the same library are refused, as any changed build
    with pytest.raises(ModloraError, match="other settings"):
        build_poly_library(tmp_path / "lib", TASKS, cfg, skills=3, heads=3 - heads, allocation_lr=0.5,
                           progress=False)

    lm = load_base_model(str(setup[0]), device="cpu")
    ids = torch.randint(3, 90, (2, 8))
    with torch.no_grad():
        base = lm.model(ids).logits
        rm = prepare_model(lm, lib, "allocation")  # (a) in distribution: each example its task's mixture
        out = rm(ids, tasks=["reverse", "upper"]).logits
        rm.restore()
        skills = lib.experts()
        for row, task in enumerate(["reverse", "upper"]):
            adapter = alloc.task_adapter(task, skills)
            assert adapter.spec.rank == cfg.lora.rank
            merge_adapter(lm.model, adapter)
            torch.testing.assert_close(out[row], lm.model(ids[row:row + 1]).logits[0], rtol=1e-4, atol=1e-5)
            lm.model = load_base_model(str(setup[0]), device="cpu").model
        with pytest.raises(RoutingError, match="no learned allocation"):
            prepare_model(lm, lib, "allocation")(ids, tasks=["unknown", "upper"])
        lm = load_base_model(str(setup[0]), device="cpu")
        for method in ("mu", "arrow"):  # (b) zero-shot μ uniform over skills, (c) Arrow over the skills
            rm = prepare_model(lm, lib, method, {"top_k": 2} if method == "arrow" else None)
            out = rm(ids).logits
            assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-5
            rm.restore()


def test_uniform_mu_equals_uniform_allocation():
    """μ over the skills (mean A, mean B) is exactly the uniform allocation, per head too."""
    g = torch.Generator().manual_seed(1)
    spec = LoraSpec(rank=4)
    skills = {f"skill{s}": LoraAdapter(spec, {"m": torch.randn(4, 5, generator=g)}, {"m": torch.randn(6, 4, generator=g)})
              for s in range(3)}
    import numpy as np
    alloc = Allocation(["t"], list(skills), 2, np.zeros((1, 2, 3)))
    mixed = alloc.task_adapter("t", skills)
    torch.testing.assert_close(mixed.A["m"], torch.stack([s.A["m"] for s in skills.values()]).mean(0))
    torch.testing.assert_close(mixed.B["m"], torch.stack([s.B["m"] for s in skills.values()]).mean(0))


def test_bad_poly_arguments(tmp_path, setup):
    cfg = _config(setup)
    with pytest.raises(ModloraError, match="heads must divide"):
        build_poly_library(tmp_path / "x", TASKS, cfg, skills=2, heads=3, progress=False)
    with pytest.raises(ModloraError, match="skills must be >= 1"):
        build_poly_library(tmp_path / "x", TASKS, cfg, skills=0, progress=False)
    with pytest.raises(LibraryError, match="expected"):
        Allocation.from_dict({"tasks": ["a"], "skills": ["s"], "heads": 1, "logits": [[[0.0, 1.0]]]})


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")
def test_poly_on_ray_matches_local(tmp_path, setup):
    cfg = _config(setup, train=TrainConfig(steps=2, batch_size=4, lr=1e-2))
    local = build_poly_library(tmp_path / "local", TASKS, cfg, skills=2, heads=2, progress=False)
    remote = build_poly_library(tmp_path / "ray", TASKS, cfg, skills=2, heads=2, executor="ray", progress=False)
    assert remote.expert_names() == local.expert_names()
    for name in local.expert_names():  # same training; only float summation order may differ across processes
        a, b = local.get(name), remote.get(name)
        for m in a.modules:
            torch.testing.assert_close(a.B[m], b.B[m], rtol=1e-3, atol=1e-5)
    la, ra = (Allocation.from_dict(lib.load_meta(ALLOCATION_META)) for lib in (local, remote))
    assert abs(la.logits - ra.logits).max() < 1e-4
