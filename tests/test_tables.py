"""Tables for people: a wide table splits into column groups that fit the terminal, every cell whole, and no
expert or task name is ever split over lines."""

from __future__ import annotations

import io

from rich.console import Console

from modlora.tables import print_split_table, text_table

TASK = "task1580_eqasc-perturbed_question_generation"


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


def test_every_text_table_shows_names_as_written():
    """Expert and task names in brackets stay whole in any :func:`text_table` (library, cluster, LoraHub and
    evaluation tables), and a styled cell is still a :class:`rich.text.Text`."""
    from rich.text import Text

    table = text_table("experts", ["name", "tasks"])
    table.add_row("[draft]expert", Text("bold", style="bold"))
    out = io.StringIO()
    Console(width=80, file=out).print(table)
    assert "[draft]expert" in out.getvalue() and "bold" in out.getvalue()


def _library_tables() -> list[object]:
    """``modlora show``-like tables: a private library's long expert names beside seven numeric columns, and a
    clustered library's long task lists."""
    numbers = ("r", "mods", "params", "size", "val", "steps", "tok/s")
    private = text_table("runs/private — base SmolLM2 (2 experts)", ("expert", *numbers), right=numbers)
    private.add_row(TASK, "4", "120", "1,234,567", "1234 KiB", "1.234", "100", "1234")
    private.add_row("task1_alpha", "4", "120", "1,234,567", "12 KiB", "1.234", "100", "987")
    clustered = text_table("runs/mbc — base SmolLM2 (2 experts)", ("expert", "tasks", *numbers), right=numbers)
    clustered.add_row("cluster0", f"{TASK}, task1581_eqasc-perturbed_answer_generation (+2)", "4", "120",
                      "1,234,567", "1234 KiB", "1.234", "100", "1234")
    clustered.add_row("cluster1", "task1_alpha, task2_beta", "4", "120", "1,234,567", "12 KiB", "1.234", "100", "987")
    return [private, clustered]


def _whole_on_one_line(text: str, names: list[str]) -> bool:
    return all(any(name in line for line in text.splitlines()) for name in names)


def test_names_are_never_split_at_80_columns(monkeypatch):
    """At 80 columns, on a terminal (COLUMNS=80) and piped (COLUMNS unset: rich's 80), every expert and task name is
    on one line, the table is no wider than 80 columns and every number is whole."""
    names = [TASK, "task1581_eqasc-perturbed_answer_generation", "cluster0", "cluster1", "task1_alpha", "task2_beta"]
    for columns in ("80", None):
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", columns)
        out = io.StringIO()
        console = Console(file=out)
        assert console.width == 80
        for table in _library_tables():
            console.print(table)
        text = out.getvalue()
        assert max(len(line) for line in text.splitlines()) <= 80
        assert _whole_on_one_line(text, names), text
        assert all(cell in text for cell in ("1,234,567", "1234 KiB", "12 KiB", "1.234", "987"))


def test_a_list_of_names_wraps_between_names():
    """A cell listing names wraps between them when the column is narrowed, never inside one."""
    table = text_table("clusters", ["cluster", "experts"], right=["cluster"])
    experts = [f"{TASK}_{i}" for i in range(3)]
    table.add_row("0", ", ".join(experts))
    out = io.StringIO()
    Console(width=80, file=out).print(table)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and _whole_on_one_line(text, experts), text


def test_a_name_wider_than_the_console_is_printed_whole():
    """The last resort: a key column too wide to share the line is printed whole, wider than the console (whose
    soft wrap leaves the line to the terminal), rather than split."""
    name = "x" * 70
    out = io.StringIO()
    table = text_table("experts", ["expert", "steps"], right=["steps"])
    table.add_row(name, "100")
    Console(width=60, file=out, soft_wrap=True).print(table)
    assert name in out.getvalue() and "100" in out.getvalue()


def test_long_title_wraps_at_the_width_on_a_soft_wrapping_console():
    """The CLI's console soft-wraps (so plain lines are never cut); a table's title still wraps at the width."""
    out = io.StringIO()
    table = text_table(f"/a/long/path/to/runs/cpu-medium-eva/private — base SmolLM2-135M ({TASK} and 23 more)",
                       ["expert", "r"], right=["r"])
    table.add_row(TASK, "4")
    Console(width=80, file=out, soft_wrap=True).print(table)
    lines = out.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert f"│ {TASK} " in out.getvalue()
