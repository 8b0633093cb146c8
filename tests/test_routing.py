"""Routing: exact prototypes, routed layer vs brute force, μ, oracle, centroids, GenKnowSub, generate, restore."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from modlora.activations import input_moments
from modlora.errors import AdapterError, RoutingError
from modlora.library.adapters import LoraAdapter, LoraSpec, merge_adapter, random_adapter
from modlora.library.experts import ExpertSet
from modlora.reuse.lowrank import (
    block_factors,
    genknowsub,
    parameter_average,
    top_right_singular_vector,
    top_right_singular_vectors,
    weighted_delta_sum,
)
from modlora.reuse.routing import (
    ArrowRouter,
    CentroidRouter,
    RoutedLoraLinear,
    RoutingState,
    TopKRouting,
    UniformRouter,
    compute_centroids,
    explain,
    export_prompt_adapter,
    oracle_weights,
    route,
)

SPEC = LoraSpec(rank=4, alpha=8.0, dropout=0.0)


def experts_for(model: torch.nn.Module, n: int, std: float = 0.2, spec: LoraSpec = SPEC) -> dict[str, LoraAdapter]:
    return {f"e{i}": random_adapter(model, spec, seed=100 + i, std=std) for i in range(n)}


def aligned(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(abs(u.double() @ v.double()) / (u.double().norm() * v.double().norm()))


def factors_with_spectrum(sv: list[float], n_in: int, n_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in), B (out, r) whose product has singular values ``sv``, with non-orthogonal factors."""
    g = torch.Generator().manual_seed(seed)
    r = len(sv)
    u, _ = torch.linalg.qr(torch.randn(n_out, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_in, r, generator=g, dtype=torch.float64))
    mix = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    B = u @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ mix
    A = torch.linalg.solve(mix, v.T)
    return A, B


# ------------------------------------------------------------------------------------------------ prototypes
@pytest.mark.parametrize("spectrum", ["random", "near_degenerate", "rank_deficient"])
def test_prototype_equals_svd(spectrum: str) -> None:
    if spectrum == "random":
        g = torch.Generator().manual_seed(1)
        A, B = torch.randn(6, 40, generator=g, dtype=torch.float64), torch.randn(30, 6, generator=g, dtype=torch.float64)
    elif spectrum == "near_degenerate":
        A, B = factors_with_spectrum([1.0, 1.0 - 1e-5, 0.3, 0.2], 40, 30, seed=2)
    else:
        A, B = factors_with_spectrum([2.0, 1.0, 0.0, 0.0], 40, 30, seed=3)
    v, sigma = top_right_singular_vector(A, B)
    _, s, vh = torch.linalg.svd(B @ A)
    assert v.dtype == torch.float32 and abs(float(v.norm()) - 1) < 1e-6
    assert aligned(v, vh[0]) > 1 - 1e-6
    assert sigma == pytest.approx(float(s[0]), rel=1e-9)
    i = int(v.abs().argmax())
    assert v[i] > 0  # sign convention
    v2, _ = top_right_singular_vector(A.clone(), -B)  # -ΔW has the same prototype after sign fixing
    assert torch.equal(v, v2)


def test_tied_qkv_prototype_equals_svd_of_stacked_delta(tiny_llama: torch.nn.Module) -> None:
    ex = experts_for(tiny_llama, 2)
    router = ArrowRouter(top_k=1, tie_qkv=True)
    es = ExpertSet.of(ex)
    layers = {m: [0, 1] for m in es.modules()}
    router.bind(es, layers)
    att = "model.layers.1.self_attn"
    for i, adapter in enumerate(es.adapters):
        stacked = torch.cat([adapter.delta_weight(f"{att}.{p}") for p in ("q_proj", "k_proj", "v_proj")])
        _, _, vh = torch.linalg.svd(stacked.double())
        for p in ("q_proj", "k_proj", "v_proj"):
            assert aligned(router.prototypes[f"{att}.{p}"][i], vh[0]) > 1 - 1e-6
        _, _, vh_o = torch.linalg.svd(adapter.delta_weight(f"{att}.o_proj").double())
        assert aligned(router.prototypes[f"{att}.o_proj"][i], vh_o[0]) > 1 - 1e-6
    A, B = block_factors([(adapter.A[f"{att}.q_proj"], adapter.B[f"{att}.q_proj"], 2.0)])
    assert torch.allclose(B @ A, adapter.delta_weight(f"{att}.q_proj"), atol=1e-6)


# ------------------------------------------------------------------------------------------------ routed layer
class FixedRouter:
    def __init__(self, routing: torch.Tensor | TopKRouting) -> None:
        self.routing = routing

    def __call__(self, x: torch.Tensor, layer: str) -> torch.Tensor | TopKRouting:
        return self.routing


