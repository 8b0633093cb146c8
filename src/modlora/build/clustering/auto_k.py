"""Choosing K automatically (:data:`AUTO_K_CRITERIA`): the silhouette of the spectral or k-means partition, the
eigengap of the normalised Laplacian, stability under resampling, and the structure-free nulls (randomly permuted
similarities) that the spectral and eigengap criteria must beat. :func:`_choose_k` applies one criterion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modlora.build.clustering.choices import AUTO_K_CRITERIA, Algorithm
from modlora.build.clustering.partition import (
    _distinct_rows,
    _kmeans_labels,
    cosine_distance_silhouette,
    partition_labels,
    partition_silhouette,
    spectral_labels,
)
from modlora.build.clustering.similarity import _MIN_NORM
from modlora.errors import ModloraError

# below this best silhouette the partition is no better than noise (Kaufman & Rousseeuw's "no substantial structure")
SILHOUETTE_NO_STRUCTURE = 0.25
# spectral: a best silhouette (cosine distance) below this is negligible even when it beats the permutations (with
# n ≥ 100 unrelated experts, silhouettes of ~0.01 do: a cosine matrix is not exchangeable); unrelated experts score
# 0.01-0.07 in benchmarks/cluster_recovery.py, planted families at noise 1 about 0.5
SPECTRAL_MIN_SILHOUETTE = 0.1
# eigengap and spectral: the best K > 1 must beat this many structure-free permutations of the similarities at the
# 95 % level
NULL_PERMUTATIONS = 20
# below this mean ARI between a resampled clustering and the full one, no K is stable
STABILITY_NO_STRUCTURE = 0.8


def permuted_similarities(similarity: np.ndarray, n_permutations: int, seed: int) -> list[np.ndarray]:
    """``n_permutations`` similarity matrices whose off-diagonal entries are a random symmetric permutation of the
    observed ones (ones on the diagonal): the same values, no structure."""
    n = len(similarity)
    upper = np.triu_indices(n, 1)
    values = np.asarray(similarity, dtype=np.float64)[upper]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_permutations):
        shuffled = np.zeros((n, n))
        shuffled[upper] = rng.permutation(values)
        out.append(shuffled + shuffled.T + np.eye(n))
    return out


def spectral_null_silhouettes(similarity: np.ndarray, k: int, seed: int, *,
                              n_permutations: int = NULL_PERMUTATIONS) -> list[float]:
    """Silhouettes (cosine distance) of the K-cluster spectral partitions of :func:`permuted_similarities`
    (a permutation whose experts cannot be split into K clusters scores -1)."""
    scores = []
    for null in permuted_similarities(similarity, n_permutations, seed):
        try:
            score = cosine_distance_silhouette(null, spectral_labels(null, k, seed))
        except ModloraError:
            score = None
        scores.append(-1.0 if score is None else score)
    return scores


def laplacian_spectrum(similarity: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of ``L = I − D^{-1/2} W D^{-1/2}`` for the affinity ``W = max(S, 0)`` with a zero
    diagonal (``D = diag(W 1)``; an expert with no positive similarity is an isolated vertex, degree 1)."""
    affinity = np.clip(np.asarray(similarity, dtype=np.float64), 0.0, None)
    np.fill_diagonal(affinity, 0.0)
    degree = affinity.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(np.where(degree > _MIN_NORM, degree, 1.0))
    laplacian = np.eye(len(affinity)) - inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    return np.linalg.eigvalsh((laplacian + laplacian.T) / 2)


def eigengap_scores(similarity: np.ndarray, k_max: int) -> dict[int, float]:
    """``score(K) = λ_{K+1} − λ_K`` for K = 1…k_max (eigenvalues of :func:`laplacian_spectrum`, 1-indexed).

    K well-separated groups give K eigenvalues near 0 and a large gap after the K-th; K = 1 wins when the
    experts form one connected mass."""
    spectrum = laplacian_spectrum(similarity)
    top = min(k_max, len(spectrum) - 1)
    return {k: float(spectrum[k] - spectrum[k - 1]) for k in range(1, top + 1)}


def eigengap_null_quantile(similarity: np.ndarray, lo: int, hi: int, seed: int, *,
                           n_permutations: int = NULL_PERMUTATIONS, quantile: float = 0.95) -> float:
    """The ``quantile`` of ``max_{lo ≤ K ≤ hi} score(K)`` over similarity matrices whose off-diagonal entries are a
    random symmetric permutation of the observed ones: the same values, no structure."""
    maxima = []
    for shuffled in permuted_similarities(similarity, n_permutations, seed):
        scores = eigengap_scores(shuffled, hi)
        maxima.append(max(v for k, v in scores.items() if k >= lo))
    return float(np.quantile(maxima, quantile))


