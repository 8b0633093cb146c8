"""The whole MBC step: the experts' similarity under one feature set (:func:`similarity_of`, :data:`FEATURES`), then
a partition into a given or automatically chosen K (:func:`cluster_experts`); :func:`model_based_clustering` does
both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from modlora.build.clustering.auto_k import _choose_k
from modlora.build.clustering.choices import (
    ALGORITHMS,
    AUTO_K_CRITERIA,
    CRITERION_ALGORITHM,
    DEFAULT_AUTO_K,
    DEFAULT_FEATURES,
    FEATURES,
    Algorithm,
    AutoK,
    Features,
)
from modlora.build.clustering.partition import (
    ClusteringResult,
    _distinct_rows,
    _result_from_clusters,
    canonical_clusters,
    partition_labels,
    partition_silhouette,
)
from modlora.build.clustering.semantic import expert_semantic_similarity
from modlora.build.clustering.similarity import SimilarityResult, delta_similarity, expert_similarity
from modlora.errors import LibraryError, ModloraError
from modlora.library.experts import ArtifactStore, Experts, ExpertSet

if TYPE_CHECKING:
    from modlora.data import Task
    from modlora.models import LoadedModel


def cluster_experts(sim: SimilarityResult, k: int | Literal["auto"] = "auto",
                    k_range: tuple[int, int] | None = None, seed: int = 0, *,
                    auto_k: AutoK = DEFAULT_AUTO_K, partition: Algorithm | None = None) -> ClusteringResult:
    """Partition the experts of ``sim`` (similarity ``S``, n × n) into K clusters (k-means++, ``n_init=10``,
    ``random_state=seed``) with ``partition`` (:data:`~.partition.ALGORITHMS`; package doc). By default a given
    ``k`` uses the paper's ``kmeans`` on the rows of S, and ``k="auto"`` the algorithm its criterion scored K on
    (:data:`~.auto_k.CRITERION_ALGORITHM`: spectral clustering for ``spectral`` and ``eigengap``, k-means for
    ``silhouette`` and ``stability``).

    A given ``k`` is honoured or refused (ModloraError when fewer than ``k`` experts are distinguishable); it
    is never lowered. ``k="auto"`` scores every ``K`` in ``k_range`` (inclusive; default ``(2, min(n - 1, 16))``)
    with ``auto_k`` (:data:`~.auto_k.AUTO_K_CRITERIA`: ``spectral`` = silhouette of the spectral partition under
    the cosine distance 1 − S, ``eigengap`` of the normalised Laplacian, ``silhouette`` of k-means on the rows, or
    ``stability`` under resampling) and keeps the best. When none separates the experts — spectral: the best
    silhouette is below :data:`~.auto_k.SPECTRAL_MIN_SILHOUETTE` or within the 95th percentile of the silhouettes
    of :data:`~.auto_k.NULL_PERMUTATIONS` randomly permuted similarities at the same K; eigengap: the gap after
    K = 1 is the largest, or the best gap is within the 95th percentile of gaps of randomly permuted similarities;
    silhouette: best below :data:`~.auto_k.SILHOUETTE_NO_STRUCTURE`; stability: best below
    :data:`~.auto_k.STABILITY_NO_STRUCTURE` — and with fewer than 3 experts, the result has ``k == 1`` and
    ``no_structure=True`` with a message.
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
    criterion: str | None = None
    message = ""
    if auto_k not in AUTO_K_CRITERIA:
        raise ModloraError(f"auto_k must be one of {', '.join(AUTO_K_CRITERIA)}, got {auto_k!r}")
    if partition is not None and partition not in ALGORITHMS:
        raise ModloraError(f"partition must be one of {', '.join(ALGORITHMS)}, got {partition!r}")
    algorithm: Algorithm = partition or (CRITERION_ALGORITHM[auto_k] if k == "auto" else "kmeans")  # type: ignore
    if k == "auto":
        criterion = auto_k
        lo, hi = k_range if k_range is not None else (2, min(n - 1, 16))
        if isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, int) or not isinstance(hi, int):
            raise ModloraError(f"k_range must be two integers, got {k_range!r}")
        lo, hi = max(lo, 2), min(hi, n - 1)
        if lo > hi and k_range is not None and n >= 3:
            raise ModloraError(f"k_range={k_range!r} holds no K in [2, {n - 1}] for {n} experts")
        distinct = _distinct_rows(similarity)
        hi = min(hi, distinct)
        if lo > hi:
            message = (f"no cluster structure can be found among {n} expert(s): need at least 3 distinct ones"
                       if n < 3 else f"no cluster structure: only {distinct} of the {n} experts have distinct "
                       "similarity rows, too few for any K tried")
            labels = np.zeros(n, dtype=int)
        else:
            chosen, scores_by_k, labels_by_k, message = _choose_k(similarity, auto_k, lo, hi, seed)
            reuse = chosen in labels_by_k and algorithm == CRITERION_ALGORITHM[auto_k]
            labels = labels_by_k[chosen] if reuse else partition_labels(similarity, chosen, seed, algorithm)
    else:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise ModloraError(f"k must be 'auto' or an integer in [1, {n}] for {n} experts, got {k!r}")
        labels = partition_labels(similarity, int(k), seed, algorithm)
    clusters = canonical_clusters(labels, names)
    return _result_from_clusters(clusters, names, silhouette=partition_silhouette(similarity, labels, algorithm),
                                 scores_by_k=scores_by_k, similarity=similarity, seed=seed, method="mbc",
                                 features=sim.features, criterion=criterion, no_structure=bool(message),
                                 message=message, algorithm=algorithm)


