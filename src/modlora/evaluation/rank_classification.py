"""Zero-shot rank classification: score each answer option as a continuation and pick the most likely.

Two input formats (LLM Foundry's):

* multiple choice ``{query, choices, gold}``: one shared context ``query + delimiter`` and one continuation per
  choice;
* schema ``{context_options, continuation, gold}`` (WinoGrande): one context per option and a shared continuation
  (``delimiter + continuation``), scored after each context.

For option ``k`` with continuation tokens ``y_1..y_T`` after context ``x`` the score is the log-likelihood
``ll_k = sum_t log p(y_t | x, y_<t)``. Reported metrics, per example then averaged:

* ``acc``      = ``[argmax_k ll_k == gold]``
* ``acc_norm`` = ``[argmax_k ll_k / chars_k == gold]`` with ``chars_k`` the number of *characters* of the scored
  continuation string (lm-eval-harness's acc_norm convention: per-character, not per-token, normalisation).

Tokenisation boundary (lm-eval-harness style): trailing whitespace of the context is moved to the front of the
continuation; then ``whole = encode(context + continuation)`` and ``ctx = encode(context)``; the continuation tokens
are ``whole[len(ctx):]`` when ``whole`` starts with ``ctx``. If the tokenizer merges across the boundary (``whole``
does not start with ``ctx``) the continuation is encoded on its own, ``encode(continuation)``, and appended to
``ctx``, so that the context tokens are always exactly ``encode(context)``.

Prefix reuse: for the multiple-choice format the context is run once per example (a batch of examples, left padded,
explicit ``position_ids``), its ``past_key_values`` (a ``DynamicCache`` of shape (B, heads, L_ctx, d) per layer) is
gathered along the batch to one row per option and every option's continuation (right padded) is scored from the
cached prefix in one batched forward. The log-probability of the first continuation token comes from the context's
last logits. Schema examples (and ``prefix_reuse=False``) run ``context + continuation`` sequences, right padded.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modlora.errors import DataError, ModloraError
from modlora.evaluation.results import EvalRun, TaskScores, model_forward, resolve_data_dir, seeded_subset

# task name -> (file under eval/, continuation delimiter). The delimiter is appended to the query (multiple choice)
# or put before the shared continuation (schema); its trailing whitespace moves into the continuation.
CHOICE_TASKS: dict[str, tuple[str, str]] = {
    "arc_easy": ("arc_easy.jsonl", "\nAnswer: "),
    "arc_challenge": ("arc_challenge.jsonl", "\nAnswer: "),
    "boolq": ("boolq.jsonl", "\nAnswer: "),
    "piqa": ("piqa.jsonl", "Answer: "),  # the query already ends with "\n"
    "openbookqa": ("openbookqa.jsonl", " "),
    "hellaswag": ("hellaswag.jsonl", ""),  # the choices already begin with a space
    "winogrande": ("winogrande.jsonl", " "),
}
DEFAULT_CHOICE_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")


@dataclass(frozen=True)
class ChoiceExample:
    """One rank-classification example: option ``k`` is ``(contexts[k or 0], continuations[k or 0])``.

    Either ``contexts`` has one element (shared context, multiple-choice format) or ``continuations`` has one
    element (shared continuation, schema format).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        n = max(len(self.contexts), len(self.continuations))
        if min(len(self.contexts), len(self.continuations)) != 1 and len(self.contexts) != len(self.continuations):
            raise DataError(f"example has {len(self.contexts)} contexts and {len(self.continuations)} continuations; "
                            "one of them must be 1")
        if n < 1 or not 0 <= self.gold < n:
            raise DataError(f"example field 'gold' = {self.gold!r} is not an option index in [0, {n})")

    @property
    def n_options(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    @property
    def shared_context(self) -> bool:
        return len(self.contexts) == 1

    def options(self) -> list[tuple[str, str]]:
        """``[(context, continuation)]`` for each option."""
        return [(self.contexts[k if len(self.contexts) > 1 else 0], self.continuations[k if len(self.continuations) > 1 else 0])
                for k in range(self.n_options)]


@dataclass(frozen=True)
class OptionScore:
    """Score of one option: summed log-likelihood, continuation tokens and characters, greedy match."""

    loglik: float
    n_tokens: int
    n_chars: int
    is_greedy: bool


def parse_choice_row(row: Any, delimiter: str = " ", where: str = "row") -> ChoiceExample:
    """Build a :class:`ChoiceExample` from an LLM Foundry multiple-choice or schema JSON row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    gold = row.get("gold")
    if not isinstance(gold, int) or isinstance(gold, bool):
        raise DataError(f"{where}: field 'gold' must be an integer, got {gold!r}")
    if "query" in row or "choices" in row:
        query, choices = row.get("query"), row.get("choices")
        if not isinstance(query, str) or not isinstance(choices, list) or not choices \
                or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: fields 'query' (str) and 'choices' (non-empty list of str) are required")
        try:
            return ChoiceExample(contexts=(query + delimiter,), continuations=tuple(choices), gold=gold)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    if "context_options" in row or "continuation" in row:
        ctxs, cont = row.get("context_options"), row.get("continuation")
        if not isinstance(cont, str) or not isinstance(ctxs, list) or not ctxs \
                or not all(isinstance(c, str) for c in ctxs):
            raise DataError(f"{where}: fields 'context_options' (non-empty list of str) and 'continuation' (str) "
                            "are required")
        try:
            return ChoiceExample(contexts=tuple(ctxs), continuations=(delimiter + cont,), gold=gold)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    raise DataError(f"{where}: neither multiple-choice fields ('query', 'choices') nor schema fields "
                    "('context_options', 'continuation')")


def load_choice_task(path: str | os.PathLike[str], delimiter: str = " ", limit: int | None = None,
                     seed: int = 0) -> list[ChoiceExample]:
    """Read a JSONL rank-classification file; with ``limit`` keep the fixed seeded subset of that size."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError as exc:
        raise DataError(f"task file {str(path)!r} not found") from exc
    keep = seeded_subset(len(lines), limit, seed)
    examples = []
    for i in keep:
        try:
            row = json.loads(lines[i])
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{i + 1}: invalid JSON ({exc})") from exc
        examples.append(parse_choice_row(row, delimiter, where=f"{path}:{i + 1}"))
    if not examples:
        raise DataError(f"task file {str(path)!r} has no examples")
    return examples


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_context_continuation(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int], str]:
    """Token ids of ``context`` and of ``continuation`` (see the module doc), and the scored continuation string."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    ctx_ids = _encode(tokenizer, context)
    whole = _encode(tokenizer, context + continuation)
    if whole[:len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
        cont_ids = whole[len(ctx_ids):]
    else:  # the tokenizer merged across the boundary: keep encode(context) and encode the continuation alone
        cont_ids = _encode(tokenizer, continuation)
    return ctx_ids, cont_ids, continuation


def _prefix_token(tokenizer: Any) -> int:
    for tok_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise DataError("an example has an empty context and the tokenizer has neither a BOS nor an EOS token to start it")


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _accepts_kwarg(model: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(logits)[targets]`` and whether each target is the argmax; logits (..., V), targets (...)."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1), logits.argmax(dim=-1) == targets


@dataclass
class _Option:
    example: int
    ctx_ids: list[int]
    cont_ids: list[int]
    n_chars: int


def _tokenize_options(tokenizer: Any, examples: Sequence[ChoiceExample], add_bos: bool) -> list[list[_Option]]:
    prefix = [_prefix_token(tokenizer)] if add_bos else []
    out = []
    for i, ex in enumerate(examples):
        opts = []
        for ctx, cont in ex.options():
            ctx_ids, cont_ids, scored = split_context_continuation(tokenizer, ctx, cont)
            ctx_ids = prefix + ctx_ids
            if not ctx_ids:
                ctx_ids = [_prefix_token(tokenizer)]
            if not cont_ids:
                raise DataError(f"example {i}: an option's continuation {cont!r} is empty after tokenisation")
            opts.append(_Option(i, ctx_ids, cont_ids, max(len(scored), 1)))
        out.append(opts)
    return out


def _forward(model: torch.nn.Module, **kwargs: Any) -> Any:
    return model_forward(model, "scoring", **kwargs)


def _score_full_sequences(model: torch.nn.Module, options: Sequence[_Option], pad_id: int,
                          device: torch.device) -> list[OptionScore]:
    """Score ``context + continuation`` sequences in one right-padded batch."""
    seqs = [o.ctx_ids + o.cont_ids for o in options]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = _forward(model, input_ids=ids, attention_mask=mask, use_cache=False).logits
    scores = []
    for r, o in enumerate(options):
        start, n = len(o.ctx_ids), len(o.cont_ids)
        lp, greedy = _token_logprobs(logits[r, start - 1:start - 1 + n], ids[r, start:start + n])
        scores.append(OptionScore(float(lp.double().sum()), n, o.n_chars, bool(greedy.all())))
    return scores


def _score_with_prefix_cache(model: torch.nn.Module, groups: Sequence[list[_Option]], pad_id: int,
                             device: torch.device, keep_last_only: bool) -> list[list[OptionScore]]:
    """Score examples that share one context per example: run each context once, reuse its KV cache for all options."""
    ctxs = [g[0].ctx_ids for g in groups]
    c_len = max(len(c) for c in ctxs)
    b = len(groups)
    ctx_ids = torch.full((b, c_len), pad_id, dtype=torch.long)
    ctx_mask = torch.zeros((b, c_len), dtype=torch.long)
    for r, c in enumerate(ctxs):  # left padding: the last column is every context's last real token
        ctx_ids[r, c_len - len(c):] = torch.tensor(c)
        ctx_mask[r, c_len - len(c):] = 1
    ctx_ids, ctx_mask = ctx_ids.to(device), ctx_mask.to(device)
    ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if keep_last_only else {}
    out = _forward(model, input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=ctx_pos, use_cache=True, **kwargs)
    cache = out.past_key_values
    if cache is None or not hasattr(cache, "batch_select_indices"):
        raise ModloraError("the model did not return a DynamicCache-like past_key_values; use prefix_reuse=False")
    last_logits = out.logits[:, -1, :]  # (B, V): predicts the first continuation token

    flat = [(gi, o) for gi, g in enumerate(groups) for o in g]
    row_of = torch.tensor([gi for gi, _ in flat], device=device)
    cache.batch_select_indices(row_of)  # (N_options, heads, L_ctx, d) per layer
    k_len = max(len(o.cont_ids) for _, o in flat)
    cont_ids = torch.full((len(flat), k_len), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((len(flat), k_len), dtype=torch.long)
    for r, (_, o) in enumerate(flat):
        cont_ids[r, :len(o.cont_ids)] = torch.tensor(o.cont_ids)
        cont_mask[r, :len(o.cont_ids)] = 1
    cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
    lens = torch.tensor([len(c) for c in ctxs], device=device)[row_of]
    cont_pos = lens[:, None] + torch.arange(k_len, device=device)[None, :]
    mask = torch.cat([ctx_mask[row_of], cont_mask], dim=1)
    logits = _forward(model, input_ids=cont_ids, attention_mask=mask, position_ids=cont_pos, past_key_values=cache,
                      use_cache=True).logits  # (N_options, K, V)
    # position t of the continuation is predicted by last_logits (t = 0) or by logits[:, t - 1] (t >= 1)
    pred = torch.cat([last_logits[row_of].unsqueeze(1), logits[:, :-1]], dim=1)
    lp, greedy = _token_logprobs(pred, cont_ids)
    lp = (lp * cont_mask).double().sum(-1)
    greedy = (greedy | ~cont_mask.bool()).all(-1)
    scores: list[list[OptionScore]] = [[] for _ in groups]
    for r, (gi, o) in enumerate(flat):
        scores[gi].append(OptionScore(float(lp[r]), len(o.cont_ids), o.n_chars, bool(greedy[r])))
    return scores


def score_choices(model: torch.nn.Module, tokenizer: Any, examples: Sequence[ChoiceExample], *, batch_size: int = 16,
                  prefix_reuse: bool = True, add_bos: bool = False) -> list[list[OptionScore]]:
    """Score every option of every example; returns ``scores[i][k]`` for example ``i``, option ``k``.

    ``batch_size`` is the number of examples per forward pass (all their options go in the same batch). Examples
    are processed longest-context first so that each batch has little padding; the result keeps the input order.
    With ``add_bos`` the tokenizer's BOS token is put before every context.
    """
    if batch_size < 1:
        raise DataError(f"option 'batch_size' must be >= 1, got {batch_size!r}")
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _prefix_token(tokenizer)
    options = _tokenize_options(tokenizer, examples, add_bos)
    keep_last_only = _accepts_kwarg(model, "logits_to_keep")
    scores: list[list[OptionScore] | None] = [None] * len(examples)
    shared = [i for i, ex in enumerate(examples) if ex.shared_context and ex.n_options > 1 and prefix_reuse]
    shared_set = set(shared)
    rest = [i for i in range(len(examples)) if i not in shared_set]
    with torch.inference_mode():
        shared.sort(key=lambda i: -len(options[i][0].ctx_ids))
        for start in range(0, len(shared), batch_size):
            idx = shared[start:start + batch_size]
            for i, s in zip(idx, _score_with_prefix_cache(model, [options[i] for i in idx], pad_id, device,
                                                          keep_last_only), strict=True):
                scores[i] = s
        rest.sort(key=lambda i: -max(len(o.ctx_ids) + len(o.cont_ids) for o in options[i]))
        for start in range(0, len(rest), batch_size):
            idx = rest[start:start + batch_size]
            flat = [o for i in idx for o in options[i]]
            flat_scores = iter(_score_full_sequences(model, flat, pad_id, device))
            for i in idx:
                scores[i] = [next(flat_scores) for _ in options[i]]
    return [s for s in scores if s is not None]


def choice_correctness(examples: Sequence[ChoiceExample], scores: Sequence[Sequence[OptionScore]]) -> dict[str, list[float]]:
    """Per-example ``acc`` (argmax log-likelihood) and ``acc_norm`` (argmax log-likelihood per character) in {0, 1}."""
    acc, acc_norm = [], []
    for ex, opts in zip(examples, scores, strict=True):
        ll = torch.tensor([o.loglik for o in opts], dtype=torch.float64)
        chars = torch.tensor([o.n_chars for o in opts], dtype=torch.float64)
        acc.append(float(int(ll.argmax()) == ex.gold))
        acc_norm.append(float(int((ll / chars).argmax()) == ex.gold))
    return {"acc": acc, "acc_norm": acc_norm}


def evaluate_choice_task(model: torch.nn.Module, tokenizer: Any, examples: Sequence[ChoiceExample], *,
                         batch_size: int = 16, prefix_reuse: bool = True, add_bos: bool = False) -> TaskScores:
    """Score a list of examples and aggregate ``acc`` / ``acc_norm`` (mean ± stderr)."""
    t0 = time.perf_counter()
    scores = score_choices(model, tokenizer, examples, batch_size=batch_size, prefix_reuse=prefix_reuse,
                           add_bos=add_bos)
    return TaskScores.from_per_example(choice_correctness(examples, scores), wall_s=time.perf_counter() - t0)


def evaluate_choice_tasks(model: torch.nn.Module, tokenizer: Any, tasks: Iterable[str] = DEFAULT_CHOICE_TASKS, *,
                          data_dir: str | os.PathLike[str] | None = None, limit: int | None = None, seed: int = 0,
                          batch_size: int = 16, prefix_reuse: bool = True, add_bos: bool = False,
                          method: str = "base", model_name: str = "?",
                          on_task_done: Callable[[str, TaskScores], None] | None = None) -> EvalRun:
    """Evaluate the named rank-classification tasks (see ``CHOICE_TASKS``) from ``<data_dir>/eval``.

    ``limit`` keeps a fixed seeded subset of each task (the same for every method with the same ``seed``).
    ``on_task_done(task, scores)`` is called after each task (for progress output or incremental saving).
    """
    root = resolve_data_dir(data_dir) / "eval"
    tasks = list(tasks)
    for task in tasks:
        if task not in CHOICE_TASKS:
            raise DataError(f"unknown rank-classification task {task!r}; known: {sorted(CHOICE_TASKS)}")
    run = EvalRun(method=method, model=model_name,
                  config={"kind": "rank_classification", "limit": limit, "seed": seed, "batch_size": batch_size,
                          "prefix_reuse": prefix_reuse, "add_bos": add_bos, "data_dir": str(root.parent),
                          "delimiters": {t: CHOICE_TASKS[t][1] for t in tasks}})
    t0 = time.perf_counter()
    for task in tasks:
        filename, delimiter = CHOICE_TASKS[task]
        examples = load_choice_task(root / filename, delimiter, limit=limit, seed=seed)
        run.tasks[task] = evaluate_choice_task(model, tokenizer, examples, batch_size=batch_size,
                                               prefix_reuse=prefix_reuse, add_bos=add_bos)
        run.wall_s = time.perf_counter() - t0
        if on_task_done is not None:
            on_task_done(task, run.tasks[task])
    return run
