"""Held-out Super-NaturalInstructions: greedy generation scored by Rouge-L and exact match.

Metrics follow SNI's official ``compute_metrics`` (allenai/natural-instructions ``eval/automatic/evaluation.py``):

* ``exact_match`` = ``[normalize(pred) == normalize(ref)]`` with ``normalize`` = lowercase, drop ASCII punctuation,
  collapse whitespace. SNI's normaliser deliberately does *not* remove articles (it is SQuAD's without that step);
  ``remove_articles=True`` gives the SQuAD variant.
* ``rougeL`` = Rouge-L F-measure from ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` (its
  default English tokenizer), ``score(target=ref, prediction=pred)``.

Both are maxed over an instance's reference outputs, averaged over instances (as fractions in [0, 1]) per task, and
the run's average is the unweighted mean over tasks.

Generation is greedy, batched with left padding (explicit ``position_ids``), with a KV cache; a row stops at the
tokenizer's EOS (or the model's ``generation_config.eos_token_id``), at ``max_new_tokens``, or when its decoded text
contains one of ``stop_strings``.
"""

from __future__ import annotations

import gzip
import os
import re
import string
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modlora.data import default_data_dir
from modlora.errors import DataError
from modlora.evaluation.results import (
    EvalRun,
    TaskScores,
    model_forward,
    recording_routing,
    routing_telemetry,
    seeded_subset,
)
from modlora.io import parse_json, read_regular_file

FormatPrompt = Callable[[str, str], str]


@dataclass(frozen=True)
class SniInstance:
    id: str
    input: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class SniTask:
    """One SNI task: ``definition`` (the instruction) and its instances."""

    name: str
    definition: str
    instances: tuple[SniInstance, ...]


def load_sni_task(path: str | os.PathLike[str], limit: int | None = None, seed: int = 0) -> SniTask:
    """Read an SNI task file (``.json`` or ``.json.gz``); with ``limit`` keep a fixed seeded subset of instances."""
    path = Path(path)
    name = path.name.removesuffix(".gz").removesuffix(".json")
    try:
        raw = read_regular_file(path, follow_symlinks=True)
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
        data = parse_json(raw)
    except FileNotFoundError as exc:
        raise DataError(f"SNI task file {str(path)!r} not found") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"SNI task file {str(path)!r} is not valid (gzipped) JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"SNI task {name!r}: expected a JSON object")
    definition = data.get("Definition")
    if isinstance(definition, list):
        definition = definition[0] if definition else None
    if not isinstance(definition, str):
        raise DataError(f"SNI task {name!r}: field 'Definition' must be a string or a list of strings")
    rows = data.get("Instances")
    if not isinstance(rows, list) or not rows:
        raise DataError(f"SNI task {name!r}: field 'Instances' must be a non-empty list")
    instances = []
    for i in seeded_subset(len(rows), limit, seed):
        row = rows[i]
        outs = row.get("output") if isinstance(row, dict) else None
        if isinstance(outs, str):
            outs = [outs]
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(outs, list) \
                or not outs or not all(isinstance(o, str) for o in outs):
            raise DataError(f"SNI task {name!r}: instance {i} needs 'input' (str) and 'output' (non-empty list of str)")
        instances.append(SniInstance(str(row.get("id", f"{name}-{i}")), row["input"], tuple(outs)))
    return SniTask(name, definition, tuple(instances))


def chat_prompt_formatter(tokenizer: Any) -> FormatPrompt:
    """The default prompt: ``definition + "\\n\\n" + input`` as one user message through the chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return lambda definition, text: f"{definition}\n\n{text}\n\n"

    def format_prompt(definition: str, text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": f"{definition}\n\n{text}"}],
                                             tokenize=False, add_generation_prompt=True)

    return format_prompt


# ----------------------------------------------------------------------------------------------------------- metrics

def normalize_answer(text: str, remove_articles: bool = False) -> str:
    """SNI normalisation: lowercase, remove punctuation, collapse whitespace (optionally drop a/an/the)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    if remove_articles:
        text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str], remove_articles: bool = False) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction, remove_articles)
    return float(any(pred == normalize_answer(ref, remove_articles) for ref in references))


