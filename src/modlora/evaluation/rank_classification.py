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
explicit ``position_ids``), its ``cache`` (a ``DynamicCache`` of shape (B, heads, L_ctx, d) per layer) is
gathered along the batch to one row per option and every option's continuation (right padded) is scored from the
cached prefix, in chunks of options of similar continuation length (little padding). The log-probability of the first
continuation token comes from the context's last logits, so the continuation pass leaves out each continuation's
last token. Schema examples (and ``prefix_reuse=False``) run ``context + continuation`` sequences, left padded, with
the LM head applied only to the last ``max_continuation + 1`` columns (``logits_to_keep``).
"""

from __future__ import annotations

import copy
import inspect
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modlora.data import default_data_dir
from modlora.errors import DataError, ModloraError
from modlora.evaluation.results import (
    EvalRun,
    TaskScores,
    model_forward,
    recording_routing,
    routing_telemetry,
    seeded_subset,
)
from modlora.io import parse_json, read_regular_file
from modlora.progress import progress_bar

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
        lines = [line for line in read_regular_file(path, follow_symlinks=True).decode().splitlines() if line.strip()]
    except FileNotFoundError as exc:
        raise DataError(f"task file {str(path)!r} not found") from exc
    except OSError as exc:
        raise DataError(f"task file {str(path)!r}: cannot read it ({exc.strerror or exc})") from exc
    keep = seeded_subset(len(lines), limit, seed)
    examples = []
    for i in keep:
        try:
            row = parse_json(lines[i])
        except ValueError as exc:
            raise DataError(f"{path}:{i + 1}: {exc}") from exc
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


def _left_padded(seqs: Sequence[list[int]], pad_id: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask, position_ids)`` of left-padded sequences: the last column is every row's last token."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, length - len(s):] = torch.tensor(s)
        mask[r, length - len(s):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _score_full_sequences(model: torch.nn.Module, options: Sequence[_Option], pad_id: int,
                          device: torch.device, keep_last: bool) -> list[OptionScore]:
    """Score ``context + continuation`` sequences in one left-padded batch.

    With ``keep_last`` (the model accepts ``logits_to_keep``) the LM head runs only on the last ``max_cont + 1``
    columns, which hold every row's continuation and the token before it.
    """
    ids, mask, pos = _left_padded([o.ctx_ids + o.cont_ids for o in options], pad_id, device)
    length = ids.shape[1]
    k = max(len(o.cont_ids) for o in options) + 1
    kwargs: dict[str, Any] = {"logits_to_keep": k} if keep_last else {}
    logits = _forward(model, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs).logits
    offset = length - logits.shape[1]  # column of logits[:, 0]
    scores = []
    for r, o in enumerate(options):
        n = len(o.cont_ids)
        start = length - n  # first continuation column
        lp, greedy = _token_logprobs(logits[r, start - 1 - offset:length - 1 - offset], ids[r, start:])
        scores.append(OptionScore(float(lp.double().sum()), n, o.n_chars, bool(greedy.all())))
    return scores


def _length_chunks(lengths: Sequence[int], max_padding: float = 1.25, min_rows: int = 8) -> list[list[int]]:
    """Indices grouped longest first into chunks whose padded size (rows x longest) stays within ``max_padding`` x
    their real size (or that have fewer than ``min_rows`` rows): little padding, few forward calls."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    real = 0
    for i in order:
        if chunks and (len(chunks[-1]) < min_rows
                       or lengths[chunks[-1][0]] * (len(chunks[-1]) + 1) <= max_padding * (real + lengths[i])):
            chunks[-1].append(i)
            real += lengths[i]
        else:
            chunks.append([i])
            real = lengths[i]
    return chunks


def _score_with_prefix_cache(model: torch.nn.Module, groups: Sequence[list[_Option]], pad_id: int,
                             device: torch.device, keep_last_only: bool) -> list[list[OptionScore]]:
    """Score examples that share one context per example: run each context once, reuse its KV cache for all options.

    The options' continuations are scored in chunks of similar length (see :func:`_length_chunks`); each chunk gets
    a copy of the context cache gathered to one row per option.
    """
    ctxs = [g[0].ctx_ids for g in groups]
    ctx_ids, ctx_mask, ctx_pos = _left_padded(ctxs, pad_id, device)
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if keep_last_only else {}
    out = _forward(model, input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=ctx_pos, use_cache=True, **kwargs)
    ctx_cache = out.cache
    if ctx_cache is None or not hasattr(ctx_cache, "batch_select_indices"):
        raise ModloraError("the model did not return a DynamicCache-like cache; use prefix_reuse=False")
    last_logits = out.logits[:, -1, :]  # (B, V): predicts the first continuation token
    ctx_lens = torch.tensor([len(c) for c in ctxs], device=device)

    flat = [(gi, o) for gi, g in enumerate(groups) for o in g]
    scores: list[list[OptionScore | None]] = [[None] * len(g) for g in groups]
    slot = [oi for g in groups for oi in range(len(g))]
    for chunk in _length_chunks([len(o.cont_ids) for _, o in flat]):
        row_of = torch.tensor([flat[c][0] for c in chunk], device=device)
        cache = copy.deepcopy(ctx_cache) if len(chunk) < len(flat) else ctx_cache
        cache.batch_select_indices(row_of)  # (N_chunk, heads, L_ctx, d) per layer
        conts = [flat[c][1].cont_ids for c in chunk]
        k_len = max(len(c) for c in conts)
        cont_ids = torch.full((len(chunk), k_len), pad_id, dtype=torch.long)
        cont_mask = torch.zeros((len(chunk), k_len), dtype=torch.long)
        for r, c in enumerate(conts):
            cont_ids[r, :len(c)] = torch.tensor(c)
            cont_mask[r, :len(c)] = 1
        cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
        cont_pos = ctx_lens[row_of][:, None] + torch.arange(k_len, device=device)[None, :]
        mask = torch.cat([ctx_mask[row_of], cont_mask], dim=1)
        # the last continuation token predicts nothing that is scored: leave it out of the input
        logits = _forward(model, input_ids=cont_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=cont_pos[:, :-1],
                          cache=cache, use_cache=True).logits if k_len > 1 else None  # (N_chunk, K-1, V)
        # position t of the continuation is predicted by last_logits (t = 0) or by logits[:, t - 1] (t >= 1)
        first = last_logits[row_of].unsqueeze(1)
        pred = first if logits is None else torch.cat([first, logits], dim=1)
        lp, greedy = _token_logprobs(pred, cont_ids)
        lp = (lp * cont_mask).double().sum(-1)
        greedy = (greedy | ~cont_mask.bool()).all(-1)
        for r, c in enumerate(chunk):
            gi, o = flat[c]
            scores[gi][slot[c]] = OptionScore(float(lp[r]), len(o.cont_ids), o.n_chars, bool(greedy[r]))
    return [[s for s in g if s is not None] for g in scores]


