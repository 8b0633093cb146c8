"""The serving engine: one background thread owns the model and runs continuous batching over a live library.

Loop (one iteration = one decoding step):

1. **Library**: if ``library.json`` changed (mtime, size, inode), re-read it and load the new or re-written experts
   (their files are checked against the manifest's SHA-256; an expert that fails is left out and logged). The
   result is a new immutable :class:`Snapshot`. Each request is bound to the snapshot current when it was admitted,
   by expert *versions* (``name@sha``), so a request never sees an expert appear, change or vanish mid-generation.
   The routed model holds the union of the versions in use; it is re-routed between steps when that union changes.
   Arrow prototypes come from the library's artifact cache (written atomically for a new expert only).
2. **Join**: waiting requests (a bounded queue; the first one after an idle period waits up to ``batch_wait_s``
   for company) are prefilled one by one, sample their first token and join the batch.
3. **Decode**: one forward pass for the whole batch. The KV caches of the members are kept left-padded in one
   ``DynamicCache`` (B, heads, L, d) with an attention mask (B, L) that hides the padding; every row gets its own
   position ids (its real length), so a row's result equals running it alone (up to float rounding).
4. **Leave**: finished or cancelled rows are dropped from the cache (``index_select`` on the batch axis, then the
   all-padding columns on the left are trimmed).

Each example is routed its own way inside the shared forward (see :mod:`modlora.serve.routing`).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from modlora.errors import LibraryError, ModloraError
from modlora.library.experts import ShareInfo
from modlora.library.store import ExpertLibrary
from modlora.models import LoadedModel
from modlora.reuse.methods import REGISTRY, Registry
from modlora.serve import routing as rt

log = logging.getLogger("modlora.serve")



class RequestError(ModloraError):
    """A request the server refuses; ``status`` is the HTTP status, ``code`` the OpenAI-style error code."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass(frozen=True)
