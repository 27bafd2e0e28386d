"""Folded decode attention over affine keys and values written in Gluon, Triton's explicit-layout
dialect: the same sums as :mod:`headq_kernels.triton_folded`, with the unpacked codes built in the
registers the matrix unit reads, so that no tile passes through shared memory.

Four warps run one split, 128 tokens per tile, on the ``m16n8k16`` tensor-core instruction. Both
products split their columns over the warps (warp ``w`` takes n-tiles ``w, w + 4, w + 8, w + 12``),
so each warp holds a quarter of the accumulators:

- keys: ``S = Qs @ K`` with ``Qs`` (key group x query head rows, channels) the queries times the
  key scales, as in the Triton kernel; ``K`` (channels, 128 tokens) is the second operand. In that
  operand lane ``(g, t)`` (``g = lane // 4``, ``t = lane % 4``) holds, for every column ``8j + g``,
  channels ``2t, 2t + 1`` (and ``+8``, ``+16``...). Column ``8j + g`` with ``j = w + 4i`` is token
  ``16g + 4w + i`` (:func:`_code_of`): byte ``w`` of word ``g`` for 2-bit codes, bytes ``2h, 2h + 1``
  (``h = w % 2``) of word ``2g + w // 2`` for 4-bit ones. One byte permute (``prmt``, its selector
  set by the warp) puts that byte of two channels' words in bytes 0 and 2 of a register; one mask
  per register then gives both channels' codes of one token as float16 subnormals.
- the first operands (``Qs``, and the probabilities times the value scales) pass through shared
  memory as row-major swizzled tiles read back by ``ldmatrix``, which hands each warp its operand
  in the register quads the instruction reads (a layout conversion left to the compiler assembled
  them with a register move per instruction).
- values: ``V`` (128 tokens in the key product's column order, channels) is the second operand,
  unpacked the same way (column ``8j + g`` is channel ``16g + 4w + i``).
- the zero terms: keys from a per-split product into a scratch buffer as in the Triton kernel,
  values as a per-tile sum.

Not part of the package (see ``experimental/README.md``): it lost or tied its benchmark against
``headq_kernels.triton_folded`` except at 2 bits and 128k tokens. :func:`launch` runs one launch
of a plan's affine/affine splits, into the parts ``triton_decode.attend`` merges. Settings it takes (``eligible``): float16 queries, head_dim 128, 2 or 4 bits on
both sides, key groups of 32 tokens, value groups of 32 channels, at most 8 query heads per KV
head, no side code (HeadQ runs on :mod:`triton_folded`), no statistics tail.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from headq_kernels import triton_folded
from headq_kernels.decode_plan import AffineChannels, AffineTokens, Plan
from headq_kernels.triton_tiles import COLUMNS_C, PTR0_C, PTR1_C, PTR2_C, SPLIT_COLUMNS_C, TOKENS_C

DIM = 128  # head_dim
GROUP = 32  # key and value group
BITS = (2, 4)
FOLD: gl.constexpr = gl.constexpr(256.0)  # as triton_folded.FOLD
UNFOLD_EXP: gl.constexpr = gl.constexpr(16)

WARPS: gl.constexpr = gl.constexpr(4)  # a split's warps: each takes a quarter of both products' columns
MAX_REGISTERS = 168  # three programs (12 warps) a multiprocessor
MMA: gl.constexpr = gl.constexpr(
    gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS.value], instr_shape=[16, 8])
)
A_OP: gl.constexpr = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA.value, k_width=2))
B_OP: gl.constexpr = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA.value, k_width=2))
ROWS: gl.constexpr = gl.constexpr(gl.SliceLayout(1, MMA.value))
COLS: gl.constexpr = gl.constexpr(gl.SliceLayout(0, MMA.value))


def padded_heads(heads: int) -> int:
    """Query heads of a KV head as the kernel's rows hold them: a power of two, at least 4 (16 rows)."""
    return max(4, triton.next_power_of_2(heads))


def eligible(plan: Plan, heads: int, head_dim: int, *, tail: int) -> bool:
    """Whether the affine/affine launches of ``plan`` can run on this kernel (float16 checked by the caller)."""
    return (
        tail == 0
        and head_dim == DIM
        and plan.key_bits in BITS
        and plan.value_bits in BITS
        and plan.key_group == GROUP
        and plan.value_group == GROUP
        and heads <= 8
        and plan.side_rank == 0
        and aligned(plan)
    )


