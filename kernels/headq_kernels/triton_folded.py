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
- codes as bytes: a byte holds 8/bits codes, and code i of a byte is one mask away from a float16
  subnormal, ``code * 2^(bits*i - 24)`` (no int-to-float conversion, no multiply-add per
  element). Each product reads one code position i of its bytes (a plane), so its operand is
  elementwise in the bytes: the compiler stages the bytes, not unpacked float16 tiles, through
  shared memory to the matrix unit's operand layout. Keys (codes along tokens, stored with the
  channels adjacent, so a tile's bytes are one contiguous run): one product per token plane, the
  tokens KP * b + i of the tile (KP = 8/bits). Values (codes along channels): per
  token plane, one product per channel plane, the channels VP * b + j, each into its own sum. The
  power of two is undone per token plane and per channel plane; the planes meet in channel order
  when the split ends.
- HeadQ's side term ``(U^T q) . z_hat``: the side codes are unpacked in token order and split
  into the token planes, and multiplied by the side coordinates of the query in the key
  product's rows ``(x, r)``, so the side logits add to that product's before a row is picked.
- with ``HILO`` each folded operand is split into a float16 part and its float16 remainder (two
  products on the same codes): the folded sums cancel against the zero terms, which magnifies
  the rounding of a single float16 operand.

- mixed-width values (A², two widths, the wider twice the narrower): every token's base (its
  code's top bits) sits at a fixed place of its allocation row, so the base bytes go through the
  same products as uniform values, a wider token's scale multiplied by 2^(wide - narrow). The
  bits below a wider token's base (its rung, as wide as a base) sit after the row's bases, one
  place per wider token; each wider token's folded probability is picked into its place by a
  small product with a 0 / 2^-(wide - narrow) selection (the places' tokens found once a tile in
  the width index), and one product per channel plane adds the places' rungs to the same sums.
