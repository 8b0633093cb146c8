"""Expert initialisations (shared, per-expert, EVA, gradient) against PEFT and brute force; the build option."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from modlora.build.initialisation import (
    INIT_BATCHES,
    check_init,
    expert_seed,
    gradient_init,
    initial_adapter,
)
from modlora.build.strategies import (
    BuildConfig,
    PlannedExpert,
    build_poly_library,
    build_private_library,
    expert_fingerprint,
)
from modlora.build.training import TrainConfig, target_loss
from modlora.data import EncodedExample, PromptLimits, collate, length_grouped_batches
from modlora.errors import DataError, ModloraError
from modlora.library.adapters import LoraSpec, adapted_modules
from modlora.library.store import ExpertLibrary

from .conftest import make_char_tokenizer, make_tiny_llama

SPEC = LoraSpec(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj", "o_proj"))


def _examples(task: str, n: int, seed: int) -> list[EncodedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(3, 100, (length,), generator=g).tolist()
        out.append(EncodedExample(task, ids[:-3], ids[-3:], f"{task}-{i}"))
    return out


def test_check_init_names_the_choices() -> None:
    assert check_init("eva") == "eva"
    with pytest.raises(DataError, match="shared, per-expert, eva, gradient"):
        check_init("kaiming")
    with pytest.raises(DataError, match="init must be one of"):
        BuildConfig(init="kaiming")  # type: ignore[arg-type]


def test_shared_and_per_expert() -> None:
    model = make_tiny_llama()
    train = {"a": _examples("a", 4, 0), "b": _examples("b", 4, 1)}
    assert initial_adapter("shared", model, SPEC, "a", train["a"], pad_id=2, seed=0) is None
    first = {n: initial_adapter("per-expert", model, SPEC, n, ex, pad_id=2, seed=0) for n, ex in train.items()}
    again = {n: initial_adapter("per-expert", model, SPEC, n, ex, pad_id=2, seed=0) for n, ex in train.items()}
    m = adapted_modules(model, SPEC.target_modules)[0]
    assert torch.equal(first["a"].A[m], again["a"].A[m])                 # deterministic
    assert not torch.allclose(first["a"].A[m], first["b"].A[m])          # a seed per expert
    bound = 1 / model.config.hidden_size ** 0.5
    assert first["a"].A[m].abs().max() <= bound and not first["a"].B[m].any()
    assert expert_seed(0, "a") != expert_seed(0, "b") and expert_seed(1, "a") != expert_seed(0, "a")


def test_eva_is_the_exact_pca_of_the_layer_inputs() -> None:
    model = make_tiny_llama()
    examples = _examples("a", 24, 3)
    ours = initial_adapter("eva", model, SPEC, "a", examples, pad_id=2, seed=0, batch_size=5)
    named = dict(model.named_modules())
    batch = collate(examples, 2)
    keep = batch.attention_mask.bool()
    seen: dict[str, torch.Tensor] = {}
    handles = [named[m].register_forward_pre_hook(lambda mod, a: seen.__setitem__(mod, a[0][keep])) for m in ours.modules]
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in handles:
        h.remove()
    for m in ours.modules:
        x = seen[named[m]].double()
        _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)        # PCA by SVD of the centred tokens
        top = vh[: SPEC.rank].float()
        torch.testing.assert_close(ours.A[m].T @ ours.A[m], top.T @ top, atol=1e-4, rtol=0)
        assert not ours.B[m].any()


def test_eva_agrees_with_peft_initialize_lora_eva_weights() -> None:
    """PEFT's own ``initialize_lora_eva_weights`` (rho 1, the same tokens in one batch) runs one randomised PCA:
    its top direction is ours and its rank-r subspace ours within that estimate. (Cycling over several batches, its
    incremental estimate drifts on the tiny model's nearly flat input spectrum, eigenvalues 2.63, 2.36, 2.17, ...:
    which is why the build computes the exact PCA in one pass.)"""
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    model = make_tiny_llama()
    examples = _examples("a", 24, 3)
    ours = initial_adapter("eva", model, SPEC, "a", examples, pad_id=2, seed=0, batch_size=len(examples))
    batch = collate(examples, 2)
    config = LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha, target_modules=list(SPEC.target_modules),
                        init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    peft_model = get_peft_model(make_tiny_llama(), config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(peft_model, [{"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}],
                                show_progress_bar=False)
    named = dict(peft_model.named_modules())
    for m in ours.modules:
        theirs = named[f"base_model.model.{m}"].lora_A["default"].weight.detach().float()
        assert abs(float(ours.A[m][0] @ theirs[0])) > 0.99, m
        cosines = torch.linalg.svdvals(ours.A[m] @ theirs.T)          # cosines of the principal angles
        assert float(cosines.min()) > 0.9, (m, cosines)


def test_gradient_init_is_the_top_singular_directions_of_the_full_weight_gradient() -> None:
    model = make_tiny_llama()
    examples = _examples("a", 20, 5)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ours = gradient_init(model, adapted_modules(model, SPEC.target_modules), SPEC, examples, pad_id=2, batch_size=4)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags          # restored
    assert all(p.grad is None for p in model.parameters())                             # the weights got no gradient
    for p in model.parameters():
        p.requires_grad_(False)
    # brute force: autograd on the weights themselves, summed over the same first batches
    named = dict(model.named_modules())
    for m in ours.modules:
        named[m].weight.requires_grad_(True)
    for batch in length_grouped_batches(examples, 4, seed=0)[:INIT_BATCHES]:
        loss, _ = target_loss(model, collate(batch, 2))
        loss.backward()
    for m in ours.modules:
        v = torch.linalg.svd(named[m].weight.grad.double()).Vh[: SPEC.rank].float()
        torch.testing.assert_close(ours.A[m].T @ ours.A[m], v.T @ v, atol=1e-4, rtol=0)   # same row space


def _tiny_build(tmp_path: Path) -> tuple[Path, Path]:
    model_dir = tmp_path / "tiny"
    make_tiny_llama(seed=0).save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    flat = tmp_path / "flat.jsonl"
    with open(flat, "w") as fh:
        for t, f in (("up", str.upper), ("rev", lambda w: w[::-1])):
            for i, w in enumerate(["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"] * 3):
                fh.write(json.dumps({"task_name": t, "source": w, "target": f(w), "id": f"{t}-{i}"}) + "\n")
    return model_dir, flat


@pytest.mark.parametrize("init", ["per-expert", "eva", "gradient"])
def test_build_records_the_init_and_starts_each_expert_from_its_own(tmp_path: Path, init: str) -> None:
    model_dir, flat = _tiny_build(tmp_path)
    spec = LoraSpec(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))
    config = BuildConfig(model=str(model_dir), flat_file=str(flat), lora=spec, max_val=2, init=init,  # type: ignore
                         train=TrainConfig(steps=2, batch_size=4, lr=1e-3))
    lib = build_private_library(tmp_path / "lib", ["up", "rev"], config, progress=False)
    assert lib.load_meta("build_config")["init"] == init
    a = {n: lib.get(n).A["model.layers.0.self_attn.q_proj"] for n in ("up", "rev")}
    # two steps at lr 1e-3 barely move A: the experts' A still differ by their different starts
    assert (a["up"] - a["rev"]).abs().max() > 1e-2
    with pytest.raises(ModloraError, match=f"init: '{init}' -> 'shared'"):
        build_private_library(tmp_path / "lib", ["up", "rev"], BuildConfig(
            model=str(model_dir), flat_file=str(flat), lora=spec, max_val=2,
            train=TrainConfig(steps=2, batch_size=4, lr=1e-3)), progress=False)


def test_fingerprint_keeps_old_shared_libraries_valid_and_separates_inits() -> None:
    planned = PlannedExpert("t", ("t",), 1.0, "private")
    shared = expert_fingerprint(BuildConfig(), planned)
    assert shared != expert_fingerprint(BuildConfig(init="eva"), planned)
    assert expert_fingerprint(BuildConfig(init="eva"), planned) != expert_fingerprint(BuildConfig(init="gradient"),
                                                                                        planned)
    assert shared != expert_fingerprint(BuildConfig(limits=PromptLimits(truncate="input")), planned)
    # the shared init and left truncation (what was built before either setting existed) leave the fingerprint as the
    # formula before the settings existed gave it; so do the default targets (then Llama's q,k,v,o names, now the
    # architecture's attention projections) and fan_in_fan_out (then absent)
    doc = {k: v for k, v in BuildConfig().training_settings().items()
           if k not in ("init", "truncate", "lora.fan_in_fan_out")}
    doc |= {"tasks": ["t"], "budget_scale": 1.0, "lora.target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"]}
    assert shared == hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def test_poly_refuses_a_per_expert_init(tmp_path: Path) -> None:
    with pytest.raises(ModloraError, match="Poly/MHR skills"):
        build_poly_library(tmp_path / "lib", ["a"], BuildConfig(init="eva"), skills=2, progress=False)
    assert not (tmp_path / "lib").exists() or not ExpertLibrary(tmp_path / "lib").expert_names()
