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
cache); ``decode_plan.plan`` builds it, :func:`attend` runs a plan: one launch per pair of segment kinds
(affine or dense keys, affine or dense values), so that no program branches on the kind inside
its token loop, and every program reads its segments' pointers once, before the loop. The torch reference for the same
computation is the cache's attention path (``headq_core.attention.attend_quantized``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from headq_kernels.decode_plan import (
    COLUMNS,
    PTR0,
    PTR1,
    PTR2,
    SIDE_CODES,
    SIDE_STEP,
    STRIDE_B,
    STRIDE_H,
    STRIDE_T,
    TOKENS,
    AffineChannels,
    AffineTokens,
    Dense,
    Plan,
    Segment,
    plan,
)

__all__ = ["AffineChannels", "AffineTokens", "Dense", "Plan", "Segment", "attend", "plan"]

LOG2E = 1.4426950408889634
last_compiled: list[Any] = []  # the split kernels of the last attend, one per launch (for compiler reports)


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
SPLIT_COLUMNS_C: tl.constexpr = tl.constexpr(7)


@triton.jit
def _affine_keys_t(
    codes,
    scale,
    zero,
    n_words,
    n_groups,
    off,
    c,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    MATH: tl.constexpr,
):
    """Keys grouped along tokens, tokens off..off+BLOCK_N of one head: a (D, BLOCK_N) tile in MATH.

    Each word is loaded once; its lanes and the group scales are spread in registers by reshapes.
    """
    per_word: tl.constexpr = 32 // BITS
    words: tl.constexpr = BLOCK_N // per_word
    groups: tl.constexpr = BLOCK_N // GROUP
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
    codes,
    scale,
    zero,
    t,
    live,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    MATH: tl.constexpr,
):
    """Values grouped along channels, tokens t (BLOCK_N,) of one head: a (BLOCK_N, D) tile in MATH."""
    per_word: tl.constexpr = 32 // BITS
    words: tl.constexpr = D // per_word
    groups: tl.constexpr = D // GROUP
    rows = t[:, None].to(tl.int64)
    packed = tl.load(codes + rows * words + tl.arange(0, words)[None, :], mask=live[:, None], other=0)
    gi = rows * groups + tl.arange(0, groups)[None, :]
    s = tl.load(scale + gi, mask=live[:, None], other=0.0).to(MATH)
    z = tl.load(zero + gi, mask=live[:, None], other=0.0).to(MATH)
    q = _unpack_rows(packed, BITS, BLOCK_N, D, MATH)
    return q * _spread(s, BLOCK_N, groups, GROUP) + _spread(z, BLOCK_N, groups, GROUP)


