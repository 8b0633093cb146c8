"""Tables for people: a wide table splits into column groups that fit the terminal, every cell whole."""

from __future__ import annotations

import io

from rich.console import Console

from modlora.tables import print_split_table


def _render(width: int, columns: list[str], rows: list[list[str]]) -> list[str]:
    out = io.StringIO()
    print_split_table(Console(width=width, file=out), "scores", columns, rows, right=columns[1:])
    return out.getvalue().splitlines()


def test_wide_table_splits_into_groups_that_fit_with_every_cell_whole():
    columns = ["row"] + [f"benchmark set {i}" for i in range(9)] + ["held-out SNI Rouge-L"]
    rows = [[name] + [f"{10 * i + j:.1f} ± 11.{j}" for i in range(10)]
            for j, name in enumerate(["base", "private/phatgoose", "mbc-params/arrow"])]
    lines = _render(80, columns, rows)
    text = "\n".join(lines)
    assert max(len(line) for line in lines) <= 80
    assert text.count("┏") == text.count("┓") > 1  # several tables, none cropped at the right edge
    assert "scores (1/" in text
    for row in rows:
        assert text.count(f"│ {row[0]} ") == text.count("┏")  # the key column repeats, on one line
        for cell in row[1:]:
            assert cell in text  # every cell whole


def test_narrow_table_stays_one_table():
    lines = _render(80, ["expert", "weight"], [["cluster0", "0.5"], ["cluster1", "0.5"]])
    text = "\n".join(lines)
    assert text.count("┏") == 1 and "(1/" not in text and "cluster1" in text


def test_cells_and_headers_are_text_not_markup():
    """A row key with options (``private/arrow[top_k=4]``) or a header in brackets shows as written."""
    text = "\n".join(_render(80, ["row", "[b]x[/b]"], [["private/arrow[top_k=4]", "[red]1[/red]"]]))
    assert "private/arrow[top_k=4]" in text and "[b]x[/b]" in text and "[red]1[/red]" in text


def test_every_folding_table_shows_names_as_written():
    """Expert and task names in brackets stay whole in any :func:`folding_table` (library, cluster, LoraHub and
    evaluation tables), and a styled cell is still a :class:`rich.text.Text`."""
    from rich.text import Text

    from modlora.tables import folding_table

    table = folding_table("experts", ["name", "tasks"])
    table.add_row("[draft]expert", Text("bold", style="bold"))
    out = io.StringIO()
    Console(width=80, file=out).print(table)
    assert "[draft]expert" in out.getvalue() and "bold" in out.getvalue()
