"""The serving engine: one background thread owns the model and runs continuous batching over a live library.

Loop (one iteration = one step):

1. **Library**: if ``library.json`` changed, the pool re-reads it and publishes a new snapshot
   (:mod:`~modlora.serve.snapshots`). Each request is bound to the snapshot current when it was admitted, by expert
   versions; the routed model holds the union of the versions in use and is re-routed between steps when that
   union changes.
2. **Admit**: waiting requests (a bounded queue; the first one after an idle period waits up to ``batch_wait_s``
   for company) start reading their prompt: the blocks the prefix cache holds for the same routing are copied in
   (with their routing telemetry), the rest is read later (:mod:`~modlora.serve.batching`).
3. **Decode**: one forward pass for every decoding row, each routed its own way inside it
   (:mod:`~modlora.serve.routing`), over the rows' KV slots; each row chooses its next token
   (:mod:`~modlora.serve.sampling`, one call for the step).
4. **Read**: one forward reads up to ``prefill_tokens`` prompt tokens, chunks of several prompts packed together,
   so a long prompt never stalls the decoding rows; a prompt read to its end chooses its first token, puts its
   blocks in the prefix cache and joins the decoding rows.
5. **Leave**: finished or cancelled rows leave (a cancelled prompt stops being read) and unpin their versions.

What a request may ask for is resolved by :mod:`~modlora.serve.catalogue`; the request and response types are in
:mod:`~modlora.serve.requests`, the routing telemetry in :mod:`~modlora.serve.telemetry`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modlora.errors import ModloraError, OptionError
from modlora.library.shared_expert import ShareInfo
from modlora.library.store import ExpertLibrary
from modlora.models import LoadedModel
from modlora.reuse.methods import REGISTRY, Registry
from modlora.serve import routing as rt
from modlora.serve.batching import (
    KVShape,
    Piece,
    PrefixCache,
    PromptRead,
    SlotCache,
    install_step_attention,
    step_inputs,
)
from modlora.serve.catalogue import Catalogue
from modlora.serve.decoding import GenerationRequest, eos_token_ids
from modlora.serve.requests import EngineOptions, EngineStats, Event, RequestError, RoutingRequest, SamplingParams
from modlora.serve.sampling import TokenChoice, choose_tokens, prompt_logprobs
from modlora.serve.served import ServedMethod
from modlora.serve.snapshots import ExpertPool, ExpertVersion, Snapshot
from modlora.serve.telemetry import RoutingTally, TokenRoutingLog

log = logging.getLogger("modlora.serve")


class Engine:
    """Owns the model and the library; serves :class:`GenerationRequest` s from one background thread."""

    def __init__(self, lm: LoadedModel, library_path: str | os.PathLike[str], options: EngineOptions | None = None,
                 name: str | None = None, registry: Registry = REGISTRY) -> None:
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.options = options or EngineOptions()
        self.registry = registry
        self.library_path = Path(library_path)
        self.name = name or self.library_path.resolve().name
        self.device = next(self.model.parameters()).device
        cfg = self.model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 2048))
        self.num_layers = int(getattr(cfg, "num_hidden_layers", 1))
        self.eos_ids = eos_token_ids(self.tokenizer, self.model)
        self._lock = threading.Lock()                 # guards snapshot swaps, the pool and admission
        self._wake = threading.Condition(self._lock)
        self._waiting: queue.SimpleQueue[GenerationRequest] = queue.SimpleQueue()
        self._num_waiting = 0
        self._pool = ExpertPool(self.library_path, self._lock)
        self._routed: Any = None
        self._router: rt.BatchRouter | None = None
        self._routed_keys: tuple[str, ...] = ()
        self._key_index: dict[str, int] = {}
        if self.options.prefill_tokens < 1:
            raise OptionError(f"prefill_tokens must be at least 1, got {self.options.prefill_tokens}")
        if self.options.prefix_cache_tokens < 0:
            raise OptionError(f"prefix_cache_tokens must be >= 0, got {self.options.prefix_cache_tokens}")
        self._slots = SlotCache(KVShape.of(self.model))
        self.rows: list[GenerationRequest] = []      # decoding, row b in slot b of ``_slots``
        self._reading: list[PromptRead] = []          # prompts being read, first come first read
        self._prefix = PrefixCache(self.options.prefix_cache_tokens, self.options.prefix_block)
        self._stop = threading.Event()
        self.stats = EngineStats()
        self._thread: threading.Thread | None = None
        library = ExpertLibrary(self.library_path)
        library.check_base_model(lm.info)
        share = ShareInfo.of(library)
        if share is not None and share.mode == "residual":  # honoured by prepare_model (route, eval), not here
            raise ModloraError(f"{self.library_path}: a residual --share library (expert {share.expert!r} applies on "
                               "every token) cannot be served yet; use modlora route / eval, or build it with "
                               "--share-mode warm")
        # a warm --share library routes over its cluster experts by default, as prepare_model
        self.catalogue = Catalogue.of(self.name, self.options, registry, share)
        self._refresh(force=True)
        self._attention = install_step_attention(self.model)      # the model's own, given back by stop()

    @property
    def snapshot(self) -> Snapshot:
        """The library as it is now (requests keep the one they were admitted with)."""
        return self._pool.snapshot

    @property
    def methods(self) -> Mapping[str, ServedMethod]:
        """The registry's methods this server runs per request, by name."""
        return self.catalogue.methods

    # ----------------------------------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="modlora-serve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._routed is not None:
            rt.detach(self._routed)
            self._routed = None
        self.model.set_attn_implementation(self._attention)

    def busy(self) -> bool:
        """True while a request waits or decodes."""
        return bool(self._num_waiting or self.rows or self._reading)

    def load(self) -> tuple[int, int]:
        """(requests waiting for a batch slot, requests decoding now): the server's metrics."""
        return self._num_waiting, len(self.rows) + len(self._reading)

    # ----------------------------------------------------------------------------------------- library
    def _refresh(self, force: bool = False) -> None:
        """Re-read the library if its manifest changed and publish a new snapshot (loads new versions only)."""
        self._pool.refresh(force)

    def _prune_and_route(self) -> None:
        """Keep the versions of the current snapshot and of every admitted request; re-route if that changed."""
        keys = self._pool.prune()
        if keys == self._routed_keys:
            return
        if self._routed is not None:
            rt.detach(self._routed)
            self._routed = None
        self._router = rt.BatchRouter(keys, self._pool.prototypes, self.num_layers, self.options.layer_groups)
        if keys:
            self._routed = rt.attach(self.model, keys, [self._pool.adapters[k] for k in keys], self._router)
        self._routed_keys = keys
        self._key_index = {k: i for i, k in enumerate(keys)}
        for req in [*self.rows, *(r.req for r in self._reading)]:    # global indices moved with the key set
            req.routing = self._row_routing(req)

    # ----------------------------------------------------------------------------------------- admission
    def resolve(self, model: str, plan: RoutingRequest | None
                ) -> tuple[str, RoutingRequest, dict[str, ExpertVersion], Snapshot]:
        """Validate a model id + routing against the current snapshot: (router, plan, expert versions, snapshot).

        Model ids: ``LIB`` (the server's router), ``LIB:<router>`` and ``LIB:expert:<name>``."""
        snap = self.snapshot
        return *self.catalogue.resolve(model, plan, snap), snap

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse an empty prompt or one whose tokens plus ``max_tokens`` exceed the model's context."""
        if prompt_tokens == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if prompt_tokens + max_tokens > self.context_length:
            raise RequestError(f"this model's context is {self.context_length} tokens; the prompt has {prompt_tokens}"
                               f" and max_tokens is {max_tokens} (total {prompt_tokens + max_tokens})",
                               code="context_length_exceeded", param="max_tokens")

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, model: str, plan: RoutingRequest | None,
               emit: Callable[[Event], None]) -> GenerationRequest:
        """Validate and queue a request; raises :class:`RequestError` (4xx, or 429 when the queue is full)."""
        self.check_length(len(prompt_ids), sampling.max_tokens)
        with self._wake:
            router, plan, versions, snap = self.resolve(model, plan)
            if self._num_waiting >= self.options.max_queue:
                raise RequestError(f"the server is busy: {self._num_waiting} requests are already waiting (limit "
                                   f"{self.options.max_queue}); retry later", status=429, code="rate_limit_exceeded")
            req = GenerationRequest(list(prompt_ids), sampling, router, versions, plan, snap, emit)
            if router in self.methods and self.methods[router].kind == "static":
                req.virtual = self._pool.combined(router, versions, self.registry)
            if sampling.seed is not None:
                req.generator.manual_seed(int(sampling.seed))
            else:
                req.generator.seed()
            self._pool.pin(req.keys())
            self._num_waiting += 1
            self._waiting.put(req)
            self._wake.notify_all()
        return req

    def _release(self, req: GenerationRequest) -> None:
        """Unpin the expert versions of a request that left."""
        self._pool.unpin(req.keys())

    # ----------------------------------------------------------------------------------------- the loop
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:   # noqa: BLE001 - the loop must survive; every affected request gets an error
                log.exception("engine step failed")
                err = RequestError(f"internal error while generating: {type(exc).__name__}", status=500,
                                   code="server_error")
                for req in self._clear():
                    req.emit(Event(error=err))
                    self._release(req)

    def _clear(self) -> list[GenerationRequest]:
        """Empty the batch and the prompts being read (after a failed step); their requests."""
        out = [*self.rows, *(r.req for r in self._reading)]
        self.rows, self._reading = [], []
        self._slots.keep([False] * len(self._slots.lengths))
        return out

    def _take_waiting(self, limit: int) -> list[GenerationRequest]:
        out: list[GenerationRequest] = []
        with self._wake:
            if not self.rows and not self._reading and self._num_waiting == 0:
                self._wake.wait(timeout=self.options.poll_s)
                if self._num_waiting == 0:
                    return out
                if self.options.batch_wait_s > 0:       # bounded wait for company after an idle spell
                    self._wake.wait(timeout=self.options.batch_wait_s)
            while len(out) < limit and self._num_waiting:
                out.append(self._waiting.get_nowait())
                self._num_waiting -= 1
        return out

    def _step(self) -> None:
        self._refresh()
        joining = self._take_waiting(self.options.max_batch - len(self.rows) - len(self._reading))
        self._prune_and_route()
        for req in joining:
            if req.cancelled:
                self._release(req)
                continue
            try:
                req.routing = self._row_routing(req)
                self._reading.append(self._start_reading(req))
            except Exception as exc:  # noqa: BLE001 - this request fails alone; the batch goes on
                log.exception("admission failed")
                req.emit(Event(error=RequestError(f"internal error while reading the prompt: "
                                                  f"{type(exc).__name__}", status=500, code="server_error")))
                self._release(req)
        self._leave()
        if self.rows or self._reading:
            self._forward()
            self._leave()

    def _row_routing(self, req: GenerationRequest) -> rt.RowRouting:
        """The request's routing over the routed model's experts (global indices of its versions, or of its
        static method's combined adapter)."""
        keys = [req.virtual] if req.virtual is not None else [v.key for v in req.versions.values()]
        ids = [self._key_index[k] for k in keys]
        if req.router_name in self.methods and self.methods[req.router_name].kind == "arrow":
            plan = req.plan
            assert plan.top_k is not None and plan.temperature is not None      # filled in at admission
            return rt.RowRouting("arrow", tuple(ids), plan.top_k, plan.temperature)
        return rt.RowRouting.uniform(ids)

    def _prefix_key(self, req: GenerationRequest) -> Hashable:
        """What a prompt's keys/values and telemetry depend on besides its tokens: the row's routing and the
        request's own expert versions (the telemetry's columns), by version keys (global indices move when the
        routed key set changes)."""
        routing = req.routing
        assert routing is not None
        keys = self._routed_keys
        own = tuple(v.key for v in req.versions.values())
        if routing.kind == "arrow":
            return ("arrow", tuple(keys[i] for i in routing.allowed), routing.top_k, str(routing.temperature), own)
        return ("fixed", tuple(sorted((keys[i], w) for i, w in (routing.fixed or {}).items())), own)

    def _start_reading(self, req: GenerationRequest) -> PromptRead:
        """A prompt about to be read, with the blocks the prefix cache holds for it copied in (and their routing
        telemetry added to the request's). A request that wants per-token telemetry or its prompt's log-probabilities
        reads its whole prompt."""
        kv = self._slots.shape.empty(self._slots.shape.heads, len(req.prompt_ids))
        read = PromptRead(req, kv, key=self._prefix_key(req))
        self.stats.prompt_tokens += len(req.prompt_ids)
        if req.plan.per_token or req.sampling.prompt_logprobs is not None:
            return read
        blocks = self._prefix.lookup(read.key, req.prompt_ids)
        if blocks:
            n = len(blocks) * self._prefix.block
            kv[:, :, :, :n] = torch.cat([b.kv for b in blocks], dim=3)
            for b in blocks:
                if b.tally is not None:
                    req.tally = _merged(req.tally, b.tally)
            read.done = read.reused = n
            read.blocks = [b.tally for b in blocks]
            self.stats.reused_tokens += n
        return read

    def _own_columns(self, req: GenerationRequest) -> list[int]:
        return [self._key_index[v.key] for v in req.versions.values()]

    def _pieces(self) -> list[Piece]:
        """What this step reads: up to ``prefill_tokens`` prompt tokens, the oldest prompts first."""
        budget, pieces = self.options.prefill_tokens, []
        for read in self._reading:
            count = min(read.length - read.done, budget)
            if count <= 0:
                break
            pieces.append(Piece(read, read.done, count))
            budget -= count
        return pieces

    def _forward(self) -> None:
        """One engine step in one forward: the pieces of prompts this step reads, packed, then the next token of
        every decoding row (each at its own position over its slot). Prompts read to their end choose their first
        token and join the decoding rows."""
        rows, pieces = list(self.rows), self._pieces()
        if rows:
            self.stats.steps += 1
            self.stats.rows += len(rows)
            self.stats.max_batch = max(self.stats.max_batch, len(rows))
        if pieces:
            self.stats.prefills += 1
            self.stats.shared_steps += bool(rows)
        # telemetry segments: one per (piece, prompt block), so each block's routing sums can go to the prefix
        # cache, then one per decoding row
        bs = self._prefix.block
        token_rows, segments, seg_of = [], [], []
        for i, p in enumerate(pieces):
            for pos in range(p.start, p.end):
                if not seg_of or seg_of[-1] != (i, pos // bs):
                    seg_of.append((i, pos // bs))
                token_rows.append(i)
                segments.append(len(seg_of) - 1)
        t = len(token_rows)
        token_rows += range(len(pieces), len(pieces) + len(rows))
        segments += range(len(seg_of), len(seg_of) + len(rows))
        # the positions whose logits are kept: every position of a prompt that wants its log-probabilities, the
        # last position of each prompt read to its end (its first token), then every decoding row's
        keep: list[int] = []
        scored_rows: dict[int, int] = {}               # piece → the row of its first position in the kept logits
        first_token_rows: dict[int, int] = {}          # piece → the row of its last position (the first new token)
        offset = 0
        for i, p in enumerate(pieces):
            if p.read.req.sampling.prompt_logprobs is not None:
                scored_rows[i] = len(keep)
                keep += range(offset, offset + p.count)
            elif p.end == p.read.length:
                keep.append(offset + p.count - 1)
            if p.end == p.read.length:
                first_token_rows[i] = len(keep) - 1
            offset += p.count
        read_logits = len(keep)
        keep += range(t, t + len(rows))
        positions = list(self._slots.lengths)
        inputs = step_inputs(pieces, self._slots if rows else None, [r.generated[-1] for r in rows],
                             self._slots.shape)
        routed = self._route([p.read.req for p in pieces] + rows, token_rows, segments)
        logits = self._logits(inputs, keep)
        if rows:
            self._slots.advance()
        tel = self._telemetry(routed)
        if tel is not None:
            self._tally_pieces(pieces, seg_of, tel)
            for b, req in enumerate(rows):
                own, s = self._own_columns(req), len(seg_of) + b
                req.tally = RoutingTally.add(req.tally, tel.mass[s], own, tel.entropy[s], tel.tokens[s])
                self._log_tokens(req, tel, t + b, t + b + 1, positions[b], tel.tokens[s], own)
        if rows:
            self._add_tokens(rows, logits[read_logits:])
        if pieces:
            self._end_reading(pieces, logits[:read_logits], scored_rows, first_token_rows)

    def _end_reading(self, pieces: Sequence[Piece], logits: torch.Tensor, scored_rows: dict[int, int],
                     first_token_rows: dict[int, int]) -> None:
        """After a step read ``pieces`` (``logits``: the rows kept for them): log-probabilities of the prompts
        that asked, the prefix cache, and each prompt read to its end chooses its first token and joins the
        decoding rows (or ends, when it asked for its prompt only)."""
        bs = self._prefix.block
        for i, p in enumerate(pieces):
            p.read.done = p.end
            if i in scored_rows:      # row j predicts prompt token start + j + 1 (the last row: the first new token)
                targets, row = p.read.req.prompt_ids[p.start + 1:p.end + 1], scored_rows[i]
                p.read.logprobs += prompt_logprobs(logits[row:row + len(targets)], targets,
                                                   p.read.req.sampling.prompt_logprobs, p.start + 1)
        done = [pieces[i].read for i in first_token_rows]
        for read in done:
            if read.key is not None:
                self._prefix.insert(read.key, read.req.prompt_ids, read.kv,
                                    read.blocks + [None] * (read.length // bs - len(read.blocks)))
            if read.req.sampling.prompt_logprobs is not None:
                read.req.emit(Event(prompt_logprobs=tuple(read.logprobs)))
        self._reading = [r for r in self._reading if r not in done]
        scored = [r for r in done if r.req.sampling.max_tokens == 0]       # the prompt only: nothing to sample
        for read in scored:
            self._finish(read.req, "length", "")
            self._release(read.req)
        sampling = [i for i in first_token_rows if pieces[i].read not in scored]
        if sampling:
            self._add_tokens([pieces[i].read.req for i in sampling],
                             logits[torch.tensor([first_token_rows[i] for i in sampling], device=logits.device)])
        for i in sampling:
            read = pieces[i].read
            self._slots.join(read.kv, read.length)
            self.rows.append(read.req)

    def _tally_pieces(self, pieces: Sequence[Piece], seg_of: list[tuple[int, int]], tel: rt.RowTelemetry) -> None:
        """A packed read's routing sums: segment ``s`` is piece ``seg_of[s][0]``'s tokens in prompt block
        ``seg_of[s][1]``; each goes to its request's tally and to its block's (for the prefix cache)."""
        offset = 0
        for i, p in enumerate(pieces):
            req, own = p.read.req, self._own_columns(p.read.req)
            segs = [s for s, (row, _) in enumerate(seg_of) if row == i]
            for s in segs:
                part = RoutingTally.add(None, tel.mass[s], own, tel.entropy[s], tel.tokens[s])
                j = seg_of[s][1]
                p.read.blocks += [None] * (j + 1 - len(p.read.blocks))
                p.read.blocks[j] = _merged(p.read.blocks[j], part)
                req.tally = _merged(req.tally, part)
            self._log_tokens(req, tel, offset, offset + p.count, p.start, tel.tokens[segs].sum(0), own)
            offset += p.count

    def _logits(self, inputs: dict[str, Any], positions: list[int]) -> torch.Tensor:
        """Run the model on a step's ``inputs`` (one packed row); the logits at ``positions`` (len(positions), V)."""
        if not positions:
            positions = [0]                                  # nothing to choose: the smallest lm_head product
        index = torch.tensor(positions, device=self.device)
        if self._slots.shape.keeps_logits:
            return self.model(**inputs, use_cache=True, logits_to_keep=index).logits[0]
        return self.model(**inputs, use_cache=True).logits[0].index_select(0, index)

    def _route(self, rows: Sequence[GenerationRequest], token_rows: list[int] | None = None,
               segments: list[int] | None = None) -> bool:
        """Set each row's routing for the next forward (``token_rows``, ``segments``: see
        :meth:`~modlora.serve.routing.BatchRouter.set_rows`); False when the model is not routed (no experts)."""
        if self._router is None or self._routed is None:
            return False
        self._router.set_rows([r.routing for r in rows], token_rows, segments,
                              per_token=any(r.plan.per_token for r in rows))
        return True

    def _telemetry(self, routed: bool) -> rt.RowTelemetry | None:
        """The last forward's routing sums, on the CPU (None when it was not routed)."""
        if not routed or self._router is None or self._router.telemetry is None:
            return None
        return self._router.telemetry.cpu()

    def _log_tokens(self, req: GenerationRequest, tel: rt.RowTelemetry, lo: int, hi: int, start: int,
                    calls: torch.Tensor, own: list[int]) -> None:
        """``routing.per_token``: the request's tokens ``lo … hi − 1`` of the forward, at positions from
        ``start``, logged and made into entries for the request's next event."""
        if not req.plan.per_token or tel.token_mass is None or tel.token_entropy is None:
            return
        req.token_log = req.token_log or TokenRoutingLog()
        req.token_log.add(torch.ones(start + hi - lo), tel.token_mass[lo:hi], own, tel.token_entropy[lo:hi], calls)
        req.log_routing(self.options.telemetry_top, self.num_layers, self.tokenizer)

    def _leave(self) -> None:
        """Drop finished or cancelled rows and prompts (``cancelled`` is set from other threads: read once)."""
        gone = [r.cancelled or r.finished for r in self.rows]
        if any(gone):
            left = [r for r, g in zip(self.rows, gone, strict=True) if g]
            order = self._slots.keep([not g for g in gone])
            self.rows = [self.rows[b] for b in order]
            for req in left:
                self._release(req)
        stopped = [r for r in self._reading if r.req.cancelled or r.req.finished]
        if stopped:
            self._reading = [r for r in self._reading if r not in stopped]
            for read in stopped:
                self._release(read.req)

    def _add_tokens(self, rows: Sequence[GenerationRequest], logits: torch.Tensor) -> None:
        """Each row's next token from the step's ``logits`` (B, V): one call into sampling for the whole step."""
        for req, choice in zip(rows, choose_tokens(logits, [r.sampler for r in rows]), strict=True):
            self._add_token(req, choice)

    def _add_token(self, req: GenerationRequest, choice: TokenChoice) -> None:
        end = req.add_token(choice, self.tokenizer, self.eos_ids)
        if end is not None:
            self._finish(req, *end)

    def _finish(self, req: GenerationRequest, reason: str, text: str) -> None:
        """End ``req`` with ``reason`` and its final ``text``, and its routing telemetry."""
        req.finish(reason, text, routing=req.telemetry(self.options.telemetry_top, self.num_layers, self.tokenizer))


def _merged(tally: RoutingTally | None, part: RoutingTally) -> RoutingTally:
    """``tally`` plus ``part`` (same columns): ``tally`` updated in place, or a copy of ``part`` when None."""
    return RoutingTally.add(tally, part.mass, list(range(part.mass.shape[1])), part.entropy, part.tokens)