def brute_force(base: torch.nn.Linear, x: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor],
                scalings: list[float], w: torch.Tensor, mixing: str) -> torch.Tensor:
    """Token-by-token, expert-by-expert reference in float64."""
    out = []
    for t in range(x.shape[0]):
        xt = x[t].double()
        y = base.weight.double() @ xt + base.bias.double()
        if mixing == "outputs":
            for e in range(len(A)):
                y = y + w[t, e].double() * scalings[e] * (B[e].double() @ (A[e].double() @ xt))
        else:
            a_mix = sum(w[t, e].double() * A[e].double() for e in range(len(A)))
            b_mix = sum(w[t, e].double() * scalings[e] * B[e].double() for e in range(len(A)))
            y = y + b_mix @ (a_mix @ xt)
        out.append(y)
    return torch.stack(out).float()


def make_layer(ranks: list[int], mixing: str, routing: torch.Tensor | TopKRouting, path: str, n_in: int = 24,
               n_out: int = 20, kernel: str = "auto") -> tuple[RoutedLoraLinear, list, list, list]:
    g = torch.Generator().manual_seed(sum(ranks) + len(ranks))
    base = torch.nn.Linear(n_in, n_out)
    A = [torch.randn(r, n_in, generator=g) * 0.3 for r in ranks]
    B = [torch.randn(n_out, r, generator=g) * 0.3 for r in ranks]
    scal = [0.5 + 0.25 * e for e in range(len(ranks))]
    layer = RoutedLoraLinear(base, "layer", list(range(len(ranks))), A, B, scal, FixedRouter(routing),
                             RoutingState(path=path, sparse_kernel=kernel), mixing)
    return layer, A, B, scal


PATHS = [("dense", "auto"), ("sparse", "sddmm"), ("sparse", "blocks")]


@pytest.mark.parametrize("mixing", ["outputs", "parameters"])
@pytest.mark.parametrize(("path", "kernel"), PATHS)
@pytest.mark.parametrize(("t", "E", "k"), [(7, 6, 1), (7, 6, 6), (200, 6, 2), (5, 16, 3), (64, 16, 4), (1, 40, 4)])
def test_routed_layer_matches_brute_force(mixing: str, path: str, kernel: str, t: int, E: int, k: int) -> None:
    g = torch.Generator().manual_seed(t * 31 + E * 7 + k)
    x = torch.randn(t, 24, generator=g)
    idx = torch.randn(t, E, generator=g).topk(k, dim=1).indices
    vals = torch.softmax(torch.randn(t, k, generator=g), dim=1)
    routing = TopKRouting(idx, vals)
    layer, A, B, scal = make_layer([4] * E, mixing, routing, path, kernel=kernel)
    ref = brute_force(layer.base, x, A, B, scal, routing.dense(E), mixing)
    assert layer.choose_path(routing) == path
    out = layer(x.view(1, t, 24)).view(t, -1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("path", "kernel"), PATHS)
def test_mixed_ranks_outputs_mode(path: str, kernel: str) -> None:
    t, ranks = 30, [2, 4, 8, 1, 4, 3, 6, 2]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(t, 24, generator=g)
    routing = TopKRouting(torch.randn(t, 8, generator=g).topk(2, 1).indices, torch.full((t, 2), 0.5))
    layer, A, B, scal = make_layer(ranks, "outputs", routing, path, kernel=kernel)
    torch.testing.assert_close(layer(x), brute_force(layer.base, x, A, B, scal, routing.dense(8), "outputs"),
                               atol=2e-5, rtol=1e-5)
    dense_w = torch.softmax(torch.randn(t, 8, generator=g), 1)
    layer.router = FixedRouter(dense_w)
    torch.testing.assert_close(layer(x), brute_force(layer.base, x, A, B, scal, dense_w, "outputs"),
                               atol=2e-5, rtol=1e-5)


def test_parameters_mode_with_mixed_ranks_raises() -> None:
    with pytest.raises(RoutingError, match="equal expert ranks"):
        make_layer([2, 4], "parameters", torch.ones(1, 2), "dense")


def test_k1_equals_best_single_expert(tiny_llama: torch.nn.Module) -> None:
    ex = experts_for(tiny_llama, 5)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    layer_name = "model.layers.0.self_attn.v_proj"
    routed = route(tiny_llama, ex, ArrowRouter(top_k=1))
    captured: dict[str, torch.Tensor] = {}
    layer = routed.layers[layer_name]
    h = layer.register_forward_hook(lambda m, a, o: captured.update(x=a[0], y=o))
    routed(input_ids=ids)
    h.remove()
    x = captured["x"].reshape(-1, 32)
    best = routed.router.logits(x, layer_name).argmax(1)
    names = routed.expert_names
    ref = torch.stack([layer.base(x[t]) + ex[names[int(best[t])]].delta_weight(layer_name) @ x[t]
                       for t in range(x.shape[0])])
    torch.testing.assert_close(captured["y"].reshape(-1, ref.shape[1]), ref, atol=1e-5, rtol=1e-5)
    routed.restore()


