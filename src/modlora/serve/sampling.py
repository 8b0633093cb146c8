"""Choosing each row's next token from one step's logits, and how much of the decoded text may be sent yet.

The engine calls :func:`choose_tokens` once per step with the step's logits (B, V) and each row's
:class:`RowSampler`. For one row with logits ``z`` (V,), in this order (vLLM's):

1. ``logprobs``: ``log_softmax(z)`` of the model's raw logits, before anything below (vLLM's default
   ``raw_logprobs``): the chosen token's and the ``k`` most likely;
2. ``response_format``: the tokens the grammar forbids get ``−inf`` (llguidance, :class:`GrammarConstraint`);
3. ``logit_bias``: ``z_j += b_j``;
4. ``repetition_penalty`` ``r`` on the tokens of the prompt or the output: ``z_j ← z_j / r`` if ``z_j > 0`` else
   ``z_j · r``;
5. ``frequency_penalty`` ``f`` and ``presence_penalty`` ``p`` over the output's counts ``c``:
   ``z_j ← z_j − f·c_j − p·[c_j > 0]``;
6. temperature 0: ``argmax z`` (greedy). Otherwise ``q = softmax(z / T)``; ``min_p`` keeps ``q_j ≥ min_p · max q``,
   ``top_k`` the ``k`` most likely, ``top_p`` the smallest most-likely set whose mass reaches ``top_p`` (of the
   renormalised remainder), and one draw with the request's own generator.

Streaming: text that may still turn into a stop string, or that ends in an incomplete UTF-8 sequence (``\\ufffd``),
is held back.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modlora.serve.requests import RequestError, SamplingParams, TokenLogprob


@dataclass(frozen=True)
class TokenChoice:
    """One row's chosen ``token``; with ``logprobs`` asked, its ``logprob`` under the model's raw distribution and
    the ``top`` ``(token, logprob)`` pairs, most likely first; ``error`` when no token may be chosen (the grammar
    matcher failed or every token is excluded), then ``token`` is -1."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class GrammarConstraint:
    """A compiled ``response_format``: an llguidance ``grammar`` over the server's ``tokenizer`` (an
    ``llguidance.LLTokenizer``); each request gets its own matcher."""

    grammar: str
    tokenizer: Any

    def matcher(self) -> Any:
        import llguidance

        return llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)