def aligned(plan: Plan) -> bool:
    """Whether the affine segments' tensors start on 16 bytes, as the kernel's copies assume."""
    tensors = [
        t
        for seg in plan.parts
        if isinstance(seg, AffineTokens | AffineChannels)
        for t in (seg.codes, seg.scale, seg.zero)
    ]
    return all(t.data_ptr() % 16 == 0 for t in tensors)


@gluon.constexpr_function
def words_layout(k, per_lane):
    """Layout of packed words as (k rows, 8 lane groups, per_lane words, 4 // per_lane warps) for the
    second operand's unpacking: lanes (g, t) hold rows 2t, 2t + 1 (+8, +16 ...) of group g's words; of
    a group's per_lane words (16 codes a group), warp w reads word w // (4 // per_lane), dimension 3
    only broadcasts them over the warps."""
    k, per_lane = int(k), int(per_lane)
    regs = [[1, 0, 0, 0]] + [[1 << b, 0, 0, 0] for b in range(3, k.bit_length() - 1)]
    lanes = [[2, 0, 0, 0], [4, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]]
    warps = [[0, 0, 0, 1], [0, 0, 0, 2]] if per_lane == 1 else [[0, 0, 0, 1], [0, 0, 1, 0]]
    return gl.DistributedLinearLayout(
        reg_bases=regs,
        lane_bases=lanes,
        warp_bases=warps,
        block_bases=[],
        shape=[k, 8, per_lane, 4 // per_lane],
    )


@gluon.jit
def _code_of(n):
    """Token (keys) or channel (values) of operand column n = 8j + g (j = w + 4i on warp w): lane group g,
    warp w takes codes 16g + 4w .. 16g + 4w + 3, in the order i."""
    return (n % 8) * 16 + ((n // 8) % 4) * 4 + n // 32


@gluon.jit
def _code_scale(n, BITS: gl.constexpr):
    """1 / (what a code of value 1 in column n reads as, times FOLD)."""
    per_byte: gl.constexpr = 8 // BITS
    m = (n // 32) % per_byte
    return gl.exp2(UNFOLD_EXP - (BITS * m).to(gl.float32))


@gluon.jit
def _prmt(a, b, select):
    """Bytes of a and b picked by select (the ``prmt`` instruction, its selector per element)."""
    return gl.inline_asm_elementwise(
        "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, select], dtype=gl.int32, is_pure=True, pack=1
    )


@gluon.jit
def _pair(x, m: gl.constexpr, BITS: gl.constexpr):
    """Codes m of both halves of x (two rows' bytes, in bytes 0 and 2) as float16 subnormal bit patterns."""
    mask: gl.constexpr = (((1 << BITS) - 1) | (((1 << BITS) - 1) << 16)) << (BITS * m)
    v = x & mask
    lo = v.to(gl.int16).to(gl.float16, bitcast=True)
    hi = (v >> 16).to(gl.int16).to(gl.float16, bitcast=True)
    return gl.join(lo, hi)  # [..., 2]: the row pair


@gluon.jit
def _unpack(words_s, K: gl.constexpr, NW: gl.constexpr, BITS: gl.constexpr):
    """Packed words (K rows of NW int32 words, 128 codes, in shared memory) -> (K, 128) float16 codes
    in the second-operand layout: row k, column n = code ``_code_of(n)`` of the row."""
    PL: gl.constexpr = NW // 8  # words of a lane group
    L4: gl.constexpr = words_layout(K, PL)
    w = words_s.reshape([K, 8, PL]).load(gl.SliceLayout(3, L4))
    w = gl.reshape(gl.expand_dims(w, 3) + gl.zeros([K, 8, PL, 4 // PL], gl.int32, L4), [K // 2, 2, 8, 4])
    w0, w1 = gl.split(gl.permute(w, [0, 2, 3, 1]))  # (K / 2, lane group, warp) words of rows 2k, 2k + 1
    warp = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, w0.type.layout)))[None, None, :]
    if BITS == 2:  # byte w of both rows' words in bytes 0 and 2: four codes each
        x = _prmt(w0, w1, warp * 0x101 + 0x400 + gl.zeros_like(w0))
        u = gl.join(
            gl.join(_pair(x, 0, BITS), _pair(x, 1, BITS)), gl.join(_pair(x, 2, BITS), _pair(x, 3, BITS))
        )
    else:  # bytes 2h, 2h + 1 (h = w % 2) of both rows' words: two codes a byte
        lo = _prmt(w0, w1, (warp % 2) * 0x202 + 0x400 + gl.zeros_like(w0))
        hi = _prmt(w0, w1, (warp % 2) * 0x202 + 0x501 + gl.zeros_like(w0))
        u = gl.join(
            gl.join(_pair(lo, 0, BITS), _pair(lo, 1, BITS)), gl.join(_pair(hi, 0, BITS), _pair(hi, 1, BITS))
        )
    # [K / 2, g, w, row bit, i bit 0, i bit 1] -> (row, column 32i + 8w + g)
    u = gl.permute(u, [0, 3, 5, 4, 2, 1])
    return gl.convert_layout(gl.reshape(u, [K, 128]), B_OP, assert_trivial=True)


@gluon.jit
def _issue(
    kw_s,
    vw_s,
    vs_s,
    vz_s,
    st,
    k_codes,
    k_words,
    v_codes,
    v_scale,
    v_zero,
    k_off,
    v_off,
    t,
    length,
    K_PW: gl.constexpr,
    K_NW: gl.constexpr,
    V_W: gl.constexpr,
    VX: gl.constexpr,
):
    """Start copying tile t's key words, value words (rows in the product's token order), value scales
    and zero points into stage st; one commit group (empty past the split's end)."""
    N: gl.constexpr = 128
    CK: gl.constexpr = gl.BlockedLayout([1, 2], [32 // (K_NW // 2), K_NW // 2], [WARPS, 1], [1, 0])
    CV: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (V_W // 4), V_W // 4], [WARPS, 1], [1, 0])
    CS: gl.constexpr = gl.BlockedLayout([1, VX], [32, 1], [WARPS, 1], [1, 0])
    here = t < length
    word0 = gl.multiple_of((k_off + t) // K_PW, 2)  # splits start on key groups: whole word pairs
    kc = gl.arange(0, 128, layout=gl.SliceLayout(1, CK))
    kw = word0 + gl.arange(0, K_NW, layout=gl.SliceLayout(0, CK))
    k_in = (kw < gl.multiple_of(k_words, 2)) & here
    async_copy.async_copy_global_to_shared(
        kw_s.index(st), k_codes + kc[:, None] * k_words + kw[None, :], mask=k_in[None, :]
    )
    vt = _code_of(gl.arange(0, N, layout=gl.SliceLayout(1, CV)))
    vw = gl.arange(0, V_W, layout=gl.SliceLayout(0, CV))
    rows = (v_off + t + vt).to(gl.int64)
    async_copy.async_copy_global_to_shared(
        vw_s.index(st), v_codes + rows[:, None] * V_W + vw[None, :], mask=((t + vt < length) & here)[:, None]
    )
    st_t = _code_of(gl.arange(0, N, layout=gl.SliceLayout(1, CS)))
    sx = gl.arange(0, VX, layout=gl.SliceLayout(0, CS))
    srow = (v_off + t + st_t).to(gl.int64)
    s_in = ((t + st_t < length) & here)[:, None]
    async_copy.async_copy_global_to_shared(
        vs_s.index(st), v_scale + srow[:, None] * VX + sx[None, :], mask=s_in
    )
    async_copy.async_copy_global_to_shared(
        vz_s.index(st), v_zero + srow[:, None] * VX + sx[None, :], mask=s_in
    )
    async_copy.commit_group()


@gluon.jit
def _key_scales(k_scale, k_groups, k_off, t, length, D: gl.constexpr, XP: gl.constexpr):
    """(D, XP) key scales of tile t's groups (zero past the split's end or the segment's)."""
    KS: gl.constexpr = gl.BlockedLayout([1, XP], [32, 1], [WARPS, 1], [1, 0])
    c = gl.arange(0, D, layout=gl.SliceLayout(1, KS))
    g = (k_off + t) // 32 + gl.arange(0, XP, layout=gl.SliceLayout(0, KS))
    return gl.load(
        k_scale + c[:, None] * k_groups + g[None, :], mask=((g < k_groups) & (t < length))[None, :], other=0.0
    )


@gluon.jit
def _folded_split_kernel(
    q_ptr,
    seg_ptr,
    split_ptr,
    mask_ptr,
    o_ptr,
    ml_ptr,
    zb_ptr,
    HKV,
    n_splits,
    mask_stride,
    qk_scale,
    G: gl.constexpr,
    GP: gl.constexpr,
    K_BITS: gl.constexpr,
    V_BITS: gl.constexpr,
    NGB: gl.constexpr,
    HAS_MASK: gl.constexpr,
):
    """One split of one (sequence, KV head); tables and outputs as ``triton_folded._folded_split_kernel``
    (``zb_ptr``: scratch of 16 x NGB floats per program for the key zero terms)."""
    D: gl.constexpr = 128
    N: gl.constexpr = 128
    VX: gl.constexpr = D // 32  # value channel groups
    XP: gl.constexpr = 4  # key groups of a tile, value channel groups
    KROWS: gl.constexpr = XP * GP  # rows (head, group) of both products; GP at least 4
    gl.static_assert(GP >= 4)
    K_PW: gl.constexpr = 32 // K_BITS
    K_NW: gl.constexpr = N // K_PW
    V_W: gl.constexpr = D * V_BITS // 32
    ZB: gl.constexpr = 32 if NGB > 32 else NGB

    bh = gl.program_id(1)
    b = (bh // HKV).to(gl.int64)
    bh64 = bh.to(gl.int64)
    srow = split_ptr + gl.program_id(0) * SPLIT_COLUMNS_C
    krow = seg_ptr + gl.load(srow) * COLUMNS_C
    k_off = gl.load(srow + 1)
    vrow = seg_ptr + gl.load(srow + 2) * COLUMNS_C
    v_off = gl.load(srow + 3)
    length = gl.load(srow + 4)
    position = gl.load(srow + 5)
    split = gl.load(srow + 6)
    k_tokens = gl.load(krow + TOKENS_C)
    k_words = k_tokens // K_PW
    k_groups = k_tokens // 32
    # base alignments (bytes) the host checks (``aligned``): whole word pairs and scale rows
    k_codes = gl.multiple_of(gl.load(krow + PTR0_C).to(gl.pointer_type(gl.int32)) + bh64 * D * k_words, 16)
    k_scale = gl.load(krow + PTR1_C).to(gl.pointer_type(gl.float16)) + bh64 * D * k_groups
    k_zero = gl.load(krow + PTR2_C).to(gl.pointer_type(gl.float16)) + bh64 * D * k_groups
    v_tokens = gl.load(vrow + TOKENS_C)
    v_codes = gl.multiple_of(gl.load(vrow + PTR0_C).to(gl.pointer_type(gl.int32)) + bh64 * v_tokens * V_W, 16)
    v_scale = gl.multiple_of(gl.load(vrow + PTR1_C).to(gl.pointer_type(gl.float16)) + bh64 * v_tokens * VX, 8)
    v_zero = gl.multiple_of(gl.load(vrow + PTR2_C).to(gl.pointer_type(gl.float16)) + bh64 * v_tokens * VX, 8)

    # rows (r, x) of both products: head r, key group x of the tile (keys) or channel group x
    # (values); lane g holds rows g and g + 8, so one group and two heads
    m = gl.arange(0, KROWS, layout=ROWS)
    mx = m % XP
    mr = m // XP
    n = gl.arange(0, N, layout=COLS)
    # the key product's first operand as (head, group, channel), 8 channels of one row a thread (16-byte
    # rows into shared memory): queries broadcast over groups, key scales over heads
    A3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [GP, XP, 32 // KROWS], [1, 1, WARPS], [2, 1, 0])
    ar = gl.arange(0, GP, layout=gl.SliceLayout(1, gl.SliceLayout(1, A3)))
    qc = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, A3)))
    q_f = gl.load(q_ptr + (bh64 * G + ar[:, None]) * D + qc[None, :], mask=(ar < G)[:, None], other=0.0)
    q_f = (q_f.to(gl.float32) * (qk_scale * FOLD)).to(gl.float16)[:, None, :]  # (GP, 1, D)
    ac16 = gl.arange(0, D, layout=gl.SliceLayout(0, A_OP))

    # key zero terms q_r . z_g * qk_scale of every key group of the split, into the scratch
    qr16 = gl.arange(0, 16, layout=gl.SliceLayout(1, A_OP))
    q16 = gl.load(q_ptr + (bh64 * G + qr16[:, None]) * D + ac16[None, :], mask=(qr16 < G)[:, None], other=0.0)
    bc = gl.arange(0, D, layout=gl.SliceLayout(1, B_OP))
    bg = gl.arange(0, ZB, layout=gl.SliceLayout(0, B_OP))
    zr = gl.arange(0, 16, layout=ROWS)
    zg = gl.arange(0, ZB, layout=COLS)
    g0 = k_off // 32
    split_groups = (length + 31) // 32
    scratch = zb_ptr + (bh64 * n_splits + split) * (16 * NGB)
    for j in gl.static_range(NGB // ZB):
        gb = j * ZB + bg
        kz_in = (gb < split_groups) & (g0 + gb < k_groups)
        kz = gl.load(k_zero + bc[:, None] * k_groups + (g0 + gb)[None, :], mask=kz_in[None, :], other=0.0)
        zb = mma_v2(q16, kz, gl.zeros([16, ZB], gl.float32, layout=MMA))
        gl.store(scratch + zr[:, None] * NGB + (j * ZB + zg)[None, :], zb * qk_scale)
    gl.thread_barrier()

    # (head, group, column) views of the accumulators; the picked logits are (head, 1, column)
    zero3 = gl.reshape(gl.zeros([KROWS, N], gl.float32, layout=MMA), [GP, XP, N])
    L3: gl.constexpr = zero3.type.layout
    n3 = gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    tok3 = _code_of(n3)  # key product column -> token; value product column -> channel
    # (GP, 1, N): each column's group (of its token, or of its channel), the row to take it from
    pick = gl.max(zero3, axis=1, keep_dims=True).to(gl.int32) + tok3[None, None, :] // 32
    k_col = _code_scale(n, K_BITS)
    v_col = _code_scale(n, V_BITS)
    m_i = gl.full_like(gl.max(gl.max(zero3, axis=1, keep_dims=True), axis=2), float("-inf"))  # (GP, 1)
    l_i = gl.zeros_like(m_i)
    z_i = gl.sum(zero3, axis=2)  # (GP, XP): value zero terms
    acc = gl.zeros([KROWS, D], gl.float32, layout=MMA)
    mask_row = mask_ptr + b * mask_stride + position

    # two stages of shared memory for the words and value scales of a tile, filled by cp.async
    S3: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    kw_s = gl.allocate_shared_memory(gl.int32, [2, D, K_NW], S3)
    vw_s = gl.allocate_shared_memory(gl.int32, [2, N, V_W], S3)
    vs_s = gl.allocate_shared_memory(gl.float16, [2, N, VX], S3)
    vz_s = gl.allocate_shared_memory(gl.float16, [2, N, VX], S3)
    # the first operands of both products pass through shared memory, rows of channels or tokens
    # in 16-byte swizzled pieces (read back by ldmatrix)
    OP_S: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    ks_s = gl.allocate_shared_memory(gl.float16, [XP, D], S3)
    qs_s = gl.allocate_shared_memory(gl.float16, [KROWS, D], OP_S)
    p_s = gl.allocate_shared_memory(gl.float16, [KROWS, N], OP_S)
    _issue(
        kw_s, vw_s, vs_s, vz_s, 0, k_codes, k_words, v_codes, v_scale, v_zero, k_off, v_off, 0, length, K_PW, K_NW, V_W, VX
    )  # fmt: skip
    ks_next = _key_scales(k_scale, k_groups, k_off, 0, length, D, XP)
    VS_L: gl.constexpr = gl.SliceLayout(0, L3)  # (group, column)
    KS_L: gl.constexpr = gl.SliceLayout(0, A3)  # (group, channel)
    i = 0
    for t in range(0, length, N):
        st = i % 2
        gl.thread_barrier()  # every warp has read stage 1 - st (the last tile): it may be overwritten
        _issue(
            kw_s, vw_s, vs_s, vz_s, 1 - st, k_codes, k_words, v_codes, v_scale, v_zero, k_off, v_off, t + N, length, K_PW, K_NW, V_W, VX
        )  # fmt: skip
        ks_s.permute([1, 0]).store(ks_next)
        ks_next = _key_scales(k_scale, k_groups, k_off, t + N, length, D, XP)
        bias = gl.load(scratch + mr * NGB + t // 32 + mx)
        async_copy.wait_group(1)
        gl.thread_barrier()  # stage st's copies and this tile's key scales (ks_s) are visible to all
        vs = vs_s.index(st).permute([1, 0]).load(VS_L).to(gl.float32)[None, :, :]  # (1, XP, N)
        vz = vz_s.index(st).permute([1, 0]).load(VS_L).to(gl.float32)[None, :, :]
        i += 1

        # keys: the product's rows (r, x) are q_r times group x's scales
        qs_s.store(gl.reshape(q_f * ks_s.load(KS_L)[None, :, :], [KROWS, D]))
        gl.thread_barrier()
        s = mma_v2(
            qs_s.load(A_OP),
            _unpack(kw_s.index(st), D, K_NW, K_BITS),
            gl.zeros([KROWS, N], gl.float32, layout=MMA),
        )
        s = s * k_col[None, :] + bias[:, None]
        logits = gl.gather(gl.reshape(s, [GP, XP, N]), pick, axis=1)  # row (r, group of the column)
        keep = t + tok3 < length
        if HAS_MASK:
            keep = keep & (gl.load(mask_row + t + tok3, mask=keep, other=0) != 0)
        logits = gl.where(keep[None, None, :], logits, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(logits, axis=2))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(logits - m_use[:, :, None])
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, axis=2)
        m_i = m_new

        # values: rows (r, x) = p_r times the scale of channel group x at each token
        p3 = p + zero3
        z_i = z_i * alpha + gl.sum(p3 * vz, axis=2)
        p_s.store(gl.reshape((p3 * (vs * FOLD)).to(gl.float16), [KROWS, N]))
        gl.thread_barrier()
        pvv = mma_v2(
            p_s.load(A_OP),
            _unpack(vw_s.index(st), N, V_W, V_BITS),
            gl.zeros([KROWS, D], gl.float32, layout=MMA),
        )
        acc3 = gl.reshape(acc, [GP, XP, D]) * alpha[:, :, None]
        acc = gl.convert_layout(gl.reshape(acc3, [KROWS, D]), MMA) + pvv
    async_copy.wait_group(0)

    out3 = gl.reshape(acc * v_col[None, :], [GP, XP, D]) + z_i[:, :, None]
    out = gl.gather(out3, pick, axis=1)  # (GP, 1, D): each channel from its group's row
    r3 = gl.arange(0, GP, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    row_out = ((bh64 * n_splits + split) * G + r3)[:, None]  # (GP, 1)
    r_in = (r3 < G)[:, None]
    gl.store(o_ptr + row_out[:, :, None] * D + tok3[None, None, :], out, mask=r_in[:, :, None])
    gl.store(ml_ptr + row_out * 2, m_i, mask=r_in)
    gl.store(ml_ptr + row_out * 2 + 1, l_i, mask=r_in)


def launch(
    q: torch.Tensor,
    plan: Plan,
    splits: torch.Tensor,
    mask: torch.Tensor | None,
    parts: torch.Tensor,
    ml: torch.Tensor,
    scale: float,
) -> Any:
    """One launch over a plan's affine/affine ``splits`` into ``triton_decode.attend``'s parts
    (``parts``, ``ml``); ``scale`` as ``attend`` takes it."""
    b, hkv, g, _ = q.shape
    ngb = triton_folded.bias_columns(plan)
    scratch = torch.empty((b * hkv * plan.n_splits, 16, ngb), dtype=torch.float32, device=q.device)
    return _folded_split_kernel[(splits.shape[0], b * hkv)](
        q, plan.segments, splits, mask if mask is not None else q, parts, ml, scratch,
        hkv, plan.n_splits, mask.stride(0) if mask is not None else 0, scale * 1.4426950408889634,
        G=g, GP=padded_heads(g), K_BITS=plan.key_bits, V_BITS=plan.value_bits, NGB=ngb,
        HAS_MASK=mask is not None, num_warps=WARPS.value, maxnreg=MAX_REGISTERS,
    )  # fmt: skip
