"""Model-based clustering (MBC) of LoRA experts (Ostapenko et al., 2024, Sec. 3.2) on one of three feature sets.

Similarity features (``features=``):

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

The experts are then partitioned into K clusters by one of two algorithms (:data:`ALGORITHMS`):

* ``spectral`` (default) — Ng, Jordan & Weiss (2002): the affinity ``W = max(S, 0)`` (zero diagonal), the top-K
  eigenvectors ``U`` (n × K) of ``D^{-1/2} W D^{-1/2}`` (``sklearn.manifold.spectral_embedding``), each row of
  ``U`` scaled to unit length, k-means on those rows.
* ``kmeans`` — the paper's: k-means on the *rows* of ``S`` (each expert described by its similarities to all).

``K`` is given or chosen automatically (``auto_k=``, :data:`AUTO_K_CRITERIA`). A chosen K comes with the
partition the criterion scored it on (:data:`CRITERION_ALGORITHM`); a given K is partitioned by the paper's
``kmeans`` (``partition=`` overrides either).
The default, ``spectral``, keeps the K whose spectral partition has the best silhouette under the cosine distance
``1 − S``; the others are the eigengap of the normalised Laplacian, the silhouette of k-means on the rows, and
stability under resampling. When no K separates the experts the result says so (``no_structure``).
The resulting task clusters are used to train one expert per cluster (the MBC library).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from modlora.errors import DataError, LibraryError, ModloraError
from modlora.library.adapters import LoraAdapter
from modlora.library.experts import ArtifactStore, Experts, ExpertSet

if TYPE_CHECKING:
    from modlora.data import Task
    from modlora.models import LoadedModel

SIMILARITY_ARTIFACT_VERSION = "mbc-svd-v2"  # v2: c = min(n_components, n, D) (v1 kept n - 1 components)
DELTA_ARTIFACT_VERSION = "mbc-delta-v1"
SEMANTIC_ARTIFACT_VERSION = "mbc-semantic-v1"
CLUSTERING_JSON_VERSION = 3  # v3: "algorithm" (files without it used "kmeans")
FEATURES = ("params", "delta", "semantic")
AUTO_K_CRITERIA = ("spectral", "eigengap", "silhouette", "stability")
ALGORITHMS = ("spectral", "kmeans")
# the partitioning algorithm each criterion scores K on (and that a given K then uses)
CRITERION_ALGORITHM = {"spectral": "spectral", "eigengap": "spectral", "silhouette": "kmeans", "stability": "kmeans"}
DEFAULT_FEATURES = "delta"
DEFAULT_AUTO_K = "spectral"
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
_MIN_NORM = 1e-12
Features = Literal["params", "delta", "semantic"]
AutoK = Literal["spectral", "eigengap", "silhouette", "stability"]
Algorithm = Literal["spectral", "kmeans"]


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
    """Cosine similarities of the experts under one feature set.

    ``names``: n expert names (sorted); ``embeddings``: (n × c) L2-normalised rows with ``Ê Êᵀ = S``;
    ``similarity``: (n × n) ``S`` with ones on the diagonal (for non-zero experts). ``features`` names how
    ``S`` was computed (``params``, ``delta`` or ``semantic``); ``centred`` whether the mean over experts was
    removed first; ``sparsity`` / ``n_components`` / ``seed`` are the ``params`` settings.
    """

    names: list[str]
    similarity: np.ndarray
    embeddings: np.ndarray
    sparsity: float = 0.5
    n_components: int = 0
    seed: int = 0
    features: str = "params"
    centred: bool = False

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise LibraryError(f"expert {name!r} is not in the similarity result") from None


def _check_fraction(value: float, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ModloraError(f"{field_name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_layouts(adapters: Mapping[str, LoraAdapter], names: list[str]) -> None:
    """Every expert is a LoraAdapter with the same modules and factor shapes as ``names[0]``."""
    reference_name = names[0]
    reference_layout: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None
    for name in names:
        adapter = adapters[name]
        if not isinstance(adapter, LoraAdapter):
            raise LibraryError(f"expert {name!r}: expected a LoraAdapter, got {type(adapter).__name__}")
        layout = _layout(adapter)
        if reference_layout is None:
            reference_layout = layout
        elif layout != reference_layout:
            diff = _first_layout_difference(reference_layout, layout)
            raise LibraryError(
                f"expert {name!r} cannot be compared with expert {reference_name!r}: {diff}; MBC needs experts "
                "with the same modules and ranks")


def _flatten_all(adapters: Mapping[str, LoraAdapter], names: list[str]) -> np.ndarray:
    """Stack the flattened experts into (n × D), checking that every expert has the same layout."""
    _check_layouts(adapters, names)
    return np.stack([flatten_expert(adapters[name]) for name in names])


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
    ``c = min(n_components, n, D)``: with ``c = n`` (n ≤ n_components) every component is kept and ``E = L``
    itself (``E Eᵀ = G``), so the cosine is the exact cosine of the sparsified parameters. (Keeping only
    ``n − 1`` components there, as v1 did, made two experts' embeddings scalars and their cosine always ±1.)
    """
    from sklearn.decomposition import TruncatedSVD

    n, d = stacked.shape
    c = max(1, min(n_components, n, d))
    eigenvalues, eigenvectors = np.linalg.eigh(gram_matrix(stacked))
    factor = eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))  # (n × n), factor @ factor.T == G
    if not np.any(factor):
        return np.zeros((n, c))
    if c >= n:
        return factor[:, ::-1].astype(np.float64)  # components by decreasing singular value
    svd = TruncatedSVD(n_components=c, algorithm="arpack", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # explained-variance division by zero for tiny inputs
        return svd.fit_transform(factor).astype(np.float64)


def expert_similarity(adapters: Experts, sparsity: float = 0.5, n_components: int = 64,
                      seed: int = 0, *, cache: ArtifactStore | None = None) -> SimilarityResult:
    """MBC similarity of experts: sparsify (per-expert magnitude quantile), truncated SVD, row-normalise, cosine.

    ``X[i] = sparsify(θ_i)`` (n × D); ``E = TruncatedSVD(c).fit_transform(X)`` with
    ``c = min(n_components, n, D)`` (computed exactly via the Gram matrix, see :func:`_svd_embeddings`);
    ``Ê = E / ‖E‖_row``; ``S = Ê Êᵀ`` (n × n).
    Experts are ordered by name. ``cache`` (for example an expert library with
    ``load_artifact`` / ``save_artifact``) stores each expert's embedding together with a
    fingerprint of the whole expert set and config, and is reused only when that fingerprint matches.
    """
    adapters = ExpertSet.of(adapters).as_dict()
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
                            n_components=embeddings.shape[1], seed=seed, features="params")


