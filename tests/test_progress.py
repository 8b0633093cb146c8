"""Progress in a pipe or a file: whole plain lines, no carriage returns or escape codes; nothing when disabled."""

from __future__ import annotations

import io

from modlora.progress import LineProgress, progress_bar


def test_piped_progress_is_plain_lines_with_a_last_line():
    out = io.StringIO()
    bar = progress_bar(total=5, desc="training", unit="step", file=out)
    assert isinstance(bar, LineProgress)
    for i in range(5):
        bar.update(1)
        bar.set_postfix(loss=1.0 / (i + 1))         # refreshes on every call: must not print a line per call
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0].startswith("training: 0/5 step") and lines[-1].startswith("training: 5/5 step")
    assert "loss=0.2" in lines[-1] and len(lines) == 2
    out = io.StringIO()
    assert list(progress_bar(range(3), desc="tasks", unit="task", file=out)) == [0, 1, 2]
    assert out.getvalue().splitlines()[-1].startswith("tasks: 3/3 task")


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    with progress_bar(total=3, desc="jobs", unit="job", enabled=False, file=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""