def test_top_k_larger_than_experts_raises(tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(RoutingError, match=r"top_k=4 exceeds the number of experts \(3\)"):
        route(tiny_llama, experts_for(tiny_llama, 3), ArrowRouter(top_k=4))
    assert not any(isinstance(m, RoutedLoraLinear) for m in tiny_llama.modules())


def test_arrow_output_matches_manual_softmax(tiny_llama: torch.nn.Module) -> None:
    ex = experts_for(tiny_llama, 6)
    router = ArrowRouter(top_k=3, temperature="sqrt_d", normalize_inputs=True)
    routed = route(tiny_llama, ex, router)
    x = torch.randn(10, 32)
    layer = "model.layers.1.self_attn.o_proj"
    r = router(x, layer)
    xn = x / x.norm(dim=1, keepdim=True)
    logits = (xn @ router.prototypes[layer].T).abs() / math.sqrt(32)
    vals, idx = logits.topk(3, dim=1)
    assert torch.equal(r.indices, idx)
    torch.testing.assert_close(r.weights, torch.softmax(vals, 1))
    routed.restore()


# ------------------------------------------------------------------------------------------------ μ
def test_mu_parameter_average_definition_and_routed_equivalence(tiny_llama: torch.nn.Module) -> None:
    ex = experts_for(tiny_llama, 3)
    mu = parameter_average(ex)
    m = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(mu.A[m], sum(e.A[m] for e in ex.values()) / 3)
    torch.testing.assert_close(mu.B[m], sum(e.B[m] for e in ex.values()) / 3)
    assert mu.spec.scaling == SPEC.scaling
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    merged = copy.deepcopy(tiny_llama)
    merge_adapter(merged, mu)
    with route(tiny_llama, ex, UniformRouter(), mixing="parameters") as routed:
        torch.testing.assert_close(routed(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_mu_delta_average_is_mean_of_expert_outputs(tiny_llama: torch.nn.Module) -> None:
    ex = experts_for(tiny_llama, 4)
    ex["e3"] = random_adapter(tiny_llama, LoraSpec(rank=2, alpha=6.0, dropout=0.0), seed=9, std=0.2)  # mixed rank
    mu = weighted_delta_sum(ex)
    assert mu.spec.rank == 4 + 4 + 4 + 2 and mu.spec.scaling == 1.0
    x = torch.randn(5, 32)
    lin = dict(tiny_llama.named_modules())["model.layers.1.self_attn.k_proj"]
    name = "model.layers.1.self_attn.k_proj"
    mean_out = sum(lin(x) + x @ e.delta_weight(name).T for e in ex.values()) / len(ex)
    torch.testing.assert_close(lin(x) + x @ mu.delta_weight(name).T, mean_out, atol=1e-6, rtol=1e-5)
    # the routed uniform "outputs" mixture is the same model
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    merged = copy.deepcopy(tiny_llama)
    merge_adapter(merged, mu)
    with route(tiny_llama, ex, "uniform") as routed:
        torch.testing.assert_close(routed(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["delta", "parameters"])
def test_mu_export_loads_in_peft(tiny_llama: torch.nn.Module, tmp_path, which: str) -> None:
    from peft import PeftModel

    ex = experts_for(tiny_llama, 3)
    mu = weighted_delta_sum(ex) if which == "delta" else parameter_average(ex)
    mu.save(tmp_path / "mu")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    merged = copy.deepcopy(tiny_llama)
    merge_adapter(merged, mu)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(tmp_path / "mu")).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ oracle
def test_oracle_example_weights_equal_single_expert_models(tiny_llama: torch.nn.Module) -> None:
    ex = experts_for(tiny_llama, 8)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    refs = []
    for b, name in enumerate(["e2", "e5"]):
        single = copy.deepcopy(tiny_llama)
        merge_adapter(single, ex[name])
        refs.append(single(input_ids=ids[b: b + 1]).logits)
    routed = route(tiny_llama, ex, ArrowRouter(top_k=2))
    w = oracle_weights(["t2", "t5"], routed.experts, {n: [f"t{n[1:]}"] for n in ex})
    assert w.shape == (2, 8) and w[0, 2] == 1 and w[1, 5] == 1
    for path in ("dense", "sparse"):
        routed.set_path(path)
        with routed.example_weights(w):
            out = routed(input_ids=ids).logits
        torch.testing.assert_close(out, torch.cat(refs), atol=1e-5, rtol=1e-5)
    with pytest.raises(RoutingError, match="no expert was trained on task 'nope'"):
        oracle_weights(["nope"], routed.experts, {n: [n] for n in ex})
    with pytest.raises(RoutingError, match=r"example weights must be \(batch, 8\)"), routed.example_weights(torch.ones(2, 3)):
        pass
    routed.restore()


# ------------------------------------------------------------------------------------------------ generate, padding, restore
def test_generate_with_cache_equals_without(tiny_llama: torch.nn.Module) -> None:
    ex = experts_for(tiny_llama, 6, std=0.3)
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(5))
    with route(tiny_llama, ex, ArrowRouter(top_k=2)) as routed:
        kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 2, "eos_token_id": None}
        cached = routed.generate(ids, use_cache=True, **kw)
        uncached = routed.generate(ids, use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        # step-wise full recomputation
        seq = ids
        for _ in range(10):
            nxt = routed(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert torch.equal(seq, cached)


def test_padded_batch_equals_single_examples(tiny_llama: torch.nn.Module) -> None:
    ex = experts_for(tiny_llama, 6, std=0.3)
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(3, 100, (9,), generator=g), torch.randint(3, 100, (4,), generator=g)
    ids = torch.full((2, 9), 2)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :4], mask[1, :4] = b, 1                       # right padding keeps positions
    with route(tiny_llama, ex, ArrowRouter(top_k=2)) as routed:
        batch = routed(input_ids=ids, attention_mask=mask).logits
        single_a = routed(input_ids=a[None]).logits
        single_b = routed(input_ids=b[None]).logits
        torch.testing.assert_close(batch[0], single_a[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch[1, :4], single_b[0], atol=1e-5, rtol=1e-5)
        # changing the padding tokens changes nothing for real tokens
        ids2 = ids.clone()
        ids2[1, 4:] = 50
        torch.testing.assert_close(routed(input_ids=ids2, attention_mask=mask).logits[1, :4], batch[1, :4])
        # recorder ignores padding tokens
        with routed.record() as rec:
            routed(input_ids=ids, attention_mask=mask)
        assert set(rec.tokens.values()) == {13}


def test_restore_is_exact(tiny_llama: torch.nn.Module) -> None:
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(7))
    before = tiny_llama(input_ids=ids).logits
    modules_before = dict(tiny_llama.named_modules())
    state_before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    routed = route(tiny_llama, experts_for(tiny_llama, 4), ArrowRouter(top_k=2))
    assert not torch.equal(routed(input_ids=ids).logits, before)
    model = routed.restore()
    assert model is tiny_llama
    assert torch.equal(tiny_llama(input_ids=ids).logits, before)
    after = dict(tiny_llama.named_modules())
    assert after.keys() == modules_before.keys() and all(after[k] is modules_before[k] for k in after)
    assert all(torch.equal(v, state_before[k]) for k, v in tiny_llama.state_dict().items())
    with pytest.raises(RoutingError, match="restored"):
        routed(input_ids=ids)


# ------------------------------------------------------------------------------------------------ GenKnowSub
def test_genknowsub_factor_and_delta_space(tiny_llama: torch.nn.Module) -> None:
    ex = experts_for(tiny_llama, 3)
    general = {f"g{i}": random_adapter(tiny_llama, SPEC, seed=500 + i, std=0.2) for i in range(2)}
    snapshot = {n: {m: t.clone() for m, t in a.A.items()} for n, a in ex.items()}
    m = "model.layers.0.self_attn.o_proj"
    fac = genknowsub(ex, general, "factors")
    torch.testing.assert_close(fac["e1"].A[m], ex["e1"].A[m] - (general["g0"].A[m] + general["g1"].A[m]) / 2)
    torch.testing.assert_close(fac["e1"].B[m], ex["e1"].B[m] - (general["g0"].B[m] + general["g1"].B[m]) / 2)
    delta = genknowsub(ex, general, "delta")
    expected = ex["e1"].delta_weight(m) - (general["g0"].delta_weight(m) + general["g1"].delta_weight(m)) / 2
    torch.testing.assert_close(delta["e1"].delta_weight(m), expected, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(ex[n].A[k], snapshot[n][k]) for n in ex for k in snapshot[n])  # not mutated
    routed = route(tiny_llama, ex, ArrowRouter(top_k=1), general_experts=general, gks_space="delta")
    _, _, vh = torch.linalg.svd(expected.double())
    assert aligned(routed.router.prototypes[m][1], vh[0]) > 1 - 1e-6
    routed.restore()


def test_remove_common_projects_out_the_shared_directions_against_brute_force(tiny_llama: torch.nn.Module) -> None:
    """Prototypes that share one direction (a common A, as experts built from one initialisation have) become
    distinguishable once it is removed: v_e ← (I − U Uᵀ) v_e / ‖·‖, U the top singular vectors of the stack."""
    ex = experts_for(tiny_llama, 4)
    m = "model.layers.0.self_attn.q_proj"
    plain = route(tiny_llama, ex, ArrowRouter(top_k=1))
    raw = plain.router.prototypes[m].clone()
    plain.restore()
    routed = route(tiny_llama, ex, ArrowRouter(top_k=1, remove_common=2))
    got = routed.router.prototypes[m]
    routed.restore()
    u = torch.linalg.svd(raw.double()).Vh[:2]
    expected = raw.double() - raw.double() @ u.T @ u
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert float((got.double() @ u.T).abs().max()) < 1e-5           # nothing left along the removed directions
    with pytest.raises(RoutingError, match="remove_common=4 must be below the number of experts"):
        route(tiny_llama, ex, ArrowRouter(top_k=1, remove_common=4))
    with pytest.raises(RoutingError, match="non-negative integer"):
        ArrowRouter(remove_common=-1)


def test_centred_arrow_routes_on_x_minus_the_mean_input(tiny_llama: torch.nn.Module) -> None:
    """``input_mean``: logits ``|(x − μ_l)·v_e|``, on the per-layer path and the grouped q/k/v path alike."""
    ex = experts_for(tiny_llama, 3)
    layers = ExpertSet.of(ex).modules()
    g = torch.Generator().manual_seed(3)
    by_input = {}
    named = dict(tiny_llama.named_modules())
    mean = {}
    for layer in layers:                      # one mean per input (q/k/v read the same one)
        key = layer.rsplit(".", 1)[0] + ".qkv" if layer.endswith(("q_proj", "k_proj", "v_proj")) else layer
        by_input.setdefault(key, torch.randn(named[layer].in_features, generator=g))
        mean[layer] = by_input[key]
    plain = route(tiny_llama, ex, ArrowRouter(top_k=2))
    protos = {layer: p.clone() for layer, p in plain.router.prototypes.items()}
    plain.restore()
    routed = route(tiny_llama, ex, ArrowRouter(top_k=2, input_mean=mean))
    x = torch.randn(5, 32, generator=g)
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                  "model.layers.1.self_attn.o_proj"):
        expected = ((x - mean[layer]) @ protos[layer].T).abs()
        torch.testing.assert_close(routed.router.logits(x, layer), expected)
        top = routed.router(x, layer)
        vals, idx = torch.topk(expected, 2, dim=-1)
        assert torch.equal(top.indices, idx)
        torch.testing.assert_close(top.weights, torch.softmax(vals, dim=-1))
    routed.restore()
    with pytest.raises(RoutingError, match="no input mean for layer"):
        route(tiny_llama, ex, ArrowRouter(top_k=2, input_mean={layers[0]: mean[layers[0]]}))


def test_input_moments_are_the_masked_token_mean_and_covariance(tiny_llama: torch.nn.Module) -> None:
    """``input_moments``: per input group, μ and the population covariance of the non-padding tokens' inputs,
    against the inputs hooked one sequence at a time; q/k/v share one group."""
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, 100, (n,), generator=g) for n in (5, 3, 4)]
    ids = torch.full((3, 5), 2)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    moments = input_moments(tiny_llama, layers, [(ids[:2], mask[:2]), (ids[2:], mask[2:])])
    assert set(moments) == {"model.layers.0.self_attn.qkv", "model.layers.1.mlp.down_proj"}
    named = dict(tiny_llama.named_modules())
    for group, layer in (("model.layers.0.self_attn.qkv", layers[0]), ("model.layers.1.mlp.down_proj", layers[2])):
        seen: list[torch.Tensor] = []
        h = named[layer].register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0][0]))
        with torch.no_grad():
            for s in seqs:
                tiny_llama(input_ids=s[None])
        h.remove()
        x = torch.cat(seen).double()
        assert moments[group].count == 12
        torch.testing.assert_close(moments[group].mean, x.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moments[group].cov, torch.cov(x.T, correction=0), atol=1e-5, rtol=1e-4)
    with pytest.raises(RoutingError, match="no module model.nope"):
        input_moments(tiny_llama, ["model.nope"], [(ids, mask)])
    with pytest.raises(RoutingError, match="every token is padding"):
        input_moments(tiny_llama, layers, [(ids, torch.zeros_like(ids))])


