"""The KV caches of the engine: the decoding rows' slots, the prompts being read, and the prefix cache.

Layout: one tensor holds every layer's keys and values, ``(layers, 2, …, kv_heads, length, head_dim)``.

* :class:`SlotCache` — the decoding rows. Row ``b`` owns slot ``b`` of a preallocated tensor
  ``(layers, 2, slots, kv_heads, capacity, head_dim)`` and its tokens sit at positions ``0 … len_b − 1`` (right
  padding). A decoding step writes each row's new key/value at its own position ``len_b`` (one indexed write per
  layer), and attention reads the view ``[:B, :, :max len + 1]`` with a mask that hides each row's tail: no row is
  ever copied to take a step. A row joins by copying its prompt's keys/values into the next free slot; a row that
  leaves is replaced by the last row (one row copied). The tensor only grows (doubling slots or capacity, so each
  token is moved O(1) times on average) and is released when the batch empties.
* :class:`PromptRead` — a prompt being read (prefilled) in chunks: its keys/values ``(layers, 2, kv_heads,
  prompt_length, head_dim)``. Chunks of several prompts are read in one forward, packed into one sequence
  (``(1, T)``, each token at its own position, each piece attending causally to its own prompt), so prompts of
  any lengths share a forward without padding; a prompt longer than the step's token budget is read over several steps while the
  decoding rows go on.
* :class:`PrefixCache` — blocks of ``block`` prompt tokens already read, keyed by the routing they were read with
  and their whole prefix, with their keys/values and their routing telemetry, evicted least recently used past a
  token budget: a prompt that shares its first blocks with an earlier one (a task's definition, a system prompt)
  reads only the rest.

One forward serves a whole engine step: the pieces of prompts being read, packed into one sequence, then one token
per decoding row, ``(1, T + B)`` (each token at its own position). The cache object the model sees is
:class:`StepCache` (a transformers :class:`~transformers.Cache`): the model's attention layers call its ``update``
with the step's new keys/values, and it writes them into the prompts and the slots. The model's attention function
is :func:`step_attention` (installed by :func:`install_step_attention`, which wraps the model's own SDPA or eager
function): it attends each piece's queries to its own prompt's keys under a causal mask and the last ``B``
queries, as a batch of B rows of one query, to their own slots, so the decoding rows and the prompts share
the model's weight reads without attending across each other. Masks are 4-D (bool, True = attend, or additive),
built here; positions are given explicitly. Only models whose layers all attend to the whole context are supported
(no sliding windows).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface, Cache, PreTrainedModel

from modlora.errors import ModloraError
from modlora.serve.decoding import GenerationRequest
from modlora.serve.requests import TokenLogprob
from modlora.serve.telemetry import RoutingTally

MASK_KINDS = {"sdpa": "bool", "eager": "additive"}      # attention implementations and the 4-D masks they take


@dataclass(frozen=True)
class KVShape:
    """The model's cache geometry and forward: ``layers``, ``heads`` (key/value heads), ``head_dim``, ``dtype``,
    ``device``, the 4-D mask its attention takes (``mask_kind``: bool, True = attend; or additive float), the name
    of its forward's cache argument and whether it takes ``logits_to_keep``."""

    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    mask_kind: str = "bool"
    cache_arg: str = "cache"
    keeps_logits: bool = True

    @classmethod
    def of(cls, model: torch.nn.Module) -> KVShape:
        """The geometry of ``model``; a :class:`ModloraError` for a model with sliding-window layers or an
        attention implementation other than SDPA or eager."""
        cfg = model.config
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ModloraError(f"the serving engine needs a model whose layers all attend to the whole context; "
                               f"this one has {sorted(kinds)}")
        attention = getattr(cfg, "_attn_implementation", None) or "eager"
        if attention not in MASK_KINDS:
            raise ModloraError(f"the serving engine runs models with {' or '.join(MASK_KINDS)} attention; this one "
                               f"uses {attention!r} (load it with attn_implementation='sdpa')")
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        params = inspect.signature(model.forward).parameters        # transformers 5 renamed past_key_values
        p = next(model.parameters())
        return cls(int(cfg.num_hidden_layers), heads, head_dim, p.dtype, p.device, MASK_KINDS[attention],
                   "cache" if "cache" in params else "past_key_values", "logits_to_keep" in params)

    def mask(self, attend: torch.Tensor) -> torch.Tensor:
        """A boolean (B, 1, q, k) mask (True = attend) as the model's attention takes it."""
        if self.mask_kind == "bool":
            return attend
        return torch.zeros(attend.shape, dtype=self.dtype, device=attend.device).masked_fill_(
            ~attend, torch.finfo(self.dtype).min)

    def empty(self, *middle: int) -> torch.Tensor:
        """A zeroed ``(layers, 2, *middle, head_dim)`` tensor (zeros: masked positions must hold finite values)."""
        return torch.zeros(self.layers, 2, *middle, self.head_dim, dtype=self.dtype, device=self.device)


