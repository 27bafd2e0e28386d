"""Triton quantize-and-pack for the affine layout; the torch reference is :mod:`affine_reference`.

One program quantizes ``BLOCK_R`` rows times one group: min and max along the group, a float16
scale and minimum, codes rounded half to even against the float16-rounded scale (exactly the
reference's arithmetic: a float32 reciprocal for the scale, IEEE division for the codes,
``rint``), packed ``32 // bits`` to an int32 word with the
first code in the lowest bits. The grouped axis may be strided, so keys grouped along tokens
(``keys.transpose(-1, -2)``) are read in place, without a transposed copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _quantize_pack_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    rows,
    stride_outer,
    stride_row,
    stride_elem,
    words_per_row,
    groups_per_row,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_r = tl.program_id(0)
    grp = tl.program_id(1)
    outer = tl.program_id(2)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    e = grp * GROUP + tl.arange(0, GROUP)
    live = r < rows
    src = x_ptr + outer.to(tl.int64) * stride_outer + r[:, None].to(tl.int64) * stride_row
    x = tl.load(src + e[None, :].to(tl.int64) * stride_elem, mask=live[:, None], other=0.0).to(tl.float32)
    lo = tl.min(x, axis=1)
    hi = tl.max(x, axis=1)
    levels: tl.constexpr = (1 << BITS) - 1
    zero = lo.to(tl.float16)
    scale = ((hi - lo) * (1.0 / levels)).to(tl.float16)  # the reference's float32 reciprocal
    safe = tl.where(scale > 0, scale.to(tl.float32), 1.0)
    q = libdevice.rint(tl.div_rn(x - zero.to(tl.float32)[:, None], safe[:, None] + tl.zeros_like(x)))
    q = tl.minimum(tl.maximum(q, 0.0), levels * 1.0).to(tl.int32)
    per_word: tl.constexpr = 32 // BITS
    words: tl.constexpr = GROUP // per_word
    lanes = tl.reshape(q, (BLOCK_R, words, per_word))
    shifts = tl.arange(0, per_word) * BITS
    packed = tl.sum(lanes << shifts[None, None, :], axis=2)  # disjoint bit fields: a sum is an or
    row = outer.to(tl.int64) * rows + r.to(tl.int64)
    w = grp * words + tl.arange(0, words)
    tl.store(codes_ptr + row[:, None] * words_per_row + w[None, :], packed, mask=live[:, None])
    tl.store(scale_ptr + row * groups_per_row + grp, scale, mask=live)
    tl.store(zero_ptr + row * groups_per_row + grp, zero, mask=live)


def supports(x: torch.Tensor, bits: int, group: int) -> bool:
    """Whether :func:`quantize_affine` can run ``x`` (a CUDA tensor, a power-of-two group)."""
    return (
        x.is_cuda
        and bits in (1, 2, 4, 8)
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and group >= 32 // bits
        and group & (group - 1) == 0
        and group <= 1024
        and x.shape[-1] % group == 0
    )


def quantize_affine(
    x: torch.Tensor, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract and bits as :func:`headq_kernels.affine_reference.quantize_affine`, on CUDA.

    ``x`` (..., n) may be any strided view whose leading axes flatten without a copy into
    (outer, rows) (a transposed view of contiguous keys does); others are copied once.
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    x3 = x.reshape(1, 1, n) if x.ndim == 1 else x
    if x3.ndim == 2:
        x3 = x3.unsqueeze(0)
    if x3.ndim > 3:
        try:
            x3 = x3.view(-1, *x3.shape[-2:])
        except RuntimeError:
            x3 = x3.reshape(-1, *x3.shape[-2:])
    outer, rows, _ = x3.shape
    per_word = 32 // bits
    words_per_row = -(-n * bits // 32)
    groups = n // group
    codes = torch.empty((*lead, words_per_row), dtype=torch.int32, device=x.device)
    scale = torch.empty((*lead, groups), dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    if x.numel() == 0:
        return codes, scale, zero
    assert group % per_word == 0
    block_r = max(1, min(64, 4096 // group, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, block_r), groups, outer)
    _quantize_pack_kernel[grid](
        x3,
        codes,
        scale,
        zero,
        rows,
        x3.stride(0),
        x3.stride(1),
        x3.stride(2),
        words_per_row,
        groups,
        BITS=bits,
        GROUP=group,
        BLOCK_R=block_r,
    )
    return codes, scale, zero
