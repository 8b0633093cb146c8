"""How a new expert's LoRA factors start (``BuildConfig.init``, ``modlora build --init``).

Every method starts ``B = 0`` (so ``ΔW = s·B·A = 0`` at step 0) and differs in ``A`` (r × d_in per adapted layer):

* ``shared`` — PEFT's default, ``A ~ U(±1/√d_in)`` (``kaiming_uniform_(a=√5)``) drawn from the build seed, so every
  expert of a build starts from the **same** A. After a short budget A has barely moved and every expert's row space,
  hence its Arrow prototype, lies near one common r-dimensional span.
* ``per-expert`` — the same distribution drawn from ``seed ⊕ crc32(expert name)``: unrelated random row spaces.
* ``eva`` — EVA (Paischer et al. 2024; PEFT's ``init_lora_weights="eva"`` with ``rho = 1``, every layer keeping
  rank r): A = the top-r principal directions of the layer's inputs over the expert's own training sequences
  (prompt and target tokens), computed exactly in one pass (:func:`eva_init`; tested against PEFT's
  ``initialize_lora_eva_weights``). Rows are unit vectors. Needs the expert's data (it has it: it trains on it).
* ``gradient`` — A = the top-r right singular vectors of the full-weight gradient ``G = ∂L/∂W = Σ_t δ_t x_tᵀ``
  (d_out × d_in) of the target loss over the expert's first training batches (LoRA-GA-like, with B = 0): the input
  directions the task's loss most wants to change. Rows are unit vectors.

Experts with an explicit initial adapter (a warm start from a shared expert) keep it; ``shared`` returns no
adapter and the trainer draws the default from the seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, get_args

from modlora.errors import DataError

if TYPE_CHECKING:  # the CLI reads the names below at parse time, before torch is imported
    import torch

    from modlora.data import EncodedExample
    from modlora.library.adapters import LoraAdapter, LoraSpec

InitMethod = Literal["shared", "per-expert", "eva", "gradient"]
INIT_METHODS: tuple[str, ...] = get_args(InitMethod)
DEFAULT_INIT: InitMethod = "shared"
INIT_BATCHES = 8
"""The expert's first training batches (its own stream's order) that ``eva`` and ``gradient`` read: 64 sequences at
batch 8, about 10k tokens on SNI prompts, enough for r = 4 directions of a 576-dim layer input."""


def check_init(method: str) -> InitMethod:
    """``method`` if it names an initialisation, else a :class:`DataError` listing them."""
    if method not in INIT_METHODS:
        raise DataError(f"init must be one of {', '.join(INIT_METHODS)}, got {method!r}")
    return method  # type: ignore[return-value]


def check_init_fits(method: str, strategy: str) -> None:
    """Refuse a non-default ``method`` for Poly/MHR (``strategy`` ``poly`` or ``mhr``), whose skills are not trained on
    tasks of their own and start from seeds ``seed + s``: the one rule the CLI, the builder and the study apply."""
    if strategy in ("poly", "mhr") and method != DEFAULT_INIT:
        raise DataError(f"init {method!r} applies to experts trained on their own tasks; Poly/MHR skills start from "
                        f"seeds seed + s (use the default init {DEFAULT_INIT!r})")


def expert_seed(seed: int, name: str) -> int:
    """The ``per-expert`` seed of expert ``name``: ``seed ⊕ crc32(name)`` (stable across runs and machines)."""
    return (seed ^ zlib.crc32(name.encode())) & 0x7FFFFFFF


def _batches(examples: Sequence[EncodedExample], batch_size: int, seed: int) -> list[list[EncodedExample]]:
    from modlora.data import length_grouped_batches
    if not examples:
        raise DataError("a data-aware initialisation needs training examples")
    return length_grouped_batches(examples, batch_size, seed=seed)[:INIT_BATCHES]


def eva_init(model: torch.nn.Module, modules: Sequence[str], spec: LoraSpec, examples: Sequence[EncodedExample], *,
             pad_id: int, batch_size: int = 8, seed: int = 0) -> LoraAdapter:
    """EVA's A for each of ``modules``, B = 0: the top-r principal directions of the layer's inputs over every
    non-padding token of the first :data:`INIT_BATCHES` batches of ``examples`` (length-grouped by ``batch_size``
    with ``seed``: the expert's first training batches), one pass of the decoder (no LM head).

    Per layer, over the n tokens' inputs x (d_in,): ``μ = Σx/n``, ``C = Σxxᵀ/n − μμᵀ``
    (:func:`~modlora.reuse.routing.routers.input_moments`), A = the eigenvectors of C with the r largest eigenvalues (rows,
    unit norm). This is the PCA that PEFT's ``get_eva_state_dict`` estimates by randomised incremental PCA, cycling
    through its batches until the components stop moving (``tau`` 0.99); here it is computed exactly on those tokens
    in one pass. Layers that read the same input (q/k/v) share one accumulation, as PEFT's hashing of equal inputs
    does."""
    import torch

    from modlora.activations import input_group, input_moments
    from modlora.data import collate
    from modlora.library.adapters import LoraAdapter

    batches = [(b.input_ids, b.attention_mask) for b in (collate(batch, pad_id) for batch in
                                                          _batches(examples, batch_size, seed))]
    moments = input_moments(model, modules, batches)
    count = next(iter(moments.values())).count
    if count < spec.rank:
        raise DataError(f"EVA needs at least r = {spec.rank} tokens, got {count}")
    A = {}
    for m in modules:
        _, vecs = torch.linalg.eigh(moments[input_group(m)].cov)             # ascending eigenvalues
        A[m] = vecs[:, -spec.rank:].flip(1).T.float().contiguous()           # (r, d_in), largest first
    named = dict(model.named_modules())
    B = {m: torch.zeros(named[m].out_features, spec.rank) for m in modules}
    return LoraAdapter(spec, {m: A[m] for m in modules}, B)


def gradient_init(model: torch.nn.Module, modules: Sequence[str], spec: LoraSpec, examples: Sequence[EncodedExample],
                  *, pad_id: int, batch_size: int = 8, seed: int = 0) -> LoraAdapter:
    """A = top-r right singular vectors of ``G = Σ_batches ∂L/∂W`` per module (``L``: the summed target loss of a
    batch, as training uses it), over the first :data:`INIT_BATCHES` length-grouped batches of ``examples``; B = 0.

    ``∂L/∂W = Σ_t δ_t x_tᵀ`` is accumulated from each layer's input ``x`` (t, d_in) and output gradient ``δ``
    (t, d_out), the base weights untouched (their ``requires_grad`` is restored)."""
    import torch

    from modlora.build.training import target_loss
    from modlora.data import collate
    from modlora.library.adapters import LoraAdapter

    named = dict(model.named_modules())
    grads = {m: torch.zeros(named[m].out_features, named[m].in_features) for m in modules}

    def keep_input(name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()

            def accumulate(g: torch.Tensor) -> None:
                grads[name].add_(g.reshape(-1, g.shape[-1]).float().T @ x)
            output.register_hook(accumulate)
        return hook

    device = next(model.parameters()).device
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    handles = [named[m].register_forward_hook(keep_input(m)) for m in modules]
    embed = model.get_input_embeddings()
    embed_handle = embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for batch in _batches(examples, batch_size, seed):
            loss, _ = target_loss(model, collate(batch, pad_id).to(device))
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        embed_handle.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    A = {}
    for m, g in grads.items():
        if not torch.isfinite(g).all() or not g.any():
            raise DataError(f"gradient init: the gradient of {m} is zero or not finite")
        A[m] = torch.linalg.svd(g.double(), full_matrices=False).Vh[: spec.rank].float().contiguous()
    return LoraAdapter(spec, A, {m: torch.zeros(named[m].out_features, spec.rank) for m in modules})


def initial_adapter(method: InitMethod, model: torch.nn.Module, spec: LoraSpec, name: str,
                    examples: Sequence[EncodedExample], *, pad_id: int, seed: int, batch_size: int = 8
                    ) -> LoraAdapter | None:
    """Expert ``name``'s initial adapter from its training ``examples``; None for ``shared``, whose common
    initialisation the trainer draws from ``seed``. The spec's targets are resolved against ``model`` first
    (:func:`~modlora.library.adapters.resolve_spec`), so a target the model lacks is refused before any work."""
    from modlora.build.multitrain import default_init
    from modlora.library.adapters import adapted_modules, resolve_spec

    check_init(method)
    spec = resolve_spec(model, spec)
    if method == "shared":
        return None
    modules = adapted_modules(model, spec.target_modules)
    if method == "per-expert":
        return default_init(model, modules, spec, expert_seed(seed, name))
    make = eva_init if method == "eva" else gradient_init
    return make(model, modules, spec, examples, pad_id=pad_id, batch_size=batch_size, seed=seed)
