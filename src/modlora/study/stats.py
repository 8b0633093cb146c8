"""Statistics of a study's results across tasks: paired differences of two result rows (per task, the row's mean
minus the reference row's on the same examples; mean ± standard error across tasks), the held-out tasks by group,
and the mean of per-set means with its standard error propagated."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modlora.evaluation.results import mean_and_stderr


def mean_of_means(cells: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Mean of ``(mean, stderr)`` cells with the standard error propagated: ``sqrt(Σ se²) / n``."""
    return {"mean": sum(m for m, _ in cells) / len(cells),
            "stderr": math.sqrt(sum(se * se for _, se in cells)) / len(cells)}


@dataclass(frozen=True)
class PairedDifference:
    """Row ``row`` minus row ``reference`` on each task both scored: Rouge-L for ``part`` ``heldout`` or ``indist``,
    acc_norm per benchmark set for ``choice``; the mean difference ± its standard error across the ``n`` tasks
    (sd / √n, ddof 1)."""

    row: str
    reference: str
    part: str
    mean: float
    stderr: float
    n: int

    @property
    def z(self) -> float:
        """The difference in standard errors (NaN when the standard error is 0)."""
        return self.mean / self.stderr if self.stderr > 0 else math.nan

    def cell(self) -> str:
        """``+3.2 ± 1.1 (+2.9 s.e.)`` in Rouge-L (or accuracy) points."""
        z = f" ({self.z:+.1f} s.e.)" if not math.isnan(self.z) else ""
        return f"{100 * self.mean:+.1f} ± {100 * self.stderr:.1f}{z}"


PAIRED_METRICS = {"heldout": "rougeL", "indist": "rougeL", "choice": "acc_norm"}
"""The per-task score :func:`paired_difference` pairs, by part of a result row."""


def paired_difference(results: Mapping[str, Any], row: str, reference: str, part: str = "heldout",
                      tasks: Collection[str] | None = None) -> PairedDifference | None:
    """:class:`PairedDifference` of two result rows over the tasks both scored (and in ``tasks`` when given);
    ``None`` with fewer than two."""
    a = results["rows"].get(row, {}).get(part) or {}
    b = results["rows"].get(reference, {}).get(part) or {}
    both = set(a) & set(b)
    common = sorted(both if tasks is None else both & set(tasks))
    if len(common) < 2:
        return None
    metric = PAIRED_METRICS[part]
    mean, stderr = mean_and_stderr([a[t][metric] - b[t][metric] for t in common])
    return PairedDifference(row, reference, part, mean, stderr, len(common))


def heldout_group_tasks(results: Mapping[str, Any]) -> dict[str, list[str]]:
    """``results["heldout_groups"]`` ({task: group}) inverted: the held-out tasks of each group (empty: no groups)."""
    groups: dict[str, list[str]] = {}
    for task, group in (results.get("heldout_groups") or {}).items():
        groups.setdefault(group, []).append(task)
    return groups
