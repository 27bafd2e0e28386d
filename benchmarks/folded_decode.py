"""Prototype (not yet in the fused path): decode attention over a KIVI cache with the scales folded into the matrix products.

KIVI-2/4 keys (codes grouped along tokens, G=32) and values (grouped along channels, G=32), read
in place; one query token per sequence; flash-decoding (grid (splits, b*h), online softmax in
exp2, a merge kernel); GQA folded into the rows of the dots. Per tile of 4 * G = 128 tokens
(d = 4 * G channels too), rows (x, r) = 4 groups x by 4 query heads r = the 16 rows the MMA pads
GQA=4 to anyway, so the folds below cost no tensor-core work:

- keys (idea 1): row (x, r) of the A operand is ``q_r * s[:, g0 + x] * qk_scale * 2^8``, B the raw
  codes of the tile: row (x, r) of the product holds head r's logits for the tokens of group x.
  The zero term ``q_r . z_g`` of every group of the split is one small dot before the token loop
  (scratch buffer, read back 16 floats a tile).
- the logit of (r, j) is picked from row (group(j), r) (a masked sum over x); the softmax runs on
  the 4 rows r (``row4``), p is spread back to the 16 rows.
- values (idea 2): row (x, r) of the second A operand is ``p_r * s[j, x] * 2^8``, B the raw codes;
  row (x, r) is kept for the channels of group x once per split. The zero term ``sum_j p_rj z_jx``
  is an elementwise accumulator, reduced once per split.
- unpack (idea 3): ``word & mask`` on a whole int32 gives two fp16 subnormals (code * 2^-24, times
  2^(bits*m) for the 'mask' unpack, one shift per byte; the factor is undone per logit column and
  per output channel). Codes p and p + 16/bits of a word share a register, so tile column 2p + h
  holds code p + h*16/bits: the token (keys, value rows) and channel (value columns) orders are
  permuted inside each word, consistently. No int->float converts, no per-element FMA.
- layouts (idea 4): the unpack is a join tree kept in registers (one LOP3 per two codes, then
  STS.128); it sits inside an ``if`` on a run-time condition that always holds, since otherwise
  Triton sees the join in the operand's history and picks kWidth=4 dot operands, which cost a
  register move per operand register at every MMA (see ``_unpack_opaque``).

Findings (H100, b=8, t=128k, Llama-3-8B shapes): 961 us for KIVI-2 and 1001 us for KIVI-4, vs
1794 / 2365 us for the current kernel and 1490 us for fp16 SDPA. The token loop is ~800 SASS
instructions per warp per 128 tokens (2180 for the current kernel), 168-184 registers, no spills.
ncu: L1/shared-memory throughput 90% (DRAM 21%): the bound is now the shared-memory round trip
of the unpacked 128x128 fp16 tiles (STS + LDSM, 32 KB each way per operand per tile), the two
A operands and the small layout conversions, not arithmetic: unpack variant, bits, L2 prefetch and
occupancy (maxnreg=128) do not move the time.

Run::

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python benchmarks/folded_decode.py --check
    python benchmarks/folded_decode.py [--variants [NAME ...]] [--splits N ...] [--shapes BxT ...]
    python benchmarks/folded_decode.py --asm [--variants]   # sm_90 regs/SASS, no GPU
    ncu --kernel-name regex:fold_split --launch-skip 2 --launch-count 1 python benchmarks/folded_decode.py --profile

Token counts must be whole multiples of the split; fp16 only; d = 128, G = 32, bits 2 or 4, GQA 4.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
import triton
import triton.language as tl

from headq_kernels.triton_decode import _merge_kernel  # the same split layout: (b*h, splits, g, d) and (m, l)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))

LOG2E = 1.4426950408889634
NX = 4  # key groups per tile = value channel groups per head (d = NX * G)

# UNPACK modes
I2F = 0  # shift, mask, int -> fp16 convert (what the current kernel does), codes exact
SHIFT = 1  # shift + mask per pair of codes on the int32, read as two fp16 subnormals
MASK = 2  # mask only where the code lies in the mantissa bits (factor 2^(bits*m)), one shift per byte


# --------------------------------------------------------------------------------------------
# unpacking


@triton.jit
def _halves(v):
    """int32 holding two fp16 bit patterns -> (low, high) as fp16 tensors of v's shape."""
    lo = v.to(tl.int16).to(tl.float16, bitcast=True)
    hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _pair(words, p: tl.constexpr, BITS: tl.constexpr, UNPACK: tl.constexpr):
    """int32 whose halves hold codes p and p + 16/BITS of each word, as fp16 subnormal bit patterns."""
    mask: tl.constexpr = ((1 << BITS) - 1) | (((1 << BITS) - 1) << 16)
    if UNPACK == 2:
        per_byte: tl.constexpr = 8 // BITS
        m: tl.constexpr = p % per_byte
        if p >= per_byte:
            v = (words >> 8) & (mask << (BITS * m))
        else:
            v = words & (mask << (BITS * m))
    else:
        v = (words >> (BITS * p)) & mask
    return v


