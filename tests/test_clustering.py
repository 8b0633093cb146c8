"""Model-based clustering: params / delta / semantic similarities against brute-force references, planted clusters,
automatic K, quality against reference labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import modlora.build.clustering as clustering
import modlora.build.clustering.similarity as similarity_module
from modlora.build.clustering import (
    ClusteringResult,
    centre_gram,
    cluster_experts,
    cluster_quality,
    cluster_tasks,
    delta_gram,
    delta_similarity,
    expert_semantic_similarity,
    expert_similarity,
    flatten_expert,
    model_based_clustering,
    plot_clustering,
    random_clustering,
    random_clusters,
    read_label_file,
    reference_labels,
    semantic_similarity,
    sparsify_by_magnitude,
    task_embeddings,
)
from modlora.build.clustering.choices import CRITERION_ALGORITHM
from modlora.data import Instance, Task
from modlora.errors import LibraryError, ModloraError
from modlora.library.adapters import LoraAdapter, LoraSpec

RANK = 4
# toy modules: (path, in_features, out_features)
TOY_MODULES = [
    ("model.layers.0.self_attn.q_proj", 16, 16),
    ("model.layers.0.self_attn.v_proj", 16, 8),
    ("model.layers.1.self_attn.q_proj", 16, 16),
]
SPEC = LoraSpec(rank=RANK, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


def _random_factors(gen: torch.Generator, scale: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    A = {m: torch.randn(RANK, fin, generator=gen) * scale for m, fin, _ in TOY_MODULES}
    B = {m: torch.randn(fout, RANK, generator=gen) * scale for m, _, fout in TOY_MODULES}
    return A, B


def planted_experts(n_groups: int, per_group: int, noise: float = 0.1, seed: int = 0
                    ) -> tuple[dict[str, LoraAdapter], dict[str, int]]:
    """``n_groups`` groups; expert = the group's shared random direction + ``noise`` · Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    centres = [_random_factors(gen) for _ in range(n_groups)]
    experts: dict[str, LoraAdapter] = {}
    truth: dict[str, int] = {}
    for i in range(n_groups * per_group):
        group = i % n_groups  # interleave so that names do not reveal the groups
        dA, dB = _random_factors(gen, noise)
        cA, cB = centres[group]
        name = f"task{i:02d}"
        experts[name] = LoraAdapter(SPEC, {m: cA[m] + dA[m] for m in cA}, {m: cB[m] + dB[m] for m in cB})
        truth[name] = group
    return experts, truth


def brute_force_similarity(adapters: dict[str, LoraAdapter], sparsity: float, n_components: int) -> np.ndarray:
    """Exact reference: sparsify with a sort-based threshold, full SVD, keep c components, cosine."""
    names = sorted(adapters)
    rows = []
    for name in names:
        theta = flatten_expert(adapters[name]).astype(np.float64)
        mags = np.sort(np.abs(theta))
        pos = sparsity * (len(mags) - 1)  # linear-interpolation quantile, as np.quantile
        lo = int(np.floor(pos))
        thr = mags[lo] + (pos - lo) * (mags[min(lo + 1, len(mags) - 1)] - mags[lo])
        rows.append(np.where(np.abs(theta) < thr, 0.0, theta))
    X = np.stack(rows)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    c = min(n_components, len(names), X.shape[1])
    E = U[:, :c] * S[:c]
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    return E @ E.T


def test_flatten_expert_order_and_dtype() -> None:
    experts, _ = planted_experts(1, 1)
    adapter = experts["task00"]
    adapter.A = {m: t.double() for m, t in adapter.A.items()}
    flat = flatten_expert(adapter)
    expected = np.concatenate([np.concatenate([adapter.A[m].reshape(-1).numpy(), adapter.B[m].reshape(-1).numpy()])
                               for m in sorted(adapter.A)])
    assert flat.dtype == np.float32
    assert flat.shape == (sum(RANK * fin + fout * RANK for _, fin, fout in TOY_MODULES),)
    np.testing.assert_allclose(flat, expected.astype(np.float32))


