"""Choosing a token from the logits, and how much of the decoded text may be sent yet.

Sampling: temperature 0 is greedy (argmax); otherwise ``p = softmax(logits / T)``, restricted with ``top_p < 1`` to
the smallest set of most likely tokens whose mass reaches ``top_p`` (nucleus), drawn with the request's own
generator. Streaming: text that may still turn into a stop string, or that ends in an incomplete UTF-8 sequence
(``\\ufffd``), is held back.
"""

from __future__ import annotations

import torch

from modlora.serve.requests import SamplingParams


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from ``logits`` (V,) as ``params`` say (see the module docstring)."""
    logits = logits.float()
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = sorted_p.cumsum(0)
        sorted_p[(cum - sorted_p) >= params.top_p] = 0.0             # keep the smallest prefix with mass >= top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def stop_position(text: str, previous: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string found in ``text`` begins, searching only what ``previous`` (the text before the
    last token) could not have contained; None when there is none."""
    for stop in stops:
        at = text.find(stop, max(0, len(previous) - len(stop)))
        if at >= 0:
            return at
    return None


def sendable_end(text: str, sent: int, stops: tuple[str, ...]) -> int:
    """End of the prefix of ``text`` that may be sent now: all but the text that may still become a stop string
    and a trailing incomplete UTF-8 sequence. ``sent``: the end already sent (the caller sends ``text[sent:end]``
    when ``end > sent``)."""
    hold = max((len(st) - 1 for st in stops), default=0)
    safe = len(text) - hold
    while safe > sent and text[safe - 1] == "\ufffd":
        safe -= 1
    return safe
