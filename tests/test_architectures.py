"""Any causal LM: tiny random models of eight architectures, made from ``transformers`` configs at test time.

Per architecture: the default targets are its attention projections (fused ``qkv_proj`` / ``query_key_value`` /
``c_attn`` adapted as one layer; GPT-2's ``Conv1D`` layers loaded as linear layers with ``fan_in_fan_out``); two
experts train (2 steps) into a library; Arrow and μ route over it; a TIES merge and μ are exported; an exported
expert and the exported μ load with PEFT's ``PeftModel.from_pretrained`` on the checkpoint as saved (``Conv1D`` and
all) with the same logits as modlora's (max |Δ| ≤ 1e-5, float32); the server answers one request as
``prepare_model`` computes it. Bad targets are refused before any training, naming the model's linear layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

from modlora.build.pipeline import ExpertPlan, train_task_experts
from modlora.build.training import TrainConfig
from modlora.data import PromptLimits, load_sni_tasks
from modlora.errors import AdapterError, ModelLoadError
from modlora.library.adapters import LoraAdapter, LoraSpec, resolve_spec
from modlora.library.store import ExpertLibrary
from modlora.models import load_base_model
from modlora.reuse.merging import ties_merge
from modlora.reuse.prepare import prepare_model
from modlora.reuse.routing import route

from .conftest import save_scaled, write_sni_task

VOCAB = 100
_COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "max_position_embeddings": 256, "pad_token_id": 2, "bos_token_id": 1,
           "eos_token_id": 2}

ARCHITECTURES: dict[str, tuple[transformers.PretrainedConfig, tuple[str, ...], bool]] = {
    # model type: (tiny config, default LoRA targets, fan_in_fan_out)
    "llama": (transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **_COMMON),
              ("k_proj", "o_proj", "q_proj", "v_proj"), False),
    "mistral": (transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **_COMMON),
                ("k_proj", "o_proj", "q_proj", "v_proj"), False),
    "qwen2": (transformers.Qwen2Config(num_key_value_heads=2, **_COMMON), ("k_proj", "o_proj", "q_proj", "v_proj"),
              False),
    "gemma": (transformers.GemmaConfig(num_key_value_heads=2, head_dim=8, **_COMMON),
              ("k_proj", "o_proj", "q_proj", "v_proj"), False),
    "phi": (transformers.PhiConfig(**_COMMON), ("dense", "k_proj", "q_proj", "v_proj"), False),
    "phi3": (transformers.Phi3Config(num_key_value_heads=2, **_COMMON), ("o_proj", "qkv_proj"), False),
    "gpt2": (transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=2), ("c_attn",), True),
    "gpt_neox": (transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=2),
                 ("dense", "query_key_value"), False),
}
TASKS = {"task001_alpha": "a", "task002_beta": "b"}
PROMPT = "b7 is"


def save_tiny(kind: str, directory: Path) -> Path:
    """A tiny random model of ``kind`` with the character tokenizer, saved as an HF directory (what ``--model``
    takes). Weights are scaled up so that adapters and routing change the logits visibly."""
    torch.manual_seed(0)
    return save_scaled(AutoModelForCausalLM.from_config(ARCHITECTURES[kind][0]), directory, 4.0)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _peft_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the checkpoint as saved (a GPT-2 keeps its ``Conv1D`` layers) with the adapter loaded by PEFT."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]   # the config has the checkpoint's layout
    peft_model.eval()
    return _logits(peft_model, ids)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    for name, letter in TASKS.items():
        write_sni_task(root, name, letter, n=24)
    return root


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_architecture_end_to_end(kind: str, tmp_path: Path, task_dir: Path) -> None:
    _, targets, fan_in_fan_out = ARCHITECTURES[kind]
    model_dir = save_tiny(kind, tmp_path / kind)
    lm = load_base_model(str(model_dir), device="cpu")
    spec = resolve_spec(lm.model, LoraSpec(dropout=0.0))
    assert (spec.target_modules, spec.fan_in_fan_out) == (targets, fan_in_fan_out)

    # train two experts (2 steps each, together) into a library
    lib = ExpertLibrary.create(tmp_path / "lib", lm.info)
    tasks = load_sni_tasks(task_dir)
    plans = {name: ExpertPlan({name: tasks[name]}, TrainConfig(steps=2, batch_size=4, lr=1e-2)) for name in TASKS}
    train_task_experts(lm, lib, plans, spec=LoraSpec(dropout=0.0), max_val=4, limits=PromptLimits(64, 8),
                       progress=False)
    assert lib.expert_names() == sorted(TASKS) and lib.verify() == []
    expert = lib.get("task002_beta")
    assert expert.spec.target_modules == targets and expert.spec.fan_in_fan_out == fan_in_fan_out
    assert {m.rsplit(".", 1)[-1] for m in expert.modules} == set(targets)
    assert all(float(b.abs().max()) > 0 for b in expert.B.values())     # trained: B moved off zero

    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    base_logits = _logits(lm.model, ids)

    # one expert: modlora's routed layer vs PEFT on the saved checkpoint (Conv1D with fan_in_fan_out for GPT-2)
    lib.export("task002_beta", tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is fan_in_fan_out and config["base_model_name_or_path"] == kind
    with route(lm.model, {"task002_beta": expert}, "uniform") as routed:
        ours = _logits(routed, ids)
    assert float((ours - base_logits).abs().max()) > 1e-4
    assert float((ours - _peft_logits(model_dir, tmp_path / "exported", ids)).abs().max()) <= 1e-5

    # Arrow and μ route / merge over the library; μ exported and loaded by PEFT gives the same logits
    arrow = prepare_model(lm, lib, "arrow", {"top_k": 1})
    try:
        arrow_logits = _logits(arrow, ids)
    finally:
        arrow.restore()
    assert torch.isfinite(arrow_logits).all() and float((arrow_logits - base_logits).abs().max()) > 1e-4
    mu = prepare_model(lm, lib, "mu")
    try:
        mu_logits = _logits(mu, ids)
        assert mu.merged is not None
        mu.merged.save(tmp_path / "mu")
    finally:
        mu.restore()
    torch.testing.assert_close(_logits(lm.model, ids), base_logits, rtol=0, atol=1e-5)   # the base is back
    assert float((mu_logits - _peft_logits(model_dir, tmp_path / "mu", ids)).abs().max()) <= 1e-5

    # a TIES merge exports as a PEFT adapter with the checkpoint's layout
    merged = ties_merge(lib, density=0.5).adapter
    assert merged.spec.fan_in_fan_out == fan_in_fan_out
    merged.save(tmp_path / "ties")
    assert LoraAdapter.load(tmp_path / "ties").modules == expert.modules

    # serve one request: the same greedy text as prepare_model + generate
    _serve_one_request(lm, lib.path)


def _serve_one_request(lm, library: Path) -> None:
    from fastapi.testclient import TestClient

    from modlora.serve import Engine, create_app

    reuse = prepare_model(lm, ExpertLibrary(library), "arrow", {"top_k": 1})
    try:
        enc = lm.tokenizer(PROMPT, return_tensors="pt")
        out = reuse.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=4, do_sample=False,
                             pad_token_id=2, eos_token_id=2)
    finally:
        reuse.restore()
    want = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    engine = Engine(lm, library).start()
    try:
        with TestClient(create_app(engine)) as client:
            r = client.post("/v1/completions", json={"model": "lib", "prompt": PROMPT, "max_tokens": 4,
                                                     "temperature": 0, "routing": {"top_k": 1}})
    finally:
        engine.stop()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want


@pytest.mark.parametrize(("kind", "request_", "message"), [
    ("phi", ("o_proj",), "o_proj: the model (phi) has no linear layer of that name; its linear layers are dense, "
                         "fc1, fc2, k_proj, q_proj, v_proj"),
    ("phi3", ("q_proj", "v_proj"), "its linear layers are down_proj, gate_up_proj, o_proj, qkv_proj"),
    ("gpt2", ("q_proj",), "its linear layers are c_attn, c_fc, c_proj"),
])
def test_bad_targets_are_refused_before_training(kind, request_, message, tmp_path, task_dir) -> None:
    lm = load_base_model(str(save_tiny(kind, tmp_path / kind)), device="cpu")
    lib = ExpertLibrary.create(tmp_path / "lib", lm.info)
    plans = {"task001_alpha": ExpertPlan(load_sni_tasks(task_dir, ["task001_alpha"]), TrainConfig(steps=2))}
    with pytest.raises(AdapterError, match=re.escape(message)):
        train_task_experts(lm, lib, plans, spec=LoraSpec(target_modules=request_), progress=False)
    assert len(lib) == 0


@pytest.mark.parametrize(("kind", "names"), [
    ("llama", ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")),
    ("phi3", ("down_proj", "gate_up_proj", "o_proj", "qkv_proj")),
    ("gpt2", ("c_attn", "c_fc", "c_proj")),
])
def test_all_linear_is_every_linear_layer_but_the_output_layer_as_in_peft(kind, names, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    model_dir = save_tiny(kind, tmp_path / kind)
    lm = load_base_model(str(model_dir), device="cpu")
    spec = resolve_spec(lm.model, LoraSpec(target_modules=("all-linear",)))
    assert spec.target_modules == names
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=2, target_modules="all-linear", fan_in_fan_out=kind == "gpt2"))
    peft_names = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert peft_names == set(names)


def cache_snapshot(cache: Path, repo_id: str, source: Path, commit: str) -> Path:
    """``source``'s files as the Hugging Face cache's snapshot of model repo ``repo_id`` at ``commit`` (``main``
    points to it; files are links into ``blobs/``, as ``hf download`` leaves them): a stand-in for the Hub."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


