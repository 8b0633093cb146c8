"""Progress for people: a tqdm bar on a terminal; in a pipe or a log file, whole plain lines instead.

A tqdm bar redraws itself with carriage returns and escape codes, which in a file become one unreadable
200-character line. :func:`progress_bar` gives the bar on a terminal (or in a notebook) and, elsewhere, a
:class:`LineProgress`: the same counts, rate and estimate as one line at the start, at most one every
:data:`LINE_INTERVAL_S` seconds, and one when the work ends.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm

LINE_INTERVAL_S = 30.0
"""Seconds between two progress lines in a pipe or a file."""


class LineProgress(tqdm):  # type: ignore[misc]
    """tqdm for a pipe or a file: whole lines ``desc: n/total unit [elapsed<remaining, rate, postfix]``, never a
    carriage return or an escape code; the last one when the bar closes, whether or not it would be left."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("mininterval", LINE_INTERVAL_S)
        kwargs.update(bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
                      dynamic_ncols=False, ncols=None, ascii=True)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None, *, final: bool = False) -> bool:
        # tqdm passes a message only to erase or move a bar (nothing to do in a file); set_postfix refreshes on
        # every call, so lines are spaced here, not only by tqdm's own interval
        now = self._time()
        if msg is None and (final or now - getattr(self, "_line_t", -float("inf")) >= self.mininterval):
            self._line_t = now
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()
        return True

    def close(self) -> None:
        if not self.disable:
            self.display(final=True)          # the last line
            self.sp = None                    # tqdm's close then draws nothing more (as for its GUI bars)
        super().close()


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", enabled: bool = True, leave: bool = False, file: IO[str] | None = None) -> tqdm:
    """A tqdm bar over ``iterable`` (or ``total`` steps) on a terminal, a :class:`LineProgress` in a pipe or file;
    nothing at all when not ``enabled``."""
    out = file if file is not None else sys.stderr
    interactive = "ipykernel" in sys.modules or bool(getattr(out, "isatty", lambda: False)())
    cls = tqdm if interactive else LineProgress
    return cls(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, file=out,
               dynamic_ncols=True)
