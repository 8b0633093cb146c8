"""Run the paper's study at a configured scale: ``python benchmarks/study.py benchmarks/configs/cpu-small.json``.

Writes ``runs/<name>/results.json``, ``results.md``, ``results.png``, ``paired.png`` (the paired differences), the
MBC cluster plot and one JSON per result row; re-running resumes (finished experts and rows are reused).
``"train_tasks": "ALL"`` means every task in the SNI directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from modlora.cli import quiet_libraries
from modlora.data import default_data_dir, sni_task_files
from modlora.study.config import StudyConfig
from modlora.study.run import run_study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path, help="study config JSON (see benchmarks/configs)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default runs/<name>)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    ap.add_argument("--data", type=Path, default=None, help="data directory with sni/tasks and sni/heldout")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = json.loads(args.config.read_text())
    data = args.data or default_data_dir()
    if raw.get("train_tasks") == "ALL":
        raw["train_tasks"] = sorted(sni_task_files(data / "sni" / "tasks"))
    cfg = StudyConfig.from_mapping(raw, args.config)
    run_study(cfg, args.out or Path("runs") / cfg.name, device=args.device, data_dir=data)


if __name__ == "__main__":
    main()
