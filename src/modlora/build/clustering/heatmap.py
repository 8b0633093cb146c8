"""The clustering plot: the similarity heatmap ordered by cluster beside the cluster sizes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from modlora.build.clustering.partition import ClusteringResult
from modlora.errors import ModloraError


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
