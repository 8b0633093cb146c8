"""Reusing a library: turn a router name and its options into a model ready for zero-shot inference.

``prepare_model(lm, library, "arrow", RouterOptions(...))`` returns a :class:`ReuseModel`: a callable that behaves
like the HF model (``forward`` and ``generate``) with the library applied, plus ``restore()``. Methods:

==============  ==================================================================================================
``base``        the base model alone
``arrow``       per-token Arrow routing (prototypes cached in the library)
``mu``          μ, parameter averaging (mean A, mean B: the reference's μ), merged into the weights
``mu-delta``    μ, exact ΔW averaging (mean of B·A) merged into the weights
``centroid``    hidden-state prototypes: mean layer input over a few training examples of each expert
``phatgoose``   per-expert sigmoid gates trained on the expert's own data, top-2 routing
``tp``          task predictor on mean-pooled hidden states, per-example routing to the predicted expert
``oracle``      per-example routing to the expert of the example's known task (in-distribution only)
==============  ==================================================================================================

Data-dependent methods (centroid, phatgoose, tp) read each expert's training tasks from the SNI directory and use
their *train* split only, with the same prompt template as training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modlora.adapters import merge_adapter
from modlora.data import PromptFormatter, collate, default_sni_dir, encode_tasks, load_sni_tasks
from modlora.errors import RoutingError
from modlora.library import ExpertLibrary
from modlora.models import LoadedModel

METHODS = ("base", "arrow", "mu", "mu-delta", "centroid", "phatgoose", "tp", "oracle")


@dataclass
class RouterOptions:
    """Options of the reuse methods (defaults: the paper's Arrow, top-4, temperature 1)."""

    top_k: int = 4
    temperature: float | str = 1.0
    tie_qkv: bool = False
    normalize_inputs: bool = False
    mixing: str = "outputs"
    path: str = "auto"
    sparse_kernel: str = "auto"
    general: tuple[str, ...] = ()
    gks_space: str = "factors"
    experts: tuple[str, ...] = ()
    data_dir: str | None = None
    examples_per_expert: int = 16
    phatgoose_steps: int = 100
    tp_top_k: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReuseModel:
    """A base model with a library applied. Call it like the HF model; ``tasks=`` feeds the oracle."""

    method: str
    model: torch.nn.Module
    routed: Any = None
    merged: Any = None
    predictor: Any = None
    expert_of_task: dict[str, str] = field(default_factory=dict)
    _sticky: torch.Tensor | None = field(default=None, repr=False)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def per_example_routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                            tasks: Sequence[str] | None, continuing: bool = False) -> Iterator[None]:
        """Per-example weights for ``tp`` / ``oracle`` during one call. ``continuing``: the call extends a KV cache
        (decoding or scoring a continuation), so the task predictor keeps the prediction it made on the prompt."""
        if self.method == "tp":
            if continuing and self._sticky is not None and self._sticky.shape[0] == input_ids.shape[0]:
                w = self._sticky  # decoding with a KV cache: keep the prediction made on the whole prompt
            else:
                with self.routed.disabled():
                    w = self.predictor.predict_weights(self.model, input_ids, attention_mask, top_k=1)
                order = [self.predictor.expert_names.index(n) for n in self.routed.expert_names]
                w = w[:, order]
                self._sticky = w
            with self.routed.example_weights(w):
                yield
        elif self.method == "oracle":
            if tasks is None:
                raise RoutingError("the oracle router needs each example's task (in-distribution evaluation only)")
            missing = sorted({t for t in tasks if t not in self.expert_of_task})
            if missing:
                raise RoutingError(f"oracle: no expert in the library for task(s) {missing[:3]}")
            w = torch.zeros(len(tasks), len(self.routed.expert_names))
            for i, t in enumerate(tasks):
                w[i, self.routed.expert_names.index(self.expert_of_task[t])] = 1.0
            with self.routed.example_weights(w):
                yield
        else:
            yield

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 tasks: Sequence[str] | None = None, **kwargs: Any) -> Any:
        continuing = kwargs.get("past_key_values") is not None
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


