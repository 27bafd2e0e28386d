"""Kernels for the quantized KV cache. Every kernel sits beside its torch reference.

On machines without CUDA (and for layouts no kernel knows) the references are the code path.
"""

from __future__ import annotations

from headq_kernels.affine_reference import (
    SUPPORTED_BITS,
    codes_per_word,
    dequantize_affine,
    pack_codes,
    quantize_affine,
    unpack_codes,
)
from headq_kernels.symmetric_reference import (
    dequantize_symmetric,
    quantize_symmetric,
    symmetric_step,
)

__all__ = [
    "SUPPORTED_BITS",
    "codes_per_word",
    "dequantize_affine",
    "dequantize_symmetric",
    "pack_codes",
    "quantize_affine",
    "quantize_symmetric",
    "symmetric_step",
    "unpack_codes",
]
