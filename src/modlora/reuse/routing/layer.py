"""The routed LoRA linear layer and its two compute paths.

For a token ``x`` (in,) with routing weights ``w`` (E,) over the layer's experts, the layer returns

* mixing ``"outputs"`` (default): ``y = W₀x + Σ_e w_e s_e B_e A_e x``;
* mixing ``"parameters"`` (the reference code's default): ``y = W₀x + (Σ_e w_e s_e B_e)(Σ_e w_e A_e) x``
  (equal ranks required; the per-expert scaling ``s_e`` is folded into ``B_e``, which is the reference's
  ``(Σ w B)(Σ w A)·s`` when all ``s_e`` are equal).

Expert weights are stacked once at construction: ``A_pad`` (E, r, in) and ``Bt_pad`` (E, r, out) holding
``s_e B_eᵀ``, ranks zero-padded to the largest ``r``. No (tokens × experts × out) tensor is ever formed:

* **dense-fold** (any weights): ``h = x A_catᵀ`` (t, E·r), ``h ← h ⊙ w`` (weights repeated over each expert's rank
  rows), ``y = h Bt_cat`` — one matmul against the concatenated (E·r, out) B. Cost ∝ t·E·r·(in+out).
* **sparse top-k** (each token uses k experts), cost O(t·k·r·(in+out)), never O(E):
  - ``"sddmm"`` kernel (CPU, float32/float64; the default there): the k·r columns token ``i`` needs,
    ``c = e·r + j`` for its experts ``e`` and rank rows ``j``, form a CSR pattern (t, E·r) with k·r entries per
    row; ``z = x A_catᵀ`` is evaluated only at those entries (``torch.sparse.sampled_addmm``, t·k·r dot products
    of length ``in``) and ``y = Σ_c (w·z)_c Bt_cat[c]`` is one ``embedding_bag(mode="sum", per_sample_weights)``
    over the rows of ``Bt_cat`` (E·r, out). Nothing of size (t, k, r, in), (t, E·r) or (t, E) is formed, no sort,
    no gather copies of expert weights; 2 kernels + ~6 tiny index ops per layer.
  - ``"blocks"`` kernel (other devices / dtypes): the t·k (token, expert) assignments are sorted by expert and cut
    into blocks of ``bs`` rows that each belong to one expert (each expert's run padded to a multiple of ``bs``);
    per block the expert's ``A`` and ``B`` are gathered and two ``bmm`` compute the rank-r projections, which are
    scattered back with ``index_add_``. Cost ∝ t·k·r·(in+out) + (#blocks)·r·(in+out).

``path="auto"`` takes the sparse path when the routing is top-k with ``k · SPARSE_RATIO <= E`` **and** the stacked
rank ``E · r`` is at least ``SPARSE_MIN_STACKED_RANK`` (128 on CPU, where the sddmm kernel breaks even with one
dense GEMM at E·r ≈ 64–128 for 16–1024 tokens; 4096 on CUDA, where dense-fold is a couple of well-shaped GEMMs and
the sparse path costs host syncs and many small kernels — measured: at E=256, r=4, 2048 tokens on an H100,
dense-fold 87 ms vs sparse (blocks) 207 ms per SmolLM2-sized forward). Dense weights (centroid or μ routing)
always use dense-fold.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from modlora.errors import RoutingError

Mixing = Literal["outputs", "parameters"]
Path = Literal["auto", "dense", "sparse"]
SparseKernel = Literal["auto", "sddmm", "blocks"]
SPARSE_RATIO = 4
SPARSE_MIN_STACKED_RANK = {"cpu": 128, "cuda": 4096}
SDDMM_DTYPES = (torch.float32, torch.float64)
MAX_BLOCK = 32


@dataclass
class TopKRouting:
    """Sparse routing: token ``i`` uses experts ``indices[i]`` (t, k) with weights ``weights[i]`` (t, k)."""

    indices: torch.Tensor
    weights: torch.Tensor

    def dense(self, num_experts: int) -> torch.Tensor:
        """The same routing as a (t, E) weight matrix."""
        w = self.weights.new_zeros(self.weights.shape[0], num_experts)
        return w.scatter_add_(1, self.indices, self.weights)


class LayerRouter(Protocol):
    """What a routed layer calls: layer input ``x`` (t, in) and layer name → weights over the layer's experts,
    either a dense (t, E_layer) tensor or a :class:`TopKRouting`."""

    def __call__(self, x: torch.Tensor, layer: str) -> torch.Tensor | TopKRouting: ...


@dataclass
class RoutingState:
    """Per-routed-model switches shared by its layers (not global)."""

    example_weights: torch.Tensor | None = None      # (batch, E) over all experts of the routed model
    token_mask: torch.Tensor | None = None           # (batch, seq) attention mask of the current call
    recorder: Any = None                              # RoutingRecorder or None
    path: Path = "auto"
    sparse_kernel: SparseKernel = "auto"             # "auto": sddmm on CPU for float32/64, else blocks
    enabled: bool = True
    check_finite: bool = True                        # raise RoutingError on a non-finite LoRA output (see forward)
    expert_names: tuple[str, ...] = ()               # names of the routed model's experts, for messages
    extra: dict[str, Any] = field(default_factory=dict)


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite, from one sum in float32/64 (a pass ~15× cheaper than
    ``isfinite(x).all()`` on CPU): Inf and NaN never cancel, so a finite sum means finite terms; only when the sum is
    not finite (a non-finite term, or finite terms overflowing it) is the elementwise test run to decide."""
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def _block_size(assignments: int, num_experts: int) -> int:
    """Rows per block: the mean number of assignments per active expert, rounded up to a power of two (≤ 32).
    Larger blocks mean fewer, better-shaped ``bmm`` problems; the padding they add is < E·bs rows."""
    mean = assignments / max(num_experts, 1)
    if mean <= 1:
        return 1
    return min(MAX_BLOCK, 1 << math.ceil(math.log2(mean)))


