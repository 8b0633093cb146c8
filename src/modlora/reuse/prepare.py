"""Reusing a library: ``prepare_model(lm, library, "arrow", options)`` → a :class:`~modlora.reuse.apply.ReuseModel`.

The methods themselves (Arrow, μ, TIES, centroid, PhatGOOSE, task predictor, oracle, …) are classes in
:mod:`modlora.reuse.methods`, listed in one registry; ``modlora.reuse.methods.REGISTRY.describe()`` lists them with
their options, and ``prepare_model`` is the one call that looks a name up, validates its options and applies it
(a ``--share`` library as :mod:`modlora.reuse.apply` says).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modlora.errors import RoutingError
from modlora.library.adapters import merge_adapter_restorably
from modlora.library.experts import Experts, ExpertSet
from modlora.models import LoadedModel
from modlora.reuse.apply import ReuseModel, shared_part
from modlora.reuse.methods import REGISTRY, Registry
from modlora.reuse.methods.core import MethodOptions


def prepare_model(lm: LoadedModel, library: Experts | None, method: str,
                  options: MethodOptions | Mapping[str, Any] | None = None, *,
                  registry: Registry | None = None) -> ReuseModel:
    """Apply ``library`` to ``lm.model`` with the registered ``method``.

    ``options``: the method's ``Options`` dataclass, or a mapping of option names to values (validated), or
    ``None`` for the defaults. The library is checked against ``lm``'s base model first; ``base`` needs none.
    A ``--share`` library is applied as the module docstring says (:func:`shared_part`)."""
    cls = (registry or REGISTRY).get(method)
    opts = cls.options_from(options or {}) if isinstance(options, Mapping) or options is None else options
    instance = cls(opts)
    if not cls.capabilities.uses_experts:
        return instance.prepare(lm, None)
    if library is None:
        raise RoutingError(f"method {method!r} needs a library")
    if hasattr(library, "check_base_model"):
        library.check_base_model(lm.info)
    names, shared = shared_part(library, list(opts.experts) or None)
    experts = ExpertSet.of(library, names)
    if shared is None:
        return instance.prepare(lm, experts)
    merged = merge_adapter_restorably(lm.model, shared, name="shared expert")
    try:
        reuse = instance.prepare(lm, experts)
    except BaseException:
        merged.restore()
        raise
    reuse.shared = merged
    return reuse