def _expert_batches(lm: LoadedModel, library: ExpertLibrary, names: Sequence[str], opts: RouterOptions,
                    with_labels: bool) -> dict[str, list[Any]]:
    """A few training examples per expert (its tasks' train split), as (input_ids, attention_mask) batches or
    (input_ids, labels) examples."""
    data_dir = Path(opts.data_dir) if opts.data_dir else default_sni_dir()
    out: dict[str, list[Any]] = {}
    for name in names:
        entry = library.entry(name)
        if not entry.tasks:
            raise RoutingError(f"expert {name!r} records no training tasks; this router needs them")
        tasks = load_sni_tasks(data_dir, entry.tasks)
        fmt = PromptFormatter(lm.tokenizer, max_prompt_tokens=int(entry.training.get("max_prompt_tokens", 384)),
                              max_target_tokens=int(entry.training.get("max_target_tokens", 128)))
        per_task = max(1, opts.examples_per_expert // len(tasks))
        exs = encode_tasks(fmt, tasks, "train", max_per_task=per_task,
                           seed=int(entry.training.get("split_seed", 0)))[: opts.examples_per_expert]
        device = next(lm.model.parameters()).device
        if with_labels:
            out[name] = [e.labelled(device) for e in exs]
        else:
            out[name] = [(b.input_ids, b.attention_mask) for b in
                         (collate(exs[i:i + 8], lm.tokenizer.pad_token_id).to(device) for i in range(0, len(exs), 8))]
    return out


def prepare_model(lm: LoadedModel, library: ExpertLibrary, method: str, opts: RouterOptions | None = None
                  ) -> ReuseModel:
    """Apply ``library`` to ``lm.model`` with ``method`` (see the module docstring)."""
    from modlora.routing import (
        ArrowRouter,
        CentroidRouter,
        compute_centroids,
        mu_delta_average,
        mu_parameter_average,
        route,
    )

    opts = opts or RouterOptions()
    if method not in METHODS:
        raise RoutingError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    library.check_base_model(lm.info)
    model = lm.model
    if method == "base":
        return ReuseModel(method, model)
    names = list(opts.experts) or library.expert_names()
    if not names:
        raise RoutingError(f"{library.path}: the library has no experts")
    experts = library.experts(names)
    general = library.experts(opts.general) if opts.general else None
    if method in ("mu", "mu-delta"):
        merged = mu_parameter_average(experts) if method == "mu" else mu_delta_average(experts)
        merge_adapter(model, merged)
        return ReuseModel(method, model, merged=merged)
    common = {"mixing": opts.mixing, "path": opts.path, "general_experts": general, "gks_space": opts.gks_space,
              "sparse_kernel": opts.sparse_kernel}
    if method == "arrow":
        if opts.top_k > len(names):
            raise RoutingError(f"top_k={opts.top_k} exceeds the number of experts ({len(names)})")
        router = ArrowRouter(top_k=opts.top_k, temperature=opts.temperature, normalize_inputs=opts.normalize_inputs,
                             tie_qkv=opts.tie_qkv)
        return ReuseModel(method, model, routed=route(model, library if not opts.experts else experts, router,
                                                      **common))
    if method == "centroid":
        batches = _expert_batches(lm, library, names, opts, with_labels=False)
        layers = sorted({m for a in experts.values() for m in a.modules})
        cents = compute_centroids(model, batches, layers, library=library)
        return ReuseModel(method, model, routed=route(model, experts, CentroidRouter(cents), **common))
    if method == "phatgoose":
        from modlora.phatgoose import phatgoose_gates_for_experts, phatgoose_weights, stack_gates
        examples = _expert_batches(lm, library, names, opts, with_labels=True)
        with torch.enable_grad():  # gate training needs autograd even when called under no_grad/inference
            gates = stack_gates(phatgoose_gates_for_experts(model, experts, examples, steps=opts.phatgoose_steps,
                                                            cache=library), names)
        routed = route(model, experts, lambda x, layer: phatgoose_weights(x, gates[layer].to(x.device), top_k=2),
                       **common)
        return ReuseModel(method, model, routed=routed)
    if method == "tp":
        from modlora.task_predictor import TaskPredictor
        predictor = TaskPredictor.fit(model, _expert_batches(lm, library, names, opts, with_labels=False))
        return ReuseModel(method, model, routed=route(model, experts, "mu", **common), predictor=predictor)
    # oracle
    expert_of_task = {t: n for n in names for t in library.tasks(n)}
    return ReuseModel(method, model, routed=route(model, experts, "mu", **common), expert_of_task=expert_of_task)


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
