"""Partitions of experts: :class:`ClusteringResult` (and its JSON), the two partitioning algorithms for a given K
(:data:`ALGORITHMS`: spectral clustering of ``S`` or k-means on its rows) with the silhouette each is scored by, the
random partition of the same sizes (the paper's ablation) and the task lists of each cluster.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modlora.build.clustering.choices import ALGORITHMS, Algorithm
from modlora.build.clustering.similarity import _MIN_NORM
from modlora.errors import LibraryError, ModloraError
from modlora.io import parse_json, read_regular_file

CLUSTERING_JSON_VERSION = 3  # v3: "algorithm" (files without it used "kmeans")


@dataclass
class ClusteringResult:
    """A partition of experts into ``k`` clusters.

    ``clusters[j]`` lists the names in cluster ``j`` (sorted); clusters are ordered by their smallest
    member name and ``assignment[name] == j``. ``similarity`` (n × n, rows/cols in ``names`` order)
    is what was clustered, computed from ``features``; ``algorithm`` (``spectral`` or ``kmeans``) partitioned it;
    ``silhouette`` is the score of this partition (under the cosine distance ``1 − S`` for ``spectral``, on the rows
    of ``S`` for ``kmeans``; ``None`` when undefined, i.e. ``k == 1`` or ``k == n``). With ``k="auto"``,
    ``criterion`` names the rule that chose K and ``scores_by_k`` holds its score for every candidate K (higher is
    better); ``no_structure`` is True when no K > 1 separates the experts (then ``k == 1``) and ``message`` says
    why.
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
    features: str = "params"
    criterion: str | None = None
    no_structure: bool = False
    message: str = ""
    algorithm: str = "kmeans"

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clusters]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CLUSTERING_JSON_VERSION,
            "method": self.method,
            "features": self.features,
            "algorithm": self.algorithm,
            "names": list(self.names),
            "k": self.k,
            "seed": self.seed,
            "silhouette": self.silhouette,
            "criterion": self.criterion,
            "no_structure": self.no_structure,
            "message": self.message,
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
                         similarity=similarity, seed=int(d.get("seed", 0)), method=str(d.get("method", "mbc")),
                         features=str(d.get("features", "params")),
                         criterion=None if d.get("criterion") is None else str(d["criterion"]),
                         no_structure=bool(d.get("no_structure", False)), message=str(d.get("message", "")),
                         algorithm=str(d.get("algorithm", "kmeans")))
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
                text = read_regular_file(path, follow_symlinks=True).decode()
            except OSError as exc:
                raise LibraryError(f"cannot read clustering file {path}: {exc}") from None
        try:
            raw = parse_json(text)
        except ValueError as exc:
            raise LibraryError(f"{source}: not valid JSON: {exc}") from None
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
                          method: str, features: str = "params", criterion: str | None = None,
                          no_structure: bool = False, message: str = "", algorithm: str = "kmeans"
                          ) -> ClusteringResult:
    assignment = {name: j for j, cluster in enumerate(clusters) for name in cluster}
    return ClusteringResult(names=list(names), assignment=assignment, clusters=clusters, k=len(clusters),
                            silhouette=silhouette, scores_by_k=scores_by_k, similarity=similarity, seed=seed,
                            method=method, features=features, criterion=criterion, no_structure=no_structure,
                            message=message, algorithm=algorithm)


def _distinct_rows(features: np.ndarray) -> int:
    return len(np.unique(np.round(features, 12), axis=0))


def _require_distinct_rows(rows: np.ndarray, k: int) -> None:
    """A ModloraError unless ``rows`` (one per expert) has at least ``k`` distinct rows: k clusters are impossible."""
    distinct = _distinct_rows(rows)
    if distinct < k:
        raise ModloraError(f"cannot split {len(rows)} experts into K={k} clusters: only {distinct} of them have "
                           "distinct similarity rows; ask for a smaller K")


def _kmeans_labels(features: np.ndarray, k: int, seed: int, n_init: int = 10) -> np.ndarray:
    """k-means++ labels with exactly ``k`` non-empty clusters, or a ModloraError saying why that is impossible."""
    from sklearn.cluster import KMeans

    _require_distinct_rows(features, k)
    labels = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed).fit_predict(features)
    if len(np.unique(labels)) != k:  # pragma: no cover - sklearn relocates empty clusters when distinct >= k
        raise ModloraError(f"k-means returned {len(np.unique(labels))} non-empty clusters instead of K={k}")
    return labels


def _silhouette(features: np.ndarray, labels: np.ndarray) -> float | None:
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if not 2 <= n_labels <= len(labels) - 1:
        return None
    return float(silhouette_score(features, labels, metric="euclidean"))


def cosine_distance_silhouette(similarity: np.ndarray, labels: np.ndarray) -> float | None:
    """Silhouette of ``labels`` under the cosine distance ``d_ij = 1 − S_ij`` (clipped at 0, zero diagonal);
    ``None`` unless 2 ≤ #clusters ≤ n − 1."""
    from sklearn.metrics import silhouette_score

    if not 2 <= len(np.unique(labels)) <= len(labels) - 1:
        return None
    distance = np.clip(1.0 - np.asarray(similarity, dtype=np.float64), 0.0, None)
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0.0)
    return float(silhouette_score(distance, labels, metric="precomputed"))


def spectral_rows(similarity: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """Ng-Jordan-Weiss embedding (n × n_components): the top eigenvectors of ``D^{-1/2} W D^{-1/2}`` for the
    affinity ``W = max(S, 0)`` with a zero diagonal (``sklearn.manifold.spectral_embedding``, which returns them
    scaled by ``D^{-1/2}``), each row scaled to unit length (so that scaling drops out). ``n_components < n``."""
    from sklearn.manifold import spectral_embedding

    affinity = np.clip(np.asarray(similarity, dtype=np.float64), 0.0, None)
    affinity = (affinity + affinity.T) / 2
    np.fill_diagonal(affinity, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Graph is not fully connected": the embedding is still exact
        rows = spectral_embedding(affinity, n_components=n_components, drop_first=False, random_state=seed)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, _MIN_NORM)


def spectral_labels(similarity: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spectral clustering (Ng, Jordan & Weiss): k-means++ (``n_init=10``) on :func:`spectral_rows` with ``k``
    components; exactly ``k`` non-empty clusters or a ModloraError."""
    n = len(similarity)
    _require_distinct_rows(np.asarray(similarity), k)
    if k == n:
        return np.arange(n)
    return _kmeans_labels(spectral_rows(similarity, k, seed), k, seed)


def partition_labels(similarity: np.ndarray, k: int, seed: int, algorithm: Algorithm) -> np.ndarray:
    """Cluster labels (n,) for exactly ``k`` clusters by ``algorithm`` (:data:`ALGORITHMS`; k = 1: all zeros)."""
    if k == 1:
        return np.zeros(len(similarity), dtype=int)
    if algorithm == "spectral":
        return spectral_labels(similarity, k, seed)
    if algorithm == "kmeans":
        return _kmeans_labels(similarity, k, seed)
    raise ModloraError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")


def partition_silhouette(similarity: np.ndarray, labels: np.ndarray, algorithm: Algorithm) -> float | None:
    """The silhouette a partition is scored by: cosine distance for ``spectral``, rows of S for ``kmeans``."""
    if algorithm == "spectral":
        return cosine_distance_silhouette(similarity, labels)
    return _silhouette(similarity, labels)


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
