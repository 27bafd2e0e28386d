"""Triton decode attention over a quantized KV cache: one query token per sequence.

Flash-decoding: the token axis is cut into splits; one program attends the query heads of one
KV head (GQA folded into the rows of one ``tl.dot``) to one split, with an online softmax, and a
second kernel merges the splits. Each split lies inside one key segment and one value segment, so
the program reads each segment where the cache keeps it, in its own layout:

- key segments: affine codes grouped along tokens (KIVI keys; :class:`AffineTokens`), optionally
  with HeadQ's low-rank side code (``(U^T q) . z_hat`` added to the logits), or dense tokens;
- value segments: affine codes grouped along channels (KIVI values; :class:`AffineChannels`),
  or dense tokens.

Segments are described by a small int64 table of device pointers and strides (no copy of the
cache); :func:`plan` builds it, :func:`attend` runs a plan. The torch reference for the same
computation is the cache's attention path (``headq_core.attention.attend_quantized``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

# Columns of the segment table (int64).
KIND, TOKENS, PTR0, PTR1, PTR2, STRIDE_B, STRIDE_H, STRIDE_T, SIDE_CODES, SIDE_STEP = range(10)
COLUMNS = 10
AFFINE, DENSE = 0, 1
LOG2E = 1.4426950408889634
last_compiled: Any = None  # the split kernel as last launched: registers, spills and assembly for reports


@dataclass
class Dense:
    """Exact tokens (b, h, t, d), any strides with a unit channel stride."""

    data: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.data.shape[-2]


@dataclass
class AffineTokens:
    """Keys grouped along tokens: codes (b, h, d, t*bits/32), scale/zero (b, h, d, t/group), contiguous.

    ``side_codes`` (b, h, r, t*zbits/32) and ``side_step`` (b, h, t): HeadQ's mid-rise side code.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    tokens: int
    side_codes: torch.Tensor | None = None
    side_step: torch.Tensor | None = None
    covered: int | None = None  # attend only the first ``covered`` tokens


@dataclass
class AffineChannels:
    """Values grouped along channels: codes (b, h, t, d*bits/32), scale/zero (b, h, t, d/group), contiguous."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    tokens: int
    covered: int | None = None  # attend only the first ``covered`` tokens


Segment = Dense | AffineTokens | AffineChannels


@dataclass
class Plan:
    """Device tables for one decode step, and the tensors they point into (kept alive)."""

    segments: torch.Tensor  # (n_segments, COLUMNS) int64
    splits: torch.Tensor  # (n_splits, 6) int32: k_seg, k_off, v_seg, v_off, length, position
    n_splits: int
    length: int
    key_bits: int
    key_group: int
    value_bits: int
    value_group: int
    side_rank: int
    side_bits: int
    keep: list[torch.Tensor] = field(default_factory=list)


@triton.jit
def _unpack_rows(words, BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, OUT: tl.constexpr):
    """(ROWS, COLS // per_word) int32 words -> (ROWS, COLS) codes in OUT, first code lowest."""
    per_word: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, per_word) * BITS
    lanes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(lanes.to(OUT), (ROWS, COLS))


