"""prepare_model: every reuse method runs on a tiny library; oracle equals the expert merged alone."""

from __future__ import annotations

import json

import pytest
import torch

from modlora.errors import OptionError, RoutingError
from modlora.library.adapters import LoraSpec, merge_adapter, random_adapter
from modlora.library.store import ExpertLibrary
from modlora.models import LoadedModel, model_identity
from modlora.reuse.methods import REGISTRY
from modlora.reuse.prepare import prepare_model

from .conftest import make_char_tokenizer, make_tiny_llama

SPEC = LoraSpec(rank=2, alpha=4, dropout=0.0)


@pytest.fixture
def setup(tmp_path):
    model = make_tiny_llama(seed=0)
    tok = make_char_tokenizer()
    lm = LoadedModel(model, tok, model_identity(model, "tiny"), "memory")
    data = tmp_path / "sni"
    data.mkdir()
    lib = ExpertLibrary.create(tmp_path / "lib", lm.info)
    for i, task in enumerate(["task1_a", "task2_b", "task3_c"]):
        inst = [{"id": f"{task}-{j}", "input": f"{task[-1]}{j}", "output": [task[-1] * 2]} for j in range(20)]
        (data / f"{task}.json").write_text(json.dumps({"Definition": [f"Task {task}"], "Instances": inst}))
        lib.add(f"e{i}", random_adapter(model, SPEC, seed=i, std=0.2), tasks=[task],
                training={"max_prompt_tokens": 64, "max_target_tokens": 8})
    return lm, lib, data


def _options(method: str, data) -> dict:
    """Small, valid options for every method of the registry (top-k 2 where there is one)."""
    names = set(REGISTRY.get(method).option_defaults())
    wanted = {"top_k": 2, "task_dir": str(data), "examples_per_expert": 4, "steps": 2}
    return {k: v for k, v in wanted.items() if k in names}


@pytest.mark.parametrize("method", [m for m in REGISTRY.names() if m != "allocation"])  # Poly/MHR: test_poly
def test_every_method_runs_and_restores(setup, method):
    lm, lib, data = setup
    ids = torch.randint(3, 90, (2, 10))
    with torch.no_grad():
        base = lm.model(ids).logits
        rm = prepare_model(lm, lib, method, _options(method, data))
        out = rm(ids, tasks=["task1_a", "task3_c"]).logits
        assert out.shape == base.shape and torch.isfinite(out).all()
        if method != "base":
            assert (out - base).abs().max() > 1e-4
        rm.restore()
        torch.testing.assert_close(lm.model(ids).logits, base, rtol=1e-5, atol=1e-5)


def test_oracle_equals_single_expert(setup):
    lm, lib, data = setup
    ids = torch.randint(3, 90, (2, 10))
    with torch.no_grad():
        rm = prepare_model(lm, lib, "oracle")
        out = rm(ids, tasks=["task2_b", "task2_b"]).logits
        rm.restore()
        merge_adapter(lm.model, lib.get("e1"))
        ref = lm.model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(RoutingError, match="needs each example's task"):
        prepare_model(lm, lib, "oracle")(ids)


def test_bad_options(setup):
    lm, lib, _ = setup
    with pytest.raises(RoutingError, match="top_k=5 exceeds"):
        prepare_model(lm, lib, "arrow", {"top_k": 5})
    for method in ("phatgoose", "tp"):
        with pytest.raises(RoutingError, match="top_k=4 exceeds"):
            prepare_model(lm, lib, method, {"top_k": 4})
    with pytest.raises(OptionError, match="no option"):
        prepare_model(lm, lib, "mu", {"top_k": 2})
    with pytest.raises(OptionError, match="temperature"):
        prepare_model(lm, lib, "arrow", {"temperature": 1e-300})
    with pytest.raises(RoutingError, match="unknown method"):
        prepare_model(lm, lib, "magic")


