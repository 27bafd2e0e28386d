"""Decode attention over affine keys and values (KIVI, HeadQ's base) with the scales folded into
the matrix products: the fast path of ``triton_decode.attend`` for float16 queries.

The generic split kernel dequantizes each tile (``code * scale + zero`` per element) before its
two ``tl.dot``. This one never dequantizes; the products read raw codes and the scales go into
the small operand instead:

- keys (codes grouped along tokens): with ``x`` a key group of the tile and ``r`` a query head
  of the KV group, row ``(x, r)`` of the first operand is ``q_r * s_x * qk_scale``; row ``(x, r)``
  of the product then holds head r's logits for the tokens of group x, up to the zero term
  ``q_r . z_x``, which one small product per split computes for all of its groups (kept in a
  scratch buffer and read back a few floats per tile). The logit of (r, j) is picked from row
  (group(j), r).
- values (codes grouped along channels): with ``x`` a channel group, row ``(x, r)`` of the second
  operand is ``p_r * s_x`` per token, kept for the channels of group x at the end of the split;
  the zero term ``sum_j p_rj z_jx`` is an elementwise accumulator.
- rows: GQA pads the query heads of a KV group to the 16 rows of the matrix unit anyway, so
  (groups x heads) rows cost little or no tensor-core work.
- unpack: ``word & mask`` on a whole int32 gives two float16 subnormals, ``code * 2^(bits*m-24)``
  (one shift per byte); codes p and p + 16/bits of a word share a register, so tile position
  2p + h holds code p + h * 16/bits of the word. Token order (key columns, value rows) and
  channel order (value columns) are permuted inside each word, the same way on both sides; the
  power of two is undone per logit column and per output channel. No int-to-float conversion and
  no multiply-add per element.
- HeadQ's side term ``(U^T q) . z_hat``: the side codes are unpacked in token order, permuted to
  the tile's token order on their way to the product's operand, and multiplied by the side
  coordinates of the query in the key product's rows ``(x, r)``, so the side logits add to that
  product's before a row is picked.
- with ``HILO`` each folded operand is split into a float16 part and its float16 remainder (two
  products on the same codes): the folded sums cancel against the zero terms, which magnifies
  the rounding of a single float16 operand.

- mixed-width values (A², two widths): a token's words start at its row's start plus the words
  of the tokens before it, counted from the packed width index (a popcount of the bits below it),
  so the rows can be read in the tile's order; each width's rows are unpacked from their own words
  (zeros elsewhere) into their own product, and the two sums meet in channel order at the end.
- statistics tail (a value policy's attention probabilities): as in the generic kernel, the
  scaled logits of positions from ``tail_start`` on are written out.

Settings it takes (``eligible``): float16 queries, 2 or 4 bits on both sides (one or two widths
of mixed values), groups of whole 32-bit words, at most 16 query heads per KV head and 32 rows
per product.
"""

from __future__ import annotations

import triton
import triton.language as tl

from headq_kernels.decode_plan import MixedChannels, Plan
from headq_kernels.triton_tiles import (
    TOKENS_C,
    _affine_key_segment,
    _affine_value_segment,
    _mixed_value_segment,
    _online_softmax,
    _side_codes,
    _side_loads,
    _side_segment,
    _split_row,
)

# Folded operands carry a factor 2^8, so that small scales stay normal float16; a code of value 1
# unpacks as 2^(bits*m - 24), so outputs are multiplied back by 2^(16 - bits*m).
FOLD: tl.constexpr = tl.constexpr(256.0)
UNFOLD_EXP: tl.constexpr = tl.constexpr(16)

FOLD_BITS = (2, 4)


def rows(groups: int, heads: int) -> int:
    """Rows of a folded product: groups x heads (heads padded to a power of two), at least 16."""
    return max(16, groups * triton.next_power_of_2(heads))