# --------------------------------------------------------------------------- delta (ΔW) similarity


def delta_gram(adapters: Experts, names: Sequence[str] | None = None, *,
               block: int = 64) -> np.ndarray:
    """Exact Gram matrix of the experts' updates, ``G_ij = Σ_m ⟨ΔW_i[m], ΔW_j[m]⟩_F`` (n × n, float64).

    ``⟨s_i B_i A_i, s_j B_j A_j⟩_F = s_i s_j tr((B_iᵀ B_j)(A_j A_iᵀ)) = s_i s_j Σ_ab (B_iᵀB_j)_ab (A_iA_jᵀ)_ab``.
    Per module the factors are stacked over experts, ``A`` as (n·r × in) and ``Bᵀ`` as (n·r × out), and for a
    block of experts the two (b·r × n·r) products are multiplied elementwise and summed over each r × r block:
    O(n²r²(in + out)) per module, never forming a ΔW (out × in). ``names`` defaults to the sorted names.
    """
    adapters = ExpertSet.of(adapters).as_dict()
    names = sorted(adapters) if names is None else list(names)
    if not names:
        raise LibraryError("cannot compare an empty set of experts")
    loaded = {name: adapters[name] for name in names}  # a library loads each expert once
    _check_layouts(loaded, names)
    n = len(names)
    scaling = torch.tensor([loaded[name].spec.scaling for name in names], dtype=torch.float64)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for module in loaded[names[0]].modules:
        a_rows = torch.cat([loaded[name].A[module].detach().cpu().double() for name in names])  # (n·r × in)
        b_rows = torch.cat([loaded[name].B[module].detach().cpu().double().T for name in names])  # (n·r × out)
        rank = a_rows.shape[0] // n
        for start in range(0, n, block):
            stop = min(n, start + block)
            rows = slice(start * rank, stop * rank)
            products = (a_rows[rows] @ a_rows.T) * (b_rows[rows] @ b_rows.T)  # (b·r × n·r)
            gram[start:stop] += products.reshape(stop - start, rank, n, rank).sum(dim=(1, 3))
    gram *= scaling[:, None] * scaling[None, :]
    return gram.numpy()


