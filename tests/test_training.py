"""LoRA training on a tiny random Llama: the loss goes down, the base model is left untouched; the training record
keeps the prompt limits."""

from __future__ import annotations

import torch

from modlora.build.pipeline import training_record
from modlora.build.training import TrainConfig, mean_target_loss, target_loss, train_expert
from modlora.data import Instance, PromptFormatter, PromptLimits, Task, collate, encode_tasks
from modlora.library.adapters import LoraSpec


def _toy_task() -> Task:
    # A learnable mapping: the answer is the first character of the input, uppercased.
    letters = "abcdefgh"
    return Task("upper", "Uppercase the first letter.",
                [Instance(str(i), letters[i % 8] + "qrs"[i % 3], (letters[i % 8].upper(),)) for i in range(240)])


def test_target_loss_equals_full_logits_reference(tiny_llama, char_tokenizer):
    fmt = PromptFormatter(char_tokenizer, PromptLimits(64, 8))
    exs = encode_tasks(fmt, {"upper": _toy_task()}, "train", max_per_task=3)
    batch = collate(exs, pad_id=char_tokenizer.pad_token_id)
    loss_sum, n = target_loss(tiny_llama, batch)
    # reference: full logits with -100 labels everywhere except targets (HF convention)
    labels = torch.full_like(batch.input_ids, -100)
    for i, e in enumerate(exs):
        p = len(e.prompt_ids)
        labels[i, p:p + len(e.target_ids)] = torch.tensor(e.target_ids)
    out = tiny_llama(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    assert n == sum(len(e.target_ids) for e in exs)
    torch.testing.assert_close(loss_sum / n, out.loss, rtol=1e-5, atol=1e-5)


def test_training_lowers_loss_and_restores_base(tiny_llama, char_tokenizer):
    # With the default 0.02 init the tied output embeddings bound every logit to about ±0.6, so no adapter of the
    # linear layers could lower the loss much; give the embeddings a realistic scale first.
    with torch.no_grad():
        tiny_llama.get_input_embeddings().weight.mul_(40)
    fmt = PromptFormatter(char_tokenizer, PromptLimits(64, 4))
    tasks = {"upper": _toy_task()}
    train = encode_tasks(fmt, tasks, "train")
    val = encode_tasks(fmt, tasks, "validation")
    before_state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    pad = char_tokenizer.pad_token_id
    before = mean_target_loss(tiny_llama, val, pad_id=pad)
    spec = LoraSpec(rank=8, alpha=16, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"))
    result = train_expert(tiny_llama, train, val, pad_id=pad, spec=spec,
                          config=TrainConfig(steps=40, batch_size=16, lr=1e-2, seed=1), progress=False)
    # the base model is unchanged: same modules, same weights, nothing left trainable
    assert type(tiny_llama.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    assert result.metrics["best_val_loss"] < before - 0.5
    assert result.metrics["train_tokens"] > 0 and result.metrics["tokens_per_second"] > 0
    assert len(result.adapter.modules) == 2 * 7
    # applying the returned adapter reproduces the reported validation loss
    from modlora.library.adapters import merge_adapter
    merge_adapter(tiny_llama, result.adapter)
    after = mean_target_loss(tiny_llama, val, pad_id=pad)
    assert abs(after - result.metrics["best_val_loss"]) < 1e-4


def test_training_is_reproducible(tiny_llama, char_tokenizer):
    fmt = PromptFormatter(char_tokenizer, PromptLimits(64, 4))
    train = encode_tasks(fmt, {"upper": _toy_task()}, "train", max_per_task=32)
    cfg = TrainConfig(steps=5, batch_size=8, lr=1e-3, seed=7)
    a = train_expert(tiny_llama, train, pad_id=char_tokenizer.pad_token_id, config=cfg, progress=False).adapter
    b = train_expert(tiny_llama, train, pad_id=char_tokenizer.pad_token_id, config=cfg, progress=False).adapter
    for m in a.modules:
        assert torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m])


def test_training_record_round_trips_the_prompt_limits(char_tokenizer):
    limits = PromptLimits(16, 2, "input")
    fmt = limits.formatter(char_tokenizer)
    encode_tasks(fmt, {"upper": _toy_task()}, "train", max_per_task=8)
    record = training_record(TrainConfig(steps=2), fmt, max_examples=8, max_val=2, split_seed=0,
                             extra={"stage": "private"})
    assert PromptLimits.from_record(record) == limits
    assert {k: record[k] for k in ("max_prompt_tokens", "max_target_tokens", "truncate")} == {
        "max_prompt_tokens": 16, "max_target_tokens": 2, "truncate": "input"}          # the keys libraries hold
    assert (record["prompts_cut"], record["stage"], record["steps"]) == (fmt.cut_prompts, "private", 2)
    assert record["prompts_cut"] > 0
    # records written before ``truncate`` (or any limit) was kept read back with PromptLimits' defaults
    assert PromptLimits.from_record({"max_prompt_tokens": 16, "max_target_tokens": 2}) == PromptLimits(16, 2, "left")
    assert PromptLimits.from_record({"lr": 1e-4}) == PromptLimits()
