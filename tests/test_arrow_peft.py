"""modlora's Arrow against PEFT's ``create_arrow_model`` (peft 0.21).

Where the two agree: PEFT's ``ArrowLoraLinearLayer`` uses, per module and expert, the top right singular vector
of ``B A`` as prototype, logits ``|x·v_e|`` (no input normalisation), keeps the top-k, and takes a softmax of the
kept logits divided by ``router_temperature`` — exactly ``ArrowRouter(top_k, temperature)`` with the defaults
``normalize_inputs=False, normalize_prototypes=True, tie_qkv=False`` and mixing ``"outputs"``. GenKnowSub with
``use_gks`` subtracts the mean general A and B from the task factors: ``general_experts=…, gks_space="factors"``.

Where they differ, and why the test uses adapters with a clear spectral gap:

* PEFT finds the prototype by 15 steps of power iteration from a random start; its error shrinks like
  ``(σ₂/σ₁)^(2·15)``, so with σ₂ ≈ σ₁ (or a start nearly orthogonal to v₁) it returns a different vector, and
  routing can then pick different experts. modlora computes the singular vector exactly (QR + r×r SVD, float64);
  here σ₂/σ₁ = 0.2, so PEFT is exact to float32 rounding.
* PEFT never ties q/k/v (``tie_qkv=True`` differs by design), always materialises a (t, E, out) tensor, requires one
  rank for all experts, routes in the LoRA weights' dtype (modlora routes in float32), and mutates the loaded
  weights in place for GenKnowSub.
"""

from __future__ import annotations

import pytest
import torch

from modlora.library.adapters import LoraAdapter, LoraSpec, adapted_modules
from modlora.reuse.routing import ArrowRouter, route

from .conftest import make_tiny_llama

peft = pytest.importorskip("peft")
from peft import ArrowConfig, create_arrow_model  # noqa: E402

SPEC = LoraSpec(rank=4, alpha=8.0, dropout=0.0)


def gapped_adapter(model: torch.nn.Module, seed: int, scale: float = 1.0) -> LoraAdapter:
    """Every module's ``B A`` has singular values (σ₁, σ₁/5, σ₁/10, σ₁/20)·scale², random non-orthogonal factors."""
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    modules = dict(model.named_modules())
    for name in adapted_modules(model, SPEC.target_modules):
        lin = modules[name]
        u, _ = torch.linalg.qr(torch.randn(lin.out_features, 4, generator=g))
        v, _ = torch.linalg.qr(torch.randn(lin.in_features, 4, generator=g))
        top = 0.5 + torch.rand(1, generator=g).item()
        sv = torch.tensor([top, top / 5, top / 10, top / 20])
        mix = torch.randn(4, 4, generator=g) * 0.3 + torch.eye(4)
        B[name] = scale * (u @ torch.diag(sv) @ mix)
        A[name] = scale * torch.linalg.solve(mix, v.T)
    return LoraAdapter(SPEC, A, B)


def peft_prototypes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model."): mod.lora_arrow["arrow_router"].prototypes
            for name, mod in model.named_modules() if hasattr(mod, "lora_arrow") and "arrow_router" in mod.lora_arrow}


@pytest.mark.parametrize(("top_k", "temperature", "use_gks"), [(2, 1.0, False), (3, 0.5, False), (2, 1.0, True)])
def test_arrow_matches_peft(tmp_path, top_k: int, temperature: float, use_gks: bool) -> None:
    shape_model = make_tiny_llama()
    experts = {f"task{i}": gapped_adapter(shape_model, seed=i) for i in range(5)}
    # small general experts, so that the task experts keep their spectral gap after subtraction (PEFT converges)
    general = {f"gen{i}": gapped_adapter(shape_model, seed=100 + i, scale=0.1) for i in range(2)} if use_gks else None
    paths = []
    for name, ad in experts.items():
        ad.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    general_paths = []
    for name, ad in (general or {}).items():
        ad.save(tmp_path / name)
        general_paths.append(str(tmp_path / name))

    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=use_gks, rng_seed=0)
    peft_model = create_arrow_model(make_tiny_llama(), paths, cfg, general_adapter_paths=general_paths or None).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits

    ours = route(make_tiny_llama(), experts, ArrowRouter(top_k=top_k, temperature=temperature),
                 general_experts=general, gks_space="factors")
    with torch.no_grad():
        our_logits = ours(input_ids=ids).logits
        base_logits = make_tiny_llama()(input_ids=ids).logits

    theirs = peft_prototypes(peft_model)
    assert set(theirs) == set(ours.router.prototypes)
    for layer, p in theirs.items():
        cos = (p.double() * ours.router.prototypes[layer].double()).sum(1).abs()
        assert torch.all(cos > 1 - 1e-5), layer
    assert (our_logits - base_logits).abs().max() > 1e-2      # the experts do change the model
    torch.testing.assert_close(our_logits, peft_logits, atol=2e-5, rtol=1e-5)

    # routing weights of one layer, token by token
    layer = "model.layers.1.self_attn.v_proj"
    x = torch.randn(6, 32)
    peft_layer = peft_model.base_model.model.get_submodule(layer).lora_arrow["arrow_router"]
    sim = (x @ peft_layer.prototypes.T).abs()
    vals, idx = sim.topk(top_k, dim=1)
    ref = torch.zeros_like(sim).scatter_(1, idx, torch.softmax(vals / temperature, 1))
    torch.testing.assert_close(ours.router(x, layer).dense(5), ref, atol=1e-5, rtol=1e-5)
    ours.restore()
