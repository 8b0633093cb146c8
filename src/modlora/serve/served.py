"""Which methods of the registry a server offers, and how (see :mod:`modlora.serve.routing` for the routing
itself): ``base`` (no experts), ``arrow`` (per-row Arrow), ``mu-delta`` (fixed weights ``1/|S|``) and ``mu`` (its
combined adapter as one virtual expert). Torch-free, so ``modlora serve --help`` lists them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from modlora.reuse.methods import REGISTRY, Registry

if TYPE_CHECKING:
    from modlora.reuse.routing.routers import Temperature


SERVED_KINDS = {"base": "base", "arrow": "arrow", "mu-delta": "weights", "mu": "static"}


@dataclass(frozen=True)
class ServedMethod:
    """A registry method as the server runs it: ``kind`` is ``base``, ``arrow``, ``weights`` or ``static``."""

    name: str
    kind: str
    summary: str


def served_methods(registry: Registry = REGISTRY) -> dict[str, ServedMethod]:
    """The registry's methods this server can run per request (see the module docstring), in registry order."""
    out = {}
    for method in registry.methods:
        kind = SERVED_KINDS.get(method.name)
        if kind is not None:
            out[method.name] = ServedMethod(method.name, kind, method.summary)
    return out


def refusal(name: str, registry: Registry = REGISTRY) -> str:
    """Why the method ``name`` is not served (for the 400 message)."""
    method = registry.get(name)                       # raises RoutingError for an unknown name
    caps = method.capabilities
    if caps.needs_data or caps.needs_task_labels:
        return f"method {name!r} needs the experts' training data or each example's task; it is not served"
    return f"method {name!r} gives a dense (full-rank) adapter that cannot share a routed batch; it is not served"


def arrow_defaults(registry: Registry = REGISTRY) -> tuple[int, Temperature]:
    """The field defaults of the registry's Arrow options: the server's ``top_k`` and ``temperature``."""
    defaults = registry.get("arrow").option_defaults()
    return defaults["top_k"], defaults["temperature"]
