"""Tables for people: rich tables whose cells fold instead of being cut, readable at 80 columns and in files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


class TextTable(Table):
    """A :class:`rich.table.Table` whose string cells are plain text, never console markup: an expert, task or row
    name such as ``arrow[top_k=4]`` or ``[draft]`` is shown as written (rich would read ``[...]`` as a style tag
    and drop it). Pass a :class:`rich.text.Text` to style a cell."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(r) if isinstance(r, str) else r for r in renderables), **kwargs)


def folding_table(title: str, columns: Sequence[str], *, right: Sequence[str] = ()) -> TextTable:
    """A :class:`TextTable` with ``columns``; every cell folds (a long name wraps onto more lines, never
    ``clust…``), text columns keep a readable minimum width, and the numeric columns named in ``right`` are
    right-aligned."""
    table = TextTable(title=title, title_justify="left")
    for col in columns:
        if col in right:
            table.add_column(Text(col), justify="right", overflow="fold")
        else:
            table.add_column(Text(col), overflow="fold", min_width=8)
    return table


def _column_width(header: str, cells: Sequence[str]) -> int:
    """Room a column needs without cutting a cell: its widest cell or header word, plus padding and border."""
    return max([len(c) for c in cells] + [len(w) for w in header.split()] + [1]) + 3


def print_split_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                      right: Sequence[str] = ()) -> None:
    """Print ``rows`` as one :func:`folding_table`, or, when their cells do not fit ``console.width`` side by side,
    as several tables that each repeat the first (key) column and take, in order, as many of the other columns as
    fit; every cell is whole (headers wrap at spaces), so a table of many columns stays readable at 80 columns."""
    key_width = _column_width(columns[0], [r[0] for r in rows]) + 1
    groups: list[list[int]] = [[]]
    used = key_width
    for i in range(1, len(columns)):
        width = _column_width(columns[i], [r[i] for r in rows])
        if groups[-1] and used + width > console.width:
            groups.append([])
            used = key_width
        groups[-1].append(i)
        used += width
    for part, group in enumerate(groups, 1):
        suffix = f" ({part}/{len(groups)})" if len(groups) > 1 else ""
        table = folding_table(title + suffix, [columns[0], *(columns[i] for i in group)], right=right)
        table.columns[0].no_wrap = key_width <= console.width // 2  # keys stay on one line unless very long
        for row in rows:
            table.add_row(row[0], *(row[i] for i in group))
        console.print(table)
