"""Multi-expert training: together == alone == today's PEFT trainer; shared prefixes are exact; StackedAdamW == AdamW."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modlora.build.multitrain import (
    ExpertData,
    InstalledFactors,
    MultiTrainOptions,
    StackedAdamW,
    default_init,
    mixed_target_loss,
    pack_forwards,
    shared_prefix_length,
    train_experts,
)
from modlora.build.training import TrainConfig, _extract_adapter, seed_everything, train_expert
from modlora.data import Instance, PromptFormatter, PromptLimits, Task, encode_tasks
from modlora.errors import DataError
from modlora.library.adapters import LoraAdapter, LoraSpec, adapted_modules

SPEC = LoraSpec(rank=4, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
RULES = {"upper": str.upper, "first": lambda w: w[0], "rev": lambda w: w[::-1]}


def _task(name: str, n: int = 40) -> Task:
    letters = "abcdefghijkl"
    words = [letters[i % 12] + letters[(3 * i) % 12] + "xyz"[: 1 + i % 3] for i in range(n)]
    return Task(name, f"Apply the rule {name} to the word.", [Instance(f"{name}{i}", w, (RULES[name](w),))
                                                                for i, w in enumerate(words)])


def _data(tok, names=("upper", "first", "rev"), steps=(3, 5, 4)) -> dict[str, ExpertData]:
    fmt = PromptFormatter(tok, PromptLimits(64, 8))
    out = {}
    for name, s in zip(names, steps, strict=True):
        tasks = {name: _task(name)}
        out[name] = ExpertData(encode_tasks(fmt, tasks, "train"), encode_tasks(fmt, tasks, "validation"),
                               TrainConfig(steps=s, batch_size=4, lr=5e-3, warmup_ratio=0.3, seed=3))
    return out


def _assert_same(a: LoraAdapter, b: LoraAdapter, **tol) -> None:
    assert a.modules == b.modules
    for m in a.modules:
        torch.testing.assert_close(a.A[m], b.A[m], **tol)
        torch.testing.assert_close(a.B[m], b.B[m], **tol)


def test_together_equals_alone(tiny_llama, char_tokenizer):
    data = _data(char_tokenizer)
    pad = char_tokenizer.pad_token_id
    tiny_llama.model.embed_tokens.weight.requires_grad_(False)  # flags are restored as they were
    finished = []
    together = train_experts(tiny_llama, data, pad_id=pad, spec=SPEC, progress=False,
                             on_finished=lambda name, res: finished.append((name, res.metrics["steps"])))
    assert finished == [("upper", 3), ("rev", 4), ("first", 5)]  # each leaves as soon as its budget ends
    capped = train_experts(tiny_llama, data, pad_id=pad, spec=SPEC, progress=False,
                           options=MultiTrainOptions(max_tokens_per_forward=200))  # several forwards per step
    for name, d in data.items():
        alone = train_experts(tiny_llama, {name: d}, pad_id=pad, spec=SPEC, progress=False)[name]
        _assert_same(together[name].adapter, alone.adapter, rtol=1e-4, atol=1e-6)
        _assert_same(capped[name].adapter, alone.adapter, rtol=1e-4, atol=1e-6)
        assert together[name].metrics["steps"] == d.config.steps
        assert together[name].metrics["best_val_loss"] == pytest.approx(alone.metrics["best_val_loss"], rel=1e-5)
        assert [h["step"] for h in together[name].history] == list(range(1, d.config.steps + 1))
    # the base model is left untouched
    assert type(tiny_llama.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not tiny_llama.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in tiny_llama.named_parameters() if "embed_tokens" not in n)


def test_matches_peft_trainer(tiny_llama, char_tokenizer):
    """With PEFT's initial factors, the multi-expert trainer reproduces today's one-expert PEFT trainer."""
    data = _data(char_tokenizer, names=("upper", "rev"), steps=(4, 6))
    pad = char_tokenizer.pad_token_id
    lcfg = LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha, lora_dropout=0.0, target_modules=list(SPEC.target_modules),
                      task_type="CAUSAL_LM", bias="none")
    seed_everything(3)
    peft_model = get_peft_model(tiny_llama, lcfg)
    init = _extract_adapter(peft_model, SPEC, None)
    peft_model.unload()
    for d in data.values():
        d.init = init
    together = train_experts(tiny_llama, data, pad_id=pad, spec=SPEC, progress=False)
    for name, d in data.items():
        ref = train_expert(tiny_llama, d.train, d.val, pad_id=pad, spec=SPEC, config=d.config, progress=False)
        _assert_same(together[name].adapter, ref.adapter, rtol=1e-4, atol=1e-6)
        assert together[name].metrics["best_val_loss"] == pytest.approx(ref.metrics["best_val_loss"], rel=1e-5)
        assert together[name].metrics["best_step"] == ref.metrics["best_step"]


def test_stacked_adamw_equals_torch_adamw():
    torch.manual_seed(0)
    params = [torch.randn(3, 4, 5), torch.randn(3, 2)]
    refs = [[p[e].clone().requires_grad_(True) for p in params] for e in range(3)]
    opts = [torch.optim.AdamW(r, lr=0.1 * (e + 1), weight_decay=0.01) for e, r in enumerate(refs)]
    stacked = [p.clone() for p in params]
    opt = StackedAdamW(stacked, weight_decay=0.01)
    for it in range(4):
        grads = [torch.randn_like(p) * 3 for p in params]
        rows = [0, 1, 2] if it < 2 else [0, 2]  # expert 1 finished: its row must not move
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g.clone()
        opt.clip_grad_norm_([1.0, 1.0, 2.0])
        opt.step([0.1, 0.2, 0.3], rows)
        for e in rows:
            for r, g in zip(refs[e], grads, strict=True):
                r.grad = g[e].clone()
            torch.nn.utils.clip_grad_norm_(refs[e], [1.0, 1.0, 2.0][e])
            opts[e].step()
    for e in range(3):
        for p, r in zip(stacked, refs[e], strict=True):
            torch.testing.assert_close(p[e], r.detach(), rtol=1e-5, atol=1e-6)


def test_shared_prefix_is_exact(tiny_llama, char_tokenizer):
    """Prefix-shared loss and gradients equal the unshared computation, on a batch that mixes two experts."""
    fmt = PromptFormatter(char_tokenizer, PromptLimits(64, 8))
    parts = []
    for row, name in enumerate(("upper", "rev")):
        exs = encode_tasks(fmt, {name: _task(name)}, "train")[:3 + row]
        parts.append((row, exs))
    assert all(shared_prefix_length(exs) >= 30 for _, exs in parts)
    modules = adapted_modules(tiny_llama, SPEC.target_modules)
    inits = []
    for seed in (0, 1):  # non-zero B so that the LoRA path matters
        a = default_init(tiny_llama, modules, SPEC, seed)
        inits.append(LoraAdapter(SPEC, a.A, {m: torch.randn_like(b) * 0.1 for m, b in a.B.items()}))
    installed = InstalledFactors(tiny_llama, modules, inits, SPEC)
    try:
        outs = []
        for shared in (False, True):
            for p in installed.params():
                p.grad = None
            res = mixed_target_loss(tiny_llama, installed.slot, parts, pad_id=char_tokenizer.pad_token_id,
                                    shared_prefix=shared)
            res.loss_sums.sum().backward()
            outs.append((res, [p.grad.clone() for p in installed.params()]))
    finally:
        installed.remove()
    (plain, g_plain), (shared, g_shared) = outs
    assert plain.target_counts == shared.target_counts
    assert plain.tokens == shared.tokens
    torch.testing.assert_close(shared.loss_sums, plain.loss_sums, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_shared, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_shared_prefix_training_matches(tiny_llama, char_tokenizer):
    data = _data(char_tokenizer, names=("upper", "first"), steps=(3, 3))
    pad = char_tokenizer.pad_token_id
    plain = train_experts(tiny_llama, data, pad_id=pad, spec=SPEC, progress=False)
    shared = train_experts(tiny_llama, data, pad_id=pad, spec=SPEC, progress=False,
                           options=MultiTrainOptions(shared_prefix=True))
    for name in data:
        _assert_same(shared[name].adapter, plain[name].adapter, rtol=1e-3, atol=1e-5)


def test_packing_keeps_prefix_parts_whole(char_tokenizer):
    """With shared prefixes every expert micro-batch stays one part in one forward (its prefix runs once), and a
    forward of several parts stays within the padded-token cap (prefix pass + suffix pass)."""
    fmt = PromptFormatter(char_tokenizer, PromptLimits(64, 8))
    parts = [(row, encode_tasks(fmt, {name: _task(name)}, "train")[:2 + row])
             for row, name in enumerate(("upper", "rev", "first", "upper"))]
    for cap in (None, 10**6, 150, 1):
        forwards = pack_forwards(parts, cap, shared_prefix=True)
        packed = [part for fwd in forwards for part in fwd]
        assert sorted(packed, key=lambda p: p[0]) == parts  # every part once, unsplit
        for fwd in forwards:
            if cap is not None and len(fwd) > 1:
                prefix = [shared_prefix_length(exs) for _, exs in fwd]
                width = max(max(e.length for e in exs) - n for (_, exs), n in zip(fwd, prefix, strict=True))
                assert len(fwd) * max(prefix) + sum(len(exs) for _, exs in fwd) * width <= cap
    assert len(pack_forwards(parts, None, shared_prefix=True, slack=10.0)) == 1
    assert len(pack_forwards(parts, 1, shared_prefix=True)) == len(parts)
    unshared = pack_forwards(parts, None, slack=10.0)  # lengths grouped across experts: one forward, parts by row
    assert sorted(row for row, _ in unshared[0]) == [0, 1, 2, 3]


def test_bad_input(tiny_llama, char_tokenizer):
    with pytest.raises(DataError, match="no experts"):
        train_experts(tiny_llama, {}, pad_id=0, progress=False)
    with pytest.raises(DataError, match="'empty'"):
        train_experts(tiny_llama, {"empty": ExpertData([])}, pad_id=0, progress=False)
    with pytest.raises(DataError, match="max_tokens_per_forward"):
        MultiTrainOptions(max_tokens_per_forward=0)
