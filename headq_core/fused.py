"""Decode steps at the GPU's speed: SDPA over an exact cache, the fused kernel over encoded tokens.

The ``headq`` attention function asks :func:`decode` first for one query token per sequence. It
answers from the :class:`~headq_core.step.Step` alone, without touching the layer:

- both streams stored as they are (``fp16``/``fp16`` in the model's dtype, no sinks): PyTorch's
  SDPA over the layer's exact buffers, grouped query heads folded into rows, on any device;
- on CUDA in float16 or bfloat16, where every block describes its kernel segment
  (:meth:`~headq_core.layouts.EncodedBlock.kernel_segment`): the fused Triton kernel, which also
  gives a value policy its attention statistic (the probabilities of the window's tokens).

It answers None, and the torch reference in :mod:`headq_core.attention` runs, for softcapped
logits, one-pass decode emulation, a step whose value flush waits for this pass's statistic
(A² with no window), and blocks the kernel cannot read; the reason is logged once at debug level
(logger ``headq.fused``). Set ``HEADQ_KERNELS=0`` to run everything but the exact path on the
reference.

Host work per layer and step does not grow with the context: a stream is a few segments (sinks,
one arena of encoded tokens, the window), and their split and pointer tables are kept on the
device by :class:`~headq_kernels.decode_plan.Tables`, so a step uploads its splits once for every
layer and a layer's pointers only after one of its buffers moved. Nothing here reads a device
value on the host.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from headq_core.layouts import NoKernelLayout
from headq_core.masks import drop_columns
from headq_core.step import Step, StreamView
from headq_kernels import decode_plan, triton_module

ENV = "HEADQ_KERNELS"
log = logging.getLogger("headq.fused")
TABLES = decode_plan.Tables()
_told: set[str] = set()

Decoded = tuple[torch.Tensor, torch.Tensor | None]  # output (b, hq, 1, d), statistic (b, hkv, T) or None


def _triton() -> Any:
    """The decode kernels' module, or None without Triton."""
    return triton_module("triton_decode")


def available() -> bool:
    """Whether the fused kernel may run at all: CUDA, Triton, and not switched off by ``HEADQ_KERNELS=0``."""
    return os.environ.get(ENV, "1") != "0" and torch.cuda.is_available() and _triton() is not None


def _decline(reason: str) -> None:
    """Log once why a step runs on the reference path."""
    if reason not in _told:
        _told.add(reason)
        log.debug("decode step on the reference path: %s", reason)