class RougeL:
    """Rouge-L F-measure, SNI convention (``use_stemmer=True``, default tokenizer), max over references."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def __call__(self, prediction: str, references: Sequence[str]) -> float:
        if not references:
            raise DataError("Rouge-L needs at least one reference")
        return max(self._scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Rouge-L F-measure of ``prediction`` against the best of ``references`` (SNI convention)."""
    return RougeL()(prediction, references)


# -------------------------------------------------------------------------------------------------------- generation

def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _call(model: torch.nn.Module, **kwargs: Any) -> Any:
    return model_forward(model, "generation", **kwargs)


def _generate_batch(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                    eos: set[int], pad_id: int, stop_strings: Sequence[str], use_cache: bool,
                    device: torch.device) -> list[list[int]]:
    b, length = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, length - len(p):] = torch.tensor(p)
        mask[r, length - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = _call(model, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache)
    cache = out.cache if use_cache else None
    generated: list[list[int]] = [[] for _ in range(b)]
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1, :].argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        for r in range(b):
            if not finished[r]:
                generated[r].append(int(nxt[r]))
        finished |= torch.isin(nxt, eos_t) if len(eos) else torch.zeros_like(finished)
        if stop_strings:
            for r in range(b):
                if not finished[r] and any(s in tokenizer.decode(generated[r]) for s in stop_strings):
                    finished[r] = True
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        if use_cache:
            pos = pos[:, -1:] + 1
            out = _call(model, input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                        use_cache=True)
            cache = out.cache
        else:
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = _call(model, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return [[t for t in g if t not in eos] for g in generated]


def greedy_generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 128,
                    batch_size: int = 8, stop_strings: Sequence[str] = (), max_prompt_tokens: int | None = 2048,
                    use_cache: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, EOS removed, special tokens skipped), in input order.

    Prompts are tokenised without added special tokens (a chat-templated prompt already has them) and, when longer
    than ``max_prompt_tokens``, keep their last tokens. Batches group prompts of similar length. ``use_cache=False``
    re-runs the whole sequence each step (for models whose routing depends on the full input).
    """
    encoded = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    if max_prompt_tokens is not None:
        encoded = [e[-max_prompt_tokens:] for e in encoded]
    return greedy_generate_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               stop_strings=stop_strings, use_cache=use_cache)


def greedy_generate_ids(model: torch.nn.Module, tokenizer: Any, encoded: Sequence[Sequence[int]], *,
                        max_new_tokens: int = 128, batch_size: int = 8, stop_strings: Sequence[str] = (),
                        use_cache: bool = True) -> list[str]:
    """:func:`greedy_generate` of prompts already tokenised (and cut): ``encoded[i]`` is prompt ``i``'s ids."""
    if max_new_tokens < 1 or batch_size < 1:
        raise DataError(f"options 'max_new_tokens' and 'batch_size' must be >= 1, got {max_new_tokens}, {batch_size}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    encoded = [list(e) for e in encoded]
    for i, e in enumerate(encoded):
        if not e:
            raise DataError(f"prompt {i} is empty after tokenisation")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            gen = _generate_batch(model, tokenizer, [encoded[i] for i in idx], max_new_tokens, eos, pad_id,
                                  stop_strings, use_cache, device)
            for i, g in zip(idx, gen, strict=True):
                outputs[i] = tokenizer.decode(g, skip_special_tokens=True)
    return outputs


# -------------------------------------------------------------------------------------------------------- evaluation

def score_generations(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      remove_articles: bool = False) -> dict[str, list[float]]:
    """Per-instance ``rougeL`` and ``exact_match`` (max over references), predictions stripped of whitespace."""
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} reference lists")
    scorer = RougeL()
    preds = [p.strip() for p in predictions]
    return {"rougeL": [scorer(p, r) for p, r in zip(preds, references, strict=True)],
            "exact_match": [exact_match(p, r, remove_articles) for p, r in zip(preds, references, strict=True)]}