class RoutedLoraLinear(nn.Module):
    """``base`` linear plus a routed mixture of LoRA experts (see module docstring for the maths).

    ``expert_ids``: global indices (in the routed model's expert list) of this layer's experts, in the order of
    ``A_pad``/``Bt_pad``; ``A``/``B``/``scalings``: per expert ``A_e`` (r_e, in), ``B_e`` (out, r_e), ``s_e``.
    """

    def __init__(self, base: nn.Linear, name: str, expert_ids: list[int], A: list[torch.Tensor],
                 B: list[torch.Tensor], scalings: list[float], router: LayerRouter, state: RoutingState,
                 mixing: Mixing = "outputs") -> None:
        super().__init__()
        if mixing not in ("outputs", "parameters"):
            raise RoutingError(f"mixing must be 'outputs' or 'parameters', got {mixing!r}")
        ranks = [a.shape[0] for a in A]
        if mixing == "parameters" and len(set(ranks)) > 1:
            raise RoutingError(f"layer {name}: mixing='parameters' needs equal expert ranks, got {sorted(set(ranks))}"
                               " (use mixing='outputs')")
        self.base = base
        self.name = name
        self.in_features, self.out_features = base.in_features, base.out_features
        self.mixing: Mixing = mixing
        self.router = router
        self.state = state
        self.num_experts = len(A)
        self.rank = max(ranks)
        dtype, device = base.weight.dtype, base.weight.device
        a_pad = torch.zeros(len(A), self.rank, self.in_features, dtype=torch.float32)
        bt_pad = torch.zeros(len(A), self.rank, self.out_features, dtype=torch.float32)
        for e, (a, b, s) in enumerate(zip(A, B, scalings, strict=True)):
            if a.shape[1] != self.in_features or b.shape[0] != self.out_features:
                raise RoutingError(f"layer {name}: expert #{expert_ids[e]} has A {tuple(a.shape)} / B {tuple(b.shape)}"
                                   f" but the layer is {self.out_features}×{self.in_features}")
            a_pad[e, : a.shape[0]] = a.float()
            bt_pad[e, : a.shape[0]] = (s * b.float()).T
        a_pad, bt_pad = a_pad.to(dtype=dtype), bt_pad.to(dtype=dtype)
        for e in range(len(A)):
            if not (torch.isfinite(a_pad[e]).all() and torch.isfinite(bt_pad[e]).all()):
                raise RoutingError(f"layer {name}: expert {self._expert_label(expert_ids[e], state)} has weights that "
                                   f"are not finite in {dtype} (max |A| {float(A[e].abs().max()):.3g}, max |s·B| "
                                   f"{float((scalings[e] * B[e].float()).abs().max()):.3g})")
        self.register_buffer("A_pad", a_pad.to(device=device), persistent=False)
        self.register_buffer("Bt_pad", bt_pad.to(device=device), persistent=False)
        self.register_buffer("expert_ids", torch.tensor(expert_ids, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("rank_offsets", torch.arange(self.rank, device=device), persistent=False)
        self._scaffold_key: tuple[Any, ...] | None = None
        self._scaffold: tuple[torch.Tensor, torch.Tensor] | None = None
        self._csr_warning_pending = True

    @staticmethod
    def _expert_label(expert_id: int, state: RoutingState) -> str:
        names = state.expert_names
        return repr(names[expert_id]) if 0 <= expert_id < len(names) else f"#{expert_id}"

    def experts_label(self, local: list[int]) -> str:
        """Names of this layer's experts ``local`` (indices into its own expert order) for messages."""
        ids = self.expert_ids.tolist()
        return ", ".join(self._expert_label(ids[e], self.state) for e in local)

    def nonfinite_error(self, x2: torch.Tensor, routing: torch.Tensor | TopKRouting) -> RoutingError:
        """Explain a non-finite LoRA output of this layer (runs only on that failure): a non-finite input, non-finite
        router weights (naming the experts of the affected tokens), or the experts whose own contribution
        ``w_e · s_e B_e A_e x`` overflows."""
        if not torch.isfinite(x2).all():
            return RoutingError(f"layer {self.name}: its input is already NaN/Inf (the base model or an earlier "
                                "layer overflowed)")
        w = (routing.dense(self.num_experts) if isinstance(routing, TopKRouting) else routing).float()
        bad_rows = ~torch.isfinite(w).all(dim=1)
        if bad_rows.any():
            rows = w[bad_rows]
            involved = ((rows != 0) | ~torch.isfinite(rows)).any(dim=0).nonzero().flatten().tolist()
            return RoutingError(f"layer {self.name}: the router gave NaN/Inf weights for {int(bad_rows.sum())} "
                                f"token(s) over expert(s) {self.experts_label(involved)} (check the temperature and "
                                "these experts' weights)")
        culprits = []
        for e in range(self.num_experts):
            part = (x2 @ self.A_pad[e].T) @ self.Bt_pad[e] * w[:, e : e + 1].to(x2.dtype)
            if not torch.isfinite(part).all():
                culprits.append(e)
        if not culprits:
            culprits = w.abs().sum(0).topk(min(2, self.num_experts)).indices.tolist()
        return RoutingError(f"layer {self.name}: the LoRA output of expert(s) {self.experts_label(culprits)} is not "
                            f"finite in {x2.dtype} (weights too large: max |A| {float(self.A_pad.abs().max()):.3g}, "
                            f"max |s·B| {float(self.Bt_pad.abs().max()):.3g})")

    def extra_repr(self) -> str:
        return f"{self.name}: experts={self.num_experts}, rank={self.rank}, mixing={self.mixing}"

    # ---------------------------------------------------------------- routing
    def routing_for(self, x2: torch.Tensor, shape: torch.Size) -> torch.Tensor | TopKRouting:
        """Weights for the flattened input ``x2`` (t, in) whose original shape is ``shape`` (…, seq, in)."""
        ew = self.state.example_weights
        if ew is None:
            return self.router(x2, self.name)
        w = ew.to(device=x2.device, dtype=torch.float32).index_select(1, self.expert_ids)   # (batch, E_layer)
        batch = ew.shape[0]
        if len(shape) < 3 or shape[0] != batch:
            raise RoutingError(f"layer {self.name}: example weights are for batch {batch} but the layer input has "
                               f"shape {tuple(shape)}")
        seq = x2.shape[0] // batch
        nnz = int((w != 0).sum(1).max())
        if self.state.path == "sparse" or (self.state.path == "auto" and nnz * SPARSE_RATIO <= self.num_experts):
            vals, idx = torch.topk(w, max(nnz, 1), dim=1)
            return TopKRouting(idx.repeat_interleave(seq, 0), vals.repeat_interleave(seq, 0))
        return w.repeat_interleave(seq, 0)

    def choose_path(self, routing: torch.Tensor | TopKRouting) -> str:
        if isinstance(routing, torch.Tensor):
            return "dense"
        if self.state.path != "auto":
            return self.state.path
        k = routing.indices.shape[1]
        min_rank = SPARSE_MIN_STACKED_RANK.get(self.A_pad.device.type, 256)
        sparse = k * SPARSE_RATIO <= self.num_experts and self.num_experts * self.rank >= min_rank
        return "sparse" if sparse else "dense"

    # ---------------------------------------------------------------- compute
    def delta(self, x2: torch.Tensor, routing: torch.Tensor | TopKRouting, path: str | None = None) -> torch.Tensor:
        """``Σ`` LoRA part (t, out) for input ``x2`` (t, in) under ``routing``."""
        path = path or self.choose_path(routing)
        if path == "sparse":
            if not isinstance(routing, TopKRouting):
                raise RoutingError(f"layer {self.name}: the sparse path needs top-k routing")
            return self._sparse(x2, routing.indices, routing.weights.to(x2.dtype))
        w = routing.dense(self.num_experts) if isinstance(routing, TopKRouting) else routing
        return self._dense(x2, w.to(x2.dtype))

    def _dense(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t, E, r = x.shape[0], self.num_experts, self.rank
        if w.shape != (t, E):
            raise RoutingError(f"layer {self.name}: router returned weights {tuple(w.shape)}, expected {(t, E)}")
        h = (x @ self.A_pad.view(E * r, -1).T).view(t, E, r)               # (t, E, r)
        if self.mixing == "outputs":
            h = h * w.unsqueeze(-1)
        else:
            merged = torch.einsum("ter,te->tr", h, w)                       # (Σ w A) x : (t, r)
            h = w.unsqueeze(-1) * merged.unsqueeze(1)                       # w_e (Σ w A) x
        return h.reshape(t, E * r) @ self.Bt_pad.view(E * r, -1)           # (t, out)

    def sparse_kernel(self, x: torch.Tensor) -> str:
        """Which sparse kernel runs for input ``x``: ``"sddmm"`` or ``"blocks"`` (see module docstring)."""
        kernel = self.state.sparse_kernel
        if kernel == "auto":
            return "sddmm" if x.device.type == "cpu" and x.dtype in SDDMM_DTYPES else "blocks"
        if kernel == "sddmm" and x.dtype not in SDDMM_DTYPES:
            raise RoutingError(f"layer {self.name}: the sddmm kernel needs float32/float64 inputs, got {x.dtype}")
        return kernel

    def _sparse(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.sparse_kernel(x) == "sddmm":
            return self._sparse_sddmm(x, idx, w)
        return self._sparse_blocks(x, idx, w)

    def _sparse_sddmm(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``y_i = Σ_j w_ij Σ_c z_ijc Bt[e_ij, c]`` with ``z_ijc = A[e_ij, c]·x_i``: sampled dense-dense matmul for
        ``z`` (t·k·r entries of ``x A_catᵀ``), then one embedding-bag sum over ``Bt_cat`` rows. (t, out)."""
        t, k = idx.shape
        r = self.rank
        cols = torch.add(self.rank_offsets, idx.unsqueeze(-1), alpha=r).view(t, k * r)    # e·r + j: (t, k·r)
        crow, zeros = self._csr_scaffold(t, k * r, x)
        if self._csr_warning_pending:   # torch warns once per process that CSR tensors are "beta"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, cols.view(-1), zeros, (t, self.num_experts * r),
                                                  check_invariants=False)
            self._csr_warning_pending = False
        else:
            pattern = torch.sparse_csr_tensor(crow, cols.view(-1), zeros, (t, self.num_experts * r),
                                              check_invariants=False)
        z = torch.sparse.sampled_addmm(pattern, x.contiguous(), self.A_pad.view(-1, self.in_features).T,
                                       beta=0.0).values().view(t, k, r)              # z_ijc: (t, k, r)
        if self.mixing == "outputs":
            coef = z * w.unsqueeze(-1)                                          # w_ij (A_e x)_c
        else:
            merged = torch.einsum("tkr,tk->tr", z, w)                           # (Σ_j w_ij A_e) x : (t, r)
            coef = w.unsqueeze(-1) * merged.unsqueeze(1)                        # w_ij ((Σ w A) x)_c
        return nn.functional.embedding_bag(cols.view(-1), self.Bt_pad.view(-1, self.out_features), crow[:-1],
                                           mode="sum", per_sample_weights=coef.view(-1))

    def _csr_scaffold(self, t: int, per_row: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row pointers ``[0, per_row, 2·per_row, …]`` (t+1,) and zero values (t·per_row,) of the sampling pattern
        (``crow[:-1]`` doubles as the embedding-bag offsets), reused while the shape, dtype, device and
        inference-mode flag stay the same (they are never written)."""
        key = (t, per_row, x.dtype, x.device, torch.is_inference_mode_enabled())
        if self._scaffold_key != key:
            self._scaffold = (torch.arange(0, t * per_row + 1, per_row, device=x.device),
                              x.new_zeros(t * per_row))
            self._scaffold_key = key
        return self._scaffold

    def _sparse_blocks(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t, k = idx.shape
        E, r = self.num_experts, self.rank
        n = t * k
        flat_e = idx.reshape(-1)
        order = torch.argsort(flat_e, stable=True)                          # assignments sorted by expert
        sorted_e = flat_e[order]
        counts = torch.bincount(flat_e, minlength=E)
        bs = _block_size(n, int((counts > 0).sum()))
        blocks_per_e = (counts + bs - 1) // bs
        num_blocks = int(blocks_per_e.sum())
        block_expert = torch.repeat_interleave(torch.arange(E, device=x.device), blocks_per_e,
                                               output_size=num_blocks)     # (nb,)
        first_slot = (torch.cumsum(blocks_per_e, 0) - blocks_per_e) * bs    # (E,)
        first_assign = torch.cumsum(counts, 0) - counts                     # (E,)
        slot = first_slot[sorted_e] + torch.arange(n, device=x.device) - first_assign[sorted_e]   # (n,)
        token_sorted = order // k
        src = torch.zeros(num_blocks * bs, dtype=torch.long, device=x.device)   # padding rows read token 0 ...
        src[slot] = token_sorted
        slot_w = torch.zeros(num_blocks * bs, dtype=x.dtype, device=x.device)  # ... with weight 0
        slot_w[slot] = w.reshape(-1)[order]
        xp = x.index_select(0, src).view(num_blocks, bs, -1)
        z = torch.bmm(xp, self.A_pad.index_select(0, block_expert).transpose(1, 2))   # (nb, bs, r)
        if self.mixing == "outputs":
            z = z * slot_w.view(num_blocks, bs, 1)
        else:
            merged = torch.zeros(t, r, dtype=x.dtype, device=x.device)
            merged.index_add_(0, src, z.view(-1, r) * slot_w.unsqueeze(1))  # (Σ w A) x per token
            z = merged.index_select(0, src).view(num_blocks, bs, r) * slot_w.view(num_blocks, bs, 1)
        yp = torch.bmm(z, self.Bt_pad.index_select(0, block_expert))       # (nb, bs, out)
        y = torch.zeros(t, self.out_features, dtype=x.dtype, device=x.device)
        return y.index_add_(0, src, yp.view(-1, self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.state.enabled:
            return out
        x2 = x.reshape(-1, self.in_features)
        routing = self.routing_for(x2, x.shape)
        delta = self.delta(x2, routing)
        # One check per call (a device sync on GPU; turn it off with state.check_finite): NaN/Inf routing weights
        # or an overflowing expert always reach the LoRA output, so this catches both; the cause is found after.
        if self.state.check_finite and not all_finite(delta):
            raise self.nonfinite_error(x2, routing)
        if self.state.recorder is not None:
            self.state.recorder.add(self.name, self.expert_ids, routing, self.num_experts, x.shape, self.state)
        return out + delta.view(*x.shape[:-1], self.out_features).to(out.dtype)
