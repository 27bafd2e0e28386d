"""Torch reference for the symmetric (mid-rise) integer layout used by side codes (HeadQ).

Layout contract:
- ``x`` has shape ``(..., n)``; codes are packed along the last axis into int32 words exactly as
  :func:`~headq_kernels.affine_reference.pack_codes` packs them (``32 // bits`` per word, first
  code in the lowest bits, a last partial word zero-filled).
- ``step`` is a float16 tensor broadcastable to ``x`` (one per token, or one per coordinate).
- Mid-rise levels: ``x_hat = (code - (2**bits - 1) / 2) * step`` for ``code`` in
  ``[0, 2**bits)``, so ``+-absmax`` are levels when ``step = 2 * absmax / (2**bits - 1)`` and no
  level is wasted on an exact zero (the 1-bit code is a sign times ``step / 2``).
- A zero step decodes to zeros whatever the codes.
"""

from __future__ import annotations

import torch

from headq_kernels.affine_reference import pack_codes, unpack_codes


def symmetric_step(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Float16 step that puts ``+-absmax`` on the outermost mid-rise levels.

    absmax: any shape, non-negative. Returns the same shape in float16.
    """
    return (2.0 * absmax.float() / ((1 << bits) - 1)).to(torch.float16)


def quantize_symmetric(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Mid-rise codes of ``x`` (..., n) at ``step`` (broadcastable, float16), packed along the last axis.

    Values beyond the outermost levels are clipped (a calibrated static step clips on purpose).
    Returns (..., ceil(n * bits / 32)) int32. Codes are computed against the float16 step so that
    decoding the stored record reproduces the quantizer's own reconstruction.
    """
    levels = (1 << bits) - 1
    safe = torch.where(step > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
    codes = torch.round(x.float() / safe + levels / 2).clamp_(0, levels)
    return pack_codes(codes, bits)


def dequantize_symmetric(
    codes: torch.Tensor, step: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_symmetric`: packed (..., w) int32 -> (..., n) in ``dtype``."""
    levels = (1 << bits) - 1
    values = unpack_codes(codes, bits, n).float() - levels / 2
    return (values * step.float()).to(dtype)
