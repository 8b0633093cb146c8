"""Routing telemetry of one request: what the batch router measured at each step, summed over the request's steps,
and the summary every response carries.

Per depth group g of layers (``groups`` equal slices of the decoder blocks) the router gives, for each example and
step, the routing mass ``Σ_tokens w`` (E,), the entropy ``Σ_tokens −Σ_e w_e log w_e`` and the token count
(:class:`~modlora.serve.routing.RowTelemetry`); :class:`RoutingTally` sums them over the steps, and the summary
divides by the tokens: mean weight per token and routed layer, mean entropy (nats) per token and layer. A request
with ``routing.per_token`` also keeps each token's sums (:class:`TokenRoutingLog`): the same summary per token.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RoutingTelemetry:
    """What the routing did for one request: router, library generation, experts with the largest routing mass
    (mean weight per token and routed layer) overall and per depth group of layers, and the mean routing entropy
    (nats) per token and layer."""

    router: str
    generation: int
    top_experts: list[tuple[str, float]]
    groups: list[dict[str, Any]]
    entropy: float
    merged: list[str] = field(default_factory=list)     # a static method: the experts merged into its adapter
    tokens: list[dict[str, Any]] | None = None         # routing.per_token: one entry per token read (TokenRoutingLog)
    mass: dict[str, float] = field(default_factory=dict)   # Σ over routed (token, layer) pairs of each expert's weight
    token_layers: float = 0.0                               # how many routed (token, layer) pairs that sums over

    def to_json(self) -> dict[str, Any]:
        out = {"router": self.router, "library_generation": self.generation,
               "top_experts": [{"expert": n, "mass": round(m, 6)} for n, m in self.top_experts],
               "entropy": round(self.entropy, 6), "layer_groups": self.groups}
        if self.merged:
            out["merged_experts"] = self.merged
        if self.tokens is not None:
            out["tokens"] = self.tokens
        return out


def layer_range(group: int, groups: int, num_layers: int) -> str:
    """The decoder blocks ``"lo-hi"`` of depth group ``group`` of ``groups`` equal slices of ``num_layers``."""
    lo, hi = -(-group * num_layers // groups), -(-(group + 1) * num_layers // groups) - 1
    return f"{lo}-{hi}"


@dataclass
class RoutingTally:
    """Sums over a request's steps, per depth group: routing ``mass`` (groups, E) over the request's own experts,
    ``entropy`` (groups,) and ``tokens`` (groups,)."""

    mass: torch.Tensor
    entropy: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def add(cls, tally: RoutingTally | None, mass: torch.Tensor, columns: list[int], entropy: torch.Tensor,
            tokens: torch.Tensor) -> RoutingTally:
        """``tally`` plus one step's sums (a new tally when there is none yet, else ``tally`` updated in place):
        ``mass`` (groups, E) over the routed model's experts, of which the request's own are ``columns``."""
        if columns:
            mass = mass.index_select(1, torch.tensor(columns, dtype=torch.long))
        else:
            mass = mass.new_zeros(mass.shape[0], 0)
        if tally is None:
            return cls(mass.clone(), entropy.clone(), tokens.clone())
        tally.mass += mass
        tally.entropy += entropy
        tally.tokens += tokens
        return tally

    def summary(self, router: str, generation: int, names: list[str], top: int,
                num_layers: int) -> RoutingTelemetry:
        """The ``top`` experts (of ``names``, the mass's columns) by mean weight, overall and per depth group of
        ``num_layers`` decoder blocks, and the mean entropy."""
        tokens = self.tokens.clamp_min(1)
        per_group = self.mass / tokens.unsqueeze(1)                                  # (groups, E) mean weight
        overall = self.mass.sum(0) / self.tokens.sum().clamp_min(1)

        def ranked(v: torch.Tensor) -> list[tuple[str, float]]:
            vals, idx = torch.topk(v, min(top, len(names)))
            return [(names[i], float(x)) for x, i in zip(vals.tolist(), idx.tolist(), strict=True) if x > 0]

        G, L = per_group.shape[0], num_layers
        groups = []
        for g in range(G):
            if float(self.tokens[g]) == 0:
                continue
            groups.append({"layers": layer_range(g, G, L),
                           "top_experts": [{"expert": n, "mass": round(m, 6)} for n, m in ranked(per_group[g])],
                           "entropy": round(float(self.entropy[g] / tokens[g]), 6)})
        return RoutingTelemetry(router, generation, ranked(overall), groups,
                                float(self.entropy.sum() / self.tokens.sum().clamp_min(1)),
                                mass=dict(zip(names, self.mass.sum(0).tolist(), strict=True)),
                                token_layers=float(self.tokens.sum()))


@dataclass
class TokenRoutingLog:
    """Per token the model read for a request (``routing.per_token``): its ``positions`` in the request's sequence
    (prompt, then each generated token as it is fed back), the routing ``mass`` (n, groups, E) over the request's
    own experts and the ``entropy`` (n, groups), each summed over the group's routed layers, and ``layers``
    (groups,), how many routed layers each group has (the router's calls per token)."""

    positions: list[int] = field(default_factory=list)
    mass: list[torch.Tensor] = field(default_factory=list)
    entropy: list[torch.Tensor] = field(default_factory=list)
    layers: torch.Tensor | None = None

    def add(self, mask: torch.Tensor, mass: torch.Tensor, columns: list[int], entropy: torch.Tensor,
            calls: torch.Tensor) -> None:
        """One forward's tokens of this request: ``mask`` (L,) its attention mask over the cache and the ``seq``
        new positions (its last ``seq`` entries; 0 = padding), ``mass`` (seq, groups, E) over the routed model's
        experts (the request's own are ``columns``), ``entropy`` (seq, groups), ``calls`` (groups,) the router's
        token-layer calls per group over the ``seq`` positions."""
        seq = mass.shape[0]
        mass, entropy, calls = mass.cpu(), entropy.cpu(), calls.cpu()
        real = mask[-seq:].bool().cpu()
        position = mask.long().cumsum(0)[-seq:].cpu() - 1
        self.positions += position[real].tolist()
        self.mass.append(mass[real].index_select(2, torch.tensor(columns, dtype=torch.long)))
        self.entropy.append(entropy[real])
        self.layers = calls / seq

    def to_json(self, names: list[str], top: int, num_layers: int, tokenizer: Any, ids: list[int],
                prompt_tokens: int, start: int = 0) -> list[dict[str, Any]]:
        """One entry per token read from the ``start``-th on: position, ``source`` (prompt or completion), ``text``
        (its piece of ``ids``, :func:`token_pieces`), the ``top`` experts by mean weight per routed layer and the
        mean entropy (nats), overall and per depth group of ``num_layers`` blocks (the request summary's shape, for
        one token). An entry depends on its token alone (and the routed layers per group, the same at every
        forward), so the entries made as the tokens are read equal those made at the end."""
        if len(self.positions) <= start or self.layers is None:
            return []
        first, rows = len(self.mass), len(self.positions)      # the first forward holding token ``start``, and the
        while rows > start:                                      # tokens before that forward
            first -= 1
            rows -= self.mass[first].shape[0]
        skip = start - rows
        mass = torch.cat(self.mass[first:])[skip:]                                   # (n, G, E)
        entropy = torch.cat(self.entropy[first:])[skip:]                             # (n, G)
        positions = self.positions[start:]
        pieces = token_pieces(tokenizer, ids, positions)
        layers = self.layers.clamp_min(1)
        per_group = mass / layers[None, :, None]
        overall = mass.sum(1) / self.layers.sum().clamp_min(1)                      # (n, E)
        k = min(top, len(names))
        g_vals, g_idx = (t.tolist() for t in torch.topk(per_group, k, dim=2))
        o_vals, o_idx = (t.tolist() for t in torch.topk(overall, k, dim=1))
        g_ent = (entropy / layers).tolist()
        o_ent = (entropy.sum(1) / self.layers.sum().clamp_min(1)).tolist()
        G = mass.shape[1]
        used = [g for g in range(G) if float(self.layers[g]) > 0]
        labels = [layer_range(g, G, num_layers) for g in range(G)]

        def ranked(vals: list[float], idx: list[int]) -> list[dict[str, Any]]:
            return [{"expert": names[i], "mass": round(v, 6)} for v, i in zip(vals, idx, strict=True) if v > 0]

        return [{"position": p, "source": "prompt" if p < prompt_tokens else "completion", "text": pieces[t],
                 "top_experts": ranked(o_vals[t], o_idx[t]), "entropy": round(o_ent[t], 6),
                 "layer_groups": [{"layers": labels[g], "top_experts": ranked(g_vals[t][g], g_idx[t][g]),
                                   "entropy": round(g_ent[t][g], 6)} for g in used]}
                for t, p in enumerate(positions)]


def token_pieces(tokenizer: Any, ids: list[int], positions: list[int] | None = None, window: int = 8) -> list[str]:
    """The text each token of ``ids`` at ``positions`` (default: all) adds (special tokens kept): the decoded tail
    after its ``window`` predecessors. A token that ends inside a multi-byte character adds nothing; the token that
    completes it carries the character."""
    pieces = []
    for i in range(len(ids)) if positions is None else positions:
        ctx = ids[max(0, i - window):i]
        before = tokenizer.decode(ctx, skip_special_tokens=False).rstrip("\ufffd")
        after = tokenizer.decode([*ctx, ids[i]], skip_special_tokens=False).rstrip("\ufffd")
        pieces.append(after[len(before):] if after.startswith(before) else after)
    return pieces


@dataclass(frozen=True)
class ServingState:
    """What the engine reports at a scrape: requests ``waiting`` and ``running``, decoding ``steps`` and the
    ``rows`` decoded over them, and the live library's ``experts`` and ``generation``."""

    waiting: int
    running: int
    steps: int
    rows: int
    experts: int
    generation: int


TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))
TOKENS_WINDOW_S = 10.0


