"""Reusing a library: ``prepare_model(lm, library, "arrow", options)`` → a :class:`ReuseModel`.

A :class:`ReuseModel` behaves like the HF model (``forward`` and ``generate``) with the library applied, plus
``restore()``. The methods themselves (Arrow, μ, TIES, centroid, PhatGOOSE, task predictor, oracle, …) are classes
in :mod:`modlora.methods`, listed in one registry; ``modlora.methods.REGISTRY.describe()`` lists them with their
options, and ``prepare_model`` is the one call that looks a name up, validates its options and applies it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from modlora.adapters import LoraAdapter, merge_adapter
from modlora.errors import RoutingError
from modlora.experts import Experts, ExpertSet
from modlora.models import LoadedModel

if TYPE_CHECKING:
    from modlora.methods import Registry
    from modlora.methods.core import MethodOptions
    from modlora.routing import RoutedModel

# (input_ids (b, s), attention_mask (b, s) | None, each example's task | None, continuing a KV cache) → (b, E)
ExampleRouter = Callable[[torch.Tensor, torch.Tensor | None, Sequence[str] | None, bool], torch.Tensor]


@dataclass
class ReuseModel:
    """A base model with a library applied. Call it like the HF model; ``tasks=`` feeds per-example routers.

    ``routed``: the :class:`~modlora.routing.RoutedModel` of routing methods; ``merged``: the adapter merged into the
    weights by static methods; ``example_router``: per-example weights over ``routed.expert_names`` that replace
    the per-token router during a call (task predictor, oracle); ``per_token``: the method routes each token by
    content (its routing is worth recording)."""

    method: str
    model: torch.nn.Module
    routed: RoutedModel | None = None
    merged: LoraAdapter | None = None
    example_router: ExampleRouter | None = None
    per_token: bool = False

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def per_example_routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                            tasks: Sequence[str] | None, continuing: bool = False) -> Iterator[None]:
        """Route this call's examples with ``example_router`` (if any), which runs with routing disabled (it sees
        the base model). ``continuing``: the call extends a KV cache (decoding or scoring a continuation)."""
        if self.example_router is None or self.routed is None:
            yield
            return
        with self.routed.disabled():
            weights = self.example_router(input_ids, attention_mask, tasks, continuing)
        with self.routed.example_weights(weights):
            yield

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 tasks: Sequence[str] | None = None, **kwargs: Any) -> Any:
        continuing = kwargs.get("cache") is not None
        with self.per_example_routing(input_ids, attention_mask, tasks, continuing):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 tasks: Sequence[str] | None = None, **kwargs: Any) -> torch.Tensor:
        with self.per_example_routing(input_ids, attention_mask, tasks):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # everything else (parameters(), generation_config, eval(), ...) is the underlying HF model's
        if name in ("model", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def for_task(self, task: str) -> TaskBoundModel:
        """A view that routes every example as ``task`` (feeds the oracle in batched generation loops)."""
        return TaskBoundModel(self, task)

    def restore(self) -> torch.nn.Module:
        """Undo routing or merging; the base model is bit-identical to before only for routing (merging is
        undone by subtraction, exact up to float rounding)."""
        if self.routed is not None:
            self.routed.restore()
        if self.merged is not None:
            merge_adapter(self.model, self.merged, weight=-1.0)
            self.merged = None
        return self.model


@dataclass
class TaskBoundModel:
    """``ReuseModel`` with every example's task fixed (for evaluation loops that do not pass ``tasks``)."""

    inner: ReuseModel
    task: str

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.inner(input_ids, attention_mask, tasks=[self.task] * input_ids.shape[0], **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.inner.model, name)


def prepare_model(lm: LoadedModel, library: Experts | None, method: str,
                  options: MethodOptions | Mapping[str, Any] | None = None, *,
                  registry: Registry | None = None) -> ReuseModel:
    """Apply ``library`` to ``lm.model`` with the registered ``method``.

    ``options``: the method's ``Options`` dataclass, or a mapping of option names to values (validated), or
    ``None`` for the defaults. The library is checked against ``lm``'s base model first; ``base`` needs none."""
    from modlora.methods import REGISTRY

    cls = (registry or REGISTRY).get(method)
    opts = cls.options_from(options or {}) if isinstance(options, Mapping) or options is None else options
    instance = cls(opts)
    if not cls.capabilities.uses_experts:
        return instance.prepare(lm, None)
    if library is None:
        raise RoutingError(f"method {method!r} needs a library")
    if hasattr(library, "check_base_model"):
        library.check_base_model(lm.info)
    return instance.prepare(lm, ExpertSet.of(library, list(opts.experts) or None))
