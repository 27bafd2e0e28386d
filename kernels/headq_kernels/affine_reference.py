"""Torch reference for the affine (min/scale) integer layout: quantize, dequantize, pack, unpack.

Layout contract (shared with the Triton kernels that will sit beside this file):
- ``x`` has shape ``(..., n)`` after the grouped axis is moved last; groups are ``group``
  consecutive elements of that axis, so ``n`` must be a multiple of ``group``.
- ``codes`` are packed along the grouped axis into int32 words, ``32 // bits`` codes per word,
  the first code in the lowest bits: shape ``(..., ceil(n * bits / 32))``, the last word
  zero-filled when ``n * bits`` is not a multiple of 32.
- ``scale`` and ``zero`` (the group minimum) are float16, shape ``(..., n // group)``.
- ``x_hat = code * scale + zero``; a group whose range is zero gets ``scale = 0`` and codes 0.

Keys grouped along tokens are stored with their channels adjacent (:func:`bytes_along_tokens`):
the bytes of the words packed along tokens, ``(..., tokens * bits / 8, d)`` uint8, so that the
codes of a tile of tokens over every channel are one contiguous run of memory.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 4, 8)


def codes_per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 32 // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into int32 words.

    codes: (..., n). Returns (..., ceil(n * bits / 32)) int32; a last partial word is zero-filled.
    """
    per_word = codes_per_word(bits)
    n = codes.shape[-1]
    lanes = codes.to(torch.int32)
    if n % per_word:
        lanes = torch.nn.functional.pad(lanes, (0, per_word - n % per_word))
    lanes = lanes.reshape(*codes.shape[:-1], -1, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=codes.device)
    # Disjoint bit fields, so a sum is the bitwise or; int32 wrap-around keeps the top lane's bits.
    return (lanes << shifts).sum(dim=-1, dtype=torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (..., w) int32 -> (..., n) uint8 (n defaults to every lane)."""
    per_word = codes_per_word(bits)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    lanes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    lanes = lanes.reshape(*words.shape[:-1], words.shape[-1] * per_word)
    return (lanes if n is None else lanes[..., :n]).to(torch.uint8)


def bytes_along_tokens(words: torch.Tensor) -> torch.Tensor:
    """Codes packed along tokens, (..., d, w) int32, with their channels adjacent: (..., 4 * w, d)
    uint8, where ``[..., j, c]`` is byte ``j`` of channel ``c``'s words (the ``8 // bits`` tokens
    ``j * 8 // bits`` onwards, the first in the lowest bits)."""
    return words.contiguous().view(torch.uint8).transpose(-1, -2).contiguous()


def words_along_tokens(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`bytes_along_tokens`: (..., 4 * w, d) uint8 -> (..., d, w) int32."""
    if data.dtype != torch.uint8 or data.shape[-2] % 4:
        raise ValueError(
            f"expected uint8 codes of whole words along tokens, got {data.dtype} {tuple(data.shape)}"
        )
    return data.transpose(-1, -2).contiguous().view(torch.int32)


def plane_widths(bits: int) -> tuple[int, ...]:
    """The packable widths a ``bits``-bit code splits into, low bits first (3 -> (2, 1), 7 -> (4, 2, 1))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1 to 8, got {bits}")
    widths, rest = [], bits
    for width in (4, 2, 1) if bits != 8 else (8,):
        if rest >= width:
            widths.append(width)
            rest -= width
    return tuple(widths)


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes in ``[0, 2**bits)`` of any width 1 to 8 into int32 words, as bit planes.

    A width :func:`pack_codes` takes is packed as it does; another is split into planes of such
    widths, low bits first (3 bits: the low two bits as 2-bit codes, then the high bit as 1-bit
    codes), each plane packed along the last axis and padded to whole words, the planes one after
    another. codes: (..., n). Returns (..., sum over planes of ceil(n * width / 32)) int32: exactly
    ``n * bits / 32`` words when ``n`` is a multiple of 32.
    """
    planes, shift = [], 0
    for width in plane_widths(bits):
        planes.append(pack_codes((codes.to(torch.int32) >> shift) & ((1 << width) - 1), width))
        shift += width
    return planes[0] if len(planes) == 1 else torch.cat(planes, dim=-1)


def unpack_planes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: (..., w) int32 -> (..., n) uint8."""
    counts = [-(-n * width // 32) for width in plane_widths(bits)]
    if sum(counts) != words.shape[-1]:
        raise ValueError(
            f"{words.shape[-1]} words do not hold {n} codes of {bits} bits ({sum(counts)} would)"
        )
    out = torch.zeros((*words.shape[:-1], n), dtype=torch.int32, device=words.device)
    start = shift = 0
    for width, count in zip(plane_widths(bits), counts, strict=True):
        out |= unpack_codes(words[..., start : start + count], width, n).to(torch.int32) << shift
        start, shift = start + count, shift + width
    return out.to(torch.uint8)


def quantize_affine(
    x: torch.Tensor, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization in groups along the last axis.

    x: (..., n) float, ``n`` a multiple of ``group``. Returns ``(codes, scale, zero)``: packed
    int32 codes (..., ceil(n * bits / 32)) and float16 scale and zero of shape (..., n // group).
    Codes are computed against the float16-rounded scale and zero, so that dequantizing the
    stored record reproduces the quantizer's own reconstruction.
    """
    n = x.shape[-1]
    if group <= 0 or n % group:
        raise ValueError(f"axis of length {n} is not a whole number of groups of {group}")
    levels = (1 << bits) - 1
    grouped = x.float().reshape(*x.shape[:-1], n // group, group)
    lo = grouped.amin(dim=-1)
    hi = grouped.amax(dim=-1)
    zero = lo.to(torch.float16)
    # Times the float32 reciprocal, not a division: CUDA torch divides by a scalar that way, so
    # this is the same arithmetic on every device (and in the Triton kernel).
    scale = ((hi - lo) * (1.0 / levels)).to(torch.float16)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(lo))
    codes = torch.round((grouped - zero.float().unsqueeze(-1)) / safe.unsqueeze(-1))
    codes = codes.clamp_(0, levels).reshape(x.shape)
    return pack_codes(codes, bits), scale, zero


def dequantize_affine(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_affine`: returns (..., n) in ``dtype``."""
    n = scale.shape[-1] * group
    values = unpack_codes(codes, bits, n).float()
    grouped = values.reshape(*values.shape[:-1], n // group, group)
    out = grouped * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return out.reshape(values.shape).to(dtype)


def dequantize_along_tokens(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Keys grouped along tokens as stored: codes (..., t * bits / 8, d) uint8 with the channels
    adjacent, scale and zero (..., d, t / group) -> (..., t, d) in ``dtype``."""
    return dequantize_affine(words_along_tokens(codes), scale, zero, bits, group, dtype).transpose(-1, -2)
