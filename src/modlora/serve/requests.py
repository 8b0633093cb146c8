"""What goes into the engine and what comes out: a request's routing and sampling, the events it receives, the
errors it may get, and the engine's options and counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modlora.errors import ModloraError
from modlora.serve.telemetry import RoutingTelemetry

if TYPE_CHECKING:
    from modlora.serve.sampling import GrammarConstraint


class RequestError(ModloraError):
    """A request the server refuses; ``status`` is the HTTP status, ``code`` the OpenAI-style error code."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass(frozen=True)
class RoutingRequest:
    """How a request wants to be routed: ``router`` (arrow, mu-delta, base, or ``expert`` with ``expert``),
    Arrow's ``top_k`` and ``temperature``, and an optional subset of ``experts`` (None: the library's; an empty
    subset is refused, never read as "all"); ``per_token``: the telemetry also gives every token's routing."""

    router: str | None = None               # None: the model id's router (or the server's default)
    expert: str | None = None
    top_k: int | None = None                # None: the server's default, at most the number of experts
    temperature: float | str | None = None  # None: the server's default; a number or 'sqrt_d'
    experts: tuple[str, ...] | None = None
    per_token: bool = False


MIN_SAMPLING_TEMPERATURE = 1e-6     # a smaller positive temperature overflows float32 logits / T
MAX_SEED = 2**63 - 1                 # the request's torch.Generator takes a 64-bit seed


@dataclass(frozen=True)
class SamplingParams:
    """Decoding (applied in the order :mod:`modlora.serve.sampling` gives): ``max_tokens`` new tokens,
    ``temperature`` (0 = greedy, else at least ``MIN_SAMPLING_TEMPERATURE``), nucleus ``top_p`` in (0, 1], ``stop``
    strings and an optional ``seed`` (0…``MAX_SEED``) for the request's own random generator; ``top_k`` (0: no
    limit), ``min_p`` in [0, 1], ``repetition_penalty`` (1: none), ``presence_penalty`` and ``frequency_penalty``,
    ``logit_bias`` ``(token, bias)`` pairs, ``stop_token_ids`` that end the output (not part of its text),
    ``logprobs`` (None: none; k: the chosen token's log-probability and the k most likely), ``prompt_logprobs``
    (None: none; k: each prompt token's log-probability after the tokens before it, and the k most likely there;
    the first token has none) and a grammar ``constraint`` (``response_format``). ``max_tokens`` 0 reads the prompt
    and samples nothing (to score it with ``prompt_logprobs``)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    constraint: GrammarConstraint | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log-probability under the model's raw distribution, the ``top`` ``(token,
    logprob)`` pairs (most likely first) and ``offset``, where its text starts in the output (a prompt token's:
    its position in the prompt)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    offset: int


@dataclass
class Event:
    """What the engine sends to a request's consumer: a text ``delta`` (with the ``logprobs`` of the tokens whose
    text it brings, when asked); or the end (``finish_reason``, usage, telemetry and ``first_token_at``, the
    ``time.monotonic()`` of its first token); or an ``error``. ``sampled``: tokens sampled since the previous
    event; ``token_routing`` (``routing.per_token``): the entries of the tokens read since the previous event
    (:meth:`~modlora.serve.telemetry.TokenRoutingLog.to_json`); ``prompt_logprobs`` (``SamplingParams.prompt_logprobs``,
    once, when the prompt has been read): prompt tokens 1 … L − 1 (L: the prompt's length)."""

    delta: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    routing: RoutingTelemetry | None = None
    error: RequestError | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    sampled: int = 0
    first_token_at: float | None = None
    token_routing: tuple[dict[str, Any], ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class EngineStats:
    """Counters of the decode loop: batched decoding ``steps``, ``rows`` decoded over them and the largest batch;
    ``prefills`` forwards that read prompts (packed chunks), ``shared_steps`` decoding steps that were one of them
    (the rows' tokens rode in the same forward), ``prompt_tokens`` admitted and ``reused_tokens`` of them found in
    the prefix cache."""

    steps: int = 0
    rows: int = 0
    max_batch: int = 0
    prefills: int = 0
    shared_steps: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0


@dataclass(frozen=True)
class EngineOptions:
    """``max_batch`` rows decode together; ``max_queue`` requests may wait (more → 429); the first request after an
    idle spell waits ``batch_wait_s`` for others; ``default_max_tokens`` when a request gives none; telemetry over
    ``layer_groups`` depth groups and the ``telemetry_top`` largest experts. ``default_top_k`` and
    ``default_temperature``: Arrow's when a request gives none (None: the registry's Arrow option defaults).
    ``prefill_tokens``: the most prompt tokens one step reads (several prompts' chunks packed together; a longer
    prompt is read over several steps between decoding steps); ``prefix_cache_tokens``: prompt tokens kept in the
    prefix cache (0: off), in blocks of ``prefix_block`` tokens."""

    max_batch: int = 16
    max_queue: int = 64
    batch_wait_s: float = 0.005
    default_max_tokens: int = 256
    layer_groups: int = 3
    telemetry_top: int = 3
    default_router: str = "arrow"
    default_top_k: int | None = None
    default_temperature: float | str | None = None
    poll_s: float = 0.05
    prefill_tokens: int = 256
    prefix_cache_tokens: int = 8192
    prefix_block: int = 16
