"""Static ΔW-space combinations: exactness, PEFT equivalence and PEFT round trips."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from peft.utils import merge_utils

from modlora.errors import AdapterError
from modlora.library.adapters import LoraAdapter, LoraSpec, random_adapter
from modlora.library.experts import ExpertSet
from modlora.reuse.lowrank import genknowsub, module_shapes
from modlora.reuse.merging import (
    dare_delta,
    dare_merge,
    dense_deltas,
    dense_to_adapter,
    ties_delta,
    ties_merge,
    weighted_combination,
)

from .conftest import make_tiny_llama


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_tiny_llama()


@pytest.fixture(scope="module")
def experts(model) -> dict[str, LoraAdapter]:
    """Three experts with different ranks / alphas (and one covering fewer modules)."""
    return {
        "a": random_adapter(model, LoraSpec(rank=4, alpha=16.0), seed=1, std=0.1),
        "b": random_adapter(model, LoraSpec(rank=2, alpha=8.0), seed=2, std=0.1),
        "c": random_adapter(model, LoraSpec(rank=4, alpha=4.0, target_modules=("q_proj", "v_proj")), seed=3, std=0.1),
    }


def _dense(ad: LoraAdapter, m: str, shape) -> torch.Tensor:
    return ad.delta_weight(m).double() if m in ad.A else torch.zeros(shape, dtype=torch.float64)


def test_weighted_combination_is_exact(experts):
    w = {"a": 0.7, "b": -1.3, "c": 0.25}
    comb = weighted_combination(experts, w)
    assert comb.spec.rank == 4 + 2 + 4 and comb.spec.scaling == 1.0
    shapes = module_shapes(experts)
    assert comb.modules == sorted(shapes)
    for m, shape in shapes.items():
        ref = sum(w[n] * _dense(ad, m, shape) for n, ad in experts.items())
        torch.testing.assert_close(comb.delta_weight(m).double(), ref, rtol=1e-5, atol=1e-7)
    # inputs untouched, default weights = mean
    mean = weighted_combination(experts)
    m = "model.layers.0.self_attn.q_proj"
    ref = sum(_dense(ad, m, shapes[m]) for ad in experts.values()) / 3
    torch.testing.assert_close(mean.delta_weight(m).double(), ref, rtol=1e-5, atol=1e-7)


def test_weighted_combination_sequence_weights_and_errors(experts):
    seq = weighted_combination(experts, [1.0, 2.0, 0.0])
    mapping = weighted_combination(experts, {"a": 1.0, "b": 2.0})
    for m in seq.modules:
        torch.testing.assert_close(seq.delta_weight(m), mapping.delta_weight(m))
    with pytest.raises(AdapterError, match="unknown expert"):
        weighted_combination(experts, {"zzz": 1.0})
    with pytest.raises(AdapterError, match="3 experts"):
        weighted_combination(experts, [1.0])
    with pytest.raises(AdapterError, match="'b'"):
        weighted_combination(experts, {"b": float("nan")})
    with pytest.raises(AdapterError, match="no experts"):
        weighted_combination({}, None)
    bad = {"x": experts["a"], "y": LoraAdapter(LoraSpec(rank=1), {"model.layers.0.self_attn.q_proj": torch.ones(1, 7)},
                                                {"model.layers.0.self_attn.q_proj": torch.ones(32, 1)})}
    with pytest.raises(AdapterError, match="q_proj"):
        weighted_combination(bad, None)


def _peft_logits(adapter: LoraAdapter, tmp_path, ids) -> torch.Tensor:
    adapter.save(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "merged"))
    peft_model.eval()
    with torch.no_grad():
        return peft_model(input_ids=ids).logits


def test_weighted_combination_peft_round_trip(experts, tmp_path):
    w = {"a": 0.5, "b": -0.8, "c": 1.2}
    comb = weighted_combination(experts, w)
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    reference = make_tiny_llama()
    with torch.no_grad():
        for m, shape in module_shapes(experts).items():
            dense = sum(w[n] * _dense(ad, m, shape) for n, ad in experts.items())
            reference.get_submodule(m).weight.add_(dense.float())
        want = reference(input_ids=ids).logits
    got = _peft_logits(comb, tmp_path, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    loaded = LoraAdapter.load(tmp_path / "merged")
    for m in comb.modules:
        torch.testing.assert_close(loaded.delta_weight(m), comb.delta_weight(m))


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.35, 1.0])
def test_ties_delta_equals_peft(experts, method, density):
    shapes = module_shapes(experts)
    w = [0.9, -0.4, 1.5]
    for m, shape in shapes.items():
        deltas = dense_deltas(experts, m, shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = merge_utils.ties(deltas, torch.tensor(w), density, method)
        got = ties_delta(deltas, w, density, method)
        assert torch.equal(got, want), m


def test_ties_merge_matches_dense_reference_and_exports_exactly(experts, tmp_path):
    res = ties_merge(experts, density=0.3, scale=0.8)
    shapes = module_shapes(experts)
    for m, shape in shapes.items():
        deltas = dense_deltas(experts, m, shape)
        want = 0.8 * merge_utils.ties(deltas, torch.ones(3), 0.3, "total")
        torch.testing.assert_close(res.adapter.delta_weight(m), want, rtol=1e-4, atol=1e-6)
    # default rank keeps everything: a trimmed sparse matrix is full rank, k_proj (16 × 32) is padded
    assert res.adapter.spec.rank == 32 and res.adapter.spec.scaling == 1.0
    assert res.total_relative_error < 1e-5 and res.max_relative_error < 1e-5
    assert res.metadata["method"] == "ties" and res.metadata["density"] == 0.3
    # PEFT loads it and reproduces base + dense ΔW
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    reference = make_tiny_llama()
    with torch.no_grad():
        for m, shape in shapes.items():
            reference.get_submodule(m).weight.add_(0.8 * merge_utils.ties(dense_deltas(experts, m, shape), torch.ones(3), 0.3))
        want = reference(input_ids=ids).logits
    torch.testing.assert_close(_peft_logits(res.adapter, tmp_path, ids), want, rtol=1e-4, atol=1e-5)


def test_low_rank_export_reports_svd_error(experts):
    full = ties_merge(experts, density=0.5)
    low = ties_merge(experts, density=0.5, rank=3)
    assert low.adapter.spec.rank == 3
    for m in low.adapter.modules:
        dense = full.adapter.delta_weight(m).double()
        s = torch.linalg.svdvals(dense)
        # Eckart–Young: the truncation error is the tail of the spectrum
        want = float(s[3:].norm() / s.norm())
        assert low.relative_errors[m] == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert 0 < low.total_relative_error < 1


def test_dense_to_adapter_exact_rank_of_low_rank_input():
    g = torch.Generator().manual_seed(0)
    deltas = {"x.q_proj": torch.randn(8, 3, generator=g) @ torch.randn(3, 12, generator=g),
              "x.k_proj": torch.randn(6, 2, generator=g) @ torch.randn(2, 12, generator=g)}
    res = dense_to_adapter(deltas)
    assert res.adapter.spec.rank == 3
    for m, d in deltas.items():
        torch.testing.assert_close(res.adapter.delta_weight(m), d, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match="x.q_proj"):
        dense_to_adapter({"x.q_proj": torch.full((2, 2), float("nan"))})


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_delta_equals_peft_with_same_seed(experts, combine):
    shapes = module_shapes(experts)
    w, p = [0.6, 1.1, -0.5], 0.7
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(123)  # PEFT draws from the global generator; same seed -> same stream
    for m, shape in shapes.items():
        deltas = dense_deltas(experts, m, shape)
        fn = merge_utils.dare_linear if combine == "linear" else merge_utils.dare_ties
        want = fn(deltas, torch.tensor(w), 1 - p)
        got = dare_delta(deltas, w, p, gen, combine)
        assert torch.equal(got, want), m


def test_dare_merge_seeded_and_statistics(experts):
    one = dare_merge(experts, {"a": 1.0}, drop_rate=0.6, seed=5)
    again = dare_merge(experts, {"a": 1.0}, drop_rate=0.6, seed=5)
    other = dare_merge(experts, {"a": 1.0}, drop_rate=0.6, seed=6)
    m = "model.layers.1.self_attn.o_proj"
    torch.testing.assert_close(one.adapter.delta_weight(m), again.adapter.delta_weight(m))
    assert not torch.allclose(one.adapter.delta_weight(m), other.adapter.delta_weight(m))
    # structure: every kept entry is the original divided by (1 - p); about 40 % are kept
    d = one.adapter.delta_weight(m).double()
    orig = experts["a"].delta_weight(m).double()
    kept = d.abs() > 1e-6 * orig.abs().max()
    torch.testing.assert_close(d[kept], orig[kept] / 0.4, rtol=1e-4, atol=1e-6)
    assert 0.3 < kept.double().mean() < 0.5
    # expectation: the average over many seeds approaches the undropped ΔW
    shape = orig.shape
    mean = sum(dare_delta([orig.float()], [1.0], 0.6, torch.Generator().manual_seed(s)) for s in range(400)) / 400
    assert float((mean.double() - orig).norm() / orig.norm()) < 0.1
    assert shape == mean.shape
    with pytest.raises(AdapterError, match="drop rate"):
        dare_merge(experts, drop_rate=1.0)
    with pytest.raises(AdapterError, match="combine"):
        dare_merge(experts, combine="magic")


def test_genknowsub_delta_exact_and_pure(experts):
    before = copy.deepcopy(experts)
    out = genknowsub({"a": experts["a"]}, {n: experts[n] for n in ("b", "c")}, space="delta")
    assert set(out) == {"a"}
    ad = out["a"]
    assert ad.spec.rank == 4 + 2 + 4
    shapes = module_shapes(experts)
    for m, shape in shapes.items():
        want = _dense(experts["a"], m, shape) - (_dense(experts["b"], m, shape) + _dense(experts["c"], m, shape)) / 2
        torch.testing.assert_close(ad.delta_weight(m).double(), want, rtol=1e-5, atol=1e-7)
    for n in experts:
        for m in experts[n].modules:
            assert torch.equal(experts[n].A[m], before[n].A[m]) and torch.equal(experts[n].B[m], before[n].B[m])
    with pytest.raises(AdapterError, match="'zz'"):
        genknowsub(experts, ExpertSet.of(experts, ["zz"]), space="delta")
    with pytest.raises(AdapterError, match="space"):
        genknowsub(experts, experts, space="magic")




@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.floats(-3, 3, allow_nan=False), min_size=3, max_size=3))
def test_weighted_combination_property(experts, weights):
    comb = weighted_combination(experts, weights)
    for m, shape in module_shapes(experts).items():
        ref = sum(w * _dense(ad, m, shape) for w, ad in zip(weights, experts.values(), strict=True))
        torch.testing.assert_close(comb.delta_weight(m).double(), ref, rtol=1e-5, atol=1e-6)


def test_weight_mapping_selects_experts_for_ties(experts):
    res = ties_merge(experts, {"a": 1.0, "c": 0.5}, density=0.4)
    assert res.metadata["experts"] == ["a", "c"]
    two = {"a": experts["a"], "c": experts["c"]}
    for m, shape in module_shapes(experts).items():
        want = merge_utils.ties(dense_deltas(two, m, shape), torch.tensor([1.0, 0.5]), 0.4)
        torch.testing.assert_close(res.adapter.delta_weight(m), want, rtol=1e-4, atol=1e-6)