def test_sparsify_keeps_largest_magnitude_fraction() -> None:
    theta = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    half = sparsify_by_magnitude(theta, 0.5)
    kept = np.flatnonzero(half)
    assert len(kept) == 500
    assert np.abs(theta[kept]).min() >= np.abs(np.delete(theta, kept)).max()
    np.testing.assert_array_equal(half[kept], theta[kept])
    assert np.count_nonzero(sparsify_by_magnitude(theta, 0.9)) == 100
    np.testing.assert_array_equal(sparsify_by_magnitude(theta, 0.0), theta)


@pytest.mark.parametrize(("n_experts", "sparsity", "n_components"), [(12, 0.5, 64), (12, 0.8, 3), (12, 0.5, 11),
                                                                    (2, 0.5, 64), (3, 0.0, 64)])
def test_similarity_matches_brute_force(n_experts: int, sparsity: float, n_components: int) -> None:
    experts, _ = planted_experts(n_experts, 1, seed=3)
    sim = expert_similarity(experts, sparsity=sparsity, n_components=n_components, seed=0)
    assert sim.names == sorted(experts)
    assert sim.similarity.shape == (n_experts, n_experts)
    assert sim.embeddings.shape == (n_experts, min(n_components, n_experts))
    np.testing.assert_allclose(np.linalg.norm(sim.embeddings, axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.diag(sim.similarity), 1.0, atol=1e-9)
    np.testing.assert_allclose(sim.similarity, sim.similarity.T, atol=1e-12)
    np.testing.assert_allclose(sim.similarity, brute_force_similarity(experts, sparsity, n_components), atol=1e-4)


@pytest.mark.parametrize("features", ["params", "delta"])
@pytest.mark.parametrize("n_groups", [3, 4])
def test_planted_groups_are_recovered(n_groups: int, features: str) -> None:
    experts, truth = planted_experts(n_groups, 5)
    result = model_based_clustering(experts, k=n_groups, seed=0, features=features)
    assert result.features == features
    names = sorted(experts)
    assert adjusted_rand_score([truth[n] for n in names], [result.assignment[n] for n in names]) == 1.0
    assert result.k == n_groups and sorted(result.sizes) == [5] * n_groups
    assert result.silhouette is not None and result.silhouette > 0.5


@pytest.mark.parametrize("criterion", ["spectral", "eigengap", "silhouette", "stability"])
def test_auto_k_finds_planted_number_and_reports_scores(criterion: str) -> None:
    experts, truth = planted_experts(4, 5)
    sim = expert_similarity(experts)
    result = cluster_experts(sim, k="auto", auto_k=criterion)
    assert result.k == 4 and result.criterion == criterion and not result.no_structure
    low = 1 if criterion == "eigengap" else 2  # eigengap also scores K = 1 (one connected group)
    assert sorted(result.scores_by_k) == list(range(low, 17))
    assert max(result.scores_by_k, key=result.scores_by_k.get) == 4
    assert result.algorithm == CRITERION_ALGORITHM[criterion]
    if criterion in ("spectral", "silhouette"):
        assert result.silhouette == pytest.approx(result.scores_by_k[4])
    given = cluster_experts(sim, k=4, auto_k=criterion)  # a given K: the paper's k-means on the rows
    assert given.algorithm == "kmeans" and given.clusters == result.clusters  # (planted families: the same)
    same = cluster_experts(sim, k=4, partition=result.algorithm)  # or the criterion's, when asked
    assert same.clusters == result.clusters and same.algorithm == result.algorithm
    other = cluster_experts(sim, k="auto", auto_k=criterion,
                            partition="kmeans" if result.algorithm == "spectral" else "spectral")
    assert other.k == 4 and other.algorithm != result.algorithm and other.clusters == result.clusters
    names = sorted(experts)
    assert adjusted_rand_score([truth[n] for n in names], [result.assignment[n] for n in names]) == 1.0
    narrow = cluster_experts(sim, k="auto", k_range=(2, 3), auto_k=criterion)  # the planted 4 is out of range
    assert set(narrow.scores_by_k) - {1} == {2, 3} and narrow.k in (1, 2, 3)
    assert narrow.no_structure == (narrow.k == 1)


def test_spectral_rows_match_njw_brute_force() -> None:
    """sklearn's embedding, rows normalised, spans the top-K eigenvectors of D^{-1/2} W D^{-1/2} (Ng-Jordan-Weiss):
    compared through the rotation-invariant Gram matrix of the normalised rows."""
    experts, _ = planted_experts(3, 4, noise=0.5, seed=5)
    similarity = delta_similarity(experts).similarity
    affinity = np.clip(similarity, 0.0, None)
    np.fill_diagonal(affinity, 0.0)
    inv_sqrt = 1.0 / np.sqrt(affinity.sum(axis=1))
    _, vectors = np.linalg.eigh(inv_sqrt[:, None] * affinity * inv_sqrt[None, :])
    top = vectors[:, ::-1][:, :3]
    top /= np.linalg.norm(top, axis=1, keepdims=True)
    rows = clustering.spectral_rows(similarity, 3, seed=0)
    np.testing.assert_allclose(rows @ rows.T, top @ top.T, atol=1e-6)


def test_spectral_null_permutes_the_values_and_scores_below_real_clusters() -> None:
    experts, _ = planted_experts(3, 5, noise=0.3)
    similarity = delta_similarity(experts).similarity
    upper = np.triu_indices(len(similarity), 1)
    nulls = clustering.permuted_similarities(similarity, 5, seed=0)
    assert len(nulls) == 5
    for null in nulls:
        np.testing.assert_allclose(np.diag(null), 1.0)
        np.testing.assert_array_equal(null, null.T)
        np.testing.assert_array_equal(np.sort(null[upper]), np.sort(similarity[upper]))
    labels = clustering.spectral_labels(similarity, 3, seed=0)
    observed = clustering.cosine_distance_silhouette(similarity, labels)
    assert observed is not None and observed > max(clustering.spectral_null_silhouettes(similarity, 3, seed=0))


def test_clusters_are_canonically_ordered_and_deterministic() -> None:
    experts, _ = planted_experts(3, 4, seed=7)
    first = model_based_clustering(experts, k="auto", seed=1)
    second = model_based_clustering(experts, k="auto", seed=1)
    assert first.clusters == second.clusters and first.scores_by_k == second.scores_by_k
    np.testing.assert_array_equal(first.similarity, second.similarity)
    assert [c[0] for c in first.clusters] == sorted(c[0] for c in first.clusters)
    assert all(c == sorted(c) for c in first.clusters)
    assert all(first.assignment[n] == j for j, c in enumerate(first.clusters) for n in c)
    assert first.clusters[0][0] == "task00"


def test_json_round_trip(tmp_path) -> None:
    experts, _ = planted_experts(3, 3)
    result = model_based_clustering(experts, k="auto")
    text = result.to_json(tmp_path / "clusters.json")
    json.loads(text)  # plain JSON
    for restored in (ClusteringResult.from_json(text), ClusteringResult.from_json(tmp_path / "clusters.json"),
                     ClusteringResult.from_json(str(tmp_path / "clusters.json"))):
        assert restored.clusters == result.clusters and restored.assignment == result.assignment
        assert restored.k == result.k and restored.silhouette == result.silhouette
        assert restored.scores_by_k == result.scores_by_k and restored.algorithm == result.algorithm == "spectral"
        np.testing.assert_array_equal(restored.similarity, result.similarity)


def test_from_json_rejects_malformed(tmp_path) -> None:
    experts, _ = planted_experts(2, 2)
    good = json.loads(model_based_clustering(experts, k=2).to_json())
    bad = dict(good, clusters=[good["clusters"][0]])
    with pytest.raises(LibraryError, match="partition"):
        ClusteringResult.from_dict(bad)
    with pytest.raises(LibraryError, match="'assignment'"):
        ClusteringResult.from_dict({k: v for k, v in good.items() if k != "assignment"})
    with pytest.raises(LibraryError, match="not valid JSON"):
        ClusteringResult.from_json("{nope")
    with pytest.raises(LibraryError, match="cannot read"):
        ClusteringResult.from_json(tmp_path / "missing.json")


def test_random_clusters_match_sizes() -> None:
    names = [f"t{i}" for i in range(10)]
    clusters = random_clusters(names, [5, 3, 2], seed=0)
    assert [len(c) for c in clusters] == [5, 3, 2]
    assert sorted(n for c in clusters for n in c) == sorted(names)
    assert clusters == random_clusters(names, [5, 3, 2], seed=0)
    assert any(random_clusters(names, [5, 3, 2], seed=s) != clusters for s in range(1, 5))
    with pytest.raises(ModloraError, match="sum to 9"):
        random_clusters(names, [5, 3, 1])
    experts, _ = planted_experts(3, 3)
    mbc = model_based_clustering(experts, k=3)
    rnd = random_clustering(mbc, seed=2)
    assert rnd.sizes == mbc.sizes and rnd.method == "random"
    rnd.validate()


def test_small_libraries_are_handled() -> None:
    experts, _ = planted_experts(2, 1)
    sim = expert_similarity(experts)
    # two experts keep both components (v1 kept n - 1 = 1, so every pair had cosine ±1 and collapsed)
    assert sim.embeddings.shape == (2, 2)
    np.testing.assert_allclose(sim.similarity, brute_force_similarity(experts, 0.5, 64), atol=1e-6)
    assert abs(sim.similarity[0, 1]) < 0.9
    auto = cluster_experts(sim, k="auto")
    assert auto.k == 1 and auto.no_structure and "at least 3" in auto.message
    forced = cluster_experts(sim, k=2)
    forced.validate()
    assert forced.k == 2
    three, _ = planted_experts(3, 1)
    assert cluster_experts(expert_similarity(three), k=2).k == 2
    with pytest.raises(LibraryError, match="at least 2"):
        expert_similarity({"only": experts["task00"]})
    with pytest.raises(ModloraError, match="integer in"):
        cluster_experts(sim, k=3)


def test_requested_k_is_never_lowered() -> None:
    experts, _ = planted_experts(2, 1)
    same = {"a": experts["task00"], "b": experts["task00"], "c": experts["task01"]}
    sim = expert_similarity(same)
    assert cluster_experts(sim, k=2).k == 2
    with pytest.raises(ModloraError, match="K=3.*only 2 of them have distinct"):
        cluster_experts(sim, k=3)
    with pytest.raises(ModloraError, match="K=3"):
        cluster_experts(delta_similarity(same), k=3)


def test_layout_mismatch_names_the_expert() -> None:
    experts, _ = planted_experts(3, 1)
    odd = experts["task02"]
    experts["task02"] = LoraAdapter(SPEC, {m: a for m, a in odd.A.items() if "v_proj" not in m},
                                    {m: b for m, b in odd.B.items() if "v_proj" not in m})
    with pytest.raises(LibraryError, match=r"'task02'.*lacks module 'model\.layers\.0\.self_attn\.v_proj'"):
        expert_similarity(experts)
    with pytest.raises(ModloraError, match="sparsity"):
        expert_similarity(planted_experts(2, 1)[0], sparsity=1.0)


class FakeLibrary:
    """Duck-typed expert library with in-memory artifacts."""

    def __init__(self, experts: dict[str, LoraAdapter]) -> None:
        self.experts = experts
        self.artifacts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.saves = 0

    def expert_names(self) -> list[str]:
        return sorted(self.experts)

    def get(self, name: str) -> LoraAdapter:
        return self.experts[name]

    def tasks(self, name: str) -> list[str]:
        return [name, f"{name}_extra"]

    def load_artifact(self, expert: str, kind: str) -> dict[str, torch.Tensor] | None:
        return self.artifacts.get((expert, kind))

    def save_artifact(self, expert: str, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        self.saves += 1
        self.artifacts[(expert, kind)] = tensors


def test_library_cache_is_used_and_invalidated(monkeypatch) -> None:
    experts, _ = planted_experts(3, 2)
    lib = FakeLibrary(experts)
    first = model_based_clustering(lib, k=3, features="params")
    assert lib.saves == 6 and all(kind.startswith("mbc-svd-v2-s0.5-c64") for _, kind in lib.artifacts)

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD recomputed despite a valid cache")

    with monkeypatch.context() as patch:
        patch.setattr(similarity_module, "_svd_embeddings", no_svd)
        again = model_based_clustering(lib, k=3, features="params")
    assert again.clusters == first.clusters
    np.testing.assert_allclose(again.similarity, first.similarity)
    # changing one expert's weights invalidates the cached embeddings
    lib.experts["task00"].B = {m: b * 2 for m, b in lib.experts["task00"].B.items()}
    model_based_clustering(lib, k=3, features="params")
    assert lib.saves == 12
    assert cluster_tasks(first, lib.tasks)[0][:2] == sorted([first.clusters[0][0], f"{first.clusters[0][0]}_extra"])
    assert cluster_tasks(first, {})[0] == first.clusters[0]


def test_plot_writes_png(tmp_path) -> None:
    experts, _ = planted_experts(3, 3)
    result = model_based_clustering(experts, k="auto")
    path = plot_clustering(result, tmp_path / "plots" / "mbc.png")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- delta features


def shared_init_experts(n_groups: int, per_group: int, noise: float = 0.5, seed: int = 0
                        ) -> tuple[dict[str, LoraAdapter], dict[str, int]]:
    """As real training: one A initialisation for all experts, B learned from 0 (family direction + noise, small)."""
    gen = torch.Generator().manual_seed(seed)
    A0 = {m: torch.randn(RANK, fin, generator=gen) * 0.3 for m, fin, _ in TOY_MODULES}
    centres = [{m: torch.randn(fout, RANK, generator=gen) * 0.01 for m, _, fout in TOY_MODULES}
               for _ in range(n_groups)]
    experts: dict[str, LoraAdapter] = {}
    truth: dict[str, int] = {}
    for i in range(n_groups * per_group):
        group = i % n_groups
        B = {m: centres[group][m] + noise * 0.01 * torch.randn(fout, RANK, generator=gen) for m, _, fout in TOY_MODULES}
        A = {m: A0[m] + 1e-3 * torch.randn(RANK, fin, generator=gen) for m, fin, _ in TOY_MODULES}
        experts[f"task{i:02d}"] = LoraAdapter(SPEC, A, B)
        truth[f"task{i:02d}"] = group
    return experts, truth


def brute_force_delta_gram(adapters: dict[str, LoraAdapter], centre: bool) -> np.ndarray:
    """Form every ΔW = s·B·A, (optionally) subtract the mean ΔW over experts, take Frobenius inner products."""
    names = sorted(adapters)
    flat = np.stack([np.concatenate([(adapters[n].spec.scaling * adapters[n].B[m].double() @ adapters[n].A[m].double())
                                     .reshape(-1).numpy() for m in sorted(adapters[n].A)]) for n in names])
    if centre:
        flat = flat - flat.mean(axis=0, keepdims=True)
    return flat @ flat.T


@pytest.mark.parametrize("block", [1, 3, 64])
def test_delta_gram_matches_brute_force(block: int) -> None:
    experts, _ = planted_experts(7, 1, seed=5)
    odd = experts["task03"]
    experts["task03"] = LoraAdapter(LoraSpec(rank=RANK, alpha=2.0, dropout=0.0, target_modules=SPEC.target_modules),
                                    odd.A, odd.B)  # another scaling s = alpha / r
    gram = delta_gram(experts, block=block)
    np.testing.assert_allclose(gram, brute_force_delta_gram(experts, centre=False), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(centre_gram(gram), brute_force_delta_gram(experts, centre=True), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("centre", [False, True])
def test_delta_similarity_is_the_cosine_of_updates(centre: bool) -> None:
    experts, _ = planted_experts(3, 3, seed=2)
    sim = delta_similarity(experts, centre=centre)
    ref = brute_force_delta_gram(experts, centre)
    d = np.sqrt(np.diag(ref))
    np.testing.assert_allclose(sim.similarity, ref / np.outer(d, d), atol=1e-9)
    np.testing.assert_allclose(sim.embeddings @ sim.embeddings.T, sim.similarity, atol=1e-8)
    assert sim.features == "delta" and sim.centred == centre and sim.names == sorted(experts)


def test_delta_sees_learned_updates_where_params_sees_the_shared_init() -> None:
    experts, truth = shared_init_experts(3, 4)
    names = sorted(experts)
    params = expert_similarity(experts)
    assert params.similarity[~np.eye(len(names), dtype=bool)].min() > 0.98  # every pair looks alike
    result = model_based_clustering(experts, k="auto", features="delta")
    assert result.k == 3 and not result.no_structure
    assert adjusted_rand_score([truth[n] for n in names], [result.assignment[n] for n in names]) == 1.0


def test_no_structure_is_reported_not_a_degenerate_k() -> None:
    experts, _ = planted_experts(12, 1, seed=11)  # twelve independent experts, no families
    for criterion in ("spectral", "eigengap", "silhouette"):
        result = model_based_clustering(experts, k="auto", features="delta", auto_k=criterion)
        assert result.no_structure and result.k == 1 and "no cluster structure" in result.message
        assert result.scores_by_k  # every candidate's score is still reported
        restored = ClusteringResult.from_json(result.to_json())
        assert restored.no_structure and restored.message == result.message and restored.criterion == criterion


def test_delta_cache_is_used_and_invalidated(monkeypatch) -> None:
    experts, _ = planted_experts(3, 2)
    lib = FakeLibrary(experts)
    first = model_based_clustering(lib, k=3, features="delta")
    assert lib.saves == 6 and all(kind == "mbc-delta-v1" for _, kind in lib.artifacts)
    with monkeypatch.context() as patch:
        patch.setattr(similarity_module, "delta_gram",
                      lambda *a, **k: pytest.fail("ΔW Gram recomputed despite a cache"))
        again = model_based_clustering(lib, k=3, features="delta", centre=False)  # centring reuses the raw Gram
    np.testing.assert_allclose(again.similarity, delta_similarity(experts, centre=False).similarity)
    lib.experts["task00"].B = {m: b * 2 for m, b in lib.experts["task00"].B.items()}
    model_based_clustering(lib, k=3, features="delta")
    assert lib.saves == 12 and first.k == 3


# --------------------------------------------------------------------------- semantic features


def _tiny_lm():
    from modlora.models import LoadedModel, model_identity

    from .conftest import make_char_tokenizer, make_tiny_llama

    model = make_tiny_llama()
    return LoadedModel(model, make_char_tokenizer(), model_identity(model, "tiny"), "memory")


def _task(name: str, definition: str, inputs: list[str]) -> Task:
    return Task(name=name, definition=definition,
                instances=[Instance(id=f"{name}-{i}", input=x, outputs=("y",)) for i, x in enumerate(inputs)])


def test_task_embeddings_match_brute_force_mean_pooling() -> None:
    lm = _tiny_lm()
    tasks = [_task("t_b", "Add the numbers.", ["1+2", "3+4", "5+6"]), _task("t_a", "Say hi.", ["hello"])]
    emb = task_embeddings(lm, tasks, n_inputs=2, max_tokens=40)
    assert emb.names == ["t_a", "t_b"] and emb.vectors.shape == (2, 32)
    text = "Add the numbers.\n\n1+2\n\n3+4"
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][:, :40]
    with torch.no_grad():
        hidden = lm.model.model(input_ids=ids).last_hidden_state[0]  # the decoder's output (after the final norm)
    np.testing.assert_allclose(emb.vectors[1], hidden.mean(0).double().numpy(), rtol=1e-5, atol=1e-6)
    sim = semantic_similarity(emb, centre=False)
    v = emb.vectors / np.linalg.norm(emb.vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(sim.similarity, v @ v.T, atol=1e-9)
    assert sim.features == "semantic"


def test_expert_semantic_similarity_caches_per_expert() -> None:
    lm = _tiny_lm()
    tasks = {n: _task(n, d, ["x"]) for n, d in [("t0", "Add two numbers."), ("t1", "Add three numbers."),
                                                ("t2", "Write a poem about the sea.")]}
    lib = FakeLibrary({})
    tasks_of = {"e0": ["t0"], "e1": ["t1", "t2"], "e2": ["t2"]}
    first = expert_semantic_similarity(lm, tasks_of, tasks, cache=lib)
    assert lib.saves == 3 and first.names == ["e0", "e1", "e2"]
    again = expert_semantic_similarity(lm, tasks_of, tasks, cache=lib)
    assert lib.saves == 3
    np.testing.assert_allclose(again.similarity, first.similarity)
    with pytest.raises(ModloraError, match="'e3'.*no data"):
        expert_semantic_similarity(lm, {**tasks_of, "e3": ["missing"]}, tasks)


# --------------------------------------------------------------------------- quality against reference labels


def test_cluster_quality_and_label_sources(tmp_path) -> None:
    result = ClusteringResult.from_dict({"names": ["a", "b", "c", "d", "e"], "k": 2,
                                         "clusters": [["a", "b", "c"], ["d", "e"]],
                                         "assignment": {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1}})
    labels = {"a": "x", "b": "x", "c": "y", "d": "y", "e": "y", "zz": "x"}
    quality = cluster_quality(result, labels)
    assert quality.purity == pytest.approx(4 / 5) and quality.n_labelled == 5 and quality.n_labels == 2
    assert quality.ari == pytest.approx(adjusted_rand_score(["x", "x", "y", "y", "y"], [0, 0, 0, 1, 1]))
    assert cluster_quality(result, {"a": "p", "b": "p", "c": "p", "d": "q"}).ari == 1.0
    assert cluster_quality(result, {"a": "p", "d": "q"}).unlabelled == ["b", "c", "e"]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "labels.csv").write_text("name,label\na,x\nb,x\n\nc,y\n")
    assert read_label_file(tmp_path / "labels.json") == labels
    assert read_label_file(tmp_path / "labels.csv") == {"a": "x", "b": "x", "c": "y"}
    (tmp_path / "bad.csv").write_text("a\n")
    with pytest.raises(ModloraError, match=r"bad\.csv.*line 1"):
        read_label_file(tmp_path / "bad.csv")
    with pytest.raises(ModloraError, match="none of the clustered"):
        cluster_quality(result, {"q": "x"})
    by_task = reference_labels(tmp_path / "labels.csv", ["e1", "e2"], tasks_of={"e1": ["a", "c", "b"], "e2": ["q"]})
    assert by_task == {"e1": "x"}
    (tmp_path / "sni").mkdir()
    (tmp_path / "sni" / "index.json").write_text(json.dumps({"train_tasks": [
        {"task": "a", "category": "Arithmetic"}, {"task": "b", "category": "Grammar"}]}))
    assert reference_labels("sni-categories", ["a", "b", "c"], data_dir=tmp_path) == {"a": "Arithmetic",
                                                                                      "b": "Grammar"}
    with pytest.raises(ModloraError, match="no SNI index"):
        reference_labels("sni-categories", ["a"], data_dir=tmp_path / "nowhere")
