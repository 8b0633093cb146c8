"""The names MBC chooses between (feature sets, partition algorithms, automatic-K criteria, the label source of SNI
categories) and their defaults. Torch- and numpy-free, so the CLI builds its flags without loading either."""

from __future__ import annotations

from typing import Literal

Features = Literal["params", "delta", "semantic"]
FEATURES = ("params", "delta", "semantic")
DEFAULT_FEATURES = "delta"

Algorithm = Literal["spectral", "kmeans"]
ALGORITHMS = ("spectral", "kmeans")

AutoK = Literal["spectral", "eigengap", "silhouette", "stability"]
AUTO_K_CRITERIA = ("spectral", "eigengap", "silhouette", "stability")
# the partitioning algorithm each criterion scores K on (and that a given K then uses)
CRITERION_ALGORITHM = {"spectral": "spectral", "eigengap": "spectral", "silhouette": "kmeans", "stability": "kmeans"}
DEFAULT_AUTO_K = "spectral"

SNI_CATEGORIES = "sni-categories"  # reference labels: the SNI category of each expert's tasks
