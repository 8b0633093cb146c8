"""One request inside the engine: what it asked for, the snapshot and expert versions it is bound to, and its
decoding state — how each sampled token extends its text and which events that sends."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from modlora.serve.requests import Event, RequestError, RoutingRequest, SamplingParams, TokenLogprob, Usage
from modlora.serve.routing import RowRouting
from modlora.serve.sampling import RowSampler, TokenChoice, sendable_end, stop_position
from modlora.serve.snapshots import ExpertVersion, Snapshot
from modlora.serve.telemetry import RoutingTally, RoutingTelemetry, TokenRoutingLog


@dataclass
class GenerationRequest:
    """A request inside the engine (created by :meth:`~modlora.serve.engine.Engine.submit`)."""

    prompt_ids: list[int]
    sampling: SamplingParams
    router_name: str
    versions: dict[str, ExpertVersion]      # the snapshot's experts this request may use, by name
    plan: RoutingRequest
    snapshot: Snapshot
    emit: Callable[[Event], None]
    routing: RowRouting | None = None       # resolved to global indices at join time from ``versions``
    virtual: str | None = None              # a static method's combined adapter (its key in the pool)
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator = field(default_factory=torch.Generator)
    # decoding state
    generated: list[int] = field(default_factory=list)
    sampled: int = 0
    text: str = ""
    sent: int = 0
    tally: RoutingTally | None = None       # routing sums over the steps, over ``versions``
    token_log: TokenRoutingLog | None = None   # routing.per_token: each token's sums
    token_routing: list[dict[str, Any]] = field(default_factory=list)   # … and their entries, as they are read
    routing_sent: int = 0                    # entries of token_routing that an event has carried
    sampler: RowSampler = field(init=False)  # penalties' counts, grammar matcher (modlora.serve.sampling)
    logprobs: list[TokenLogprob] = field(default_factory=list)   # of tokens not yet sent (sampling.logprobs)
    reported: int = 0                        # tokens sampled that an event has counted
    admitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    stop_cut: bool = False                   # the text ends where a stop string began

    def __post_init__(self) -> None:
        self.sampler = RowSampler(self.sampling, self.generator, self.prompt_ids)

    def keys(self) -> list[str]:
        """The pool keys this request uses: its expert versions and its static method's adapter."""
        return [v.key for v in self.versions.values()] + ([self.virtual] if self.virtual else [])

    def add_token(self, choice: TokenChoice, tokenizer: Any, eos_ids: set[int]) -> tuple[str, str] | None:
        """Take one chosen token (:func:`~modlora.serve.sampling.choose_tokens`): send the text that may be sent;
        ``(finish reason, final text)`` when the request ends here (an end-of-sequence token, one of its
        ``stop_token_ids``, a stop string or ``max_tokens``), else None. A choice with an ``error`` ends the
        request with that error."""
        if choice.error is not None:
            self.finished = True
            self.emit(Event(error=RequestError(f"decoding failed: {choice.error}", status=500, code="server_error")))
            return None
        token = choice.token
        self.sampled += 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in eos_ids or token in self.sampling.stop_token_ids:
            return "stop", self.text
        if choice.logprob is not None:
            self.logprobs.append(TokenLogprob(token, choice.logprob, choice.top, len(self.text)))
        self.generated.append(token)
        text = tokenizer.decode(self.generated, skip_special_tokens=True)
        at = stop_position(text, self.text, self.sampling.stop)
        if at is not None:
            self.stop_cut = True
            return "stop", text[:at]
        self.text = text
        if len(self.generated) >= self.sampling.max_tokens:
            return "length", text
        end = sendable_end(text, self.sent, self.sampling.stop)
        if end > self.sent or self.routing_sent < len(self.token_routing):
            self._send(text[self.sent:end], end)      # text held back: an event for the tokens' routing alone
            self.sent = end
        return None

    def log_routing(self, top: int, num_layers: int, tokenizer: Any) -> None:
        """``routing.per_token``: the entries of the tokens :attr:`token_log` gained since the last call (the
        next event carries them)."""
        names = list(self.versions)
        if self.token_log is None or not names or self.virtual is not None:
            return
        self.token_routing += self.token_log.to_json(names, top, num_layers, tokenizer,
                                                     self.prompt_ids + self.generated, len(self.prompt_ids),
                                                     start=len(self.token_routing))

    def _send(self, delta: str, end: float) -> None:
        """A text event up to ``end``, with the logprobs of the tokens whose text starts before it and the routing
        entries not sent yet."""
        ready = [lp for lp in self.logprobs if lp.offset < end]
        self.logprobs = self.logprobs[len(ready):]
        routing = tuple(self.token_routing[self.routing_sent:])
        self.routing_sent = len(self.token_routing)
        self.emit(Event(delta=delta, logprobs=tuple(ready), sampled=self.sampled - self.reported,
                        token_routing=routing))
        self.reported = self.sampled

    def finish(self, reason: str, text: str, routing: RoutingTelemetry) -> None:
        """Send the rest of ``text`` and the final event (reason, usage, routing telemetry). The logprobs of
        tokens that start inside the stop string that ended it are dropped."""
        end = len(text) if self.stop_cut else math.inf
        if (len(text) > self.sent or any(lp.offset < end for lp in self.logprobs)
                or self.routing_sent < len(self.token_routing)):
            self._send(text[self.sent:], end)
        self.finished = True
        self.emit(Event(finish_reason=reason, usage=Usage(len(self.prompt_ids), self.sampled), routing=routing,
                        sampled=self.sampled - self.reported, first_token_at=self.first_token_at))
        self.reported = self.sampled

    def telemetry(self, top: int, num_layers: int, tokenizer: Any = None) -> RoutingTelemetry:
        """What the routing did for this request (see :mod:`modlora.serve.telemetry`); with ``routing.per_token``
        (and a ``tokenizer``) also each token's: the entries :meth:`log_routing` made."""
        names = list(self.versions)
        if self.virtual is not None:
            return RoutingTelemetry(self.router_name, self.snapshot.generation, [], [], 0.0, merged=names)
        if self.tally is None or not names:
            return RoutingTelemetry(self.router_name, self.snapshot.generation, [], [], 0.0,
                                    tokens=[] if self.plan.per_token else None)
        summary = self.tally.summary(self.router_name, self.snapshot.generation, names, top, num_layers)
        if self.plan.per_token and tokenizer is not None:
            self.log_routing(top, num_layers, tokenizer)
            summary.tokens = list(self.token_routing)
        return summary


def eos_token_ids(tokenizer: Any, model: torch.nn.Module) -> set[int]:
    """The token ids that end a generation: the tokenizer's end-of-sequence id and the model's generation config's."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids
