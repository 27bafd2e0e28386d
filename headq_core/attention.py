"""The ``headq`` attention function for transformers models.

It computes attention over ``[sinks | encoded blocks | window]`` of a :class:`QuantizedLayer`,
block by block, so that a key method can correct its own logits and a value policy can read out
its own blocks; it feeds (squared) attention to policies that want it, then lets the layer encode
the values that leave the window. On keys that do not come from a quantized cache (no cache, or
another cache class) it is plain exact attention.

Register it once with :func:`register_attention` (importing :mod:`headq_core` does), then load a
model with ``attn_implementation="headq"`` or call :func:`use_headq_attention` on it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headq_core.cache import LAYER_ATTR, QuantizedLayer
from headq_core.fused import fused_decode

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
    """query: (b, q_heads, n, d); key, value: (b, kv_heads, n_kv, d). Returns ((b, n, q_heads, d), None)."""
    if dropout and module.training:
        raise NotImplementedError("headq attention is for inference; attention dropout is not supported")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    layer = getattr(key, LAYER_ATTR, None)
    b, hq, n, d = query.shape
    if isinstance(layer, QuantizedLayer) and n == 1:  # the fused kernel, where it applies
        fused = fused_decode(layer, query, attention_mask, scaling, softcap)
        if fused is not None:
            return fused.transpose(1, 2).contiguous(), None
    hkv = key.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} key/value heads")
    g = hq // hkv
    # GQA folded into rows: row = head_in_group * n + position.
    q = query.float().reshape(b, hkv, g * n, d)
    mask = _row_mask(attention_mask, g, n)
    if isinstance(layer, QuantizedLayer):
        out, _ = attend_quantized(layer, q, mask, scaling, softcap, n)
    else:
        logits = _softcap(q @ key.float().transpose(-1, -2) * scaling, softcap)
        probs = _softmax(logits, mask)
        out = probs @ value.float()
    out = out.reshape(b, hkv * g, n, d).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def attend_quantized(
    layer: QuantizedLayer,
    q: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of grouped queries q (b, hkv, rows, d) over everything ``layer`` holds.

    Returns the output (b, hkv, rows, d) and the scaled logits (b, hkv, rows, tokens) as read,
    before masking; both float32.
    """
    inflight = layer.pending
    if inflight is None:
        raise RuntimeError(f"layer {layer.layer_idx}: attention called without a pending update")
    layer.pending = None
    rows = q.shape[-2]
    g = rows // n
    positions = torch.arange(layer.length, device=q.device)
    new = positions[inflight.start :]
    queries = new  # the query of in-flight row j sits at position start + j

    # Logits, segment by segment in token order: sinks, blocks (method's own logits), window.
    parts = []
    if layer.k.sinks is not None:
        parts.append(q @ layer.k.sinks.float().transpose(-1, -2))
    parts += [layer.k.method.logits(q, block, layer.layer_idx) for block in layer.k.blocks]  # type: ignore[union-attr]
    if layer.k.window is not None and layer.k.window.shape[-2]:
        parts.append(q @ layer.k.window.float().transpose(-1, -2))
    logits = torch.cat(parts, dim=-1)
    # Tokens that were in the window when this pass began are exact, unless the query reads
    # them encoded: in serving, those flushed by this pass; when emulating, by the streaming rule.
    first = inflight.key_first
    if inflight.key_window is not None and first < layer.length:
        state = layer.quantized_state(layer.k, queries, positions[first:], inflight.start).repeat(g, 1)
        exact = q @ inflight.key_window.float().transpose(-1, -2)
        logits[..., first:] = torch.where(state, logits[..., first:], exact)
    logits = _softcap(logits * scaling, softcap)
    probs = _softmax(logits, mask)

    # Values: the window as it stands before this pass's flush, and who reads it encoded.
    first = layer.v.sink_len() + layer.v.encoded
    window = layer.v.window
    state = layer.quantized_state(layer.v, queries, positions[first:], inflight.start).repeat(g, 1)
    if layer.sq_attention is not None:
        seen = probs[..., first:] * ~state
        if layer.cache.value_statistic == "sq_attention":
            seen = seen.square()
        layer.sq_attention = layer.sq_attention + seen.sum(dim=-2)
    layer._flush(layer.v)

    # Readout: encoded-state weight through the storage, exact-state weight on the old window.
    tail = probs[..., first:]
    out = _readout(layer, probs, first, tail * state, q.shape[-1])
    if window is not None and first < layer.length:
        out = out + (tail * ~state) @ window.float()
    return out, logits


def _readout(
    layer: QuantizedLayer, probs: torch.Tensor, first: int, tail: torch.Tensor, head_dim: int
) -> torch.Tensor:
    """Readout of the stored values with ``probs``, whose part from ``first`` on is replaced by ``tail``."""

    def weights(start: int, stop: int) -> torch.Tensor:
        if stop <= first:
            return probs[..., start:stop]
        if start >= first:
            return tail[..., start - first : stop - first]
        return torch.cat([probs[..., start:first], tail[..., : stop - first]], dim=-1)

    pos = 0
    out = torch.zeros((*probs.shape[:-1], head_dim), device=probs.device)
    if layer.v.sinks is not None:
        pos = layer.v.sinks.shape[-2]
        out = out + weights(0, pos) @ layer.v.sinks.float()
    for block in layer.v.blocks:
        out = out + layer.v.method.readout(weights(pos, pos + block.tokens), block, layer.layer_idx)  # type: ignore[union-attr]
        pos += block.tokens
    if layer.v.window is not None and layer.v.window.shape[-2]:
        out = out + weights(pos, layer.length) @ layer.v.window.float()
    return out


def _row_mask(mask: torch.Tensor | None, g: int, n: int) -> torch.Tensor | None:
    """(b, 1, n, T) -> (b, 1, g*n, T) matching the folded rows; bool, True = attend."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # additive masks: 0 attend, min block
    if mask.shape[-2] == 1:
        return mask
    return mask.repeat(1, 1, g, 1)


def _softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if not softcap else softcap * torch.tanh(logits / softcap)


def _softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        logits = logits.masked_fill(~mask[..., -logits.shape[-1] :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if mask is not None and not bool(mask.any(dim=-1).all()):
        probs = probs.nan_to_num_(0.0)  # rows with nothing to attend to (left padding): zeros, not NaN
    return probs


def _headq_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Register ``headq`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_NAME, headq_attention)
    AttentionMaskInterface.register(ATTN_NAME, _headq_mask)


def use_headq_attention(model: Any) -> Any:
    """Switch a loaded model to the ``headq`` attention function; returns the model."""
    register_attention()
    model.set_attn_implementation(ATTN_NAME)
    return model
