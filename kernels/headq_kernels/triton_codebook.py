"""GSRQ's codebook tokens in the decode kernels of ``triton_decode``: the tiles of codebook values
(each sub-vector's codeword, ``dim`` contiguous float16 channels of a codebook that stays in
cache, gathered per stage and summed), the logits of codebook keys from the query's tables of the
step (``q_p . codeword`` per sub-vector, stage and codeword, summed over a key's indices: no
codeword is read), the launch that builds those tables once per step, and the constexprs a plan's
codebook segments give the split kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headq_kernels.decode_plan import CODEBOOK, Codebook, Plan


@triton.jit
def _codes(
    indices,
    rows,
    live,
    POSITIONS: tl.constexpr,
    WIDTH: tl.constexpr,
    OFFSET: tl.constexpr,
    TOKEN_BITS: tl.constexpr,
):
    """One stage's codeword index of every sub-vector: (BLOCK_N, POSITIONS) int32.

    Sub-vector p's index sits at bit ``p * TOKEN_BITS + OFFSET`` of the token's bytes (a second
    byte read where it may cross one).
    """
    token_bytes: tl.constexpr = (POSITIONS * TOKEN_BITS + 7) // 8
    p = tl.arange(0, POSITIONS)
    bit = p * TOKEN_BITS + OFFSET
    byte = bit // 8
    code = tl.load(indices + rows + byte[None, :], mask=live[:, None], other=0).to(tl.int32)
    if TOKEN_BITS % 8 != 0 or OFFSET % 8 + WIDTH > 8:
        more = live[:, None] & (byte[None, :] + 1 < token_bytes)
        code |= tl.load(indices + rows + byte[None, :] + 1, mask=more, other=0).to(tl.int32) << 8
    return (code >> (bit % 8)[None, :]) & ((1 << WIDTH) - 1)


@triton.jit
def _codewords(book, code, POSITIONS: tl.constexpr, DIM: tl.constexpr, WIDTH: tl.constexpr):
    """The codewords of indices code (BLOCK_N, POSITIONS), each ``DIM`` contiguous channels of
    sub-vector p's book: (BLOCK_N, POSITIONS, DIM) float32. Unmasked: the indices of tokens past the
    segment are read as 0, and their codewords meet a zero weight."""
    p = tl.arange(0, POSITIONS)
    at = (p[None, :, None] * (1 << WIDTH) + code[:, :, None]) * DIM + tl.arange(0, DIM)[None, None, :]
    return tl.load(book + at).to(tl.float32)


@triton.jit
def _codebook_codes(
    indices,
    t,
    live,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIM: tl.constexpr,
    W0: tl.constexpr,
    W1: tl.constexpr,
    STAGES: tl.constexpr,
    VECTOR: tl.constexpr,
):
    """The codeword indices of codebook tokens t (BLOCK_N,) of one head: each stage's
    (BLOCK_N, D // DIM) int32 (the second stage's repeats the first's with one stage).

    VECTOR: the indices are whole bytes (8 bits a stage) and each token's bytes start on a
    ``VECTOR``-byte boundary (0: not so), so a token's bytes are read as one vector, not one byte
    per sub-vector and stage.
    """
    positions: tl.constexpr = D // DIM
    token_bits: tl.constexpr = W0 + W1  # W1 is 0 with one stage
    token_bytes: tl.constexpr = (positions * token_bits + 7) // 8
    rows = t[:, None].to(tl.int64) * token_bytes
    if VECTOR > 0:
        rows = tl.multiple_of(rows, [VECTOR, VECTOR])  # the caller states the same of ``indices``
        raw = tl.load(indices + rows + tl.arange(0, token_bytes)[None, :], mask=live[:, None], other=0)
        if STAGES > 1:  # position-major, stage-minor: stage 0 at the even bytes
            first, second = tl.split(tl.reshape(raw, (BLOCK_N, positions, 2)))
            code0 = first.to(tl.int32)
            code1 = second.to(tl.int32)
        else:
            code0 = raw.to(tl.int32)
            code1 = code0
    else:
        code0 = _codes(indices, rows, live, positions, W0, 0, token_bits)
        code1 = code0
        if STAGES > 1:
            code1 = _codes(indices, rows, live, positions, W1, W0, token_bits)
    return code0, code1


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
    VECTOR: tl.constexpr,
):
    """Codebook tokens t (BLOCK_N,) of one head, decoded (the stages' codewords summed): (BLOCK_N, D)
    float32. ``VECTOR`` as for :func:`_codebook_codes`."""
    positions: tl.constexpr = D // DIM
    code0, code1 = _codebook_codes(indices, t, live, D, BLOCK_N, DIM, W0, W1, STAGES, VECTOR)
    x = _codewords(book0, code0, positions, DIM, W0)
    if STAGES > 1:
        x += _codewords(book1, code1, positions, DIM, W1)
    return tl.reshape(x, (BLOCK_N, D))


@triton.jit
def _table_entries(tables, p, code, WIDTH: tl.constexpr, GP: tl.constexpr):
    """Sub-vector p's entries of each token, from indices code (BLOCK_N,) into one stage's
    (positions, 2^WIDTH, GP) table: (GP, BLOCK_N) float32, a token's GP heads read as one vector."""
    at = (p * (1 << WIDTH) + code) * GP
    return tl.load(tables + at[None, :] + tl.arange(0, GP)[:, None]).to(tl.float32)


@triton.jit
def _codebook_logits(
    indices,
    tables,
    t,
    live,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GP: tl.constexpr,
    DIM: tl.constexpr,
    W0: tl.constexpr,
    W1: tl.constexpr,
    STAGES: tl.constexpr,
    VECTOR: tl.constexpr,
):
    """The logits q . k (unscaled) of codebook keys t (BLOCK_N,) for the query heads of one KV head,
    from the query's tables of this step (:func:`_query_tables`): per stage,
    (D // DIM, 2^W, GP) entries ``q_p . codeword`` (q over the channel scale where there is one),
    summed over a token's sub-vectors and stages. No codeword is read. (GP, BLOCK_N): one row per
    query head, padded to a power of two.

    One sub-vector and stage at a time, so that each thread keeps its tokens and the GP heads of an
    entry are one load. VECTOR >= 4 (whole-byte indices on 4 bytes or more, ``_book``): a token's
    indices are read as 32-bit words, four indices each; otherwise a byte (or two) per index.
    """
    positions: tl.constexpr = D // DIM
    token_bits: tl.constexpr = W0 + W1  # W1 is 0 with one stage
    token_bytes: tl.constexpr = (positions * token_bits + 7) // 8
    second = tables + positions * (1 << W0) * GP  # the second stage's table
    s = tl.zeros((GP, BLOCK_N), tl.float32)
    if VECTOR >= 4:  # index byte 4 j + i is sub-vector (4 j + i) // STAGES's, at stage (4 j + i) % STAGES
        words = indices.to(tl.pointer_type(tl.int32)) + t.to(tl.int64) * (token_bytes // 4)
        for j in tl.static_range(token_bytes // 4):
            word = tl.load(words + j, mask=live, other=0)
            for i in tl.static_range(4):
                code = (word >> (8 * i)) & 255
                if (4 * j + i) % STAGES == 0:
                    s += _table_entries(tables, (4 * j + i) // STAGES, code, W0, GP)
                else:
                    s += _table_entries(second, (4 * j + i) // STAGES, code, W1, GP)
    else:
        rows = t.to(tl.int64) * token_bytes
        for p in tl.static_range(positions):
            s += _table_entries(tables, p, _index(indices, rows, live, p * token_bits, W0), W0, GP)
            if STAGES > 1:
                code = _index(indices, rows, live, p * token_bits + W0, W1)
                s += _table_entries(second, p, code, W1, GP)
    return s


@triton.jit
def _index(indices, rows, live, BIT: tl.constexpr, WIDTH: tl.constexpr):
    """The index of WIDTH bits at bit BIT of each token's bytes (rows: their offsets): (BLOCK_N,) int32
    (a second byte read only where the index crosses into it, so never past the token's bytes)."""
    code = tl.load(indices + rows + BIT // 8, mask=live, other=0).to(tl.int32)
    if BIT % 8 + WIDTH > 8:
        code |= tl.load(indices + rows + BIT // 8 + 1, mask=live, other=0).to(tl.int32) << 8
    return (code >> (BIT % 8)) & ((1 << WIDTH) - 1)


@triton.jit
def _query_tables_kernel(
    q_ptr,
    scale_ptr,
    book0,
    book1,
    out_ptr,
    HKV,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    DIM: tl.constexpr,
    W0: tl.constexpr,
    W1: tl.constexpr,
    STAGES: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Sub-vector p of one (sequence, KV head): the entry ``q_p . codeword`` of every codeword of
    each stage, for the G query heads (GP columns, zero past them), at [stage][p, codeword, head]."""
    bh = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    r = tl.arange(0, GP)
    j = p * DIM + tl.arange(0, DIM)
    q = tl.load(q_ptr + (bh * G + r[:, None]) * D + j[None, :], mask=r[:, None] < G, other=0.0).to(tl.float32)
    if SCALED:  # the codewords approximate scale * k: q . k = (q / scale) . codeword
        q = q / tl.load(scale_ptr + (bh % HKV) * D + j).to(tl.float32)[None, :]
    positions: tl.constexpr = D // DIM
    entries: tl.constexpr = positions * ((1 << W0) + (1 << W1) * (STAGES - 1)) * GP
    out = out_ptr + bh * ((entries + 7) // 8 * 8)  # rows on 16 bytes or more
    _query_table(q, book0, out, p, W0, DIM, GP)
    if STAGES > 1:
        _query_table(q, book1, out + positions * (1 << W0) * GP, p, W1, DIM, GP)


@triton.jit
def _query_table(q, book, out, p, W: tl.constexpr, DIM: tl.constexpr, GP: tl.constexpr):
    """One stage's entries of sub-vector p: (2^W, GP), query (GP, DIM) against its codewords."""
    at = p * (1 << W) + tl.arange(0, 1 << W)
    words = tl.load(book + at[:, None] * DIM + tl.arange(0, DIM)[None, :]).to(tl.float32)
    entries = tl.sum(words[:, None, :] * q[None, :, :], axis=2)
    tl.store(out + at[:, None] * GP + tl.arange(0, GP)[None, :], entries.to(out.dtype.element_ty))


def _query_tables(
    q: torch.Tensor, plan: Plan, book: tuple[int, ...], gp: int, dtype: torch.dtype
) -> torch.Tensor:
    """The query's tables of this step for a plan's codebook keys, (b * hkv, entries) in ``dtype``:
    per stage, (D // dim, codewords, gp) entries ``q_p . codeword`` (``K_BOOK`` in ``book``; gp the
    query heads padded to a power of two). A key's logit is the sum of its entries, so the split
    kernel reads no codeword for keys."""
    segs = [seg for seg in plan.every(CODEBOOK, keys=True) if isinstance(seg, Codebook)]
    shared = {
        (tuple(x.data_ptr() for x in seg.books), 0 if seg.scale is None else seg.scale.data_ptr())
        for seg in segs
    }
    if len(shared) > 1:
        raise ValueError(
            "the codebook key segments of one plan must share their codebooks and scale (one layer's)"
        )
    b, hkv, g, d = q.shape
    dim, w0, w1, stages, scaled, _ = book
    seg = segs[0]
    entries = d // dim * ((1 << w0) + (1 << w1) * (stages - 1)) * gp
    tables = torch.empty((b * hkv, -(-entries // 8) * 8), dtype=dtype, device=q.device)  # rows on 16 bytes
    _query_tables_kernel[(b * hkv, d // dim)](
        q, seg.scale if seg.scale is not None else q, seg.books[0], seg.books[-1], tables, hkv,
        G=g, GP=gp, D=d, DIM=dim, W0=w0, W1=w1, STAGES=stages, SCALED=scaled,
    )  # fmt: skip
    return tables


def _book(plan: Plan, *, keys: bool) -> tuple[int, ...]:
    """Codebook constexprs: (dim, first stage's index bits, second's or 0, stages, scaled, vector).

    vector: with whole-byte indices (8 bits a stage) and a power-of-two count of index bytes per
    token, the vector (at most 16 bytes) every codebook segment's tokens start on; 0 otherwise, and
    the kernel reads one byte per sub-vector and stage.
    """
    segs = [seg for seg in plan.every(CODEBOOK, keys=keys) if isinstance(seg, Codebook)]
    if not segs:
        return (1, 8, 0, 1, 0, 0)
    seg, w = segs[0], segs[0].widths
    token_bytes = seg.indices.shape[-1]
    vector = min(16, token_bytes)
    whole = all(width == 8 for width in w) and token_bytes & (token_bytes - 1) == 0
    if not (whole and all(s.indices.data_ptr() % vector == 0 for s in segs)):
        vector = 0
    dim = int(seg.books[0].shape[-1])
    return (dim, w[0], w[1] if len(w) > 1 else 0, len(w), int(seg.scale is not None), vector)
