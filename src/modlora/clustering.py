"""Model-based clustering (MBC) of LoRA experts (Ostapenko et al., 2024, Sec. 3.2).

Each private expert is summarised by its parameters: the flattened vector
``θ_i = concat_m [vec(A_i[m]), vec(B_i[m])]`` over its modules ``m`` in sorted order (length ``D``).
MBC then

1. sparsifies every ``θ_i`` by zeroing the entries with ``|θ_ij| < quantile(|θ_i|, sparsity)``
   (keeping the largest-magnitude ``1 - sparsity`` fraction);
2. stacks them into ``X`` (n × D) and reduces it with a truncated SVD, ``E = X V_c`` (n × c);
3. L2-normalises the rows of ``E`` and takes the cosine-similarity matrix ``S = Ê Êᵀ`` (n × n);
4. runs k-means on the *rows* of ``S`` (each expert is described by its similarities to all
   experts), picking ``K`` by silhouette score when asked to.

The resulting task clusters are used to train one expert per cluster (the MBC library).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from modlora.adapters import LoraAdapter
from modlora.errors import LibraryError, ModloraError

SIMILARITY_ARTIFACT_VERSION = "mbc-svd-v1"
CLUSTERING_JSON_VERSION = 1
_MIN_NORM = 1e-12


@runtime_checkable
class ArtifactStore(Protocol):
    """What an expert library offers for caching per-expert tensors (duck-typed)."""

    def load_artifact(self, expert: str, kind: str) -> dict[str, torch.Tensor] | None: ...

    def save_artifact(self, expert: str, kind: str, tensors: dict[str, torch.Tensor]) -> None: ...


class _LibraryAdapters(Mapping[str, LoraAdapter]):
    """Read-only ``Mapping`` view of an object with ``expert_names()`` and ``get(name)``."""

    def __init__(self, library: Any) -> None:
        self._library = library
        self._names = list(library.expert_names())

    def __getitem__(self, name: str) -> LoraAdapter:
        if name not in self._names:
            raise KeyError(name)
        return self._library.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def as_adapter_mapping(experts: Mapping[str, LoraAdapter] | Any) -> Mapping[str, LoraAdapter]:
    """Accept a ``Mapping[name, LoraAdapter]`` or a library with ``expert_names()`` / ``get(name)``."""
    if isinstance(experts, Mapping):
        return experts
    if hasattr(experts, "expert_names") and hasattr(experts, "get"):
        return _LibraryAdapters(experts)
    raise ModloraError(f"expected a mapping of expert name -> LoraAdapter or an expert library, got {type(experts).__name__}")


# --------------------------------------------------------------------------- flattening


def flatten_expert(adapter: LoraAdapter) -> np.ndarray:
    """``θ = concat over sorted modules m of [vec(A[m]) (r·in), vec(B[m]) (out·r)]`` as fp32, shape (D,)."""
    parts: list[np.ndarray] = []
    for m in adapter.modules:
        parts.append(adapter.A[m].detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy())
        parts.append(adapter.B[m].detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy())
    return np.concatenate(parts).astype(np.float32, copy=False)


def _layout(adapter: LoraAdapter) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    return [(m, tuple(adapter.A[m].shape), tuple(adapter.B[m].shape)) for m in adapter.modules]


def sparsify_by_magnitude(theta: np.ndarray, sparsity: float) -> np.ndarray:
    """Copy of ``θ`` with entries ``|θ_j| < quantile(|θ|, sparsity)`` set to 0 (``sparsity=0`` keeps all)."""
    out = np.array(theta, dtype=np.float32, copy=True)
    _zero_small_entries(out, sparsity)
    return out


def _zero_small_entries(row: np.ndarray, sparsity: float) -> None:
    if sparsity <= 0.0 or row.size == 0:
        return
    magnitude = np.abs(row)
    row[magnitude < np.quantile(magnitude, sparsity)] = 0.0


# --------------------------------------------------------------------------- similarity


@dataclass
class SimilarityResult:
    """Cosine similarities of the experts' SVD embeddings.

    ``names``: n expert names (sorted); ``embeddings``: (n × c) L2-normalised rows;
    ``similarity``: (n × n) ``Ê Êᵀ`` with ones on the diagonal (for non-zero experts).
    """

    names: list[str]
    similarity: np.ndarray
    embeddings: np.ndarray
    sparsity: float = 0.5
    n_components: int = 0
    seed: int = 0

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise LibraryError(f"expert {name!r} is not in the similarity result") from None


def _check_fraction(value: float, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ModloraError(f"{field_name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _flatten_all(adapters: Mapping[str, LoraAdapter], names: list[str]) -> np.ndarray:
    """Stack the flattened experts into (n × D), checking that every expert has the same layout."""
    reference_name = names[0]
    reference_layout = _layout(adapters[reference_name])
    rows: list[np.ndarray] = []
    for name in names:
        adapter = adapters[name]
        if not isinstance(adapter, LoraAdapter):
            raise LibraryError(f"expert {name!r}: expected a LoraAdapter, got {type(adapter).__name__}")
        layout = _layout(adapter)
        if layout != reference_layout:
            diff = _first_layout_difference(reference_layout, layout)
            raise LibraryError(
                f"expert {name!r} cannot be compared with expert {reference_name!r}: {diff}; MBC needs experts "
                "with the same modules and ranks")
        rows.append(flatten_expert(adapter))
    return np.stack(rows)


def _first_layout_difference(ref: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
                             other: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> str:
    ref_modules = {m: (a, b) for m, a, b in ref}
    other_modules = {m: (a, b) for m, a, b in other}
    missing = sorted(set(ref_modules) - set(other_modules))
    extra = sorted(set(other_modules) - set(ref_modules))
    if missing:
        return f"it lacks module {missing[0]!r}"
    if extra:
        return f"it has extra module {extra[0]!r}"
    for m in sorted(ref_modules):
        if ref_modules[m] != other_modules[m]:
            return f"module {m!r} has A/B shapes {other_modules[m]} instead of {ref_modules[m]}"
    return "layouts differ"


def _fingerprint(names: list[str], stacked: np.ndarray, sparsity: float, n_components: int, seed: int) -> bytes:
    h = hashlib.sha256()
    h.update(json.dumps([SIMILARITY_ARTIFACT_VERSION, names, sparsity, n_components, seed]).encode())
    h.update(np.ascontiguousarray(stacked).tobytes())
    return h.digest()


def similarity_artifact_kind(sparsity: float, n_components: int, seed: int) -> str:
    """Artifact kind under which a library caches each expert's MBC embedding."""
    return f"{SIMILARITY_ARTIFACT_VERSION}-s{sparsity:g}-c{n_components}-seed{seed}"


