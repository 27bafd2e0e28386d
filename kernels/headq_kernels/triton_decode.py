"""Triton decode attention over a quantized KV cache: one query token per sequence.

Flash-decoding: the token axis is cut into splits; one program attends the query heads of one
KV head (GQA folded into the rows of one ``tl.dot``) to one split, with an online softmax, and a
second kernel merges the splits. Each split lies inside one key segment and one value segment, so
the program reads each segment where the cache keeps it, in its own layout:

- key segments: affine codes grouped along tokens (KIVI keys; :class:`AffineTokens`), optionally
  with HeadQ's low-rank side code (``(U^T q) . z_hat`` added to the logits), codebook indices
  (GSRQ; :class:`Codebook`), scaled or rotated tokens, or dense tokens;
- value segments: affine codes grouped along channels (KIVI values; :class:`AffineChannels`),
  the same at per-token widths (A²; :class:`MixedChannels`), codebook indices, scaled or rotated
  tokens, or dense tokens.

Each layout's tile is decoded by :mod:`headq_kernels.triton_tiles` (codebook tokens by
:mod:`headq_kernels.triton_codebook`); a channel scale of codebook tokens moves to the query
(keys) or to the split's output (values), a token's scale of scaled and rotated tokens to its logit
(keys) or its probability (values). Rotated keys are attended with the
query turned into their basis once per split, and rotated values' readout is turned back once at
its end (logits and weighted sums are invariant under a shared orthogonal rotation), so no token
is ever turned back.

Segments are described by a small int64 table of device pointers and strides (no copy of the
cache); ``decode_plan.plan`` builds it, :func:`attend` runs a plan: one launch per pair of segment kinds
(affine, codebook or dense keys; affine, mixed, codebook or dense values), so that no program branches on the kind inside
its token loop, and every program reads its segments' pointers once, before the loop. The torch reference for the same
computation is the cache's attention path (``headq_core.reference.attend_reference``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from headq_kernels import folded_launch, triton_folded
from headq_kernels.decode_plan import (
    AFFINE,
    CODEBOOK,
    DENSE,
    MIXED,
    ROTATED,
    SCALED,
    AffineChannels,
    AffineTokens,
    Codebook,
    Dense,
    MixedChannels,
    Plan,
    Rotated,
    Scaled,
    Segment,
    plan,
)
from headq_kernels.triton_codebook import _book, _codebook_logits, _codebook_tokens, _query_tables
from headq_kernels.triton_tiles import (
    PTR0_C,
    PTR1_C,
    PTR2_C,
    PTR3_C,
    STRIDE_B_C,
    STRIDE_H_C,
    STRIDE_T_C,
    TOKENS_C,
    _affine_key_segment,
    _affine_keys_t,
    _affine_value_segment,
    _affine_values,
    _mixed_value_segment,
    _mixed_values,
    _nibble_tokens,
    _online_softmax,
    _repeat_rows,
    _rotated_segment,
    _rotated_tokens,
    _scaled_segment,
    _scaled_tokens,
    _side_segment,
    _side_term,
    _split_row,
)

__all__ = [
    "AffineChannels",
    "AffineTokens",
    "Codebook",
    "Dense",
    "MixedChannels",
    "Plan",
    "Rotated",
    "Scaled",
    "Segment",
    "attend",
    "plan",
]

LOG2E = 1.4426950408889634
MERGE_SPLITS = 32  # splits the merge kernel reads at a time
last_compiled: list[Any] = []  # the split kernels of the last attend, one per launch (for compiler reports)


AFFINE_C: tl.constexpr = tl.constexpr(AFFINE)
DENSE_C: tl.constexpr = tl.constexpr(DENSE)
MIXED_C: tl.constexpr = tl.constexpr(MIXED)
CODEBOOK_C: tl.constexpr = tl.constexpr(CODEBOOK)
SCALED_C: tl.constexpr = tl.constexpr(SCALED)
ROTATED_C: tl.constexpr = tl.constexpr(ROTATED)
BASIS_CHUNK: tl.constexpr = tl.constexpr(32)  # channels of a rotated basis read at a time


# Arguments that change from step to step are not specialized (on value 1 or divisibility by 16):
# a steady decode must never compile a kernel again.
PER_STEP = ["n_splits", "mask_stride", "tail_start", "tail_len"]


@triton.jit(do_not_specialize=PER_STEP)
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
    ROWS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_KIND: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_BOOK: tl.constexpr,
    K_TOK: tl.constexpr,
    V_KIND: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_BOOK: tl.constexpr,
    V_TOK: tl.constexpr,
    V_MIXED: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    Z_BITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    TAIL: tl.constexpr,
    DT: tl.constexpr,
    MATH: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """One split of one (sequence, KV head); every split of a launch has the same segment kinds.

    ROWS: the rows of the logits and their softmax: G_PAD, or for codebook keys the query heads
    padded to a power of two (their logits come from the tables a head at a time; the rows are
    repeated up to G_PAD only for the value product);
    K_BOOK / V_BOOK: codebook settings (dim, first and second stage's index bits, stages, scaled,
    the vector its index bytes are read in); with codebook keys, qr_ptr holds the query's tables of
    the step (``_query_tables``);
    K_TOK / V_TOK: scaled and rotated tokens' settings (format, bits, scaled, two halves' widths);
    V_MIXED: mixed-width settings (four widths, how many are used, chunk, index bits).
    TAIL: also write the scaled logits of positions from ``tail_start`` on (for the statistics).
    ALIGNED: affine codes start on 16 bytes (``Plan.aligned``), so a tile's key bytes are read as
    16-byte vectors.
    """
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    bh64 = bh.to(tl.int64)
    krow, k_off, vrow, v_off, length, position, split = _split_row(split_ptr, seg_ptr)

    g = tl.arange(0, G_PAD)
    rows = tl.arange(0, ROWS)  # of the logits
    c = tl.arange(0, D)
    c2 = tl.arange(0, D // 2)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + (bh64 * G + g[:, None]) * D + c[None, :], mask=g[:, None] < G, other=0.0)

    # Everything about the two segments is read once, before the token loop.
    k_tokens = tl.load(krow + TOKENS_C)
    if K_KIND == AFFINE_C:
        k_nbytes, k_groups, k_codes, k_scale, k_zero = _affine_key_segment(
            krow, k_tokens, bh64, D, K_BITS, K_GROUP, ALIGNED
        )
        if R > 0:
            z_words, z_codes, z_step = _side_segment(krow, k_tokens, bh64, R, Z_BITS)
            rr = tl.arange(0, R_PAD)
            qr = tl.load(
                qr_ptr + (bh64 * G + g[:, None]) * R + rr[None, :],
                mask=(g[:, None] < G) & (rr[None, :] < R),
                other=0.0,
            )
    elif K_KIND == CODEBOOK_C:
        k_bytes: tl.constexpr = (D // K_BOOK[0] * (K_BOOK[1] + K_BOOK[2]) + 7) // 8
        k_idx = tl.load(krow + PTR0_C).to(tl.pointer_type(tl.uint8)) + bh64 * k_tokens * k_bytes
        k_vector: tl.constexpr = K_BOOK[5]
        if k_vector > 0:  # each token's index bytes start on a vector (``_book``)
            k_idx = tl.multiple_of(k_idx, k_vector)
        # no codeword is read for keys: the query's tables of this step (``_query_tables``)
        k_entries: tl.constexpr = (D // K_BOOK[0]) * ((1 << K_BOOK[1]) + (1 << K_BOOK[2]) * (K_BOOK[3] - 1))
        k_tables = tl.multiple_of(qr_ptr + bh64 * ((k_entries * ROWS + 7) // 8 * 8), 16)
    elif K_KIND == SCALED_C:
        k_codes, k_scale = _scaled_segment(krow, k_tokens, bh64, D, K_TOK[1])
        if K_TOK[1] == 4:  # the query's even and odd channels, for the keys' two planes
            q_even = tl.load(
                q_ptr + (bh64 * G + g[:, None]) * D + 2 * c2[None, :], mask=g[:, None] < G, other=0.0
            )
            q_odd = tl.load(
                q_ptr + (bh64 * G + g[:, None]) * D + 2 * c2[None, :] + 1, mask=g[:, None] < G, other=0.0
            )
    elif K_KIND == ROTATED_C:
        k_first, k_second, k_norm, k_levels, k_basis = _rotated_segment(
            krow, k_tokens, bh64, D, K_TOK[3], K_TOK[4]
        )
        # the query in the keys' basis, (basis q) per row, a few of its channels at a time
        turned = tl.zeros((G_PAD, D), tl.float32)
        for c0 in tl.static_range(0, D, BASIS_CHUNK):
            i = c0 + tl.arange(0, BASIS_CHUNK)
            qc = tl.load(q_ptr + (bh64 * G + g[:, None]) * D + i[None, :], mask=g[:, None] < G, other=0.0)
            turned += tl.dot(
                qc.to(tl.float32), tl.load(k_basis + c[None, :] * D + i[:, None]), input_precision="ieee"
            )
        q = turned.to(DT)
    else:
        k_base = tl.load(krow + PTR0_C).to(tl.pointer_type(DT))
        k_base += b * tl.load(krow + STRIDE_B_C) + h * tl.load(krow + STRIDE_H_C)
        k_stride = tl.load(krow + STRIDE_T_C)
    v_tokens = tl.load(vrow + TOKENS_C)
    if V_KIND == AFFINE_C:
        v_codes, v_scale, v_zero = _affine_value_segment(vrow, v_tokens, bh64, D, V_BITS, V_GROUP)
    elif V_KIND == MIXED_C:
        v_codes, v_index, v_scale, v_zero, v_row_words = _mixed_value_segment(
            vrow, v_tokens, bh64, D, V_GROUP, V_MIXED[5], V_MIXED[6], False
        )
    elif V_KIND == CODEBOOK_C:
        v_bytes: tl.constexpr = (D // V_BOOK[0] * (V_BOOK[1] + V_BOOK[2]) + 7) // 8
        v_idx = tl.load(vrow + PTR0_C).to(tl.pointer_type(tl.uint8)) + bh64 * v_tokens * v_bytes
        v_vector: tl.constexpr = V_BOOK[5]
        if v_vector > 0:
            v_idx = tl.multiple_of(v_idx, v_vector)
        v_book0 = tl.multiple_of(tl.load(vrow + PTR1_C).to(tl.pointer_type(tl.float16)), 16)
        v_book1 = tl.multiple_of(tl.load(vrow + PTR2_C).to(tl.pointer_type(tl.float16)), 16)
    elif V_KIND == SCALED_C:
        v_codes, v_scale = _scaled_segment(vrow, v_tokens, bh64, D, V_TOK[1])
    elif V_KIND == ROTATED_C:
        v_first, v_second, v_norm, v_levels, v_basis = _rotated_segment(
            vrow, v_tokens, bh64, D, V_TOK[3], V_TOK[4]
        )
    else:
        v_base = tl.load(vrow + PTR0_C).to(tl.pointer_type(DT))
        v_base += b * tl.load(vrow + STRIDE_B_C) + h * tl.load(vrow + STRIDE_H_C)
        v_stride = tl.load(vrow + STRIDE_T_C)

    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    # with a row per query head (codebook keys), the softmax mass is kept per token and summed once,
    # at the end: a few registers instead of a reduction across warps per tile
    mass = tl.zeros((ROWS, BLOCK_N), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    if V_KIND == SCALED_C:
        if V_TOK[1] == 4:  # the readout of the values' two planes: even and odd channels
            acc_even = tl.zeros((G_PAD, D // 2), tl.float32)
            acc_odd = tl.zeros((G_PAD, D // 2), tl.float32)
    for t in range(0, length, BLOCK_N):
        live = t + n < length
        if K_KIND == AFFINE_C:
            kt = _affine_keys_t(
                k_codes, k_scale, k_zero, k_nbytes, k_groups, k_off + t, c, D, BLOCK_N, K_BITS, K_GROUP, MATH
            )
            s = tl.dot(q, kt.to(DT))
            if R > 0:
                s += _side_term(z_codes, z_step, z_words, k_tokens, k_off + t, qr, R, R_PAD, BLOCK_N, Z_BITS)
        elif K_KIND == CODEBOOK_C:
            s = _codebook_logits(
                k_idx, k_tables, k_off + t + n, live, D, BLOCK_N, ROWS, K_BOOK[0], K_BOOK[1], K_BOOK[2], K_BOOK[3], K_BOOK[5],
            )  # fmt: skip
        elif K_KIND == SCALED_C:
            if K_TOK[1] == 4:
                k_even, k_odd, k_unit = _nibble_tokens(
                    k_codes, k_scale, k_off + t + n, live, D, K_TOK[2], MATH
                )
                s = tl.dot(q_even, tl.trans(k_even.to(DT)))
                s = tl.dot(q_odd, tl.trans(k_odd.to(DT)), s) * k_unit[None, :]
            else:
                kt, k_unit = _scaled_tokens(
                    k_codes, k_scale, k_off + t + n, live, D, K_TOK[0], K_TOK[2], MATH
                )
                s = tl.dot(q, tl.trans(kt.to(DT))) * k_unit[None, :]
        elif K_KIND == ROTATED_C:
            kt, k_unit = _rotated_tokens(
                k_first, k_second, k_norm, k_levels, k_off + t + n, live, D, BLOCK_N, K_TOK[3], K_TOK[4], MATH
            )
            s = tl.dot(q, tl.trans(kt.to(DT))) * k_unit[None, :]
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
            tail_rows = (bh64 * G + rows[:, None]) * tail_len
            tl.store(tail_ptr + tail_rows + at[None, :], s, mask=(rows[:, None] < G) & seen[None, :])
        m_new, p, alpha = _online_softmax(s, m_i)
        if ROWS < G_PAD:
            mass = mass * alpha[:, None] + p
        else:
            l_i = l_i * alpha + tl.sum(p, axis=1)
        p = _repeat_rows(p, G_PAD)
        alpha = _repeat_rows(alpha[:, None], G_PAD)
        weights = p  # times each token's scale for scaled and rotated values
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
                v_idx, v_book0, v_book1, v_off + t + n, live, D, BLOCK_N, V_BOOK[0], V_BOOK[1], V_BOOK[2], V_BOOK[3], V_BOOK[5],
            ).to(DT)  # fmt: skip
        elif V_KIND == SCALED_C:
            if V_TOK[1] == 4:
                v_even, v_odd, v_unit = _nibble_tokens(
                    v_codes, v_scale, v_off + t + n, live, D, V_TOK[2], MATH
                )
                weights = (p * v_unit[None, :]).to(DT)
                acc_even = acc_even * alpha + tl.dot(weights, v_even.to(DT))
                acc_odd = acc_odd * alpha + tl.dot(weights, v_odd.to(DT))
            else:
                v, v_unit = _scaled_tokens(v_codes, v_scale, v_off + t + n, live, D, V_TOK[0], V_TOK[2], MATH)
                v = v.to(DT)
                weights = p * v_unit[None, :]
        elif V_KIND == ROTATED_C:
            v, v_unit = _rotated_tokens(
                v_first, v_second, v_norm, v_levels, v_off + t + n, live, D, BLOCK_N, V_TOK[3], V_TOK[4], MATH
            )
            v = v.to(DT)
            weights = p * v_unit[None, :]
        else:
            v = tl.load(
                v_base + (v_off + t + n)[:, None].to(tl.int64) * v_stride + c[None, :],
                mask=live[:, None],
                other=0.0,
            )
        if V_KIND != SCALED_C or V_TOK[1] != 4:
            acc = acc * alpha + tl.dot(weights.to(DT), v)
        m_i = m_new
    if V_KIND == CODEBOOK_C:
        if V_BOOK[4]:  # the codewords approximate scale * v: this split's readout divides by it
            v_chan = tl.load(vrow + PTR3_C).to(tl.pointer_type(tl.float16)) + h * D
            acc = acc / tl.load(v_chan + c).to(tl.float32)[None, :]

    out = (bh64 * n_splits + split) * G + g
    if V_KIND == ROTATED_C:  # this split's readout turned back: acc times the basis, a few columns at a time
        for j0 in tl.static_range(0, D, BASIS_CHUNK):
            j = j0 + tl.arange(0, BASIS_CHUNK)
            turned = tl.dot(acc, tl.load(v_basis + c[:, None] * D + j[None, :]), input_precision="ieee")
            tl.store(o_ptr + out[:, None] * D + j[None, :], turned, mask=g[:, None] < G)
    elif V_KIND == SCALED_C and V_TOK[1] == 4:
        tl.store(o_ptr + out[:, None] * D + 2 * c2[None, :], acc_even, mask=g[:, None] < G)
        tl.store(o_ptr + out[:, None] * D + 2 * c2[None, :] + 1, acc_odd, mask=g[:, None] < G)
    else:
        tl.store(o_ptr + out[:, None] * D + c[None, :], acc, mask=g[:, None] < G)
    ml = ((bh64 * n_splits + split) * G + rows) * 2
    tl.store(ml_ptr + ml, m_i, mask=rows < G)
    if ROWS < G_PAD:
        l_i = tl.sum(mass, axis=1)
    tl.store(ml_ptr + ml + 1, l_i, mask=rows < G)


@triton.jit(do_not_specialize=["n_splits"])
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


def _tok(seg: Segment | None) -> tuple[int, ...]:
    """Scaled and rotated tokens' constexprs: (format, bits, scaled, the two halves' widths)."""
    if isinstance(seg, Scaled):
        return (seg.format, seg.bits, int(seg.scale is not None), 2, 2)
    if isinstance(seg, Rotated):
        return (0, 8, 1, *seg.widths)
    return (0, 8, 1, 2, 2)


def _mixed(seg: Segment | None) -> tuple[int, ...]:
    """Mixed-width constexprs: (four widths, how many are used, chunk, index bits)."""
    if not isinstance(seg, MixedChannels):
        return (2, 2, 2, 2, 1, 1, 0)
    w = seg.widths
    return (*w, *(w[-1],) * (4 - len(w)), len(w), seg.chunk, seg.index_bits)


def _attend_folded(
    q: torch.Tensor,
    plan: Plan,
    splits: torch.Tensor,
    mask: torch.Tensor | None,
    side_query: torch.Tensor | None,
    parts: torch.Tensor,
    ml: torch.Tensor,
    logits: torch.Tensor,
    scale: float,
    hilo: bool,
    num_warps: int,
    mixed: MixedChannels | None = None,
) -> Any:
    """One launch of the folded kernel over affine-key splits with affine (or ``mixed``) values,
    into the same parts and statistics tail as the generic one."""
    b, hkv, g, d = q.shape
    ngb = folded_launch.bias_columns(plan)
    scratch = torch.empty(
        (b * hkv * plan.n_splits, folded_launch.rows(plan.block_n // plan.key_group, g), ngb),
        dtype=torch.float32,
        device=q.device,
    )
    r = plan.side_rank
    tail = logits.shape[-1] if logits is not ml else 0
    v_bits, v_hi, v_group, chunk, places = plan.value_bits, 0, plan.value_group, 0, 1
    if mixed is not None:
        v_bits, v_group, chunk = mixed.widths[0], mixed.group, mixed.chunk
        if len(mixed.widths) > 1:
            v_hi, places = mixed.widths[1], folded_launch.rung_places(mixed, d)
    return triton_folded._folded_split_kernel[(splits.shape[0], b * hkv)](
        q, side_query if r else q, plan.segments, splits, mask if mask is not None else q, parts, ml, scratch, logits,
        hkv, plan.n_splits, mask.stride(0) if mask is not None else 0, scale * LOG2E, ngb,
        plan.length - tail, max(tail, 1),
        G=g, GP=triton.next_power_of_2(g), D=d, BLOCK_N=plan.block_n,
        K_BITS=plan.key_bits, K_GROUP=plan.key_group, V_BITS=v_bits, V_GROUP=v_group, V_HI=v_hi, V_CHUNK=chunk, V_PLACES=places,
        R=r, Z_BITS=max(1, plan.side_bits), HAS_MASK=mask is not None, TAIL=tail > 0, HILO=hilo,
        num_warps=num_warps, **folded_launch.settings(d, g, plan.key_bits, r, hilo, chunk > 0),
    )  # fmt: skip


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
    fold: bool = True,
    hilo: bool = False,
) -> torch.Tensor:
    """Attention of q (b, hkv, g, d) (float16 or bfloat16) over a plan's tokens -> (b, hkv, g, d).

    mask: (b, >= length) bool or uint8, nonzero = attend, read at each token's position.
    side_query: (b, hkv, g, r) float32, ``sign * U^T q`` for the side code, when the keys carry one.
    tail_probs: (b, hkv, g, T) float32, filled with the attention probabilities of the last T
    tokens (for a value policy's statistics). Tiles hold the plan's ``block_n`` tokens.
    fold: run affine keys with affine or two-width mixed values on :mod:`headq_kernels.triton_folded`
    where it applies (float16); hilo: its folded operands in two float16 parts (a third of the error, more time);
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
    k_book = _book(plan, keys=True)
    v_book = _book(plan, keys=False)
    math_dt = dt if half and q.dtype == torch.float16 else tl.float32
    tables, rows = None, g_pad
    if plan.first(CODEBOOK, keys=True) is not None:
        rows = triton.next_power_of_2(g)
        tables = _query_tables(
            q, plan, k_book, rows, torch.float16 if math_dt == tl.float16 else torch.float32
        )
    k_tok = _tok(plan.first(SCALED, keys=True) or plan.first(ROTATED, keys=True))
    v_tok = _tok(plan.first(SCALED, keys=False) or plan.first(ROTATED, keys=False))
    first_mixed = plan.first(MIXED, keys=False)
    mixed = first_mixed if isinstance(first_mixed, MixedChannels) else None
    v_mixed = _mixed(mixed)
    mixed_group = getattr(mixed, "group", 1)
    half_q = fold and q.dtype == torch.float16
    folded = half_q and folded_launch.eligible(plan, g, d)
    folded_mixed = half_q and mixed is not None and folded_launch.eligible(plan, g, d, mixed=mixed)
    last_compiled.clear()
    for k_kind, v_kind, splits in plan.launches:
        if k_kind == AFFINE and ((folded and v_kind == AFFINE) or (folded_mixed and v_kind == MIXED)):
            values = mixed if v_kind == MIXED else None
            compiled = _attend_folded(
                q, plan, splits, mask, side_query, parts, ml, logits, scale, hilo, num_warps, values
            )
            last_compiled.append(compiled)
            continue
        compiled = _decode_split_kernel[(splits.shape[0], b * hkv)](
            q, side_query if r else tables if k_kind == CODEBOOK else q, plan.segments, splits, mask if mask is not None else q, parts, ml, logits,
            hkv, plan.n_splits, mask.stride(0) if mask is not None else 0, scale * LOG2E,
            plan.length - tail, max(tail, 1),
            G=g, G_PAD=g_pad, ROWS=rows if k_kind == CODEBOOK else g_pad, D=d, BLOCK_N=plan.block_n,
            K_KIND=k_kind, K_BITS=max(1, plan.key_bits), K_GROUP=max(1, plan.key_group), K_BOOK=k_book, K_TOK=k_tok,
            V_KIND=v_kind, V_BITS=max(1, plan.value_bits),
            V_GROUP=mixed_group if v_kind == MIXED else max(1, plan.value_group), V_BOOK=v_book, V_TOK=v_tok, V_MIXED=v_mixed,
            R=r if k_kind == AFFINE else 0, R_PAD=max(16, triton.next_power_of_2(max(r, 1))),
            Z_BITS=max(1, plan.side_bits), HAS_MASK=mask is not None, TAIL=tail > 0,
            DT=dt, MATH=math_dt, ALIGNED=plan.aligned,
            # codebook tiles gather their codewords as 16-byte vectors: staged through shared memory
            # for a second stage they took 72 KiB a program and ran slower (docs/kernels.md)
            num_warps=num_warps, num_stages=1 if CODEBOOK in (k_kind, v_kind) else num_stages,
        )  # fmt: skip
        last_compiled.append(compiled)
    out = torch.empty((b, hkv, g, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hkv, g), dtype=torch.float32, device=q.device) if tail else ml
    # One block size for every split count, so that the merge compiles once per shape.
    _merge_kernel[(b * hkv * g,)](
        parts, ml, out, lse, plan.n_splits, G=g, D=d, BLOCK_S=MERGE_SPLITS, LSE=tail > 0, num_warps=4
    )
    if tail_probs is not None and tail:
        tail_probs.copy_(torch.exp2(logits - lse[..., None]))
    return out
