"""Child process for the fault tests: one ``modlora`` command line, with a fault at a chosen point of a build.

usage: python fault_child.py MODE N ARGS...   (ARGS: the command line after ``modlora``)
MODE: none | hold_step (in the N-th optimizer step of an expert, counted over every expert trained: print "ready"
      and wait for a line on stdin; meanwhile the parent sends SIGINT or starts a second build) | hold_write (the same
      while writing the N-th expert's files, after the config, before the weights) | fsize (once the N-th expert is
      stored, copy the manifest to LIBRARY.json.before next to the library, then cap every file this process writes
      at 1 KiB with RLIMIT_FSIZE: the next expert's weights fail with EFBIG, as on a full disk).
The exit status is the command's.
"""

from __future__ import annotations

import resource
import signal
import sys
from pathlib import Path

import modlora.build.multitrain as multitrain
import modlora.library.store as store
from modlora.cli import main

mode, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
count = {"n": 0}


def _reached() -> bool:
    count["n"] += 1
    return count["n"] == n


def _hold() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


if mode == "hold_step":
    real_step = multitrain.StackedAdamW.step

    def step(self, lr, rows):
        for _ in rows:  # one count per expert's optimizer step
            if _reached():
                _hold()
        return real_step(self, lr, rows)
    multitrain.StackedAdamW.step = step
elif mode == "hold_write":
    real_write = store.write_adapter_files

    def write(adapter, directory):
        if _reached():
            (directory / store.ADAPTER_CONFIG).write_text("{}")   # a half-written expert directory
            _hold()
        real_write(adapter, directory)
    store.write_adapter_files = write
elif mode == "fsize":
    real_add = store.ExpertLibrary.add

    def add(self, name, adapter, **kwargs):
        entry = real_add(self, name, adapter, **kwargs)
        if _reached():
            Path(f"{self.path}.json.before").write_bytes((self.path / store.MANIFEST).read_bytes())
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails (EFBIG), never kills
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return entry
    store.ExpertLibrary.add = add
elif mode != "none":
    raise SystemExit(f"unknown mode {mode!r}")

sys.exit(main(argv))
