"""Chunked prefill: a long prompt through the model a piece at a time, in bounded memory.

One forward pass over a 128k-token prompt holds the activations of every token of a layer at
once (the MLP's alone are batch x 128k x intermediate size). :func:`prefill` feeds the prompt in
chunks of ``chunk`` tokens: each chunk is stored in the cache and attends to the chunks before it
through the cache, as the rest of the prompt will, so the activations are those of one chunk and
the attention over the stored tokens runs tile by tile (:mod:`headq_core.tiled`).

A chunk reads the chunks before it as the cache stores them: with a quantized cache, tokens that
left the window are read encoded, as by the decode steps that follow, where one pass would have
read the whole prompt exact. With ``emulate_streaming`` every query reads every earlier token as
token-by-token streaming leaves it, which no chunking changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from headq_core.compat import cache_kwargs


@torch.no_grad()
def prefill(
    model: Any,
    input_ids: torch.Tensor,
    cache: Any,
    *,
    chunk: int,
    attention_mask: torch.Tensor | None = None,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Store ``input_ids`` (b, n) in ``cache`` through ``model``, ``chunk`` tokens per forward pass.

    attention_mask: (b, past + n), 1 for tokens and 0 for (left) padding, covering what the cache
    already holds and the prompt, as ``generate`` takes it; position ids follow it as ``generate``
    sets them. on_logits(start, logits): called with each chunk's logits (b, tokens, vocab),
    ``start`` the chunk's offset in the prompt; without it only the last position's logits are
    computed (where the model takes ``logits_to_keep``).

    Returns the logits of the prompt's last position, (b, vocab).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}"
        )
    past = cache.get_seq_length()
    n = input_ids.shape[1]
    positions = None
    if attention_mask is not None:
        if attention_mask.shape != (input_ids.shape[0], past + n):
            raise ValueError(
                f"attention_mask must cover the {past} cached tokens and the {n} of the prompt: "
                f"({input_ids.shape[0]}, {past + n}), got {tuple(attention_mask.shape)}"
            )
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    keep = {"logits_to_keep": 1} if on_logits is None and _takes(model, "logits_to_keep") else {}
    last = None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            assert positions is not None
            kwargs["attention_mask"] = attention_mask[:, : past + stop]
            kwargs["position_ids"] = positions[:, past + start : past + stop]
        logits = model(
            input_ids[:, start:stop], **cache_kwargs(model, cache), use_cache=True, **kwargs, **keep
        ).logits
        if on_logits is not None:
            on_logits(start, logits)
        last = logits[:, -1]
    assert last is not None
    return last


def _takes(model: Any, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters
