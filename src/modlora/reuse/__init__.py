"""Reusing a library zero-shot: the methods' registry (:mod:`~modlora.reuse.methods`), per-token routing
(:mod:`~modlora.reuse.routing`), merges and low-rank algebra, and the routers that are learned
(:mod:`~modlora.reuse.learned`: PhatGOOSE gates, the task classifier, LoraHub's search)."""
