"""Arrow's default options, written once: :class:`~modlora.reuse.methods.arrow.ArrowOptions` takes its field
defaults from here and so does :class:`~modlora.reuse.routing.ArrowRouter`, which sits below the methods and cannot
read their options. Everything above the methods (the server, its CLI) reads them from ``ArrowOptions``' fields.
No torch here: the methods' registry imports it."""

ARROW_TOP_K = 4             # experts per token
ARROW_TEMPERATURE = 1.0     # logit temperature T: logit_e = |x·v_e| / T
ARROW_RIDGE = 0.01          # whitened Arrow's ε: whiten by Σ + ε·tr(Σ)/d·I