HUB_CHECK = r"""
import sys, warnings
from pathlib import Path
import torch
from peft import AutoPeftModelForCausalLM
from modlora.library.adapters import LoraSpec, random_adapter
from modlora.library.remote import open_library
from modlora.library.store import ExpertLibrary
from modlora.library.transfer import push
from modlora.models import load_base_model
from modlora.reuse.routing import route

tmp = Path(sys.argv[1])
lm = load_base_model("org/tiny-phi", device="cpu")             # from the cached snapshot, offline
lib = ExpertLibrary.create(tmp / "lib", lm.info)
lib.add("task001_alpha", random_adapter(lm.model, LoraSpec(dropout=0.0), seed=1, std=0.3), tasks=["task001_alpha"])
push(lib, tmp / "pushed")                                        # what a push to hf://org/lib uploads
print("PUSHED", flush=True)
sys.stdin.readline()                                             # the test caches the pushed files as org/lib
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    remote = open_library("hf://org/lib")
assert any("cached snapshot" in str(w.message) for w in caught), [str(w.message) for w in caught]
adapter = remote.get("task001_alpha")
# PEFT 0.21 forwards subfolder= to the base model's from_pretrained too, so the expert's folder is passed whole
from huggingface_hub import snapshot_download
expert_dir = Path(snapshot_download("org/lib")) / "experts" / "task001_alpha"
peft_model = AutoPeftModelForCausalLM.from_pretrained(str(expert_dir))   # its base: "org/tiny-phi", by Hub id
ids = torch.tensor([[5, 6, 7, 8]])
with torch.no_grad(), route(lm.model, {"e": adapter}, "uniform") as routed:
    ours = routed(input_ids=ids).logits
    theirs = peft_model(input_ids=ids).logits
print("MAXDIFF", float((ours - theirs).abs().max()))
try:
    open_library("hf://org/missing")
except Exception as exc:
    print("MISSING", exc)
"""


