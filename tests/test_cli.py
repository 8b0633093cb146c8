"""Every CLI command end to end on a tiny model, bad options refused before any model loads, tables that fold
instead of cutting names, and a toy method added through the registry alone."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from modlora.build.strategies import BuildLock
from modlora.cli import main
from modlora.library.adapters import LoraSpec, random_adapter
from modlora.library.experts import ExpertSet
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.reuse.merging import MergeResult
from modlora.reuse.methods import REGISTRY, MethodOptions, StaticMethod, option
from modlora.reuse.prepare import prepare_model

from .conftest import save_tiny_model, write_sni_task

SPEC = LoraSpec(rank=2, alpha=4, dropout=0.0)
TASKS = ("task1_alpha", "task2_beta", "task3_gamma")
LONG = "cluster_with_a_rather_long_expert_name_number"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny HF model directory, a data root (sni/tasks, sni/heldout, eval/) and a 3-expert library."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny"
    save_tiny_model(model_dir)
    data = root / "data"
    for sub in ("sni/tasks", "sni/heldout", "eval"):
        (data / sub).mkdir(parents=True)
    for t in TASKS:
        write_sni_task(data / "sni" / "tasks", t, t[-1])
    write_sni_task(data / "sni" / "heldout", "task9_zeta", "z")
    rows = [{"query": f"Q{i}:", "choices": [" yes", " no"], "gold": i % 2} for i in range(4)]
    (data / "eval" / "boolq.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    he = {"task_id": "HumanEval/0", "prompt": "def f(x):\n", "entry_point": "f", "canonical_solution": "    return x\n",
          "test": "def check(candidate):\n    assert candidate(1) == 1\n"}
    (data / "eval" / "humaneval.jsonl").write_text(json.dumps(he) + "\n")
    lm = load_base_model(str(model_dir), device="cpu")
    lib = ExpertLibrary.create(root / "lib", lm.info)
    for i, t in enumerate(TASKS):
        name = LONG if i == 2 else f"e{i}"
        lib.add(name, random_adapter(lm.model, SPEC, seed=i, std=0.2), tasks=[t],
                training={"max_prompt_tokens": 48, "max_target_tokens": 4})
    return {"root": root, "model": model_dir, "data": data, "lib": lib.path}


def _m(world: dict[str, Path]) -> list[str]:
    return ["--model", str(world["model"])]


def test_library_commands(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    lib = str(world["lib"])
    assert main(["tasks", "--data", str(world["data"])]) == 0
    assert "task2_beta" in capsys.readouterr().out
    assert main(["show", lib]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert LONG in "".join(line.split("│")[1].strip() for line in out.splitlines() if line.count("│") > 2)
    assert main(["show", lib, "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"e0", "e1", LONG}
    assert main(["verify", lib]) == 0
    assert main(["export", lib, "e0", str(tmp_path / "e0")]) == 0
    assert main(["export", lib, "e0", str(tmp_path / "e0")]) == 2  # exists, no --overwrite
    copy = tmp_path / "copy"
    ExpertLibrary.create(copy, ExpertLibrary(lib).base_model)
    assert main(["import", str(copy), str(tmp_path / "e0"), "--name", "again", "--tasks", "task1_alpha"]) == 0
    assert ExpertLibrary(copy).tasks("again") == ["task1_alpha"]
    assert main(["remove", str(copy), "again"]) == 0
    assert ExpertLibrary(copy).expert_names() == []


def test_train_build_and_cluster(world, tmp_path, capsys):
    common = _m(world) + ["--data", str(world["data"]), "--steps", "1", "--batch-size", "2", "--max-val", "2",
                          "--max-prompt-tokens", "32", "--max-target-tokens", "4"]
    assert main(["train", str(tmp_path / "one"), "task1_alpha"] + common) == 0
    capsys.readouterr()
    with BuildLock(tmp_path / "one"):   # a build is filling the library: a train into it is refused, nothing changes
        before = (tmp_path / "one" / "library.json").read_bytes()
        assert main(["train", str(tmp_path / "one"), "task2_beta"] + common) == 2
        assert (tmp_path / "one" / "library.json").read_bytes() == before
    assert "another build is writing into this library" in capsys.readouterr().err
    for init in ("eva", "gradient"):
        assert main(["train", str(tmp_path / init), "task1_alpha", "--init", init] + common) == 0
    cut = [("12" if common[i - 1] == "--max-prompt-tokens" else a) for i, a in enumerate(common)]
    assert main(["train", str(tmp_path / "cut"), "task1_alpha", "--truncate", "input"] + cut) == 0
    record = ExpertLibrary(tmp_path / "cut").entry("task1_alpha").training
    assert (record["truncate"], record["max_prompt_tokens"], record["max_target_tokens"]) == ("input", 12, 4)
    assert record["prompts_cut"] > 0 and record["definitions_cut"] <= record["prompts_cut"]
    flat = tmp_path / "flat.jsonl"
    flat.write_text("\n".join([json.dumps({"task_name": "echo", "source": f"w{i}", "target": f"w{i}"})
                               for i in range(12)] + ["{broken", "[1]"]) + "\n")
    assert main(["train", str(tmp_path / "flat"), "echo", "--flat", str(flat)] + common) == 0
    assert "skipped 2 malformed record(s): line 13" in capsys.readouterr().out
    assert ExpertLibrary(tmp_path / "one").expert_names() == ["task1_alpha"]
    assert main(["build", str(tmp_path / "priv"), "--strategy", "private", "--tasks", *TASKS] + common) == 0
    assert sorted(ExpertLibrary(tmp_path / "priv").expert_names()) == sorted(TASKS)
    assert main(["build", str(tmp_path / "priv-eva"), "--init", "eva", "--tasks", *TASKS] + common) == 0
    assert ExpertLibrary(tmp_path / "priv-eva").load_meta("build_config")["init"] == "eva"
    capsys.readouterr()
    # a re-run with other settings is refused, showing the difference; --retrain-changed retrains
    other = [("2" if a == "1" and i and common[i - 1] == "--steps" else a) for i, a in enumerate(common)]
    assert main(["build", str(tmp_path / "priv"), "--tasks", *TASKS] + other) != 0
    err = capsys.readouterr().err
    assert "train.steps: 1 -> 2" in err and "--retrain-changed" in err
    assert main(["build", str(tmp_path / "priv"), "--tasks", *TASKS, "--retrain-changed"] + other) == 0
    assert all(e.metrics["steps"] == 2 for e in ExpertLibrary(tmp_path / "priv").entries.values())
    capsys.readouterr()
    # a misspelt task is refused before anything trains, with the closest names suggested
    assert main(["build", str(tmp_path / "bad"), "--tasks", "task1_alpha", "task2_bet"] + common) == 2
    assert "did you mean task2_beta" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    for strategy in ("poly", "mhr"):
        assert main(["build", str(tmp_path / strategy), "--strategy", strategy, "--skills", "2", "--tasks", *TASKS,
                     "--rank", "2"] + common) == 0
        assert ExpertLibrary(tmp_path / strategy).load_meta("poly_allocation")["heads"] == (2 if strategy == "mhr"
                                                                                            else 1)
    # the three tasks' texts are the same ("Do a.", inputs a0, a1, ...): semantic --k auto says so and builds nothing
    # (K = 1 would silently be a shared library)
    assert main(["build", str(tmp_path / "sem"), "--strategy", "semantic", "--k", "auto", "--share", "--tasks",
                 *TASKS] + common) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no cluster structure" in err and "--k N" in err and "--strategy shared" in err
    assert not (tmp_path / "sem" / "library.json").exists()
    assert main(["build", str(tmp_path / "sem-res"), "--strategy", "semantic", "--k", "1", "--share", "--share-mode",
                 "residual", "--tasks", *TASKS] + common) == 0
    residual = ExpertLibrary(tmp_path / "sem-res")
    assert residual.load_meta("share")["mode"] == "residual" and residual.entry("cluster0").training["residual_on"]
    assert main(["route", str(tmp_path / "sem-res"), "--prompt", "a1", "--route-top-k", "1", "--max-new-tokens", "2"]
                + _m(world)) == 0
    # in-distribution routing accuracy counts only routed experts: the shared one holds every task but is not routed
    assert main(["eval", "--suite", "indist", "--library", str(tmp_path / "sem-res"), "--method", "arrow", "--route-top-k",
                 "1", "--limit", "1", "--max-new-tokens", "1", "--data", str(world["data"]),
                 "--out", str(tmp_path / "sem-res-indist.json")] + _m(world)) == 0
    assert json.loads((tmp_path / "sem-res-indist.json").read_text())["routing"]["accuracy"]["overall"] == 1.0
    assert main(["cluster", str(tmp_path / "priv"), "--k", "2", "--plot", str(tmp_path / "c.png"),
                 "--out", str(tmp_path / "c.json")]) == 0
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["k"] == 2 and saved["features"] == "delta"


def test_cluster_features_auto_k_and_labels(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    lib = str(world["lib"])
    labels = tmp_path / "families.csv"
    labels.write_text("task,family\ntask1_alpha,a\ntask2_beta,a\ntask3_gamma,b\n")  # keyed by task name
    for features in ("params", "delta", "semantic"):
        capsys.readouterr()
        assert main(["cluster", lib, "--features", features, "--k", "auto", "--auto-k", "silhouette", "--labels",
                     str(labels), "--data", str(world["data"])] + _m(world)) == 0
        out = capsys.readouterr().out
        assert f"({features} features" in out and "ARI" in out and "purity" in out
        assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out
        saved = ExpertLibrary(lib).load_meta("clustering")
        assert saved["features"] == features and saved["criterion"] == "silhouette"
        # three random experts: either K = 2 or a plain "no cluster structure" verdict, never a silent K
        assert saved["k"] == 2 or (saved["no_structure"] and "no cluster structure" in out)
    assert main(["cluster", lib, "--k", "2", "--labels", str(labels), "--centre"]) == 0
    assert "K = 2 (delta features" in capsys.readouterr().out


def test_reuse_commands(world, tmp_path, capsys):
    lib = str(world["lib"])
    assert main(["generate", lib, "--prompt", "a1", "--max-new-tokens", "2", "--route-top-k", "2"] + _m(world)) == 0
    assert main(["route", lib, "--prompt", "a1", "--max-new-tokens", "2", "--method", "centroid", "--route-top-k", "2",
                 "--data", str(world["data"]), "--examples-per-expert", "2", "--explain"] + _m(world)) == 0
    assert "per layer" in capsys.readouterr().out
    for method in REGISTRY.names(static=True):
        extra = ["--weights", "1,0.5,0.25"] if method != "mu" and method != "mu-delta" else []
        assert main(["merge", lib, "--method", method, "--out", str(tmp_path / method)] + extra) == 0, method
        assert (tmp_path / method / "adapter_model.safetensors").is_file()
        assert json.loads((tmp_path / method / "modlora_merge.json").read_text())["rank"] >= 1
    assert main(["export-arrow", lib, "--prompt", "a1", "--route-top-k", "2", "--out", str(tmp_path / "ea")]
                + _m(world)) == 0
    assert main(["lorahub", lib, "--task", "task1_alpha", "--shots", "2", "--budget", "3", "--data",
                 str(world["data"]), "--out", str(tmp_path / "hub")] + _m(world)) == 0
    saved = json.loads((tmp_path / "hub" / "lorahub_weights.json").read_text())
    assert set(saved["weights"]) == {"e0", "e1", LONG}
    assert "LoraHub on 2 shots" in capsys.readouterr().out


def test_eval_suites_default_to_base_and_report(world, tmp_path, capsys):
    data = ["--data", str(world["data"])]
    # no --library: the base model alone (the documented default)
    assert main(["eval", "--suite", "choice", "--tasks", "boolq", "--out", str(tmp_path / "base.json")]
                + data + _m(world)) == 0
    assert json.loads((tmp_path / "base.json").read_text())["method"] == "base"
    lib = ["--library", str(world["lib"])]
    assert main(["eval", "--suite", "sni", "--limit", "2", "--max-new-tokens", "2", "--route-top-k", "2", "--out",
                 str(tmp_path / "sni.json")] + lib + data + _m(world)) == 0
    routing = json.loads((tmp_path / "sni.json").read_text())["routing"]
    assert set(routing["expert_usage"]) == {"task9_zeta"} and routing["entropy_per_layer"]
    assert sum(routing["expert_usage"]["task9_zeta"].values()) == pytest.approx(1.0)
    assert main(["eval", "--suite", "indist", "--limit", "2", "--max-new-tokens", "2", "--route-top-k", "2", "--out",
                 str(tmp_path / "in.json")] + lib + data + _m(world)) == 0
    indist = json.loads((tmp_path / "in.json").read_text())
    assert 0 <= indist["routing"]["accuracy"]["overall"] <= 1 and indist["routing"]["accuracy"]["n"] == 6
    assert indist["config"]["method_options"]["top_k"] == 2   # the method's options are in the results
    out = capsys.readouterr().out
    assert "loss=" in out and "loss=2" not in out.replace("loss=2.", "")  # the loss is not shown ×100
    assert main(["eval", "--suite", "code", "--tasks", "humaneval", "--max-new-tokens", "4", "--route-top-k", "2",
                 "--out", str(tmp_path / "code.json")] + lib + data + _m(world)) == 0
    assert set(json.loads((tmp_path / "code.json").read_text())["routing"]["expert_usage"]) == {"humaneval"}
    assert main(["eval", "--suite", "sni", "--limit", "1", "--max-new-tokens", "1", "--method", "mu", "--out",
                 str(tmp_path / "mu.json")] + lib + data + _m(world)) == 0
    assert "routing" not in json.loads((tmp_path / "mu.json").read_text())  # a static merge routes nothing
    assert main(["report", str(tmp_path / "base.json"), str(tmp_path / "sni.json"), str(tmp_path / "in.json"),
                 "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "routing_entropy.png").is_file()
    assert (tmp_path / "rep" / "expert_usage_arrow.png").is_file() or any((tmp_path / "rep").glob("expert_usage*"))


@pytest.mark.parametrize("argv, message", [
    (["eval", "--suite", "sni", "--method", "arrow"], "needs --library"),
    (["eval", "--suite", "sni", "--limit", "0"], "positive integer"),
    (["eval", "--suite", "sni", "--library", "LIB", "--method", "mu", "--route-top-k", "2"], "does not apply"),
    (["eval", "--suite", "sni", "--library", "LIB", "--route-temperature", "1e-300"], "temperature"),
    (["eval", "--suite", "sni", "--library", "LIB", "--route-temperature", "abc"], "--route-temperature"),
    (["cluster", "LIB", "--k", "abc"], "--k"),
    (["cluster", "LIB", "--k", "1"], "an integer >= 2 or 'auto'"),
    (["cluster", "LIB", "--k", "9"], "exceeds the number of experts"),
    (["cluster", "LIB", "--features", "weights"], "--features"),
    (["cluster", "LIB", "--auto-k", "gap"], "--auto-k"),
    (["cluster", "LIB", "--labels", "missing.csv"], "--labels"),
    (["cluster", "LIB", "--k-min", "5", "--k-max", "3"], "--k-min 5 is larger than --k-max 3"),
    (["route", "LIB", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["route", "LIB", "--prompt", "", "--raw"], "--prompt is empty"),
    (["route", "LIB", "--prompt", "x", "--method", "mu", "--explain"], "--explain needs a per-token router"),
    (["route", "LIB", "--prompt", "bad \udcff bytes"], "--prompt: not valid Unicode"),
    (["merge", "LIB", "--method", "linear", "--weights", "a,b", "--out", "X"], "--weights"),
    (["merge", "LIB", "--method", "ties", "--density", "0", "--out", "X"], "density"),
    (["build", "OUT", "--k", "0"], "--k"),
    (["build", "OUT", "--strategy", "poly", "--heads", "2"], "--heads > 1 is MHR"),
    (["build", "OUT", "--strategy", "mhr", "--heads", "3"], "must divide the LoRA rank"),
    (["build", "OUT", "--strategy", "private", "--share"], "--share applies to --strategy mbc and semantic"),
    (["build", "OUT", "--strategy", "mbc", "--share", "--share-fraction", "0.7"], "leaves nothing"),
    (["build", "OUT", "--strategy", "mbc", "--share-mode", "residual"], "--share-mode applies with --share"),
    (["build", "OUT", "--strategy", "mbc", "--share", "--share-mode", "cold"], "--share-mode"),
    (["build", "OUT", "--init", "kaiming"], "--init"),
    (["build", "OUT", "--max-prompt-tokens", "4"], "--max-prompt-tokens: expected an integer >= 8"),
    (["train", "OUT", "task1_alpha", "--truncate", "right"], "--truncate"),
    (["build", "OUT", "--strategy", "mhr", "--init", "eva"], "Poly/MHR skills start from seeds"),
    (["build", "OUT", "--device", "quantum:7"], "argument --device: expected cpu, cuda, cuda:N, mps, xpu or xpu:N"),
    (["train", "OUT", "task1_alpha", "--device", "cuda:99"], "device 'cuda:99': "),
    (["eval", "--suite", "sni", "--library", "LIB", "--device", "xpu:7"], "device 'xpu:7': "),
    (["generate", "LIB", "--prompt", "x", "--model", "/proc/1/no-model"], "argument --model: /proc/1/no-model"),
])
def test_bad_options_refused_before_loading(world, tmp_path, capsys, monkeypatch, argv, message):
    def no_model(*_a, **_k):
        raise AssertionError("the model must not load for a bad option")

    monkeypatch.setattr("modlora.models.load_base_model", no_model)
    argv = [str(world["lib"]) if a == "LIB" else str(tmp_path / a) if a in ("X", "OUT") else a for a in argv]
    assert main(argv + ["--data", str(world["data"])] * (argv[0] in ("eval", "route"))) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_long_prompt_refused(world, capsys):
    assert main(["route", str(world["lib"]), "--prompt", "x" * 600, "--raw", "--max-new-tokens", "2"]
                + _m(world)) == 2
    assert "exceeds the model's context of 512 tokens" in capsys.readouterr().err


# ------------------------------------------------------------------------- a new method: one class, one line
@dataclass(frozen=True)
class HalfOptions(MethodOptions):
    scale: float = option(0.5, "factor on the first expert's ΔW", type=float)


class HalfOfFirst(StaticMethod):
    """A toy static method: ``scale · ΔW`` of the first expert."""

    name = "half-first"
    summary = "a scaled copy of the first expert (test)"
    Options = HalfOptions

    def combine(self, experts: ExpertSet) -> MergeResult:
        from modlora.reuse.merging import weighted_combination
        o = self.options
        assert isinstance(o, HalfOptions)
        weights = [o.scale] + [0.0] * (len(experts) - 1)
        return MergeResult.exact(weighted_combination(experts, weights), {"method": self.name})


def test_a_new_method_is_one_class_and_one_registry_line(world, tmp_path):
    registry = REGISTRY.with_method(HalfOfFirst)
    assert "half-first" in registry.names(static=True) and "half-first" not in REGISTRY.names()
    lm = load_base_model(str(world["model"]), device="cpu")
    lib = ExpertLibrary(world["lib"])
    ids = torch.randint(3, 90, (1, 6))
    with torch.no_grad():
        rm = prepare_model(lm, lib, "half-first", {"scale": 0.5}, registry=registry)
        out = rm(ids).logits
        rm.restore()
        ref = prepare_model(lm, lib, "linear", {"weights": (0.5, 0.0, 0.0)})
        torch.testing.assert_close(out, ref(ids).logits)
        ref.restore()
    # the CLI offers it, with its option as a flag, on every command that takes a method
    assert main(["merge", str(world["lib"]), "--method", "half-first", "--scale", "0.25", "--out",
                 str(tmp_path / "half")], registry=registry) == 0
    assert main(["eval", "--suite", "sni", "--library", str(world["lib"]), "--method", "half-first", "--limit", "1",
                 "--max-new-tokens", "1", "--data", str(world["data"])] + _m(world), registry=registry) == 0


def test_demo_end_to_end_on_a_tiny_model(world, tmp_path, shared_data, capsys):
    """``modlora demo`` with its data flags on the real task files (the embedded model runs in ``make demo``)."""
    from modlora.study.main_job import DEMO_TASKS

    argv = ["demo", "--out", str(tmp_path / "demo"), "--data", str(shared_data), "--steps", "1", "--tasks",
            *DEMO_TASKS[:4]] + _m(world)
    assert main(argv) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {"base", "private/mu", "private/arrow[top_k=4]", "private/arrow-centred[top_k=4]",
            "mbc/arrow[top_k=3]"} <= set(results["rows"])
    out = capsys.readouterr().out
    assert "results (%, mean ± s.e.)" in out and "adjusted Rand index" in out
    words = " ".join(out.split())
    assert "what this run shows" in words and "own expert top-1 (chance)" in words
    summary = out[out.index("what this run shows"):]
    assert "held-out related − μ" in summary and "held-out unrelated − base" in summary, summary
    assert set(results["heldout_groups"].values()) == {"related", "unrelated"}
    assert results["config"]["init"] == "eva" and results["config"]["dtype"] == "bfloat16"
    ari = results["partitions"]["mbc"]["ari"]       # the clustered-libraries table and the summary line agree
    assert ari is not None and f"adjusted Rand index {ari:.2f}" in words
    assert "paired differences across tasks" in words
    table = out[out.index("results (%, mean"):]
    assert "infer" in table and "tok/s ┃" in table  # the last column is shown whole, not cropped at 80 columns
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in table


def test_model_loading_shows_no_library_progress_bars(world, capsys):
    """transformers' weight-loading bar is library chatter: the CLI keeps it out of its output."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process
    assert main(["generate", str(world["lib"]), "--prompt", "a1", "--max-new-tokens", "1", "--route-top-k", "2"]
                + _m(world)) == 0
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err + captured.out


# ---------------------------------------------------------------------------------------------------- --help
def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_help_fits_80_columns(monkeypatch):
    from modlora.cli import build_parser

    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    widths = {name: max(map(len, p.format_help().splitlines())) for name, p in
              {"modlora": parser, **_commands(parser)}.items()}
    assert max(widths.values()) <= 80, {name: w for name, w in widths.items() if w > 80}


HELP_IN_A_FRESH_PROCESS = """
import argparse, contextlib, io, sys
from modlora.cli import build_parser
parser = build_parser()
commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
for argv in [["--help"], *([name, "--help"] for name in commands)]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        parser.parse_args(argv)
print(sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers"}))
"""


def test_help_loads_neither_torch_nor_transformers():
    """``modlora --help`` and every ``modlora COMMAND --help`` stay fast: building the parser (the registry's
    methods and options included) imports neither torch nor transformers."""
    run = subprocess.run([sys.executable, "-c", HELP_IN_A_FRESH_PROCESS], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
