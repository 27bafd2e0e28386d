"""Decode attention on the fused Triton kernel, dispatched by layout.

The ``headq`` attention function asks :func:`fused_decode` first for one query token per
sequence on CUDA. It answers ``None`` (and leaves the layer untouched) whenever the kernel does
not know the layouts or the setting, and the reference path in :mod:`headq_core.attention` runs:
CPU tensors, float32 models, softcapped logits, one-pass decode emulation, and any record whose
layout it does not know (third-party records among them).

Known layouts: keys :class:`~headq_core.layouts.AffinePacked` along tokens (KIVI), the same with
a :class:`~headq_core.layouts.LowRankLogit` side code (HeadQ, per-token steps),
:class:`~headq_core.layouts.Codebook` (GSRQ) or dense; values
:class:`~headq_core.layouts.AffinePacked` along channels (KIVI),
:class:`~headq_core.layouts.MixedAffine` with one allocation row per KV head (A²),
:class:`~headq_core.layouts.Codebook` or dense. A value policy that wants attention statistics
gets them from the kernel (the probabilities of the window's tokens), except on a step that
encodes a token of its own pass, which runs on the reference path. Set ``HEADQ_KERNELS=0`` to run
everything on the reference path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
import torch

from headq_core.cache import MAX_BLOCK_TOKENS, QuantizedLayer, _Stream
from headq_core.layouts import AffineBlock, Codebook, DenseBlock, EncodedBlock, LowRankLogit, MixedAffine
from headq_kernels import decode_plan, triton_module

ENV = "HEADQ_KERNELS"
KNOWN_BITS = (1, 2, 4, 8)


def _triton() -> Any:
    """The decode kernels' module, or None without Triton."""
    return triton_module("triton_decode")


def available() -> bool:
    """Whether the fused path may run at all: CUDA, Triton, and not switched off by ``HEADQ_KERNELS=0``."""
    return os.environ.get(ENV, "1") != "0" and torch.cuda.is_available() and _triton() is not None


@attrs.frozen
class Prepared:
    """One decode step of one layer, ready for the kernel: (b, hkv, g, d) queries and the plan."""

    q: torch.Tensor
    plan: Any
    scale: float
    mask: torch.Tensor | None
    side_query: torch.Tensor | None
    fused: bool = True  # False: the plan has a split the kernel cannot start; run it in torch
    tail: int = 0  # the window's last tokens whose attention the value policy's statistic wants


