"""A library applied to a model: :class:`ReuseModel` behaves like the HF model (``forward`` and ``generate``)
with the library applied, plus ``restore()``; :func:`modlora.reuse.prepare.prepare_model` makes one.

Libraries built with ``--share`` (:class:`~modlora.library.shared_expert.ShareInfo`, ``meta/share.json``) are applied here, for
every method alike: the method sees only the cluster experts (the ``shared`` expert is left out of the routed or
merged set unless named in ``experts``), and for a *residual* library the shared update is merged into the weights
first, so it acts on every token: ``y = (W + ΔW_shared) x + Σ_e w_e(x) ΔW_e x``. A *warm-start* library needs no
shared part (its cluster experts started from the shared factors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from modlora.errors import RoutingError
from modlora.library.adapters import LoraAdapter, MergedWeights, merge_adapter
from modlora.library.experts import Experts, ExpertSet
from modlora.library.shared_expert import ShareInfo

if TYPE_CHECKING:
    from modlora.reuse.routing import RoutedModel

# (input_ids (b, s), attention_mask (b, s) | None, each example's task | None, continuing a KV cache) → (b, E)
ExampleRouter = Callable[[torch.Tensor, torch.Tensor | None, Sequence[str] | None, bool], torch.Tensor]


@dataclass
class ReuseModel:
    """A base model with a library applied. Call it like the HF model; ``tasks=`` feeds per-example routers.

    ``routed``: the :class:`~modlora.reuse.routing.RoutedModel` of routing methods; ``merged``: the adapter merged into the
    weights by static methods; ``example_router``: per-example weights over ``routed.expert_names`` that replace
    the per-token router during a call (task predictor, oracle); ``per_token``: the method routes each token by
    content (its routing is worth recording); ``shared``: a residual library's shared expert, merged into the
    weights under the method (restored bit-exactly)."""

    method: str
    model: torch.nn.Module
    routed: RoutedModel | None = None
    merged: LoraAdapter | None = None
    example_router: ExampleRouter | None = None
    per_token: bool = False
    shared: MergedWeights | None = None

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
        undone by subtraction, exact up to float rounding) and for the shared part of a residual library."""
        if self.routed is not None:
            self.routed.restore()
        if self.merged is not None:
            merge_adapter(self.model, self.merged, weight=-1.0)
            self.merged = None
        if self.shared is not None:
            self.shared.restore()
            self.shared = None
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


def shared_part(library: Experts, names: Sequence[str] | None) -> tuple[list[str] | None, LoraAdapter | None]:
    """For a ``--share`` library: the experts a method combines (``names``, default :meth:`ShareInfo.routed`) and the
    shared expert to apply on every token (residual libraries; ``None`` otherwise). Other libraries: ``names`` as
    given and ``None``. Naming a residual library's shared expert in ``names`` is refused (it is already applied on
    every token)."""
    share = ShareInfo.of(library)
    if share is None:
        return names, None
    if names is None:
        names = share.routed(library.expert_names())  # type: ignore[union-attr]  (a library: it has meta)
    elif share.mode == "residual" and share.expert in names:
        raise RoutingError(f"expert {share.expert!r} is the shared part of a residual library: it is applied on "
                           "every token, so it cannot also be one of the routed or merged experts")
    return names, (ExpertSet.of(library, [share.expert]).adapters[0] if share.mode == "residual" else None)


def with_shared_part(library: Experts, adapter: LoraAdapter) -> LoraAdapter:
    """``adapter`` plus a residual library's shared update as one adapter (ranks stacked, exact:
    :func:`~modlora.reuse.lowrank.weighted_delta_sum`), which is what an exported merge of such a library must hold;
    ``adapter`` itself for any other library."""
    from modlora.reuse.lowrank import weighted_delta_sum

    _, shared = shared_part(library, None)
    if shared is None:
        return adapter
    return weighted_delta_sum({"combined": adapter, "shared": shared}, [1.0, 1.0])
