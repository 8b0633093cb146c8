"""Model-based clustering (MBC) of LoRA experts (Ostapenko et al., 2024, Sec. 3.2) on one of three feature sets.

Similarity features (``features=``, :data:`~.mbc.FEATURES`):

* ``params`` — the paper's method. Each expert is the flattened vector
  ``θ_i = concat_m [vec(A_i[m]), vec(B_i[m])]`` over its modules ``m`` in sorted order (length ``D``);
  every ``θ_i`` is sparsified by zeroing the entries with ``|θ_ij| < quantile(|θ_i|, sparsity)``, the rows are
  stacked into ``X`` (n × D) and reduced by a truncated SVD, ``E = X V_c`` (n × c, ``c = min(n_components, n, D)``),
  and ``S = Ê Êᵀ`` is the cosine of the L2-normalised rows.
* ``delta`` — the exact cosine of the experts' updates ``ΔW_i[m] = s_i B_i[m] A_i[m]`` summed over modules:
  ``G_ij = Σ_m s_i s_j tr((B_iᵀ B_j)(A_j A_iᵀ))`` (the Frobenius inner product, from the r × r factor products,
  never forming ΔW), optionally centred over experts (``G_c = G − 1ḡᵀ − ḡ1ᵀ + mean(G)``, the Gram matrix of
  ``ΔW_i − mean_j ΔW_j``), then ``S_ij = G_ij / sqrt(G_ii G_jj)``. Because B starts at 0, ΔW sees only what was
  learned, not the initialisation of A that all experts share.
* ``semantic`` — the cosine of (centred) mean-pooled last hidden states of the base model on each task's definition
  plus a few of its inputs (:func:`task_embeddings`).

The experts are then partitioned into K clusters by one of two algorithms (:data:`~.partition.ALGORITHMS`):

* ``spectral`` (default) — Ng, Jordan & Weiss (2002): the affinity ``W = max(S, 0)`` (zero diagonal), the top-K
  eigenvectors ``U`` (n × K) of ``D^{-1/2} W D^{-1/2}`` (``sklearn.manifold.spectral_embedding``), each row of
  ``U`` scaled to unit length, k-means on those rows.
* ``kmeans`` — the paper's: k-means on the *rows* of ``S`` (each expert described by its similarities to all).

``K`` is given or chosen automatically (``auto_k=``, :data:`~.auto_k.AUTO_K_CRITERIA`). A chosen K comes with the
partition the criterion scored it on (:data:`~.auto_k.CRITERION_ALGORITHM`); a given K is partitioned by the
paper's ``kmeans`` (``partition=`` overrides either).
The default, ``spectral``, keeps the K whose spectral partition has the best silhouette under the cosine distance
``1 − S``; the others are the eigengap of the normalised Laplacian, the silhouette of k-means on the rows, and
stability under resampling. When no K separates the experts the result says so (``no_structure``).
The resulting task clusters are used to train one expert per cluster (the MBC library).

One module per step, each importing only the ones above it:

* :mod:`~.similarity` — ``params`` and ``delta`` similarities (:class:`SimilarityResult`) and their artifact caches;
* :mod:`~.semantic` — task embeddings by the base model and the ``semantic`` similarity;
* :mod:`~.partition` — :class:`ClusteringResult`, spectral / k-means labels for a given K and their silhouettes,
  random clusters of the same sizes, the task lists of the clusters;
* :mod:`~.auto_k` — the automatic-K criteria and their permutation nulls;
* :mod:`~.mbc` — the whole step: :func:`similarity_of`, :func:`cluster_experts`, :func:`model_based_clustering`;
* :mod:`~.quality` — agreement with reference labels (ARI, purity) and where the labels come from;
* :mod:`~.heatmap` — the similarity heatmap ordered by cluster.

This package re-exports (lazily) the functions and types the rest of modlora uses; constants and private helpers are
imported from their module.
"""

from __future__ import annotations

from modlora.lazy import lazy_exports

# name → the submodule that defines it; imported on first use, so importing one submodule (or the package)
# does not load the others and their dependencies
_LAZY = {
    "permuted_similarities": "modlora.build.clustering.auto_k",
    "spectral_null_silhouettes": "modlora.build.clustering.auto_k",
    "Algorithm": "modlora.build.clustering.choices",
    "AutoK": "modlora.build.clustering.choices",
    "Features": "modlora.build.clustering.choices",
    "cluster_experts": "modlora.build.clustering.mbc",
    "model_based_clustering": "modlora.build.clustering.mbc",
    "similarity_of": "modlora.build.clustering.mbc",
    "cluster_tasks": "modlora.build.clustering.partition",
    "ClusteringResult": "modlora.build.clustering.partition",
    "cosine_distance_silhouette": "modlora.build.clustering.partition",
    "random_clustering": "modlora.build.clustering.partition",
    "random_clusters": "modlora.build.clustering.partition",
    "spectral_labels": "modlora.build.clustering.partition",
    "spectral_rows": "modlora.build.clustering.partition",
    "plot_clustering": "modlora.build.clustering.heatmap",
    "cluster_quality": "modlora.build.clustering.quality",
    "ClusterQuality": "modlora.build.clustering.quality",
    "partition_quality": "modlora.build.clustering.quality",
    "read_label_file": "modlora.build.clustering.quality",
    "reference_labels": "modlora.build.clustering.quality",
    "expert_semantic_similarity": "modlora.build.clustering.semantic",
    "semantic_similarity": "modlora.build.clustering.semantic",
    "task_embeddings": "modlora.build.clustering.semantic",
    "TaskEmbeddings": "modlora.build.clustering.semantic",
    "centre_gram": "modlora.build.clustering.similarity",
    "delta_gram": "modlora.build.clustering.similarity",
    "delta_similarity": "modlora.build.clustering.similarity",
    "expert_similarity": "modlora.build.clustering.similarity",
    "flatten_expert": "modlora.build.clustering.similarity",
    "SimilarityResult": "modlora.build.clustering.similarity",
    "sparsify_by_magnitude": "modlora.build.clustering.similarity",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