@triton.jit
def _unpack_fp16(words, BITS: tl.constexpr, UNPACK: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """(R, C // (32 // BITS)) int32 words -> (R, C) fp16 codes; position 2p + h of a word holds
    code p + h * 16/BITS (see :func:`position_to_code`), so that each int32 is one register pair.

    SHIFT: value code * 2^-24; MASK: code * 2^(BITS * m) * 2^-24 (see :func:`_code_unit`).
    """
    if BITS == 2:
        e = tl.join(
            tl.join(_pair(words, 0, BITS, UNPACK), _pair(words, 4, BITS, UNPACK)),
            tl.join(_pair(words, 2, BITS, UNPACK), _pair(words, 6, BITS, UNPACK)),
        )
        o = tl.join(
            tl.join(_pair(words, 1, BITS, UNPACK), _pair(words, 5, BITS, UNPACK)),
            tl.join(_pair(words, 3, BITS, UNPACK), _pair(words, 7, BITS, UNPACK)),
        )
        v = tl.join(e, o)  # (R, W, p2, p1, p0) int32
    else:
        tl.static_assert(BITS == 4)
        v = tl.join(
            tl.join(_pair(words, 0, BITS, UNPACK), _pair(words, 2, BITS, UNPACK)),
            tl.join(_pair(words, 1, BITS, UNPACK), _pair(words, 3, BITS, UNPACK)),
        )  # (R, W, p1, p0)
    lo, hi = _halves(v)
    return tl.reshape(tl.join(lo, hi), (R, C))


@triton.jit
def _unpack_i2f(words, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """The current kernel's unpack: codes as exact fp16 integers through an int -> float convert."""
    per_word: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, per_word) * BITS
    lanes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(lanes.to(tl.float16), (R, C))


@triton.jit
def _unpack(words, BITS: tl.constexpr, UNPACK: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    if UNPACK == 0:
        return _unpack_i2f(words, BITS, R, C)
    else:
        return _unpack_fp16(words, BITS, UNPACK, R, C)


@triton.jit
def _unpack_opaque(words, live, BITS: tl.constexpr, UNPACK: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """_unpack inside an ``if`` on a run-time condition that always holds (live). The compiler
    picks the register layout of a dot operand (kWidth) from the ops that compute it; it sees no
    further than the if, and so does not take the join tree for an unpack of packed data and pick
    kWidth=4, which costs a register move per operand register at every MMA."""
    if live:
        x = _unpack(words, BITS, UNPACK, R, C)
    else:  # the same: LLVM merges the branches again
        x = _unpack(words, BITS, UNPACK, R, C)
    return x


@triton.jit
def _code_unit(idx, BITS: tl.constexpr, UNPACK: tl.constexpr):
    """What a code of value 1 at position idx (index along the packed axis) reads as, float32."""
    if UNPACK == 0:
        return tl.full(idx.shape, 1.0, tl.float32)
    else:
        unit = tl.full(idx.shape, 5.9604644775390625e-08, tl.float32)  # 2^-24
        if UNPACK == 2:
            per_byte: tl.constexpr = 8 // BITS
            m = ((idx % (32 // BITS)) // 2) % per_byte
            one = tl.full(idx.shape, 1, tl.int32)
            unit = unit * (one << (BITS * m)).to(tl.float32)
        return unit


@triton.jit
def _code_of(idx, BITS: tl.constexpr, UNPACK: tl.constexpr):
    """Index along the packed axis of the code at position idx of an unpacked tile."""
    if UNPACK == 0:
        return idx
    else:
        per_word: tl.constexpr = 32 // BITS
        pos = idx % per_word
        return idx - pos + pos // 2 + (pos % 2) * (per_word // 2)


@triton.jit
def _spread_rows(x, NXc: tl.constexpr, GQA: tl.constexpr, N: tl.constexpr):
    """(NXc, N) -> (NXc * GQA, N): row (x, r) = x's row."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], (NXc, GQA, N)), (NXc * GQA, N))


@triton.jit
def _spread_heads(x, NXc: tl.constexpr, GQA: tl.constexpr, N: tl.constexpr):
    """(GQA, N) -> (NXc * GQA, N): row (x, r) = r's row."""
    return tl.reshape(tl.broadcast_to(x[None, :, :], (NXc, GQA, N)), (NXc * GQA, N))


@triton.jit
def _pick_rows(x, keep, NXc: tl.constexpr, GQA: tl.constexpr, N: tl.constexpr):
    """(NXc * GQA, N), keep mask -> (GQA, N): sum over x of the kept entries."""
    return tl.sum(tl.reshape(tl.where(keep, x, 0.0), (NXc, GQA, N)), axis=0)


# --------------------------------------------------------------------------------------------
# the split kernel


@triton.jit
def _v_operand(
    vs,
    vz,
    vw,
    tok,
    live,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    GROUP: tl.constexpr,
    V_BITS: tl.constexpr,
    UNPACK: tl.constexpr,
    FOLD_V: tl.constexpr,
):
    """The B operand of the value dot, rows = tokens tok: raw codes (folded) or dequantized fp16."""
    NXc: tl.constexpr = D // GROUP
    if FOLD_V:
        return _unpack_opaque(vw, live, V_BITS, UNPACK, BLOCK_N, D)
    else:
        if UNPACK == 0:
            codes = _unpack_i2f(vw, V_BITS, BLOCK_N, D)
        else:
            codes = _magic_codes(vw, V_BITS, BLOCK_N, D)
        xs = tl.arange(0, NXc)
        vst = tl.load(vs + tok[:, None].to(tl.int64) * NXc + xs[None, :])  # (BLOCK_N, NX)
        vzt = tl.load(vz + tok[:, None].to(tl.int64) * NXc + xs[None, :])
        return tl.reshape(
            tl.reshape(codes, (BLOCK_N, NXc, GROUP)) * vst[:, :, None] + vzt[:, :, None], (BLOCK_N, D)
        )


@triton.jit
def _prefetch_rows(ptrs, NBYTES: tl.constexpr):
    """L2 prefetch of NBYTES (a multiple of 16, 16-byte aligned) at each pointer (sm_90, not in
    the interpreter). The key codes are rows of t*bits/32 words per channel: a tile reads 32 bytes
    of each of 128 rows far apart, which DRAM serves poorly; a prefetch takes many tiles at once."""
    tl.static_assert((NBYTES & (NBYTES - 1)) == 0 and NBYTES >= 32 and NBYTES <= 1024)
    if NBYTES == 32:
        asm: tl.constexpr = "cp.async.bulk.prefetch.L2.global [$1], 32; mov.u32 $0, 0;"
    elif NBYTES == 64:
        asm: tl.constexpr = "cp.async.bulk.prefetch.L2.global [$1], 64; mov.u32 $0, 0;"
    elif NBYTES == 128:
        asm: tl.constexpr = "cp.async.bulk.prefetch.L2.global [$1], 128; mov.u32 $0, 0;"
    elif NBYTES == 256:
        asm: tl.constexpr = "cp.async.bulk.prefetch.L2.global [$1], 256; mov.u32 $0, 0;"
    elif NBYTES == 512:
        asm: tl.constexpr = "cp.async.bulk.prefetch.L2.global [$1], 512; mov.u32 $0, 0;"
    elif NBYTES == 1024:
        asm: tl.constexpr = "cp.async.bulk.prefetch.L2.global [$1], 1024; mov.u32 $0, 0;"
    tl.inline_asm_elementwise(asm, "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _half_loop(
    kc,
    ks,
    vc,
    vs,
    vz,
    scratch,
    q4sT,
    k_words,
    n_groups,
    n_tokens,
    n_splits,
    split,
    GQA: tl.constexpr,
    D: tl.constexpr,
    GROUP: tl.constexpr,
    SPLIT: tl.constexpr,
    NGB: tl.constexpr,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    UNPACK: tl.constexpr,
    A_EXP: tl.constexpr,
):
    """The token loop with each 128-token tile cut into two halves of 64 tokens for the matrix
    products (two key dots sharing the A operand, one softmax, two value dots), so that an
    unpacked B operand held in registers is half as large."""
    NXc: tl.constexpr = D // GROUP
    ROWS: tl.constexpr = NXc * GQA
    BLOCK_N: tl.constexpr = NXc * GROUP
    HN: tl.constexpr = BLOCK_N // 2
    N_TILES: tl.constexpr = SPLIT // BLOCK_N
    K_PW: tl.constexpr = 32 // K_BITS
    V_W: tl.constexpr = D // (32 // V_BITS)
    rows = tl.arange(0, ROWS)
    rx = rows // GQA
    c = tl.arange(0, D)
    nh = tl.arange(0, HN)
    xs = tl.arange(0, NXc)
    kwi = tl.arange(0, HN // K_PW)
    vwi = tl.arange(0, V_W)
    k_col = 1.0 / (_code_unit(nh, K_BITS, UNPACK) * (1 << A_EXP))
    keep_a = rx[:, None] == (nh // GROUP)[None, :]
    keep_b = rx[:, None] == ((HN + nh) // GROUP)[None, :]
    v_tok = _code_of(nh, K_BITS, UNPACK)
    live_ka = n_tokens > 0
    live_kb = n_tokens > -1
    live_va = n_splits > 0
    live_vb = n_splits > -1
    m_i = tl.full((GQA,), float("-inf"), tl.float32)
    l_acc = tl.zeros((GQA, HN), tl.float32)
    z_acc = tl.zeros((ROWS, HN), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    t_first = split * SPLIT
    ks4 = tl.load(ks + c[:, None] * n_groups + tl.multiple_of(t_first // GROUP, NXc) + xs[None, :])
    vga = (t_first + v_tok)[None, :].to(tl.int64) * NXc + xs[:, None]  # (NX, HN)
    vs_a = tl.load(vs + vga)
    vz_a = tl.load(vz + vga)
    vs_b = tl.load(vs + vga + HN * NXc)
    vz_b = tl.load(vz + vga + HN * NXc)
    for i in range(0, N_TILES):
        t0 = tl.multiple_of(t_first + i * BLOCK_N, BLOCK_N)
        tn = tl.multiple_of(t_first + tl.minimum(i + 1, N_TILES - 1) * BLOCK_N, BLOCK_N)
        ks4_next = tl.load(ks + c[:, None] * n_groups + tl.multiple_of(tn // GROUP, NXc) + xs[None, :])
        vgn = (tn + v_tok)[None, :].to(tl.int64) * NXc + xs[:, None]
        vs_a_next = tl.load(vs + vgn)
        vz_a_next = tl.load(vz + vgn)
        vs_b_next = tl.load(vs + vgn + HN * NXc)
        vz_b_next = tl.load(vz + vgn + HN * NXc)
        kw_a = tl.load(kc + c[:, None] * k_words + (t0 // K_PW + kwi)[None, :])
        kw_b = tl.load(kc + c[:, None] * k_words + (t0 // K_PW + HN // K_PW + kwi)[None, :])
        vw_a = tl.load(vc + (t0 + v_tok)[:, None].to(tl.int64) * V_W + vwi[None, :])
        vw_b = tl.load(vc + (t0 + HN + v_tok)[:, None].to(tl.int64) * V_W + vwi[None, :])

        qs = tl.trans(tl.reshape(ks4.to(tl.float32)[:, :, None] * q4sT[:, None, :], (D, ROWS))).to(tl.float16)
        bias = tl.load(scratch + rows * NGB + i * NXc + rx)
        kt = _unpack_opaque(kw_a, live_ka, K_BITS, UNPACK, D, HN)
        s = tl.dot(qs, kt) * k_col[None, :] + bias[:, None]
        la = _pick_rows(s, keep_a, NXc, GQA, HN)
        kt = _unpack_opaque(kw_b, live_kb, K_BITS, UNPACK, D, HN)
        s = tl.dot(qs, kt) * k_col[None, :] + bias[:, None]
        lb = _pick_rows(s, keep_b, NXc, GQA, HN)
        m_new = tl.maximum(m_i, tl.max(tl.maximum(la, lb), axis=1))
        pa = tl.exp2(la - m_new[:, None])
        pb = tl.exp2(lb - m_new[:, None])
        alpha4 = tl.exp2(m_i - m_new)
        l_acc = l_acc * alpha4[:, None] + (pa + pb)
        alpha = tl.reshape(tl.broadcast_to(alpha4[None, :], (NXc, GQA)), (ROWS,))
        m_i = m_new
        pa = _spread_heads(pa, NXc, GQA, HN)
        pb = _spread_heads(pb, NXc, GQA, HN)
        z_acc = z_acc * alpha[:, None] + pa * _spread_rows(vz_a.to(tl.float32), NXc, GQA, HN)
        z_acc += pb * _spread_rows(vz_b.to(tl.float32), NXc, GQA, HN)
        vt = _unpack_opaque(vw_a, live_va, V_BITS, UNPACK, HN, D)
        pv = (pa * _spread_rows(vs_a.to(tl.float32) * (1 << A_EXP), NXc, GQA, HN)).to(tl.float16)
        acc = tl.dot(pv, vt, acc * alpha[:, None])
        vt = _unpack_opaque(vw_b, live_vb, V_BITS, UNPACK, HN, D)
        pv = (pb * _spread_rows(vs_b.to(tl.float32) * (1 << A_EXP), NXc, GQA, HN)).to(tl.float16)
        acc = tl.dot(pv, vt, acc)
        ks4 = ks4_next
        vs_a = vs_a_next
        vz_a = vz_a_next
        vs_b = vs_b_next
        vz_b = vz_b_next
    return m_i, l_acc, z_acc, acc


@triton.jit
def _fold_split_kernel(
    q_ptr,
    kc_ptr,
    ks_ptr,
    kz_ptr,
    vc_ptr,
    vs_ptr,
    vz_ptr,
    zb_ptr,
    o_ptr,
    ml_ptr,
    n_tokens,
    n_splits,
    qk_scale,
    GQA: tl.constexpr,
    D: tl.constexpr,
    GROUP: tl.constexpr,
    SPLIT: tl.constexpr,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    UNPACK: tl.constexpr,
    FOLD_V: tl.constexpr,
    A_EXP: tl.constexpr,
    ROW4: tl.constexpr,
    HALF: tl.constexpr,
    L2PF: tl.constexpr,
):
    NXc: tl.constexpr = D // GROUP
    ROWS: tl.constexpr = NXc * GQA
    BLOCK_N: tl.constexpr = NXc * GROUP
    N_TILES: tl.constexpr = SPLIT // BLOCK_N
    NGS: tl.constexpr = SPLIT // GROUP  # key groups in the split
    NGB: tl.constexpr = 16 if NGS < 16 else NGS  # at least 16 columns for the bias dot
    K_PW: tl.constexpr = 32 // K_BITS
    V_PW: tl.constexpr = 32 // V_BITS
    V_W: tl.constexpr = D // V_PW
    tl.static_assert(NXc == 4)
    tl.static_assert(SPLIT % BLOCK_N == 0)

    split = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    k_words = n_tokens // K_PW
    n_groups = n_tokens // GROUP
    kc = kc_ptr + bh * D * k_words
    ks = ks_ptr + bh * D * n_groups
    kz = kz_ptr + bh * D * n_groups
    vc = vc_ptr + bh * n_tokens * V_W
    vs = vs_ptr + bh * n_tokens * NXc
    vz = vz_ptr + bh * n_tokens * NXc

    rows = tl.arange(0, ROWS)
    rx = rows // GQA  # key group (keys) / channel group (values) of the row
    rr = rows % GQA  # query head of the row
    c = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    kwi = tl.arange(0, BLOCK_N // K_PW)
    vwi = tl.arange(0, V_W)
    q16 = tl.load(q_ptr + (bh * GQA + rr[:, None]) * D + c[None, :])  # (ROWS, D) fp16, r repeated over x
    q4 = tl.load(q_ptr + (bh * GQA + tl.arange(0, GQA)[:, None]) * D + c[None, :]).to(tl.float32)
    q4sT = tl.trans(q4 * (qk_scale * (1 << A_EXP)))  # (D, GQA)

    # The zero term of the keys, q_r . z_g * qk_scale, for every group g of the split: a few dots
    # before the token loop, kept in a scratch buffer (L2) and read back one tile at a time.
    ZB: tl.constexpr = 32 if NGB > 32 else NGB
    scratch = zb_ptr + (bh * n_splits + split) * (ROWS * NGB)
    for j in tl.static_range(NGB // ZB):
        gb = j * ZB + tl.arange(0, ZB)
        kz_part = tl.load(
            kz + c[:, None] * n_groups + split * NGS + gb[None, :], mask=gb[None, :] < NGS, other=0.0
        )
        zbias = tl.dot(q16, kz_part) * qk_scale  # (ROWS, ZB) fp32
        tl.store(scratch + rows[:, None] * NGB + gb[None, :], zbias)
    tl.debug_barrier()

    # Column factors: logits = dot * k_col + bias; out = acc * v_col (+ zero term).
    k_col = 1.0 / (_code_unit(n, K_BITS, UNPACK) * (1 << A_EXP))
    keep_k = rx[:, None] == (n // GROUP)[None, :]  # row (x, r) holds the logits of group x
    v_tok = _code_of(n, K_BITS, UNPACK)  # token of each row of the value tile (the key tile's order)

    if HALF:
        tl.static_assert(FOLD_V and ROW4)
        m_i, l_acc, z_acc, acc = _half_loop(
            kc, ks, vc, vs, vz, scratch, q4sT, k_words, n_groups, n_tokens, n_splits, split,
            GQA, D, GROUP, SPLIT, NGB, K_BITS, V_BITS, UNPACK, A_EXP,
        )  # fmt: skip
    else:
        MR: tl.constexpr = GQA if ROW4 else ROWS  # rows of the softmax state
        m_i = tl.full((MR,), float("-inf"), tl.float32)
        l_acc = tl.zeros((MR, BLOCK_N), tl.float32)
        z_acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
        acc = tl.zeros((ROWS, D), tl.float32)
        xs = tl.arange(0, NXc)
        # two run-time conditions that always hold (see _unpack_opaque); two, so that the compiler
        # does not merge the two ifs and keep both unpacked tiles alive at once
        live_k = n_tokens > 0
        live_v = n_splits > 0
        t_first = split * SPLIT
        # the scales of a tile are loaded one tile ahead
        ks4 = tl.load(
            ks + c[:, None] * n_groups + tl.multiple_of(t_first // GROUP, NXc) + xs[None, :]
        )  # (D, NX)
        vgi = (t_first + v_tok)[None, :].to(tl.int64) * NXc + xs[:, None]  # (NX, BLOCK_N)
        vs4 = tl.load(vs + vgi)
        vz4 = tl.load(vz + vgi)
        PF0: tl.constexpr = L2PF if L2PF < N_TILES else N_TILES  # never past the split
        if L2PF > 0 and N_TILES >= 4:  # the key codes and scales of the first tiles, row by row, into L2
            _prefetch_rows(kc + c * k_words + t_first // K_PW, PF0 * (BLOCK_N // K_PW) * 4)
            _prefetch_rows(ks + c * n_groups + t_first // GROUP, PF0 * NXc * 2)
        for i in range(0, N_TILES):
            t0 = tl.multiple_of(t_first + i * BLOCK_N, BLOCK_N)
            if L2PF > 0 and N_TILES >= 4:
                if (i % PF0 == 0) & (i + 2 * PF0 <= N_TILES):  # the next PF0 tiles' worth
                    ta = t0 + PF0 * BLOCK_N
                    _prefetch_rows(kc + c * k_words + ta // K_PW, PF0 * (BLOCK_N // K_PW) * 4)
                    _prefetch_rows(ks + c * n_groups + ta // GROUP, PF0 * NXc * 2)
            tn = tl.multiple_of(t_first + tl.minimum(i + 1, N_TILES - 1) * BLOCK_N, BLOCK_N)
            ks4_next = tl.load(ks + c[:, None] * n_groups + tl.multiple_of(tn // GROUP, NXc) + xs[None, :])
            if FOLD_V:
                vgi = (tn + v_tok)[None, :].to(tl.int64) * NXc + xs[:, None]
                vs4_next = tl.load(vs + vgi)
                vz4_next = tl.load(vz + vgi)
            else:
                vs4_next = vs4
                vz4_next = vz4
            kw = tl.load(kc + c[:, None] * k_words + (t0 // K_PW + kwi)[None, :])
            vw = tl.load(vc + (t0 + v_tok)[:, None].to(tl.int64) * V_W + vwi[None, :])

            # keys: A row (x, r) = q_r * s_x * qk_scale * 2^A_EXP, B = raw codes
            kt = _unpack_opaque(kw, live_k, K_BITS, UNPACK, D, BLOCK_N)
            qs = tl.trans(tl.reshape(ks4.to(tl.float32)[:, :, None] * q4sT[:, None, :], (D, ROWS)))
            s = tl.dot(qs.to(tl.float16), kt)
            bias = tl.load(scratch + rows * NGB + i * NXc + rx)
            s = s * k_col[None, :] + bias[:, None]
            logits = _pick_rows(s, keep_k, NXc, GQA, BLOCK_N)  # (GQA, BLOCK_N)
            if ROW4:  # softmax on the 4 rows, then spread
                m_new = tl.maximum(m_i, tl.max(logits, axis=1))
                p4 = tl.exp2(logits - m_new[:, None])
                alpha4 = tl.exp2(m_i - m_new)
                l_acc = l_acc * alpha4[:, None] + p4
                p = _spread_heads(p4, NXc, GQA, BLOCK_N)
                alpha = tl.reshape(tl.broadcast_to(alpha4[None, :], (NXc, GQA)), (ROWS,))
            else:  # softmax on the 16 rows (each r four times)
                s = _spread_heads(logits, NXc, GQA, BLOCK_N)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                p = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_acc = l_acc * alpha[:, None] + p
            m_i = m_new

            # values
            vt = _v_operand(vs, vz, vw, t0 + v_tok, live_v, BLOCK_N, D, GROUP, V_BITS, UNPACK, FOLD_V)
            if FOLD_V:  # A row (x, r) = p_r * s_x * 2^A_EXP, B = raw codes; zero term on the side
                vs16 = _spread_rows(vs4.to(tl.float32) * (1 << A_EXP), NXc, GQA, BLOCK_N)
                vz16 = _spread_rows(vz4.to(tl.float32), NXc, GQA, BLOCK_N)
                z_acc = z_acc * alpha[:, None] + p * vz16
                acc = tl.dot((p * vs16).to(tl.float16), vt, acc * alpha[:, None])
            else:
                acc = tl.dot(p.to(tl.float16), vt, acc * alpha[:, None])
            ks4 = ks4_next
            vs4 = vs4_next
            vz4 = vz4_next

    l_row = tl.sum(l_acc, axis=1)  # (MR,), the same for the 4 rows of r
    if FOLD_V:
        v_col = 1.0 / (_code_unit(c, V_BITS, UNPACK) * (1 << A_EXP))
        out16 = acc * v_col[None, :] + tl.sum(z_acc, axis=1)[:, None]
        keep_v = rx[:, None] == (c // GROUP)[None, :]
        ch = _code_of(c, V_BITS, UNPACK)  # channel of each column
    else:
        out16 = acc
        keep_v = (rx == 0)[:, None] & (c >= 0)[None, :]
        ch = c
    out = _pick_rows(out16, keep_v, NXc, GQA, D)  # (GQA, D)
    first = rx == 0
    if ROW4:
        m4 = m_i
        l4 = l_row
    else:
        m4 = tl.sum(tl.reshape(tl.where(first, m_i, 0.0), (NXc, GQA)), axis=0)
        l4 = tl.sum(tl.reshape(tl.where(first, l_row, 0.0), (NXc, GQA)), axis=0)
    r = tl.arange(0, GQA)
    row_out = (bh * n_splits + split) * GQA + r
    tl.store(o_ptr + row_out[:, None] * D + ch[None, :], out)
    tl.store(ml_ptr + row_out * 2, m4)
    tl.store(ml_ptr + row_out * 2 + 1, l4)


@triton.jit
def _magic_codes(words, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """Codes as exact fp16 integers without int->float: (0x6400 | code) is 1024 + code."""
    per_word: tl.constexpr = 32 // BITS
    mask: tl.constexpr = ((1 << BITS) - 1) | (((1 << BITS) - 1) << 16)
    shifts = tl.arange(0, per_word // 2) * BITS
    v = ((words[:, :, None] >> shifts[None, None, :]) & mask) | 0x64006400
    lo, hi = _halves(v)
    x = tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), (R, C))
    return x - 1024.0


# --------------------------------------------------------------------------------------------
# host side

VARIANTS: dict[str, dict[str, Any]] = {
    # name: kernel options and launch; H100 timings (b=8, t=128k, KIVI-2 / KIVI-4) from the first runs
    "fold-kv/mask": {"unpack": MASK, "fold_v": True},  # 961 / 1001 us: the default
    "fold-kv/shift": {"unpack": SHIFT, "fold_v": True},  # 968 us: the unpack is not the bound any more
    "fold-kv/i2f": {"unpack": I2F, "fold_v": True},  # idea 1+2 alone, int->float unpack (spills)
    "fold-k/shift+magic-v": {"unpack": SHIFT, "fold_v": False},  # 1233 us: keys folded, values dequantized
    "fold-k/i2f": {"unpack": I2F, "fold_v": False},  # idea 1 alone
    "fold-kv/mask/rows16": {"unpack": MASK, "fold_v": True, "row4": False},  # 1048 us: softmax on 16 rows
    "fold-kv/mask/half": {"unpack": MASK, "fold_v": True, "half": True},  # 954 / 952 us: 64-token dots
    "fold-kv/mask/w8": {"unpack": MASK, "fold_v": True, "num_warps": 8},  # 1381 us
    "fold-kv/mask/r128": {"unpack": MASK, "fold_v": True, "maxnreg": 128},  # 988 us: 2x occupancy, no gain
    "fold-kv/mask/s3": {"unpack": MASK, "fold_v": True, "num_stages": 3},  # 1003 us
    "fold-kv/mask/pf8": {"unpack": MASK, "fold_v": True, "l2pf": 8},  # 961 / 1076 us: L2 prefetch, no gain
}
DEFAULT = "fold-kv/mask"
last_compiled: list[Any] = []


def default_split(tokens: int, batch_heads: int, block: int = 128, lo: int = 512, hi: int = 4096) -> int:
    """Splits so that the programs fill 132 SMs about 8 times over; a power of two dividing tokens."""
    want = max(1, tokens * batch_heads // (132 * 8))
    split = min(hi, max(lo, 1 << (want - 1).bit_length()))
    while split > block and tokens % split:
        split //= 2
    return split


def fold_attend(
    q: torch.Tensor,
    keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    values: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    k_bits: int,
    v_bits: int,
    group: int = 32,
    scale: float | None = None,
    split: int | None = None,
    unpack: int = MASK,
    fold_v: bool = True,
    num_warps: int = 4,
    num_stages: int = 2,
    maxnreg: int | None = None,
    a_exp: int = 8,
    row4: bool = True,
    half: bool = False,
    l2pf: int = 0,
    work: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q (b, hkv, gqa, d) fp16; keys = KIVI codes/scale/zero grouped along tokens (b, hkv, d, ...),
    values grouped along channels (b, hkv, t, ...). Returns (b, hkv, gqa, d) fp16."""
    b, hkv, gqa, d = q.shape
    kc, ks, kz = keys
    vc, vs, vz = values
    t = vc.shape[2]
    assert d == NX * group and gqa * NX >= 16 and q.dtype == torch.float16
    assert all(x.is_contiguous() for x in (q, kc, ks, kz, vc, vs, vz))
    split = split or default_split(t, b * hkv)
    assert t % split == 0 and split % (NX * group) == 0, (t, split)
    n_splits = t // split
    scale = d**-0.5 if scale is None else scale
    rows, ngb = NX * gqa, max(16, split // group)
    work = {} if work is None else work
    key = (b * hkv, n_splits, gqa, d, rows * ngb)
    if work.get("key") != key:
        work.clear()
        work["key"] = key  # type: ignore[assignment]
        work["zb"] = torch.empty((b * hkv, n_splits, rows * ngb), dtype=torch.float32, device=q.device)
        work["parts"] = torch.empty((b * hkv, n_splits, gqa, d), dtype=torch.float32, device=q.device)
        work["ml"] = torch.empty((b * hkv, n_splits, gqa, 2), dtype=torch.float32, device=q.device)
    compiled = _fold_split_kernel[(n_splits, b * hkv)](
        q, kc, ks, kz, vc, vs, vz, work["zb"], work["parts"], work["ml"], t, n_splits, scale * LOG2E,
        GQA=gqa, D=d, GROUP=group, SPLIT=split, K_BITS=k_bits, V_BITS=v_bits, UNPACK=unpack, FOLD_V=fold_v,
        A_EXP=a_exp, ROW4=row4, HALF=half, L2PF=l2pf, num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )  # fmt: skip
    last_compiled[:] = [compiled]
    out = torch.empty_like(q)
    block_s = min(64, max(2, triton.next_power_of_2(n_splits)))
    _merge_kernel[(b * hkv * gqa,)](
        work["parts"],
        work["ml"],
        out,
        work["ml"],
        n_splits,
        G=gqa,
        D=d,
        BLOCK_S=block_s,
        LSE=False,
        num_warps=4,
    )
    return out


def make_cache(
    b: int, hkv: int, t: int, d: int, k_bits: int, v_bits: int, group: int, device: str, seed: int = 0
):
    """Random fp16 k, v (b, hkv, t, d) and their KIVI records (keys grouped along tokens)."""
    from headq_kernels import quantize_affine

    gen = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn((b, hkv, t, d), generator=gen, device=device, dtype=torch.float16)
    v = torch.randn((b, hkv, t, d), generator=gen, device=device, dtype=torch.float16)
    # a few outlier key channels, as real keys have
    k[..., :4] *= 8
    keys = quantize_affine(k.transpose(-1, -2), k_bits, group)
    values = quantize_affine(v, v_bits, group)
    return k, v, tuple(x.contiguous() for x in keys), tuple(x.contiguous() for x in values)


def reference(q, keys, values, k_bits, v_bits, group, scale=None) -> torch.Tensor:
    from headq_kernels import dequantize_affine

    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    k = dequantize_affine(*keys, k_bits, group).transpose(-1, -2).float()  # (b, h, t, d)
    v = dequantize_affine(*values, v_bits, group).float()
    logits = (q.float() @ k.transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1) @ v


# --------------------------------------------------------------------------------------------
# CPU check (Triton interpreter)


def check(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    b, hkv, gqa, d, group = 2, 2, 4, 128, 32
    worst = 0.0
    cases = [
        (2, 2, 512, 256, MASK, True),
        (4, 4, 512, 256, MASK, True),
        (2, 2, 512, 256, SHIFT, True),
        (4, 4, 256, 128, SHIFT, True),
        (2, 4, 256, 128, I2F, True),
        (2, 2, 256, 128, SHIFT, False),
        (4, 4, 256, 128, I2F, False),
        (2, 2, 384, 128, MASK, True),
    ]
    runs = [(*case, True, False) for case in cases] + [(*cases[-1], False, False)]
    runs += [(*cases[0], True, True), (*cases[1], True, True), (*cases[3], True, True)]
    if args.quick:
        runs = runs[:1]
    for k_bits, v_bits, t, split, unpack, fold_v, row4, half in runs:
        _, _, keys, values = make_cache(b, hkv, t, d, k_bits, v_bits, group, "cpu", seed=t + k_bits)
        q = (torch.randn((b, hkv, gqa, d)) * 1.5).half()
        ref = reference(q, keys, values, k_bits, v_bits, group)
        t0 = time.time()
        got = fold_attend(q, keys, values, k_bits=k_bits, v_bits=v_bits, group=group, split=split,
                          unpack=unpack, fold_v=fold_v, row4=row4, half=half).float()  # fmt: skip
        err = float((got - ref).norm() / ref.norm())
        worst = max(worst, err)
        name = {I2F: "i2f", SHIFT: "shift", MASK: "mask"}[unpack]
        print(f"bits K{k_bits}/V{v_bits} t={t} split={split} unpack={name} fold_v={fold_v} row4={row4} half={half}: "
              f"rel err {err:.2e} ({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
    print(f"worst rel err {worst:.2e} ({'PASS' if worst < 4e-3 else 'FAIL'}, tolerance 4e-3)")
    if worst >= 4e-3:
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# GPU benchmark


def bench(fn: Any) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def current_kernel(keys, values, b, hkv, t, k_bits, v_bits, group):
    """A plan over one AffineTokens / AffineChannels segment and the repo's attend (block_n=128)."""
    from headq_kernels import decode_plan, triton_decode

    k_seg = decode_plan.AffineTokens(codes=keys[0], scale=keys[1], zero=keys[2], tokens=t)
    v_seg = decode_plan.AffineChannels(codes=values[0], scale=values[1], zero=values[2], tokens=t)
    plan = decode_plan.plan(
        [k_seg], [v_seg], batch_heads=b * hkv, key_bits=k_bits, key_group=group, value_bits=v_bits,
        value_group=group, block_n=128,
    )  # fmt: skip
    return lambda q: triton_decode.attend(q, plan, scale=q.shape[-1] ** -0.5)


def report(compiled: Any) -> str:
    try:
        ttgir = compiled.asm.get("ttgir", "")
        return (f"regs {compiled.n_regs} spills {compiled.n_spills} smem {compiled.metadata.shared} "
                f"convert_layout {ttgir.count('convert_layout')}")  # fmt: skip
    except Exception as err:  # pragma: no cover
        return f"(no report: {err})"


def gpu(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    hkv, gqa, d, group = 8, 4, 128, 32
    names = [DEFAULT] if args.variants is None else (args.variants or list(VARIANTS))
    shapes = (
        [(8, 131072), (1, 32768)] if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes]
    )
    rows = []
    for b, t in shapes:
        q = torch.randn((b, hkv, gqa, d), device="cuda", dtype=torch.float16)
        # fp16 SDPA over a cache of the same shape (GQA folded into the query rows)
        k = torch.randn((b, hkv, t, d), device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        t_sdpa = bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        del k, v
        for bits in args.bits:
            torch.cuda.empty_cache()
            _, _, keys, values = make_cache(b, hkv, t, d, bits, bits, group, "cuda")
            nbytes = sum(x.numel() * x.element_size() for x in (*keys, *values))
            ref = reference(
                q[:1], tuple(x[:1] for x in keys), tuple(x[:1] for x in values), bits, bits, group
            )
            line = {"b": b, "t": t, "bits": bits, "sdpa_us": 1e3 * t_sdpa, "bytes": nbytes}
            try:
                cur = current_kernel(keys, values, b, hkv, t, bits, bits, group)
                got = cur(q)
                line["current_err"] = float((got[:1].float() - ref).norm() / ref.norm())
                line["current_us"] = 1e3 * bench(lambda cur=cur, q=q: cur(q))
            except Exception as err:
                print(f"current kernel failed: {type(err).__name__}: {err}", flush=True)
                line["current_us"] = float("nan")
            print(f"\nb={b} t={t} KIVI-{bits}: cache {nbytes / 1e9:.3f} GB; fp16 SDPA {line['sdpa_us']:.0f} us; "
                  f"current attend {line['current_us']:.0f} us ({line['sdpa_us'] / line['current_us']:.2f}x SDPA, "
                  f"err {line.get('current_err', float('nan')):.1e})", flush=True)  # fmt: skip
            for name in names:
                opts = dict(VARIANTS[name])
                unpack, fold_v = opts.pop("unpack"), opts.pop("fold_v")
                work: dict[str, torch.Tensor] = {}
                for split in args.splits or [None]:
                    kw = dict(k_bits=bits, v_bits=bits, group=group, unpack=unpack, fold_v=fold_v, work=work,
                              split=split, **opts)  # fmt: skip
                    try:
                        got = fold_attend(q, keys, values, **kw)
                        err = float((got[:1].float() - ref).norm() / ref.norm())
                        us = 1e3 * bench(lambda kw=kw, q=q, ks=keys, vs=values: fold_attend(q, ks, vs, **kw))
                    except Exception as e:
                        print(f"  {name:24s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    sp = split or default_split(t, b * hkv)
                    bw = nbytes / (us * 1e-6) / 1e12
                    print(f"  {name:24s} split {sp:5d}: {us:7.0f} us  {line['sdpa_us'] / us:5.2f}x SDPA  "
                          f"{line['current_us'] / us:5.2f}x current  {bw:5.2f} TB/s read  err {err:.1e}  "
                          f"[{report(last_compiled[0])}]", flush=True)  # fmt: skip
                    rows.append({**line, "variant": name, "split": sp, "us": us, "err": err})
            del keys, values
    print("\n| b | t | bits | variant | split | us | vs SDPA | vs current | err |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['b']} | {r['t']} | {r['bits']} | {r['variant']} | {r['split']} | {r['us']:.0f} | "
              f"{r['sdpa_us'] / r['us']:.2f}x | {r['current_us'] / r['us']:.2f}x | {r['err']:.1e} |")  # fmt: skip


def profile(args: argparse.Namespace) -> None:
    """A few launches of one variant (the first of --variants, else the default) for ncu, e.g.
    ncu --kernel-name regex:fold_split --launch-skip 2 --launch-count 1 --section SpeedOfLight ..."""
    b, t = (8, 131072) if not args.shapes else tuple(map(int, args.shapes[0].split("x")))
    bits = args.bits[0]
    name = (args.variants or [DEFAULT])[0]
    opts = dict(VARIANTS[name])
    unpack, fold_v = opts.pop("unpack"), opts.pop("fold_v")
    _, _, keys, values = make_cache(b, 8, t, 128, bits, bits, 32, "cuda")
    q = torch.randn((b, 8, 4, 128), device="cuda", dtype=torch.float16)
    work: dict[str, torch.Tensor] = {}
    split = args.splits[0] if args.splits else None
    for _ in range(4):
        fold_attend(q, keys, values, k_bits=bits, v_bits=bits, unpack=unpack, fold_v=fold_v, work=work, split=split,
                    **opts)  # fmt: skip
    torch.cuda.synchronize()
    print(f"profiled {name} b={b} t={t} bits={bits}: {report(last_compiled[0])}")


# --------------------------------------------------------------------------------------------
# offline compile report (no GPU needed): sm_90 registers, spills, SASS of the token loop


def asm(args: argparse.Namespace) -> None:
    import collections
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sig = {k: "*fp16" for k in ("q_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "vc_ptr", "vs_ptr", "vz_ptr")}
    sig.update(kc_ptr="*i32", vc_ptr="*i32", zb_ptr="*fp32", o_ptr="*fp32", ml_ptr="*fp32")
    sig.update(n_tokens="i32", n_splits="i32", qk_scale="fp32")
    order = ["q_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "vc_ptr", "vs_ptr", "vz_ptr", "zb_ptr", "o_ptr", "ml_ptr",
             "n_tokens", "n_splits", "qk_scale"]  # fmt: skip
    names = [DEFAULT] if args.variants is None else (args.variants or list(VARIANTS))
    for bits in args.bits:
        for name in names:
            opts = VARIANTS[name]
            cst = dict(GQA=4, D=128, GROUP=32, SPLIT=args.asm_split, K_BITS=bits, V_BITS=bits,
                       UNPACK=opts["unpack"], FOLD_V=opts["fold_v"], A_EXP=8,
                       ROW4=opts.get("row4", True), HALF=opts.get("half", False), L2PF=opts.get("l2pf", 0))  # fmt: skip
            s = {k: sig[k] for k in order}
            s.update({k: "constexpr" for k in cst})
            try:
                c = triton.compile(
                    ASTSource(_fold_split_kernel, s, cst), target=GPUTarget("cuda", 90, 32),
                    options=dict(num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 2),
                                 **({"maxnreg": opts["maxnreg"]} if "maxnreg" in opts else {})),
                )  # fmt: skip
            except Exception as err:
                print(f"{name} bits {bits}: compile failed: {type(err).__name__}: {str(err)[:2000]}")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k.cubin")
                with open(path, "wb") as f:
                    f.write(c.asm["cubin"])
                res = subprocess.run(
                    [os.path.join(bindir, "cuobjdump"), "-res-usage", path], capture_output=True, text=True
                ).stdout
                sass = subprocess.run(
                    [os.path.join(bindir, "cuobjdump"), "-sass", path], capture_output=True, text=True
                ).stdout
            usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
            ins = [
                (int(m.group(1), 16), m.group(2))
                for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
            ]
            loops = []
            for addr, txt in ins:
                m = re.search(r"BRA\s.*0x([0-9a-f]+)", txt)
                if m and int(m.group(1), 16) < addr:
                    loops.append((int(m.group(1), 16), addr))
            lo, hi = max(loops, key=lambda x: x[1] - x[0]) if loops else (0, 0)
            body = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for a, t in ins if lo <= a <= hi]
            top = collections.Counter(body).most_common(14)
            print(f"{name:22s} K{bits}/V{bits}: REG {usage.group(1)} STACK {usage.group(2)} (spill) "
                  f"smem {c.metadata.shared}, convert_layout {c.asm['ttgir'].count('convert_layout')}, "
                  f"token loop {len(body)} SASS/warp per 128 tokens: {top}", flush=True)  # fmt: skip
            if args.asm_dir:
                os.makedirs(args.asm_dir, exist_ok=True)
                stem = os.path.join(args.asm_dir, f"{name.replace('/', '_')}_b{bits}")
                for ext in ("ttgir", "ptx"):
                    with open(f"{stem}.{ext}", "w") as f:
                        f.write(c.asm[ext])
                with open(f"{stem}.sass", "w") as f:
                    f.write(sass)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="CPU: compare with a float32 torch reference")
    parser.add_argument(
        "--profile", action="store_true", help="GPU: run the first variant a few times (for ncu)"
    )
    parser.add_argument("--quick", action="store_true", help="with --check: one case only")
    parser.add_argument("--asm", action="store_true", help="compile for sm_90 without a GPU: regs, SASS")
    parser.add_argument("--asm-dir", default=None)
    parser.add_argument("--asm-split", type=int, default=2048)
    parser.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="time these variants (none named: all), not only the default",
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--shapes", nargs="+", default=None, help="BATCHxTOKENS, default 8x131072 1x32768")
    parser.add_argument("--splits", type=int, nargs="+", default=None, help="split lengths to time")
    args = parser.parse_args()
    if args.check:
        check(args)
    elif args.asm:
        asm(args)
    elif args.profile:
        profile(args)
    else:
        gpu(args)


if __name__ == "__main__":
    main()
