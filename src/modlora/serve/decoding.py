"""One request inside the engine: what it asked for, the snapshot and expert versions it is bound to, and its
decoding state — how each sampled token extends its text and which events that sends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from modlora.serve.requests import Event, RoutingRequest, SamplingParams, Usage
from modlora.serve.routing import RowRouting
from modlora.serve.sampling import sendable_end, stop_position
from modlora.serve.snapshots import ExpertVersion, Snapshot
from modlora.serve.telemetry import RoutingTally, RoutingTelemetry


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

    def keys(self) -> list[str]:
        """The pool keys this request uses: its expert versions and its static method's adapter."""
        return [v.key for v in self.versions.values()] + ([self.virtual] if self.virtual else [])

    def add_token(self, token: int, tokenizer: Any, eos_ids: set[int]) -> tuple[str, str] | None:
        """Take one sampled token: send the text that may be sent; ``(finish reason, final text)`` when the
        request ends here (an end-of-sequence token, a stop string or ``max_tokens``), else None."""
        self.sampled += 1
        if token in eos_ids:
            return "stop", self.text
        self.generated.append(token)
        text = tokenizer.decode(self.generated, skip_special_tokens=True)
        at = stop_position(text, self.text, self.sampling.stop)
        if at is not None:
            return "stop", text[:at]
        self.text = text
        if len(self.generated) >= self.sampling.max_tokens:
            return "length", text
        end = sendable_end(text, self.sent, self.sampling.stop)
        if end > self.sent:
            self.emit(Event(delta=text[self.sent:end]))
            self.sent = end
        return None

    def finish(self, reason: str, text: str, routing: RoutingTelemetry) -> None:
        """Send the rest of ``text`` and the final event (reason, usage, routing telemetry)."""
        if len(text) > self.sent:
            self.emit(Event(delta=text[self.sent:]))
        self.finished = True
        self.emit(Event(finish_reason=reason, usage=Usage(len(self.prompt_ids), self.sampled), routing=routing))

    def telemetry(self, top: int, num_layers: int) -> RoutingTelemetry:
        """What the routing did for this request (see :mod:`modlora.serve.telemetry`)."""
        names = list(self.versions)
        if self.virtual is not None:
            return RoutingTelemetry(self.router_name, self.snapshot.generation, [], [], 0.0, merged=names)
        if self.tally is None or not names:
            return RoutingTelemetry(self.router_name, self.snapshot.generation, [], [], 0.0)
        return self.tally.summary(self.router_name, self.snapshot.generation, names, top, num_layers)


def eos_token_ids(tokenizer: Any, model: torch.nn.Module) -> set[int]:
    """The token ids that end a generation: the tokenizer's end-of-sequence id and the model's generation config's."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids
