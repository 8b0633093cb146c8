"""The models a server offers and how a request resolves against them.

Model ids: ``LIB`` (the server's default router), ``LIB:<router>`` for each served method and ``LIB:expert:<name>``
for each expert of the current snapshot. A request's model id and optional ``routing`` resolve to one router, the
expert versions it may use (of the snapshot current at admission) and, for Arrow, its ``top_k`` and ``temperature``
(the server's defaults when not given; the default top-k is capped at the number of experts, a requested one is
honoured or refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from modlora.errors import ModloraError
from modlora.library.shared_expert import ShareInfo
from modlora.reuse.methods import Registry
from modlora.serve import routing as rt
from modlora.serve.requests import EngineOptions, RequestError, RoutingRequest
from modlora.serve.served import ServedMethod, arrow_defaults, refusal, served_methods
from modlora.serve.snapshots import ExpertVersion, Snapshot


@dataclass(frozen=True)
class Catalogue:
    """What the library ``name`` offers: the served ``methods`` of ``registry``, the ``default_router`` and Arrow's
    defaults, and a warm ``--share`` library's ``share`` (its shared expert is not routed by default, as in
    :func:`~modlora.reuse.prepare.prepare_model`)."""

    name: str
    methods: Mapping[str, ServedMethod]
    registry: Registry
    default_router: str
    default_top_k: int | None                  # None: Arrow is not served
    default_temperature: float | str | None
    share: ShareInfo | None = None

    @classmethod
    def of(cls, name: str, options: EngineOptions, registry: Registry, share: ShareInfo | None) -> Catalogue:
        """The catalogue of ``options``; Arrow's defaults not given there are the registry's Arrow options'."""
        methods = served_methods(registry)
        if options.default_router not in methods:
            raise ModloraError(f"router must be one of {', '.join(methods)}, got {options.default_router!r}")
        top_k, temperature = options.default_top_k, options.default_temperature
        if "arrow" in methods:
            arrow_top_k, arrow_temperature = arrow_defaults(registry)
            top_k = arrow_top_k if top_k is None else top_k
            temperature = arrow_temperature if temperature is None else temperature
        return cls(name, methods, registry, options.default_router, top_k, temperature, share)

    def model_ids(self, snapshot: Snapshot) -> list[str]:
        return [self.name] + [f"{self.name}:{r}" for r in self.methods] + [
            f"{self.name}:expert:{n}" for n in snapshot.names()]

    def resolve(self, model: str, plan: RoutingRequest | None, snapshot: Snapshot
                ) -> tuple[str, RoutingRequest, dict[str, ExpertVersion]]:
        """Validate a model id + routing against ``snapshot``: (router, the plan with Arrow's options filled in,
        expert versions); a :class:`RequestError` (4xx) for anything the server refuses."""
        plan = plan or RoutingRequest()
        router, plan = self._router(model, plan, snapshot)
        if router == "expert":
            versions = {plan.expert: snapshot.version(plan.expert)}
        else:
            default = self.share.routed(snapshot.names()) if self.share else snapshot.names()
            if plan.experts is not None and not plan.experts:
                raise RequestError("routing.experts must name at least one expert (leave it out for all)",
                                   param="routing.experts")
            versions = snapshot.versions(default if plan.experts is None else list(plan.experts))
        top_k, temperature = plan.top_k, plan.temperature
        if router == "arrow":
            if not versions:
                raise RequestError(f"library {self.name!r} has no experts to route over", param="model")
            top_k = min(self.default_top_k, len(versions)) if top_k is None else top_k
            temperature = self.default_temperature if temperature is None else temperature
            try:
                rt.check_arrow(top_k, temperature, versions, self.registry)
            except ModloraError as exc:
                raise RequestError(f"routing: {exc}", param="routing") from None
        elif top_k is not None:
            raise RequestError(f"routing.top_k applies to the arrow router only, not {router!r}", param="routing.top_k")
        if router not in ("arrow", "base") and not versions:
            raise RequestError(f"library {self.name!r} has no experts for {router!r}", param="model")
        if router == "base":
            versions = {}
        return router, RoutingRequest(router, plan.expert, top_k, temperature, plan.experts, plan.per_token), versions

    def _router(self, model: str, plan: RoutingRequest, snapshot: Snapshot) -> tuple[str, RoutingRequest]:
        """The router a model id + routing names, and the plan (``LIB:expert:<name>`` fixes the expert)."""
        prefix = self.name + ":"
        if model == self.name:
            router = plan.router or self.default_router
        elif model.startswith(prefix + "expert:"):
            expert = model[len(prefix + "expert:"):]
            if plan.router is not None or plan.experts is not None or plan.top_k is not None:
                raise RequestError(f"model {model!r} fixes the expert; drop routing.router, routing.experts and "
                                   "routing.top_k", param="routing")
            snapshot.version(expert)
            return "expert", RoutingRequest(expert=expert, per_token=plan.per_token)
        elif model.startswith(prefix) and model[len(prefix):] in self.registry.names():
            router = model[len(prefix):]
            if plan.router is not None and plan.router != router:
                raise RequestError(f"model {model!r} fixes the router; routing.router={plan.router!r} contradicts it",
                                   param="routing.router")
        else:
            raise RequestError(f"the model {model!r} does not exist; GET /v1/models lists {self.name!r}, "
                               f"'{prefix}<router>' and '{prefix}expert:<name>'",
                               status=404, code="model_not_found", param="model")
        if router not in self.methods:
            if router in self.registry.names():
                raise RequestError(refusal(router, self.registry), param="routing.router")
            raise RequestError(f"unknown router {router!r}; this server runs {', '.join(self.methods)}",
                               param="routing.router")
        return router, plan
