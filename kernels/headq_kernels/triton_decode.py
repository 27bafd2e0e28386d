"""Triton decode attention over a quantized KV cache: one query token per sequence.

Flash-decoding: the token axis is cut into splits; one program attends the query heads of one
KV head (GQA folded into the rows of one ``tl.dot``) to one split, with an online softmax, and a
second kernel merges the splits. Each split lies inside one key segment and one value segment, so
the program reads each segment where the cache keeps it, in its own layout:

- key segments: affine codes grouped along tokens (KIVI keys; :class:`AffineTokens`), optionally
  with HeadQ's low-rank side code (``(U^T q) . z_hat`` added to the logits), codebook indices
  (GSRQ; :class:`Codebook`), or dense tokens;
- value segments: affine codes grouped along channels (KIVI values; :class:`AffineChannels`),
  the same at per-token widths (A²; :class:`MixedChannels`), codebook indices, or dense tokens.

Codebook tokens are decoded in the tile: each sub-vector's codeword (``dim`` contiguous float16
channels of a codebook that stays in cache) is gathered per stage and summed, then the tile
goes through the same matrix products as any other; a channel scale moves to the query (keys)
or to the split's output (values). Mixed-width tokens find their words from the packed width
index: a running sum of word counts over the allocation row (tiles start on rows), then each
width is unpacked from its own tokens.

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
    AFFINE,
    CODEBOOK,
    COLUMNS,
    DENSE,
    EXTRA,
    MIXED,
    PTR0,
    PTR1,
    PTR2,
    PTR3,
    PTR4,
    STRIDE_B,
    STRIDE_H,
    STRIDE_T,
    TOKENS,
    AffineChannels,
    AffineTokens,
    Codebook,
    Dense,
    MixedChannels,
    Plan,
    Segment,
    plan,
)

__all__ = [
    "AffineChannels",
    "AffineTokens",
    "Codebook",
    "Dense",
    "MixedChannels",
    "Plan",
    "Segment",
    "attend",
    "plan",
]

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
PTR3_C: tl.constexpr = tl.constexpr(PTR3)
PTR4_C: tl.constexpr = tl.constexpr(PTR4)
STRIDE_B_C: tl.constexpr = tl.constexpr(STRIDE_B)
STRIDE_H_C: tl.constexpr = tl.constexpr(STRIDE_H)
STRIDE_T_C: tl.constexpr = tl.constexpr(STRIDE_T)
TOKENS_C: tl.constexpr = tl.constexpr(TOKENS)
EXTRA_C: tl.constexpr = tl.constexpr(EXTRA)
COLUMNS_C: tl.constexpr = tl.constexpr(COLUMNS)
SPLIT_COLUMNS_C: tl.constexpr = tl.constexpr(7)
AFFINE_C: tl.constexpr = tl.constexpr(AFFINE)
DENSE_C: tl.constexpr = tl.constexpr(DENSE)
MIXED_C: tl.constexpr = tl.constexpr(MIXED)
CODEBOOK_C: tl.constexpr = tl.constexpr(CODEBOOK)


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
def _at_width(
    codes, start, chosen, x, WIDTH: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, MATH: tl.constexpr
):
    """x with the rows of ``chosen`` tokens replaced by their codes unpacked at WIDTH bits."""
    packed = tl.load(
        codes + start[:, None] + tl.arange(0, D * WIDTH // 32)[None, :], mask=chosen[:, None], other=0
    )
    return tl.where(chosen[:, None], _unpack_rows(packed, WIDTH, BLOCK_N, D, MATH), x)


@triton.jit
def _mixed_values(
    codes,
    index,
    scale,
    zero,
    row_words,
    t0,
    live,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    W0: tl.constexpr,
    W1: tl.constexpr,
    W2: tl.constexpr,
    W3: tl.constexpr,
    N_WIDTHS: tl.constexpr,
    CHUNK: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    GROUP: tl.constexpr,
    MATH: tl.constexpr,
):
    """Values at per-token widths W0..W3 (the first N_WIDTHS), tokens t0..t0+BLOCK_N (t0 on an
    allocation row): (BLOCK_N, D) in MATH."""
    tok = t0 + tl.arange(0, BLOCK_N)
    row = tok // CHUNK
    if INDEX_BITS > 0:
        index_words: tl.constexpr = (CHUNK * INDEX_BITS + 31) // 32
        bit = (tok % CHUNK) * INDEX_BITS
        word = tl.load(index + row * index_words + bit // 32, mask=live, other=0)
        level = (word >> (bit % 32)) & ((1 << INDEX_BITS) - 1)
    else:
        level = tl.zeros((BLOCK_N,), tl.int32)
    width = tl.where(level == 0, W0, tl.where(level == 1, W1, tl.where(level == 2, W2, W3)))
    words = tl.reshape(tl.where(live, width * D // 32, 0), (BLOCK_N // CHUNK, CHUNK))
    start = tl.reshape(tl.cumsum(words, axis=1) - words, (BLOCK_N,)) + row.to(tl.int64) * row_words
    x = tl.zeros((BLOCK_N, D), MATH)
    x = _at_width(codes, start, live & (level == 0), x, W0, D, BLOCK_N, MATH)
    if N_WIDTHS > 1:
        x = _at_width(codes, start, live & (level == 1), x, W1, D, BLOCK_N, MATH)
    if N_WIDTHS > 2:
        x = _at_width(codes, start, live & (level == 2), x, W2, D, BLOCK_N, MATH)
    if N_WIDTHS > 3:
        x = _at_width(codes, start, live & (level == 3), x, W3, D, BLOCK_N, MATH)
    groups: tl.constexpr = D // GROUP
    gi = tok[:, None].to(tl.int64) * groups + tl.arange(0, groups)[None, :]
    s = tl.load(scale + gi, mask=live[:, None], other=0.0).to(MATH)
    z = tl.load(zero + gi, mask=live[:, None], other=0.0).to(MATH)
    return x * _spread(s, BLOCK_N, groups, GROUP) + _spread(z, BLOCK_N, groups, GROUP)


@triton.jit
def _codewords(
    indices,
    book,
    rows,
    live,
    BLOCK_N: tl.constexpr,
    POSITIONS: tl.constexpr,
    DIM: tl.constexpr,
    WIDTH: tl.constexpr,
    OFFSET: tl.constexpr,
    TOKEN_BITS: tl.constexpr,
):
    """One stage's codewords of every sub-vector: (BLOCK_N, POSITIONS, DIM) float32.

    Sub-vector p's index sits at bit ``p * TOKEN_BITS + OFFSET`` of the token's bytes (a second
    byte read where it may cross one); its codeword is ``DIM`` contiguous channels.
    """
    token_bytes: tl.constexpr = (POSITIONS * TOKEN_BITS + 7) // 8
    p = tl.arange(0, POSITIONS)
    bit = p * TOKEN_BITS + OFFSET
    byte = bit // 8
    code = tl.load(indices + rows + byte[None, :], mask=live[:, None], other=0).to(tl.int32)
    if TOKEN_BITS % 8 != 0 or OFFSET % 8 + WIDTH > 8:
        more = live[:, None] & (byte[None, :] + 1 < token_bytes)
        code |= tl.load(indices + rows + byte[None, :] + 1, mask=more, other=0).to(tl.int32) << 8
    code = (code >> (bit % 8)[None, :]) & ((1 << WIDTH) - 1)
    at = (p[None, :, None] * (1 << WIDTH) + code[:, :, None]) * DIM + tl.arange(0, DIM)[None, None, :]
    return tl.load(book + at, mask=live[:, None, None], other=0.0).to(tl.float32)


@triton.jit
def _codebook_tokens(
    indices,
    book0,
    book1,
    t,
    live,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIM: tl.constexpr,
    W0: tl.constexpr,
    W1: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Codebook tokens t (BLOCK_N,) of one head, decoded (the stages' codewords summed): (BLOCK_N, D) float32."""
    positions: tl.constexpr = D // DIM
    token_bits: tl.constexpr = W0 + W1  # W1 is 0 with one stage
    rows = t[:, None].to(tl.int64) * ((positions * token_bits + 7) // 8)
    x = _codewords(indices, book0, rows, live, BLOCK_N, positions, DIM, W0, 0, token_bits)
    if STAGES > 1:
        x += _codewords(indices, book1, rows, live, BLOCK_N, positions, DIM, W1, W0, token_bits)
    return tl.reshape(x, (BLOCK_N, D))


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
    tail_ptr,
    HKV,
    n_splits,
    mask_stride,
    qk_scale,
    tail_start,
    tail_len,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_KIND: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_BOOK: tl.constexpr,
    V_KIND: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_BOOK: tl.constexpr,
    V_MIXED: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    Z_BITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    TAIL: tl.constexpr,
    DT: tl.constexpr,
    MATH: tl.constexpr,
):
    """One split of one (sequence, KV head); every split of a launch has the same segment kinds.

    K_BOOK / V_BOOK: codebook settings (dim, first and second stage's index bits, stages, scaled);
    V_MIXED: mixed-width settings (four widths, how many are used, chunk, index bits).
    TAIL: also write the scaled logits of positions from ``tail_start`` on (for the statistics).
    """
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

    g = tl.arange(0, G_PAD)
    c = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + (bh64 * G + g[:, None]) * D + c[None, :], mask=g[:, None] < G, other=0.0)

    # Everything about the two segments is read once, before the token loop.
    k_tokens = tl.load(krow + TOKENS_C)
    if K_KIND == AFFINE_C:
        k_words = k_tokens * K_BITS // 32
        k_groups = k_tokens // K_GROUP
        k_codes = tl.load(krow + PTR0_C).to(tl.pointer_type(tl.int32)) + bh64 * D * k_words
        k_scale = tl.load(krow + PTR1_C).to(tl.pointer_type(tl.float16)) + bh64 * D * k_groups
        k_zero = tl.load(krow + PTR2_C).to(tl.pointer_type(tl.float16)) + bh64 * D * k_groups
        if R > 0:
            z_words = k_tokens * Z_BITS // 32
            z_codes = tl.load(krow + PTR3_C).to(tl.pointer_type(tl.int32)) + bh64 * R * z_words
            z_step = tl.load(krow + PTR4_C).to(tl.pointer_type(tl.float16)) + bh64 * k_tokens
            rr = tl.arange(0, R_PAD)
            qr = tl.load(
                qr_ptr + (bh64 * G + g[:, None]) * R + rr[None, :],
                mask=(g[:, None] < G) & (rr[None, :] < R),
                other=0.0,
            )
    elif K_KIND == CODEBOOK_C:
        k_bytes: tl.constexpr = (D // K_BOOK[0] * (K_BOOK[1] + K_BOOK[2]) + 7) // 8
        k_idx = tl.load(krow + PTR0_C).to(tl.pointer_type(tl.uint8)) + bh64 * k_tokens * k_bytes
        k_book0 = tl.load(krow + PTR1_C).to(tl.pointer_type(tl.float16))
        k_book1 = tl.load(krow + PTR2_C).to(tl.pointer_type(tl.float16))
        if K_BOOK[4]:  # the codewords approximate scale * k: q . k = (q / scale) . codeword
            k_chan = tl.load(krow + PTR3_C).to(tl.pointer_type(tl.float16)) + h * D
            q = (q.to(tl.float32) / tl.load(k_chan + c).to(tl.float32)[None, :]).to(DT)
    else:
        k_base = tl.load(krow + PTR0_C).to(tl.pointer_type(DT))
        k_base += b * tl.load(krow + STRIDE_B_C) + h * tl.load(krow + STRIDE_H_C)
        k_stride = tl.load(krow + STRIDE_T_C)
    v_tokens = tl.load(vrow + TOKENS_C)
    if V_KIND == AFFINE_C:
        v_codes = tl.load(vrow + PTR0_C).to(tl.pointer_type(tl.int32)) + bh64 * v_tokens * (D * V_BITS // 32)
        v_scale = tl.load(vrow + PTR1_C).to(tl.pointer_type(tl.float16)) + bh64 * v_tokens * (D // V_GROUP)
        v_zero = tl.load(vrow + PTR2_C).to(tl.pointer_type(tl.float16)) + bh64 * v_tokens * (D // V_GROUP)
    elif V_KIND == MIXED_C:
        v_row_words = tl.load(vrow + EXTRA_C)
        index_words: tl.constexpr = (V_MIXED[5] * V_MIXED[6] + 31) // 32
        v_rows = v_tokens // V_MIXED[5]
        v_codes = tl.load(vrow + PTR0_C).to(tl.pointer_type(tl.int32)) + bh64 * v_rows * v_row_words
        v_index = tl.load(vrow + PTR3_C).to(tl.pointer_type(tl.int32)) + bh64 * v_rows * index_words
        v_scale = tl.load(vrow + PTR1_C).to(tl.pointer_type(tl.float16)) + bh64 * v_tokens * (D // V_GROUP)
        v_zero = tl.load(vrow + PTR2_C).to(tl.pointer_type(tl.float16)) + bh64 * v_tokens * (D // V_GROUP)
    elif V_KIND == CODEBOOK_C:
        v_bytes: tl.constexpr = (D // V_BOOK[0] * (V_BOOK[1] + V_BOOK[2]) + 7) // 8
        v_idx = tl.load(vrow + PTR0_C).to(tl.pointer_type(tl.uint8)) + bh64 * v_tokens * v_bytes
        v_book0 = tl.load(vrow + PTR1_C).to(tl.pointer_type(tl.float16))
        v_book1 = tl.load(vrow + PTR2_C).to(tl.pointer_type(tl.float16))
    else:
        v_base = tl.load(vrow + PTR0_C).to(tl.pointer_type(DT))
        v_base += b * tl.load(vrow + STRIDE_B_C) + h * tl.load(vrow + STRIDE_H_C)
        v_stride = tl.load(vrow + STRIDE_T_C)

    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    for t in range(0, length, BLOCK_N):
        live = t + n < length
        if K_KIND == AFFINE_C:
            kt = _affine_keys_t(
                k_codes, k_scale, k_zero, k_words, k_groups, k_off + t, c, D, BLOCK_N, K_BITS, K_GROUP, MATH
            )
            s = tl.dot(q, kt.to(DT))
            if R > 0:
                s += _side_term(z_codes, z_step, z_words, k_tokens, k_off + t, qr, R, R_PAD, BLOCK_N, Z_BITS)
        elif K_KIND == CODEBOOK_C:
            kt = _codebook_tokens(
                k_idx, k_book0, k_book1, k_off + t + n, live, D, BLOCK_N, K_BOOK[0], K_BOOK[1], K_BOOK[2], K_BOOK[3],
            )  # fmt: skip
            s = tl.dot(q, tl.trans(kt.to(DT)))
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
        if TAIL:
            at = position + t + n - tail_start
            seen = live & (at >= 0)
            rows = (bh64 * G + g[:, None]) * tail_len
            tl.store(tail_ptr + rows + at[None, :], s, mask=(g[:, None] < G) & seen[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_KIND == AFFINE_C:
            v = _affine_values(
                v_codes, v_scale, v_zero, v_off + t + n, live, D, BLOCK_N, V_BITS, V_GROUP, MATH
            ).to(DT)
        elif V_KIND == MIXED_C:
            v = _mixed_values(
                v_codes, v_index, v_scale, v_zero, v_row_words, v_off + t, live, D, BLOCK_N,
                V_MIXED[0], V_MIXED[1], V_MIXED[2], V_MIXED[3], V_MIXED[4], V_MIXED[5], V_MIXED[6], V_GROUP, MATH,
            ).to(DT)  # fmt: skip
        elif V_KIND == CODEBOOK_C:
            v = _codebook_tokens(
                v_idx, v_book0, v_book1, v_off + t + n, live, D, BLOCK_N, V_BOOK[0], V_BOOK[1], V_BOOK[2], V_BOOK[3],
            ).to(DT)  # fmt: skip
        else:
            v = tl.load(
                v_base + (v_off + t + n)[:, None].to(tl.int64) * v_stride + c[None, :],
                mask=live[:, None],
                other=0.0,
            )
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
        m_i = m_new
    if V_KIND == CODEBOOK_C:
        if V_BOOK[4]:  # the codewords approximate scale * v: this split's readout divides by it
            v_chan = tl.load(vrow + PTR3_C).to(tl.pointer_type(tl.float16)) + h * D
            acc = acc / tl.load(v_chan + c).to(tl.float32)[None, :]

    out = (bh64 * n_splits + split) * G + g
    tl.store(o_ptr + out[:, None] * D + c[None, :], acc, mask=g[:, None] < G)
    tl.store(ml_ptr + out * 2, m_i, mask=g < G)
    tl.store(ml_ptr + out * 2 + 1, l_i, mask=g < G)


@triton.jit
def _merge_kernel(
    o_ptr, ml_ptr, out_ptr, lse_ptr, n_splits, G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
    LSE: tl.constexpr,
):  # fmt: skip
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
    if LSE:  # log2 of the softmax denominator, in the split kernel's log2 units
        tl.store(lse_ptr + row, tl.where(denom > 0, top + tl.log2(denom), float("inf")))


def _book(seg: Segment | None) -> tuple[int, ...]:
    """Codebook constexprs: (dim, first stage's index bits, second's or 0, stages, scaled)."""
    if not isinstance(seg, Codebook):
        return (1, 8, 0, 1, 0)
    w = seg.widths
    return (int(seg.books[0].shape[-1]), w[0], w[1] if len(w) > 1 else 0, len(w), int(seg.scale is not None))


def _mixed(seg: Segment | None) -> tuple[int, ...]:
    """Mixed-width constexprs: (four widths, how many are used, chunk, index bits)."""
    if not isinstance(seg, MixedChannels):
        return (2, 2, 2, 2, 1, 1, 0)
    w = seg.widths
    return (*w, *(w[-1],) * (4 - len(w)), len(w), seg.chunk, seg.index_bits)


def attend(
    q: torch.Tensor,
    plan: Plan,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    side_query: torch.Tensor | None = None,
    tail_probs: torch.Tensor | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    half: bool = True,
) -> torch.Tensor:
    """Attention of q (b, hkv, g, d) (float16 or bfloat16) over a plan's tokens -> (b, hkv, g, d).

    mask: (b, >= length) bool or uint8, nonzero = attend, read at each token's position.
    side_query: (b, hkv, g, r) float32, ``sign * U^T q`` for the side code, when the keys carry one.
    tail_probs: (b, hkv, g, T) float32, filled with the attention probabilities of the last T
    tokens (for a value policy's statistics). Tiles hold the plan's ``block_n`` tokens.
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
    tail = 0 if tail_probs is None else tail_probs.shape[-1]
    logits = (
        torch.full((b, hkv, g, tail), float("-inf"), dtype=torch.float32, device=q.device) if tail else ml
    )
    k_book = _book(plan.first(CODEBOOK, keys=True))
    v_book = _book(plan.first(CODEBOOK, keys=False))
    v_mixed = _mixed(plan.first(MIXED, keys=False))
    mixed_group = getattr(plan.first(MIXED, keys=False), "group", 1)
    last_compiled.clear()
    for k_kind, v_kind, splits in plan.launches:
        compiled = _decode_split_kernel[(splits.shape[0], b * hkv)](
            q, side_query if r else q, plan.segments, splits, mask if mask is not None else q, parts, ml, logits,
            hkv, plan.n_splits, mask.stride(0) if mask is not None else 0, scale * LOG2E,
            plan.length - tail, max(tail, 1),
            G=g, G_PAD=g_pad, D=d, BLOCK_N=plan.block_n,
            K_KIND=k_kind, K_BITS=max(1, plan.key_bits), K_GROUP=max(1, plan.key_group), K_BOOK=k_book,
            V_KIND=v_kind, V_BITS=max(1, plan.value_bits),
            V_GROUP=mixed_group if v_kind == MIXED else max(1, plan.value_group), V_BOOK=v_book, V_MIXED=v_mixed,
            R=r if k_kind == AFFINE else 0, R_PAD=max(16, triton.next_power_of_2(max(r, 1))),
            Z_BITS=max(1, plan.side_bits), HAS_MASK=mask is not None, TAIL=tail > 0,
            DT=dt, MATH=dt if half and q.dtype == torch.float16 else tl.float32,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        last_compiled.append(compiled)
    out = torch.empty((b, hkv, g, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hkv, g), dtype=torch.float32, device=q.device) if tail else ml
    block_s = min(64, max(2, triton.next_power_of_2(plan.n_splits)))  # no size-1 blocks
    _merge_kernel[(b * hkv * g,)](
        parts, ml, out, lse, plan.n_splits, G=g, D=d, BLOCK_S=block_s, LSE=tail > 0, num_warps=4
    )
    if tail_probs is not None and tail:
        tail_probs.copy_(torch.exp2(logits - lse[..., None]))
    return out