def test_whitened_arrow_is_the_top_direction_of_delta_w_on_whitened_inputs(tiny_llama: torch.nn.Module) -> None:
    """With Σ and μ per input: prototype ``R⁻¹ṽ`` with ṽ the top right singular vector of the dense ``ΔW R``,
    ``R = (Σ + ε·tr(Σ)/d·I)^½``; logits ``|(x − μ)·R⁻¹ṽ|`` (brute force by full SVD); q/k/v share Σ."""
    ex = experts_for(tiny_llama, 3)
    layers = ExpertSet.of(ex).modules()
    g = torch.Generator().manual_seed(5)
    named = dict(tiny_llama.named_modules())
    cov, mean = {}, {}
    for layer in layers:
        group = layer.rsplit(".", 1)[0] + ".qkv" if layer.endswith(("q_proj", "k_proj", "v_proj")) else layer
        d = named[layer].in_features
        if group not in cov:
            m = torch.randn(d, d, generator=g, dtype=torch.float64)
            cov[group] = m @ m.T / d + torch.diag(torch.rand(d, generator=g, dtype=torch.float64) * 5)
            mean[group] = torch.randn(d, generator=g)
        mean[layer] = mean[group]                             # one input, one mean (as input_moments gives)
    ridge = 0.05
    mean = {layer: mean[layer] for layer in layers}
    routed = route(tiny_llama, ex, ArrowRouter(top_k=2, input_mean=mean, input_covariance=cov, ridge=ridge))
    x = torch.randn(6, 32, generator=g)
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                  "model.layers.1.self_attn.o_proj"):
        group = layer.rsplit(".", 1)[0] + ".qkv" if layer.endswith(("q_proj", "v_proj")) else layer
        c = cov[group]
        vals, vecs = torch.linalg.eigh(c + ridge * c.trace() / c.shape[0] * torch.eye(c.shape[0], dtype=c.dtype))
        root, inverse = (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T
        expected = []
        for a in ex.values():
            dw = a.spec.scaling * a.B[layer].double() @ a.A[layer].double()
            v = torch.linalg.svd(dw @ root)[2][0]
            expected.append(inverse @ v)
        protos = torch.stack(expected).float()
        want = ((x - mean[layer]) @ protos.T).abs()
        torch.testing.assert_close(routed.router.logits(x, layer), want, atol=1e-4, rtol=1e-4)
        assert torch.equal(routed.router(x, layer).indices, torch.topk(want, 2, dim=-1).indices)
    routed.restore()
    with pytest.raises(RoutingError, match="needs the input mean"):
        ArrowRouter(input_covariance=cov)
    with pytest.raises(RoutingError, match="ridge must be a positive number"):
        ArrowRouter(input_mean=mean, input_covariance=cov, ridge=0)
    with pytest.raises(RoutingError, match="no input covariance for model.layers.1.self_attn.o_proj"):
        route(tiny_llama, ex, ArrowRouter(top_k=2, input_mean=mean, input_covariance={
            k: v for k, v in cov.items() if k != "model.layers.1.self_attn.o_proj"}))


# ------------------------------------------------------------------------------------------------ caching
class FakeLibrary:
    def __init__(self, experts: dict[str, LoraAdapter]) -> None:
        self.experts = experts
        self.artifacts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.saves: list[tuple[str, str]] = []

    def expert_names(self) -> list[str]:
        return list(self.experts)

    def get(self, name: str) -> LoraAdapter:
        return self.experts[name]

    def tasks(self, name: str) -> list[str]:
        return [f"task_{name}"]

    def load_artifact(self, expert: str, kind: str) -> dict[str, torch.Tensor] | None:
        return self.artifacts.get((expert, kind))

    def save_artifact(self, expert: str, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        self.saves.append((expert, kind))
        self.artifacts[(expert, kind)] = {k: v.clone() for k, v in tensors.items()}


def test_arrow_prototypes_cached_in_library(tiny_llama: torch.nn.Module) -> None:
    lib = FakeLibrary(experts_for(tiny_llama, 3))
    r1 = route(tiny_llama, lib, ArrowRouter(top_k=2))
    protos = {k: v.clone() for k, v in r1.router.prototypes.items()}
    r1.restore()
    assert sorted(lib.saves) == [("e0", "arrow-v1-untied"), ("e1", "arrow-v1-untied"), ("e2", "arrow-v1-untied")]
    lib.experts["e3"] = random_adapter(tiny_llama, SPEC, seed=77, std=0.2)
    r2 = route(tiny_llama, lib, ArrowRouter(top_k=2))
    assert lib.saves[3:] == [("e3", "arrow-v1-untied")]          # only the new expert computed
    assert all(torch.equal(r2.router.prototypes[k][:3], v) for k, v in protos.items())
    w = oracle_weights(["task_e3"], r2.experts)
    assert w[0].tolist() == [0, 0, 0, 1]
    r2.restore()
    r3 = route(tiny_llama, lib, ArrowRouter(top_k=2), general_experts={"g": lib.experts["e0"]})
    assert any("gks-factors" in kind for _, kind in lib.saves[4:])
    r3.restore()


# ------------------------------------------------------------------------------------------------ centroids
def test_centroids_and_centroid_router(tiny_llama: torch.nn.Module) -> None:
    ex = experts_for(tiny_llama, 2)
    g = torch.Generator().manual_seed(8)
    seqs = {"e0": [torch.randint(3, 100, (5,), generator=g), torch.randint(3, 100, (3,), generator=g)],
            "e1": [torch.randint(3, 100, (4,), generator=g)]}
    batches = {}
    for name, ss in seqs.items():
        ids = torch.full((len(ss), 5), 2)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(ss):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        batches[name] = [(ids, mask)]
    layer = "model.layers.1.self_attn.q_proj"
    cents = compute_centroids(tiny_llama, batches, [layer])
    lin = dict(tiny_llama.named_modules())[layer]
    for name, ss in seqs.items():
        inputs: list[torch.Tensor] = []
        h = lin.register_forward_pre_hook(lambda m, a, inputs=inputs: inputs.append(a[0][0]))
        for s in ss:
            tiny_llama(input_ids=s[None])
        h.remove()
        torch.testing.assert_close(cents[name][layer], torch.cat(inputs).mean(0), atol=1e-5, rtol=1e-5)
    all_layers = ExpertSet.of(ex).modules()
    full = compute_centroids(tiny_llama, batches, all_layers)
    router = CentroidRouter(full)
    with route(tiny_llama, ex, router) as routed:
        x = torch.randn(4, 32)
        C = torch.stack([full["e0"][layer], full["e1"][layer]])
        torch.testing.assert_close(router(x, layer), torch.softmax(x @ C.T / math.sqrt(32), 1))
        with routed.record() as rec:
            routed(input_ids=seqs["e0"][0][None])
        assert rec.tokens[layer] == 5
    with pytest.raises(RoutingError, match="no centroid for expert 'e1'"):
        route(tiny_llama, ex, CentroidRouter({"e0": full["e0"]}))


# ------------------------------------------------------------------------------------------------ diagnostics, export
def test_recorder_entropy_and_explain(tiny_llama: torch.nn.Module, char_tokenizer) -> None:
    ex = experts_for(tiny_llama, 4)
    with route(tiny_llama, ex, "uniform") as routed, routed.record() as rec:
        routed(input_ids=torch.randint(3, 100, (1, 6)))
    ent = rec.entropy()
    assert len(ent) == 8 and all(v == pytest.approx(math.log(4), rel=1e-5) for v in ent.values())
    assert all(c == 6 for h in rec.histogram().values() for c in h.values())
    with route(tiny_llama, ex, ArrowRouter(top_k=2)) as routed:
        with routed.record() as rec:
            routed(input_ids=torch.randint(3, 100, (1, 6)))
        assert all(sum(h.values()) == 12 for h in rec.histogram().values())      # 6 tokens × 2 experts
        text = explain(routed, char_tokenizer, "hello", top=2)
    assert "per token:" in text and "per layer" in text and "'h'" in text
    assert any(f"e{i}" in text for i in range(4))


def test_export_prompt_adapter_loads_in_peft(tiny_llama: torch.nn.Module, tmp_path) -> None:
    from peft import PeftModel

    ex = experts_for(tiny_llama, 5)
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(9))
    with route(tiny_llama, ex, ArrowRouter(top_k=2)) as routed:
        adapter = export_prompt_adapter(routed, ids, top_experts=2)
    assert adapter.spec.rank == 8 and adapter.spec.scaling == 1.0
    adapter.save(tmp_path / "exported")
    merged = copy.deepcopy(tiny_llama)
    merge_adapter(merged, adapter)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(tmp_path / "exported")).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # with uniform routing and all experts kept, the export is μ by ΔW averaging
    with route(tiny_llama, ex, "uniform") as routed:
        full = export_prompt_adapter(routed, ids, top_experts=5)
    m = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(full.delta_weight(m), weighted_delta_sum(ex).delta_weight(m), atol=1e-6, rtol=1e-5)


