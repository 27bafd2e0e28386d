"""The ``headq`` attention function for transformers models.

On keys from a :class:`QuantizedLayer` it computes attention over ``[sinks | encoded tokens |
window]`` from the :class:`~headq_core.step.Step` the layer hands it, so that a key method can
correct its own logits and a value policy can read out its own blocks, and gives the layer back
the (squared) attention its value tokens received, for policies that want it:

- a decode step goes to :func:`headq_core.fused.decode` first (SDPA over an exact cache, the
  fused kernel over the layouts it knows);
- a multi-token pass that owes no statistic is PyTorch's SDPA, in the model's dtype, over the
  tokens as its queries read them: exact, or encoded as the methods give them (:meth:`KeyQuantizer.keys_as_read
  <headq_core.interfaces.KeyQuantizer.keys_as_read>`, ``values_as_read``);
- everything else (emulated streaming, a value policy's statistic, softcapped logits, a method
  whose logits are not dot products) runs on :func:`headq_core.tiled.attend_tiled`, in memory
  bounded by a tile of logits however long the prompt and the cache are.

On keys that do not come from a quantized cache (no cache, or another cache class) it is SDPA.

Register it once with :func:`register_attention` (importing :mod:`headq_core` does), then load a
model with ``attn_implementation="headq"`` or call :func:`use_headq_attention` on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from headq_core import fused
from headq_core.devices import on_device
from headq_core.graphs import StaticLayer
from headq_core.interfaces import KeyQuantizer
from headq_core.layer import LAYER_ATTR, QuantizedLayer
from headq_core.masks import drop_columns
from headq_core.reference import masked_softmax, row_mask
from headq_core.step import Step, StreamView
from headq_core.tiled import attend_tiled

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
    with on_device(query.device):  # a layer on cuda:1 encodes and launches there, whatever the current device
        return _attention(query, key, value, attention_mask, scaling, softcap)


def _attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> tuple[torch.Tensor, None]:
    layer = getattr(key, LAYER_ATTR, None)
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} key/value heads")
    if isinstance(layer, StaticLayer):  # a decode step of the static mode
        return layer.attend(query, scaling).transpose(1, 2).contiguous(), None
    if not isinstance(layer, QuantizedLayer):
        out = _exact(query, key, value, attention_mask, scaling, softcap)
        return out.transpose(1, 2).contiguous(), None
    step = layer.begin_step(attention_mask)
    if n == 1:
        decoded = fused.decode(step, query, attention_mask, scaling, softcap)
        if decoded is not None:
            out, statistic = decoded
            layer.end_step(step, statistic)
            return out.transpose(1, 2).contiguous(), None
    if n > 1 and not softcap and step.statistic is None:  # a decode step the kernel declined stays in float32
        keys = _as_read(step, step.keys, query.dtype)
        values = None if keys is None else _as_read(step, step.values, query.dtype)
        if keys is not None and values is not None:
            layer.end_step(step)
            mask = drop_columns(attention_mask, step.keys.sink_len, step.keys.dropped)
            out = _sdpa(query, keys, values, mask, scaling)
            return out.transpose(1, 2).contiguous(), None
    # GQA folded into rows: row = head_in_group * n + position.
    q = query.float().reshape(b, hkv, hq // hkv * n, d)
    out = attend_tiled(layer, step, q, attention_mask, scaling, softcap)
    out = out.reshape(b, hq, n, d).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _as_read(step: Step, view: StreamView, dtype: torch.dtype) -> torch.Tensor | None:
    """(b, h, length, d) in ``dtype``: a stream's tokens as every query of the pass reads them
    (encoded up to the flush rule's limit, exact after it), or None where some query reads a token
    another way (emulated streaming) or the method gives no such tensor (its logits or readout are
    not dot products with one vector per token)."""
    parts = [] if view.sinks is None else [view.sinks.to(dtype)]
    pos = view.stored_from
    if not view.identity:
        limit = step.shared_limit(view)
        if limit is None:
            return None  # the queries read some tokens in different states
        split = max(view.exact_first, limit)  # tokens before it are read encoded
        method = view.method
        for arena in view.arenas:
            if pos >= split:
                break
            take = min(arena.tokens, split - pos)
            block = arena.slice(0, min(arena.tokens, -(-take // arena.quantum) * arena.quantum))
            if isinstance(method, KeyQuantizer):
                tokens = method.keys_as_read(block, dtype)
            else:
                tokens = method.values_as_read(block, dtype)  # type: ignore[union-attr]
            if tokens is None:
                return None
            parts.append(tokens[..., :take, :])
            pos += take
    if pos < view.length:
        assert view.exact is not None
        parts.append(view.exact.rows(pos, view.length).to(dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def _sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """PyTorch's SDPA in the query's dtype, grouped heads as SDPA takes them; (b, hq, n, d).

    mask as transformers gives it (None: causal, the queries being the last n positions); rows
    with nothing to attend to give zeros."""
    n, total = query.shape[-2], key.shape[-2]
    key, value = key.to(query.dtype), value.to(query.dtype)
    attn_mask: Any = mask
    if mask is not None and mask.dtype != torch.bool:
        attn_mask = mask > torch.finfo(mask.dtype).min / 2
    causal = mask is None and n > 1
    if causal and n != total:  # SDPA's causal flag aligns the corners the other way
        causal = False
        if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
            attn_mask = causal_lower_right(n, total)  # flash attention's own rule, nothing materialized
        else:
            device = query.device
            attn_mask = (
                torch.arange(total, device=device) <= torch.arange(total - n, total, device=device)[:, None]
            )
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, is_causal=causal, scale=scaling, enable_gqa=True
    )
    return out if mask is None else out.nan_to_num(0.0)


def _exact(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Plain attention over keys that no quantized cache holds; (b, hq, n, d)."""
    if not softcap:
        return _sdpa(query, key, value, mask, scaling)
    b, hq, n, d = query.shape
    hkv, total = key.shape[1], key.shape[-2]
    q = query.float().reshape(b, hkv, hq // hkv * n, d)
    logits = q @ key.float().transpose(-1, -2) * scaling
    logits = softcap * torch.tanh(logits / softcap)
    probs = masked_softmax(logits, row_mask(mask, hq // hkv, n, total - n, total, q.device))
    return (probs @ value.float()).reshape(b, hq, n, d).to(query.dtype)


def headq_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' SDPA mask, left out (None) wherever it is the plain causal rule with nothing
    padded, whatever the query and key lengths (transformers leaves it out only where they are
    equal, or for one query): the attention function applies that rule itself, so a chunk of a
    long prompt never builds a (batch, 1, n, T) mask."""
    padding = kwargs.get("attention_mask")
    plain = (
        not args and kwargs.get("mask_function") is causal_mask_function and kwargs.get("local_size") is None
    )
    if plain and (padding is None or bool(padding.all())):
        return None
    return sdpa_mask(*args, **kwargs)  # type: ignore[no-any-return]


def register_attention() -> None:
    """Register ``headq`` with transformers' attention and mask interfaces (idempotent).

    The mask is transformers' SDPA mask, left out where nothing is padded and the plain causal
    rule holds (:func:`headq_mask`).
    """
    AttentionInterface.register(ATTN_NAME, headq_attention)
    AttentionMaskInterface.register(ATTN_NAME, headq_mask)


def use_headq_attention(model: Any) -> Any:
    """Switch a loaded model to the ``headq`` attention function; returns the model."""
    register_attention()
    model.set_attn_implementation(ATTN_NAME)
    return model
