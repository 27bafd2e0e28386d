"""The ``headq`` attention function for transformers models.

It computes attention over ``[sinks | encoded tokens | window]`` of a :class:`QuantizedLayer`, from
the :class:`~headq_core.step.Step` the layer hands it, block by block, so that a key method can
correct its own logits and a value policy can read out its own blocks; it gives the layer back
the (squared) attention its value tokens received, for policies that want it. Decode steps go to
:func:`headq_core.fused.decode` first (SDPA over an exact cache, the fused kernel over the layouts
it knows); everything else, and whatever those decline, runs on the torch reference here. On keys
that do not come from a quantized cache (no cache, or another cache class) it is plain exact
attention.

Register it once with :func:`register_attention` (importing :mod:`headq_core` does), then load a
model with ``attn_implementation="headq"`` or call :func:`use_headq_attention` on it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headq_core import fused
from headq_core.cache import LAYER_ATTR, QuantizedLayer
from headq_core.step import Step, StreamView

ATTN_NAME = "headq"


def headq_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query: (b, q_heads, n, d); key, value: (b, kv_heads, n_kv, d). Returns ((b, n, q_heads, d), None).

    attention_mask: (b, 1, n or 1, T) bool (True = attend) or additive, or None for plain
    causal attention (transformers leaves it out where nothing is padded).
    """
    if dropout and module.training:
        raise NotImplementedError("headq attention is for inference; attention dropout is not supported")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    layer = getattr(key, LAYER_ATTR, None)
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} key/value heads")
    if isinstance(layer, QuantizedLayer):
        step = layer.begin_step()
        if n == 1:
            decoded = fused.decode(step, query, attention_mask, scaling, softcap)
            if decoded is not None:
                out, statistic = decoded
                layer.end_step(step, statistic)
                return out.transpose(1, 2).contiguous(), None
    g = hq // hkv
    # GQA folded into rows: row = head_in_group * n + position.
    q = query.float().reshape(b, hkv, g * n, d)
    if isinstance(layer, QuantizedLayer):
        mask = _row_mask(attention_mask, g, n, step.start, step.length, q.device)
        out, _ = attend_quantized(layer, step, q, mask, scaling, softcap)
    else:
        total = key.shape[-2]
        mask = _row_mask(attention_mask, g, n, total - n, total, q.device)
        logits = _softcap(q @ key.float().transpose(-1, -2) * scaling, softcap)
        probs = _softmax(logits, mask)
        out = probs @ value.float()
    out = out.reshape(b, hkv * g, n, d).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def attend_quantized(
    layer: QuantizedLayer,
    step: Step,
    q: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of grouped queries q (b, hkv, rows, d) over the pass ``step`` of ``layer``, on the
    torch reference; ends the step.

    Returns the output (b, hkv, rows, d) and the scaled logits (b, hkv, rows, tokens) as read,
    before masking; both float32.
    """
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
    probs = _softmax(logits, mask)

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


def _row_mask(
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


def _softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.softmax(logits, dim=-1)
    logits = logits.masked_fill(~mask[..., -logits.shape[-1] :], float("-inf"))
    # rows with nothing to attend to (left padding) give NaN: zeros instead, without asking which
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def register_attention() -> None:
    """Register ``headq`` with transformers' attention and mask interfaces (idempotent).

    The mask is transformers' SDPA mask: left out (None) where nothing is padded and the plain
    causal rule holds, as for PyTorch's SDPA.
    """
    AttentionInterface.register(ATTN_NAME, headq_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def use_headq_attention(model: Any) -> Any:
    """Switch a loaded model to the ``headq`` attention function; returns the model."""
    register_attention()
    model.set_attn_implementation(ATTN_NAME)
    return model