def _load_cached_embeddings(cache: Any, names: list[str], kind: str, fingerprint: bytes) -> np.ndarray | None:
    rows: list[np.ndarray] = []
    expected = torch.tensor(list(fingerprint), dtype=torch.uint8)
    for name in names:
        tensors = cache.load_artifact(name, kind)
        if not tensors or "embedding" not in tensors or "fingerprint" not in tensors:
            return None
        if not torch.equal(tensors["fingerprint"].to(torch.uint8).reshape(-1), expected):
            return None
        rows.append(tensors["embedding"].detach().cpu().double().numpy().reshape(-1))
    if len({r.shape for r in rows}) != 1:
        return None
    return np.stack(rows)


def gram_matrix(stacked: np.ndarray, chunk_columns: int = 1 << 16) -> np.ndarray:
    """``G = X Xᵀ`` (n × n, float64) of the stacked experts ``X`` (n × D), accumulated over column chunks."""
    n, d = stacked.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, d, chunk_columns):
        block = torch.from_numpy(np.ascontiguousarray(stacked[:, start:start + chunk_columns])).double()
        gram += block @ block.T
    return gram.numpy()


def _svd_embeddings(stacked: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """Truncated-SVD embedding ``E = U_c Σ_c`` (n × c) of the stacked sparse experts ``X = U Σ Vᵀ`` (n × D).

    ``TruncatedSVD(X).fit_transform(X) = U_c Σ_c`` depends on ``X`` only through ``X Xᵀ = U Σ² Uᵀ``, so it
    is run (ARPACK, ``c < n``) on the n × n factor ``L = V_G Λ_G^{1/2}`` of the Gram matrix ``G = X Xᵀ = L Lᵀ``:
    the same embedding, without a randomized range finder over the D (~10⁵–10⁷) parameter axis.
    """
    from sklearn.decomposition import TruncatedSVD

    n, d = stacked.shape
    c = max(1, min(n_components, n - 1, d))
    eigenvalues, eigenvectors = np.linalg.eigh(gram_matrix(stacked))
    factor = eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))  # (n × n), factor @ factor.T == G
    if not np.any(factor):
        return np.zeros((n, c))
    svd = TruncatedSVD(n_components=c, algorithm="arpack", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # explained-variance division by zero for tiny inputs
        return svd.fit_transform(factor).astype(np.float64)


def expert_similarity(adapters: Mapping[str, LoraAdapter] | Any, sparsity: float = 0.5, n_components: int = 64,
                      seed: int = 0, *, cache: ArtifactStore | None = None) -> SimilarityResult:
    """MBC similarity of experts: sparsify (per-expert magnitude quantile), truncated SVD, row-normalise, cosine.

    ``X[i] = sparsify(θ_i)`` (n × D); ``E = TruncatedSVD(c).fit_transform(X)`` with
    ``c = min(n_components, n - 1, D)`` (computed exactly via the Gram matrix, see :func:`_svd_embeddings`);
    ``Ê = E / ‖E‖_row``; ``S = Ê Êᵀ`` (n × n).
    Experts are ordered by name. ``cache`` (for example an expert library with
    ``load_artifact`` / ``save_artifact``) stores each expert's embedding together with a
    fingerprint of the whole expert set and config, and is reused only when that fingerprint matches.
    """
    adapters = as_adapter_mapping(adapters)
    sparsity = _check_fraction(sparsity, "sparsity")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ModloraError(f"n_components must be a positive integer, got {n_components!r}")
    names = sorted(adapters)
    if len(names) < 2:
        raise LibraryError(f"MBC needs at least 2 experts to compare, got {len(names)} ({names})")
    stacked = _flatten_all(adapters, names)
    kind = similarity_artifact_kind(sparsity, n_components, seed)
    fingerprint = _fingerprint(names, stacked, sparsity, n_components, seed)
    embeddings = _load_cached_embeddings(cache, names, kind, fingerprint) if cache is not None else None
    if embeddings is None:
        for row in stacked:  # in place: the stacked matrix can be large (n × D)
            _zero_small_entries(row, sparsity)
        embeddings = _svd_embeddings(stacked, n_components, seed)
        if cache is not None:
            fp_tensor = torch.tensor(list(fingerprint), dtype=torch.uint8)
            for i, name in enumerate(names):
                cache.save_artifact(name, kind, {"embedding": torch.from_numpy(embeddings[i].copy()),
                                                 "fingerprint": fp_tensor.clone()})
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    normalised = embeddings / np.maximum(norms, _MIN_NORM)
    similarity = np.clip(normalised @ normalised.T, -1.0, 1.0)
    return SimilarityResult(names=names, similarity=similarity, embeddings=normalised, sparsity=sparsity,
                            n_components=embeddings.shape[1], seed=seed)


# --------------------------------------------------------------------------- clustering


@dataclass
class ClusteringResult:
    """A partition of experts into ``k`` clusters.

    ``clusters[j]`` lists the names in cluster ``j`` (sorted); clusters are ordered by their smallest
    member name and ``assignment[name] == j``. ``similarity`` (n × n, rows/cols in ``names`` order)
    is what was clustered; ``silhouette`` is the score of this partition (``None`` when undefined,
    i.e. ``k == 1`` or ``k == n``); ``scores_by_k`` holds every silhouette tried by ``k="auto"``.
    """

    names: list[str]
    assignment: dict[str, int]
    clusters: list[list[str]]
    k: int
    silhouette: float | None
    scores_by_k: dict[int, float] = field(default_factory=dict)
    similarity: np.ndarray | None = None
    seed: int = 0
    method: str = "mbc"

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clusters]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CLUSTERING_JSON_VERSION,
            "method": self.method,
            "names": list(self.names),
            "k": self.k,
            "seed": self.seed,
            "silhouette": self.silhouette,
            "scores_by_k": {str(k): v for k, v in sorted(self.scores_by_k.items())},
            "clusters": [list(c) for c in self.clusters],
            "assignment": dict(sorted(self.assignment.items())),
            "similarity": None if self.similarity is None else np.asarray(self.similarity, dtype=np.float64).tolist(),
        }

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Plain-JSON text of the result; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            from modlora.io import atomic_write_bytes

            atomic_write_bytes(path, text.encode())
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "clustering") -> ClusteringResult:
        try:
            names = [str(n) for n in d["names"]]
            clusters = [[str(n) for n in c] for c in d["clusters"]]
            assignment = {str(k): int(v) for k, v in d["assignment"].items()}
            sim = d.get("similarity")
            similarity = None if sim is None else np.asarray(sim, dtype=np.float64)
            result = cls(names=names, assignment=assignment, clusters=clusters, k=int(d["k"]),
                         silhouette=None if d.get("silhouette") is None else float(d["silhouette"]),
                         scores_by_k={int(k): float(v) for k, v in d.get("scores_by_k", {}).items()},
                         similarity=similarity, seed=int(d.get("seed", 0)), method=str(d.get("method", "mbc")))
        except KeyError as exc:
            raise LibraryError(f"{source}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise LibraryError(f"{source}: malformed clustering ({exc})") from None
        result.validate(source)
        return result

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> ClusteringResult:
        """Parse :meth:`to_json` output, given as JSON text or as a path to a file holding it."""
        source = "clustering JSON"
        text = str(text_or_path) if not isinstance(text_or_path, os.PathLike) else None
        if text is None or not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            source = str(path)
            try:
                text = path.read_text()
            except OSError as exc:
                raise LibraryError(f"cannot read clustering file {path}: {exc}") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LibraryError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise LibraryError(f"{source}: must hold a JSON object")
        return cls.from_dict(raw, source=source)

    def validate(self, source: str = "clustering") -> None:
        """Check that clusters, assignment, names, ``k`` and the similarity shape agree."""
        members = [n for c in self.clusters for n in c]
        if sorted(members) != sorted(self.names) or len(set(members)) != len(members):
            raise LibraryError(f"{source}: clusters must partition the expert names exactly")
        if self.k != len(self.clusters) or any(not c for c in self.clusters):
            raise LibraryError(f"{source}: field 'k'={self.k} but there are {len(self.clusters)} non-empty clusters")
        for j, cluster in enumerate(self.clusters):
            for name in cluster:
                if self.assignment.get(name) != j:
                    raise LibraryError(f"{source}: expert {name!r} is in cluster {j} but assigned to "
                                       f"{self.assignment.get(name)!r}")
        n = len(self.names)
        if self.similarity is not None and np.shape(self.similarity) != (n, n):
            raise LibraryError(f"{source}: field 'similarity' has shape {np.shape(self.similarity)}, expected {(n, n)}")


def canonical_clusters(labels: Sequence[int], names: Sequence[str]) -> list[list[str]]:
    """Group ``names`` by ``labels``; sort members, order clusters by smallest member (labels are dropped)."""
    groups: dict[int, list[str]] = {}
    for name, label in zip(names, labels, strict=True):
        groups.setdefault(int(label), []).append(name)
    clusters = [sorted(g) for g in groups.values()]
    clusters.sort(key=lambda c: c[0])
    return clusters


def _result_from_clusters(clusters: list[list[str]], names: list[str], *, silhouette: float | None,
                          scores_by_k: dict[int, float], similarity: np.ndarray | None, seed: int,
                          method: str) -> ClusteringResult:
    assignment = {name: j for j, cluster in enumerate(clusters) for name in cluster}
    return ClusteringResult(names=list(names), assignment=assignment, clusters=clusters, k=len(clusters),
                            silhouette=silhouette, scores_by_k=scores_by_k, similarity=similarity, seed=seed,
                            method=method)


def _kmeans_labels(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than k
        model = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed)
        return model.fit_predict(features)


def _silhouette(features: np.ndarray, labels: np.ndarray) -> float | None:
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if not 2 <= n_labels <= len(labels) - 1:
        return None
    return float(silhouette_score(features, labels, metric="euclidean"))


def cluster_experts(sim: SimilarityResult, k: int | Literal["auto"] = "auto",
                    k_range: tuple[int, int] | None = None, seed: int = 0) -> ClusteringResult:
    """k-means (k-means++, ``n_init=10``, ``random_state=seed``) on the rows of ``sim.similarity`` (n × n).

    ``k="auto"`` tries every ``K`` in ``k_range`` (inclusive; default ``(2, min(n - 1, 16))``) and keeps
    the one with the highest silhouette score (euclidean, on the same rows; ties go to the smaller K).
    With fewer than 3 experts ``"auto"`` has nothing to compare and returns a single cluster.
    """
    similarity = np.asarray(sim.similarity, dtype=np.float64)
    names = list(sim.names)
    n = len(names)
    if similarity.shape != (n, n):
        raise ModloraError(f"similarity matrix has shape {similarity.shape}, expected {(n, n)} for {n} experts")
    if n < 1:
        raise LibraryError("cannot cluster an empty set of experts")
    if not np.isfinite(similarity).all():
        raise ModloraError("similarity matrix contains NaN or Inf")
    scores_by_k: dict[int, float] = {}
    if k == "auto":
        lo, hi = k_range if k_range is not None else (2, min(n - 1, 16))
        if isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, int) or not isinstance(hi, int):
            raise ModloraError(f"k_range must be two integers, got {k_range!r}")
        lo, hi = max(lo, 2), min(hi, n - 1)
        if lo > hi:
            if k_range is not None and n >= 3:
                raise ModloraError(f"k_range={k_range!r} holds no K in [2, {n - 1}] for {n} experts")
            labels = np.zeros(n, dtype=int)
        else:
            best: tuple[float, int, np.ndarray] | None = None
            for candidate in range(lo, hi + 1):
                cand_labels = _kmeans_labels(similarity, candidate, seed)
                score = _silhouette(similarity, cand_labels)
                if score is None:
                    continue
                scores_by_k[candidate] = score
                if best is None or score > best[0] + 1e-12:
                    best = (score, candidate, cand_labels)
            labels = best[2] if best is not None else np.zeros(n, dtype=int)
    else:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ModloraError(f"k must be 'auto' or an integer in [1, {n}] for {n} experts, got {k!r}")
        labels = _kmeans_labels(similarity, k, seed) if k > 1 else np.zeros(n, dtype=int)
    clusters = canonical_clusters(labels, names)
    return _result_from_clusters(clusters, names, silhouette=_silhouette(similarity, labels), scores_by_k=scores_by_k,
                                 similarity=similarity, seed=seed, method="mbc")