class ExpertVersion:
    """One expert as stored at one time: ``name`` and the SHA-256 of its weights file."""

    name: str
    sha256: str

    @property
    def key(self) -> str:
        return f"{self.name}@{self.sha256[:16]}"


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the library: its experts (sorted by name) and a generation counter."""

    generation: int
    experts: tuple[ExpertVersion, ...]
    skipped: tuple[str, ...] = ()           # experts left out (failed checksum or load), with the reason

    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def version(self, name: str) -> ExpertVersion:
        for e in self.experts:
            if e.name == name:
                return e
        raise RequestError(f"unknown expert {name!r}; this library has {self.names()[:20]}",
                           status=404, code="model_not_found", param="model")


@dataclass(frozen=True)
class RoutingRequest:
    """How a request wants to be routed: ``router`` (arrow, mu-delta, base, or ``expert`` with ``expert``),
    Arrow's ``top_k`` and ``temperature``, and an optional subset of ``experts``."""

    router: str | None = None               # None: the model id's router (or the server's default)
    expert: str | None = None
    top_k: int | None = None                # None: the server's default, at most the number of experts
    temperature: float = 1.0
    experts: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """Decoding: ``max_tokens`` new tokens, ``temperature`` (0 = greedy), nucleus ``top_p``, ``stop`` strings and an
    optional ``seed`` for the request's own random generator."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


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

    def to_json(self) -> dict[str, Any]:
        out = {"router": self.router, "library_generation": self.generation,
               "top_experts": [{"expert": n, "mass": round(m, 6)} for n, m in self.top_experts],
               "entropy": round(self.entropy, 6), "layer_groups": self.groups}
        if self.merged:
            out["merged_experts"] = self.merged
        return out


@dataclass
class Event:
    """What the engine sends to a request's consumer: a text ``delta``; or the end (``finish_reason``, usage and
    telemetry); or an ``error``."""

    delta: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    routing: RoutingTelemetry | None = None
    error: RequestError | None = None


@dataclass
class GenerationRequest:
    """A request inside the engine (created by :meth:`Engine.submit`)."""

    prompt_ids: list[int]
    sampling: SamplingParams
    routing: rt.RowRouting | None          # resolved to global indices at join time from ``versions``
    router_name: str
    versions: dict[str, ExpertVersion]      # the snapshot's experts this request may use, by name
    plan: RoutingRequest
    snapshot: Snapshot
    emit: Callable[[Event], None]
    virtual: str | None = None              # a static method's combined adapter (its key in the pool)
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator = field(default_factory=torch.Generator)
    # decoding state
    generated: list[int] = field(default_factory=list)
    sampled: int = 0
    text: str = ""
    sent: int = 0
    mass: torch.Tensor | None = None        # (groups, E_snapshot)
    entropy: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


@dataclass
class EngineStats:
    """Counters of the decode loop: batched decoding ``steps``, ``rows`` decoded over them and the largest batch."""

    steps: int = 0
    rows: int = 0
    max_batch: int = 0
    prefills: int = 0


@dataclass(frozen=True)
class EngineOptions:
    """``max_batch`` rows decode together; ``max_queue`` requests may wait (more → 429); the first request after an
    idle spell waits ``batch_wait_s`` for others; ``default_max_tokens`` when a request gives none; telemetry over
    ``layer_groups`` depth groups and the ``telemetry_top`` largest experts."""

    max_batch: int = 16
    max_queue: int = 64
    batch_wait_s: float = 0.005
    default_max_tokens: int = 256
    layer_groups: int = 3
    telemetry_top: int = 3
    default_router: str = "arrow"
    default_top_k: int = 4
    poll_s: float = 0.05


class Engine:
    """Owns the model and the library; serves :class:`GenerationRequest` s from one background thread."""

    def __init__(self, lm: LoadedModel, library_path: str | os.PathLike[str], options: EngineOptions | None = None,
                 name: str | None = None, registry: Registry = REGISTRY) -> None:
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.options = options or EngineOptions()
        self.registry = registry
        self.methods = rt.served_methods(registry)
        if self.options.default_router not in self.methods:
            raise ModloraError(f"router must be one of {', '.join(self.methods)}, got {self.options.default_router!r}")
        self.library_path = Path(library_path)
        self.name = name or self.library_path.resolve().name
        self.device = next(self.model.parameters()).device
        cfg = self.model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 2048))
        self.num_layers = int(getattr(cfg, "num_hidden_layers", 1))
        self.eos_ids = self._eos_ids()
        params = inspect.signature(self.model.forward).parameters     # transformers 5 renamed past_key_values
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._lock = threading.Lock()                 # guards snapshot swaps, the pool and admission
        self._wake = threading.Condition(self._lock)
        self._waiting: queue.SimpleQueue[GenerationRequest] = queue.SimpleQueue()
        self._num_waiting = 0
        self._adapters: dict[str, Any] = {}           # version key -> LoraAdapter (the pool)
        self._prototypes: dict[str, dict[str, torch.Tensor]] = {}
        self._manifest_stat: tuple[int, int, int] | None = None
        self._routed: Any = None
        self._router: rt.BatchRouter | None = None
        self._routed_keys: tuple[str, ...] = ()
        self._pins: dict[str, int] = {}              # version key -> admitted requests that use it
        self._key_index: dict[str, int] = {}
        self._active: list[GenerationRequest] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._stop = threading.Event()
        self.stats = EngineStats()
        self._thread: threading.Thread | None = None
        self.snapshot = Snapshot(0, ())
        library = ExpertLibrary(self.library_path)
        library.check_base_model(lm.info)
        share = ShareInfo.of(library)
        if share is not None and share.mode == "residual":  # honoured by prepare_model (route, eval), not here
            raise ModloraError(f"{self.library_path}: a residual --share library (expert {share.expert!r} applies on "
                               "every token) cannot be served yet; use modlora route / eval, or build it with "
                               "--share-mode warm")
        self._share = share  # a warm --share library routes over its cluster experts by default, as prepare_model
        self._refresh(force=True)

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
        return bool(self._num_waiting or self._active)

    # ----------------------------------------------------------------------------------------- library
    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    def _manifest_changed(self) -> bool:
        try:
            st = os.stat(self.library_path / "library.json")
        except OSError:
            return False
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._manifest_stat:
            return False
        self._manifest_stat = key
        return True

    def _refresh(self, force: bool = False) -> None:
        """Re-read the library if its manifest changed and publish a new snapshot (loads new versions only)."""
        if not self._manifest_changed() and not force:
            return
        try:
            library = ExpertLibrary(self.library_path)
        except LibraryError as exc:                   # a manifest being replaced or damaged: keep serving the old
            log.warning("library not re-read: %s", exc)
            return
        versions, skipped = [], []
        for name, entry in sorted(library.entries.items()):
            version = ExpertVersion(name, entry.files["adapter_model.safetensors"])
            if version.key not in self._adapters:   # (get() may re-read a newer manifest: take its version)
                try:
                    adapter = library.get(name)       # checks both files against the manifest's SHA-256
                    version = ExpertVersion(name, library.entry(name).files["adapter_model.safetensors"])
                    protos = library.load_artifact(name, rt.ARROW_KIND)
                    if protos is None or not set(adapter.A) <= set(protos):
                        protos = rt.arrow_prototypes(name, adapter)
                        try:
                            library.save_artifact(name, rt.ARROW_KIND, protos)   # atomic write of a cache file
                        except OSError as exc:                                     # e.g. a read-only library
                            log.warning("Arrow prototypes of %r not cached: %s", name, exc)
                except (LibraryError, ModloraError, OSError) as exc:
                    log.warning("expert %r not served: %s", name, exc)
                    skipped.append(f"{name}: {exc}")
                    continue
                with self._lock:
                    self._adapters[version.key] = adapter
                    self._prototypes[version.key] = protos
            versions.append(version)
        with self._lock:
            old = self.snapshot
            if tuple(versions) != old.experts or tuple(skipped) != old.skipped:
                self.snapshot = Snapshot(old.generation + 1, tuple(versions), tuple(skipped))
                log.info("library generation %d: %d experts", self.snapshot.generation, len(versions))

    def _prune_and_route(self) -> None:
        """Keep the versions of the current snapshot and of every admitted request; re-route if that changed."""
        with self._lock:
            keep = {v.key for v in self.snapshot.experts} | {k for k, n in self._pins.items() if n > 0}
            for key in set(self._adapters) - keep:
                del self._adapters[key]
                self._prototypes.pop(key, None)
            keys = tuple(sorted(keep))
        if keys == self._routed_keys:
            return
        if self._routed is not None:
            rt.detach(self._routed)
            self._routed = None
        self._router = rt.BatchRouter(keys, self._prototypes, self.num_layers, self.options.layer_groups)
        if keys:
            self._routed = rt.attach(self.model, keys, [self._adapters[k] for k in keys], self._router)
        self._routed_keys = keys
        self._key_index = {k: i for i, k in enumerate(keys)}

    # ----------------------------------------------------------------------------------------- admission
    def resolve(self, model: str, plan: RoutingRequest | None
                ) -> tuple[str, RoutingRequest, dict[str, ExpertVersion], Snapshot]:
        """Validate a model id + routing against the current snapshot: (router, plan, expert versions, snapshot).

        Model ids: ``LIB`` (the server's router), ``LIB:<router>`` and ``LIB:expert:<name>``."""
        snap = self.snapshot
        plan = plan or RoutingRequest()
        prefix = self.name + ":"
        if model == self.name:
            router = plan.router or self.options.default_router
        elif model.startswith(prefix + "expert:"):
            expert = model[len(prefix + "expert:"):]
            if plan.router is not None or plan.experts or plan.top_k is not None:
                raise RequestError(f"model {model!r} fixes the expert; drop routing.router, routing.experts and "
                                   "routing.top_k", param="routing")
            snap.version(expert)
            plan = RoutingRequest(expert=expert)
            router = "expert"
        elif model.startswith(prefix) and model[len(prefix):] in self.registry.names():
            router = model[len(prefix):]
            if plan.router is not None and plan.router != router:
                raise RequestError(f"model {model!r} fixes the router; routing.router={plan.router!r} contradicts it",
                                   param="routing.router")
        else:
            raise RequestError(f"the model {model!r} does not exist; GET /v1/models lists {self.name!r}, "
                               f"'{prefix}<router>' and '{prefix}expert:<name>'",
                               status=404, code="model_not_found", param="model")
        if router not in self.methods and router != "expert":
            if router in self.registry.names():
                raise RequestError(rt.refusal(router, self.registry), param="routing.router")
            raise RequestError(f"unknown router {router!r}; this server runs {', '.join(self.methods)}",
                               param="routing.router")
        if router == "expert":
            versions = {plan.expert: snap.version(plan.expert)}
        else:
            names = list(plan.experts) or (self._share.routed(snap.names()) if self._share else snap.names())
            if len(set(names)) != len(names):
                raise RequestError("routing.experts lists an expert twice", param="routing.experts")
            versions = {n: snap.version(n) for n in names}
        top_k = plan.top_k
        if router == "arrow":
            if not versions:
                raise RequestError(f"library {self.name!r} has no experts to route over", param="model")
            if top_k is None:
                top_k = min(self.options.default_top_k, len(versions))
            try:
                rt.arrow_row(range(len(versions)), top_k, plan.temperature, self.registry)
            except ModloraError as exc:
                raise RequestError(f"routing: {exc}", param="routing") from None
        elif plan.top_k is not None:
            raise RequestError(f"routing.top_k applies to the arrow router only, not {router!r}", param="routing.top_k")
        if router != "arrow" and router != "base" and not versions:
            raise RequestError(f"library {self.name!r} has no experts for {router!r}", param="model")
        if router == "base":
            versions = {}
        return router, RoutingRequest(router, plan.expert, top_k, plan.temperature, plan.experts), versions, snap

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
            req = GenerationRequest(list(prompt_ids), sampling, None, router, versions, plan, snap, emit)
            if router in self.methods and self.methods[router].kind == "static":
                req.virtual = self._virtual_adapter(router, versions)
            if sampling.seed is not None:
                req.generator.manual_seed(int(sampling.seed))
            else:
                req.generator.seed()
            for key in self._keys_of(req):
                self._pins[key] = self._pins.get(key, 0) + 1
            self._num_waiting += 1
            self._waiting.put(req)
            self._wake.notify_all()
        return req

    def _release(self, req: GenerationRequest) -> None:
        """Unpin the expert versions of a request that left."""
        with self._lock:
            for key in self._keys_of(req):
                self._pins[key] -= 1
                if self._pins[key] <= 0:
                    del self._pins[key]

    @staticmethod
    def _keys_of(req: GenerationRequest) -> list[str]:
        """The pool keys a request uses: its expert versions and its static method's adapter."""
        return [v.key for v in req.versions.values()] + ([req.virtual] if req.virtual else [])

    def _virtual_adapter(self, method: str, versions: dict[str, ExpertVersion]) -> str:
        """Pool key of ``method``'s combined adapter over ``versions`` (combined now unless pooled; caller holds
        the lock). A :class:`RequestError` when the method refuses these experts."""
        key = f"{method}[" + hashlib.sha256("\0".join(sorted(v.key for v in versions.values())).encode()
                                             ).hexdigest()[:16] + "]"
        if key not in self._adapters:
            try:
                self._adapters[key] = rt.static_adapter(method, {n: self._adapters[v.key]
                                                                 for n, v in versions.items()}, self.registry)
            except ModloraError as exc:
                raise RequestError(str(exc), param="model") from None
        return key

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
                for req in self._active:
                    req.emit(Event(error=err))
                    self._release(req)
                self._active, self._cache, self._mask = [], None, None

    def _take_waiting(self, limit: int) -> list[GenerationRequest]:
        out: list[GenerationRequest] = []
        with self._wake:
            if not self._active and self._num_waiting == 0:
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
        joining = self._take_waiting(self.options.max_batch - len(self._active))
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
                if req not in self._active:
                    req.emit(Event(error=RequestError(f"internal error while reading the prompt: "
                                                      f"{type(exc).__name__}", status=500, code="server_error")))
                    self._release(req)
                else:
                    raise
        self._leave()
        if self._active:
            self._decode()
            self._leave()

    def _row_routing(self, req: GenerationRequest) -> rt.RowRouting:
        idx = [self._key_index[v.key] for v in req.versions.values()]
        plan = req.plan
        kind = "expert" if req.router_name == "expert" else self.methods[req.router_name].kind
        if kind == "arrow":
            return rt.arrow_row(idx, plan.top_k, plan.temperature, self.registry)
        if kind == "weights":
            return rt.RowRouting("fixed", fixed={i: 1.0 / len(idx) for i in idx})
        if kind == "expert":
            return rt.RowRouting("fixed", fixed={idx[0]: 1.0})
        if kind == "static":
            return rt.RowRouting("fixed", fixed={self._key_index[req.virtual]: 1.0})
        return rt.RowRouting("fixed", fixed={})

    def _forward(self, rows: Sequence[GenerationRequest], **kwargs: Any) -> tuple[torch.Tensor, DynamicCache]:
        """One forward of ``rows`` routed each their own way: last-position logits (B, V) and the updated cache."""
        if self._router is not None and self._routed is not None:
            self._router.set_rows([r.routing for r in rows])
        out = self.model(**kwargs, use_cache=True)
        if self._router is not None and self._router.telemetry is not None and self._routed is not None:
            tel = self._router.telemetry
            for b, req in enumerate(rows):
                self._accumulate(req, tel.mass[b], tel.entropy[b], tel.tokens[b])
        cache = out.get("cache", None) or out.get("past_key_values", None)
        return out.logits[:, -1], cache

    def _accumulate(self, req: GenerationRequest, mass: torch.Tensor, entropy: torch.Tensor,
                    tokens: torch.Tensor) -> None:
        """Fold one step's routing statistics (over the routed model's experts) into the request's own experts."""
        names = list(req.versions)
        idx = torch.tensor([self._key_index[req.versions[n].key] for n in names], dtype=torch.long)
        m = mass.index_select(1, idx) if names else mass.new_zeros(mass.shape[0], 0)
        if req.mass is None:
            req.mass, req.entropy, req.tokens = m.clone(), entropy.clone(), tokens.clone()
        else:
            req.mass += m
            req.entropy += entropy
            req.tokens += tokens

    def _prefill(self, req: GenerationRequest) -> None:
        self.stats.prefills += 1
        ids = torch.tensor([req.prompt_ids], device=self.device)
        mask = torch.ones_like(ids)
        logits, cache = self._forward([req], input_ids=ids, attention_mask=mask, **self._keep_last)
        self._add_token(req, logits[0])
        self._join(req, cache, mask)

    def _join(self, req: GenerationRequest, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Left-pad the batch's caches or the new row's cache to the longer length and stack them."""
        if self._cache is None or not self._active:
            self._cache, self._mask, self._active = cache, mask, [req]
            return
        L, n = self._mask.shape[1], mask.shape[1]
        width = max(L, n)
        layers = []
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            layers.append((torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)]),
                           torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])))
        self._cache = DynamicCache(layers, config=self.model.config)
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self._active.append(req)

    def _leave(self) -> None:
        """Drop finished or cancelled rows from the batch (and the all-padding columns they leave on the left)."""
        keep = [b for b, r in enumerate(self._active) if not r.cancelled and not r.finished]
        if len(keep) == len(self._active):
            return
        for r in self._active:
            if r.cancelled or r.finished:
                self._release(r)
        self._active = [self._active[b] for b in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int((mask.cumsum(1) == 0).sum(1).min())           # leading columns that are padding in every row
        layers = [(lay.keys.index_select(0, index)[:, :, first:], lay.values.index_select(0, index)[:, :, first:])
                  for lay in self._cache.layers]
        self._cache = DynamicCache(layers, config=self.model.config)
        self._mask = mask[:, first:]

    def _decode(self) -> None:
        rows = self._active
        self.stats.steps += 1
        self.stats.rows += len(rows)
        self.stats.max_batch = max(self.stats.max_batch, len(rows))
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        positions = (mask.sum(1, keepdim=True) - 1)
        logits, self._cache = self._forward(rows, input_ids=ids, attention_mask=mask, position_ids=positions,
                                            **{self._cache_arg: self._cache})
        self._mask = mask
        for b, req in enumerate(rows):
            self._add_token(req, logits[b])

    # ----------------------------------------------------------------------------------------- tokens
    def _sample(self, req: GenerationRequest, logits: torch.Tensor) -> int:
        s = req.sampling
        logits = logits.float()
        if s.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = sorted_p.cumsum(0)
            sorted_p[(cum - sorted_p) >= s.top_p] = 0.0             # keep the smallest prefix with mass >= top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=req.generator))

    def _add_token(self, req: GenerationRequest, logits: torch.Tensor) -> None:
        token = self._sample(req, logits)
        req.sampled += 1
        s = req.sampling
        if token in self.eos_ids:
            self._finish(req, "stop", req.text)
            return
        req.generated.append(token)
        text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
        for stop in s.stop:
            at = text.find(stop, max(0, len(req.text) - len(stop)))
            if at >= 0:
                self._finish(req, "stop", text[:at])
                return
        req.text = text
        if len(req.generated) >= s.max_tokens:
            self._finish(req, "length", text)
            return
        hold = max((len(st) - 1 for st in s.stop), default=0)    # text that may still become a stop string
        safe = len(text) - hold
        while safe > req.sent and text[safe - 1] == "\ufffd":      # an incomplete UTF-8 sequence
            safe -= 1
        if safe > req.sent:
            req.emit(Event(delta=text[req.sent:safe]))
            req.sent = safe

    def _finish(self, req: GenerationRequest, reason: str, text: str) -> None:
        if len(text) > req.sent:
            req.emit(Event(delta=text[req.sent:]))
        req.finished = True
        req.emit(Event(finish_reason=reason, usage=Usage(len(req.prompt_ids), req.sampled),
                       routing=self._telemetry(req)))

    def _telemetry(self, req: GenerationRequest) -> RoutingTelemetry:
        names = list(req.versions)
        top = self.options.telemetry_top
        if req.virtual is not None:
            return RoutingTelemetry(req.router_name, req.snapshot.generation, [], [], 0.0, merged=names)
        if req.mass is None or not names:
            return RoutingTelemetry(req.router_name, req.snapshot.generation, [], [], 0.0)
        tokens = req.tokens.clamp_min(1)
        per_group = req.mass / tokens.unsqueeze(1)                                   # (groups, E) mean weight
        overall = req.mass.sum(0) / req.tokens.sum().clamp_min(1)

        def ranked(v: torch.Tensor) -> list[tuple[str, float]]:
            vals, idx = torch.topk(v, min(top, len(names)))
            return [(names[i], float(x)) for x, i in zip(vals.tolist(), idx.tolist(), strict=True) if x > 0]

        G, L = per_group.shape[0], self.num_layers
        groups = []
        for g in range(G):
            if float(req.tokens[g]) == 0:
                continue
            lo, hi = -(-g * L // G), -(-(g + 1) * L // G) - 1
            groups.append({"layers": f"{lo}-{hi}",
                           "top_experts": [{"expert": n, "mass": round(m, 6)} for n, m in ranked(per_group[g])],
                           "entropy": round(float(req.entropy[g] / tokens[g]), 6)})
        return RoutingTelemetry(req.router_name, req.snapshot.generation, ranked(overall), groups,
                                float(req.entropy.sum() / req.tokens.sum().clamp_min(1)))


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad ``t`` on the left of ``dim`` to ``width``."""
    pad = width - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def asyncio_emitter(loop: asyncio.AbstractEventLoop, q: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """An ``emit`` that hands events from the engine thread to an asyncio queue."""
    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(q.put_nowait, event)
    return emit


def wait_until_idle(engine: Engine, timeout: float = 10.0) -> None:
    """Block until nothing is waiting or decoding (tests)."""
    end = time.monotonic() + timeout
    while engine.busy() and time.monotonic() < end:
        time.sleep(0.01)
