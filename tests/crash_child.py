"""Child process for the crash tests: builds a private library and SIGKILLs itself at a chosen point.

usage: python crash_child.py MODEL_DIR FLAT_FILE LIB_DIR MODE N
MODE: none | before_rename (after the expert files are written, before the directory rename) |
      after_rename (expert directory in place, manifest not yet written) | manifest_tmp (manifest temp file written,
      not renamed) | train (inside the N-th optimizer step of an expert).  N: which occurrence (1-based) triggers the kill.
"""

from __future__ import annotations

import os
import signal
import sys

import modlora.build.multitrain as multitrain
import modlora.io as mio
import modlora.library.store as library
from modlora.build.strategies import BuildConfig, build_private_library
from modlora.build.training import TrainConfig  # noqa: E402
from modlora.data import PromptLimits  # noqa: E402

model_dir, flat, lib_dir, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
count = {"n": 0}


def _tick() -> None:
    count["n"] += 1
    if count["n"] == n:
        os.kill(os.getpid(), signal.SIGKILL)


if mode == "before_rename":
    real_write = library.write_adapter_files

    def write(adapter, directory):
        real_write(adapter, directory)
        _tick()
    library.write_adapter_files = write
elif mode == "after_rename":
    real_json = library.atomic_write_json

    def write_json(path, obj):
        _tick()
        real_json(path, obj)
    library.atomic_write_json = write_json
elif mode == "manifest_tmp":
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("library.json"):
            _tick()
        real_replace(src, dst)
    mio.os.replace = replace
elif mode == "train":
    real_step = multitrain.StackedAdamW.step

    def step(self, lr, rows):
        for _ in rows:  # one tick per expert's optimizer step
            _tick()
        return real_step(self, lr, rows)
    multitrain.StackedAdamW.step = step

tasks = ["upper", "lower", "first", "last"]
cfg = BuildConfig(model=model_dir, device="cpu", flat_file=flat, train=TrainConfig(steps=2, batch_size=4, lr=1e-3),
                  max_val=4, limits=PromptLimits(64, 8), experts_per_job=2)
build_private_library(lib_dir, tasks, cfg, progress=False)