- statistics tail (a value policy's attention probabilities): as in the generic kernel, the
  scaled logits of positions from ``tail_start`` on are written out.

Settings it takes (``folded_launch.eligible``; its launch settings are ``folded_launch.settings``):
float16 queries, 2 or 4 bits on both sides (one or two widths of mixed values), groups of whole
32-bit words, at most 16 query heads per KV head and 32 rows per product, at least 16 tokens per
token plane and 16 channels per channel plane, codes on 16 bytes.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from headq_kernels.triton_tiles import (
    TOKENS_C,
    _affine_key_segment,
    _affine_value_segment,
    _mixed_value_segment,
    _repeat_rows,
    _side_codes,
    _side_loads,
    _side_segment,
    _split_row,
)

# Folded operands carry a factor 2^8, so that small scales stay normal float16; code i of a byte
# unpacks as code * 2^(bits*i - 24), so outputs are multiplied back by 2^16 >> bits*i.
FOLD: tl.constexpr = tl.constexpr(256.0)
UNFOLD: tl.constexpr = tl.constexpr(1 << 16)


@triton.jit
def _plane(codes, i: tl.constexpr, BITS: tl.constexpr):
    """Code i of each byte (uint8) as a float16 subnormal bit pattern, ``code * 2^(BITS * i - 24)``:
    one mask, no int-to-float conversion. The result is elementwise in the bytes, so the bytes, not
    the codes, travel to the matrix unit's operand layout."""
    mask: tl.constexpr = ((1 << BITS) - 1) << (BITS * i)
    return (codes & mask).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _split_planes(x, ROWS: tl.constexpr, NT: tl.constexpr, KP: tl.constexpr):
    """(ROWS, NT * KP) in token order -> KP token planes (ROWS, NT), plane i = columns KP * b + i."""
    if KP == 2:
        a, b = tl.split(tl.reshape(x, (ROWS, NT, 2)))
        planes: "tuple[Any, ...]" = (a, b)
    else:
        tl.static_assert(KP == 4)
        even, odd = tl.split(tl.reshape(x, (ROWS, NT, 2, 2)))  # by bit 0 of the plane
        p0, p2 = tl.split(even)
        p1, p3 = tl.split(odd)
        planes = (p0, p1, p2, p3)
    return planes


@triton.jit
def _interleave(x, ROWS: tl.constexpr, NB: tl.constexpr, P: tl.constexpr):
    """P planes x[j] (ROWS, NB) -> (ROWS, NB * P) with column P * b + j = x[j][:, b]."""
    if P == 2:
        y = tl.join(x[0], x[1])
    else:
        tl.static_assert(P == 4)
        y = tl.join(tl.join(x[0], x[2]), tl.join(x[1], x[3]))
    return tl.reshape(y, (ROWS, NB * P))


@triton.jit
def _popcount(x):
    """Set bits of each uint32."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _mixed_bases(
    codes,
    index,
    row_bytes,
    at,
    live,
    D: tl.constexpr,
    LO: tl.constexpr,
    TWO: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Base bytes (tokens, D * LO / 8) of mixed-width tokens ``at`` (any order; codes a byte pointer on
    16 bytes, rows of ``row_bytes``), and with TWO widths which tokens are at the wider one (their
    bit of the one-bit width index)."""
    lo_bytes: tl.constexpr = D * LO // 8
    row = at // CHUNK
    pos = (at % CHUNK).to(tl.int32)
    first = tl.multiple_of(row * row_bytes + pos * lo_bytes, 16)  # ``eligible``: whole 16-byte runs
    base = tl.load(codes + first[:, None] + tl.arange(0, lo_bytes)[None, :], mask=live[:, None], other=0)
    wider = tl.zeros_like(live)
    if TWO:
        index_words: tl.constexpr = (CHUNK + 31) // 32
        word = tl.load(index + row * index_words + pos // 32, mask=live, other=0)
        wider = live & (((word >> (pos % 32)) & 1) != 0)
    return base, wider


@triton.jit
def _place_tokens(index, row0, rows_live, CHUNK: tl.constexpr, PLACES: tl.constexpr, NPL: tl.constexpr):
    """The token (from the tile's first) of each rung place of the tile's rows from ``row0`` on:
    place k is the wider token number k % PLACES of row k // PLACES, found in the row's one-bit
    width index by a binary search over popcounts; -1 where the row has no such token."""
    index_words: tl.constexpr = (CHUNK + 31) // 32
    k = tl.arange(0, NPL)
    rel = k // PLACES
    left = (k % PLACES).to(tl.int32)  # wider tokens to pass over
    ok = rel < rows_live
    at = tl.full((NPL,), -1, tl.int32)
    for i in tl.static_range(index_words):
        word = tl.load(index + (row0 + rel) * index_words + i, mask=ok, other=0).to(tl.uint32, bitcast=True)
        count = _popcount(word).to(tl.int32)
        here = ok & (at < 0) & (left < count)
        pos = tl.zeros((NPL,), tl.int32)
        rest = left
        for width in tl.static_range(4, -1, -1):  # windows of 16, 8, 4, 2, 1 bits
            low = _popcount(word & ((1 << (1 << width)) - 1)).to(tl.int32)
            up = rest >= low
            rest = tl.where(up, rest - low, rest)
            pos += tl.where(up, 1 << width, 0)
            word = tl.where(up, word >> (1 << width), word)
        at = tl.where(here, rel * CHUNK + 32 * i + pos, at)
        left = tl.where(ok & (at < 0), left - count, left)
    return at


@triton.jit
def _rung_loads(
    codes,
    row_bytes,
    row0,
    rows_live,
    D: tl.constexpr,
    LO: tl.constexpr,
    CHUNK: tl.constexpr,
    PLACES: tl.constexpr,
    NPL: tl.constexpr,
):
    """The rung bytes (NPL, D * LO / 8) of the tile's rows from ``row0`` on: place k holds the wider
    token number k % PLACES of row k // PLACES (zeros past a row's rung slots or the live rows)."""
    lo_bytes: tl.constexpr = D * LO // 8
    k = tl.arange(0, NPL)
    rel = k // PLACES
    slot = k % PLACES
    slots = (row_bytes - CHUNK * lo_bytes) // lo_bytes
    ok = (rel < rows_live) & (slot < slots)
    first = tl.multiple_of((row0 + rel) * row_bytes + (CHUNK + slot) * lo_bytes, 16)
    return tl.load(codes + first[:, None] + tl.arange(0, lo_bytes)[None, :], mask=ok[:, None], other=0)


@triton.jit
def _spread_rows(x, NX: tl.constexpr, GP: tl.constexpr, N: tl.constexpr):
    """(NX, N) -> (NX * GP, N): row (x, r) = x's row."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], (NX, GP, N)), (NX * GP, N))


@triton.jit
def _pick_rows(x, keep, NX: tl.constexpr, GP: tl.constexpr, N: tl.constexpr):
    """(NX * GP, N), keep mask -> (GP, N): the sum over x of the kept entries."""
    return tl.sum(tl.reshape(tl.where(keep, x, 0.0), (NX, GP, N)), axis=0)


@triton.jit
def _fold(a, HILO: tl.constexpr):
    """A folded operand (float32) rounded to float16, and with HILO its float16 remainder."""
    hi = a.to(tl.float16)
    if HILO:
        lo = (a - hi.to(tl.float32)).to(tl.float16)
    else:
        lo = hi
    return hi, lo


@triton.jit
def _folded_dot(a, b, acc, HILO: tl.constexpr):
    """acc + a @ b for a folded operand a from :func:`_fold`."""
    hi, lo = a
    acc = tl.dot(hi, b, acc)
    if HILO:
        acc = tl.dot(lo, b, acc)
    return acc


@triton.jit
def _value_planes(pv, vb, accs, BITS: tl.constexpr, HILO: tl.constexpr):
    """accs[j] + pv @ (code j of each byte of vb), for the 8 / BITS codes of a byte: vb holds a
    (tokens, bytes) tile of value codes, and code j of byte b is channel (8 / BITS) * b + j."""
    out: "tuple[Any, ...]" = ()
    for j in tl.static_range(8 // BITS):
        out = out + (_folded_dot(pv, _plane(vb, j, BITS), accs[j], HILO),)
    return out


@triton.jit
def _zeros(ROWS: tl.constexpr, COLS: tl.constexpr, P: tl.constexpr):
    """P float32 tiles of zeros (ROWS, COLS)."""
    out: "tuple[Any, ...]" = ()
    for _ in tl.static_range(P):
        out = out + (tl.zeros((ROWS, COLS), tl.float32),)
    return out


@triton.jit
def _readout(
    accs,
    zsum,
    vx,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    VXP: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
):
    """(GP, D) in channel order from the channel planes' sums (rows (x, r)): each plane's power of
    two undone, the zero term zsum (rows) added, and each channel's group row picked."""
    P: tl.constexpr = 8 // BITS
    NB: tl.constexpr = D // P
    out: "tuple[Any, ...]" = ()
    for j in tl.static_range(P):
        ch = P * tl.arange(0, NB) + j
        o = accs[j] * (UNFOLD >> (BITS * j)) + zsum[:, None]
        out = out + (_pick_rows(o, vx[:, None] == (ch // GROUP)[None, :], VXP, GP, NB),)
    return _interleave(out, GP, NB, P)


@triton.jit
def _rescale_add(accs, alpha, tile):
    """accs[j] * alpha (per row) + tile[j], for each plane."""
    out: "tuple[Any, ...]" = ()
    for j in tl.static_range(len(accs)):
        out = out + (accs[j] * alpha[:, None] + tile[j],)
    return out


@triton.jit
def _tile_loads(
    k_scale,
    v_scale,
    v_zero,
    bias_rows,
    mask_row,
    k_groups,
    k_off,
    v_off,
    t,
    length,
    c,
    krows,
    BLOCK_N: tl.constexpr,
    GP: tl.constexpr,
    K_GROUP: tl.constexpr,
    KXP: tl.constexpr,
    KP: tl.constexpr,
    VX: tl.constexpr,
    VXP: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """What the tile at t of a split reads besides the code bytes: key scales and zero terms, and per
    token plane i (the tokens KP * b + i) the value scales and zero points and the mask; nothing
    past the split's end."""
    KX: tl.constexpr = BLOCK_N // K_GROUP
    NT: tl.constexpr = BLOCK_N // KP
    here = t < length
    k_at = k_off + t
    nb = tl.arange(0, NT)
    xk = tl.arange(0, KXP)
    gk = k_at // K_GROUP + xk
    k_in = (xk[None, :] < KX) & (gk[None, :] < k_groups) & here
    ks = tl.load(k_scale + c[:, None] * k_groups + gk[None, :], mask=k_in, other=0.0)
    kx = krows // GP
    bias = tl.load(bias_rows + t // K_GROUP, mask=(kx < KX) & here, other=0.0)
    xv = tl.arange(0, VXP)
    planes: "tuple[Any, ...]" = ()
    for i in tl.static_range(KP):
        tok = KP * nb + i
        live = t + tok < length
        v_at = (v_off + t + tok).to(tl.int64)
        vg = v_at[None, :] * VX + xv[:, None]
        v_in = live[None, :] & (xv[:, None] < VX)
        vs = tl.load(v_scale + vg, mask=v_in, other=0.0)
        vz = tl.load(v_zero + vg, mask=v_in, other=0.0)
        if HAS_MASK:
            seen = tl.load(mask_row + t + tok, mask=live, other=0)
        else:
            seen = live
        planes = planes + ((vs, vz, seen),)
    return ks, bias, planes


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
    V_PLACES: tl.constexpr,
    R: tl.constexpr,
    Z_BITS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    TAIL: tl.constexpr,
    HILO: tl.constexpr,
):
    """One split of one (sequence, KV head) over an affine key segment and an affine value segment
    (V_CHUNK = 0) or a mixed one (allocation rows of V_CHUNK tokens at V_BITS, or at V_HI = 2 V_BITS
    where the width index says so, with rung slots for V_PLACES wider tokens a row, a power of two;
    V_HI = 0: one width).

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
    KP: tl.constexpr = 8 // K_BITS  # token planes: the tokens of a key byte
    NT: tl.constexpr = BLOCK_N // KP  # tokens per plane
    VB: tl.constexpr = D * V_BITS // 8  # value bytes per token (one width)
    ZB: tl.constexpr = 32  # key groups per zero-term product
    R_PAD: tl.constexpr = 16  # side-code rank (at most 16) padded for its product
    RT: tl.constexpr = BLOCK_N // V_CHUNK if V_CHUNK > 0 else 1  # allocation rows per tile
    NPL: tl.constexpr = 16 if RT * V_PLACES < 16 else RT * V_PLACES  # rung places per tile, padded
    WIDER: tl.constexpr = 1 << (V_HI - V_BITS) if V_HI > 0 else 1  # a wider token's base, as its code

    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    bh64 = bh.to(tl.int64)
    krow, k_off, vrow, v_off, length, position, split = _split_row(split_ptr, seg_ptr)
    k_tokens = tl.load(krow + TOKENS_C)
    # codes on 16 bytes (``folded_launch.eligible``)
    k_bytes, k_groups, k_codes, k_scale, k_zero = _affine_key_segment(
        krow, k_tokens, bh64, D, K_BITS, K_GROUP, True
    )
    v_tokens = tl.load(vrow + TOKENS_C)
    # mixed values: a one-bit width index (two widths at most); codes on 16 bytes either way
    # (``folded_launch.eligible``)
    if V_CHUNK > 0:
        v_codes, v_index, v_scale, v_zero, v_row_words = _mixed_value_segment(
            vrow, v_tokens, bh64, D, V_GROUP, V_CHUNK, 1, True
        )
        v_row_bytes = v_row_words * 4
    else:
        v_codes, v_scale, v_zero = _affine_value_segment(vrow, v_tokens, bh64, D, V_BITS, V_GROUP)
        v_index = v_codes
        v_row_bytes = 0
    v_codes = tl.multiple_of(v_codes.to(tl.pointer_type(tl.uint8)), 16)

    r = tl.arange(0, GP)
    c = tl.arange(0, D)
    krows = tl.arange(0, KROWS)
    kx = krows // GP
    nb = tl.arange(0, NT)
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

    if R > 0:  # HeadQ: (U^T q) . z_hat, its rank padded to 16 for its product
        z_words, z_codes, z_step = _side_segment(krow, k_tokens, bh64, R, Z_BITS)
        rr = tl.arange(0, R_PAD)
        qr = tl.load(  # row (x, r) holds head r's, as the key product's rows
            qr_ptr + (bh64 * G + qk[:, None]) * R + rr[None, :],
            mask=(qk[:, None] < G) & (rr[None, :] < R),
            other=0.0,
        ).to(tl.float16)  # a product of float32 operands rounds them to 10 mantissa bits anyway
        side_next = _side_loads(z_codes, z_step, z_words, k_tokens, k_off, R, R_PAD, BLOCK_N, Z_BITS)

    vx = tl.arange(0, VROWS) // GP
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_acc = tl.zeros((GP, NT), tl.float32)
    z_acc = tl.zeros((VROWS, NT), tl.float32)
    acc = _zeros(VROWS, D * V_BITS // 8, 8 // V_BITS)  # one sum per channel plane
    mask_row = mask_ptr + b * mask_stride + position
    bias_rows = scratch + krows * ngb + kx  # each key row's zero terms, from the split's first group
    for t in range(0, length, BLOCK_N):
        # a tile's scales, zero points and mask are loaded in the tile, left to the compiler's
        # software pipeline (faster on an H100 than loading them a tile ahead, docs/kernels.md)
        ks, bias, planes = _tile_loads(
            k_scale, v_scale, v_zero, bias_rows, mask_row, k_groups, k_off, v_off, t, length, c, krows,
            BLOCK_N, GP, K_GROUP, KXP, KP, VX, VXP, HAS_MASK,
        )  # fmt: skip
        # the code bytes are loaded here, for the compiler to stage them through shared memory
        # and read them in the products' operand layout: the codes of each plane are masks of
        # those bytes, so no unpacked tile travels
        k_at = k_off + t
        kbyte = k_at // KP + nb  # a tile's bytes of every channel: one contiguous run
        kb = tl.load(k_codes + kbyte[None, :] * D + c[:, None], mask=kbyte[None, :] < k_bytes, other=0)
        if R > 0:  # HeadQ: the side codes of this tile in token order, then split into token planes
            z_packed, z_st = side_next
            side_next = _side_loads(
                z_codes, z_step, z_words, k_tokens, k_at + BLOCK_N, R, R_PAD, BLOCK_N, Z_BITS
            )
            z = _side_codes(z_packed, z_st, R, R_PAD, BLOCK_N, Z_BITS).to(tl.float16)
            sides = _split_planes(z, R_PAD, NT, KP)
        else:
            sides = ()
        qs = _fold(tl.trans(tl.reshape(ks.to(tl.float32)[:, :, None] * q_t[:, None, :], (D, KROWS))), HILO)
        # the key logits of each token plane, then one softmax step over the whole tile
        logits: "tuple[Any, ...]" = ()
        for i in tl.static_range(KP):
            vs, vz, seen = planes[i]
            tok = KP * nb + i
            s = _folded_dot(qs, _plane(kb, i, K_BITS), tl.zeros((KROWS, NT), tl.float32), HILO)
            s = s * (UNFOLD >> (K_BITS * i)) + bias[:, None]
            if R > 0:  # the side logits, in the key product's rows
                s += tl.dot(qr, sides[i]) * qk_scale
            s = _pick_rows(s, kx[:, None] == (tok // K_GROUP)[None, :], KXP, GP, NT)  # (GP, NT)
            keep = t + tok < length
            if HAS_MASK:
                keep = keep & (seen != 0)
            s = tl.where(keep[None, :], s, float("-inf"))
            if TAIL:  # the logits of positions from tail_start on, for a value policy's statistics
                at = position + t + tok - tail_start
                tl.store(
                    tail_ptr + (bh64 * G + r[:, None]) * tail_len + at[None, :],
                    s,
                    mask=(r[:, None] < G) & ((t + tok < length) & (at >= 0))[None, :],
                )
            logits = logits + (s,)
        # one row maximum for the tile: the planes' elementwise maximum first
        s_max = logits[0]
        for i in tl.static_range(1, KP):
            s_max = tl.maximum(s_max, logits[i])
        m_new = tl.maximum(m_i, tl.max(s_max, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet stay at zero
        alpha = tl.exp2(m_i - m_use)
        m_i = m_new
        l_acc = l_acc * alpha[:, None]
        alpha = tl.reshape(tl.broadcast_to(alpha[None, :], (VXP, GP)), (VROWS,))
        z_acc = z_acc * alpha[:, None]
        # fresh sums for the tile: the matrix unit aligns its sums to the largest term (the
        # split's running sum would truncate this tile's)
        tile = _zeros(VROWS, D * V_BITS // 8, 8 // V_BITS)
        # wider tokens: each one's folded probability, picked into its rung place (divided by WIDER)
        if V_HI > 0:
            places = tl.zeros((VROWS, NPL), tl.float32)
            row0 = (v_off + t) // V_CHUNK
            rows_live = (length - t + V_CHUNK - 1) // V_CHUNK
            place_at = _place_tokens(v_index, row0, rows_live, V_CHUNK, V_PLACES, NPL)
        for i in tl.static_range(KP):
            vs, vz, seen = planes[i]
            tok = KP * nb + i
            live = t + tok < length
            v_at = (v_off + t + tok).to(tl.int64)
            vs = vs.to(tl.float32) * FOLD
            if V_CHUNK > 0:  # mixed widths: every token's base, a wider one's scaled up to its code
                vb, wider = _mixed_bases(
                    v_codes, v_index, v_row_bytes, v_at, live, D, V_BITS, V_HI > 0, V_CHUNK
                )
                if V_HI > 0:
                    vs = vs * tl.where(wider, WIDER, 1)[None, :]
            else:
                vb = tl.load(
                    v_codes + v_at[:, None] * VB + tl.arange(0, VB)[None, :], mask=live[:, None], other=0
                )
            p = tl.exp2(logits[i] - m_use[:, None])
            l_acc += p
            p = _repeat_rows(p, VROWS)  # row (x, r) = p_r
            z_acc += p * _spread_rows(vz.to(tl.float32), VXP, GP, NT)
            pv = _fold(p * _spread_rows(vs, VXP, GP, NT), HILO)
            tile = _value_planes(pv, vb, tile, V_BITS, HILO)
            if V_HI > 0:
                # each wider token's folded probability into its place, divided by WIDER (exact)
                pick = tl.where(tok[:, None] == place_at[None, :], 1.0 / WIDER, 0.0).to(tl.float16)
                places = _folded_dot(pv, pick, places, HILO)
        if V_HI > 0:  # the wider tokens' rungs: the bits below their bases, one product per channel plane
            rb = _rung_loads(v_codes, v_row_bytes, row0, rows_live, D, V_BITS, V_CHUNK, V_PLACES, NPL)
            tile = _value_planes(_fold(places, HILO), rb, tile, V_BITS, HILO)
        acc = _rescale_add(acc, alpha, tile)

    out = _readout(acc, tl.sum(z_acc, axis=1), vx, V_BITS, V_GROUP, VXP, GP, D)
    row_out = (bh64 * n_splits + split) * G + r
    tl.store(o_ptr + row_out[:, None] * D + c[None, :], out, mask=r[:, None] < G)
    tl.store(ml_ptr + row_out * 2, m_i, mask=r < G)
    tl.store(ml_ptr + row_out * 2 + 1, tl.sum(l_acc, axis=1), mask=r < G)
