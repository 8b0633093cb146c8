"""Shared fixtures: a tiny randomly initialised Llama and a character-level tokenizer."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modlora.library.adapters import LoraSpec

SHARED_DATA = Path(os.environ.get("MODLORA_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with ChatML special tokens (vocab 100)."""
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", bos_token="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_llama(vocab_size: int = 100, seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights (fp32, eval mode)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def save_scaled(model: torch.nn.Module, directory: Path, factor: float) -> Path:
    """``model`` with its 2-D weights scaled by ``factor``, saved with the character tokenizer as an HF directory."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(factor)
    model.save_pretrained(directory)
    make_char_tokenizer().save_pretrained(directory)
    return directory


def save_sharp_tiny_model(directory: Path) -> Path:
    """:func:`save_tiny_model` with the 2-D weights scaled ×8, so that greedy text varies from token to token (the
    served-model tests compare texts)."""
    return save_scaled(make_tiny_llama(), directory, 8.0)


SERVED_SPEC = LoraSpec(rank=4, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj", "gate_proj"))
"""The served-model tests' experts: rank 4 on q_proj, v_proj and gate_proj."""


def save_served_library(root: Path, tasks: tuple[str, ...] = ("task0", "task1", "task2"),
                        metrics: Callable[[int], dict[str, float]] | None = None) -> Path:
    """``root/model`` (:func:`save_sharp_tiny_model`) and ``root/lib``: expert ``e{i}`` on ``tasks[i]``, random rank-4
    factors (seed i, std 0.4) of :data:`SERVED_SPEC`, with ``metrics(i)`` if given. Returns ``root``."""
    from modlora.library.adapters import random_adapter
    from modlora.library.store import ExpertLibrary
    from modlora.models import load_base_model

    save_sharp_tiny_model(root / "model")
    lm = load_base_model(str(root / "model"), device="cpu")
    lib = ExpertLibrary.create(root / "lib", lm.info)
    for i, task in enumerate(tasks):
        lib.add(f"e{i}", random_adapter(lm.model, SERVED_SPEC, seed=i, std=0.4), tasks=[task],
                metrics=metrics(i) if metrics else None)
    return root


@contextlib.contextmanager
def served_engine(model_dir: Path, library: Path, **options: object) -> Iterator[object]:
    """A :class:`~modlora.serve.BackgroundServer` over an engine on ``model_dir`` and ``library`` (``options``:
    :class:`~modlora.serve.EngineOptions` fields); ``srv.engine`` is the engine. Stopped on exit."""
    from modlora.models import load_base_model
    from modlora.serve import BackgroundServer, Engine, EngineOptions, create_app

    engine = Engine(load_base_model(str(model_dir), device="cpu"), library, EngineOptions(**options)).start()
    try:
        with BackgroundServer(create_app(engine)) as srv:
            srv.engine = engine
            yield srv
    finally:
        engine.stop()


def save_tiny_model(directory: Path) -> Path:
    """A tiny Llama + the character tokenizer saved as a local HF model directory (what ``--model`` takes)."""
    make_tiny_llama(seed=0).save_pretrained(directory)
    make_char_tokenizer().save_pretrained(directory)
    return directory


def write_sni_task(directory: Path, name: str, letter: str, n: int = 20) -> None:
    """An SNI task file ``name.json``: inputs ``{letter}{j}``, output ``{letter}{letter}``."""
    import json

    inst = [{"id": f"{name}-{j}", "input": f"{letter}{j}", "output": [letter * 2]} for j in range(n)]
    (directory / f"{name}.json").write_text(json.dumps({"Definition": [f"Do {letter}."], "Instances": inst}))


def make_library_template(root: Path) -> Path:
    """A two-expert library (rank 2 on q,v; experts ``e1``/``e2`` on tasks ``t1``/``t2``) to copy and damage."""
    from modlora.library.adapters import LoraSpec, random_adapter
    from modlora.library.store import ExpertLibrary
    from modlora.models import model_identity

    model = make_tiny_llama()
    spec = LoraSpec(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))
    lib = ExpertLibrary.create(root, model_identity(model, "tiny"))
    lib.add("e1", random_adapter(model, spec, seed=1), tasks=["t1"], metrics={"loss": 1.0})
    lib.add("e2", random_adapter(model, spec, seed=2), tasks=["t2"])
    return root


def fresh_copy(template: Path, tmp: Path) -> Path:
    """``template`` copied to ``tmp/lib`` (replacing an earlier copy)."""
    import shutil

    dst = tmp / "lib"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(template, dst)
    return dst


@pytest.fixture
def char_tokenizer() -> PreTrainedTokenizerFast:
    return make_char_tokenizer()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