class ServingMetrics:
    """The server's Prometheus metrics (``GET /metrics``; the names and meanings are in docs/serving.md), in a
    registry of its own: the engine's state read at each scrape from ``state``, and what the app observes as
    responses are written (tokens, time to first token, latency, how requests ended, routing mass per expert)."""

    def __init__(self, state: Callable[[], ServingState]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self._recent: deque[tuple[float, int]] = deque()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(state, self))
        self._tokens = Counter("modlora_generation_tokens", "Tokens generated (sampled), all requests; tokens/s = "
                               "rate()", registry=self.registry)
        self._prompt = Counter("modlora_prompt_tokens", "Prompt tokens of admitted requests", registry=self.registry)
        self._ttft = Histogram("modlora_time_to_first_token_seconds", "Request arrival to its first token",
                               buckets=TTFT_BUCKETS, registry=self.registry)
        self._latency = Histogram("modlora_request_latency_seconds", "Request arrival to its last token",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self._ended = Counter("modlora_requests", "Requests (choices) that ended, by how", ["finish_reason"],
                              registry=self.registry)
        self._mass = Counter("modlora_routing_mass", "Sum over generated tokens and routed layers of the expert's "
                             "routing weight", ["expert"], registry=self.registry)
        self._token_layers = Counter("modlora_routing_token_layers", "Routed (token, layer) pairs; an expert's "
                                     "share = rate(mass) / rate(this)", registry=self.registry)

    def admitted(self, prompt_tokens: int) -> None:
        self._prompt.inc(prompt_tokens)

    def tokens(self, n: int) -> None:
        """``n`` more tokens generated (counted as their events reach the client)."""
        if n:
            self._tokens.inc(n)
            self._recent.append((time.monotonic(), n))

    def tokens_per_second(self) -> float:
        """Tokens generated over the last ``TOKENS_WINDOW_S`` seconds, per second."""
        start = time.monotonic() - TOKENS_WINDOW_S
        while self._recent and self._recent[0][0] < start:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / TOKENS_WINDOW_S

    def finished(self, reason: str, arrived: float, first_token_at: float | None,
                 routing: RoutingTelemetry | None) -> None:
        """A choice ended with ``reason``; its times (``time.monotonic()``) and routing."""
        now = time.monotonic()
        self._ended.labels(reason).inc()
        if first_token_at is not None:
            self._ttft.observe(max(0.0, first_token_at - arrived))
        self._latency.observe(now - arrived)
        if routing is not None and routing.token_layers:
            for expert, mass in routing.mass.items():
                self._mass.labels(expert).inc(mass)
            self._token_layers.inc(routing.token_layers)

    def ended(self, reason: str) -> None:
        """A choice ended without finishing (``cancelled`` or ``error``)."""
        self._ended.labels(reason).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its media type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """The engine's gauges and counters, read at each scrape."""

    def __init__(self, state: Callable[[], ServingState], metrics: ServingMetrics) -> None:
        self.state, self.metrics = state, metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.state()
        yield GaugeMetricFamily("modlora_requests_waiting", "Requests queued for a batch slot", value=s.waiting)
        yield GaugeMetricFamily("modlora_requests_running", "Requests decoding in the batch now", value=s.running)
        yield CounterMetricFamily("modlora_decode_steps", "Batched decoding steps", value=s.steps)
        yield CounterMetricFamily("modlora_decode_rows", "Rows decoded over the steps; mean batch size = "
                                  "rate(rows) / rate(steps)", value=s.rows)
        yield GaugeMetricFamily("modlora_generation_tokens_per_second", f"Tokens generated per second over the last "
                                f"{TOKENS_WINDOW_S:g} s", value=self.metrics.tokens_per_second())
        yield GaugeMetricFamily("modlora_library_experts", "Experts in the served snapshot", value=s.experts)
        yield GaugeMetricFamily("modlora_library_generation", "The live library's snapshot generation",
                                value=s.generation)