@triton.jit
def _side_term(
    codes,
    step,
    n_words,
    tokens,
    off,
    qr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
):
    """HeadQ: (G_PAD, BLOCK_N) logits ``(U^T q) . z_hat`` of tokens off..off+BLOCK_N."""
    per_word: tl.constexpr = 32 // BITS
    words: tl.constexpr = BLOCK_N // per_word
    levels: tl.constexpr = (1 << BITS) - 1
    r = tl.arange(0, R_PAD)
    t = off + tl.arange(0, BLOCK_N)
    st = tl.load(step + t, mask=t < tokens, other=0.0).to(tl.float32)
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
    K_AFFINE: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GROUP: tl.constexpr,
    V_AFFINE: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    Z_BITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DT: tl.constexpr,
    MATH: tl.constexpr,
):
    """One split of one (sequence, KV head); every split of a launch has the same segment kinds."""
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    bh64 = bh.to(tl.int64)
    srow = split_ptr + tl.program_id(0) * SPLIT_COLUMNS_C
    k_off = tl.load(srow + 1)
    v_off = tl.load(srow + 3)
    length = tl.load(srow + 4)
    position = tl.load(srow + 5)
    split = tl.load(srow + 6)
    krow = seg_ptr + tl.load(srow) * COLUMNS_C
    vrow = seg_ptr + tl.load(srow + 2) * COLUMNS_C

    # Everything about the two segments is read once, before the token loop.
    k_tokens = tl.load(krow + TOKENS_C)
    if K_AFFINE:
        k_words = k_tokens * K_BITS // 32
        k_groups = k_tokens // K_GROUP
        k_codes = tl.load(krow + PTR0_C).to(tl.pointer_type(tl.int32)) + bh64 * D * k_words
        k_scale = tl.load(krow + PTR1_C).to(tl.pointer_type(tl.float16)) + bh64 * D * k_groups
        k_zero = tl.load(krow + PTR2_C).to(tl.pointer_type(tl.float16)) + bh64 * D * k_groups
        if R > 0:
            z_words = k_tokens * Z_BITS // 32
            z_codes = tl.load(krow + SIDE_CODES_C).to(tl.pointer_type(tl.int32)) + bh64 * R * z_words
            z_step = tl.load(krow + SIDE_STEP_C).to(tl.pointer_type(tl.float16)) + bh64 * k_tokens
    else:
        k_base = tl.load(krow + PTR0_C).to(tl.pointer_type(DT))
        k_base += b * tl.load(krow + STRIDE_B_C) + h * tl.load(krow + STRIDE_H_C)
        k_stride = tl.load(krow + STRIDE_T_C)
    if V_AFFINE:
        v_tokens = tl.load(vrow + TOKENS_C)
        v_codes = tl.load(vrow + PTR0_C).to(tl.pointer_type(tl.int32)) + bh64 * v_tokens * (D * V_BITS // 32)
        v_scale = tl.load(vrow + PTR1_C).to(tl.pointer_type(tl.float16)) + bh64 * v_tokens * (D // V_GROUP)
        v_zero = tl.load(vrow + PTR2_C).to(tl.pointer_type(tl.float16)) + bh64 * v_tokens * (D // V_GROUP)
    else:
        v_base = tl.load(vrow + PTR0_C).to(tl.pointer_type(DT))
        v_base += b * tl.load(vrow + STRIDE_B_C) + h * tl.load(vrow + STRIDE_H_C)
        v_stride = tl.load(vrow + STRIDE_T_C)

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
        if K_AFFINE:
            kt = _affine_keys_t(
                k_codes, k_scale, k_zero, k_words, k_groups, k_off + t, c, D, BLOCK_N, K_BITS, K_GROUP, MATH
            )
            s = tl.dot(q, kt.to(DT))
            if R > 0:
                s += _side_term(z_codes, z_step, z_words, k_tokens, k_off + t, qr, R, R_PAD, BLOCK_N, Z_BITS)
        else:
            kt = tl.load(
                k_base + (k_off + t + n)[None, :].to(tl.int64) * k_stride + c[:, None],
                mask=live[None, :],
                other=0.0,
            )
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
        if V_AFFINE:
            v = _affine_values(
                v_codes, v_scale, v_zero, v_off + t + n, live, D, BLOCK_N, V_BITS, V_GROUP, MATH
            ).to(DT)
        else:
            v = tl.load(
                v_base + (v_off + t + n)[:, None].to(tl.int64) * v_stride + c[None, :],
                mask=live[:, None],
                other=0.0,
            )
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
    last_compiled.clear()
    for k_affine, v_affine, splits in plan.launches:
        compiled = _decode_split_kernel[(splits.shape[0], b * hkv)](
            q, side_query if r else q, plan.segments, splits, mask if mask is not None else q, parts, ml,
            hkv, plan.n_splits, mask.stride(0) if mask is not None else 0, scale * LOG2E,
            G=g, G_PAD=g_pad, D=d, BLOCK_N=block_n,
            K_AFFINE=k_affine, K_BITS=max(1, plan.key_bits), K_GROUP=max(1, plan.key_group),
            V_AFFINE=v_affine, V_BITS=max(1, plan.value_bits), V_GROUP=max(1, plan.value_group),
            R=r if k_affine else 0, R_PAD=max(16, triton.next_power_of_2(max(r, 1))), Z_BITS=max(1, plan.side_bits),
            HAS_MASK=mask is not None, DT=dt, MATH=dt if half and q.dtype == torch.float16 else tl.float32,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        last_compiled.append(compiled)
    out = torch.empty((b, hkv, g, d), dtype=q.dtype, device=q.device)
    block_s = min(64, max(2, triton.next_power_of_2(plan.n_splits)))  # no size-1 blocks
    _merge_kernel[(b * hkv * g,)](parts, ml, out, plan.n_splits, G=g, D=d, BLOCK_S=block_s, num_warps=4)
    return out
