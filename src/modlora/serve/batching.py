"""The requests that decode together and their KV cache.

The members' KV caches are kept left-padded in one ``DynamicCache`` (B, heads, L, d) with an attention mask (B, L)
that hides the padding; every row gets its own position ids (its real length), so a row's result equals running it
alone (up to float rounding). A new row is prefilled alone and joins by left-padding the batch's caches or its own
to the longer length; finished or cancelled rows leave by ``index_select`` on the batch axis, after which the
columns that are padding in every row are trimmed from the left.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from modlora.serve.decoding import GenerationRequest


class Batch:
    """The rows decoding together (``rows``), their left-padded ``cache`` and attention ``mask`` (B, L), and how
    ``model``'s forward takes them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.config = model.config
        params = inspect.signature(model.forward).parameters     # transformers 5 renamed past_key_values
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.rows: list[GenerationRequest] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def prefill_inputs(self, req: GenerationRequest, device: torch.device) -> dict[str, Any]:
        """Forward arguments that read ``req``'s prompt alone (last-position logits only, where the model can)."""
        ids = torch.tensor([req.prompt_ids], device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **self._keep_last}

    def decode_inputs(self, device: torch.device) -> dict[str, Any]:
        """Forward arguments of one decoding step: each row's last token at its own position, over the cache."""
        ids = torch.tensor([[r.generated[-1]] for r in self.rows], device=device)
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        positions = mask.sum(1, keepdim=True) - 1
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, self._cache_arg: self.cache}

    def advance(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """The cache and mask after a decoding step (``mask``: its ``attention_mask``)."""
        self.cache, self.mask = cache, mask

    def join(self, req: GenerationRequest, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add a prefilled row: left-pad the batch's caches or the new row's cache to the longer length and stack."""
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.rows = cache, mask, [req]
            return
        width = max(self.mask.shape[1], mask.shape[1])
        layers = []
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            layers.append((torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)]),
                           torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])))
        self.cache = DynamicCache(layers, config=self.config)
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.rows.append(req)

    def leave(self) -> list[GenerationRequest]:
        """Drop the finished or cancelled rows (and the all-padding columns they leave on the left); those rows."""
        ended = [r.cancelled or r.finished for r in self.rows]      # read once: cancelled is set from other threads
        if not any(ended):
            return []
        keep = [b for b, gone in enumerate(ended) if not gone]
        left = [r for r, gone in zip(self.rows, ended, strict=True) if gone]
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self.cache, self.mask = None, None
            return left
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int((mask.cumsum(1) == 0).sum(1).min())           # leading columns that are padding in every row
        layers = [(lay.keys.index_select(0, index)[:, :, first:], lay.values.index_select(0, index)[:, :, first:])
                  for lay in self.cache.layers]
        self.cache = DynamicCache(layers, config=self.config)
        self.mask = mask[:, first:]
        return left

    def clear(self) -> list[GenerationRequest]:
        """Empty the batch (after a failed step); the rows it held."""
        rows, self.rows, self.cache, self.mask = self.rows, [], None, None
        return rows


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad ``t`` on the left of ``dim`` to ``width``."""
    pad = width - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t.new_zeros(shape), t], dim=dim)
