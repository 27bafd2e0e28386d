"""Prototype kernels (not yet in the fused path): KIVI decode attention with the scales folded into the products.

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

The driver, with the variants, the CPU check and the timings, is ``folded_decode.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
