"""Decode attention on the fused Triton kernel, dispatched by layout.

The ``headq`` attention function asks :func:`fused_decode` first for one query token per
sequence on CUDA. It answers ``None`` (and leaves the layer untouched) whenever the kernel does
not know the layouts or the setting, and the reference path in :mod:`headq_core.attention` runs:
CPU tensors, float32 models, softcapped logits, one-pass decode emulation, value policies that
want attention statistics (A²), mixed-width or codebook records and any third-party record.

Known layouts: keys :class:`~headq_core.layouts.AffinePacked` along tokens (KIVI), the same with
a :class:`~headq_core.layouts.LowRankLogit` side code (HeadQ, per-token steps), or dense; values
:class:`~headq_core.layouts.AffinePacked` along channels (KIVI) or dense. Set ``HEADQ_KERNELS=0``
to run everything on the reference path.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

from headq_core.cache import QuantizedLayer, _Stream
from headq_core.layouts import AffineBlock, DenseBlock, EncodedBlock, LowRankLogit

ENV = "HEADQ_KERNELS"
KNOWN_BITS = (1, 2, 4, 8)


@functools.cache
def _triton() -> Any:
    try:
        return importlib.import_module("headq_kernels.triton_decode")
    except ImportError:  # no Triton on this machine
        return None


def available() -> bool:
    """Whether the fused path may run at all: CUDA, Triton, and not switched off by ``HEADQ_KERNELS=0``."""
    return os.environ.get(ENV, "1") != "0" and torch.cuda.is_available() and _triton() is not None


def fused_decode(
    layer: QuantizedLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor | None:
    """query (b, hq, 1, d) -> attention output (b, hq, 1, d), or None where the kernel does not apply."""
    b, hq, n, d = query.shape
    if (
        n != 1
        or softcap
        or not query.is_cuda
        or query.dtype not in (torch.float16, torch.bfloat16)
        or d & (d - 1)
        or not 16 <= d <= 256
        or layer.cache.emulate_streaming
        or layer.sq_attention is not None
        or layer.cache.value_statistic is not None
        or layer.pending is None
        or not available()
    ):
        return None
    if not layer.k.blocks and not layer.v.blocks:
        return None  # nothing encoded yet: a short exact cache, nothing for the kernel to gain
    kd = _describe(layer.k.blocks, query.dtype, keys=True)
    vd = _describe(layer.v.blocks, query.dtype, keys=False)
    if kd is None or vd is None:
        return None
    kernels = _triton()
    inflight = layer.pending
    reference = inflight.key_window if inflight.key_window is not None else layer.k.sinks
    if reference is None or hq % reference.shape[1]:
        return None
    hkv = reference.shape[1]
    g = hq // hkv
    # From here on the layer changes: this pass's values are flushed before the kernel reads them.
    layer.pending = None
    start = inflight.start
    v_first, v_window = layer.v.sink_len() + layer.v.encoded, layer.v.window
    layer._flush(layer.v)
    sinks = layer.k.sink_len()
    e_k = max(sinks, min(layer.encoded_end(layer.k, layer.length), start))
    e_v = max(sinks, min(layer.encoded_end(layer.v, layer.length), start))
    k_exact = None if inflight.key_window is None else inflight.key_window[..., e_k - inflight.key_first :, :]
    v_exact = None if v_window is None else v_window[..., e_v - v_first :, :]
    keys = _segments(kernels, layer.k, e_k, k_exact, query.dtype)
    values = _segments(kernels, layer.v, e_v, v_exact, query.dtype)
    key_bits, key_group, rank, zbits = kd
    value_bits, value_group, _, _ = vd
    # Tuned on an H100 at Llama-3-8B shapes (docs/kernels.md): 128 tokens per tile up to d = 128.
    block_n = max(128 if d <= 128 else 32, key_group)
    plan = kernels.plan(
        keys,
        values,
        batch_heads=b * hkv,
        key_bits=key_bits,
        key_group=key_group,
        value_bits=value_bits,
        value_group=value_group,
        side_rank=rank,
        side_bits=zbits,
        block_n=block_n,
    )
    q = query.reshape(b, hkv, g, d)
    side_query = None
    if rank:
        first: Any = next(blk for blk in layer.k.blocks if isinstance(blk.layout, LowRankLogit))
        basis = first.basis.decode.float()  # (hkv, d, r)
        side_query = first.sign * torch.einsum("bhgd,hdr->bhgr", q.float(), basis)
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, 0, -1, -layer.length :]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
    out = kernels.attend(q, plan, scale=scaling, mask=mask, side_query=side_query, block_n=block_n)
    return out.reshape(b, hq, 1, d)


def _describe(
    blocks: list[EncodedBlock], dtype: torch.dtype, *, keys: bool
) -> tuple[int, int, int, int] | None:
    """(bits, group, side rank, side bits) shared by every block (0 for dense), or None if unknown."""
    found: set[tuple[int, int, int, int]] = set()
    for block in blocks:
        layout = block.layout
        if isinstance(block, DenseBlock):
            if block.data.dtype != dtype:
                return None
            continue
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
            block = block.base  # type: ignore[attr-defined]
        if not isinstance(block, AffineBlock) or block.axis != ("tokens" if keys else "channels"):
            return None
        group = block.group
        if block.bits not in KNOWN_BITS or group & (group - 1) or group < 32 // block.bits or group > 256:
            return None
        found.add((block.bits, group, rank, zbits))
    if len(found) > 1:
        return None
    return found.pop() if found else (0, 0, 0, 0)


def _segments(
    kernels: Any, stream: _Stream, stop: int, exact: torch.Tensor | None, dtype: torch.dtype
) -> list[Any]:
    """Sinks, the blocks up to absolute position ``stop``, then the exact tokens from ``stop`` on."""
    out: list[Any] = []
    if stream.sinks is not None:
        out.append(kernels.Dense(stream.sinks))
    pos = stream.sink_len()
    for block in stream.blocks:
        covered = min(block.tokens, stop - pos)
        if covered <= 0:
            break
        out.append(_segment(kernels, block, covered))
        pos += block.tokens
    if exact is not None and exact.shape[-2]:
        out.append(kernels.Dense(exact))
    return out


def _segment(kernels: Any, block: Any, covered: int) -> Any:
    if isinstance(block, DenseBlock):
        return kernels.Dense(block.data[..., :covered, :])
    if isinstance(block.layout, LowRankLogit):
        base = block.base
        return kernels.AffineTokens(
            base.codes, base.scale, base.zero, base.tokens, block.codes, block.step, covered=covered
        )
    if block.axis == "tokens":
        return kernels.AffineTokens(block.codes, block.scale, block.zero, block.tokens, covered=covered)
    return kernels.AffineChannels(block.codes, block.scale, block.zero, block.tokens, covered=covered)
