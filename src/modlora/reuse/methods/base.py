"""``base``: the base model alone (no experts applied)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modlora.reuse.methods.core import Capabilities, ReuseMethod

if TYPE_CHECKING:
    from modlora.library.experts import ExpertSet
    from modlora.models import LoadedModel
    from modlora.reuse.apply import ReuseModel


class Base(ReuseMethod):
    name = "base"
    summary = "the base model alone"
    capabilities = Capabilities(uses_experts=False)

    def prepare(self, lm: LoadedModel, experts: ExpertSet | None) -> ReuseModel:
        from modlora.reuse.apply import ReuseModel

        return ReuseModel(self.name, lm.model)