@dataclass(eq=False)
class PromptRead:
    """A prompt being read: its request, keys/values ``kv`` (layers, 2, heads, prompt length, head_dim), how many
    tokens are in it (``done``; the first ``reused`` came from the prefix cache), its prefix-cache ``key`` (None:
    not cached), the routing tally of each of its blocks (own experts), for the prefix cache, and the prompt
    tokens' log-probabilities read so far (``SamplingParams.prompt_logprobs``)."""

    req: GenerationRequest
    kv: torch.Tensor
    done: int = 0
    reused: int = 0
    key: Hashable | None = None
    blocks: list[RoutingTally | None] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.req.prompt_ids)


@dataclass(frozen=True)
class Piece:
    """The part of a prompt one packed forward reads: tokens ``start … start + count − 1`` of ``read``."""

    read: PromptRead
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


class StepCache(Cache):
    """One engine step's keys/values: the ``pieces`` of prompts being read (the forward's first ``T`` tokens,
    packed; ``piece_masks[i]`` the (1, 1, count, end) causal mask of piece i's queries over its prompt's keys) and,
    when ``slots`` is given, one token per decoding row (the last ``B`` tokens; ``rows_mask`` the (B, 1, 1, L) mask
    of their attention over their slots, None for one row). ``update`` writes both and returns the pieces'
    keys/values (1, H, S, d), each piece's prompt up to its end in order (the rows' (B, H, L, d) when there is no
    piece); the rows' are kept in ``rows_kv`` for :func:`step_attention`."""

    def __init__(self, pieces: Sequence[Piece] = (), piece_masks: Sequence[torch.Tensor] = (),
                 slots: SlotCache | None = None, rows_mask: torch.Tensor | None = None) -> None:
        super().__init__(layers=[])
        self.pieces = list(pieces)
        self.piece_masks = list(piece_masks)
        self.prompt_tokens = sum(p.count for p in self.pieces)
        self.slots = slots
        self.rows_mask = rows_mask
        self.rows_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.prompt_tokens
        if self.slots is not None:                 # (1, H, T + B, d) → the rows' (B, H, 1, d)
            self.rows_kv = self.slots.write(layer_idx, key_states[0, :, t:].transpose(0, 1).unsqueeze(2),
                                            value_states[0, :, t:].transpose(0, 1).unsqueeze(2))
            if not self.pieces:
                return self.rows_kv
        keys, values, offset = [], [], 0
        for p in self.pieces:                      # (1, H, T, d): each piece's tokens in order
            kv = p.read.kv[layer_idx]
            kv[0, :, p.start:p.end] = key_states[0, :, offset:offset + p.count]
            kv[1, :, p.start:p.end] = value_states[0, :, offset:offset + p.count]
            keys.append(kv[0, :, :p.end])
            values.append(kv[1, :, :p.end])
            offset += p.count
        return torch.cat(keys, dim=1).unsqueeze(0), torch.cat(values, dim=1).unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:    # positions are always given explicitly
        raise NotImplementedError("the serving engine gives position ids explicitly")


