"""The serving engine: one background thread owns the model and runs continuous batching over a live library.

Loop (one iteration = one decoding step):

1. **Library**: if ``library.json`` changed, the pool re-reads it and publishes a new snapshot
   (:mod:`~modlora.serve.snapshots`). Each request is bound to the snapshot current when it was admitted, by expert
   versions; the routed model holds the union of the versions in use and is re-routed between steps when that
   union changes.
2. **Join**: waiting requests (a bounded queue; the first one after an idle period waits up to ``batch_wait_s``
   for company) are prefilled one by one, sample their first token and join the batch
   (:mod:`~modlora.serve.batching`).
3. **Decode**: one forward pass for the whole batch, each example routed its own way inside it
   (:mod:`~modlora.serve.routing`); each row samples its next token (:mod:`~modlora.serve.sampling`).
4. **Leave**: finished or cancelled rows are dropped from the batch and unpin their expert versions.

What a request may ask for is resolved by :mod:`~modlora.serve.catalogue`; the request and response types are in
:mod:`~modlora.serve.requests`, the routing telemetry in :mod:`~modlora.serve.telemetry`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from modlora.errors import ModloraError
from modlora.library.shared_expert import ShareInfo
from modlora.library.store import ExpertLibrary
from modlora.models import LoadedModel
from modlora.reuse.methods import REGISTRY, Registry
from modlora.serve import routing as rt
from modlora.serve.batching import Batch
from modlora.serve.catalogue import Catalogue
from modlora.serve.decoding import GenerationRequest, eos_token_ids
from modlora.serve.requests import EngineOptions, EngineStats, Event, RequestError, RoutingRequest, SamplingParams
from modlora.serve.sampling import sample_token
from modlora.serve.served import ServedMethod
from modlora.serve.snapshots import ExpertPool, ExpertVersion, Snapshot
from modlora.serve.telemetry import RoutingTally

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
        self._batch = Batch(self.model)
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

    def busy(self) -> bool:
        """True while a request waits or decodes."""
        return bool(self._num_waiting or self._batch.rows)

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
                for req in self._batch.clear():
                    req.emit(Event(error=err))
                    self._release(req)

    def _take_waiting(self, limit: int) -> list[GenerationRequest]:
        out: list[GenerationRequest] = []
        with self._wake:
            if not self._batch.rows and self._num_waiting == 0:
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
        joining = self._take_waiting(self.options.max_batch - len(self._batch.rows))
        self._prune_and_route()
        for req in joining:
            if req.cancelled:
                self._release(req)
                continue
            try:
                req.routing = self._row_routing(req)
                self._prefill(req)
            except Exception as exc:  # noqa: BLE001 - this request fails alone; the batch goes on
                log.exception("prefill failed")
                if req not in self._batch.rows:
                    req.emit(Event(error=RequestError(f"internal error while reading the prompt: "
                                                      f"{type(exc).__name__}", status=500, code="server_error")))
                    self._release(req)
                else:
                    raise
        self._leave()
        if self._batch.rows:
            self._decode()
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

    def _forward(self, rows: Sequence[GenerationRequest], **kwargs: Any) -> tuple[torch.Tensor, DynamicCache]:
        """One forward of ``rows`` routed each their own way: last-position logits (B, V) and the updated cache."""
        if self._router is not None and self._routed is not None:
            self._router.set_rows([r.routing for r in rows])
        out = self.model(**kwargs, use_cache=True)
        if self._router is not None and self._router.telemetry is not None and self._routed is not None:
            tel = self._router.telemetry
            for b, req in enumerate(rows):
                own = [self._key_index[v.key] for v in req.versions.values()]
                req.tally = RoutingTally.add(req.tally, tel.mass[b], own, tel.entropy[b], tel.tokens[b])
        cache = out.get("cache", None) or out.get("past_key_values", None)
        return out.logits[:, -1], cache

    def _prefill(self, req: GenerationRequest) -> None:
        self.stats.prefills += 1
        inputs = self._batch.prefill_inputs(req, self.device)
        logits, cache = self._forward([req], **inputs)
        self._add_token(req, logits[0])
        self._batch.join(req, cache, inputs["attention_mask"])

    def _decode(self) -> None:
        rows = self._batch.rows
        self.stats.steps += 1
        self.stats.rows += len(rows)
        self.stats.max_batch = max(self.stats.max_batch, len(rows))
        inputs = self._batch.decode_inputs(self.device)
        logits, cache = self._forward(rows, **inputs)
        self._batch.advance(cache, inputs["attention_mask"])
        for b, req in enumerate(rows):
            self._add_token(req, logits[b])

    def _leave(self) -> None:
        for req in self._batch.leave():
            self._release(req)

    def _add_token(self, req: GenerationRequest, logits: torch.Tensor) -> None:
        end = req.add_token(sample_token(logits, req.sampling, req.generator), self.tokenizer, self.eos_ids)
        if end is not None:
            req.finish(*end, routing=req.telemetry(self.options.telemetry_top, self.num_layers))
