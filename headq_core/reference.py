"""The materialized attention of a pass over a quantized layer: every logit at once.

It builds the (b, kv_heads, g·n, T) float32 logits and a dense mask, so its memory grows with
n·T; the model's attention function never calls it (:mod:`headq_core.tiled` computes the same
attention in bounded memory). It stays as the oracle the tiled path is tested against, and for
the diagnostics, which compare the logits themselves on short windows.
"""

from __future__ import annotations

import torch

from headq_core.layer import QuantizedLayer
from headq_core.step import Step, StreamView


def attend_reference(
    layer: QuantizedLayer,
    step: Step,
    q: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of grouped queries q (b, hkv, rows, d) over the pass ``step`` of ``layer``, every
    logit materialized; ends the step. mask: (b or 1, 1, rows or 1, T) bool or None (:func:`row_mask`).

    Returns the output (b, hkv, rows, d) and the scaled logits (b, hkv, rows, tokens) as read,
    before masking; both float32.
    """
    if step.keys.dropped or step.values.dropped:
        raise NotImplementedError(
            "the materialized reference does not read a sliding-window layer that dropped tokens"
        )
    g = q.shape[-2] // step.queries
    keys = step.keys
    # Logits, segment by segment in token order: sinks, blocks (method's own logits), window.
    parts = []
    if keys.sinks is not None:
        parts.append(q @ keys.sinks.float().transpose(-1, -2))
    parts += [keys.method.logits(q, block, step.layer_idx) for block in keys.stored]  # type: ignore[union-attr]
    window = keys.exact_tokens(keys.encoded_end)
    if window is not None:
        parts.append(q @ window.float().transpose(-1, -2))
    logits = torch.cat(parts, dim=-1)
    # Tokens that were in the window when this pass began are exact, unless the query reads
    # them encoded: in serving, those flushed by this pass; when emulating, by the streaming rule.
    first = keys.exact_first
    exact = keys.exact_tokens()
    if exact is not None:
        state = step.read_encoded(keys, first, q.device).repeat(g, 1)
        logits[..., first:] = torch.where(state, logits[..., first:], q @ exact.float().transpose(-1, -2))
    logits = _softcap(logits * scaling, softcap)
    probs = masked_softmax(logits, mask)

    # Values: the statistic of the tokens read exact, then the layer stores what leaves the window.
    first = step.values.exact_first
    state = step.read_encoded(step.values, first, q.device).repeat(g, 1)
    statistic = None
    if step.statistic is not None:
        seen = probs[..., first:] * ~state
        statistic = (seen.square() if step.statistic == "sq_attention" else seen).sum(dim=-2)
    exact = step.values.exact_tokens()
    values = layer.end_step(step, statistic)

    # Readout: encoded-state weight through the storage, exact-state weight on the old window.
    tail = probs[..., first:]
    out = _readout(values, probs, first, tail * state, q.shape[-1], step.layer_idx)
    if exact is not None:
        out = out + (tail * ~state) @ exact.float()
    return out, logits


def _readout(
    values: StreamView, probs: torch.Tensor, first: int, tail: torch.Tensor, head_dim: int, layer_idx: int
) -> torch.Tensor:
    """Readout of the stored values with ``probs``, whose part from ``first`` on is replaced by ``tail``."""

    def weights(start: int, stop: int) -> torch.Tensor:
        if stop <= first:
            return probs[..., start:stop]
        if start >= first:
            return tail[..., start - first : stop - first]
        return torch.cat([probs[..., start:first], tail[..., : stop - first]], dim=-1)

    pos = values.sink_len
    out = torch.zeros((*probs.shape[:-1], head_dim), device=probs.device)
    if values.sinks is not None:
        out = out + weights(0, pos) @ values.sinks.float()
    for block in values.stored:
        out = out + values.method.readout(weights(pos, pos + block.tokens), block, layer_idx)  # type: ignore[union-attr]
        pos += block.tokens
    window = values.exact_tokens(pos)
    if window is not None:
        out = out + weights(pos, values.length) @ window.float()
    return out


def row_mask(
    mask: torch.Tensor | None, g: int, n: int, start: int, total: int, device: torch.device
) -> torch.Tensor | None:
    """(b, 1, n, T) -> (b or 1, 1, g*n, T) matching the folded rows; bool, True = attend.

    None (transformers' causal mask left out) is the causal mask of queries at positions
    ``[start, total)`` over keys ``[0, total)``; None stays None for one query.
    """
    if mask is None:
        if n == 1:
            return None
        mask = (torch.arange(total, device=device) <= torch.arange(start, total, device=device)[:, None])[
            None, None
        ]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # additive masks: 0 attend, min block
    if mask.shape[-2] == 1:
        return mask
    return mask.repeat(1, 1, g, 1)


def _softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if not softcap else softcap * torch.tanh(logits / softcap)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.softmax(logits, dim=-1)
    logits = logits.masked_fill(~mask[..., -logits.shape[-1] :], float("-inf"))
    # rows with nothing to attend to (left padding) give NaN: zeros instead, without asking which
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)
