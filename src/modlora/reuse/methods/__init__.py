"""The registry of reuse and merge methods: one class per method, one line per method in :data:`REGISTRY`.

The CLI (``--method`` and the flags of every option), the study rows and every
capability check read from here. To add a method: write one module with a :class:`~modlora.reuse.methods.core.ReuseMethod`
subclass (its ``Options`` dataclass gives the CLI flags) and add it to the tuple below — or, without touching
modlora, pass ``REGISTRY.with_method(MyMethod)`` to :func:`modlora.reuse.prepare.prepare_model` / :func:`modlora.cli.main`.

================== =================================================================================================
``base``           the base model alone
``arrow``          per-token routing by the experts' top singular directions (zero-shot, no data)
``arrow-centred``  Arrow on inputs centred by the experts' mean layer input (the mean needs data)
``arrow-whitened`` Arrow on inputs whitened by the experts' input covariance (needs data)
``mu``             μ: uniform parameter averaging (mean A, mean B; the paper's μ), merged into the weights
``mu-delta``       μ: uniform ΔW averaging, exact (mean of B·A, rank Σr)
``linear``         task arithmetic Σ w_e ΔW_e, exact
``ties``           TIES: magnitude trim + sign election of the dense ΔW's (SVD back to a LoRA)
``dare-linear``    DARE drop-and-rescale + task arithmetic; ``dare-ties``: + TIES sign election
``centroid``       per-token routing by similarity to each expert's mean layer inputs (training data)
``phatgoose``      per-token top-k routing by gates trained on each expert's data (training data)
``tp``             task predictor: per-example routing to the predicted expert(s) (training data)
``oracle``         each example routed to its own task's expert (in-distribution only)
``allocation``     Poly/MHR: each example uses its task's learned mixture of the skills (in-distribution only)
================== =================================================================================================

``linear``, ``ties``, ``dare-linear`` and ``dare-ties`` are one parametrised merge
(:class:`~modlora.reuse.methods.linear.TaskArithmetic` over :class:`~modlora.reuse.merging.TaskArithmeticMerge`):
sparsify each ΔW_e (none / magnitude / random), elect signs or not, weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from modlora.errors import RoutingError
from modlora.reuse.methods.allocation import AllocationMethod
from modlora.reuse.methods.arrow import Arrow, ArrowCentred, ArrowWhitened
from modlora.reuse.methods.base import Base
from modlora.reuse.methods.centroid import Centroid
from modlora.reuse.methods.core import Capabilities, MethodOptions, ReuseMethod, RoutedMethod, StaticMethod, option
from modlora.reuse.methods.dare import DareLinear, DareTies
from modlora.reuse.methods.linear import Linear
from modlora.reuse.methods.mu import Mu
from modlora.reuse.methods.mu_delta import MuDelta
from modlora.reuse.methods.oracle import Oracle
from modlora.reuse.methods.phatgoose import Phatgoose
from modlora.reuse.methods.task_predictor import TaskPredictor
from modlora.reuse.methods.ties import Ties


@dataclass(frozen=True)
class Registry:
    """An immutable, ordered set of method classes with unique names."""

    methods: tuple[type[ReuseMethod], ...]

    def __post_init__(self) -> None:
        names = [m.name for m in self.methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RoutingError(f"method name(s) registered twice: {', '.join(dupes)}")

    def names(self, **capabilities: bool) -> list[str]:
        """Method names, optionally only those whose :class:`Capabilities` match (``static=True``, …)."""
        known = {f.name for f in fields(Capabilities)}
        unknown = sorted(set(capabilities) - known)
        if unknown:
            raise RoutingError(f"unknown capability {unknown}; known: {sorted(known)}")
        return [m.name for m in self.methods
                if all(getattr(m.capabilities, k) == v for k, v in capabilities.items())]

    def get(self, name: str) -> type[ReuseMethod]:
        for m in self.methods:
            if m.name == name:
                return m
        raise RoutingError(f"unknown method {name!r}; choose one of {', '.join(self.names())}")

    def with_method(self, method: type[ReuseMethod]) -> Registry:
        """A new registry with ``method`` added (extensions and tests; the default registry is unchanged)."""
        return Registry((*self.methods, method))

    def describe(self) -> str:
        """One line per method: its name and summary."""
        width = max(len(m.name) for m in self.methods)
        return "\n".join(f"{m.name:<{width}}  {m.summary}" for m in self.methods)


REGISTRY = Registry((
    Base,
    Arrow,
    ArrowCentred,
    ArrowWhitened,
    Mu,
    MuDelta,
    Linear,
    Ties,
    DareLinear,
    DareTies,
    Centroid,
    Phatgoose,
    TaskPredictor,
    Oracle,
    AllocationMethod,
))

__all__ = ["REGISTRY", "Capabilities", "MethodOptions", "Registry", "ReuseMethod", "RoutedMethod", "StaticMethod",
           "option"]