def decode(
    step: Step,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> Decoded | None:
    """query (b, hq, 1, d) -> (attention output (b, hq, 1, d), value statistic), or None."""
    if softcap or step.emulate_streaming or query.shape[2] != 1:
        return None
    if step.keys.dropped != step.values.dropped:
        return None
    mask = drop_columns(decode_mask(attention_mask, step.length), step.keys.sink_len, step.keys.dropped)
    if _exact(step, query):
        return _sdpa(step, query, mask, scaling), None
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or not available():
        return None
    return decode_step(step, query, mask, scaling, _triton().attend)


def decode_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """(b, 1, 1, T) mask of one query -> (b, length) bool, True = attend (None: attend to all)."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, 0, -1, -length:]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _exact(step: Step, query: torch.Tensor) -> bool:
    keys, values = step.keys, step.values
    return (
        keys.identity
        and values.identity
        and keys.sinks is None
        and step.statistic is None
        and keys.exact is not None
        and values.exact is not None
        and keys.exact.data.dtype == query.dtype
    )


def _sdpa(step: Step, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """SDPA over the exact buffers, positions [0, length), grouped query heads as SDPA takes them
    (the call transformers makes for a ``DynamicCache``, so the same kernels run)."""
    assert step.keys.exact is not None and step.values.exact is not None
    keys = step.keys.exact.rows(step.keys.stored_from, step.length)  # (b, hkv, stored, d), a view
    values = step.values.exact.rows(step.values.stored_from, step.length)
    attn_mask = None if mask is None else mask[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=attn_mask, scale=scaling, enable_gqa=True
    )


def decode_step(
    step: Step,
    query: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    attend: Callable[..., torch.Tensor],
) -> Decoded | None:
    """One decode step through ``attend`` (the kernel, or ``decode_plan.attend_torch`` on any
    device), with the value policy's statistic; None where the fused path does not apply."""
    b, hq, _, d = query.shape
    if d & (d - 1) or not 16 <= d <= 256:
        return None
    if not step.values_flushed:
        _decline("the value flush waits for this pass's attention statistic (no window)")
        return None
    e_k = min(step.keys.encoded_end, step.start)
    e_v = min(step.values.encoded_end, step.start)
    if e_k <= step.keys.sink_len and e_v <= step.values.sink_len:
        return None  # nothing encoded yet: a short exact cache, nothing for the kernel to gain
    keys = _segments(step.keys, e_k, query, keys=True)
    values = _segments(step.values, e_v, query, keys=False)
    if keys is None or values is None:
        return None
    hkv = _heads(keys[0])
    if hq % hkv:
        return None
    key_group = next((s.group for s in keys if isinstance(s, decode_plan.AffineTokens)), 1)
    chunk = max((s.chunk for s in values if isinstance(s, decode_plan.MixedChannels)), default=0)
    block_n = decode_plan.tile_tokens(d, key_group, chunk)
    try:
        plan = decode_plan.plan(keys, values, batch_heads=b * hkv, block_n=block_n, tables=TABLES)
    except ValueError as err:  # a value segment boundary inside a key group: no split starts there
        _decline(str(err))
        return None
    q = query.reshape(b, hkv, hq // hkv, d)
    tail = step.length - e_v if step.statistic is not None else 0
    probs = q.new_empty((b, hkv, hq // hkv, tail), dtype=torch.float32) if tail else None
    out = attend(q, plan, scale=scaling, mask=mask, side_query=side_query(keys, q), tail_probs=probs)
    statistic = None
    if probs is not None:
        statistic = (probs.square() if step.statistic == "sq_attention" else probs).sum(dim=-2)
    return out.reshape(query.shape), statistic


def side_query(keys: list[Any], q: torch.Tensor) -> torch.Tensor | None:
    """(b, hkv, g, r) float32 ``sign * U^T q`` where a key segment carries HeadQ's side code, else None."""
    side = next((s for s in keys if isinstance(s, decode_plan.AffineTokens) and s.side_rank), None)
    if side is None:
        return None
    assert side.side_basis is not None
    return side.side_sign * torch.einsum("bhgd,hdr->bhgr", q.float(), side.side_basis.float())


def _heads(seg: Any) -> int:
    """KV heads of a segment: its tensors are (b, kv_heads, ...)."""
    return int(decode_plan.first_tensor(seg).shape[1])


def _segments(view: StreamView, stop: int, query: torch.Tensor, *, keys: bool) -> list[Any] | None:
    """Sinks, the encoded tokens up to absolute position ``stop``, then the exact tokens to the end:
    the kernel's segments of one stream, or None (with the reason logged) where it cannot read them."""
    out: list[Any] = []
    if view.sinks is not None:
        out.append(decode_plan.Dense(view.sinks))
    pos = view.stored_from
    try:
        for arena in view.arenas:
            covered = min(arena.tokens, stop - pos)
            if covered <= 0:
                break
            out.append(arena.kernel_segment(covered))
            pos += covered
    except NoKernelLayout as err:
        _decline(str(err))
        return None
    if view.exact is not None and pos < view.length:
        exact = view.exact
        out.append(decode_plan.Dense(exact.data, start=pos - exact.origin, covered=view.length - pos))
    reason = _unreadable(out, query, keys=keys)
    if reason:
        _decline(reason)
        return None
    return out


def _unreadable(segments: list[Any], query: torch.Tensor, *, keys: bool) -> str | None:
    """Why the kernel cannot read these segments of one stream with this query, or None."""
    encoded = [s for s in segments if not isinstance(s, decode_plan.Dense)]
    kinds = {(decode_plan.kind(s), getattr(s, "bits", 0), getattr(s, "group", 0)) for s in encoded}
    if len(kinds) > 1:
        return "the encoded blocks of one stream differ in kind or settings"
    for seg in segments:
        if isinstance(seg, decode_plan.Dense) and seg.data.dtype != query.dtype:
            return f"exact tokens stored in {seg.data.dtype} for a {query.dtype} query"
        if isinstance(seg, decode_plan.Codebook) and any(b.device != query.device for b in seg.books):
            return "codebooks on another device than the query"
        if keys and isinstance(seg, decode_plan.AffineChannels | decode_plan.MixedChannels):
            return "keys grouped along channels"
        if not keys and isinstance(seg, decode_plan.AffineTokens):
            return "values grouped along tokens"
        if isinstance(seg, decode_plan.Codebook) and query.shape[-1] % int(seg.books[0].shape[-1]):
            return "codebook sub-vectors that do not divide the head dimension"
    return None