@triton.jit
def _spread(x, ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """(ROWS, GROUPS) -> (ROWS, GROUPS * GROUP), each column repeated GROUP times."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], (ROWS, GROUPS, GROUP)), (ROWS, GROUPS * GROUP))


@triton.jit
def _dense_tile_t(row, bh_b, bh_h, off, n, c, live, DT: tl.constexpr):
    """A dense segment's tokens off+n as a (D, BLOCK_N) tile."""
    base = tl.load(row + PTR0_C).to(tl.pointer_type(DT))
    sb = tl.load(row + STRIDE_B_C)
    sh = tl.load(row + STRIDE_H_C)
    st = tl.load(row + STRIDE_T_C)
    ptr = base + bh_b * sb + bh_h * sh + (off + n)[None, :].to(tl.int64) * st + c[:, None]
    return tl.load(ptr, mask=live[None, :], other=0.0)


@triton.jit
def _dense_tile(row, bh_b, bh_h, off, n, c, live, DT: tl.constexpr):
    """A dense segment's tokens off+n as a (BLOCK_N, D) tile."""
    base = tl.load(row + PTR0_C).to(tl.pointer_type(DT))
    sb = tl.load(row + STRIDE_B_C)
    sh = tl.load(row + STRIDE_H_C)
    st = tl.load(row + STRIDE_T_C)
    ptr = base + bh_b * sb + bh_h * sh + (off + n)[:, None].to(tl.int64) * st + c[None, :]
    return tl.load(ptr, mask=live[:, None], other=0.0)


PTR0_C: tl.constexpr = tl.constexpr(PTR0)
PTR1_C: tl.constexpr = tl.constexpr(PTR1)
PTR2_C: tl.constexpr = tl.constexpr(PTR2)
STRIDE_B_C: tl.constexpr = tl.constexpr(STRIDE_B)
STRIDE_H_C: tl.constexpr = tl.constexpr(STRIDE_H)
STRIDE_T_C: tl.constexpr = tl.constexpr(STRIDE_T)
TOKENS_C: tl.constexpr = tl.constexpr(TOKENS)
SIDE_CODES_C: tl.constexpr = tl.constexpr(SIDE_CODES)
SIDE_STEP_C: tl.constexpr = tl.constexpr(SIDE_STEP)
COLUMNS_C: tl.constexpr = tl.constexpr(COLUMNS)


@triton.jit
def _affine_keys_t(
    row,
    bh,
    off,
    c,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GATHER: tl.constexpr,
    MATH: tl.constexpr,
):
    """Affine keys grouped along tokens: tokens off..off+BLOCK_N as a (D, BLOCK_N) float32 tile.

    GATHER: every element loads its own word and scale (repeats hit L1) and shifts in place, with
    no reshape; otherwise each word is loaded once and its lanes spread by a reshape.
    """
    tokens = tl.load(row + TOKENS_C)
    n_words = tokens * BITS // 32
    n_groups = tokens // GROUP
    per_word: tl.constexpr = 32 // BITS
    words: tl.constexpr = BLOCK_N // per_word
    groups: tl.constexpr = BLOCK_N // GROUP
    codes = tl.load(row + PTR0_C).to(tl.pointer_type(tl.int32)) + bh * D * n_words
    scale = tl.load(row + PTR1_C).to(tl.pointer_type(tl.float16)) + bh * D * n_groups
    zero = tl.load(row + PTR2_C).to(tl.pointer_type(tl.float16)) + bh * D * n_groups
    if GATHER:
        t = off + tl.arange(0, BLOCK_N)
        inside = (t < tokens)[None, :]
        packed = tl.load(codes + c[:, None] * n_words + (t // per_word)[None, :], mask=inside, other=0)
        q = ((packed >> ((t % per_word) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        gi = c[:, None] * n_groups + (t // GROUP)[None, :]
        s = tl.load(scale + gi, mask=inside, other=0.0).to(tl.float32)
        z = tl.load(zero + gi, mask=inside, other=0.0).to(tl.float32)
        return q * s + z
    else:
        w = off // per_word + tl.arange(0, words)
        packed = tl.load(codes + c[:, None] * n_words + w[None, :], mask=w[None, :] < n_words, other=0)
        g = off // GROUP + tl.arange(0, groups)
        gmask = g[None, :] < n_groups
        s = tl.load(scale + c[:, None] * n_groups + g[None, :], mask=gmask, other=0.0).to(MATH)
        z = tl.load(zero + c[:, None] * n_groups + g[None, :], mask=gmask, other=0.0).to(MATH)
        q = _unpack_rows(packed, BITS, D, BLOCK_N, MATH)
        return q * _spread(s, D, groups, GROUP) + _spread(z, D, groups, GROUP)


@triton.jit
def _affine_values(
    row,
    bh,
    off,
    n,
    c,
    live,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GATHER: tl.constexpr,
    MATH: tl.constexpr,
):
    """Affine values grouped along channels: tokens off+n as a (BLOCK_N, D) float32 tile."""
    tokens = tl.load(row + TOKENS_C)
    per_word: tl.constexpr = 32 // BITS
    words: tl.constexpr = D // per_word
    groups: tl.constexpr = D // GROUP
    codes = tl.load(row + PTR0_C).to(tl.pointer_type(tl.int32)) + bh * tokens * words
    scale = tl.load(row + PTR1_C).to(tl.pointer_type(tl.float16)) + bh * tokens * groups
    zero = tl.load(row + PTR2_C).to(tl.pointer_type(tl.float16)) + bh * tokens * groups
    t = (off + n)[:, None].to(tl.int64)
    if GATHER:
        packed = tl.load(codes + t * words + (c // per_word)[None, :], mask=live[:, None], other=0)
        q = ((packed >> ((c % per_word) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        gi = t * groups + (c // GROUP)[None, :]
        s = tl.load(scale + gi, mask=live[:, None], other=0.0).to(tl.float32)
        z = tl.load(zero + gi, mask=live[:, None], other=0.0).to(tl.float32)
        return q * s + z
    else:
        packed = tl.load(codes + t * words + tl.arange(0, words)[None, :], mask=live[:, None], other=0)
        gi = tl.arange(0, groups)[None, :]
        s = tl.load(scale + t * groups + gi, mask=live[:, None], other=0.0).to(MATH)
        z = tl.load(zero + t * groups + gi, mask=live[:, None], other=0.0).to(MATH)
        q = _unpack_rows(packed, BITS, BLOCK_N, D, MATH)
        return q * _spread(s, BLOCK_N, groups, GROUP) + _spread(z, BLOCK_N, groups, GROUP)


@triton.jit
def _side_term(
    row,
    bh,
    off,
    qr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
    GATHER: tl.constexpr,
):
    """HeadQ: (G_PAD, BLOCK_N) logits ``(U^T q) . z_hat`` of tokens off..off+BLOCK_N."""
    tokens = tl.load(row + TOKENS_C)
    n_words = tokens * BITS // 32
    per_word: tl.constexpr = 32 // BITS
    words: tl.constexpr = BLOCK_N // per_word
    codes = tl.load(row + SIDE_CODES_C).to(tl.pointer_type(tl.int32)) + bh * R * n_words
    step = tl.load(row + SIDE_STEP_C).to(tl.pointer_type(tl.float16)) + bh * tokens
    r = tl.arange(0, R_PAD)
    t = off + tl.arange(0, BLOCK_N)
    st = tl.load(step + t, mask=t < tokens, other=0.0).to(tl.float32)
    levels: tl.constexpr = (1 << BITS) - 1
    if GATHER:
        inside = (r[:, None] < R) & (t < tokens)[None, :]
        packed = tl.load(codes + r[:, None] * n_words + (t // per_word)[None, :], mask=inside, other=0)
        lanes = ((packed >> ((t % per_word) * BITS)[None, :]) & levels).to(tl.float32)
        z = (lanes - levels / 2) * st[None, :]
    else:
        w = off // per_word + tl.arange(0, words)
        inside = (r[:, None] < R) & (w[None, :] < n_words)
        packed = tl.load(codes + r[:, None] * n_words + w[None, :], mask=inside, other=0)
        z = (_unpack_rows(packed, BITS, R_PAD, BLOCK_N, tl.float32) - levels / 2) * st[None, :]
    z = tl.where(r[:, None] < R, z, 0.0)
    return tl.dot(qr, z)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    qr_ptr,
    seg_ptr,
    split_ptr,
    mask_ptr,
    o_ptr,
    ml_ptr,
    HKV,
    n_splits,
    mask_stride,
    qk_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GROUP: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    Z_BITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DT: tl.constexpr,
    GATHER: tl.constexpr,
    MATH: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    bh64 = bh.to(tl.int64)
    srow = split_ptr + split * 6
    k_seg = tl.load(srow)
    k_off = tl.load(srow + 1)
    v_seg = tl.load(srow + 2)
    v_off = tl.load(srow + 3)
    length = tl.load(srow + 4)
    position = tl.load(srow + 5)
    krow = seg_ptr + k_seg * COLUMNS_C
    vrow = seg_ptr + v_seg * COLUMNS_C
    k_kind = tl.load(krow)
    v_kind = tl.load(vrow)

    g = tl.arange(0, G_PAD)
    c = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + (bh64 * G + g[:, None]) * D + c[None, :], mask=g[:, None] < G, other=0.0)
    if R > 0:
        rr = tl.arange(0, R_PAD)
        qr = tl.load(
            qr_ptr + (bh64 * G + g[:, None]) * R + rr[None, :],
            mask=(g[:, None] < G) & (rr[None, :] < R),
            other=0.0,
        )

    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    for t in range(0, length, BLOCK_N):
        live = t + n < length
        if K_BITS == 0:
            kt = _dense_tile_t(krow, b, h, k_off + t, n, c, live, DT)
            s = tl.dot(q, kt)
        else:
            if k_kind == 0:
                kt = _affine_keys_t(krow, bh64, k_off + t, c, D, BLOCK_N, K_BITS, K_GROUP, GATHER, MATH).to(
                    DT
                )
                s = tl.dot(q, kt)
                if R > 0:
                    s += _side_term(krow, bh64, k_off + t, qr, R, R_PAD, BLOCK_N, Z_BITS, GATHER)
            else:
                kt = _dense_tile_t(krow, b, h, k_off + t, n, c, live, DT)
                s = tl.dot(q, kt)
        keep = live
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * mask_stride + position + t + n, mask=live, other=0) != 0)
        s = tl.where(keep[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_BITS == 0:
            v = _dense_tile(vrow, b, h, v_off + t, n, c, live, DT)
        else:
            if v_kind == 0:
                v = _affine_values(
                    vrow, bh64, v_off + t, n, c, live, D, BLOCK_N, V_BITS, V_GROUP, GATHER, MATH
                ).to(DT)
            else:
                v = _dense_tile(vrow, b, h, v_off + t, n, c, live, DT)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
        m_i = m_new

    out = (bh64 * n_splits + split) * G + g
    tl.store(o_ptr + out[:, None] * D + c[None, :], acc, mask=g[:, None] < G)
    tl.store(ml_ptr + out * 2, m_i, mask=g < G)
    tl.store(ml_ptr + out * 2 + 1, l_i, mask=g < G)


@triton.jit
def _merge_kernel(o_ptr, ml_ptr, out_ptr, n_splits, G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # (batch * kv_head) * G + query head in group
    bh = (row // G).to(tl.int64)
    g = row % G
    s = tl.arange(0, BLOCK_S)
    c = tl.arange(0, D)
    m_max = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        idx = ((bh * n_splits + s0 + s) * G + g) * 2
        m = tl.load(ml_ptr + idx, mask=s0 + s < n_splits, other=float("-inf"))
        m_max = tl.maximum(m_max, m)
    top = tl.max(m_max, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((BLOCK_S,), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        live = s0 + s < n_splits
        idx = (bh * n_splits + s0 + s) * G + g
        m = tl.load(ml_ptr + idx * 2, mask=live, other=float("-inf"))
        mass = tl.load(ml_ptr + idx * 2 + 1, mask=live, other=0.0)
        w = tl.exp2(m - top)
        total += mass * w
        o = tl.load(o_ptr + idx[:, None] * D + c[None, :], mask=live[:, None], other=0.0)
        acc += tl.sum(o * w[:, None], axis=0)
    denom = tl.sum(total, axis=0)
    res = tl.where(denom > 0, acc / denom, 0.0)
    tl.store(out_ptr + row.to(tl.int64) * D + c, res.to(out_ptr.dtype.element_ty))


# --- host side ------------------------------------------------------------------------------


def _row(seg: Segment) -> list[int]:
    row = [0] * COLUMNS
    if isinstance(seg, Dense):
        d = seg.data
        if d.stride(-1) != 1:
            raise ValueError("dense segments need a unit channel stride")
        row[KIND], row[TOKENS], row[PTR0] = DENSE, seg.tokens, d.data_ptr()
        row[STRIDE_B], row[STRIDE_H], row[STRIDE_T] = d.stride(0), d.stride(1), d.stride(2)
        return row
    for t in (seg.codes, seg.scale, seg.zero):
        if not t.is_contiguous():
            raise ValueError("affine segments must be contiguous")
    row[KIND], row[TOKENS] = AFFINE, seg.tokens
    row[PTR0], row[PTR1], row[PTR2] = seg.codes.data_ptr(), seg.scale.data_ptr(), seg.zero.data_ptr()
    if isinstance(seg, AffineTokens) and seg.side_codes is not None:
        assert seg.side_step is not None
        row[SIDE_CODES], row[SIDE_STEP] = seg.side_codes.data_ptr(), seg.side_step.data_ptr()
    return row


def _bounds(segments: Sequence[Segment]) -> list[int]:
    out, pos = [0], 0
    for s in segments:
        pos += s.tokens if isinstance(s, Dense) or s.covered is None else s.covered
        out.append(pos)
    return out


def plan(
    keys: Sequence[Segment],
    values: Sequence[Segment],
    *,
    batch_heads: int,
    key_bits: int = 0,
    key_group: int = 0,
    value_bits: int = 0,
    value_group: int = 0,
    side_rank: int = 0,
    side_bits: int = 0,
    block_n: int = 64,
    split: int | None = None,
) -> Plan:
    """Tables for :func:`attend`: key and value segments in token order, each covering the same tokens.

    Splits never cross a segment boundary of either stream and start on a whole key group of an
    affine key segment; ``split`` caps their length (by default chosen so that the splits times
    ``batch_heads`` fill the GPU a few times over).
    """
    kb, vb = _bounds(keys), _bounds(values)
    length = kb[-1]
    if vb[-1] != length:
        raise ValueError(f"keys cover {length} tokens, values {vb[-1]}")
    if split is None:
        want = max(1, math.ceil(4 * 132 / max(1, batch_heads)))
        split = min(4096, max(block_n, triton.next_power_of_2(max(1, length // want))))
    split = max(block_n, split // block_n * block_n)
    cuts = sorted(set(kb) | set(vb))
    rows: list[tuple[int, int, int, int, int, int]] = []
    ki = vi = 0
    for a, z in itertools.pairwise(cuts):
        while kb[ki + 1] <= a:
            ki += 1
        while vb[vi + 1] <= a:
            vi += 1
        for start in range(a, z, split):
            k_off = start - kb[ki]
            if isinstance(keys[ki], AffineTokens) and k_off % key_group:
                raise ValueError(f"a split starts inside a key group (token {start})")
            rows.append((ki, k_off, len(keys) + vi, start - vb[vi], min(split, z - start), start))
    device = next(s.data.device if isinstance(s, Dense) else s.codes.device for s in [*keys, *values])
    table = torch.tensor([_row(s) for s in [*keys, *values]], dtype=torch.int64).to(device, non_blocking=True)
    splits = torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)
    keep: list[torch.Tensor] = []
    for s in [*keys, *values]:
        if isinstance(s, Dense):
            keep.append(s.data)
        else:
            keep += [s.codes, s.scale, s.zero]
            if isinstance(s, AffineTokens) and s.side_codes is not None:
                assert s.side_step is not None
                keep += [s.side_codes, s.side_step]
    return Plan(
        segments=table,
        splits=splits,
        n_splits=len(rows),
        length=length,
        key_bits=key_bits,
        key_group=key_group,
        value_bits=value_bits,
        value_group=value_group,
        side_rank=side_rank,
        side_bits=side_bits,
        keep=keep,
    )


def attend(
    q: torch.Tensor,
    plan: Plan,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    side_query: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    gather: bool = False,
    half: bool = True,
) -> torch.Tensor:
    """Attention of q (b, hkv, g, d) (float16 or bfloat16) over a plan's tokens -> (b, hkv, g, d).

    mask: (b, >= length) bool or uint8, nonzero = attend, read at each token's position.
    side_query: (b, hkv, g, r) float32, ``sign * U^T q`` for the side code, when the keys carry one.
    """
    b, hkv, g, d = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"decode attention runs in float16 or bfloat16, got {q.dtype}")
    q = q.contiguous()
    dt = tl.float16 if q.dtype == torch.float16 else tl.bfloat16
    g_pad = max(16, triton.next_power_of_2(g))
    parts = torch.empty((b * hkv, plan.n_splits, g, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b * hkv, plan.n_splits, g, 2), dtype=torch.float32, device=q.device)
    if mask is not None:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    r = plan.side_rank
    if r:
        if side_query is None:
            raise ValueError("these keys carry a side code: pass side_query")
        side_query = side_query.float().contiguous()
    global last_compiled
    last_compiled = _decode_split_kernel[(plan.n_splits, b * hkv)](
        q,
        side_query if r else q,
        plan.segments,
        plan.splits,
        mask if mask is not None else q,
        parts,
        ml,
        hkv,
        plan.n_splits,
        mask.stride(0) if mask is not None else 0,
        scale * LOG2E,
        G=g,
        G_PAD=g_pad,
        D=d,
        BLOCK_N=block_n,
        K_BITS=plan.key_bits,
        K_GROUP=max(1, plan.key_group),
        V_BITS=plan.value_bits,
        V_GROUP=max(1, plan.value_group),
        R=r,
        R_PAD=max(16, triton.next_power_of_2(max(r, 1))),
        Z_BITS=max(1, plan.side_bits),
        HAS_MASK=mask is not None,
        DT=dt,
        GATHER=gather,
        MATH=dt if half else tl.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    out = torch.empty((b, hkv, g, d), dtype=q.dtype, device=q.device)
    block_s = min(64, triton.next_power_of_2(plan.n_splits))
    _merge_kernel[(b * hkv * g,)](parts, ml, out, plan.n_splits, G=g, D=d, BLOCK_S=block_s, num_warps=4)
    return out