def score_choices(model: torch.nn.Module, tokenizer: Any, examples: Sequence[ChoiceExample], *, batch_size: int = 16,
                  prefix_reuse: bool = True, add_bos: bool = False, progress: str | None = None
                  ) -> list[list[OptionScore]]:
    """Score every option of every example; returns ``scores[i][k]`` for example ``i``, option ``k``.

    ``batch_size`` is the number of examples per forward pass (all their options go in the same batch). Examples
    are processed longest-context first so that each batch has little padding; the result keeps the input order.
    With ``add_bos`` the tokenizer's BOS token is put before every context. With ``progress`` a tqdm bar of that
    name counts the examples.
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
    bar = progress_bar(total=len(examples), desc=progress, unit="ex", enabled=progress is not None)
    with torch.inference_mode(), bar:
        shared.sort(key=lambda i: -len(options[i][0].ctx_ids))
        for start in range(0, len(shared), batch_size):
            idx = shared[start:start + batch_size]
            for i, s in zip(idx, _score_with_prefix_cache(model, [options[i] for i in idx], pad_id, device,
                                                          keep_last_only), strict=True):
                scores[i] = s
            bar.update(len(idx))
        rest.sort(key=lambda i: -max(len(o.ctx_ids) + len(o.cont_ids) for o in options[i]))
        for start in range(0, len(rest), batch_size):
            idx = rest[start:start + batch_size]
            flat = [o for i in idx for o in options[i]]
            flat_scores = iter(_score_full_sequences(model, flat, pad_id, device, keep_last_only))
            for i in idx:
                scores[i] = [next(flat_scores) for _ in options[i]]
            bar.update(len(idx))
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
                         batch_size: int = 16, prefix_reuse: bool = True, add_bos: bool = False,
                         progress: str | None = None) -> TaskScores:
    """Score a list of examples and aggregate ``acc`` / ``acc_norm`` (mean ± stderr)."""
    t0 = time.perf_counter()
    scores = score_choices(model, tokenizer, examples, batch_size=batch_size, prefix_reuse=prefix_reuse,
                           add_bos=add_bos, progress=progress)
    return TaskScores.from_per_example(choice_correctness(examples, scores), wall_s=time.perf_counter() - t0)


def evaluate_choice_tasks(model: torch.nn.Module, tokenizer: Any, tasks: Iterable[str] = DEFAULT_CHOICE_TASKS, *,
                          data_dir: str | os.PathLike[str] | None = None, limit: int | None = None, seed: int = 0,
                          batch_size: int = 16, prefix_reuse: bool = True, add_bos: bool = False,
                          method: str = "base", model_name: str = "?",
                          on_task_done: Callable[[str, TaskScores], None] | None = None,
                          progress: bool = False) -> EvalRun:
    """Evaluate the named rank-classification tasks (see ``CHOICE_TASKS``) from ``<data_dir>/eval``.

    ``limit`` keeps a fixed seeded subset of each task (the same for every method with the same ``seed``).
    ``on_task_done(task, scores)`` is called after each task (for progress output or incremental saving);
    ``progress`` shows a per-task progress bar.
    """
    root = default_data_dir(data_dir) / "eval"
    tasks = list(tasks)
    for task in tasks:
        if task not in CHOICE_TASKS:
            raise DataError(f"unknown rank-classification task {task!r}; known: {sorted(CHOICE_TASKS)}")
    run = EvalRun(method=method, model=model_name,
                  config={"kind": "rank_classification", "limit": limit, "seed": seed, "batch_size": batch_size,
                          "prefix_reuse": prefix_reuse, "add_bos": add_bos, "data_dir": str(root.parent),
                          "delimiters": {t: CHOICE_TASKS[t][1] for t in tasks}})
    t0 = time.perf_counter()
    run.routing = routing_telemetry(model)
    for task in tasks:
        filename, delimiter = CHOICE_TASKS[task]
        examples = load_choice_task(root / filename, delimiter, limit=limit, seed=seed)
        with recording_routing(model, run.routing, task):
            run.tasks[task] = evaluate_choice_task(model, tokenizer, examples, batch_size=batch_size,
                                                   prefix_reuse=prefix_reuse, add_bos=add_bos,
                                                   progress=task if progress else None)
        run.wall_s = time.perf_counter() - t0
        if on_task_done is not None:
            on_task_done(task, run.tasks[task])
    return run