def generate_and_score(model: Any, tokenizer: Any, formatter: Any, task: Any, instances: Sequence[Any], *,
                       max_new_tokens: int, batch_size: int = 8) -> tuple[dict[str, list[float]], int]:
    """Greedy-generate ``task``'s ``instances`` (prompts made by ``formatter``, a
    :class:`~modlora.data.PromptFormatter`) and score them; returns the per-example scores and the prompt +
    generated token count (for throughput)."""
    prompts = [formatter.prompt_ids(task.definition, inst.input) for inst in instances]
    preds = greedy_generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    tokens = sum(map(len, prompts)) + sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in preds)
    return score_generations(preds, [inst.outputs for inst in instances]), tokens


def list_sni_tasks(directory: str | os.PathLike[str]) -> list[Path]:
    """The SNI task files (``*.json`` / ``*.json.gz``) in ``directory``, sorted by name."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.name.endswith((".json", ".json.gz"))) if directory.is_dir() else []
    if not files:
        raise DataError(f"no SNI task files (*.json, *.json.gz) in {str(directory)!r}")
    return files


def evaluate_sni(model: torch.nn.Module, tokenizer: Any, tasks: Iterable[str] | None = None, *,
                 data_dir: str | os.PathLike[str] | None = None, split: str = "heldout", limit: int | None = None,
                 seed: int = 0, batch_size: int = 8, max_new_tokens: int = 128,
                 format_prompt: FormatPrompt | None = None, max_prompt_tokens: int | None = 2048,
                 use_cache: bool = True, method: str = "base", model_name: str = "?",
                 on_task_done: Callable[[str, TaskScores], None] | None = None) -> EvalRun:
    """Greedy-generate and score SNI tasks from ``<data_dir>/sni/<split>`` (all of them when ``tasks`` is None).

    Per task: ``rougeL`` and ``exact_match`` (mean ± stderr over instances); ``extra["predictions"]`` keeps the first
    5 (id, prediction) pairs for inspection.
    """
    root = default_data_dir(data_dir) / "sni" / split
    files = {p.name.removesuffix(".gz").removesuffix(".json"): p for p in list_sni_tasks(root)}
    names = sorted(files) if tasks is None else list(tasks)
    for name in names:
        if name not in files:
            raise DataError(f"unknown SNI task {name!r} in {str(root)!r}")
    fmt = format_prompt or chat_prompt_formatter(tokenizer)
    run = EvalRun(method=method, model=model_name,
                  config={"kind": "sni", "split": split, "limit": limit, "seed": seed, "batch_size": batch_size,
                          "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens,
                          "data_dir": str(root.parent.parent)})
    t0 = time.perf_counter()
    run.routing = routing_telemetry(model)
    for name in names:
        t_task = time.perf_counter()
        task = load_sni_task(files[name], limit=limit, seed=seed)
        prompts = [fmt(task.definition, inst.input) for inst in task.instances]
        with recording_routing(model, run.routing, name):
            preds = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    max_prompt_tokens=max_prompt_tokens, use_cache=use_cache)
        per_instance = score_generations(preds, [inst.outputs for inst in task.instances])
        sample = [[inst.id, p] for inst, p in zip(task.instances[:5], preds[:5], strict=False)]
        run.tasks[name] = TaskScores.from_per_example(per_instance, wall_s=time.perf_counter() - t_task,
                                                      extra={"predictions": sample})
        run.wall_s = time.perf_counter() - t0
        if on_task_done is not None:
            on_task_done(name, run.tasks[name])
    return run