def bias_columns(plan: Plan) -> int:
    """Columns of the key zero-term scratch: the key groups of the longest split, at least 16."""
    return max(16, triton.next_power_of_2(-(-plan.split // plan.key_group)))


def _values_fold(widths: tuple[int, ...], group: int, heads: int, head_dim: int) -> bool:
    return (
        all(b in FOLD_BITS and group % (32 // b) == 0 for b in widths)
        and head_dim % group == 0
        and rows(head_dim // group, heads) <= 32
    )


def eligible(plan: Plan, heads: int, head_dim: int, *, mixed: MixedChannels | None = None) -> bool:
    """Whether the launches of ``plan`` with affine keys and affine values (or the ``mixed`` value
    segments) can run folded (float16 queries checked by the caller)."""
    kb, kg = plan.key_bits, plan.key_group
    keys = (
        kb in FOLD_BITS
        and kg % (32 // kb) == 0
        and plan.block_n % kg == 0
        and heads <= 16
        and rows(plan.block_n // kg, heads) <= 32
        and plan.side_rank <= 16
    )
    if mixed is None:
        return keys and _values_fold((plan.value_bits,), plan.value_group, heads, head_dim)
    lo_words = head_dim * mixed.widths[0] // 32
    return (
        keys
        and len(mixed.widths) <= 2
        and mixed.chunk <= 128
        and plan.block_n % mixed.chunk == 0
        and _values_fold(mixed.widths, mixed.group, heads, head_dim)
        # the kernel reads a token's words as 16-byte vectors
        and lo_words % 4 == 0
        and mixed.row_words % lo_words == 0
        and mixed.codes.data_ptr() % 16 == 0
    )


@triton.jit
def _pair(words, p: tl.constexpr, BITS: tl.constexpr):
    """int32 whose halves hold codes p and p + 16/BITS of each word as float16 subnormal bit
    patterns, ``code * 2^(BITS * m - 24)`` with m = p mod (8 / BITS): one mask, one shift per byte."""
    mask: tl.constexpr = ((1 << BITS) - 1) | (((1 << BITS) - 1) << 16)
    per_byte: tl.constexpr = 8 // BITS
    m: tl.constexpr = p % per_byte
    if p >= per_byte:
        v = (words >> 8) & (mask << (BITS * m))
    else:
        v = words & (mask << (BITS * m))
    return v


@triton.jit
def _unpack(words, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """(R, C // (32 / BITS)) int32 words -> (R, C) float16 codes in the permuted order of :func:`_code_of`."""
    if BITS == 2:
        e = tl.join(
            tl.join(_pair(words, 0, BITS), _pair(words, 4, BITS)),
            tl.join(_pair(words, 2, BITS), _pair(words, 6, BITS)),
        )
        o = tl.join(
            tl.join(_pair(words, 1, BITS), _pair(words, 5, BITS)),
            tl.join(_pair(words, 3, BITS), _pair(words, 7, BITS)),
        )
        v = tl.join(e, o)  # (R, W, 2, 2, 2): pair 4i + 2j + k at [i, j, k]
    else:
        tl.static_assert(BITS == 4)
        v = tl.join(
            tl.join(_pair(words, 0, BITS), _pair(words, 2, BITS)),
            tl.join(_pair(words, 1, BITS), _pair(words, 3, BITS)),
        )
    lo = v.to(tl.int16).to(tl.float16, bitcast=True)
    hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (R, C))


@triton.jit
def _unpack_opaque(words, live, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """:func:`_unpack` inside an ``if`` on a run-time condition that always holds (``live``). The
    compiler picks a dot operand's register layout from the ops that compute it and sees no further
    than the ``if``; seeing the join tree it would pick a layout that costs a register move per
    operand register at every product."""
    if live:
        x = _unpack(words, BITS, R, C)
    else:  # the same: the branches merge again after layout selection
        x = _unpack(words, BITS, R, C)
    return x


@triton.jit
def _code_of(idx, BITS: tl.constexpr):
    """Index along the packed axis of the code at position idx of an unpacked tile."""
    per_word: tl.constexpr = 32 // BITS
    pos = idx % per_word
    return idx - pos + pos // 2 + (pos % 2) * (per_word // 2)


@triton.jit
def _code_scale(idx, BITS: tl.constexpr):
    """1 / (what a code of value 1 at position idx reads as, times FOLD): undoes both factors."""
    per_byte: tl.constexpr = 8 // BITS
    m = ((idx % (32 // BITS)) // 2) % per_byte
    return tl.exp2(UNFOLD_EXP - (BITS * m).to(tl.float32))


@triton.jit
def _permute_words(x, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """(ROWS, N) in token order -> the tile's order (:func:`_code_of` at BITS)."""
    per_word: tl.constexpr = 32 // BITS
    x = tl.reshape(x, (ROWS, N // per_word, 2, per_word // 2))
    return tl.reshape(tl.permute(x, (0, 1, 3, 2)), (ROWS, N))


@triton.jit
def _unpermute_words(x, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """(ROWS, N) in the tile's order (:func:`_code_of` at BITS) -> natural order; inverse of :func:`_permute_words`."""
    per_word: tl.constexpr = 32 // BITS
    x = tl.reshape(x, (ROWS, N // per_word, per_word // 2, 2))
    return tl.reshape(tl.permute(x, (0, 1, 3, 2)), (ROWS, N))


@triton.jit
def _popcount(x):
    """Set bits of each uint32."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _mixed_loads(
    codes,
    index,
    row_words,
    at,
    live,
    D: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Code words of mixed-width tokens ``at`` (any order): (words at LO bits, zeros for tokens at
    HI; words at HI bits, zeros for tokens at LO). With HI = 0 every token is at LO, and the second
    is the first. A token's words start at its allocation row's, after the tokens before it: their
    count at LO, and the HI ones among them from the one-bit width index (a popcount)."""
    lo_words: tl.constexpr = D * LO // 32
    row = at // CHUNK
    pos = (at % CHUNK).to(tl.int32)
    start = row * row_words + pos * lo_words
    if HI > 0:
        hi_words: tl.constexpr = D * HI // 32
        index_words: tl.constexpr = (CHUNK + 31) // 32
        before = tl.zeros_like(pos)
        on_hi = tl.zeros_like(live)
        for i in tl.static_range(index_words):
            word = tl.load(index + row * index_words + i, mask=live, other=0).to(tl.uint32, bitcast=True)
            below = pos - 32 * i  # this word's bits before the token
            bits = tl.where(below >= 32, 0xFFFFFFFF, (1 << (below & 31)).to(tl.uint32) - 1)
            before += _popcount(tl.where(below > 0, word & bits, 0)).to(tl.int32)
            on_hi |= (below >= 0) & (below < 32) & (((word >> (below & 31)) & 1) != 0)
        start += before * (hi_words - lo_words)
        start = tl.multiple_of(start, lo_words)
        on_hi = live & on_hi
        w_lo = tl.load(
            codes + start[:, None] + tl.arange(0, lo_words)[None, :], mask=(live & ~on_hi)[:, None], other=0
        )
        w_hi = tl.load(codes + start[:, None] + tl.arange(0, hi_words)[None, :], mask=on_hi[:, None], other=0)
    else:
        w_lo = tl.load(codes + start[:, None] + tl.arange(0, lo_words)[None, :], mask=live[:, None], other=0)
        w_hi = w_lo
    return w_lo, w_hi


@triton.jit
def _spread_rows(x, NX: tl.constexpr, GP: tl.constexpr, N: tl.constexpr):
    """(NX, N) -> (NX * GP, N): row (x, r) = x's row."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], (NX, GP, N)), (NX * GP, N))


@triton.jit
def _spread_heads(x, NX: tl.constexpr, GP: tl.constexpr, N: tl.constexpr):
    """(GP, N) -> (NX * GP, N): row (x, r) = r's row."""
    return tl.reshape(tl.broadcast_to(x[None, :, :], (NX, GP, N)), (NX * GP, N))


@triton.jit
def _pick_rows(x, keep, NX: tl.constexpr, GP: tl.constexpr, N: tl.constexpr):
    """(NX * GP, N), keep mask -> (GP, N): the sum over x of the kept entries."""
    return tl.sum(tl.reshape(tl.where(keep, x, 0.0), (NX, GP, N)), axis=0)


@triton.jit
def _folded_dot(a, b, acc, HILO: tl.constexpr):
    """acc + a @ b with a (float32) rounded to float16, and with HILO its remainder too."""
    hi = a.to(tl.float16)
    acc = tl.dot(hi, b, acc)
    if HILO:
        acc = tl.dot((a - hi.to(tl.float32)).to(tl.float16), b, acc)
    return acc


@triton.jit
def _tile_loads(
    k_codes,
    k_scale,
    v_codes,
    v_index,
    v_row_words,
    v_scale,
    v_zero,
    bias_rows,
    mask_row,
    k_words,
    k_groups,
    k_off,
    v_off,
    t,
    length,
    c,
    tok,
    krows,
    BLOCK_N: tl.constexpr,
    GP: tl.constexpr,
    K_GROUP: tl.constexpr,
    KXP: tl.constexpr,
    K_PW: tl.constexpr,
    VX: tl.constexpr,
    VXP: tl.constexpr,
    V_W: tl.constexpr,
    D: tl.constexpr,
    V_BITS: tl.constexpr,
    V_HI: tl.constexpr,
    V_CHUNK: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """What the tile at t of a split reads: key words and scales, value words, scales and zero
    points, the key zero terms; nothing past the split's end."""
    KX: tl.constexpr = BLOCK_N // K_GROUP
    here = t < length
    live = t + tok < length
    k_at = k_off + t
    w = k_at // K_PW + tl.arange(0, BLOCK_N // K_PW)
    kw = tl.load(k_codes + c[:, None] * k_words + w[None, :], mask=(w[None, :] < k_words) & here, other=0)
    xk = tl.arange(0, KXP)
    gk = k_at // K_GROUP + xk
    k_in = (xk[None, :] < KX) & (gk[None, :] < k_groups) & here
    ks = tl.load(k_scale + c[:, None] * k_groups + gk[None, :], mask=k_in, other=0.0)
    v_at = (v_off + t + tok).to(tl.int64)
    if V_CHUNK > 0:  # mixed widths
        vw, vw_hi = _mixed_loads(v_codes, v_index, v_row_words, v_at, live, D, V_BITS, V_HI, V_CHUNK)
    else:
        vw = tl.load(v_codes + v_at[:, None] * V_W + tl.arange(0, V_W)[None, :], mask=live[:, None], other=0)
        vw_hi = vw
    xv = tl.arange(0, VXP)
    vg = v_at[None, :] * VX + xv[:, None]
    v_in = live[None, :] & (xv[:, None] < VX)
    vs = tl.load(v_scale + vg, mask=v_in, other=0.0)
    vz = tl.load(v_zero + vg, mask=v_in, other=0.0)
    kx = krows // GP
    bias = tl.load(bias_rows + t // K_GROUP, mask=(kx < KX) & here, other=0.0)
    if HAS_MASK:
        seen = tl.load(mask_row + t + tok, mask=live, other=0)
    else:
        seen = live
    return kw, ks, vw, vw_hi, vs, vz, bias, seen


@triton.jit(do_not_specialize=["n_splits", "mask_stride", "ngb", "tail_start", "tail_len"])
def _folded_split_kernel(
    q_ptr,
    qr_ptr,
    seg_ptr,
    split_ptr,
    mask_ptr,
    o_ptr,
    ml_ptr,
    zb_ptr,
    tail_ptr,
    HKV,
    n_splits,
    mask_stride,
    qk_scale,
    ngb,
    tail_start,
    tail_len,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr,
    K_GROUP: tl.constexpr,
    V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_HI: tl.constexpr,
    V_CHUNK: tl.constexpr,
    R: tl.constexpr,
    Z_BITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    TAIL: tl.constexpr,
    HILO: tl.constexpr,
):
    """One split of one (sequence, KV head) over an affine key segment and an affine value segment
    (V_CHUNK = 0) or a mixed one (allocation rows of V_CHUNK tokens at V_BITS, or at V_HI where
    the width index says so; V_HI = 0: one width).

    Same tables and outputs as ``triton_decode._decode_split_kernel``; ``zb_ptr``: scratch of
    (ngb key groups x key rows) floats per program for the key zero terms (a run-time count: the
    split length may change from step to step without a new compilation).
    """
    KX: tl.constexpr = BLOCK_N // K_GROUP  # key groups per tile
    KROWS: tl.constexpr = 16 if KX * GP < 16 else KX * GP
    KXP: tl.constexpr = KROWS // GP  # with padding rows that match no token
    VX: tl.constexpr = D // V_GROUP  # value channel groups
    VROWS: tl.constexpr = 16 if VX * GP < 16 else VX * GP
    VXP: tl.constexpr = VROWS // GP
    K_PW: tl.constexpr = 32 // K_BITS
    V_W: tl.constexpr = D * V_BITS // 32
    ZB: tl.constexpr = 32  # key groups per zero-term product
    R_PAD: tl.constexpr = 16  # side-code rank (at most 16) padded for its product

    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    bh64 = bh.to(tl.int64)
    krow, k_off, vrow, v_off, length, position, split = _split_row(split_ptr, seg_ptr)
    k_tokens = tl.load(krow + TOKENS_C)
    k_words, k_groups, k_codes, k_scale, k_zero = _affine_key_segment(
        krow, k_tokens, bh64, D, K_BITS, K_GROUP
    )
    v_tokens = tl.load(vrow + TOKENS_C)
    if V_CHUNK > 0:  # a one-bit width index (two widths at most), codes on 16 bytes (``eligible``)
        v_codes, v_index, v_scale, v_zero, v_row_words = _mixed_value_segment(
            vrow, v_tokens, bh64, D, V_GROUP, V_CHUNK, 1, True
        )
    else:
        v_codes, v_scale, v_zero = _affine_value_segment(vrow, v_tokens, bh64, D, V_BITS, V_GROUP)
        v_index = v_codes
        v_row_words = 0

    r = tl.arange(0, GP)
    c = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    krows = tl.arange(0, KROWS)
    kx = krows // GP
    q = tl.load(q_ptr + (bh64 * G + r[:, None]) * D + c[None, :], mask=r[:, None] < G, other=0.0)
    q_t = tl.trans(q.to(tl.float32) * (qk_scale * FOLD))  # (D, GP)

    # Zero terms q_r . z_g * qk_scale of every key group of the split, one product per 32 groups,
    # into the scratch (row (x, r) holds q_r), read back per tile.
    qk = krows % GP
    q_rows = tl.load(q_ptr + (bh64 * G + qk[:, None]) * D + c[None, :], mask=qk[:, None] < G, other=0.0)
    g0 = k_off // K_GROUP
    split_groups = (length + K_GROUP - 1) // K_GROUP
    scratch = zb_ptr + (bh64 * n_splits + split) * (KROWS * ngb)
    for j in range(0, length, ZB * K_GROUP):
        gb = j // K_GROUP + tl.arange(0, ZB)
        kz_in = (gb[None, :] < split_groups) & (g0 + gb[None, :] < k_groups)
        kz = tl.load(k_zero + c[:, None] * k_groups + g0 + gb[None, :], mask=kz_in, other=0.0)
        tl.store(
            scratch + krows[:, None] * ngb + gb[None, :],
            tl.dot(q_rows, kz) * qk_scale,
            mask=gb[None, :] < ngb,
        )
    tl.debug_barrier()

    if R > 0:  # HeadQ: (U^T q) . z_hat, rows padded to 16 for its product
        z_words, z_codes, z_step = _side_segment(krow, k_tokens, bh64, R, Z_BITS)
        rr = tl.arange(0, R_PAD)
        qr = tl.load(  # row (x, r) holds head r's, as the key product's rows
            qr_ptr + (bh64 * G + qk[:, None]) * R + rr[None, :],
            mask=(qk[:, None] < G) & (rr[None, :] < R),
            other=0.0,
        ).to(tl.float16)  # a product of float32 operands rounds them to 10 mantissa bits anyway
        side_next = _side_loads(z_codes, z_step, z_words, k_tokens, k_off, R, R_PAD, BLOCK_N, Z_BITS)

    tok = _code_of(n, K_BITS)  # token of each tile column (keys) and row (values)
    k_col = _code_scale(n, K_BITS)
    keep_k = kx[:, None] == (tok // K_GROUP)[None, :]
    vx = tl.arange(0, VROWS) // GP
    live_k = length > 0  # run-time conditions that always hold (see _unpack_opaque); two, so
    live_v = n_splits > 0  # that both unpacked tiles are not kept alive at once
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_acc = tl.zeros((GP, BLOCK_N), tl.float32)
    z_acc = tl.zeros((VROWS, BLOCK_N), tl.float32)
    acc = tl.zeros((VROWS, D), tl.float32)
    acc_hi = tl.zeros((VROWS, D) if V_HI > 0 else (1, 1), tl.float32)
    mask_row = mask_ptr + b * mask_stride + position
    bias_rows = scratch + krows * ngb + kx  # each key row's zero terms, from the split's first group
    loads = _tile_loads(
        k_codes, k_scale, v_codes, v_index, v_row_words, v_scale, v_zero, bias_rows, mask_row, k_words, k_groups,
        k_off, v_off, 0, length, c, tok, krows, BLOCK_N, GP, K_GROUP, KXP, K_PW, VX, VXP, V_W, D, V_BITS, V_HI,
        V_CHUNK, HAS_MASK,
    )  # fmt: skip
    for t in range(0, length, BLOCK_N):
        kw, ks, vw, vw_hi, vs, vz, bias, seen = loads
        # the next tile's codes and scales are loaded while this one is computed
        loads = _tile_loads(
            k_codes, k_scale, v_codes, v_index, v_row_words, v_scale, v_zero, bias_rows, mask_row, k_words, k_groups,
            k_off, v_off, t + BLOCK_N, length, c, tok, krows, BLOCK_N, GP, K_GROUP, KXP, K_PW, VX, VXP, V_W, D, V_BITS,
            V_HI, V_CHUNK, HAS_MASK,
        )  # fmt: skip
        live = t + tok < length
        k_at = k_off + t
        qs = tl.trans(tl.reshape(ks.to(tl.float32)[:, :, None] * q_t[:, None, :], (D, KROWS)))
        kt = _unpack_opaque(kw, live_k, K_BITS, D, BLOCK_N)
        s = _folded_dot(qs, kt, tl.zeros((KROWS, BLOCK_N), tl.float32), HILO)
        s = s * k_col[None, :] + bias[:, None]
        if R > 0:
            # the side codes go to the tile's token order before their product, whose rows are the
            # key product's: the side logits add to the key logits before a row is picked
            z_packed, z_st = side_next
            side_next = _side_loads(
                z_codes, z_step, z_words, k_tokens, k_at + BLOCK_N, R, R_PAD, BLOCK_N, Z_BITS
            )
            z = _side_codes(z_packed, z_st, R, R_PAD, BLOCK_N, Z_BITS).to(tl.float16)
            s += tl.dot(qr, _permute_words(z, R_PAD, BLOCK_N, K_BITS)) * qk_scale
        logits = _pick_rows(s, keep_k, KXP, GP, BLOCK_N)  # (GP, BLOCK_N)
        keep = live
        if HAS_MASK:
            keep = keep & (seen != 0)
        logits = tl.where(keep[None, :], logits, float("-inf"))
        if TAIL:  # the logits of positions from tail_start on, for a value policy's statistics
            at = position + t + tok - tail_start
            tl.store(
                tail_ptr + (bh64 * G + r[:, None]) * tail_len + at[None, :],
                logits,
                mask=(r[:, None] < G) & (live & (at >= 0))[None, :],
            )
        m_new, p, alpha = _online_softmax(logits, m_i)
        l_acc = l_acc * alpha[:, None] + p
        m_i = m_new

        p = _spread_heads(p, VXP, GP, BLOCK_N)  # row (x, r) = p_r
        alpha = tl.reshape(tl.broadcast_to(alpha[None, :], (VXP, GP)), (VROWS,))
        z_acc = z_acc * alpha[:, None] + p * _spread_rows(vz.to(tl.float32), VXP, GP, BLOCK_N)
        vt = _unpack_opaque(vw, live_v, V_BITS, BLOCK_N, D)
        pv = p * _spread_rows(vs.to(tl.float32) * FOLD, VXP, GP, BLOCK_N)
        # a fresh accumulator: the matrix unit aligns its sums to the largest term (the split's
        # running sum would truncate this tile's)
        acc = acc * alpha[:, None] + _folded_dot(pv, vt, tl.zeros((VROWS, D), tl.float32), HILO)
        if V_HI > 0:
            vt = _unpack_opaque(vw_hi, live_v, V_HI, BLOCK_N, D)
            acc_hi = acc_hi * alpha[:, None] + _folded_dot(pv, vt, tl.zeros((VROWS, D), tl.float32), HILO)

    ch = _code_of(c, V_BITS)  # channel of each column
    out = acc * _code_scale(c, V_BITS)[None, :] + tl.sum(z_acc, axis=1)[:, None]
    out = _pick_rows(out, vx[:, None] == (ch // V_GROUP)[None, :], VXP, GP, D)  # (GP, D)
    if V_HI > 0:  # the two widths' sums in channel order
        ch_hi = _code_of(c, V_HI)
        out_hi = _pick_rows(
            acc_hi * _code_scale(c, V_HI)[None, :], vx[:, None] == (ch_hi // V_GROUP)[None, :], VXP, GP, D
        )
        out = _unpermute_words(out, GP, D, V_BITS) + _unpermute_words(out_hi, GP, D, V_HI)
        ch = c
    row_out = (bh64 * n_splits + split) * G + r
    tl.store(o_ptr + row_out[:, None] * D + ch[None, :], out, mask=r[:, None] < G)
    tl.store(ml_ptr + row_out * 2, m_i, mask=r < G)
    tl.store(ml_ptr + row_out * 2 + 1, tl.sum(l_acc, axis=1), mask=r < G)