class RowSampler:
    """One request's sampling state across its steps: its ``params``, its ``generator``, the output's token counts
    (frequency / presence penalties), the prompt's tokens (repetition penalty) and its grammar matcher."""

    def __init__(self, params: SamplingParams, generator: torch.Generator, prompt_ids: Sequence[int]) -> None:
        self.params = params
        self.generator = generator
        self.counts: dict[int, int] = {}
        self.prompt_tokens = frozenset(prompt_ids) if params.repetition_penalty != 1.0 else frozenset()
        self.matcher = params.constraint.matcher() if params.constraint is not None else None

    def accept(self, token: int) -> None:
        """Record the chosen ``token`` (the counts; the grammar moves past it)."""
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.matcher is not None and not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    def grammar_error(self) -> str | None:
        """The grammar matcher's error, if it has one (then its mask allows nothing)."""
        if self.matcher is not None and self.matcher.is_error():
            return str(self.matcher.get_error())
        return None

    def processed(self, logits: torch.Tensor) -> torch.Tensor:
        """Steps 2-5 of the module docstring on one row's float32 logits (V,), in place; returns them."""
        p = self.params
        if self.matcher is not None:
            logits.masked_fill_(~_allowed(self.matcher, logits.shape[0]).to(logits.device), float("-inf"))
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=logits.device)
            logits.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], device=logits.device))
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(self.prompt_tokens | self.counts.keys()), dtype=torch.long,
                                device=logits.device)
            z = logits[seen]
            logits[seen] = torch.where(z > 0, z / p.repetition_penalty, z * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and self.counts:
            ids = torch.tensor(list(self.counts), dtype=torch.long, device=logits.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits.index_add_(0, ids, -(p.frequency_penalty * counts + p.presence_penalty))
        return logits

    def draw(self, logits: torch.Tensor) -> int:
        """Step 6 of the module docstring on processed logits (V,)."""
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0.0
        if 0 < p.top_k < probs.shape[0]:
            kth = torch.topk(probs, p.top_k).values[-1]
            probs[probs < kth] = 0.0                                   # (tokens tied with the k-th stay)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            if p.min_p > 0 or p.top_k > 0:
                sorted_p = sorted_p / sorted_p.sum()               # top_p over what min_p and top_k kept
            cum = sorted_p.cumsum(0)
            sorted_p[(cum - sorted_p) >= p.top_p] = 0.0             # keep the smallest prefix with mass >= top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


def choose_tokens(logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[TokenChoice]:
    """Each row's next token from one step's ``logits`` (B, V), as its :class:`RowSampler` says (see the module
    docstring); each row records its token (:meth:`RowSampler.accept`)."""
    logits = logits.float()
    raw = None
    if any(r.params.logprobs is not None for r in rows):
        raw = torch.log_softmax(logits, dim=-1)
    out = []
    for b, row in enumerate(rows):
        processed = row.processed(logits[b].clone())
        error = row.grammar_error()
        if error is None and not bool(torch.isfinite(processed).any()):
            error = "no token is allowed (the response_format grammar excludes every token)"
        if error is not None:
            out.append(TokenChoice(-1, error=error))
            continue
        token = row.draw(processed)
        choice = TokenChoice(token)
        k = row.params.logprobs
        if k is not None and raw is not None:
            choice = TokenChoice(token, *ranked(raw[b], token, k))
        row.accept(token)
        out.append(choice)
    return out


def ranked(logprobs: torch.Tensor, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """``token``'s entry of ``logprobs`` (V,) and the ``k`` largest entries as ``(token, logprob)`` pairs, largest
    first."""
    if not k:
        return float(logprobs[token]), ()
    top = torch.topk(logprobs, k)
    return float(logprobs[token]), tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int, start: int) -> list[TokenLogprob]:
    """The log-probability of each prompt token under the logits (n, V) of the positions before it: row i predicts
    ``targets[i]``, the prompt's token at position ``start + i``; with the ``k`` most likely there."""
    raw = torch.log_softmax(logits.float(), dim=-1)
    return [TokenLogprob(token, *ranked(raw[i], token, k), offset=start + i) for i, token in enumerate(targets)]


def _allowed(matcher: Any, vocab: int) -> torch.Tensor:
    """The tokens (V,) bool the grammar allows next, from llguidance's bitmask (one bit per token)."""
    import llguidance.torch as lt

    bits = lt.allocate_token_bitmask(1, vocab)
    lt.fill_next_token_bitmask(matcher, bits, 0)
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits[0].unsqueeze(1) >> shifts) & 1).flatten()[:vocab].bool()


# the JSON's layout: json.dumps' separators and no other whitespace (with free whitespace a model may emit blanks
# until max_tokens); a schema's "x-guidance" options override it
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstrainedDecoding:
    """Compiles ``response_format`` JSON schemas into :class:`GrammarConstraint` s over one tokenizer of ``vocab``
    token ids (the model's logits width) that end with ``eos_ids``; the llguidance tokenizer is built on first use
    (about 1 s for a 50k vocabulary) and kept."""

    def __init__(self, tokenizer: Any, vocab: int, eos_ids: set[int]) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab = vocab
        self.eos_ids = sorted(eos_ids)
        self._lock = threading.Lock()
        self._tokenizer: Any = None

    def tokenizer(self) -> Any:
        """The llguidance tokenizer: from the fast tokenizer's JSON, or (a tokenizer llguidance cannot read, such as
        a character-level one) from each token's text, when every token decodes to whole characters."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab,
                                                                    eos_token=self.eos_ids)
                except ValueError:
                    self._tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenTexts.of(
                        self.hf_tokenizer, self.vocab, self.eos_ids)), n_vocab=self.vocab, eos_token=self.eos_ids)
            return self._tokenizer

    def json(self, schema: Mapping[str, Any] | None, param: str) -> GrammarConstraint:
        """A constraint to JSON valid under ``schema`` (None: any JSON object, ``{"type": "json_object"}``), laid out
        as ``JSON_LAYOUT``; a :class:`RequestError` naming ``param`` when llguidance refuses the schema."""
        import llguidance

        schema = {"type": "object"} if schema is None else dict(schema)
        try:
            tokenizer = self.tokenizer()
        except (ValueError, TypeError) as exc:
            raise RequestError(f"{param}: this model's tokenizer cannot be constrained ({exc})", param=param) from None
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"{param}: {_one_line(exc)}", param=param) from None
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error and not error.startswith("WARNING"):
            raise RequestError(f"{param}: the schema is not supported: {_one_line(error)}", param=param)
        return GrammarConstraint(grammar, tokenizer)


@dataclass(frozen=True)
class _TokenTexts:
    """What ``llguidance.TokenizerWrapper`` reads: each token id's bytes (special tokens marked with 0xFF, ids past
    the tokenizer's empty), the end and start ids, and the tokenizer."""

    tokens: list[bytes]
    eos_token_id: int
    bos_token_id: int | None
    special_token_ids: list[int]
    hf: Any

    @classmethod
    def of(cls, tokenizer: Any, vocab: int, eos_ids: list[int]) -> _TokenTexts:
        special = set(tokenizer.all_special_ids)
        tokens = []
        for i in range(vocab):
            if i >= len(tokenizer):
                tokens.append(b"")
            elif i in special:
                tokens.append(b"\xff" + str(tokenizer.convert_ids_to_tokens(i)).encode())
            else:
                text = tokenizer.decode([i])
                if "\ufffd" in text:
                    raise ValueError(f"token {i} is not a whole character")
                tokens.append(text.encode())
        return cls(tokens, eos_ids[0], tokenizer.bos_token_id, sorted(special), tokenizer)

    def __call__(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


def _one_line(exc: object) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 240 else text[:237] + "..."


def stop_position(text: str, previous: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string found in ``text`` begins, searching only what ``previous`` (the text before the
    last token) could not have contained; None when there is none."""
    for stop in stops:
        at = text.find(stop, max(0, len(previous) - len(stop)))
        if at >= 0:
            return at
    return None


def sendable_end(text: str, sent: int, stops: tuple[str, ...]) -> int:
    """End of the prefix of ``text`` that may be sent now: all but the text that may still become a stop string
    and a trailing incomplete UTF-8 sequence. ``sent``: the end already sent (the caller sends ``text[sent:end]``
    when ``end > sent``)."""
    hold = max((len(st) - 1 for st in stops), default=0)
    safe = len(text) - hold
    while safe > sent and text[safe - 1] == "\ufffd":
        safe -= 1
    return safe
