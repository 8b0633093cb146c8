"""Tables for people: rich tables whose cells fold instead of being cut, readable at 80 columns and in files."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table


def folding_table(title: str, columns: Sequence[str], *, right: Sequence[str] = ()) -> Table:
    """A :class:`rich.table.Table` with ``columns``; every cell folds (a long name wraps onto more lines, never
    ``clust…``), text columns keep a readable minimum width, and the numeric columns named in ``right`` are
    right-aligned."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        if col in right:
            table.add_column(col, justify="right", overflow="fold")
        else:
            table.add_column(col, overflow="fold", min_width=8)
    return table