def centre_gram(gram: np.ndarray) -> np.ndarray:
    """Gram matrix of the centred vectors ``v_i − mean_j v_j``: ``G − 1ḡᵀ − ḡ1ᵀ + mean(G)``, ``ḡ = G.mean(1)``."""
    gram = np.asarray(gram, dtype=np.float64)
    row_mean = gram.mean(axis=1)
    return gram - row_mean[:, None] - row_mean[None, :] + gram.mean()


def cosine_from_gram(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``S_ij = G_ij / sqrt(G_ii G_jj)`` (n × n, zero rows for zero vectors, ones on the diagonal of the others)
    and an (n × n) embedding ``Ê`` with ``Ê Êᵀ = S`` (rows of unit norm, or zero)."""
    gram = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    scale = np.where(norms > _MIN_NORM * max(1.0, float(norms.max(initial=0.0))), 1.0 / np.maximum(norms, _MIN_NORM),
                     0.0)
    similarity = np.clip(gram * scale[:, None] * scale[None, :], -1.0, 1.0)
    similarity = (similarity + similarity.T) / 2
    eigenvalues, eigenvectors = np.linalg.eigh(similarity)
    embeddings = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None)))[:, ::-1]
    row_norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings = np.where(row_norms > _MIN_NORM, embeddings / np.maximum(row_norms, _MIN_NORM), 0.0)
    return similarity, embeddings


def _factors_fingerprint(version: str, adapters: Mapping[str, LoraAdapter], names: list[str]) -> bytes:
    h = hashlib.sha256()
    h.update(json.dumps([version, names]).encode())
    for name in names:
        adapter = adapters[name]
        h.update(json.dumps([adapter.spec.scaling, adapter.modules]).encode())
        for module in adapter.modules:
            for factor in (adapter.A[module], adapter.B[module]):
                h.update(factor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def _load_cached_rows(cache: Any, names: list[str], kind: str, key: str, fingerprint: bytes) -> np.ndarray | None:
    """Rows ``tensors[key]`` cached per expert under ``kind``, or None unless all exist with this fingerprint."""
    rows: list[np.ndarray] = []
    expected = torch.tensor(list(fingerprint), dtype=torch.uint8)
    for name in names:
        tensors = cache.load_artifact(name, kind)
        if not tensors or key not in tensors or "fingerprint" not in tensors:
            return None
        if not torch.equal(tensors["fingerprint"].to(torch.uint8).reshape(-1), expected):
            return None
        rows.append(tensors[key].detach().cpu().double().numpy().reshape(-1))
    if len({r.shape for r in rows}) != 1:
        return None
    return np.stack(rows)


def _save_cached_rows(cache: Any, names: list[str], kind: str, key: str, fingerprint: bytes, rows: np.ndarray
                      ) -> None:
    fp_tensor = torch.tensor(list(fingerprint), dtype=torch.uint8)
    for i, name in enumerate(names):
        cache.save_artifact(name, kind, {key: torch.from_numpy(np.array(rows[i], dtype=np.float64)),
                                         "fingerprint": fp_tensor.clone()})


def delta_similarity(adapters: Experts, *, centre: bool = False,
                     cache: ArtifactStore | None = None) -> SimilarityResult:
    """Cosine similarity of the experts' updates ΔW summed over modules (see :func:`delta_gram`).

    ``centre=True`` compares ``ΔW_i − mean_j ΔW_j`` (:func:`centre_gram`), removing what every expert learned
    alike; off by default: with unbalanced families the mean is pulled towards the largest one, whose members then
    look like noise (measured in ``benchmarks/cluster_recovery.py``).
    ``cache`` stores each expert's row of the raw Gram matrix with a fingerprint of every expert's factors and
    reuses them only when the fingerprint matches. Experts are ordered by name.
    """
    adapters = ExpertSet.of(adapters).as_dict()
    names = sorted(adapters)
    if len(names) < 2:
        raise LibraryError(f"MBC needs at least 2 experts to compare, got {len(names)} ({names})")
    loaded = {name: adapters[name] for name in names}
    _check_layouts(loaded, names)
    fingerprint = _factors_fingerprint(DELTA_ARTIFACT_VERSION, loaded, names)
    gram = (_load_cached_rows(cache, names, DELTA_ARTIFACT_VERSION, "gram_row", fingerprint)
            if cache is not None else None)
    if gram is None or gram.shape != (len(names), len(names)):
        gram = delta_gram(loaded, names)
        if cache is not None:
            _save_cached_rows(cache, names, DELTA_ARTIFACT_VERSION, "gram_row", fingerprint, gram)
    similarity, embeddings = cosine_from_gram(centre_gram(gram) if centre else gram)
    return SimilarityResult(names=names, similarity=similarity, embeddings=embeddings, n_components=len(names),
                            features="delta", centred=centre)


# --------------------------------------------------------------------------- semantic similarity


@dataclass
class TaskEmbeddings:
    """Mean-pooled last hidden states of the base model: ``vectors[i]`` (hidden size h) belongs to ``names[i]``."""

    names: list[str]
    vectors: np.ndarray


def task_text(task: Task, n_inputs: int = 4) -> str:
    """What describes a task: its definition followed by its first ``n_inputs`` instance inputs."""
    parts = [task.definition.strip()] + [inst.input.strip() for inst in task.instances[:n_inputs]]
    return "\n\n".join(p for p in parts if p)


def _embed_text(lm: LoadedModel, text: str, max_tokens: int) -> np.ndarray:
    """Mean over tokens of the last hidden state (h,), for the first ``max_tokens`` tokens of ``text``."""
    ids = lm.tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_tokens,
                       return_tensors="pt")["input_ids"]
    device = next(lm.model.parameters()).device
    with torch.inference_mode():
        out = lm.model(input_ids=ids.to(device), output_hidden_states=True)
    return out.hidden_states[-1][0].float().mean(dim=0).cpu().double().numpy()


def _embed_groups(lm: LoadedModel, groups: Mapping[str, Sequence[str]], *, max_tokens: int,
                  cache: ArtifactStore | None, kind: str, progress: bool) -> np.ndarray:
    """Row per group: the mean of its texts' embeddings; cached per group name with a fingerprint of the
    base model's identity and the texts."""
    rows: list[np.ndarray] = []
    items = list(groups.items())
    iterator: Any = items
    if progress:
        from modlora.progress import progress_bar

        iterator = progress_bar(items, desc="embedding tasks", unit="task")
    for name, texts in iterator:
        if not texts:
            raise DataError(f"{name!r}: no task text to embed")
        h = hashlib.sha256(json.dumps([kind, lm.info.to_dict(),
                                       list(texts)]).encode())
        fingerprint = h.digest()
        cached = _load_cached_rows(cache, [name], kind, "embedding", fingerprint) if cache is not None else None
        if cached is not None:
            rows.append(cached[0])
            continue
        row = np.mean([_embed_text(lm, text, max_tokens) for text in texts], axis=0)
        if cache is not None:
            _save_cached_rows(cache, [name], kind, "embedding", fingerprint, row[None, :])
        rows.append(row)
    return np.stack(rows)


def task_embeddings(lm: LoadedModel, tasks: Mapping[str, Task] | Sequence[Task], *, n_inputs: int = 4,
                    max_tokens: int = 256, progress: bool = False) -> TaskEmbeddings:
    """Embed each task (definition + first ``n_inputs`` inputs, at most ``max_tokens`` tokens) with the base model.

    ``vectors[i] = mean_t h_L(t)`` over the tokens t of :func:`task_text` (n × hidden size, float64); tasks are
    ordered by name. Nothing is downloaded: the base model itself is the encoder.
    """
    by_name = dict(tasks) if isinstance(tasks, Mapping) else {t.name: t for t in tasks}
    names = sorted(by_name)
    if not names:
        raise DataError("no tasks to embed")
    vectors = _embed_groups(lm, {name: [task_text(by_name[name], n_inputs)] for name in names}, max_tokens=max_tokens,
                            cache=None, kind=f"{SEMANTIC_ARTIFACT_VERSION}-i{n_inputs}-t{max_tokens}",
                            progress=progress)
    return TaskEmbeddings(names=names, vectors=vectors)


def semantic_similarity(embeddings: TaskEmbeddings, *, centre: bool = True) -> SimilarityResult:
    """Cosine of the (centred: minus the mean over tasks, which removes the model's common direction) embeddings."""
    vectors = np.asarray(embeddings.vectors, dtype=np.float64)
    if len(embeddings.names) < 2:
        raise LibraryError(f"clustering needs at least 2 tasks, got {len(embeddings.names)}")
    gram = vectors @ vectors.T
    similarity, normalised = cosine_from_gram(centre_gram(gram) if centre else gram)
    return SimilarityResult(names=list(embeddings.names), similarity=similarity, embeddings=normalised,
                            n_components=len(embeddings.names), features="semantic", centred=centre)


def expert_semantic_similarity(lm: LoadedModel, tasks_of: Mapping[str, Sequence[str]], tasks: Mapping[str, Task], *,
                               n_inputs: int = 4, max_tokens: int = 256, centre: bool = True,
                               cache: ArtifactStore | None = None, progress: bool = False) -> SimilarityResult:
    """Semantic similarity of experts: each expert is the mean embedding of its tasks' texts (:func:`task_text`).

    ``tasks_of`` maps expert name → its task names (all must be in ``tasks``). ``cache`` (an expert library)
    stores each expert's embedding, keyed by the base model's identity and the texts.
    """
    names = sorted(tasks_of)
    if len(names) < 2:
        raise LibraryError(f"MBC needs at least 2 experts to compare, got {len(names)} ({names})")
    groups: dict[str, list[str]] = {}
    for name in names:
        missing = [t for t in tasks_of[name] if t not in tasks]
        if missing or not tasks_of[name]:
            raise DataError(f"expert {name!r}: no data for its task(s) {missing or ['(none recorded)']}; semantic "
                            "features need each task's definition and inputs (--data)")
        groups[name] = [task_text(tasks[t], n_inputs) for t in tasks_of[name]]
    vectors = _embed_groups(lm, groups, max_tokens=max_tokens, cache=cache,
                            kind=f"{SEMANTIC_ARTIFACT_VERSION}-i{n_inputs}-t{max_tokens}", progress=progress)
    return semantic_similarity(TaskEmbeddings(names=names, vectors=vectors), centre=centre)


# --------------------------------------------------------------------------- clustering


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


def eigengap_null_quantile(similarity: np.ndarray, lo: int, hi: int, seed: int, *, n_permutations: int = NULL_PERMUTATIONS,
                           quantile: float = 0.95) -> float:
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


def cluster_experts(sim: SimilarityResult, k: int | Literal["auto"] = "auto",
                    k_range: tuple[int, int] | None = None, seed: int = 0, *,
                    auto_k: AutoK = DEFAULT_AUTO_K, partition: Algorithm | None = None) -> ClusteringResult:
    """Partition the experts of ``sim`` (similarity ``S``, n × n) into K clusters (k-means++, ``n_init=10``,
    ``random_state=seed``) with ``partition`` (:data:`ALGORITHMS`; module doc). By default a given ``k`` uses the
    paper's ``kmeans`` on the rows of S, and ``k="auto"`` the algorithm its criterion scored K on
    (:data:`CRITERION_ALGORITHM`: spectral clustering for ``spectral`` and ``eigengap``, k-means for
    ``silhouette`` and ``stability``).

    A given ``k`` is honoured or refused (ModloraError when fewer than ``k`` experts are distinguishable); it
    is never lowered. ``k="auto"`` scores every ``K`` in ``k_range`` (inclusive; default ``(2, min(n - 1, 16))``)
    with ``auto_k`` (:data:`AUTO_K_CRITERIA`: ``spectral`` = silhouette of the spectral partition under the cosine
    distance 1 − S, ``eigengap`` of the normalised Laplacian, ``silhouette`` of k-means on the rows, or
    ``stability`` under resampling) and keeps the best. When none separates the experts — spectral: the best
    silhouette is below :data:`SPECTRAL_MIN_SILHOUETTE` or within the 95th percentile of the silhouettes of
    :data:`NULL_PERMUTATIONS` randomly permuted similarities at the same K; eigengap: the gap
    after K = 1 is the largest, or the best gap is within the 95th percentile of gaps of randomly permuted
    similarities; silhouette: best below :data:`SILHOUETTE_NO_STRUCTURE`; stability: best below
    :data:`STABILITY_NO_STRUCTURE` — and with fewer than 3 experts, the result has ``k == 1`` and
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
    """The experts' similarity under ``features`` (``params``, ``delta`` or ``semantic``; see the module doc).

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


# --------------------------------------------------------------------------- quality against a reference


SNI_CATEGORIES = "sni-categories"


@dataclass
class ClusterQuality:
    """Agreement of a clustering with reference labels, over the ``n_labelled`` experts that have one.

    ``ari``: adjusted Rand index (1 = same partition, ~0 = chance); ``purity``: ``Σ_j max_label |C_j ∩ label|
    / n_labelled``; ``n_labels``: distinct reference labels; ``unlabelled``: experts without a label (left out).
    """

    ari: float
    purity: float
    n_labelled: int
    n_labels: int
    unlabelled: list[str] = field(default_factory=list)


def cluster_quality(result: ClusteringResult, labels: Mapping[str, str]) -> ClusterQuality:
    """ARI and purity of ``result`` against ``labels`` (name → label); see :func:`partition_quality`."""
    return partition_quality({name: result.assignment[name] for name in result.names}, labels)


def partition_quality(assignment: Mapping[str, Hashable], labels: Mapping[str, str]) -> ClusterQuality:
    """ARI (``sklearn.metrics.adjusted_rand_score``) and purity of a partition ``assignment`` (name → cluster)
    against ``labels`` (name → label), over the names that have a label."""
    from sklearn.metrics import adjusted_rand_score

    labelled = [name for name in assignment if name in labels]
    if not labelled:
        raise DataError("none of the clustered experts has a reference label")
    truth = [str(labels[name]) for name in labelled]
    found = [assignment[name] for name in labelled]
    majority = 0
    for cluster in set(found):
        members = [t for t, f in zip(truth, found, strict=True) if f == cluster]
        majority += max(members.count(label) for label in set(members))
    return ClusterQuality(ari=float(adjusted_rand_score(truth, found)), purity=majority / len(labelled),
                          n_labelled=len(labelled), n_labels=len(set(truth)),
                          unlabelled=[name for name in assignment if name not in labels])


def read_label_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Reference labels from a JSON object ``{name: label}`` or a two-column CSV ``name,label`` (an optional
    header row whose first cell is ``name``, ``expert`` or ``task`` is skipped)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"cannot read label file {path}: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or not all(isinstance(v, (str, int)) for v in raw.values()):
            raise DataError(f"{path}: must hold a JSON object mapping expert/task name to a label")
        return {str(k): str(v) for k, v in raw.items()}
    labels: dict[str, str] = {}
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DataError(f"{path}: line {line_no} has {len(row)} column(s); expected name,label")
        name, label = row[0].strip(), row[1].strip()
        if line_no == 1 and name.lower() in {"name", "expert", "task"}:
            continue
        labels[name] = label
    if not labels:
        raise DataError(f"{path}: no name,label rows")
    return labels


def reference_labels(source: str | os.PathLike[str], names: Sequence[str], *,
                     tasks_of: Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]] | None = None,
                     data_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Expert name → reference label from ``source``: ``"sni-categories"`` (each expert's SNI category from
    ``DATA/sni/index.json``, the most common one over its tasks) or a label file (:func:`read_label_file`) keyed
    by expert or task name. Experts with no label are left out."""
    lookup = tasks_of.get if isinstance(tasks_of, Mapping) else tasks_of
    if str(source) == SNI_CATEGORIES:
        from modlora.data import default_data_dir, read_index

        root = Path(data_dir) if data_dir is not None else default_data_dir()
        index = read_index(root)
        if not index:
            raise DataError(f"no SNI index at {root / 'sni' / 'index.json'}: cannot label experts by SNI category")
        by_task = {task: str(entry.get("category", "")) for task, entry in index.items() if entry.get("category")}
    else:
        by_task = read_label_file(source)
    out: dict[str, str] = {}
    for name in names:
        if name in by_task:
            out[name] = by_task[name]
            continue
        found = [by_task[t] for t in ((lookup(name) if lookup is not None else None) or []) if t in by_task]
        if found:
            out[name] = max(sorted(set(found)), key=found.count)
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
    ax_bar.set_title(f"cluster sizes ({result.method}, {result.features} features, K={result.k}, silhouette={sil})")
    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    path = Path(path_png)
    atomic_write_bytes(path, buffer.getvalue())
    return path
