"""Quality of a clustering against reference labels (adjusted Rand index and purity), and where the labels come
from: a JSON / CSV label file or the SNI categories of the experts' tasks.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modlora.build.clustering.choices import SNI_CATEGORIES
from modlora.build.clustering.partition import ClusteringResult
from modlora.errors import DataError
from modlora.io import parse_json, read_regular_file


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
        text = read_regular_file(path, follow_symlinks=True).decode()
    except OSError as exc:
        raise DataError(f"cannot read label file {path}: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            raw = parse_json(text)
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
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
