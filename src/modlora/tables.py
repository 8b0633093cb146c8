"""Tables for people: rich tables that never split a name, readable at 80 columns, on a terminal and in files."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Column, Table
from rich.text import Text

_UNBOUNDED = 1 << 16  # a width no table reaches: measuring cells against it never clips them


class TextTable(Table):
    """A :class:`rich.table.Table` whose string cells are plain text, never console markup (an expert, task or row
    name such as ``arrow[top_k=4]`` or ``[draft]`` is shown as written; pass a :class:`rich.text.Text` to style a
    cell), and which never splits a word of a cell to fit the width it is printed at.

    A text column wraps between words only; a right-aligned (numeric) column does not wrap at all; headers wrap
    between words. Each column is given at least its longest word (numeric: its widest cell; the first, key, column:
    its widest cell unless that takes more than half the width), the widest columns give way first, and when even
    these least widths do not fit side by side the table is printed as several tables ("title (1/N)", …) that each
    repeat the key column and take, in order, as many of the other columns as fit. A key column too wide to share the
    line with any other column is printed whole, wider than the console."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(r) if isinstance(r, str) else r for r in renderables), **kwargs)

    def _least_and_whole(self, console: Console, options: ConsoleOptions, column: Column) -> tuple[int, int]:
        """Content widths of ``column`` with padding: the least that splits no word, and its widest line."""
        header = Measurement.get(console, options, column.header)
        cells = [Measurement.get(console, options, cell) for cell in column.cells]
        whole = max([header.maximum, *(m.maximum for m in cells)])
        numeric = column.justify == "right"
        least = max([header.minimum, *((m.maximum if numeric else m.minimum) for m in cells)])
        padding = self._get_padding_width(column._index)
        return least + padding, whole + padding

    def _frame_width(self, n_columns: int) -> int:
        """Border characters of one line of a table with ``n_columns`` columns."""
        return bool(self.box) * (n_columns - 1) + (2 if self.box and self.show_edge else 0)

    def _column_groups(self, least: Sequence[int], width: int) -> list[list[int]]:
        """Indices of the columns other than the key (column 0) in order, split into groups whose least widths fit
        ``width`` beside the key column."""
        groups: list[list[int]] = [[]]
        for i in range(1, len(least)):
            group = groups[-1]
            if group and least[0] + sum(least[j] for j in group) + least[i] + self._frame_width(len(group) + 2) > width:
                groups.append(group := [])
            group.append(i)
        return groups

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.columns or self.width is not None:
            yield from super().__rich_console__(console, options)
            return
        unbounded = options.update_width(_UNBOUNDED)
        spans = [self._least_and_whole(console, unbounded, column) for column in self.columns]
        least, whole = [s[0] for s in spans], [s[1] for s in spans]
        if whole[0] <= options.max_width // 2:
            least[0] = whole[0]  # row keys stay on one line unless very long
        groups = self._column_groups(least, options.max_width) if len(self.columns) > 1 else [[]]
        for part, group in enumerate(groups, 1):
            chosen = [0, *group]
            widths = _shrink([whole[i] for i in chosen], [least[i] for i in chosen],
                             options.max_width - self._frame_width(len(chosen)))
            part_table = copy.copy(self)
            part_table.columns = [
                dataclasses.replace(self.columns[i], _index=j, width=w - self._get_padding_width(self.columns[i]._index))
                for j, (i, w) in enumerate(zip(chosen, widths, strict=True))]
            if isinstance(self.title, str):  # a title wraps at the width even when the console soft-wraps
                title = f"{self.title} ({part}/{len(groups)})" if len(groups) > 1 else self.title
                part_table.title = Text(title, style=self.title_style or "table.title", no_wrap=False, overflow="fold")
            needed = sum(widths) + self._frame_width(len(chosen))
            yield from Table.__rich_console__(part_table, console, options.update_width(max(needed, options.max_width)))


def _shrink(widths: list[int], least: list[int], room: int) -> list[int]:
    """``widths`` narrowed to fit ``room`` by taking one character at a time from the widest column still wider
    than its ``least`` (the result may stay wider than ``room`` when the least widths alone are wider)."""
    widths = list(widths)
    while sum(widths) > room:
        shrinkable = [i for i, (w, m) in enumerate(zip(widths, least, strict=True)) if w > m]
        if not shrinkable:
            break
        widths[max(shrinkable, key=widths.__getitem__)] -= 1
    return widths


def text_table(title: str, columns: Sequence[str], *, right: Sequence[str] = ()) -> TextTable:
    """A :class:`TextTable` with ``columns`` (headers shown as written); the numeric columns named in ``right`` are
    right-aligned and never wrap."""
    table = TextTable(title=title, title_justify="left")
    for col in columns:
        table.add_column(Text(col), justify="right" if col in right else "left")
    return table


def print_split_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                      right: Sequence[str] = ()) -> None:
    """Print ``rows`` as one :func:`text_table`: one table when its columns fit ``console.width`` side by side, else
    several that each repeat the first (key) column (see :class:`TextTable`)."""
    table = text_table(title, columns, right=right)
    for row in rows:
        table.add_row(*row)
    console.print(table)