def test_auto_path_rule() -> None:
    def layer_for(E: int, k: int) -> tuple[RoutedLoraLinear, TopKRouting]:
        routing = TopKRouting(torch.arange(k).repeat(3, 1), torch.full((3, k), 1.0 / k))
        layer, *_ = make_layer([4] * E, "outputs", routing, "auto")
        return layer, routing

    small, r_small = layer_for(16, 4)       # E·r = 64 < 128: one dense GEMM is cheaper on CPU
    big, r_big = layer_for(32, 4)           # E·r = 128 and k·4 <= E: sparse
    wide, r_wide = layer_for(64, 32)        # k·4 > E: dense
    assert small.choose_path(r_small) == "dense"
    assert big.choose_path(r_big) == "sparse"
    assert wide.choose_path(r_wide) == "dense"
    assert big.choose_path(torch.full((3, 64), 1 / 64)) == "dense"
    x = torch.zeros(3, 24)
    assert big.sparse_kernel(x) == "sddmm"                       # CPU float32
    assert big.sparse_kernel(x.double()) == "sddmm"
    assert big.sparse_kernel(x.bfloat16()) == "blocks"           # sampled_addmm has no CPU bf16 kernel
    big.state.sparse_kernel = "sddmm"
    with pytest.raises(RoutingError, match="sddmm kernel needs float32"):
        big.sparse_kernel(x.half())


