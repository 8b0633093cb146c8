"""Routers and weights that are learned from data: PhatGOOSE's gates (:mod:`~modlora.reuse.learned.gates`), the
task classifier (:mod:`~modlora.reuse.learned.classifier`) and LoraHub's few-shot search
(:mod:`~modlora.reuse.learned.lorahub`)."""