def test_pushed_expert_names_its_hub_base_and_offline_hf_reads_the_cached_snapshot(tmp_path: Path) -> None:
    """A base loaded by Hub id (here from the Hugging Face cache, offline) is what the pushed expert's
    ``base_model_name_or_path`` names, so ``AutoPeftModelForCausalLM.from_pretrained`` on the expert's folder of the
    pushed repository finds the base and computes modlora's logits; ``hf://`` in offline mode reads the cached snapshot and says so, and a
    repository with no snapshot is refused naming it."""
    cache = tmp_path / "hf-cache"
    cache_snapshot(cache, "org/tiny-phi", save_tiny("phi", tmp_path / "phi"), "1" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "MODLORA_CACHE": str(tmp_path / "mc")}
    proc = subprocess.Popen([sys.executable, "-c", HUB_CHECK, str(tmp_path)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "PUSHED", proc.stderr.read()
    pushed = tmp_path / "pushed"
    config = json.loads((pushed / "experts" / "task001_alpha" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-phi"
    assert config["target_modules"] == ["dense", "k_proj", "q_proj", "v_proj"]
    card = (pushed / "README.md").read_text()
    for line in ("base_model: org/tiny-phi", "pipeline_tag: text-generation", "license: other",
                 "- Muennighoff/natural-instructions"):
        assert line in card
    assert "**Licence:** The licence of these adapters follows the base model org/tiny-phi's licence" in card
    cache_snapshot(cache, "org/lib", pushed, "2" * 40)
    out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, err
    assert float(out.split("MAXDIFF ")[1].split()[0]) <= 1e-5
    assert "HF_HUB_OFFLINE is set and the Hugging Face cache holds no snapshot of org/missing" in out


def test_the_default_models_adapters_name_its_hub_origin(tiny_llama) -> None:
    """The embedded GGUF's experts say ``HuggingFaceTB/SmolLM2-135M-Instruct`` (a Hub id PEFT can load), the
    library records the quantisation, and the card's licence is Apache-2.0 for SNI tasks on that base."""
    from modlora.library.card import card_license
    from modlora.models import EMBEDDED_NAME, BaseModelInfo

    adapter = random_adapter_for(tiny_llama, EMBEDDED_NAME)
    assert adapter.peft_config()["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    info = BaseModelInfo(EMBEDDED_NAME, "s", "w", quantisation="Q4_1")
    assert BaseModelInfo.from_dict(info.to_dict()).quantisation == "Q4_1" and info.hub_id == adapter.peft_config()[
        "base_model_name_or_path"]
    assert "quantisation" not in BaseModelInfo("x", "s", "w").to_dict()       # manifests stay as they were
    assert card_license("HuggingFaceTB/SmolLM2-135M-Instruct", {"task001_alpha"}).license == "apache-2.0"
    assert card_license("HuggingFaceTB/SmolLM2-135M-Instruct", {"my_task"}).license == "other"


def random_adapter_for(model: torch.nn.Module, base_name: str) -> LoraAdapter:
    from modlora.library.adapters import random_adapter
    return random_adapter(model, LoraSpec(rank=2, target_modules=("q_proj",)), base_model_name=base_name)


def test_phi2_recipe_has_the_papers_settings_and_runs_on_a_tiny_random_phi(tmp_path: Path, task_dir: Path) -> None:
    """``benchmarks/configs/phi-2.json``: the paper's Phi-2 settings (rank 4, α 16, dropout 0.05, lr 1e-4, K = 10,
    q/k/v/dense); its CPU smoke run swaps in a tiny random Phi, two tasks and a tiny budget, and trains experts on
    exactly those layers, then routes them with Arrow and merges them with μ."""
    from modlora.study.config import StudyConfig
    from modlora.study.run import run_study

    recipe = StudyConfig.from_json(Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "phi-2.json")
    assert (recipe.model, recipe.lora, recipe.lr, recipe.k) == (
        "microsoft/phi-2", LoraSpec(4, 16.0, 0.05, ("q_proj", "k_proj", "v_proj", "dense")), 1e-4, 10)
    data = tmp_path / "data"
    (data / "sni").mkdir(parents=True)
    (data / "sni" / "tasks").symlink_to(task_dir)
    (data / "sni" / "heldout").mkdir()
    write_sni_task(data / "sni" / "heldout", "task009_zeta", "z", n=10)
    smoke = dataclasses.replace(recipe, model=str(save_tiny("phi", tmp_path / "phi")), dtype=None,
                                train_tasks=sorted(TASKS), steps_per_task=2, batch_size=4, max_prompt_tokens=48,
                                max_target_tokens=4, libraries=["private"], rows=[["private", "mu"],
                                                                                  ["private", "arrow"]],
                                method_options={"arrow": {"top_k": 1}}, heldout_limit=2, indist_limit=2,
                                max_new_tokens=2, choice_tasks=[], gen_batch_size=4)
    res = run_study(smoke, tmp_path / "out", device="cpu", data_dir=data)
    assert set(res["rows"]) == {"private/mu", "private/arrow"}
    lib = ExpertLibrary(tmp_path / "out" / "private")
    for name in lib.expert_names():
        spec = lib.get(name).spec
        assert (spec.rank, spec.alpha, spec.dropout, spec.target_modules) == (4, 16.0, 0.05,
                                                                             ("dense", "k_proj", "q_proj", "v_proj"))


@pytest.mark.parametrize("command", ["train", "build"])
def test_cli_refuses_bad_targets_in_one_line_and_creates_no_library(command, tmp_path, capsys) -> None:
    from modlora.cli import main
    model_dir = save_tiny("phi", tmp_path / "phi")
    data = tmp_path / "data"
    (data / "sni" / "tasks").mkdir(parents=True)
    write_sni_task(data / "sni" / "tasks", "task001_alpha", "a", n=24)
    lib = tmp_path / "lib"
    args = ([command, str(lib), "task001_alpha"] if command == "train"
            else [command, str(lib), "--strategy", "private", "--tasks", "task001_alpha"])
    capsys.readouterr()   # the model's saving above
    code = main(args + ["--model", str(model_dir), "--data", str(data), "--steps", "2",
                        "--targets", "o_proj", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "o_proj: the model (phi) has no linear layer of that name" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not lib.exists()


def test_a_target_keyword_in_a_list_of_names_is_refused_everywhere(tiny_llama, capsys) -> None:
    """``attention`` / ``all-linear`` stand alone: the CLI at parse time, a LoraSpec and target_layers refuse a list
    mixing them with layer names, with the same reason (models.target_request_problem)."""
    from modlora.cli import main
    from modlora.models import target_layers
    reason = "'attention' and 'all-linear' stand alone, not in a list of layer names; got ['attention', 'q_proj']"
    assert main(["train", "LIB", "t", "--targets", "attention,q_proj"]) == 2
    assert reason in capsys.readouterr().err
    with pytest.raises(AdapterError, match=re.escape(f"LoRA field 'target_modules': {reason}")):
        LoraSpec(target_modules=("attention", "q_proj"))
    with pytest.raises(ModelLoadError, match=re.escape(f"LoRA targets: {reason}")):
        target_layers(tiny_llama, ("attention", "q_proj"))
