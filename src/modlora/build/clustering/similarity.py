"""Similarity of LoRA experts from their weights: ``params`` (the paper's flattened, sparsified factors reduced by a
truncated SVD) and ``delta`` (the exact cosine of the updates ΔW from r × r factor products), with their per-expert
artifact caches. Both give a :class:`SimilarityResult`: names, ``S`` (n × n) and unit rows ``Ê`` with ``Ê Êᵀ = S``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modlora.errors import LibraryError, ModloraError
from modlora.library.adapters import LoraAdapter
from modlora.library.experts import ArtifactStore, Experts, ExpertSet

SIMILARITY_ARTIFACT_VERSION = "mbc-svd-v2"  # v2: c = min(n_components, n, D) (v1 kept n - 1 components)
DELTA_ARTIFACT_VERSION = "mbc-delta-v1"
_MIN_NORM = 1e-12


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
    embeddings = _load_cached_rows(cache, names, kind, "embedding", fingerprint) if cache is not None else None
    if embeddings is None:
        for row in stacked:  # in place: the stacked matrix can be large (n × D)
            _zero_small_entries(row, sparsity)
        embeddings = _svd_embeddings(stacked, n_components, seed)
        if cache is not None:
            _save_cached_rows(cache, names, kind, "embedding", fingerprint, embeddings)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    normalised = embeddings / np.maximum(norms, _MIN_NORM)
    similarity = np.clip(normalised @ normalised.T, -1.0, 1.0)
    return SimilarityResult(names=names, similarity=similarity, embeddings=normalised, sparsity=sparsity,
                            n_components=embeddings.shape[1], seed=seed, features="params")


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