# ------------------------------------------------------------------------------------------------ fast CPU path
def test_sddmm_kernel_float64_bfloat16_and_gradients() -> None:
    """float64 through the sddmm kernel matches brute force to 1e-10; bf16 falls back to the blocks kernel and stays
    close; gradients w.r.t. the input and the routing weights agree between the two sparse kernels."""
    t, E, k = 33, 40, 4
    g = torch.Generator().manual_seed(11)
    idx = torch.randn(t, E, generator=g).topk(k, 1).indices
    w = torch.softmax(torch.randn(t, k, generator=g), 1)
    x = torch.randn(t, 24, generator=g)
    layer, A, B, scal = make_layer([4] * E, "outputs", TopKRouting(idx, w), "sparse")
    ref = brute_force(layer.base, x, A, B, scal, TopKRouting(idx, w).dense(E), "outputs")
    layer64 = copy.deepcopy(layer).double()
    layer64.router = FixedRouter(TopKRouting(idx, w.double()))
    assert layer64.sparse_kernel(x.double()) == "sddmm"
    torch.testing.assert_close(layer64(x.double()).float(), ref, atol=1e-5, rtol=1e-6)
    layer16 = copy.deepcopy(layer).bfloat16()
    torch.testing.assert_close(layer16(x.bfloat16()).float(), ref, atol=0.1, rtol=0.05)
    grads = {}
    for kernel in ("sddmm", "blocks"):
        layer.state.sparse_kernel = kernel
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        layer.router = FixedRouter(TopKRouting(idx, wg))
        layer(xg).pow(2).sum().backward()
        grads[kernel] = (xg.grad, wg.grad)
    for a, b in zip(grads["sddmm"], grads["blocks"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_batched_prototypes_equal_single() -> None:
    g = torch.Generator().manual_seed(4)
    A = torch.randn(6, 3, 40, generator=g)
    B = torch.randn(6, 30, 3, generator=g)
    B[2] = -B[2]                                              # sign convention must hold per item
    v, s = top_right_singular_vectors(A, B)
    for i in range(6):
        v1, s1 = top_right_singular_vector(A[i], B[i])
        torch.testing.assert_close(v[i], v1, atol=1e-6, rtol=0)
        assert float(s[i]) == pytest.approx(s1, rel=1e-12)
    with pytest.raises(AdapterError, match="batched factors"):
        top_right_singular_vectors(A, B.transpose(1, 2))


def manual_arrow(router: ArrowRouter, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = router.logits(x, layer).topk(router.top_k, dim=1)
    return idx, torch.softmax(vals, dim=1)


def check_same_routing(got: TopKRouting, want: tuple[torch.Tensor, torch.Tensor], E: int) -> None:
    torch.testing.assert_close(got.dense(E), TopKRouting(*want).dense(E), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_grouped_qkv_routing_equals_per_layer(tiny_llama: torch.nn.Module, tie: bool) -> None:
    """One matmul against the stacked q/k/v prototypes gives each layer exactly its own top-k softmax routing;
    a sibling is served from the group cache only for the very same, unmodified input, and only once."""
    ex = experts_for(tiny_llama, 6, spec=LoraSpec(rank=4, alpha=8.0, dropout=0.0,
                                                  target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj")))
    es = ExpertSet.of(ex)
    router = ArrowRouter(top_k=2, tie_qkv=tie)
    router.bind(es, {m: list(range(6)) for m in es.modules()})
    att, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    g = torch.Generator().manual_seed(3)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            x = torch.randn(9, 32, generator=g)
            for leaf in ("q_proj", "k_proj", "v_proj"):
                check_same_routing(router(x, f"{att}.{leaf}"), manual_arrow(router, x, f"{att}.{leaf}"), 6)
            for leaf in ("gate_proj", "up_proj", "o_proj"):
                check_same_routing(router(x, f"{mlp}.{leaf}" if leaf != "o_proj" else f"{att}.o_proj"),
                                   manual_arrow(router, x, f"{mlp}.{leaf}" if leaf != "o_proj" else f"{att}.o_proj"),
                                   6)
    x = torch.randn(9, 32, generator=g)
    first = router(x, f"{att}.q_proj")
    x.mul_(-3).add_(1)                                       # in place: the version counter changes
    check_same_routing(router(x, f"{att}.k_proj"), manual_arrow(router, x, f"{att}.k_proj"), 6)
    again = router(x, f"{att}.q_proj")                       # q served once already: recomputed, not reused
    check_same_routing(again, manual_arrow(router, x, f"{att}.q_proj"), 6)
    assert first is not again
    y = torch.randn(9, 32, generator=g)
    check_same_routing(router(y, f"{att}.v_proj"), manual_arrow(router, y, f"{att}.v_proj"), 6)


def test_fast_path_model_equivalence_and_no_warnings(tiny_llama: torch.nn.Module) -> None:
    """Whole model: sddmm vs blocks vs dense-fold agree; inference_mode == no_grad; forward emits no warnings."""
    import warnings

    ex = experts_for(tiny_llama, 40)
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    with route(tiny_llama, ex, ArrowRouter(top_k=3)) as routed:
        layer = next(iter(routed.layers.values()))
        assert layer.choose_path(TopKRouting(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))) == "sparse"
        outs = {}
        for path, kernel in PATHS:
            routed.set_path(path)
            routed.state.sparse_kernel = kernel
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("error")
                outs[kernel if path == "sparse" else "dense"] = routed(input_ids=ids).logits
        routed.set_path("auto")
        routed.state.sparse_kernel = "auto"
        with torch.inference_mode():
            outs["inference_mode"] = routed(input_ids=ids).logits.clone()
        for name, out in outs.items():
            torch.testing.assert_close(out, outs["dense"], atol=1e-5, rtol=1e-5, msg=name)


def test_route_sparse_kernel_option_matches_and_validates(tiny_llama: torch.nn.Module) -> None:
    """``route(..., sparse_kernel=...)`` / ``set_sparse_kernel`` pick the kernel; both give the same logits."""
    ex = experts_for(tiny_llama, 16)
    ids = torch.randint(0, 40, (2, 7))
    outs = {}
    for kernel in ("sddmm", "blocks"):
        with torch.no_grad(), route(tiny_llama, ex, ArrowRouter(top_k=2), path="sparse", sparse_kernel=kernel) as rm:
            outs[kernel] = rm.model(input_ids=ids).logits
            rm.set_sparse_kernel("auto")
            assert rm.state.sparse_kernel == "auto"
            with pytest.raises(RoutingError, match="sparse_kernel must be"):
                rm.set_sparse_kernel("fast")
    torch.testing.assert_close(outs["sddmm"], outs["blocks"], atol=1e-5, rtol=1e-5)
    with pytest.raises(RoutingError, match="sparse_kernel must be"):
        route(tiny_llama, ex, "arrow", sparse_kernel="cuda")