def test_cli_route_explain_and_merge(tmp_path, capsys):
    from peft import PeftModel

    from modlora.cli import main
    from modlora.models import load_base_model

    model_dir = tmp_path / "tiny"
    make_tiny_llama(seed=0).save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    lm = load_base_model(str(model_dir), device="cpu")
    lib = ExpertLibrary.create(tmp_path / "lib", lm.info)
    for i in range(3):
        lib.add(f"e{i}", random_adapter(lm.model, SPEC, seed=i, std=0.2))
    assert main(["route", str(lib.path), "--prompt", "hello", "--model", str(model_dir), "--route-top-k", "2",
                 "--max-new-tokens", "3", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "e0" in out and "entropy" in out.lower()
    assert main(["merge", str(lib.path), "--method", "mu-delta", "--out", str(tmp_path / "mu")]) == 0
    peft_model = PeftModel.from_pretrained(make_tiny_llama(seed=0), tmp_path / "mu").eval()
    ids = torch.randint(3, 90, (1, 8))
    with torch.no_grad():
        ref = peft_model(ids).logits
        rm = prepare_model(lm, lib, "mu-delta")
        torch.testing.assert_close(rm(ids).logits, ref, rtol=1e-4, atol=1e-5)
    assert main(["route", str(lib.path), "--prompt", "x", "--model", str(model_dir), "--route-top-k", "9"]) == 2
    assert "exceeds the number of experts" in capsys.readouterr().err


def test_cli_eval_suites_and_report(tmp_path, capsys):
    from modlora.cli import main
    from modlora.models import load_base_model

    model_dir = tmp_path / "tiny"
    make_tiny_llama(seed=0).save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    lm = load_base_model(str(model_dir), device="cpu")
    data = tmp_path / "data"
    (data / "sni" / "tasks").mkdir(parents=True)
    (data / "eval").mkdir()
    lib = ExpertLibrary.create(tmp_path / "lib", lm.info)
    for i, task in enumerate(["task1_a", "task2_b"]):
        inst = [{"id": f"{task}-{j}", "input": f"{task[-1]}{j}", "output": [task[-1] * 2]} for j in range(20)]
        (data / "sni" / "tasks" / f"{task}.json").write_text(json.dumps({"Definition": ["Do."], "Instances": inst}))
        lib.add(f"e{i}", random_adapter(lm.model, SPEC, seed=i, std=0.2), tasks=[task])
    rows = [{"query": f"Q{i}:", "choices": [" yes", " no"], "gold": i % 2} for i in range(6)]
    (data / "eval" / "boolq.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--model", str(model_dir), "--library", str(lib.path), "--data", str(data)]
    assert main(["eval", "--suite", "choice", "--tasks", "boolq", "--route-top-k", "2", "--out", str(tmp_path / "c.json")]
                + common) == 0
    assert main(["eval", "--suite", "indist", "--limit", "2", "--max-new-tokens", "3", "--route-top-k", "2", "--out",
                 str(tmp_path / "i.json")] + common) == 0
    res = json.loads((tmp_path / "i.json").read_text())
    assert set(res["tasks"]) == {"task1_a", "task2_b"} and "loss" in res["tasks"]["task1_a"]["metrics"]
    assert 0 <= res["routing"]["accuracy"]["overall"] <= 1
    assert main(["eval", "--suite", "indist", "--method", "oracle", "--limit", "2", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "o.json")] + common) == 0
    assert main(["report", str(tmp_path / "c.json"), str(tmp_path / "i.json"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert main(["eval", "--suite", "choice", "--method", "oracle"] + common) == 2
    assert "only applies to --suite indist" in capsys.readouterr().err


def test_cli_train_from_flat_file(tmp_path):
    from modlora.cli import main

    model_dir = tmp_path / "tiny"
    make_tiny_llama(seed=0).save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    flat = tmp_path / "flat.jsonl"
    flat.write_text("\n".join(json.dumps({"task_name": "echo", "source": f"w{i}", "target": f"w{i}"})
                              for i in range(30)) + "\n")
    args = ["train", str(tmp_path / "lib"), "echo", "--flat", str(flat), "--model", str(model_dir), "--steps", "2",
            "--batch-size", "4", "--max-val", "2", "--max-prompt-tokens", "32", "--max-target-tokens", "4"]
    assert main(args) == 0
    assert ExpertLibrary(tmp_path / "lib").tasks("echo") == ["echo"]
    assert main(args) == 2  # exists already, without --overwrite
    assert main(args[:2] + ["missing"] + args[3:]) == 2  # unknown task: clear error, exit 2


def test_experts_with_different_targets_and_ranks_in_one_routed_model():
    """Each layer routes among the experts that adapt it: uniform mixing of outputs equals merging each expert's
    ΔW with weight 1/(number of experts adapting that layer)."""
    from modlora.library.adapters import LoraAdapter
    from modlora.reuse.routing import ArrowRouter, route

    model = make_tiny_llama(seed=0)
    a = random_adapter(model, LoraSpec(rank=2, alpha=4, target_modules=("q_proj", "v_proj")), seed=1, std=0.2)
    b = random_adapter(model, LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "k_proj", "o_proj")), seed=2,
                       std=0.2)
    ids = torch.randint(3, 90, (2, 9))
    with torch.no_grad():
        routed = route(model, {"a": a, "b": b}, "uniform")
        out = routed(input_ids=ids).logits
        routed.restore()
        for ad in (a, b):
            for m in ad.modules:
                share = 0.5 if m.endswith("q_proj") else 1.0
                merge_adapter(model, LoraAdapter(ad.spec, {m: ad.A[m]}, {m: ad.B[m]}), weight=share)
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # top_k = 2 is capped to 1 on layers adapted by a single expert
        fresh = make_tiny_llama(seed=0)
        r2 = route(fresh, {"a": a, "b": b}, ArrowRouter(top_k=2))
        assert torch.isfinite(r2(input_ids=ids).logits).all()
        r2.restore()
        with pytest.raises(RoutingError, match="exceeds the number of experts"):
            route(fresh, {"a": a, "b": b}, ArrowRouter(top_k=3))


def _share_library(lm, root, mode: str) -> ExpertLibrary:
    """A ``--share`` library: ``shared`` on every task, ``cluster0`` (task1, task2) and ``cluster1`` (task3)."""
    from modlora.library.shared_expert import ShareInfo
    lib = ExpertLibrary.create(root / f"share-{mode}", lm.info)
    tasks = {"shared": ["task1_a", "task2_b", "task3_c"], "cluster0": ["task1_a", "task2_b"], "cluster1": ["task3_c"]}
    for i, (name, its) in enumerate(tasks.items()):
        lib.add(name, random_adapter(lm.model, SPEC, seed=10 + i, std=0.2), tasks=its)
    lib.save_meta("share", ShareInfo("shared", mode, 0.25, ("cluster0", "cluster1")).to_dict())  # type: ignore[arg-type]
    return lib


def test_residual_share_library_applies_shared_on_every_token(setup, tmp_path):
    """Residual: the shared ΔW on every token plus the method over the cluster experts only (brute force: the
    experts merged into a copy of the base); restore() gives back the base bit-exactly."""
    import copy

    from modlora.reuse.routing import ArrowRouter, route
    lm, _, _ = setup
    lib = _share_library(lm, tmp_path, "residual")
    ids = torch.randint(3, 90, (2, 10))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with torch.no_grad():
        rm = prepare_model(lm, lib, "oracle")
        out = rm(ids, tasks=["task2_b", "task3_c"]).logits
        rm.restore()
        for row, cluster in enumerate(("cluster0", "cluster1")):
            ref_model = copy.deepcopy(lm.model)
            merge_adapter(ref_model, lib.get("shared"))
            merge_adapter(ref_model, lib.get(cluster))
            torch.testing.assert_close(out[row], ref_model(ids[row:row + 1]).logits[0], rtol=1e-4, atol=1e-5)

        rm = prepare_model(lm, lib, "arrow", {"top_k": 1})
        assert rm.routed.expert_names == ["cluster0", "cluster1"]
        out = rm(ids).logits
        rm.restore()
        ref_model = copy.deepcopy(lm.model)
        merge_adapter(ref_model, lib.get("shared"))
        ref = route(ref_model, {n: lib.get(n) for n in ("cluster0", "cluster1")}, ArrowRouter(top_k=1))(input_ids=ids)
        torch.testing.assert_close(out, ref.logits, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    with pytest.raises(RoutingError, match="applied on every token"):
        prepare_model(lm, lib, "arrow", {"top_k": 1, "experts": ("shared", "cluster0")})
    with pytest.raises(RoutingError, match="top_k=3 exceeds"):  # a failed prepare leaves the base as it was
        prepare_model(lm, lib, "arrow", {"top_k": 3})
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_warm_share_library_routes_over_cluster_experts(setup, tmp_path):
    """Warm start: nothing is applied on every token; methods see the cluster experts only, unless ``experts``
    names the shared one."""
    from modlora.reuse.routing import ArrowRouter, route
    lm, _, _ = setup
    lib = _share_library(lm, tmp_path, "warm")
    ids = torch.randint(3, 90, (2, 10))
    with torch.no_grad():
        rm = prepare_model(lm, lib, "arrow", {"top_k": 1})
        assert rm.routed.expert_names == ["cluster0", "cluster1"] and rm.shared is None
        out = rm(ids).logits
        rm.restore()
        ref = route(lm.model, {n: lib.get(n) for n in ("cluster0", "cluster1")}, ArrowRouter(top_k=1))
        torch.testing.assert_close(out, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        ref.restore()
        rm = prepare_model(lm, lib, "arrow", {"top_k": 1, "experts": ("shared", "cluster1")})
        assert rm.routed.expert_names == ["shared", "cluster1"]
        rm.restore()
        lib.add("later", lib.get("cluster0"))  # added after the build: routed too (every expert but the shared one)
        rm = prepare_model(lm, lib, "arrow", {"top_k": 1})
        assert rm.routed.expert_names == ["cluster0", "cluster1", "later"]
        rm.restore()


def test_share_record_round_trips_and_bad_records_are_refused(setup, tmp_path):
    from modlora.errors import LibraryError
    from modlora.library.shared_expert import ShareInfo
    lm, plain, _ = setup
    lib = _share_library(lm, tmp_path, "residual")
    assert ShareInfo.of(ExpertLibrary(lib.path)) == ShareInfo("shared", "residual", 0.25, ("cluster0", "cluster1"))
    assert ShareInfo.of(plain) is None and ShareInfo.of({"e": plain.get("e0")}) is None
    legacy = {"expert": "shared", "mode": "warm-start", "fraction": 0.2, "experts": ["cluster0"]}
    assert ShareInfo.from_dict(legacy).mode == "warm"  # written before the residual mode existed
    for bad, field in [({**legacy, "mode": "cold"}, "mode"), ({**legacy, "experts": ["shared"]}, "experts"),
                       ({**legacy, "expert": 3}, "expert"), ({**legacy, "fraction": "x"}, "fraction")]:
        lib.save_meta("share", bad)
        with pytest.raises(LibraryError, match=rf"share-residual/meta/share.json: field '{field}'"):
            prepare_model(lm, lib, "arrow", {"top_k": 1})


def test_merge_export_of_a_residual_library_holds_the_shared_part(setup, tmp_path, capsys):
    """``modlora merge`` over a residual library: Σ w ΔW over the cluster experts plus ΔW_shared, exactly."""
    from modlora.cli import main
    from modlora.library.adapters import load_adapter
    lm, _, _ = setup
    lib = _share_library(lm, tmp_path, "residual")
    assert main(["merge", str(lib.path), "--method", "linear", "--out", str(tmp_path / "m")]) == 0
    out = load_adapter(tmp_path / "m")
    parts = [lib.get(n) for n in ("shared", "cluster0", "cluster1")]
    for m in out.modules:
        ref = parts[0].delta_weight(m) + 0.5 * (parts[1].delta_weight(m) + parts[2].delta_weight(m))
        torch.testing.assert_close(out.delta_weight(m), ref, rtol=1e-4, atol=1e-6)