def step_attention(attend: Any, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                   modlora_step: StepCache | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The model's attention ``attend`` (its SDPA or eager function) over an engine step (``modlora_step``, passed
    as a forward argument): queries (1, Hq, T + B, d); the first T, piece by piece, attend to their piece's part of
    ``key``/``value`` (the pieces' keys in order) under the piece's causal mask; the last B — one per decoding row,
    as a (B, Hq, 1, d) batch — to their slots. Output (1, T + B, Hq, d). Without a step (any other forward of the
    model): ``attend`` itself."""
    if modlora_step is None:
        return attend(module, query, key, value, attention_mask, **kwargs)
    t, parts = modlora_step.prompt_tokens, []
    q0 = k0 = 0
    for p, mask in zip(modlora_step.pieces, modlora_step.piece_masks, strict=True):   # one call per piece
        parts.append(attend(module, query[:, :, q0:q0 + p.count], key[:, :, k0:k0 + p.end],
                            value[:, :, k0:k0 + p.end], mask, **kwargs)[0])
        q0, k0 = q0 + p.count, k0 + p.end
    if modlora_step.rows_kv is not None:
        rows_key, rows_value = modlora_step.rows_kv
        rows_query = query[0, :, t:].transpose(0, 1).unsqueeze(2)
        parts.append(attend(module, rows_query, rows_key, rows_value, modlora_step.rows_mask, **kwargs)[0]
                     .transpose(0, 1))
    return torch.cat(parts, dim=1), None


def install_step_attention(model: PreTrainedModel) -> str:
    """Make ``model`` attend with :func:`step_attention` around its own SDPA or eager function (registered with
    transformers' ``AttentionInterface`` under a name per wrapped function); every forward without an engine step
    computes exactly what it did. Returns the implementation to give back to ``set_attn_implementation``."""
    base = model.config._attn_implementation
    functions = AttentionInterface()
    if base == "sdpa":
        attend = functions["sdpa"]
    else:
        attention = next((m for m in model.modules() if hasattr(m, "layer_idx") and "Attention" in type(m).__name__),
                         None)
        attend = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None) \
            if attention is not None else None
        if attend is None:
            raise ModloraError(f"the serving engine cannot find the eager attention function of "
                               f"{type(model).__name__}; load the model with attn_implementation='sdpa'")
    name = f"modlora_step:{attend.__module__}"
    if name not in functions:
        AttentionInterface.register(name, functools.partial(step_attention, attend))
    model.set_attn_implementation(name)
    return base


class SlotCache:
    """The decoding rows' keys/values (see the module docstring): ``lengths[b]`` tokens of row ``b`` in slot b."""

    def __init__(self, shape: KVShape) -> None:
        self.shape = shape
        self.data: torch.Tensor | None = None          # (layers, 2, slots, heads, capacity, head_dim)
        self.lengths: list[int] = []
        self._step: tuple[torch.Tensor, int] | None = None    # (write index (B, heads, 1, head_dim), kv length)

    def _reserve(self, rows: int, length: int) -> None:
        """Room for ``rows`` slots of ``length`` positions (grown by doubling; existing rows kept)."""
        s = self.shape
        have_rows, have_len = (0, 0) if self.data is None else (self.data.shape[2], self.data.shape[4])
        if rows <= have_rows and length <= have_len:
            return
        new_rows = max(rows, 2 * have_rows if rows > have_rows else have_rows, 1)
        new_len = max(length, 2 * have_len if length > have_len else have_len, 16)
        data = s.empty(new_rows, s.heads, new_len)
        if self.data is not None and self.lengths:
            used = max(self.lengths)
            data[:, :, :len(self.lengths), :, :used] = self.data[:, :, :len(self.lengths), :, :used]
        self.data = data

    def join(self, kv: torch.Tensor, length: int) -> None:
        """Add a row whose keys/values are ``kv[..., :length, :]`` (layers, 2, heads, ≥ length, head_dim)."""
        b = len(self.lengths)
        self._reserve(b + 1, length + 1)
        assert self.data is not None
        self.data[:, :, b, :, :length] = kv[:, :, :, :length]
        self.lengths.append(length)

    def keep(self, keep: Sequence[bool]) -> list[int]:
        """Keep the rows marked True: each hole below the new row count is filled with the last kept row (one row
        copied). Returns the new order: ``order[i]`` is the old index of new row ``i``."""
        order = list(range(len(keep)))
        kept = [b for b in order if keep[b]]
        n = len(kept)
        if n == 0:
            self.data, self.lengths = None, []
            return []
        tail = [b for b in kept if b >= n]                       # kept rows that must move down
        holes = [b for b in range(n) if not keep[b]]
        assert self.data is not None
        for hole, src in zip(holes, tail, strict=True):
            length = self.lengths[src]
            self.data[:, :, hole, :, :length] = self.data[:, :, src, :, :length]
            self.lengths[hole] = length
            order[hole] = src
        self.lengths = self.lengths[:n]
        return order[:n]

    def begin_step(self) -> torch.Tensor | None:
        """Ready a decoding step (row ``b`` reads its next token at position ``lengths[b]``, written there by
        :meth:`write`); the (B, 1, 1, L) mask that hides each row's tail, None for one row."""
        n = len(self.lengths)
        self._reserve(n, max(self.lengths) + 1)
        positions = torch.tensor(self.lengths, device=self.shape.device)
        width = int(max(self.lengths)) + 1
        index = positions.view(n, 1, 1, 1).expand(n, self.shape.heads, 1, self.shape.head_dim)
        self._step = (index, width)
        if n == 1:
            return None
        attend = torch.arange(width, device=self.shape.device).unsqueeze(0) <= positions.unsqueeze(1)       # (B, L)
        return self.shape.mask(attend[:, None, None, :])

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one decoding step's keys/values (B, H, 1, d) at each row's position; the (B, H, L, d) views the
        step attends to."""
        assert self.data is not None and self._step is not None
        index, width = self._step
        n = index.shape[0]
        k, v = self.data[layer, 0, :n], self.data[layer, 1, :n]
        k.scatter_(2, index, keys.to(k.dtype))            # row b's key at its own position lengths[b]
        v.scatter_(2, index, values.to(v.dtype))
        return k[:, :, :width], v[:, :, :width]

    def advance(self) -> None:
        """After a decoding step: each row is one token longer."""
        self.lengths = [n + 1 for n in self.lengths]
        self._step = None


def step_inputs(pieces: Sequence[Piece], slots: SlotCache | None, tokens: Sequence[int],
                shape: KVShape) -> dict[str, Any]:
    """Forward arguments of one engine step: the ``pieces`` packed into one sequence, then ``tokens[b]`` for each
    decoding row of ``slots`` (None: no rows) at its position ``lengths[b]``: ids and positions (1, T + B); the step
    itself as ``modlora_step`` for :func:`step_attention`, with each piece's causal mask (its queries at positions
    start … end − 1 over its prompt's keys 0 … end − 1)."""
    ids: list[int] = []
    positions: list[int] = []
    device = shape.device
    piece_masks = []
    for p in pieces:
        ids += p.read.req.prompt_ids[p.start:p.end]
        positions += range(p.start, p.end)
        qpos = torch.arange(p.start, p.end, device=device)
        piece_masks.append(shape.mask((torch.arange(p.end, device=device)[None, :] <= qpos[:, None])[None, None]))
    rows_mask = None
    if slots is not None:
        rows_mask = slots.begin_step()
        ids += tokens
        positions += slots.lengths
    step = StepCache(pieces, piece_masks, slots, rows_mask)
    return {"input_ids": torch.tensor([ids], device=device),
            "position_ids": torch.tensor([positions], device=device), shape.cache_arg: step,
            "attention_mask": None, "modlora_step": step}


@dataclass(eq=False)
class _Block:
    kv: torch.Tensor                 # (layers, 2, heads, block, head_dim)
    tally: RoutingTally | None       # the routing telemetry of its tokens (own experts), None without routing
    serial: int                      # unique for the cache's life: its children's parent


class PrefixCache:
    """Prompt blocks already read (see the module docstring). A block is found by ``(parent, tokens)``: ``parent``
    is the routing key for a prompt's first block, else the previous block's entry — so a hit is an exact match of
    the routing and of every token before it. ``capacity`` tokens at most (0: off), least recently used first out."""

    def __init__(self, capacity: int, block: int) -> None:
        if block < 1:
            raise ModloraError(f"the prefix cache's block must be at least 1 token, got {block}")
        self.capacity = capacity
        self.block = block
        self._blocks: OrderedDict[tuple[Any, tuple[int, ...]], _Block] = OrderedDict()
        self._serial = 0
        self.hits = 0          # prompt tokens found
        self.lookups = 0       # prompt tokens looked up

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, key: Hashable, tokens: Sequence[int]) -> list[_Block]:
        """The cached blocks that start ``tokens`` (at most ``len(tokens) − 1`` tokens: the last prompt token is
        always read, for its logits), each marked recently used."""
        found: list[_Block] = []
        self.lookups += len(tokens)
        if self.capacity <= 0:
            return found
        parent: Any = ("root", key)
        bs = self.block
        for j in range((len(tokens) - 1) // bs):
            entry_key = (parent, tuple(tokens[j * bs:(j + 1) * bs]))
            block = self._blocks.get(entry_key)
            if block is None:
                break
            self._blocks.move_to_end(entry_key)
            found.append(block)
            parent = block.serial
        self.hits += len(found) * bs
        return found

    def insert(self, key: Hashable, tokens: Sequence[int], kv: torch.Tensor,
               tallies: Sequence[RoutingTally | None]) -> None:
        """Cache the full blocks of a prompt read with routing ``key``: ``kv`` (layers, 2, heads, ≥ len, head_dim),
        ``tallies[j]`` the routing telemetry of block j."""
        if self.capacity <= 0:
            return
        parent: Any = ("root", key)
        bs = self.block
        for j in range(min(len(tokens) // bs, len(tallies))):
            entry_key = (parent, tuple(tokens[j * bs:(j + 1) * bs]))
            block = self._blocks.get(entry_key)
            if block is None:
                self._serial += 1
                block = _Block(kv[:, :, :, j * bs:(j + 1) * bs].clone(), tallies[j], self._serial)
                self._blocks[entry_key] = block
            self._blocks.move_to_end(entry_key)
            parent = block.serial
        while len(self._blocks) * bs > self.capacity:
            self._blocks.popitem(last=False)