def fused_decode(
    layer: QuantizedLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor | None:
    """query (b, hq, 1, d) -> attention output (b, hq, 1, d), or None where the kernel does not apply."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or not available():
        return None
    return decode_step(layer, query, attention_mask, scaling, softcap, _triton().attend)


def decode_step(
    layer: QuantizedLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    attend: Callable[..., torch.Tensor],
) -> torch.Tensor | None:
    """One decode step of ``layer`` through ``attend`` (the kernel, or ``decode_plan.attend_torch``
    anywhere), statistics for the value policy included; None where the fused path does not apply."""
    step = prepare(layer, query, attention_mask, scaling, softcap)
    if step is None:
        return None
    b, hkv, g, _ = step.q.shape
    probs = step.q.new_empty((b, hkv, g, step.tail), dtype=torch.float32) if step.tail else None
    out = (attend if step.fused else decode_plan.attend_torch)(
        step.q, step.plan, scale=step.scale, mask=step.mask, side_query=step.side_query, tail_probs=probs
    )
    if probs is not None:
        assert layer.sq_attention is not None and layer.sq_attention.shape[-1] == step.tail
        seen = probs.square() if layer.cache.value_statistic == "sq_attention" else probs
        layer.sq_attention = layer.sq_attention + seen.sum(dim=-2)
    return out.reshape(query.shape)


def prepare(
    layer: QuantizedLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> Prepared | None:
    """The kernel's inputs for this decode step, or None (the layer untouched) where it does not apply.

    Any device and dtype: the GPU path checks those itself. When it answers, the step is taken:
    the layer's pending pass is consumed and this pass's values are flushed, as the reference
    path does after gathering attention statistics. Statistics for this step are then wanted for
    the ``tail`` tokens left in the value window, which are exactly the ones that receive them on
    the reference path, since a step whose flush would encode a token of its own pass (which must
    see its own statistic first) is left to the reference path.
    """
    b, hq, n, d = query.shape
    if (
        n != 1
        or softcap
        or d & (d - 1)
        or not 16 <= d <= 256
        or layer.cache.emulate_streaming
        or layer.pending is None
    ):
        return None
    if not layer.k.blocks and not layer.v.blocks:
        return None  # nothing encoded yet: a short exact cache, nothing for the kernel to gain
    stats = layer.cache.value_statistic is not None
    if stats and (
        layer.sq_attention is None or layer.encoded_end(layer.v, layer.length) > layer.pending.start
    ):
        return None
    kd = _describe(layer.k.blocks, query, keys=True)
    vd = _describe(layer.v.blocks, query, keys=False)
    if kd is None or vd is None:
        return None
    inflight = layer.pending
    reference = inflight.key_window if inflight.key_window is not None else layer.k.sinks
    if reference is None or hq % reference.shape[1]:
        return None
    hkv = reference.shape[1]
    g = hq // hkv
    start = inflight.start
    sinks = layer.k.sink_len()
    e_k = max(sinks, min(layer.encoded_end(layer.k, layer.length), start))
    e_v = max(sinks, min(layer.encoded_end(layer.v, layer.length), start))
    k_exact = None if inflight.key_window is None else inflight.key_window[..., e_k - inflight.key_first :, :]
    keys = _segments(layer.k, e_k, k_exact)
    settings = plan_settings(kd, vd, d, batch_heads=b * hkv)
    v_first, v_window = layer.v.sink_len() + layer.v.encoded, layer.v.window
    if settings["key_bits"] and not _on_key_groups(keys, settings["key_group"], _cuts(layer, e_v)):
        return None  # a value block boundary inside a key group: no split could start there
    # From here on the layer changes: this pass's values are flushed before the kernel reads them.
    layer.pending = None
    layer._flush(layer.v)
    v_exact = None if v_window is None else v_window[..., e_v - v_first :, :]
    values = _segments(layer.v, e_v, v_exact)
    fused = True
    try:
        plan = decode_plan.plan(keys, values, **settings)
    except ValueError:  # not foreseen by _cuts; the step is already taken, so finish it in torch
        plan, fused = decode_plan.plan(keys, values, strict=False, **settings), False
    q = query.reshape(b, hkv, g, d)
    side_query = None
    if settings["side_rank"]:
        first: Any = next(blk for blk in layer.k.blocks if isinstance(blk.layout, LowRankLogit))
        basis = first.basis.decode.float()  # (hkv, d, r)
        side_query = first.sign * torch.einsum("bhgd,hdr->bhgr", q.float(), basis)
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, 0, -1, -layer.length :]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
    tail = layer.length - e_v if stats else 0
    return Prepared(q, plan, scaling, mask, side_query, fused, tail)


def plan_settings(
    kd: tuple[Any, ...], vd: tuple[Any, ...], head_dim: int, *, batch_heads: int
) -> dict[str, Any]:
    """Keyword arguments of ``decode_plan.plan`` for streams described by :func:`_describe`."""
    key_bits, key_group, rank, zbits = kd[1:] if kd[0] == "affine" else (0, 0, 0, 0)
    value_bits, value_group = vd[1:3] if vd[0] == "affine" else (0, 0)
    # Tuned on an H100 at Llama-3-8B shapes (docs/kernels.md): 128 tokens per tile up to d = 128;
    # a tile holds whole key groups and whole allocation rows of mixed-width values.
    block_n = max(128 if head_dim <= 128 else 32, key_group, vd[3] if vd[0] == "mixed" else 0)
    return dict(
        batch_heads=batch_heads,
        key_bits=key_bits,
        key_group=key_group,
        value_bits=value_bits,
        value_group=value_group,
        side_rank=rank,
        side_bits=zbits,
        block_n=block_n,
    )


def _describe(blocks: list[EncodedBlock], query: torch.Tensor, *, keys: bool) -> tuple[Any, ...] | None:
    """The kind and settings shared by every encoded block of a stream (``("dense",)`` with none),
    or None where the kernel does not know a block or the blocks differ. ``query`` (..., d): the
    dtype, device and head_dim the blocks must fit."""
    found: set[tuple[Any, ...]] = set()
    for block in blocks:
        if isinstance(block, DenseBlock):
            if block.data.dtype != query.dtype:
                return None
            continue
        signature = _signature(block, keys=keys, query=query)
        if signature is None:
            return None
        found.add(signature)
    if len(found) > 1:
        return None
    return found.pop() if found else ("dense",)


def _affine_ok(bits: int, group: int) -> bool:
    return bits in KNOWN_BITS and not group & (group - 1) and 32 // bits <= group <= 256


def _signature(block: Any, *, keys: bool, query: torch.Tensor) -> tuple[Any, ...] | None:
    layout = block.layout
    head_dim = query.shape[-1]
    if isinstance(layout, Codebook):
        # one or two stages of at most 256 codewords, float16 codebooks, powers of two throughout
        books = block.books
        widths = books.widths
        dim = books.dim
        if (
            len(widths) > 2
            or max(widths) > 8
            or any(book.dtype != torch.float16 or book.device != query.device for book in books.stages)
            or (books.scale is not None and books.scale.device != query.device)
            or dim & (dim - 1)
            or head_dim % dim
        ):
            return None
        return ("codebook", id(books))
    if isinstance(layout, MixedAffine):
        # values, one allocation row per KV head, whole 32-bit words per token at every width
        kv_heads = block.scale.shape[1]
        if (
            keys
            or block.codes.shape[1] != kv_heads
            or not all(_affine_ok(w, layout.group) and head_dim * w % 32 == 0 for w in layout.widths)
            or block.chunk & (block.chunk - 1)
            or block.chunk > 128
            or len(layout.widths) > 4
        ):
            return None
        return ("mixed", layout.widths, layout.group, block.chunk, block.row_words, block.index_bits)
    rank = zbits = 0
    if keys and isinstance(layout, LowRankLogit):
        if (
            getattr(block, "scale", None) != "token"
            or getattr(block, "lead_codes", True) is not None
            or layout.bits not in KNOWN_BITS
            or layout.rank > 64
        ):
            return None
        rank, zbits = layout.rank, layout.bits
        block = block.base
    if not isinstance(block, AffineBlock) or block.axis != ("tokens" if keys else "channels"):
        return None
    if not _affine_ok(block.bits, block.group):
        return None
    return ("affine", block.bits, block.group, rank, zbits)


def _cuts(layer: QuantizedLayer, stop: int) -> list[int]:
    """Where the value segments will start and end once this pass's values are flushed."""
    stream = layer.v
    ends, pos = [], stream.sink_len()
    for block in stream.blocks:
        pos += block.tokens
        ends.append(pos)
    count = layer.encoded_end(stream, layer.length) - pos
    if count > 0:  # the flushed tokens merge into the last block, or start one of their own
        if stream.blocks and stream.blocks[-1].tokens + count <= MAX_BLOCK_TOKENS:
            ends[-1] += count
        else:
            ends.append(pos + count)
    return [stream.sink_len(), *(min(end, stop) for end in ends), stop]


def _on_key_groups(keys: list[decode_plan.Segment], group: int, cuts: list[int]) -> bool:
    """Whether every cut inside an encoded key segment falls on one of its key groups."""
    pos = 0
    for seg in keys:
        n = seg.tokens if isinstance(seg, decode_plan.Dense) or seg.covered is None else seg.covered
        if isinstance(seg, decode_plan.AffineTokens) and any(
            pos < c < pos + n and (c - pos) % group for c in cuts
        ):
            return False
        pos += n
    return True


def _segments(stream: _Stream, stop: int, exact: torch.Tensor | None) -> list[decode_plan.Segment]:
    """Sinks, the blocks up to absolute position ``stop``, then the exact tokens from ``stop`` on."""
    out: list[Any] = []
    if stream.sinks is not None:
        out.append(decode_plan.Dense(stream.sinks))
    pos = stream.sink_len()
    for block in stream.blocks:
        covered = min(block.tokens, stop - pos)
        if covered <= 0:
            break
        out.append(_segment(block, covered))
        pos += block.tokens
    if exact is not None and exact.shape[-2]:
        out.append(decode_plan.Dense(exact))
    return out


def _segment(block: Any, covered: int) -> decode_plan.Segment:
    if isinstance(block, DenseBlock):
        return decode_plan.Dense(block.data[..., :covered, :])
    if isinstance(block.layout, Codebook):
        books = block.books
        return decode_plan.Codebook(
            block.indices, tuple(books.stages), books.scale, block.tokens, block.dequantize, covered=covered
        )
    if isinstance(block.layout, MixedAffine):
        return decode_plan.MixedChannels(
            block.codes, block.width_index, block.scale, block.zero, block.tokens, block.widths, block.group,
            block.chunk, block.row_words, block.index_bits, block.dequantize, covered=covered,
        )  # fmt: skip
    if isinstance(block.layout, LowRankLogit):
        base = block.base
        return decode_plan.AffineTokens(
            base.codes, base.scale, base.zero, base.tokens, block.codes, block.step, covered=covered
        )
    if block.axis == "tokens":
        return decode_plan.AffineTokens(block.codes, block.scale, block.zero, block.tokens, covered=covered)
    return decode_plan.AffineChannels(block.codes, block.scale, block.zero, block.tokens, covered=covered)
