"""Building a library: the one-pass trainer (:mod:`~modlora.build.training`, :mod:`~modlora.build.multitrain`),
LoRA initialisation, the building strategies (private, shared, MBC, random, semantic, Poly/MHR;
:mod:`~modlora.build.strategies`) and the expert clustering behind MBC (:mod:`~modlora.build.clustering`)."""
