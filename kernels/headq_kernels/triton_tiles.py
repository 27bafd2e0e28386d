"""Triton tile decoders of the fused decode attention: one layout's tokens of one head, ready
for the matrix products of ``triton_decode``'s split kernel; and the pieces both split kernels
(``triton_decode``, ``triton_folded``) share: the split's row, segment pointers, the online softmax.

- affine codes grouped along tokens (keys, a (D, BLOCK_N) tile) or along channels (values, a
  (BLOCK_N, D) tile), and HeadQ's side-code logits;
- mixed-width values (A²): every token's base (its top bits at the narrowest width) sits at a
  fixed place of its allocation row; the rungs of the wider tokens follow the bases, found from
  the packed width index by a running sum of word counts over the row (tiles start on rows);
- codebook tokens (GSRQ): in :mod:`headq_kernels.triton_codebook`;
- scaled tokens (fp8 and per-token-head integers) and rotated tokens (the TurboQuant family): a
  tile of levels and one scale per token, which the split kernel applies to the logits (keys) or
  to the probabilities (values) rather than to the tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from headq_kernels.decode_plan import (
    COLUMNS,
    EXTRA,
    PTR0,
    PTR1,
    PTR2,
    PTR3,
    PTR4,
    STRIDE_B,
    STRIDE_H,
    STRIDE_T,
    TOKENS,
)

# Columns of the segment table and the split table, as compile-time constants of the kernels
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


@triton.jit
def _split_row(split_ptr, seg_ptr):
    """This program's split: its key segment's table row and offset, its value segment's row and
    offset, its length, the position of its first token, and its index among all splits."""
    srow = split_ptr + tl.program_id(0) * SPLIT_COLUMNS_C
    krow = seg_ptr + tl.load(srow) * COLUMNS_C
    vrow = seg_ptr + tl.load(srow + 2) * COLUMNS_C
    return (
        krow,
        tl.load(srow + 1),
        vrow,
        tl.load(srow + 3),
        tl.load(srow + 4),
        tl.load(srow + 5),
        tl.load(srow + 6),
    )


@triton.jit
def _affine_key_segment(
    krow, tokens, bh64, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ALIGNED: tl.constexpr
):
    """Affine keys of one (sequence, KV head): code bytes and groups per channel, the code bytes
    (channels adjacent: byte j of every channel, then byte j + 1), scales, zero points. ALIGNED:
    the caller checked that the codes start on 16 bytes."""
    n_bytes = tokens * BITS // 8
    groups = tokens // GROUP
    codes = tl.load(krow + PTR0_C).to(tl.pointer_type(tl.uint8))
    if ALIGNED:  # on the pointer as converted: put on the sum below, the hint was lost
        codes = tl.multiple_of(codes, 16)
    codes += bh64 * D * n_bytes
    scale = tl.load(krow + PTR1_C).to(tl.pointer_type(tl.float16)) + bh64 * D * groups
    zero = tl.load(krow + PTR2_C).to(tl.pointer_type(tl.float16)) + bh64 * D * groups
    return n_bytes, groups, codes, scale, zero


@triton.jit
def _affine_value_segment(vrow, tokens, bh64, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """Affine values of one (sequence, KV head): codes, scales, zero points."""
    codes = tl.load(vrow + PTR0_C).to(tl.pointer_type(tl.int32)) + bh64 * tokens * (D * BITS // 32)
    scale = tl.load(vrow + PTR1_C).to(tl.pointer_type(tl.float16)) + bh64 * tokens * (D // GROUP)
    zero = tl.load(vrow + PTR2_C).to(tl.pointer_type(tl.float16)) + bh64 * tokens * (D // GROUP)
    return codes, scale, zero


@triton.jit
def _mixed_value_segment(
    vrow,
    tokens,
    bh64,
    D: tl.constexpr,
    GROUP: tl.constexpr,
    CHUNK: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Mixed-width values of one (sequence, KV head): codes (allocation rows of ``row_words``
    words), the packed width index, scales, zero points, and ``row_words``. ALIGNED: the caller
    checked that the codes start on 16 bytes (the hint must sit where the pointer is computed)."""
    row_words = tl.load(vrow + EXTRA_C)
    rows = bh64 * (tokens // CHUNK)
    index_words: tl.constexpr = (CHUNK * INDEX_BITS + 31) // 32
    codes = tl.load(vrow + PTR0_C).to(tl.pointer_type(tl.int32)) + rows * row_words
    if ALIGNED:
        codes = tl.multiple_of(codes, 16)
    index = tl.load(vrow + PTR3_C).to(tl.pointer_type(tl.int32)) + rows * index_words
    scale = tl.load(vrow + PTR1_C).to(tl.pointer_type(tl.float16)) + bh64 * tokens * (D // GROUP)
    zero = tl.load(vrow + PTR2_C).to(tl.pointer_type(tl.float16)) + bh64 * tokens * (D // GROUP)
    return codes, index, scale, zero, row_words


@triton.jit
def _scaled_segment(row, tokens, bh64, D: tl.constexpr, BITS: tl.constexpr):
    """Scaled tokens of one (sequence, KV head): codes (int32 words) and scales."""
    codes = tl.load(row + PTR0_C).to(tl.pointer_type(tl.int32)) + bh64 * tokens * (D * BITS // 32)
    scale = tl.load(row + PTR1_C).to(tl.pointer_type(tl.float16)) + bh64 * tokens
    return codes, scale


@triton.jit
def _rotated_segment(row, tokens, bh64, D: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr):
    """Rotated tokens of one (sequence, KV head): both halves' codes, norms, the levels, the basis."""
    half: tl.constexpr = D // 2
    first = tl.load(row + PTR0_C).to(tl.pointer_type(tl.int32)) + bh64 * tokens * (half * W0 // 32)
    second = tl.load(row + PTR1_C).to(tl.pointer_type(tl.int32)) + bh64 * tokens * (half * W1 // 32)
    norm = tl.load(row + PTR2_C).to(tl.pointer_type(tl.float16)) + bh64 * tokens
    levels = tl.load(row + PTR3_C).to(tl.pointer_type(tl.float32))
    basis = tl.load(row + PTR4_C).to(tl.pointer_type(tl.float32))
    return first, second, norm, levels, basis


@triton.jit
def _side_segment(krow, tokens, bh64, R: tl.constexpr, BITS: tl.constexpr):
    """HeadQ's side code of one (sequence, KV head): words per rank, codes, per-token steps."""
    words = tokens * BITS // 32
    codes = tl.load(krow + PTR3_C).to(tl.pointer_type(tl.int32)) + bh64 * R * words
    step = tl.load(krow + PTR4_C).to(tl.pointer_type(tl.float16)) + bh64 * tokens
    return words, codes, step


@triton.jit
def _online_softmax(s, m_i):
    """One tile of the base-2 online softmax over rows of logits s: (new running maximum,
    probabilities, factor for the sums so far); rows with nothing seen yet stay at zero."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(s - m_use[:, None]), tl.exp2(m_i - m_use)


@triton.jit
def _repeat_rows(x, TO: tl.constexpr):
    """(rows, cols) -> (TO, cols), the rows repeated (TO a multiple of rows; x itself where equal)."""
    if x.shape[0] < TO:
        x = tl.reshape(
            tl.broadcast_to(x[None, :, :], (TO // x.shape[0], x.shape[0], x.shape[1])), (TO, x.shape[1])
        )
    return x


@triton.jit
def _unpack_rows(words, BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, OUT: tl.constexpr):
    """(ROWS, COLS // per_word) int32 words -> (ROWS, COLS) codes in OUT, first code lowest."""
    return _unpack_lanes(words, BITS, 32 // BITS, ROWS, COLS, OUT)


@triton.jit
def _unpack_lanes(
    packed, BITS: tl.constexpr, LANES: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, OUT: tl.constexpr
):
    """(ROWS, COLS // LANES) integers of LANES codes each -> (ROWS, COLS) codes in OUT, first lowest."""
    shifts = tl.arange(0, LANES) * BITS
    lanes = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(lanes.to(OUT), (ROWS, COLS))


@triton.jit
def _spread(x, ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """(ROWS, GROUPS) -> (ROWS, GROUPS * GROUP), each column repeated GROUP times."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], (ROWS, GROUPS, GROUP)), (ROWS, GROUPS * GROUP))


@triton.jit
def _affine_keys_t(
    codes,
    scale,
    zero,
    n_bytes,
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

    Each code byte is loaded once (a tile's bytes are one contiguous run); its lanes and the group
    scales are spread in registers by reshapes.
    """
    per_byte: tl.constexpr = 8 // BITS
    groups: tl.constexpr = BLOCK_N // GROUP
    j = off // per_byte + tl.arange(0, BLOCK_N // per_byte)
    packed = tl.load(codes + j[None, :] * D + c[:, None], mask=j[None, :] < n_bytes, other=0)
    g = off // GROUP + tl.arange(0, groups)
    gmask = g[None, :] < n_groups
    s = tl.load(scale + c[:, None] * n_groups + g[None, :], mask=gmask, other=0.0).to(MATH)
    z = tl.load(zero + c[:, None] * n_groups + g[None, :], mask=gmask, other=0.0).to(MATH)
    q = _unpack_lanes(packed.to(tl.int32), BITS, per_byte, D, BLOCK_N, MATH)
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
    """Values at per-token widths W0..W3 (the first N_WIDTHS; W3 the widest), tokens t0..t0+BLOCK_N
    (t0 on an allocation row): (BLOCK_N, D) in MATH. A token's code is its base, then for each
    rung up to its width (twice the width below, from W0) that many bits more (``headq_a2.block``)."""
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
    base_words: tl.constexpr = D * W0 // 32
    first = row.to(tl.int64) * row_words
    base = tl.load(
        codes + (first + (tok % CHUNK) * base_words)[:, None] + tl.arange(0, base_words)[None, :],
        mask=live[:, None],
        other=0,
    )
    x = _unpack_rows(base, W0, BLOCK_N, D, MATH)
    if N_WIDTHS > 1:
        # a token's rungs take D * (width - W0) bits; they start after the bases and the wider tokens before it
        words = tl.reshape(tl.where(live, (width - W0) * D // 32, 0), (BLOCK_N // CHUNK, CHUNK))
        at = tl.reshape(tl.cumsum(words, axis=1) - words, (BLOCK_N,)) + first + CHUNK * base_words
        for rung in tl.static_range(1, 4):  # the rungs W0 << rung up to W3, each adding (W0 << rung) / 2 bits
            if (W0 << rung) <= W3:
                chosen = live & (width >= (W0 << rung))
                step_words = tl.arange(0, D * (W0 << (rung - 1)) // 32)
                packed = tl.load(codes + at[:, None] + step_words[None, :], mask=chosen[:, None], other=0)
                more = _unpack_rows(packed, W0 << (rung - 1), BLOCK_N, D, MATH)
                x = tl.where(chosen[:, None], x * (1 << (W0 << (rung - 1))) + more, x)
                at += D * (W0 << (rung - 1)) // 32
    groups: tl.constexpr = D // GROUP
    gi = tok[:, None].to(tl.int64) * groups + tl.arange(0, groups)[None, :]
    s = tl.load(scale + gi, mask=live[:, None], other=0.0).to(MATH)
    z = tl.load(zero + gi, mask=live[:, None], other=0.0).to(MATH)
    return x * _spread(s, BLOCK_N, groups, GROUP) + _spread(z, BLOCK_N, groups, GROUP)


@triton.jit
def _token_scales(scale, t, live, SCALED: tl.constexpr):
    """Each scaled token's scale (BLOCK_N,) float32, 1 for tokens stored without one; 0 past the end."""
    if SCALED:
        s = tl.load(scale + t, mask=live, other=0.0).to(tl.float32)
    else:
        s = tl.where(live, 1.0, 0.0)
    return s


@triton.jit
def _scaled_tokens(
    codes, scale, t, live, D: tl.constexpr, FORMAT: tl.constexpr, SCALED: tl.constexpr, MATH: tl.constexpr
):
    """8-bit scaled tokens t (BLOCK_N,) of one head: their levels (BLOCK_N, D) in MATH and each
    token's scale (:func:`_token_scales`). The codes are read as bytes (the words store their first
    code lowest, so byte c of a token's row is its code c), float8 bytes converted by the hardware.
    4-bit tokens are read by :func:`_nibble_tokens`."""
    rows = codes.to(tl.pointer_type(tl.uint8)) + t[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]
    rows = tl.max_contiguous(tl.multiple_of(rows, [1, 16]), [1, 16])  # segments start on 16 bytes
    byte = tl.load(rows, mask=live[:, None], other=0)
    if FORMAT == 0:
        x = byte.to(MATH) - 127
    elif FORMAT == 1:
        x = byte.to(tl.float8e4nv, bitcast=True).to(MATH)
    else:
        x = byte.to(tl.float8e5, bitcast=True).to(MATH)
    return x, _token_scales(scale, t, live, SCALED)


@triton.jit
def _nibble_tokens(codes, scale, t, live, D: tl.constexpr, SCALED: tl.constexpr, MATH: tl.constexpr):
    """4-bit scaled tokens t (BLOCK_N,) of one head as two planes read from the same bytes: the
    levels of the even channels and of the odd channels, (BLOCK_N, D/2) each (byte j of a token
    holds channel 2j low and 2j + 1 high), and each token's scale (:func:`_token_scales`). No plane
    is interleaved back into channel order: the products take them apart."""
    half: tl.constexpr = D // 2
    vector: tl.constexpr = 16 if half >= 16 else half
    rows = codes.to(tl.pointer_type(tl.uint8)) + t[:, None].to(tl.int64) * half + tl.arange(0, half)[None, :]
    rows = tl.max_contiguous(tl.multiple_of(rows, [1, vector]), [1, vector])  # segments start on 16 bytes
    byte = tl.load(rows, mask=live[:, None], other=0).to(tl.int16)
    # a code c as float16 bits 0x6400 | c is 1024 + c: levels without an int-to-float conversion
    even = ((byte & 0xF) | 0x6400).to(tl.float16, bitcast=True).to(MATH) - 1031.0
    odd = ((byte >> 4) | 0x6400).to(tl.float16, bitcast=True).to(MATH) - 1031.0
    return even, odd, _token_scales(scale, t, live, SCALED)


@triton.jit
def _plane_codes(words, rows, live, HALF: tl.constexpr, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes of WIDTH bits (2 to 4) of HALF channels per token, stored as ``pack_planes`` stores
    them: (BLOCK_N, HALF) int32."""
    base = words + rows * (HALF * WIDTH // 32)
    if WIDTH == 4:
        packed = tl.load(base + tl.arange(0, HALF // 8)[None, :], mask=live[:, None], other=0)
        code = _unpack_rows(packed, 4, BLOCK_N, HALF, tl.int32)
    else:
        packed = tl.load(base + tl.arange(0, HALF // 16)[None, :], mask=live[:, None], other=0)
        code = _unpack_rows(packed, 2, BLOCK_N, HALF, tl.int32)
        if WIDTH == 3:  # then the high bit's plane
            high = tl.load(base + HALF // 16 + tl.arange(0, HALF // 32)[None, :], mask=live[:, None], other=0)
            code |= _unpack_rows(high, 1, BLOCK_N, HALF, tl.int32) << 2
    return code


@triton.jit
def _rotated_tokens(
    first,
    second,
    norm,
    levels,
    t,
    live,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    W0: tl.constexpr,
    W1: tl.constexpr,
    MATH: tl.constexpr,
):
    """Rotated tokens t (BLOCK_N,) of one head in the interleaved basis (``decode_plan.Rotated``):
    levels (BLOCK_N, D) in MATH, the two halves' side by side, and each token's norm (BLOCK_N,)
    float32 (the levels carry the ``1 / sqrt(d)``)."""
    half: tl.constexpr = D // 2
    rows = t[:, None].to(tl.int64)
    lo_codes = tl.reshape(_plane_codes(first, rows, live, half, W0, BLOCK_N), (BLOCK_N * half,))
    hi_codes = tl.reshape(_plane_codes(second, rows, live, half, W1, BLOCK_N), (BLOCK_N * half,))
    lo = tl.reshape(tl.gather(tl.load(levels + tl.arange(0, 16)), lo_codes, 0), (BLOCK_N, half))
    hi = tl.reshape(tl.gather(tl.load(levels + 16 + tl.arange(0, 16)), hi_codes, 0), (BLOCK_N, half))
    x = tl.reshape(tl.join(lo, hi), (BLOCK_N, D)).to(MATH)
    return x, tl.load(norm + t, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _side_loads(
    codes,
    step,
    n_words,
    tokens,
    off,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
):
    """HeadQ: the packed side codes (R_PAD, BLOCK_N / per word) and steps (BLOCK_N,) of tokens off..off+BLOCK_N."""
    per_word: tl.constexpr = 32 // BITS
    r = tl.arange(0, R_PAD)
    t = off + tl.arange(0, BLOCK_N)
    st = tl.load(step + t, mask=t < tokens, other=0.0)
    w = off // per_word + tl.arange(0, BLOCK_N // per_word)
    packed = tl.load(
        codes + r[:, None] * n_words + w[None, :], mask=(r[:, None] < R) & (w[None, :] < n_words), other=0
    )
    return packed, st


@triton.jit
def _side_logits(
    packed, st, qr, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr
):
    """HeadQ: (G_PAD, BLOCK_N) logits ``(U^T q) . z_hat`` from :func:`_side_loads`' codes and steps."""
    return tl.dot(qr, _side_codes(packed, st, R, R_PAD, BLOCK_N, BITS))


@triton.jit
def _side_codes(packed, st, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr):
    """HeadQ: the (R_PAD, BLOCK_N) side codes ``z_hat`` in token order from :func:`_side_loads`' codes and steps."""
    levels: tl.constexpr = (1 << BITS) - 1
    r = tl.arange(0, R_PAD)
    z = (_unpack_rows(packed, BITS, R_PAD, BLOCK_N, tl.float32) - levels / 2) * st.to(tl.float32)[None, :]
    return tl.where(r[:, None] < R, z, 0.0)


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
    packed, st = _side_loads(codes, step, n_words, tokens, off, R, R_PAD, BLOCK_N, BITS)
    return _side_logits(packed, st, qr, R, R_PAD, BLOCK_N, BITS)
