"""Data loading, splitting, prompt formatting, label masking and batching."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from modlora.data import (
    EncodedExample,
    Instance,
    PromptFormatter,
    PromptLimits,
    Task,
    collate,
    encode_tasks,
    length_grouped_batches,
    load_flat_dataset,
    load_flat_jsonl,
    load_sni_task,
    load_sni_tasks,
    padding_fraction,
    split_instances,
)
from modlora.errors import DataError


def _task(n: int = 50) -> Task:
    return Task("toy", "Copy the input.", [Instance(f"id{i}", f"in{i}", (f"out{i}",)) for i in range(n)])


def test_split_is_deterministic_disjoint_and_order_independent():
    task = _task(100)
    a = split_instances(task, seed=3)
    shuffled = Task("toy", task.definition, list(reversed(task.instances)))
    b = split_instances(shuffled, seed=3)
    assert {k: [i.id for i in v] for k, v in a.items()} == {k: [i.id for i in v] for k, v in b.items()}
    ids = [i.id for s in a.values() for i in s]
    assert len(ids) == len(set(ids)) == 100
    assert [len(a[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    c = split_instances(task, seed=4)
    assert [i.id for i in c["test"]] != [i.id for i in a["test"]]
    # removing an instance does not move the others between splits
    smaller = Task("toy", task.definition, task.instances[1:])
    d = split_instances(smaller, seed=3, fractions=(0.5, 0.0, 0.5))
    e = split_instances(task, seed=3, fractions=(0.5, 0.0, 0.5))
    assert set(i.id for i in d["train"]) - set(i.id for i in e["train"]) <= {task.instances[0].id} | set(
        i.id for i in e["test"])


def test_bad_split_fractions():
    with pytest.raises(DataError, match="fractions"):
        split_instances(_task(), fractions=(0.5, 0.5, 0.5))


def test_chat_template_formatting_and_label_mask(char_tokenizer):
    fmt = PromptFormatter(char_tokenizer, PromptLimits(200, 20))
    assert fmt.use_chat_template
    text = fmt.prompt_text("Do it.", "abc")
    assert text == "<|im_start|>user\nDo it.\n\nabc<|im_end|>\n<|im_start|>assistant\n"
    ex = fmt.encode(_task(), Instance("x", "abc", ("xyz",)))
    assert char_tokenizer.decode(ex.target_ids) == "xyz<|im_end|>"
    batch = collate([ex, EncodedExample("toy", [5, 6, 7], [8, 9])], pad_id=2)
    assert batch.input_ids.shape == (2, ex.length)
    # exactly the positions that predict target tokens are in the loss, and their labels are the targets
    labels = torch.roll(batch.input_ids, -1, dims=1)[batch.loss_mask]
    assert labels.tolist() == ex.target_ids + [8, 9]
    assert batch.loss_mask[1].nonzero().flatten().tolist() == [2, 3]
    assert batch.attention_mask[1].tolist()[:5] == [1, 1, 1, 1, 1] and batch.attention_mask[1, 5:].sum() == 0


def test_left_truncation_keeps_the_end(char_tokenizer):
    fmt = PromptFormatter(char_tokenizer, PromptLimits(16, 3))
    ids = fmt.prompt_ids("A long definition " * 5, "the input")
    assert len(ids) == 16
    assert char_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert len(fmt.target_ids("abcdef")) == 3


def test_input_truncation_keeps_the_definition_and_counts_the_cuts(char_tokenizer):
    fmt = PromptFormatter(char_tokenizer, PromptLimits(60, truncate="input"))
    full = fmt.prompt_text("Answer briefly.", "x" * 100)
    ids = fmt.prompt_ids("Answer briefly.", "x" * 100)
    text = char_tokenizer.decode(ids)
    assert len(ids) == 60 and text.startswith("<|im_start|>user\nAnswer briefly.\n\nxxx")
    assert text.endswith("<|im_start|>assistant\n") and len(full) > 60
    assert (fmt.cut_prompts, fmt.cut_definitions) == (1, 0)
    assert fmt.prompt_ids("Answer briefly.", "short") == char_tokenizer(
        fmt.prompt_text("Answer briefly.", "short"), add_special_tokens=False)["input_ids"]
    assert fmt.cut_prompts == 1                                            # a prompt that fits is not counted
    long_definition = fmt.prompt_ids("D" * 80, "x")                        # the definition alone does not fit
    assert len(long_definition) == 60 and (fmt.cut_prompts, fmt.cut_definitions) == (2, 1)
    left = PromptFormatter(char_tokenizer, PromptLimits(60))
    left.prompt_ids("Answer briefly.", "x" * 100)
    assert (left.cut_prompts, left.cut_definitions) == (1, 1)              # left truncation cuts the header first
    with pytest.raises(DataError, match="truncate must be"):
        PromptFormatter(char_tokenizer, PromptLimits(truncate="right"))  # type: ignore[arg-type]


def test_prompt_limits_are_checked_once_and_round_trip_through_a_training_record(char_tokenizer):
    limits = PromptLimits(64, 8, "input")
    assert PromptLimits.from_record({"lr": 1e-3, **limits.record(), "prompts_cut": 3}) == limits
    assert PromptLimits.from_record({"max_prompt_tokens": 256}) == PromptLimits(256)  # older records: the defaults
    fmt = limits.formatter(char_tokenizer)
    assert (fmt.limits.max_prompt_tokens, fmt.limits.max_target_tokens, fmt.limits.truncate) == (64, 8, "input")
    for bad, match in (({"max_prompt_tokens": 4}, "max_prompt_tokens must be an integer >= 8"),
                       ({"max_target_tokens": 0}, "max_target_tokens must be an integer >= 1"),
                       ({"max_prompt_tokens": True}, "max_prompt_tokens"), ({"truncate": "right"}, "truncate")):
        with pytest.raises(DataError, match=match):
            PromptLimits(**bad)
        with pytest.raises(DataError, match="training record: " + match):
            PromptLimits.from_record(bad)


def test_plain_template_without_chat(char_tokenizer):
    fmt = PromptFormatter(char_tokenizer, use_chat_template=False)
    assert fmt.prompt_text("Def.", "x") == "Def.\n\nInput: x\nOutput:"
    assert fmt.target_text("y") == " y<|im_end|>"


def test_length_grouping_reduces_padding():
    exs = [EncodedExample("t", [1] * n, [2]) for n in list(range(5, 200, 3)) * 3]
    random_batches = length_grouped_batches(exs, 8, bucket_factor=1)
    grouped = length_grouped_batches(exs, 8, bucket_factor=32)
    assert padding_fraction(grouped) < padding_fraction(random_batches) / 3
    assert sorted(id(e) for b in grouped for e in b) == sorted(id(e) for e in exs)


def _write_sni(path, instances, definition=("Say hi.",)):
    data = {"Definition": list(definition), "Categories": ["Misc."], "Source": ["toy"], "Instances": instances}
    raw = json.dumps(data).encode()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def test_sni_reading_gz_and_plain(tmp_path):
    _write_sni(tmp_path / "task001_a.json.gz", [{"id": "1", "input": "x", "output": ["y"]}])
    _write_sni(tmp_path / "task002_b.json", [{"id": "1", "input": "x", "output": ["y", "z"]}])
    tasks = load_sni_tasks(tmp_path)
    assert sorted(tasks) == ["task001_a", "task002_b"]
    assert tasks["task002_b"].instances[0].outputs == ("y", "z")
    assert tasks["task001_a"].category == "Misc."


def test_sni_bad_instances_skipped_or_strict(tmp_path):
    path = tmp_path / "task003_c.json"
    _write_sni(path, [{"id": "1", "input": "x", "output": []}, {"id": "2", "output": ["y"]},
                      {"id": "3", "input": "ok", "output": ["fine"]}])
    task = load_sni_task(path)
    assert len(task) == 1 and task.skipped == 2
    with pytest.raises(DataError, match=r"task003_c.json: Instances\[0\]: field 'output' is empty"):
        load_sni_task(path, strict=True)
    _write_sni(path, [{"id": "1", "input": "x", "output": []}])
    with pytest.raises(DataError, match="no usable instances"):
        load_sni_task(path)


def test_sni_missing_fields_and_bad_bytes(tmp_path):
    path = tmp_path / "task004.json"
    path.write_text(json.dumps({"Instances": []}))
    with pytest.raises(DataError, match="Definition"):
        load_sni_task(path)
    path.write_bytes(b'{"Definition": ["\xff\xfe"]}')
    with pytest.raises(DataError, match="UTF-8"):
        load_sni_task(path)
    with pytest.raises(DataError, match="not found"):
        load_sni_tasks(tmp_path, ["nope"])


def test_flat_jsonl_lenient_and_strict(tmp_path):
    path = tmp_path / "flat.jsonl"
    lines = [json.dumps({"task_name": "a", "source": "1+1", "target": "2"}), "{not json",
             json.dumps({"task_name": "b", "source": "x", "target": ""}),
             json.dumps({"task_name": "a", "source": "2+2", "target": "4", "split": "train"})]
    path.write_text("\n".join(lines) + "\n")
    tasks = load_flat_jsonl(path)
    assert list(tasks) == ["a"] and len(tasks["a"]) == 2 and tasks["a"].skipped == 2
    with pytest.raises(DataError, match="line 2"):
        load_flat_jsonl(path, strict=True)


def test_flat_from_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "flat.json"
    path.write_text("\n".join(json.dumps({"task_name": t, "source": f"s{i}", "target": f"t{i}"})
                              for i, t in enumerate(["a", "b", "a"])))
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    tasks = load_flat_dataset(ds)
    assert sorted(tasks) == ["a", "b"] and len(tasks["a"]) == 2
    tasks2 = load_flat_dataset("json", data_files=str(path), split="train")
    assert [i.input for i in tasks2["a"].instances] == ["s0", "s2"]


def test_real_shared_sni_data(shared_data, char_tokenizer):
    tasks = load_sni_tasks(shared_data / "sni" / "tasks", ["task085_unnatural_addsub_arithmetic"])
    task = tasks["task085_unnatural_addsub_arithmetic"]
    assert len(task) == 1000 and task.definition
    fmt = PromptFormatter(char_tokenizer, PromptLimits(64, 8))
    train = encode_tasks(fmt, tasks, "train", max_per_task=10)
    assert len(train) == 10 and all(len(e.prompt_ids) <= 64 for e in train)
    held = load_sni_tasks(shared_data / "sni" / "heldout")
    assert len(held) == 20


def test_encoded_example_labelled_masks_the_prompt():
    ids, labels = EncodedExample("t", [5, 6, 7], [8, 9]).labelled()
    assert ids.tolist() == [5, 6, 7, 8, 9] and labels.tolist() == [-100, -100, -100, 8, 9]