def similarity_of(experts: Experts, features: Features = DEFAULT_FEATURES, *,
                  sparsity: float = 0.5, n_components: int = 64, centre: bool | None = None, seed: int = 0,
                  cache: ArtifactStore | None = None, lm: LoadedModel | None = None,
                  tasks: Mapping[str, Task] | None = None,
                  tasks_of: Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]] | None = None,
                  n_inputs: int = 4) -> SimilarityResult:
    """The experts' similarity under ``features`` (``params``, ``delta`` or ``semantic``; see the package doc).

    ``params`` uses ``sparsity``, ``n_components`` and ``seed``; ``delta`` and ``semantic`` use ``centre``
    (None: off for delta, on for semantic, whose mean-pooled hidden states all share one dominant direction).
    ``semantic`` needs the base model ``lm``, the task data ``tasks`` and ``tasks_of`` (expert → its tasks; by
    default ``experts.tasks`` when ``experts`` is a library, else the expert's own name).
    """
    if features == "params":
        return expert_similarity(experts, sparsity=sparsity, n_components=n_components, seed=seed, cache=cache)
    if features == "delta":
        return delta_similarity(experts, centre=bool(centre), cache=cache)
    if features == "semantic":
        if lm is None or tasks is None:
            raise ModloraError("semantic features need the base model and the tasks' data (definitions and inputs)")
        es = ExpertSet.of(experts)
        lookup = tasks_of if tasks_of is not None else es.tasks_of
        if isinstance(lookup, Mapping):
            lookup = lookup.get
        expert_tasks = {name: list(lookup(name) or [name]) for name in sorted(es.names)}
        return expert_semantic_similarity(lm, expert_tasks, tasks, n_inputs=n_inputs,
                                          centre=True if centre is None else centre, cache=cache)
    raise ModloraError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")


def model_based_clustering(experts: Experts, k: int | Literal["auto"] = "auto", *,
                           features: Features = DEFAULT_FEATURES, sparsity: float = 0.5, n_components: int = 64,
                           centre: bool | None = None, k_range: tuple[int, int] | None = None, seed: int = 0,
                           auto_k: AutoK = DEFAULT_AUTO_K, partition: Algorithm | None = None,
                           cache: ArtifactStore | None = None,
                           lm: LoadedModel | None = None, tasks: Mapping[str, Task] | None = None,
                           tasks_of: Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]] | None = None
                           ) -> ClusteringResult:
    """:func:`similarity_of` followed by :func:`cluster_experts` (the whole MBC step).

    ``experts`` may be an expert library; it is then also used as the similarity cache unless ``cache`` is given.
    """
    if cache is None and isinstance(experts, ArtifactStore):
        cache = experts
    sim = similarity_of(experts, features, sparsity=sparsity, n_components=n_components, centre=centre, seed=seed,
                        cache=cache, lm=lm, tasks=tasks, tasks_of=tasks_of)
    return cluster_experts(sim, k=k, k_range=k_range, seed=seed, auto_k=auto_k, partition=partition)
