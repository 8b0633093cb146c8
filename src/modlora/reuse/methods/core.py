"""The shape every reuse / merge method has: typed options with help text, capability flags, ``prepare()``.

A method is one small class (a subclass of :class:`StaticMethod` or :class:`RoutedMethod`, or of
:class:`ReuseMethod` directly) with

* ``name`` — what users type (``--method NAME``, a study row);
* ``summary`` — one line for ``--help`` and the README;
* ``Options`` — a frozen dataclass whose fields are made with :func:`option`; the CLI builds its flags from them
  (``drop_rate`` → ``--drop-rate``; the routing ``top_k`` → ``--route-top-k``) and ``__post_init__``
  validates, so bad values are refused at parse time;
* ``capabilities`` — :class:`Capabilities`: what callers may do with it;
* ``prepare(lm, experts)`` → :class:`~modlora.reuse.apply.ReuseModel`; static methods also ``combine(experts)`` →
  :class:`~modlora.reuse.merging.MergeResult` (one exportable adapter).

Methods are listed in one :class:`~modlora.reuse.methods.Registry`; nothing else checks method names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sized
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from modlora.errors import ModloraError, OptionError, RoutingError

if TYPE_CHECKING:
    from modlora.library.experts import ExpertSet
    from modlora.models import LoadedModel
    from modlora.reuse.apply import ExampleRouter, ReuseModel
    from modlora.reuse.merging import MergeResult


def option(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with ``help`` text; ``cli`` holds argparse overrides (``type``, ``choices``, ``metavar``,
    ``nargs``) or ``flag=False`` for fields the CLI fills itself."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata={"help": help, "cli": cli})


def check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{what} must be a positive integer, got {value!r}")
    return value


def check_top_k_fits(method: str, top_k: int, experts: Sized) -> None:
    """Refuse a ``top_k`` larger than the number of ``experts`` (an ExpertSet, or the server's allowed subset): a
    requested value is honoured or refused."""
    if top_k > len(experts):
        raise RoutingError(f"{method} top_k={top_k} exceeds the number of experts ({len(experts)})")


def check_temperature(value: Any, what: str = "temperature") -> float | str:
    """A routing temperature: 'sqrt_d' or a finite number ≥ 1e-6 (see :func:`modlora.reuse.routing.routers.resolve_temperature`,
    the one rule)."""
    from modlora.reuse.routing.routers import resolve_temperature

    if value == "sqrt_d":
        return value
    try:
        return resolve_temperature(value, 1)
    except RoutingError as exc:
        raise OptionError(f"{what}: {exc}") from None


def parse_temperature(text: str) -> float | str:
    """argparse type of temperature flags: a number or 'sqrt_d'."""
    if text == "sqrt_d":
        return text
    try:
        return check_temperature(float(text))
    except (ValueError, OptionError):
        raise ValueError(f"expected a finite number >= 1e-6 or 'sqrt_d', got {text!r}") from None


def parse_weights(text: str) -> tuple[float, ...]:
    """argparse type of ``--weights``: comma-separated finite numbers."""
    try:
        values = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"weights must be finite, got {text!r}")
    return values


@dataclass(frozen=True)
class MethodOptions:
    """Options every method has."""

    experts: tuple[str, ...] = option((), "use only these experts (default: all)", nargs="*", metavar="NAME")


@dataclass(frozen=True)
class RoutedLayerOptions(MethodOptions):
    """Options of every method that puts routed LoRA layers into the model."""

    mixing: str = option("outputs", "mix expert outputs Σ w·BAx (default) or parameters (Σ w·B)(Σ w·A)x (the "
                         "reference code's default)", choices=("outputs", "parameters"))
    path: str = option("auto", "routed-layer kernel: dense fold, sparse top-k or automatic",
                       choices=("auto", "dense", "sparse"))
    sparse_kernel: str = option("auto", "sparse-path kernel: sampled matmul + embedding bag (CPU fp32), expert "
                                "blocks (any device/dtype) or automatic", choices=("auto", "sddmm", "blocks"))
    general: tuple[str, ...] = option((), "GenKnowSub: subtract the mean of these experts before routing",
                                      nargs="*", metavar="NAME")
    gks_space: str = option("factors", "GenKnowSub in LoRA-factor space (like PEFT) or exact ΔW space",
                            choices=("factors", "delta"))


@dataclass(frozen=True)
class TrainingDataOptions:
    """Options of methods that read each expert's training tasks (their train split only)."""

    task_dir: str | None = option(None, "SNI task directory holding the experts' training tasks", flag=False)
    examples_per_expert: int = option(16, "training examples read per expert", type=int)

    def __post_init__(self) -> None:
        check_positive_int(self.examples_per_expert, "examples_per_expert")


@dataclass(frozen=True)
class Capabilities:
    """What a method is and may be used for.

    ``per_token``: routes every token by its content (routing telemetry, ``--explain``, routing accuracy);
    ``per_example``: routes each example from its whole prompt (a context cannot be scored apart from its options);
    ``needs_task_labels``: needs each example's task (in-distribution only); ``needs_data``: reads the experts'
    training data; ``static``: one fixed adapter (``combine()``; exportable with ``modlora merge``);
    ``uses_experts``: applies the library at all (false only for the base model alone)."""

    per_token: bool = False
    per_example: bool = False
    needs_task_labels: bool = False
    needs_data: bool = False
    static: bool = False
    uses_experts: bool = True


class ReuseMethod:
    """Base class of every method; see the module docstring."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, options: MethodOptions | None = None) -> None:
        options = self.Options() if options is None else options
        if not isinstance(options, self.Options):
            raise OptionError(f"method {self.name!r} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options

    @classmethod
    def options_from(cls, values: Mapping[str, Any]) -> MethodOptions:
        """``Options(**values)``; an unknown name or a bad value raises :class:`OptionError` naming it."""
        names = {f.name for f in fields(cls.Options)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise OptionError(f"method {cls.name!r} has no option(s) {', '.join(unknown)}; its options: "
                               f"{', '.join(sorted(names))}")
        try:
            return cls.Options(**values)
        except ModloraError as exc:
            raise OptionError(f"{cls.name}: {exc}") from None

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls.Options) if f.default is not MISSING}

    def prepare(self, lm: LoadedModel, experts: ExpertSet | None) -> ReuseModel:
        raise NotImplementedError


class StaticMethod(ReuseMethod):
    """A method whose result is one fixed adapter: ``combine()`` it, then merge it into the weights."""

    capabilities = Capabilities(static=True)

    def combine(self, experts: ExpertSet) -> MergeResult:
        raise NotImplementedError

    def prepare(self, lm: LoadedModel, experts: ExpertSet) -> ReuseModel:
        from modlora.library.adapters import merge_adapter
        from modlora.reuse.apply import ReuseModel

        adapter = self.combine(experts).adapter
        merge_adapter(lm.model, adapter)
        return ReuseModel(self.name, lm.model, merged=adapter)


class RoutedMethod(ReuseMethod):
    """A method that routes among the experts inside the model: ``router()`` gives the per-layer router and
    ``example_router()`` optionally replaces it with per-example weights (task predictor, oracle)."""

    Options: ClassVar[type[MethodOptions]] = RoutedLayerOptions

    def router(self, lm: LoadedModel, experts: ExpertSet) -> Any:
        """A router object or name for :func:`modlora.reuse.routing.route`."""
        raise NotImplementedError

    def example_router(self, lm: LoadedModel, experts: ExpertSet) -> ExampleRouter | None:
        return None

    def prepare(self, lm: LoadedModel, experts: ExpertSet) -> ReuseModel:
        from modlora.library.experts import ExpertSet
        from modlora.reuse.apply import ReuseModel
        from modlora.reuse.routing import route

        opts = self.options
        assert isinstance(opts, RoutedLayerOptions)
        general = None
        if opts.general:
            if experts.source is None:
                raise RoutingError("GenKnowSub needs a library to read the general experts from")
            general = ExpertSet.of(experts.source, list(opts.general))
        router = self.router(lm, experts)                  # both may run the base model (centroids, gates, the
        example_router = self.example_router(lm, experts)  # task predictor's features), so before routing it
        routed = route(lm.model, experts, router, mixing=opts.mixing, path=opts.path, general_experts=general,
                       gks_space=opts.gks_space, sparse_kernel=opts.sparse_kernel)
        return ReuseModel(self.name, lm.model, routed=routed, example_router=example_router,
                          per_token=self.capabilities.per_token)


def example_batches(lm: LoadedModel, experts: ExpertSet, opts: TrainingDataOptions, with_labels: bool
                    ) -> dict[str, list[Any]]:
    """A few training examples per expert (its tasks' *train* split, the training prompt template), as
    ``(input_ids, attention_mask)`` batches of 8 or ``(input_ids, labels)`` examples."""
    from pathlib import Path

    from modlora.data import PromptLimits, collate, default_sni_dir, encode_tasks, load_sni_tasks

    data_dir = Path(opts.task_dir) if opts.task_dir else default_sni_dir()
    device = next(lm.model.parameters()).device
    out: dict[str, list[Any]] = {}
    for name in experts.names:
        task_names = experts.tasks_of(name)
        if not task_names:
            raise RoutingError(f"expert {name!r} records no training tasks; this method needs them")
        tasks = load_sni_tasks(data_dir, task_names)
        training = experts.source.entry(name).training if hasattr(experts.source, "entry") else {}
        fmt = PromptLimits.from_record(training).formatter(lm.tokenizer)
        per_task = max(1, opts.examples_per_expert // len(tasks))
        exs = encode_tasks(fmt, tasks, "train", max_per_task=per_task,
                           seed=int(training.get("split_seed", 0)))[: opts.examples_per_expert]
        if with_labels:
            out[name] = [e.labelled(device) for e in exs]
        else:
            out[name] = [(b.input_ids, b.attention_mask) for b in
                         (collate(exs[i:i + 8], lm.tokenizer.pad_token_id).to(device) for i in range(0, len(exs), 8))]
    return out