def model_based_clustering(experts: Mapping[str, LoraAdapter] | Any, k: int | Literal["auto"] = "auto", *,
                           sparsity: float = 0.5, n_components: int = 64, k_range: tuple[int, int] | None = None,
                           seed: int = 0, cache: ArtifactStore | None = None) -> ClusteringResult:
    """:func:`expert_similarity` followed by :func:`cluster_experts` (the whole MBC step).

    ``experts`` may be an expert library; it is then also used as the embedding cache unless
    ``cache`` is given.
    """
    if cache is None and isinstance(experts, ArtifactStore):
        cache = experts
    sim = expert_similarity(experts, sparsity=sparsity, n_components=n_components, seed=seed, cache=cache)
    return cluster_experts(sim, k=k, k_range=k_range, seed=seed)


def random_clusters(names: Sequence[str], sizes: Sequence[int], seed: int = 0) -> list[list[str]]:
    """Random partition of ``names`` into clusters of the given ``sizes`` (the paper's random-clustering ablation).

    Cluster ``j`` has ``sizes[j]`` members (sorted by name); the same ``seed`` gives the same partition.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ModloraError("random_clusters: expert names must be unique")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
        raise ModloraError(f"random_clusters: sizes must be positive integers, got {list(sizes)}")
    if sum(sizes) != len(names):
        raise ModloraError(f"random_clusters: sizes sum to {sum(sizes)} but there are {len(names)} experts")
    order = np.random.default_rng(seed).permutation(len(names))
    clusters: list[list[str]] = []
    start = 0
    for size in sizes:
        clusters.append(sorted(names[i] for i in order[start:start + int(size)]))
        start += int(size)
    return clusters


def random_clustering(result: ClusteringResult, seed: int = 0) -> ClusteringResult:
    """A :class:`ClusteringResult` with the same cluster sizes as ``result`` but random members."""
    clusters = random_clusters(sorted(result.names), result.sizes, seed=seed)
    return _result_from_clusters(clusters, list(result.names), silhouette=None, scores_by_k={},
                                 similarity=result.similarity, seed=seed, method="random")


def cluster_tasks(result: ClusteringResult, tasks_of: Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]]
                  ) -> list[list[str]]:
    """Task lists per cluster: the union (sorted, deduplicated) of the tasks of each cluster's experts.

    ``tasks_of`` maps an expert name to its training tasks (e.g. ``library.tasks``); a private expert
    without recorded tasks stands for the task of the same name.
    """
    lookup = tasks_of.get if isinstance(tasks_of, Mapping) else tasks_of
    out: list[list[str]] = []
    for cluster in result.clusters:
        tasks: set[str] = set()
        for name in cluster:
            found = lookup(name)
            tasks.update(found if found else [name])
        out.append(sorted(tasks))
    return out


# --------------------------------------------------------------------------- plotting


def plot_clustering(result: ClusteringResult, path_png: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write ONE PNG with two panels: the similarity heatmap with experts ordered by cluster and white
    lines at cluster boundaries (left), and a bar plot of cluster sizes (right). Returns the path."""
    import io

    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot, no global backend change

    from modlora.io import atomic_write_bytes

    if result.similarity is None:
        raise ModloraError("plot_clustering needs a ClusteringResult with a similarity matrix")
    order_names = [name for cluster in result.clusters for name in cluster]
    index = {name: i for i, name in enumerate(result.names)}
    order = [index[name] for name in order_names]
    sim = np.asarray(result.similarity)[np.ix_(order, order)]
    n = len(order)

    fig = Figure(figsize=(13, 6), constrained_layout=True)
    ax_heat, ax_bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1.0]})
    # colour range from the off-diagonal values: experts sharing a LoRA initialisation can all sit near 1.0, and a
    # fixed [0, 1] scale would hide the structure the clustering found
    off = sim[~np.eye(n, dtype=bool)] if n > 1 else sim.reshape(-1)
    lo, hi = float(off.min()), float(off.max())
    image = ax_heat.imshow(sim, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-9, interpolation="nearest")
    fig.colorbar(image, ax=ax_heat, fraction=0.046, pad=0.04, label="cosine similarity")
    boundary = -0.5
    for size in result.sizes[:-1]:
        boundary += size
        ax_heat.axhline(boundary, color="white", linewidth=1.2)
        ax_heat.axvline(boundary, color="white", linewidth=1.2)
    if n <= 40:
        ax_heat.set_xticks(range(n), order_names, rotation=90, fontsize=7)
        ax_heat.set_yticks(range(n), order_names, fontsize=7)
    else:
        ax_heat.set_xticks([])
        ax_heat.set_yticks([])
    ax_heat.set_title(f"expert similarity ordered by cluster ({n} experts)")
    ax_bar.bar(range(result.k), result.sizes, color="tab:blue")
    ax_bar.set_xlabel("cluster")
    ax_bar.set_ylabel("experts")
    ax_bar.set_xticks(range(result.k))
    sil = "n/a" if result.silhouette is None else f"{result.silhouette:.3f}"
    ax_bar.set_title(f"cluster sizes ({result.method}, K={result.k}, silhouette={sil})")
    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    path = Path(path_png)
    atomic_write_bytes(path, buffer.getvalue())
    return path