def stability_scores(features: np.ndarray, ks: Sequence[int], seed: int, *, n_resamples: int = 10,
                     fraction: float = 0.8) -> dict[int, float]:
    """Mean adjusted Rand index between k-means on random ``fraction`` subsets of the experts (their rows,
    restricted to the subset's columns) and k-means on all of them, restricted to the subset (Ben-Hur et al.)."""
    from sklearn.metrics import adjusted_rand_score

    n = len(features)
    m = max(2, int(round(fraction * n)))
    rng = np.random.default_rng(seed)
    subsets = [np.sort(rng.choice(n, size=m, replace=False)) for _ in range(n_resamples)]
    scores: dict[int, float] = {}
    for k in ks:
        if _distinct_rows(features) < k:
            continue
        full = _kmeans_labels(features, k, seed)
        agreement = []
        for subset in subsets:
            sub = features[np.ix_(subset, subset)] if features.shape[0] == features.shape[1] else features[subset]
            if _distinct_rows(sub) < k:
                agreement.append(0.0)
                continue
            agreement.append(adjusted_rand_score(full[subset], _kmeans_labels(sub, k, seed, n_init=3)))
        scores[k] = float(np.mean(agreement))
    return scores


def _best_silhouette(similarity: np.ndarray, candidates: range, seed: int, algorithm: Algorithm, minimum: float,
                     labels_by_k: dict[int, np.ndarray]) -> tuple[int, dict[int, float], str]:
    """The candidate K whose ``algorithm`` partition (:func:`partition_labels`, filled into ``labels_by_k``) has the
    best :func:`partition_silhouette` (ties: the smaller K): ``(K, scores, "")``, or ``(1, scores, why)`` when no K
    has one or the best is below ``minimum``. A K that cannot be made (fewer distinct rows than K) is skipped."""
    scores: dict[int, float] = {}
    for k in candidates:
        try:
            labels_by_k[k] = partition_labels(similarity, k, seed, algorithm)
        except ModloraError:
            continue
        score = partition_silhouette(similarity, labels_by_k[k], algorithm)
        if score is not None:
            scores[k] = score
    if not scores:
        return 1, scores, "no cluster structure: no K has a defined silhouette"
    best = max(scores, key=lambda k: (scores[k], -k))
    if scores[best] < minimum:
        return 1, scores, (f"no cluster structure: the best silhouette ({scores[best]:.3f} at K={best}) is below "
                           f"{minimum}")
    return best, scores, ""


def _choose_k(similarity: np.ndarray, criterion: str, lo: int, hi: int, seed: int
              ) -> tuple[int, dict[int, float], dict[int, np.ndarray], str]:
    """(K, scores by candidate K, k-means labels by K computed on the way, why-no-structure message or "")."""
    labels_by_k: dict[int, np.ndarray] = {}
    if criterion == "spectral":
        best, scores, message = _best_silhouette(similarity, range(lo, hi + 1), seed, "spectral",
                                                 SPECTRAL_MIN_SILHOUETTE, labels_by_k)
        if message:
            return 1, scores, labels_by_k, message
        null = float(np.quantile(spectral_null_silhouettes(similarity, best, seed), 0.95))
        if scores[best] <= null:
            return 1, scores, labels_by_k, (
                f"no cluster structure: the best silhouette ({scores[best]:.3f} at K={best}) is no better than in "
                f"randomly permuted similarities (95th percentile at K={best}: {null:.3f})")
        return best, scores, labels_by_k, ""
    if criterion == "eigengap":
        scores = eigengap_scores(similarity, hi)
        scores = {k: v for k, v in scores.items() if k == 1 or lo <= k <= hi}
        best = max(scores, key=lambda k: (scores[k], -k))
        if best == 1:
            return 1, scores, labels_by_k, (f"no cluster structure: the largest eigengap of the similarity graph's "
                                            f"Laplacian is after the first eigenvalue ({scores[1]:.3f}), i.e. the "
                                            "experts form one connected group")
        null = eigengap_null_quantile(similarity, lo, hi, seed)
        if scores[best] <= null:
            return 1, scores, labels_by_k, (f"no cluster structure: the best eigengap (K={best}: {scores[best]:.3f}) "
                                            f"is no larger than in randomly permuted similarities (95th percentile "
                                            f"{null:.3f})")
        return best, scores, labels_by_k, ""
    if criterion == "silhouette":
        best, scores, message = _best_silhouette(similarity, range(lo, hi + 1), seed, "kmeans",
                                                 SILHOUETTE_NO_STRUCTURE, labels_by_k)
        return best, scores, labels_by_k, message
    if criterion == "stability":
        scores = stability_scores(similarity, range(lo, hi + 1), seed)
        if not scores:
            return 1, scores, labels_by_k, "no cluster structure: no K could be tried"
        best = max(scores, key=lambda k: (round(scores[k], 6), k))  # ties go to the finer partition
        if scores[best] < STABILITY_NO_STRUCTURE:
            return 1, scores, labels_by_k, (f"no cluster structure: no K is stable under resampling (best mean ARI "
                                            f"{scores[best]:.3f} at K={best}, below {STABILITY_NO_STRUCTURE})")
        return best, scores, labels_by_k, ""
    raise ModloraError(f"auto_k must be one of {', '.join(AUTO_K_CRITERIA)}, got {criterion!r}")
